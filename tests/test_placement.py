"""Where the weights go: --device-map auto with --max-memory, and --quantize 8bit's clear refusal without CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from services.common.errors import FailedPrecondition
from services.common.registry import ModelRegistry
from services.generation.engine.request import Request, TokenChunk
from services.generation.engine.sampling import SamplingConfig
from services.generation.loading import Placement, load_model, parse_max_memory, start_engine


def test_max_memory_reads_device_amount_pairs():
    assert parse_max_memory("0=6GiB, cpu=30GiB") == {0: "6GiB", "cpu": "30GiB"}
    assert parse_max_memory("") is None
    with pytest.raises(FailedPrecondition, match="device=amount pairs"):
        parse_max_memory("6GiB")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_8bit_without_cuda_is_refused_with_what_to_do_instead(tiny_model_dir):
    with pytest.raises(FailedPrecondition, match="--quantize 8bit uses bitsandbytes' CUDA kernels"):
        Placement(quantize="8bit").check(torch.device("cpu"))
    served = subprocess.run(
        [sys.executable, "-m", "services.generation", "serve", "--model", str(tiny_model_dir), "--quantize", "8bit",
         "--metrics-address", "", "--address", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert served.returncode == 2
    assert "--quantize 8bit uses bitsandbytes' CUDA kernels" in served.stderr


def test_flags_that_do_not_go_together_are_refused():
    with pytest.raises(FailedPrecondition, match="--max-memory only applies with --device-map auto"):
        Placement(max_memory={"cpu": "1GiB"}).check(torch.device("cpu"))
    with pytest.raises(FailedPrecondition, match="cannot be combined"):
        Placement(tp_size=2, device_map="auto").check(torch.device("cpu"))


def test_a_device_mapped_model_generates_what_the_plain_one_does(tiny_model_dir, tiny_loaded, tmp_path):
    mapped = load_model(
        str(tiny_model_dir), ModelRegistry(tmp_path), placement=Placement(device_map="auto", max_memory={"cpu": "1GiB"})
    )
    assert mapped.device == torch.device("cpu")  # where accelerate put the embeddings: inputs go there
    results = []
    for loaded in (tiny_loaded, mapped):
        engine = start_engine(loaded)
        try:
            request = engine.submit(Request([4, 5, 6], SamplingConfig(max_new_tokens=12, ignore_eos=True)))
            results.append([i for e in request.events(timeout=60) if isinstance(e, TokenChunk) for i in e.token_ids])
        finally:
            engine.shutdown(grace=1)
    assert results[0] == results[1] and len(results[0]) == 12
