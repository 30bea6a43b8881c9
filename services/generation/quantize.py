"""Weight-only int8 for serving on CPU (``serve --quantize int8``).

A single decode stream on a CPU is bound by memory traffic: every step reads every weight. Stored as int8
with one scale per output channel, the weights are a quarter of float32's bytes, and torch's own kernel
(``torch._weight_int8pack_mm``, the one gpt-fast and torchao's int8 path call) multiplies bfloat16
activations by them without widening the weights first.

Measured by tests/bench/bench_decode_step.py on the 2-core AVX512-BF16 CPU this project is built on
(SmolLM2-135M, one eager decode step, 2 threads): float32 76 ms, bfloat16 54 ms, int8 weights with
bfloat16 activations 34 ms (2.3x float32) at one row; at 16 rows 134 / 80 / 100 ms. Greedy answers to
fixed chat prompts stayed the same but for a spelling. Why written here rather than taken from torchao: torchao's
``Int8WeightOnlyConfig`` without torch.compile ran the same model at 104 ms a step (slower than float32),
and dynamic int8 activations (``torch.ao.quantization.quantize_dynamic``, faster still) changed the 135M
model's answers beyond use. With float32 activations the same kernel is ~10x slower, so activations are
bfloat16, and a CPU without native bfloat16 (no AVX512-BF16 or AMX) gets a warning that it will be slow.
"""

from __future__ import annotations

from pathlib import Path

import torch
from loguru import logger


class Int8Linear(torch.nn.Module):
    """A ``Linear`` with int8 weights (symmetric, one scale per output row) and bfloat16 activations."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_int8(model: torch.nn.Module) -> int:
    """Replaces every ``nn.Linear`` of ``model`` (the output head too) by an ``Int8Linear``, in place;
    returns how many. The model should already be bfloat16 (its other layers and the KV cache)."""
    if not native_bf16():
        logger.warning(
            "--quantize int8 runs bfloat16 activations, which this CPU computes without native support"
            " (no AVX512-BF16 or AMX): expect it slower than float32 here"
        )
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, Int8Linear(child))
                replaced += 1
    return replaced


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bfloat16 natively (Linux: AVX512-BF16 or AMX in /proc/cpuinfo)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
