"""Tiny GGUF files for the tests: llama.cpp's own conversion of conftest's tiny models (``build_tiny_llama``),
and what llama.cpp computes and tokenizes on them, in this process.

    gguf = build_tiny_gguf(build_tiny_llama(folder), folder / "model.gguf")       # about 3.5 s on 2 cores
    llama_cpp_logits(gguf, [4, 5, 6])[-1].argmax()                              # llama.cpp's greedy next token
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.gguf import decode_logits, hf_to_gguf, load_weights

# conftest's tokenizer is a byte-level BPE trained on the spot, whose hash llama.cpp's converter never knows;
# its pre-tokenizer is GPT-2's split rule (pre_tokenizers.ByteLevel with its default regex)
TINY_PRE_TOKENIZER = "gpt-2"


def build_tiny_gguf(hf_folder: Path, out: Path, outtype: str = "f32") -> Path:
    """``out``: ``hf_folder`` (a tiny model from conftest) converted by llama.cpp to ``outtype`` (f32, f16 or a
    quantized type such as q8_0)."""
    return hf_to_gguf(hf_folder, out, outtype, pre_tokenizer=TINY_PRE_TOKENIZER)


def _llama_cpp():
    import llama_cpp

    llama_cpp.llama_backend_init()
    return llama_cpp


def llama_cpp_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's float32 logits at every position of ``ids`` ([len(ids), vocab]), the model loaded as the
    runner loads it (CPU, no repacked weights)."""
    llama_cpp = _llama_cpp()
    model = load_weights(llama_cpp, gguf)
    try:
        return decode_logits(llama_cpp, model, ids)
    finally:
        llama_cpp.llama_model_free(model)


def llama_cpp_tokens(gguf: Path, text: str) -> list[int]:
    """How llama.cpp's own tokenizer (the vocabulary and pre-tokenizer in the file) splits ``text``, without
    special tokens added."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
    assert model, f"llama.cpp could not load the vocabulary of {gguf}"
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        data = text.encode()
        tokens = (llama_cpp.llama_token * (len(data) + 8))()
        count = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, len(tokens), False, False)
        assert count >= 0, f"llama_tokenize needs room for {-count} tokens"
        return list(tokens[:count])
    finally:
        llama_cpp.llama_model_free(model)
