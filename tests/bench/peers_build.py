"""Builds llama.cpp's ``llama-server`` and ``llama-quantize`` once, for tests/bench/bench_peers.py.

The source is the llama.cpp that PyPI's ``llama-cpp-python`` source distribution vendors (the only way to
reach llama.cpp from a machine that sees PyPI but not GitHub):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d var/peers/
    -> var/peers/src/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake (Release, GGML_NATIVE, no curl/OpenSSL/web UI, no tests/examples) -> var/peers/build-0.3.36
    cmake --build ... -j 2 --target llama-server llama-quantize
    -> var/peers/bin/llama-server, var/peers/bin/llama-quantize, var/peers/bin/stamp.json

A later run finds the stamp (same version, same cmake flags, both binaries there) and builds nothing. About
10 minutes on 2 cores; a progress line (steps done, elapsed time) every 30 s, the full log in
var/peers/build-0.3.36.log.

    python tests/bench/peers_build.py [--jobs 2] [--force] [--var-dir var]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from deploy.llamacpp import LLAMA_CPP_PYTHON_VERSION, BuildError, unpacked_source

TARGETS = ("llama-server", "llama-quantize")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",  # deprecated in this llama.cpp (a warning): downloads are off either way
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # no npm build of the web UI ...
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ... and no download of it from a Hugging Face bucket (no internet)
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries
)
PROGRESS_EVERY_S = 30.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PeerBinaries:
    server: Path
    quantize: Path
    version: str
    build_seconds: float | None  # None: reused from an earlier build


def _stamp_content(version: str) -> dict:
    return {"llama_cpp_python": version, "cmake_flags": list(CMAKE_FLAGS), "targets": list(TARGETS)}


def peers_dir(var_dir: Path | None = None) -> Path:
    return Path(var_dir or os.environ.get("NIGHTCAP_VAR") or ROOT / "var") / "peers"


def built(var_dir: Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> PeerBinaries | None:
    """The binaries of an earlier build with this version and these flags, or None."""
    bin_dir = peers_dir(var_dir) / "bin"
    try:
        stamp = json.loads((bin_dir / "stamp.json").read_text())
    except (OSError, ValueError):
        return None
    if {key: stamp.get(key) for key in _stamp_content(version)} != _stamp_content(version):
        return None
    server, quantize = bin_dir / "llama-server", bin_dir / "llama-quantize"
    if not (os.access(server, os.X_OK) and os.access(quantize, os.X_OK)):
        return None
    return PeerBinaries(server, quantize, version, None)


def ensure_built(
    var_dir: Path | None = None, jobs: int = 2, force: bool = False, version: str = LLAMA_CPP_PYTHON_VERSION
) -> PeerBinaries:
    """Reuses the stamped binaries or downloads, unpacks and builds them; raises BuildError on any failure."""
    if not force and (found := built(var_dir, version)):
        logger.info("llama.cpp {} binaries already built: {}", version, found.server.parent)
        return found
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is not installed (apt-get install cmake g++)")
    peers = peers_dir(var_dir)
    peers.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    source = unpacked_source(peers, version)
    build = peers / f"build-{version}"
    log_path = peers / f"build-{version}.log"
    generator = ["-G", "Ninja"] if shutil.which("ninja") and not (build / "Makefile").exists() else []
    with log_path.open("w") as log:
        logger.info("configuring llama.cpp (llama-cpp-python {}) in {}", version, build)
        _run(["cmake", "-S", str(source), "-B", str(build), *generator, *CMAKE_FLAGS], log, log_path, "configure")
        logger.info(
            "building {} with {} jobs (about 10 minutes on 2 cores); log: {}", ", ".join(TARGETS), jobs, log_path
        )
        command = ["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TARGETS]
        _run(command, log, log_path, "build", started)
    bin_dir = peers / "bin"
    bin_dir.mkdir(exist_ok=True)
    for target in TARGETS:
        produced = build / "bin" / target
        if not produced.is_file():
            raise BuildError(f"the build finished but {produced} is missing; see {log_path}")
        shutil.copy2(produced, bin_dir / target)
    seconds = time.monotonic() - started
    stamp = {**_stamp_content(version), "build_seconds": round(seconds, 1), "built_at": time.strftime("%F %T")}
    (bin_dir / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
    logger.info("built {} in {:.0f} s: {}", ", ".join(TARGETS), seconds, bin_dir)
    return PeerBinaries(bin_dir / "llama-server", bin_dir / "llama-quantize", version, seconds)


def _run(command: list[str], log, log_path: Path, step: str, started: float | None = None) -> None:
    """Runs a cmake step into the log; during the build, a progress line every PROGRESS_EVERY_S seconds."""
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    started = started or time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last, progress = time.monotonic(), ""
    assert process.stdout is not None
    for line in process.stdout:
        log.write(line)
        if match := re.match(r"\[\s*(\d+)/(\d+)\]|\[\s*(\d+)%\]", line):  # ninja [k/n], make [ p%]
            progress = f"{match[1]}/{match[2]} steps" if match[1] else f"{match[3]}%"
        if step == "build" and time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            logger.info("building {}: {}, {}", " + ".join(TARGETS), progress or "starting", _elapsed(started))
    if process.wait() != 0:
        log.flush()
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise BuildError(f"llama.cpp {step} failed (exit {process.returncode}); see {log_path}:\n{tail}")


def _elapsed(started: float) -> str:
    seconds = int(time.monotonic() - started)
    return f"{seconds // 60}m{seconds % 60:02d}s elapsed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (cmake --build -j)")
    parser.add_argument("--force", action="store_true", help="build again even if the stamped binaries are there")
    parser.add_argument(
        "--version",
        default=LLAMA_CPP_PYTHON_VERSION,
        help="the llama-cpp-python sdist whose vendored llama.cpp is built",
    )
    parser.add_argument(
        "--var-dir", type=Path, default=None, help="runtime folder (default ./var); builds in <var>/peers"
    )
    args = parser.parse_args()
    try:
        binaries = ensure_built(args.var_dir, args.jobs, args.force, args.version)
    except BuildError as error:
        logger.error("{}", error)
        sys.exit(1)
    print(binaries.server)
    print(binaries.quantize)


if __name__ == "__main__":
    main()
