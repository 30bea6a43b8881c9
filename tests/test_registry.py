"""The model registry and model loading: versions are immutable, complete, and checked at load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, NotFound
from services.common.registry import METADATA_FILE, ModelRegistry, RegistryError
from services.generation.loading import load_model


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


def test_publishing_twice_makes_two_immutable_versions(registry, tiny_model_dir):
    first = registry.publish_version("tiny", tiny_model_dir, "openchatkit", source="test")
    second = registry.publish_version("tiny", tiny_model_dir, "openchatkit", source="test", metrics={"loss": 1.5})
    assert (first.metadata.version, second.metadata.version) == ("1", "2")
    assert registry.resolve("tiny").path == second.path
    assert registry.resolve("tiny:1").path == first.path
    assert registry.resolve("tiny:2").metadata.metrics == {"loss": 1.5}
    assert "model.safetensors" in first.metadata.files
    assert not [p for p in (registry.root / "tiny").iterdir() if p.name.startswith(".")]


def test_registered_model_loads_by_name_with_its_version(registry, tiny_model_dir):
    registry.publish_version("tiny", tiny_model_dir, "openchatkit", source="test")
    loaded = load_model("tiny", registry)
    assert (loaded.name, loaded.version, loaded.prompt_format) == ("tiny", "1", "openchatkit")


def test_unknown_model_and_version_are_not_found(registry, tiny_model_dir):
    with pytest.raises(NotFound, match="neither a path, a registered model"):
        load_model("no-such-model", registry)
    registry.publish_version("tiny", tiny_model_dir, "openchatkit", source="test")
    with pytest.raises(NotFound, match="has no version '7'"):
        registry.resolve("tiny:7")


def test_unknown_metadata_fields_are_refused(registry, tiny_model_dir):
    version = registry.publish_version("tiny", tiny_model_dir, "openchatkit", source="test")
    meta = json.loads((version.path / METADATA_FILE).read_text())
    meta["surprise"] = True
    (version.path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match=r"unknown field\(s\) surprise"):
        registry.resolve("tiny")


def test_a_version_with_a_missing_file_is_refused(registry, tiny_model_dir):
    version = registry.publish_version("tiny", tiny_model_dir, "openchatkit", source="test")
    (version.path / "model.safetensors").unlink()
    with pytest.raises(RegistryError, match=r"missing file\(s\): model\.safetensors"):
        load_model("tiny", registry)


def test_a_version_with_an_altered_file_is_refused(registry, tiny_model_dir):
    version = registry.publish_version("tiny", tiny_model_dir, "openchatkit", source="test")
    with (version.path / "config.json").open("a") as handle:
        handle.write(" ")
    with pytest.raises(RegistryError, match="changed since publishing"):
        registry.resolve("tiny")


def test_a_version_without_metadata_is_incomplete(registry, tiny_model_dir):
    version = registry.publish_version("tiny", tiny_model_dir, "openchatkit", source="test")
    (version.path / METADATA_FILE).unlink()
    with pytest.raises(RegistryError, match="not a complete registry version"):
        registry.resolve("tiny")


def test_a_folder_that_is_not_a_model_fails_with_its_path(registry, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FailedPrecondition, match="could not load a causal LM from"):
        load_model(str(tmp_path / "empty"), registry)


def test_bad_names_and_prompt_formats_are_rejected_before_writing(registry, tiny_model_dir):
    with pytest.raises(ValueError, match="model name"):
        registry.publish_version("Bad Name", tiny_model_dir, "openchatkit", source="test")
    with pytest.raises(ValueError, match="prompt_format"):
        registry.publish_version("tiny", tiny_model_dir, "alpaca", source="test")
    assert registry.names() == []


def test_the_promotion_history_says_what_to_roll_back_to_after_a_restart(tmp_path: Path):
    from services.common.registry import Promotion

    registry = ModelRegistry(tmp_path)
    assert registry.promoted_before("a:1") is None
    for action, model, previous in [
        ("promote", "b:1", "a:1"),
        ("promote", "b:2", "b:1"),
        ("rollback", "b:1", "b:2"),
        ("promote", "c:1", "b:1"),
    ]:
        registry.record_promotion(Promotion(at=0.0, action=action, model=model, previous=previous))
    assert registry.promoted_before("c:1") == "b:1"
    assert registry.promoted_before("b:1") == "a:1"
    assert registry.promoted_before("b:2") is None  # rolled back: no longer in the line of promotions
    assert [p.action for p in registry.promotions()] == ["promote", "promote", "rollback", "promote"]
