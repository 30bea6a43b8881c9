"""llama.cpp on this machine, from PyPI's llama-cpp-python source distribution (it vendors llama.cpp and has no
wheel on PyPI): the package built into the venv (`make llamacpp`), and llama.cpp's own GGUF converter.

    python -m deploy.llamacpp [--cuda] [--jobs N] [--var-dir var] [--no-converter]

- ``install()``: ``pip install -v llama-cpp-python==0.3.36`` with CMAKE_ARGS for native CPU flags (``--cuda``:
  the CUDA backend too), a progress line (the build step ``[k/n]`` and the seconds elapsed) every 30 s and
  pip's whole output in var/llamacpp/build.log. The build took 3.5 minutes on a 2-core VM; pip keeps the
  wheel it built in its cache, so a later install (another clone, a fresh venv) takes 1-2 s. An installed
  package that imports with the right version (and, for ``--cuda``, offloads to a GPU) is left alone.
- ``converter_dir()``: var/llamacpp/convert, holding only what ``convert_hf_to_gguf.py`` reads from the
  llama.cpp tree (its ``conversion/`` package, ``gguf-py``, the chat templates some architectures embed),
  unpacked once from the same source distribution and stamped with its version; training/gguf.py runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO

from loguru import logger

from services.common.paths import VAR_ENV

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_ARGS = (
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",  # no downloads from this machine anyway
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
)
CUDA_CMAKE_ARGS = ("-DGGML_CUDA=ON",)
# What convert_hf_to_gguf.py reads from the llama.cpp tree: its model classes, the gguf-py it puts first on
# sys.path (newer than PyPI's gguf: it knows the newest architectures), the Jinja chat templates some model
# classes embed (conversion/base.py reads models/templates), and the licence that comes with the code.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "models/templates/", "LICENSE")
CONVERTER_STAMP = "stamp.json"
PROGRESS_EVERY_S = 30.0
BUILD_STEP = re.compile(r"\[\s*(\d+)/(\d+)\]")  # ninja's "[120/193] ..." lines in pip -v output
ROOT = Path(__file__).resolve().parents[1]


class BuildError(RuntimeError):
    """llama.cpp could not be downloaded, configured or built; the message says which and where the log is."""


def var_root(var_dir: Path | str | None = None) -> Path:
    """The runtime folder: ``var_dir``, else $NIGHTCAP_VAR, else this checkout's var/."""
    return Path(var_dir or os.environ.get(VAR_ENV) or ROOT / "var")


# ------------------------------------------------------------------------------------------- the package


def importable() -> tuple[str, bool] | None:
    """(``llama_cpp.__version__``, whether it can offload to a GPU) as a fresh interpreter sees them, or None
    when ``import llama_cpp`` fails. A subprocess: a broken shared library must not take this process down."""
    probe = "import llama_cpp; print(llama_cpp.__version__, bool(llama_cpp.llama_supports_gpu_offload()))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    version, gpu = result.stdout.split()
    return version, gpu == "True"


def missing_compiler() -> str:
    """What a source build of llama-cpp-python lacks on this PATH: a C or a C++ compiler (scikit-build-core
    fetches CMake and Ninja from PyPI itself); empty when both are there."""
    missing = [
        language
        for language, names in (("C", ("cc", "gcc", "clang")), ("C++", ("c++", "g++", "clang++")))
        if not any(shutil.which(name) for name in names)
    ]
    return f"no {' or '.join(missing)} compiler on PATH" if missing else ""


