"""Each wire record is defined once, in nightcap.records, and has exactly the fields of its message."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest

from nightcap import records
from nightcap.v1 import retrieval_pb2

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (records.Document, retrieval_pb2.Document),
        (records.Passage, retrieval_pb2.Passage),
        (records.IndexStats, retrieval_pb2.StatsResponse),
        (records.IndexBuild, retrieval_pb2.IndexBuild),
        (records.AddReport, retrieval_pb2.AddDocumentsResponse),
        (records.DeleteReport, retrieval_pb2.DeleteDocumentsResponse),
        (records.CompactReport, retrieval_pb2.CompactResponse),
    ],
)
def test_a_record_has_its_messages_fields_in_order_and_converts_both_ways(record, message):
    assert [f.name for f in fields(record)] == [f.name for f in message.DESCRIPTOR.fields]
    made = _sample(record)
    assert records.from_message(record, records.to_message(made, message)) == made


def _sample(record: type) -> object:
    """The record with every field set: ints 7, floats 0.5, booleans True, strings their name, nested records
    sampled too."""
    nested = {"IndexBuild | None": records.IndexBuild}
    kinds = {"int": 7, "float": 0.5, "bool": True}
    values = {f.name: kinds.get(getattr(f.type, "__name__", f.type), f.name) for f in fields(record)}
    values.update({f.name: _sample(nested[f.type]) for f in fields(record) if f.type in nested})
    return record(**values)


def test_an_unset_nested_message_is_none_and_stays_unset() -> None:
    stats = records.IndexStats(1, 1, 384, "e", "IDMap2,Flat", "/i", 10, "nightcap", 1)

    message = records.to_message(stats, retrieval_pb2.StatsResponse)

    assert not message.HasField("build")
    assert records.from_message(records.IndexStats, message).build is None


def test_no_record_is_defined_twice_and_clients_never_import_services():
    names = {"Document", "Passage", "Source", "IndexStats", "AddReport", "DeleteReport", "IngestReport"}
    for path in [*ROOT.glob("clients/*.py"), *ROOT.glob("services/**/*.py"), *ROOT.glob("deploy/*.py")]:
        tree = ast.parse(path.read_text())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)} & names
        if path.name != "chunker.py":  # the chunker's Passage is the index's own record (with doc_id), not a wire one
            assert not defined, f"{path} defines {defined} again: import it from nightcap.records"
        if path.parts[-2] == "clients":
            imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
            assert not [m for m in imported if m.startswith("services")], f"{path} imports services/"
    for path in [*ROOT.glob("clients/*.py"), *ROOT.glob("services/**/*.py"), *ROOT.glob("deploy/*.py")]:
        source = path.read_text()
        assert "MAX_K = " not in source and "DEFAULT_K = " not in source, f"{path} repeats MAX_K/DEFAULT_K"


def test_no_service_imports_another_services_package():
    """What two services share lives in services/common (the sentence splitter the retrieval service chunks with
    and the orchestrator cuts passages with), so each service deploys without the others' code."""
    for service in [p for p in (ROOT / "services").iterdir() if p.is_dir() and p.name not in ("common", "__pycache__")]:
        for path in service.rglob("*.py"):
            tree = ast.parse(path.read_text())
            imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
            imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            foreign = [
                m for m in imported if m.startswith("services.") and m.split(".")[1] not in (service.name, "common")
            ]
            assert not foreign, f"{path.relative_to(ROOT)} imports {foreign}: move what they share to services/common"


def test_a_repeated_field_is_read_as_a_tuple_so_the_record_stays_frozen_and_hashable():
    from nightcap.v1 import generation_pb2
    from services.orchestrator.conversation import ModelInfo

    info = records.from_message(ModelInfo, generation_pb2.ModelInfoResponse(name="m", stop=["</s>", "\n"]))
    assert info.stop == ("</s>", "\n")
    assert hash(info) == hash(ModelInfo("m", "", 0, "", stop=("</s>", "\n")))
