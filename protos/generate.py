"""Generates the Python gRPC stubs for protos/nightcap/v1 with grpcio-tools.

Usage: python protos/generate.py [--out DIR]   (default: beside the .proto files, where they import as
nightcap.v1). The test suite runs it into a temporary folder and compares, so stale stubs fail CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "nightcap" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).resolve().parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    # protoc resolves the relative .proto paths against the -I roots, and the cwd must not matter.
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed for {PROTO_ROOT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="folder to write the stubs into")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
