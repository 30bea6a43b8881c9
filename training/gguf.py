"""A Hugging Face folder -> a GGUF file for the llama.cpp runner, with llama.cpp's own tools: its converter
(``convert_hf_to_gguf.py``, unpacked by deploy/llamacpp.py) writes f32 or f16, then its quantizer
(``llama_model_quantize`` through llama-cpp-python) makes the quantized types.

    hf_to_gguf(Path("var/models/wiki-chat/3"), Path("model.gguf"), "q4_1")
    gguf_metadata(Path("model.gguf"))  # {"architecture": "llama", "file_type": "MOSTLY_Q4_1", ...}
    check_loads(Path("model.gguf"))    # raises GGUFError unless llama.cpp loads the file

Each llama.cpp step runs in a subprocess of this venv's python (``python -m training.gguf convert|quantize|
check``): the converter needs its own gguf-py first on sys.path, and llama.cpp aborts the whole process on
some malformed files, which must not take the caller down. A failed step raises GGUFError with the last lines
the step wrote.

The converter recognises a BPE tokenizer by the hash of how it splits a fixed text and refuses one it has not
seen (``get_vocab_base_pre`` raises NotImplementedError); a tokenizer trained here (the tests' tiny models) is
never known. ``pre_tokenizer`` names the llama.cpp pre-tokenizer to use then (``gpt-2`` for a byte-level BPE
with GPT-2's split rule); a tokenizer the converter knows keeps its own.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

ROOT = Path(__file__).resolve().parents[1]
FLOAT_TYPES = ("f32", "f16")  # written by the converter itself
QUANTIZED_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")  # by llama_model_quantize
GGUF_TYPES = (*FLOAT_TYPES, *QUANTIZED_TYPES)
TAIL_LINES = 12
UNKNOWN_PRE_TOKENIZER = "BPE pre-tokenizer was not recognized"  # the converter's NotImplementedError
FALLBACK_NOTE = "nightcap: the converter does not know this BPE pre-tokenizer's hash; using"


class GGUFError(ValueError):
    """A folder that could not become a GGUF file, or a GGUF file llama.cpp cannot load; the message carries
    the last lines llama.cpp's step wrote."""


