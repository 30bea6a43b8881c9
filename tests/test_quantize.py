"""--quantize int8: int8 weights with bfloat16 activations on CPU, checked against float32."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import FailedPrecondition
from services.common.registry import ModelRegistry
from services.generation.engine.request import Request, TokenChunk
from services.generation.engine.sampling import SamplingConfig
from services.generation.loading import DEFAULT_MODEL, Placement, load_model, start_engine
from services.generation.quantize import Int8Linear


def test_an_int8_linear_is_within_a_percent_of_the_float_one():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512)
    x = torch.randn(7, 3, 256)
    exact = linear(x)
    approx = Int8Linear(linear)(x)
    assert approx.shape == exact.shape and approx.dtype == exact.dtype
    assert ((approx - exact).norm() / exact.norm()) < 0.01


def test_int8_is_refused_off_cpu_naming_what_to_use():
    with pytest.raises(FailedPrecondition, match="on cuda use --quantize 8bit"):
        Placement(quantize="int8").check(torch.device("cuda"))
    with pytest.raises(FailedPrecondition, match="must be int8 or 8bit"):
        Placement(quantize="4bit").check(torch.device("cpu"))


def test_the_int8_tiny_model_keeps_float32s_next_tokens_and_serves_through_the_engine(tiny_model_dir, tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    exact = load_model(str(tiny_model_dir), registry)
    quantized = load_model(str(tiny_model_dir), registry, placement=Placement(quantize="int8"))
    assert quantized.dtype == "bfloat16"
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.model.modules())
    prompts = torch.randint(1, 100, (8, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = exact.model(prompts).logits[:, -1].float()
        logits = quantized.model(prompts).logits[:, -1].float()
    error = (logits - reference).abs().max() / reference.abs().max()
    assert error < 0.05, f"int8 logits are {error:.1%} off float32's"
    engine = start_engine(quantized)
    try:
        request = engine.submit(Request([5, 6, 7, 8], SamplingConfig(max_new_tokens=12, ignore_eos=True)))
        tokens = [i for e in request.events(timeout=60) if isinstance(e, TokenChunk) for i in e.token_ids]
    finally:
        engine.shutdown(grace=1)
    assert len(tokens) == 12


@pytest.mark.e2e
def test_the_int8_default_model_answers_as_float32_does(default_registry):
    """Greedy answers to fixed chat prompts, int8 against float32 on the embedded default."""
    exact = load_model(DEFAULT_MODEL, default_registry)
    quantized = load_model(DEFAULT_MODEL, default_registry, placement=Placement(quantize="int8"))
    tokenizer = exact.tokenizer
    questions = ["Where is Zurich?", "What is the capital of France?", "Name a large river in Europe."]
    agree = 0
    for question in questions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.inference_mode():
            first = exact.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
            second = quantized.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
            top_exact = exact.model(ids).logits[0, -1].argmax()
            top_quantized = quantized.model(ids).logits[0, -1].argmax()
            # each next token of float32's own 40-token answer, predicted by both: free-running greedy answers
            # part at the first near-tie, which falls by the CPU's int8 kernels (on an AVX2 EPYC, int8 said
            # "Zurklein is a city nestled in the Swiss Alps", float32 "Zurkle ... in the heart of Switzerland")
            answer = exact.model.generate(ids, max_new_tokens=40, do_sample=False)
            positions = slice(ids.shape[1] - 1, -1)
            forced_exact = exact.model(answer).logits[0, positions].argmax(-1)
            forced_quantized = quantized.model(answer).logits[0, positions].argmax(-1)
        assert top_exact == top_quantized, question
        agree += int(torch.equal(first, second))
        # measured on that EPYC: 0.975, 1.0 and 0.969 of the positions agree
        assert (forced_exact == forced_quantized).float().mean() >= 0.9, question
    assert agree >= 1
