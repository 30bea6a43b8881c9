"""The generated stubs are the ones protos/ describes: regenerate and compare byte for byte."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "protos"))

from generate import generate, proto_files  # noqa: E402


def test_generated_stubs_match_the_proto_files(tmp_path):
    generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert len(fresh) == 3 * len(proto_files()) > 0
    for relative in fresh:
        installed = ROOT / "protos" / relative
        assert installed.is_file(), f"{installed} is missing: run `make protos`"
        assert installed.read_bytes() == (tmp_path / relative).read_bytes(), f"{installed} is stale: `make protos`"


def test_every_service_in_the_contract_is_importable_with_its_methods():
    expected = {
        "generation": ("Generation", {"Generate", "ModelInfo", "Tokenize"}),
        "retrieval": (
            "Retrieval",
            {"Search", "Stats", "AddDocuments", "DeleteDocuments", "Compact", "ListDocuments", "Embed", "Rerank"},
        ),
        "admin": ("ModelAdmin", {"ListVersions", "LoadVersion", "Rollback", "ActiveVersion"}),
        "chat": ("Chat", {"Chat", "Status"}),
    }
    for module, (service, methods) in expected.items():
        descriptor = importlib.import_module(f"nightcap.v1.{module}_pb2").DESCRIPTOR
        assert set(descriptor.services_by_name[service].methods_by_name) == methods