def hf_to_gguf(
    hf_folder: Path, out: Path, quantize: str = "q4_1", pre_tokenizer: str = "", var_dir: Path | None = None
) -> Path:
    """Writes ``out`` (whole or not at all) from ``hf_folder``: converted by llama.cpp to f32 (f16 for
    ``quantize`` f16), then quantized to ``quantize`` unless that is a float type. ``var_dir``: where
    deploy/llamacpp.py keeps the converter (default: $NIGHTCAP_VAR, else this checkout's var/)."""
    from deploy.llamacpp import BuildError, converter_dir

    hf_folder, out = Path(hf_folder), Path(out)
    _check_request(hf_folder, quantize)
    try:
        source = converter_dir(var_dir)
    except BuildError as error:
        raise GGUFError(f"llama.cpp's converter is not available: {error}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as scratch:
        # quantizing from f32 rounds once; the price is a float32 copy of the model in the scratch folder
        written = _convert_with_llama_cpp(source, hf_folder, Path(scratch) / "converted.gguf", quantize, pre_tokenizer)
        if quantize in QUANTIZED_TYPES:
            logger.info("quantizing {} to {} with llama.cpp", out.name, quantize)
            quantized = Path(scratch) / "quantized.gguf"
            failure = f"llama.cpp could not quantize {hf_folder} to {quantize}"
            _step(failure, "quantize", str(written), str(quantized), quantize)
            written = quantized
        os.replace(written, out)
    return out


def _convert_with_llama_cpp(source: Path, hf_folder: Path, out: Path, quantize: str, pre_tokenizer: str) -> Path:
    """``out`` in f32 (f16 when that is the type asked for), written by llama.cpp's converter."""
    outtype = quantize if quantize in FLOAT_TYPES else "f32"
    logger.info("converting {} to GGUF ({}) with llama.cpp's convert_hf_to_gguf.py", hf_folder, outtype)
    arguments = ("convert", str(source), pre_tokenizer, str(hf_folder), str(out), outtype)
    try:
        said = _step(f"llama.cpp's converter could not convert {hf_folder}", *arguments)
    except GGUFError as error:
        if UNKNOWN_PRE_TOKENIZER in str(error) and not pre_tokenizer:
            raise GGUFError(
                f"{error}\nits tokenizer is a BPE the converter does not recognise: name the llama.cpp"
                " pre-tokenizer to use (pre_tokenizer, convert.py --gguf-pre-tokenizer; gpt-2 for a byte-level"
                " BPE with GPT-2's split rule)"
            ) from None
        raise
    if FALLBACK_NOTE in said.stderr:
        logger.warning("{}", next(line for line in said.stderr.splitlines() if FALLBACK_NOTE in line))
    return out


def _check_request(hf_folder: Path, quantize: str) -> None:
    if quantize not in GGUF_TYPES:
        raise GGUFError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {quantize!r}")
    if not hf_folder.is_dir():
        raise GGUFError(f"{hf_folder} is not a folder")
    if not (hf_folder / "config.json").is_file():
        raise GGUFError(f"{hf_folder} is not a Hugging Face model folder (no config.json)")


def check_loads(path: Path, ids: list[int] | None = None) -> dict[str, Any]:
    """What llama.cpp reports after loading every tensor of ``path``: architecture, description, vocab size,
    training context, and with ``ids`` whether its logits after them are finite and its greedy next token.
    Raises GGUFError when llama.cpp cannot load the file or decode ``ids``."""
    if not path.is_file():
        raise GGUFError(f"{path} is not a file")
    arguments = ["check", str(path), *([",".join(map(str, ids))] if ids else [])]
    return json.loads(_step(f"llama.cpp cannot load {path}", *arguments).stdout)


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The header fields that describe ``path``: architecture, file type (e.g. MOSTLY_Q4_1), context length,
    name and tensor count, read with the ``gguf`` package (no tensor data is loaded)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as error:
        raise GGUFError(f"{path} is not a readable GGUF file: {error}") from None

    def field(key: str) -> Any:
        found = reader.get_field(key)
        return found.contents() if found is not None else None

    architecture = field("general.architecture") or ""
    file_type = field("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(file_type).name if file_type is not None else ""
    except ValueError:  # a type newer than this gguf package
        file_type_name = f"type {file_type}"
    return {
        "architecture": architecture,
        "file_type": file_type_name,
        "context_length": field(f"{architecture}.context_length"),
        "name": field("general.name") or "",
        "tensors": len(reader.tensors),
    }


def _step(failure: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m training.gguf <arguments>``; returns the finished process (its output captured), or
    raises GGUFError (``failure`` and the step's last lines) when it fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "training.gguf", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-TAIL_LINES:])
        raise GGUFError(f"{failure} (exit {result.returncode}):\n{tail}")
    return result


# --------------------------------------------------------------------------------- the subprocess's side


def _convert(source: str, pre_tokenizer: str, hf_folder: str, outfile: str, outtype: str) -> None:
    """llama.cpp's converter, its gguf-py first on the path, falling back to ``pre_tokenizer`` for a BPE
    tokenizer it does not recognise."""
    sys.path[:0] = [str(Path(source) / "gguf-py"), source]
    import convert_hf_to_gguf
    from conversion import base

    if pre_tokenizer:
        _fall_back_to(base.TextModel, pre_tokenizer)
    sys.argv = ["convert_hf_to_gguf.py", hf_folder, "--outfile", outfile, "--outtype", outtype]
    convert_hf_to_gguf.main()


def _fall_back_to(text_model: type, pre_tokenizer: str) -> None:
    """Wraps the converter's hash lookup instead of editing its file: the converter stays as unpacked from the
    source distribution, and a tokenizer whose hash it knows still gets exactly its own pre-tokenizer."""
    known = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            print(f"{FALLBACK_NOTE} {pre_tokenizer!r}", file=sys.stderr)
            return pre_tokenizer

    text_model.get_vocab_base_pre = get_vocab_base_pre


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        sys.exit(f"llama-cpp-python is not installed ({error}): run `make llamacpp`")
    llama_cpp.llama_backend_init()
    return llama_cpp


def _quantize(source: str, out: str, type_name: str) -> None:
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}")
    status = llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params))
    if status != 0:
        sys.exit(f"llama_model_quantize returned {status} for {source} -> {type_name}")


def _check(path: str, ids: str = "") -> None:
    llama_cpp = _llama_cpp()
    model = load_weights(llama_cpp, Path(path))
    description = ctypes.create_string_buffer(128)
    llama_cpp.llama_model_desc(model, description, len(description))
    architecture = ctypes.create_string_buffer(64)
    llama_cpp.llama_model_meta_val_str(model, b"general.architecture", architecture, len(architecture))
    found = {
        "architecture": architecture.value.decode(),
        "description": description.value.decode(),
        "vocab_size": int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))),
        "context_length": int(llama_cpp.llama_model_n_ctx_train(model)),
    }
    if ids:
        last = decode_logits(llama_cpp, model, [int(token) for token in ids.split(",")])[-1]
        found |= {"finite": bool(np.isfinite(last).all()), "next_token": int(last.argmax())}
    llama_cpp.llama_model_free(model)
    print(json.dumps(found))


def load_weights(llama_cpp: Any, path: Path) -> Any:
    """A ``llama_model`` pointer for ``path`` on the CPU, loaded as the runner loads it; raises GGUFError when
    llama.cpp refuses the file."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.use_extra_bufts = False  # as the runner loads it (services/generation/engine/runners/llamacpp.py)
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise GGUFError(f"llama.cpp could not load {path}")
    return model


def decode_logits(llama_cpp: Any, model: Any, ids: list[int], threads: int = 2) -> np.ndarray:
    """llama.cpp's logits at every position of ``ids`` (float32, [len(ids), vocab]), one batch in a context
    of its own."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = max(len(ids), 8)
    params.n_threads = params.n_threads_batch = threads
    context = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        for position, token in enumerate(ids):
            batch.token[position], batch.pos[position], batch.logits[position] = token, position, True
            batch.n_seq_id[position], batch.seq_id[position][0] = 1, 0
        batch.n_tokens = len(ids)
        if llama_cpp.llama_decode(context, batch) != 0:
            raise GGUFError(f"llama_decode failed on {len(ids)} tokens")
        vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        return (
            np.ctypeslib.as_array(llama_cpp.llama_get_logits(context), shape=(len(ids) * vocab,))
            .reshape(len(ids), vocab)
            .copy()
        )
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(context)


STEPS = {"convert": _convert, "quantize": _quantize, "check": _check}

if __name__ == "__main__":
    try:
        STEPS[sys.argv[1]](*sys.argv[2:])
    except GGUFError as error:  # llama.cpp's own lines above say why; no traceback to push them out of the tail
        sys.exit(str(error))