def pip_command(cuda: bool, reinstall: bool) -> list[str]:
    """The pip command that builds (or takes from pip's wheel cache) and installs the pinned version."""
    command = [sys.executable, "-m", "pip", "install", "-v", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
    if reinstall:  # the right version is installed but does not import, or lacks CUDA: replace only it
        command += ["--force-reinstall", "--no-deps"]
    if cuda:
        # pip caches a built wheel by its source, not by CMAKE_ARGS: the cached CPU wheel would come back
        command.append("--no-cache-dir")
    return command


def install(var_dir: Path | str | None = None, cuda: bool = False, jobs: int = 0) -> float | None:
    """Guarantees that ``import llama_cpp`` gives the pinned version (with GPU offload when ``cuda``) in this
    interpreter's environment; returns the seconds an install took, or None when there was nothing to do."""
    found = importable()
    if found and found[0] == LLAMA_CPP_PYTHON_VERSION and (found[1] or not cuda):
        logger.info("llama-cpp-python {} is installed{}", found[0], " with GPU offload" if found[1] else "")
        return None
    folder = var_root(var_dir) / "llamacpp"
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "build.log"
    flags = [*CMAKE_ARGS, *(CUDA_CMAKE_ARGS if cuda else ())]
    env = {**os.environ, "CMAKE_ARGS": " ".join(flags), "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs or os.cpu_count() or 1)}
    logger.info(
        "installing llama-cpp-python {} ({}): a build takes about 4 minutes on 2 cores, a cached wheel seconds;"
        " log: {}",
        LLAMA_CPP_PYTHON_VERSION,
        "CUDA and CPU" if cuda else "CPU, native flags",
        log_path,
    )
    started = time.monotonic()
    with log_path.open("w") as log:
        run_with_progress(pip_command(cuda, reinstall=_pinned_version_installed()), log, log_path, env)
    found = importable()
    if not found or found[0] != LLAMA_CPP_PYTHON_VERSION or (cuda and not found[1]):
        raise BuildError(
            f"pip installed llama-cpp-python, but a fresh interpreter sees {found or 'no importable llama_cpp'}"
            f" (wanted {LLAMA_CPP_PYTHON_VERSION}{' with GPU offload' if cuda else ''}); see {log_path}"
        )
    seconds = time.monotonic() - started
    logger.info("llama-cpp-python {} installed in {:.0f} s", LLAMA_CPP_PYTHON_VERSION, seconds)
    return seconds


def _pinned_version_installed() -> bool:
    import importlib.metadata

    try:
        return importlib.metadata.version("llama-cpp-python") == LLAMA_CPP_PYTHON_VERSION
    except importlib.metadata.PackageNotFoundError:
        return False


def run_with_progress(command: list[str], log: IO[str], log_path: Path, env: dict[str, str] | None = None) -> None:
    """Runs ``command`` with its output into ``log``; every PROGRESS_EVERY_S seconds a line with the last build
    step seen and the time elapsed. Raises BuildError, with the log's last lines, when it fails."""
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    started = last = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    step = ""
    assert process.stdout is not None
    for line in process.stdout:
        log.write(line)
        if match := BUILD_STEP.search(line):
            step = f"[{match[1]}/{match[2]}]"
        if time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            logger.info("llama-cpp-python: {} s elapsed, build step {}", int(last - started), step or "not started")
    if process.wait() != 0:
        log.flush()
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise BuildError(f"{' '.join(command[2:5])} failed (exit {process.returncode}); see {log_path}:\n{tail}")


# ------------------------------------------------------------------------------------ the source distribution


def download_sdist(folder: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """``<folder>/llama_cpp_python-<version>.tar.gz``, fetched from PyPI with pip unless it is there."""
    archive = folder / f"llama_cpp_python-{version}.tar.gz"
    if archive.is_file():
        return archive
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("downloading the llama-cpp-python {} source distribution from PyPI into {}", version, folder)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += [f"llama-cpp-python=={version}", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not archive.is_file():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
        raise BuildError(f"pip download of llama-cpp-python=={version} failed:\n{tail}")
    return archive


def unpacked_source(folder: Path, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """<folder>/src/llama_cpp_python-<version>/vendor/llama.cpp, the whole tree (tests/bench/peers_build.py
    compiles it), downloaded and unpacked if needed."""
    source = folder / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    archive = download_sdist(folder, version)
    logger.info("unpacking {}", archive.name)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "src", filter="data")
    if not (source / "CMakeLists.txt").is_file():
        raise BuildError(f"{archive.name} has no vendor/llama.cpp (expected {source})")
    return source


# ------------------------------------------------------------------------------------------- the converter


def _converter_stamp(version: str) -> dict:
    return {"llama_cpp_python": version, "parts": list(CONVERTER_PARTS)}


def converter_dir(var_dir: Path | str | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """var/llamacpp/convert: ``convert_hf_to_gguf.py`` beside the parts of llama.cpp it imports and reads, from
    llama-cpp-python ``version``. Unpacked (and the source distribution downloaded) only when its stamp is
    missing or names another version; the folder appears whole or not at all."""
    folder = var_root(var_dir) / "llamacpp"
    target = folder / "convert"
    try:
        if json.loads((target / CONVERTER_STAMP).read_text()) == _converter_stamp(version):
            return target
    except (OSError, ValueError):
        pass
    archive = download_sdist(folder, version)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, members=_converter_members(tar, prefix), filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise BuildError(f"{archive.name} has no {prefix}convert_hf_to_gguf.py")
        (staging / CONVERTER_STAMP).write_text(json.dumps(_converter_stamp(version), indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    archive.unlink()  # 76 MB; pip's HTTP cache holds it if the converter is ever unpacked again
    logger.info("llama.cpp's GGUF converter (llama-cpp-python {}) unpacked into {}", version, target)
    return target


def _converter_members(tar: tarfile.TarFile, prefix: str) -> list[tarfile.TarInfo]:
    """The archive's CONVERTER_PARTS, renamed to their paths inside the llama.cpp tree."""
    members = []
    for member in tar.getmembers():
        relative = member.name.removeprefix(prefix)
        wanted = any(relative == part or (part.endswith("/") and relative.startswith(part)) for part in CONVERTER_PARTS)
        if relative != member.name and wanted:
            member.name = relative
            members.append(member)
    return members


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.llamacpp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="build llama.cpp's CUDA backend too (needs nvcc)")
    parser.add_argument("--jobs", type=int, default=0, help="parallel compile jobs (0: one per core)")
    parser.add_argument(
        "--var-dir", type=Path, default=None, help="runtime folder (env NIGHTCAP_VAR; default: var/ here)"
    )
    parser.add_argument("--no-converter", action="store_true", help="skip unpacking llama.cpp's GGUF converter")
    args = parser.parse_args(argv)
    try:
        install(args.var_dir, args.cuda, args.jobs)
        if not args.no_converter:
            logger.info("llama.cpp's GGUF converter: {}", converter_dir(args.var_dir) / "convert_hf_to_gguf.py")
    except BuildError as error:
        logger.error("{}", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
