"""GGUF files: llama.cpp's converter and quantizer on our tiny models (training/gguf.py), convert.py keeping a
GGUF as it is or adding one to a version, and deploy/llamacpp.py's converter folder and progress lines."""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_CORPUS, build_tiny_llama
from loguru import logger
from test_convert import loguru_follows_pytest_capture  # noqa: F401  (convert.main re-points loguru)
from tiny_gguf import build_tiny_gguf, llama_cpp_logits, llama_cpp_tokens

from deploy import llamacpp
from services.common.registry import ModelRegistry
from training import convert
from training.gguf import GGUFError, check_loads, gguf_metadata, hf_to_gguf

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make llamacpp`")

PROMPT = "<human>: Where is Zurich?\n<bot>: Zurich is"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-llama")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf: Path) -> Path:
    started = time.perf_counter()
    path = build_tiny_gguf(tiny_hf, tiny_hf.parent / "tiny-f32.gguf")
    print(f"tiny GGUF built in {time.perf_counter() - started:.1f} s")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_llama_cpp_picks_the_same_greedy_next_token_as_transformers_on_the_tiny_f32_gguf(tiny_hf, tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf)
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32)(torch.tensor([ids])).logits[0]

    logits = torch.from_numpy(llama_cpp_logits(tiny_gguf, ids))

    for text in [PROMPT, *TINY_CORPUS]:  # the gpt-2 pre-tokenizer splits as the HF tokenizer does (digits too)
        assert llama_cpp_tokens(tiny_gguf, text) == tokenizer(text)["input_ids"], text
    top2 = expected[-1].topk(2).values
    assert float(top2[0] - top2[1]) > 1e-3, "a near-tie: the comparison below would prove nothing"
    assert int(logits[-1].argmax()) == int(expected[-1].argmax())
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-3)


def test_the_header_says_what_llama_cpp_wrote(tiny_gguf):
    meta = gguf_metadata(tiny_gguf)
    assert meta["architecture"] == "llama" and meta["file_type"] == "ALL_F32" and meta["context_length"] == 1024
    assert check_loads(tiny_gguf)["vocab_size"] > 0


def test_a_quantized_gguf_is_made_by_llama_cpps_quantizer_and_loads(tiny_hf, tmp_path):
    out = hf_to_gguf(tiny_hf, tmp_path / "q4.gguf", "q4_0", pre_tokenizer="gpt-2")
    assert gguf_metadata(out)["file_type"] == "MOSTLY_Q4_0"
    assert check_loads(out, [4, 5, 6])["finite"]
    assert [p.name for p in tmp_path.iterdir()] == ["q4.gguf"]  # no scratch left


def test_an_unknown_bpe_tokenizer_without_a_pre_tokenizer_is_refused_with_the_way_out(tiny_hf, tmp_path):
    with pytest.raises(GGUFError, match=r"(?s)not recognized.*gpt-2"):
        hf_to_gguf(tiny_hf, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


def test_an_architecture_llama_cpp_cannot_convert_is_named_in_the_error(tmp_path):
    folder = tmp_path / "strange"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["NoSuchModelForCausalLM"], "model_type": "no-such"}')
    with pytest.raises(GGUFError, match=r"(?s)could not convert .*strange.*NoSuchModelForCausalLM is not supported"):
        hf_to_gguf(folder, tmp_path / "out.gguf", "f32")
    with pytest.raises(GGUFError, match="is not a folder"):
        hf_to_gguf(tmp_path / "missing", tmp_path / "out.gguf")


# ----------------------------------------------------------------------------------------------- convert.py


def test_convert_keeps_a_gguf_byte_for_byte_with_its_sha256_and_what_describes_it(tiny_gguf, tmp_path):
    var = tmp_path / "var"
    assert convert.main(["--gguf", str(tiny_gguf), "--name", "kept", "--var-dir", str(var)]) == 0

    version = ModelRegistry(var / "models").resolve("kept:1")
    kept = version.path / "model.gguf"
    assert version.gguf_path == kept and kept.read_bytes() == tiny_gguf.read_bytes()
    assert version.metadata.files["model.gguf"] == sha256(tiny_gguf)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(version.metadata.files)
    assert not list(version.path.glob("*.safetensors")) and version.metadata.dtype == "gguf:f32"
    assert json.loads((version.path / "config.json").read_text())["model_type"] == "llama"


def test_dequantize_stores_safetensors_as_before(tiny_gguf, tmp_path):
    var = tmp_path / "var"
    assert convert.main(["--gguf", str(tiny_gguf), "--dequantize", "--name", "floats", "--var-dir", str(var)]) == 0

    version = ModelRegistry(var / "models").resolve("floats")
    assert "model.safetensors" in version.metadata.files and version.gguf_path is None
    assert version.metadata.dtype == "float32"


def test_to_gguf_adds_a_quantized_gguf_llama_cpp_loads_beside_the_safetensors(tiny_hf, tmp_path):
    var = tmp_path / "var"
    argv = ["--hf", str(tiny_hf), "--name", "both", "--var-dir", str(var), "--to-gguf", "q8_0"]
    assert convert.main([*argv, "--gguf-pre-tokenizer", "gpt-2"]) == 0

    version = ModelRegistry(var / "models").resolve("both")
    assert {"model.safetensors", "model.gguf"} <= set(version.metadata.files)
    assert version.metadata.files["model.gguf"] == sha256(version.gguf_path)
    assert gguf_metadata(version.gguf_path)["file_type"] == "MOSTLY_Q8_0"
    assert check_loads(version.gguf_path, [4, 5, 6])["finite"]
    assert version.metadata.dtype == "float32"


def test_a_truncated_gguf_is_refused_by_llama_cpp_and_nothing_is_published(tiny_gguf, tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size * 2 // 3])  # the header is whole
    var = tmp_path / "var"

    assert convert.main(["--gguf", str(cut), "--name", "cut", "--var-dir", str(var)]) == 2

    assert "not within the file bounds" in capsys.readouterr().err
    assert ModelRegistry(var / "models").versions("cut") == []
    assert not (var / "models").exists() or list((var / "models").iterdir()) == []


# ------------------------------------------------------------------------------------------ deploy/llamacpp.py


def test_the_converter_folder_is_reused_by_its_stamp_and_holds_what_the_converter_imports(monkeypatch):
    folder = llamacpp.converter_dir()

    def no_download(*_):
        raise AssertionError("a stamped converter folder must not be fetched again")

    monkeypatch.setattr(llamacpp, "download_sdist", no_download)
    assert llamacpp.converter_dir() == folder
    for part in ("convert_hf_to_gguf.py", "conversion/llama.py", "gguf-py/gguf/__init__.py", "models/templates"):
        assert (folder / part).exists(), part
    assert not (folder / "src").exists() and not (folder / "ggml").exists()  # only the converter's parts


def test_a_changed_stamp_unpacks_the_converter_again(tmp_path, monkeypatch):
    source = llamacpp.converter_dir()
    archive = tmp_path / "llamacpp" / f"llama_cpp_python-{llamacpp.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    archive.parent.mkdir()
    prefix = f"llama_cpp_python-{llamacpp.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "convert_hf_to_gguf.py", f"{prefix}/convert_hf_to_gguf.py")
        tar.add(source / "LICENSE", f"{prefix}/LICENSE")
        tar.add(source / "stamp.json", f"{prefix}/README.md")  # not a converter part
    monkeypatch.setattr(llamacpp, "download_sdist", lambda folder, version: archive)
    target = tmp_path / "llamacpp" / "convert"
    target.mkdir()
    (target / "stamp.json").write_text('{"llama_cpp_python": "0.0.1"}')

    assert llamacpp.converter_dir(tmp_path) == target
    assert sorted(p.name for p in target.iterdir()) == ["LICENSE", "convert_hf_to_gguf.py", "stamp.json"]
    assert json.loads((target / "stamp.json").read_text())["llama_cpp_python"] == llamacpp.LLAMA_CPP_PYTHON_VERSION


def test_the_build_prints_its_step_and_elapsed_seconds_while_pip_runs(tmp_path, monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(llamacpp, "PROGRESS_EVERY_S", 0.0)
    script = "for k in (1, 120): print(f'  [{k}/193] /usr/bin/g++ -c x.cpp', flush=True)"
    log_path = tmp_path / "build.log"
    sink = logger.add(lines.append, format="{message}")
    try:
        with log_path.open("w") as log:
            llamacpp.run_with_progress([sys.executable, "-c", script], log, log_path)
    finally:
        logger.remove(sink)
    assert any("build step [120/193]" in line and "s elapsed" in line for line in lines)
    assert "[120/193] /usr/bin/g++" in log_path.read_text()


def test_a_cuda_install_adds_the_cuda_flag_and_skips_the_cached_cpu_wheel():
    assert "--no-cache-dir" in llamacpp.pip_command(cuda=True, reinstall=False)
    assert "--no-cache-dir" not in llamacpp.pip_command(cuda=False, reinstall=False)
    assert "-DGGML_CUDA=ON" in llamacpp.CUDA_CMAKE_ARGS and "-DGGML_NATIVE=ON" in llamacpp.CMAKE_ARGS


def test_an_installed_package_of_the_pinned_version_is_left_alone(tmp_path, monkeypatch):
    def no_install(*_args, **_kwargs):
        raise AssertionError("llama-cpp-python imports with the pinned version: nothing to install")

    monkeypatch.setattr(llamacpp, "run_with_progress", no_install)
    started = time.perf_counter()
    assert llamacpp.install(tmp_path) is None
    assert time.perf_counter() - started < 30 and not (tmp_path / "llamacpp" / "build.log").exists()
