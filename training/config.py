"""The run's flags: the parser (OpenChatKit's names), the checks that fail before Ray starts, and TrainConfig."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.paths import VarLayout
from services.common.registry import ModelRegistry

# Fault injection for the resume test: every worker process dies right after reporting this step.
CRASH_ENV = "NIGHTCAP_TRAIN_CRASH_AFTER_STEP"


class TrainingConfigError(ValueError):
    """A flag combination that cannot run; raised before Ray starts any worker."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python training/finetune.py",
        description="Fine-tune a causal LM on chat JSONL with Ray Train (DDP on CPU/GPU, FSDP on GPU). "
        "Checkpoints resume by --run-name; the final Hugging Face folder is printed at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="registry name[:version], Hugging Face folder, or hub id")
    g.add_argument("--data", required=True, help="training JSONL mixture: path:weight[,path:weight...]")
    g.add_argument("--eval-data", default="", help="held-out JSONL for eval loss and perplexity (optional)")
    g.add_argument("--seq-length", type=int, default=512, help="tokens per packed training row")
    g.add_argument(
        "--train-on-prompt",
        action="store_true",
        help="train on every token, human turns too (OpenChatKit's behaviour); default: assistant tokens only",
    )
    g.add_argument("--strict", action="store_true", help="fail on a malformed data line instead of skipping it")
    g = p.add_argument_group("optimisation (OpenChatKit's names)")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    g.add_argument("--batch-size", type=int, default=32, help="global batch: rows per optimizer step, all workers")
    g.add_argument("--micro-batch-size", type=int, default=1, help="rows per forward/backward on one worker")
    g.add_argument(
        "--gradient-accumulate-step",
        type=int,
        default=None,
        help="micro-batches per step per worker; derived as batch-size / (num-workers * micro-batch-size)",
    )
    g.add_argument("--total-steps", type=int, default=None, help="optimizer steps to run")
    g.add_argument("--epochs", type=float, default=None, help="passes over the training rows (instead of steps)")
    g.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps, then cosine decay")
    g.add_argument("--lr-scheduler", default="cosine", help="a transformers scheduler name: cosine, linear, ...")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--optimizer", choices=["adamw", "8bit-adam"], default="adamw", help="8bit-adam needs CUDA")
    g.add_argument("--seed", type=int, default=42, help="seed for weights of new layers, data order and dropout")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    g = p.add_argument_group("LoRA (peft)")
    g.add_argument("--lora", action="store_true", help="train a LoRA adapter; it is merged into the exported model")
    g.add_argument("--lora-rank", type=int, default=8, help="adapter rank r")
    g.add_argument("--lora-alpha", type=int, default=16, help="adapter scaling alpha")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapter input")
    g.add_argument("--lora-targets", default="all-linear", help="comma-separated module names, or all-linear")
    g = p.add_argument_group("scaling (Ray Train)")
    g.add_argument("--num-workers", type=int, default=1, help="training workers (processes; one GPU each on GPU)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL, mixed precision")
    g.add_argument(
        "--cpus-per-worker",
        type=int,
        default=None,
        help="CPUs (and torch threads) per worker; default: this machine's CPUs / num-workers on CPU, 1 on GPU",
    )
    g.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="fsdp (GPU only) shards the model")
    g.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU"
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to join (auto: the one `ray start` runs here; a Ray 2.60 head also wants "
        "RAY_AUTH_MODE=token); default: RAY_ADDRESS (set by `ray job submit`), else a new local Ray for this run",
    )
    g = p.add_argument_group("checkpoints and eval")
    g.add_argument("--run-name", default="finetune", help="rerun with the same name to resume from its checkpoint")
    g.add_argument("--storage-path", default=None, help="checkpoint storage (S3/NFS on a cluster); default var/ray")
    g.add_argument("--var-dir", default=None, help="runtime folder (registry, logs, Ray storage); env NIGHTCAP_VAR")
    g.add_argument("--checkpoint-steps", type=int, default=100, help="checkpoint every N steps (and at the end)")
    g.add_argument("--num-checkpoints", type=int, default=2, help="checkpoints kept (CheckpointConfig.num_to_keep)")
    g.add_argument("--max-failures", type=int, default=0, help="worker-group restarts from the last checkpoint")
    g.add_argument("--eval-steps", type=int, default=50, help="eval on --eval-data every N steps (and at 0, end)")
    g = p.add_argument_group("logging")
    g.add_argument(
        "--train-log-backend",
        choices=["print", "loguru", "wandb"],
        default="print",
        help="print: stdout; loguru: also var/logs/training/file_{time}.log; wandb: W&B (offline without a key)",
    )
    g.add_argument("--wandb-project", default="nightcap", help="W&B project")
    g.add_argument("--log-steps", type=int, default=1, help="log progress every N steps")
    g = p.add_argument_group("publishing (training/convert.py when the run ends)")
    g.add_argument(
        "--publish",
        default="",
        help="generation service host:port: convert the final checkpoint, gate it on --eval-data, and load it there",
    )
    g.add_argument("--publish-name", default="", help="registry name for --publish (default: the run name)")
    return p


