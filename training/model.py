"""The model side of a run: build it (LoRA, DDP/FSDP through the session), its optimizer, and its loss.

``token_loss`` and ``packed_loss`` are also the evaluation gate's measure (training/gate.py), so a run's
eval loss and the gate's numbers are the same quantity.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from training.config import TrainConfig
from training.data import IGNORE_INDEX, PackedData
from training.session import Session


def build_model(config: TrainConfig, session: Session) -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """(the module to train, possibly DDP/FSDP-wrapped; the plain model inside; the tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_source)
    model = AutoModelForCausalLM.from_pretrained(config.model_source, dtype=torch.float32)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora:
        from peft import LoraConfig, get_peft_model

        targets = config.lora_targets if config.lora_targets == "all-linear" else config.lora_targets.split(",")
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    layer_classes = {type(m) for m in model.modules() if type(m).__name__ in layer_names}
    return session.prepare_model(model, config.strategy, layer_classes), model, tokenizer


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "8bit-adam":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, lr=config.lr)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, config.warmup_steps, config.total_steps)
    return optimizer, scheduler


def autocast(config: TrainConfig, device: torch.device) -> Any:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    if config.precision == "auto" and device.type == "cuda":
        dtype = torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")


def token_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the labelled next tokens, how many there are)."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def all_sum(*values: float) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        tensor = tensor.to(backend_device)
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


@torch.no_grad()
def packed_loss(
    model: torch.nn.Module,
    data: PackedData,
    micro_batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    precision: Any = None,
) -> tuple[float, int]:
    """(summed loss, labelled tokens) over this rank's share of ``data``, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for start in range(rank * micro_batch_size, len(data), world_size * micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        with precision if precision is not None else nullcontext():
            loss, count = token_loss(
                model, torch.tensor(data.input_ids[rows], device=device), torch.tensor(data.labels[rows], device=device)
            )
        loss_sum, tokens = loss_sum + loss.item(), tokens + count
    model.train(was_training)
    return loss_sum, tokens


def loss_metrics(loss_sum: float, tokens: int) -> dict[str, float]:
    eval_loss = loss_sum / max(tokens, 1)
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}


def evaluate(config: TrainConfig, model: torch.nn.Module, data: PackedData, session: Session) -> dict[str, float]:
    device = session.device()
    loss_sum, tokens = packed_loss(
        model, data, config.micro_batch_size, device, session.rank, session.world_size, autocast(config, device)
    )
    return loss_metrics(*all_sum(loss_sum, tokens))


def stack_no_sync(model: torch.nn.Module, last_micro: bool) -> Any:
    """DDP all-reduces gradients only on the last micro-batch of a step (plain accumulation elsewhere)."""
    from contextlib import nullcontext

    if not last_micro and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()
