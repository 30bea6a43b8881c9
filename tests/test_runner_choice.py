"""Which runner `serve` picks when not told (--runner auto): llama.cpp for a GGUF model on a CPU, transformers
for Hugging Face folders, CUDA and the placements only transformers has, and a clear fallback when
llama-cpp-python cannot be imported; logprobs on both runners alike."""

# ruff: noqa: F811  (test_llamacpp's fixtures, imported, are this file's test arguments)

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from loguru import logger
from test_llamacpp import engine_for, gguf_loaded, hf_loaded, tiny_gguf  # noqa: F401

from services.common.registry import DEFAULT_MODEL, ModelRegistry
from services.generation import loading
from services.generation.engine.request import Request
from services.generation.engine.sampling import SamplingConfig
from services.generation.loading import Placement, choose_runner

CPU = torch.device("cpu")
REPO_ROOT = Path(__file__).resolve().parents[1]


def test_a_gguf_file_on_a_cpu_is_served_by_llama_cpp_unless_transformers_is_asked_for(tiny_gguf: Path, tmp_path):
    registry = ModelRegistry(tmp_path / "models")
    assert choose_runner("auto", str(tiny_gguf), registry, CPU) == "llamacpp"
    assert choose_runner("transformers", str(tiny_gguf), registry, CPU) == "transformers"


def test_the_default_model_is_served_from_its_gguf_by_llama_cpp(default_registry):
    assert choose_runner("auto", DEFAULT_MODEL, default_registry, CPU) == "llamacpp"


def test_folders_hub_ids_cuda_and_transformers_placements_stay_on_transformers(
    tiny_gguf: Path, tiny_model_dir: Path, tmp_path
):
    registry = ModelRegistry(tmp_path / "models")
    assert choose_runner("auto", str(tiny_model_dir), registry, CPU) == "transformers"  # safetensors only
    assert choose_runner("auto", "togethercomputer/RedPajama-INCITE-Chat-3B-v1", registry, CPU) == "transformers"
    assert choose_runner("auto", str(tiny_gguf), registry, torch.device("cuda")) == "transformers"
    for placement in (Placement(tp_size=2), Placement(device_map="auto"), Placement(quantize="int8")):
        assert choose_runner("auto", str(tiny_gguf), registry, CPU, placement) == "transformers"


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    yield lines
    logger.remove(sink)


def test_without_llama_cpp_a_gguf_falls_back_to_transformers_with_one_line_saying_how_to_fix_it(
    tiny_gguf: Path, tmp_path, monkeypatch, warnings
):
    monkeypatch.setattr(loading, "llamacpp_missing", lambda: "ModuleNotFoundError: No module named 'llama_cpp'")
    assert choose_runner("auto", str(tiny_gguf), ModelRegistry(tmp_path / "models"), CPU) == "transformers"
    assert len(warnings) == 1
    assert "model.gguf is a GGUF model, but llama-cpp-python cannot be imported" in warnings[0]
    assert "`make llamacpp`" in warnings[0] and "No module named 'llama_cpp'" in warnings[0]


def _serve_until_it_loads(model: Path, tmp_path: Path, env: dict[str, str] | None = None) -> str:
    """`serve --model MODEL` (no --runner) on an address another socket holds: it loads the model, says which
    runner it chose, then fails at the bind. Returns its log."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        command = [sys.executable, "-m", "services.generation", "serve", "--model", str(model), "--address", address]
        command += ["--metrics-address", "", "--var-dir", str(tmp_path / "var")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT, env=env)
    assert done.returncode != 0 and "loaded " in done.stderr, done.stderr[-3000:]
    return done.stderr


def test_the_default_model_on_llama_cpp_reads_its_registry_versions_saved_tokenizer(default_registry, monkeypatch):
    """Converting the GGUF's vocabulary in Python takes seconds of every start; the version saved it already."""
    read = []
    original = loading.AutoTokenizer.from_pretrained

    def from_pretrained(folder, **kwargs):
        read.append((Path(folder), kwargs.get("gguf_file")))
        return original(folder, **kwargs)

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", from_pretrained)
    loaded = loading.load_model(DEFAULT_MODEL, default_registry, runner="llamacpp")
    version = default_registry.resolve(DEFAULT_MODEL).path
    assert read == [(version, None)]
    assert loaded.tokenizer("Where is Zurich?")["input_ids"] == original(version)("Where is Zurich?")["input_ids"]
    assert loaded.tokenizer.chat_template


def test_serve_loads_a_gguf_into_llama_cpp_and_without_llama_cpp_into_transformers(tiny_gguf: Path, tmp_path):
    assert "the llamacpp runner" in _serve_until_it_loads(tiny_gguf, tmp_path)
    # a llama_cpp that does not import, ahead of the installed one on the path
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('libllama.so: cannot open shared object file')\n")
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    log = _serve_until_it_loads(tiny_gguf, tmp_path, env)
    assert "llama-cpp-python cannot be imported (ImportError: libllama.so" in log and "`make llamacpp`" in log
    assert "the transformers runner)" in log


def test_logprobs_on_llama_cpp_match_the_transformers_runner_on_the_same_weights(gguf_loaded, hf_loaded):
    answers = []
    for loaded in (gguf_loaded, hf_loaded):
        engine = engine_for(loaded)
        try:
            config = SamplingConfig(max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)
            chunks = engine.submit(Request([5, 6, 7, 8], config)).events(timeout=60)
            answers.append([lp for event in chunks for lp in getattr(event, "logprobs", [])])
        finally:
            engine.shutdown(grace=1)
    llama, transformers = answers
    assert [lp.token_id for lp in llama] == [lp.token_id for lp in transformers] and len(llama) == 6
    for ours, theirs in zip(llama, transformers, strict=True):
        assert ours.logprob == pytest.approx(theirs.logprob, abs=2e-3)
        assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
        assert [lp for _, lp in ours.top] == pytest.approx([lp for _, lp in theirs.top], abs=2e-3)


def test_serve_refuses_flash_attention_settings_for_the_transformers_runner_before_loading(tmp_path):
    command = [sys.executable, "-m", "services.generation", "serve", "--runner", "transformers", "--flash-attn", "off"]
    command += ["--metrics-address", "", "--var-dir", str(tmp_path / "var")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--flash-attn off sets llama.cpp's attention; the transformers runner uses torch's" in done.stderr
    assert "loaded " not in done.stderr  # refused before any model was read