@dataclass
class TrainConfig:
    """Everything a worker needs: the parsed flags plus what the driver resolved (model source, step counts)."""

    model_source: str
    seq_length: int
    train_on_prompt: bool
    lr: float
    batch_size: int
    micro_batch_size: int
    gradient_accumulate_step: int
    total_steps: int
    warmup_steps: int
    lr_scheduler: str
    weight_decay: float
    max_grad_norm: float
    optimizer: str
    seed: int
    gradient_checkpointing: bool
    lora: bool
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: str
    num_workers: int
    use_gpu: bool
    cpus_per_worker: int
    strategy: str
    precision: str
    checkpoint_steps: int
    eval_steps: int
    run_name: str
    train_log_backend: str
    wandb_project: str
    log_steps: int
    log_dir: str
    crash_after_step: int = 0


def check_args(args: argparse.Namespace) -> None:
    """Flag checks that need no model or data; each message says what to change."""
    positive = ("seq_length", "batch_size", "micro_batch_size", "num_workers", "checkpoint_steps", "eval_steps")
    for name in positive:
        if getattr(args, name) <= 0:
            raise TrainingConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if (args.total_steps is None) == (args.epochs is None):
        raise TrainingConfigError("give exactly one of --total-steps or --epochs")
    if args.total_steps is not None and args.total_steps <= 0:
        raise TrainingConfigError(f"--total-steps must be > 0, got {args.total_steps}")
    if args.epochs is not None and args.epochs <= 0:
        raise TrainingConfigError(f"--epochs must be > 0, got {args.epochs}")
    per_step = args.num_workers * args.micro_batch_size
    if args.batch_size % per_step:
        raise TrainingConfigError(
            f"--batch-size {args.batch_size} is not divisible by --num-workers {args.num_workers} x "
            f"--micro-batch-size {args.micro_batch_size} = {per_step}"
        )
    derived = args.batch_size // per_step
    if args.gradient_accumulate_step is not None and args.gradient_accumulate_step != derived:
        raise TrainingConfigError(
            f"--gradient-accumulate-step {args.gradient_accumulate_step} disagrees with --batch-size "
            f"{args.batch_size} / (--num-workers {args.num_workers} x --micro-batch-size {args.micro_batch_size})"
            f" = {derived}; leave it out to derive it"
        )
    cuda = torch.cuda.is_available()
    if args.use_gpu and not cuda:
        raise TrainingConfigError("--use-gpu asked for GPUs, but torch sees no CUDA device here")
    if args.optimizer == "8bit-adam":
        if not (args.use_gpu and cuda):
            raise TrainingConfigError("--optimizer 8bit-adam (bitsandbytes) needs CUDA: add --use-gpu on a GPU machine")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TrainingConfigError("--optimizer 8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
    if args.strategy == "fsdp" and not args.use_gpu:
        raise TrainingConfigError("--strategy fsdp runs on GPUs only (Ray Train refuses FSDP on CPU); use ddp")
    if args.precision in ("bf16", "fp16") and not args.use_gpu:
        raise TrainingConfigError(f"--precision {args.precision} is for GPUs; on CPU use fp32 (or auto)")
    from transformers import SchedulerType

    try:
        SchedulerType(args.lr_scheduler)
    except ValueError:
        names = ", ".join(t.value for t in SchedulerType)
        raise TrainingConfigError(f"--lr-scheduler {args.lr_scheduler!r} is not one of {names}") from None
    if args.lora and args.strategy == "fsdp":
        raise TrainingConfigError("--lora with --strategy fsdp is not supported: LoRA adapters are small, use ddp")
    if args.lora and (args.lora_rank <= 0 or args.lora_alpha <= 0):
        raise TrainingConfigError("--lora-rank and --lora-alpha must be > 0")


def resolve_model_source(spec: str, var: VarLayout) -> str:
    """A registry name, an HF folder or a hub id -> what ``from_pretrained`` takes (the rules of load_model)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    registry = ModelRegistry(var.models)
    if registry.versions(spec.partition(":")[0]):
        return str(registry.resolve(spec).path)
    if "/" in spec and not spec.startswith((".", "/")):
        return spec
    raise TrainingConfigError(
        f"--model {spec!r} is neither a folder, a registered model ({', '.join(registry.names()) or 'none'} in "
        f"{registry.root}) nor a hub id (org/name)"
    )


def load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise TrainingConfigError(f"could not load a tokenizer for --model from {source}: {error}") from None


def model_context_length(source: str) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise TrainingConfigError(f"could not load a model config for --model from {source}: {error}") from None
    return getattr(config, "max_position_embeddings", None)
