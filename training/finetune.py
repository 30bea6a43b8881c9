"""Fine-tune a causal LM on chat data with Ray Train: one CPU, 8 GPUs or a KubeRay cluster, the same script.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python training/finetune.py --model smollm2-135m-instruct --data data.jsonl:1 --num-workers 2
    python training/finetune.py ...        # no cluster: starts a local Ray for the run

The story of a run: parse and check the flags (bad ones fail here, before Ray starts anything), tokenize and pack
the data once in the driver, then ``TorchTrainer`` runs ``train_loop_per_worker`` on each worker: ordinary PyTorch
(DDP or FSDP), a checkpoint through ``ray.train.report`` every ``--checkpoint-steps``, eval every ``--eval-steps``.
Rerunning with the same ``--run-name`` resumes from the last checkpoint. The final checkpoint holds a Hugging Face
folder (``hf/``) that the conversion job publishes; its path is printed and written to ``<run>/final.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python training/finetune.py` (how `ray job submit` runs it)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from loguru import logger

from services.common.logs import setup_logging
from services.common.paths import VarLayout
from services.generation.registry import ModelRegistry
from training.data import (
    IGNORE_INDEX,
    DataError,
    PackedData,
    load_packed,
    map_mixture_paths,
    mixture_order,
    parse_mixture,
)

STATE_FILE = "train_state.pt"
HF_FOLDER = "hf"
FINAL_POINTER = "final.json"
# Fault injection for the resume test: every worker process dies right after reporting this step.
CRASH_ENV = "NIGHTCAP_TRAIN_CRASH_AFTER_STEP"


class TrainingConfigError(ValueError):
    """A flag combination that cannot run; raised before Ray starts any worker."""


# ---------------------------------------------------------------------------------------------------- config


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


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class TrainData:
    train: PackedData
    order: np.ndarray  # row of each global sample, step after step (mixture_order)
    eval: PackedData | None


def prepare_data(args: argparse.Namespace, tokenizer: Any, total_steps: int | None) -> tuple[TrainData, int]:
    sources = parse_mixture(args.data)
    eval_path = Path(args.eval_data) if args.eval_data else None
    if eval_path and not eval_path.is_file():
        raise DataError(f"--eval-data file {eval_path} does not exist")
    parts = [load_packed(s.path, tokenizer, args.seq_length, args.train_on_prompt, args.strict) for s in sources]
    for source, part in zip(sources, parts, strict=True):
        logger.info(
            "{}: {} conversations -> {} rows of {} tokens, weight {}",
            source.path.name,
            part.conversations,
            len(part),
            args.seq_length,
            source.weight,
        )
    train = PackedData(
        np.concatenate([p.input_ids for p in parts]),
        np.concatenate([p.labels for p in parts]),
        sum(p.conversations for p in parts),
    )
    steps = total_steps or max(1, math.ceil(args.epochs * len(train) / args.batch_size))
    order = mixture_order([len(p) for p in parts], [s.weight for s in sources], steps * args.batch_size, args.seed)
    eval_data = (
        load_packed(eval_path, tokenizer, args.seq_length, args.train_on_prompt, args.strict) if eval_path else None
    )
    return TrainData(train, order, eval_data), steps


# --------------------------------------------------------------------------------------------- the worker loop


class Session:
    """The few places the loop touches Ray Train; without Ray (one process, tests) they are plain PyTorch."""

    def __init__(self, use_ray: bool) -> None:
        self.use_ray = use_ray
        if use_ray:
            import ray.train
            from ray.train.v2._internal.execution import context as ray_context

            # Ray logs every report at INFO from a logger named after its file path (context.py's getLogger(__file__)).
            logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
            context = ray.train.get_context()
            self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        else:
            self.rank, self.world_size = 0, 1
        self.history: list[dict[str, float]] = []  # every report of this process (used without Ray)

    def device(self) -> torch.device:
        if self.use_ray:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare_model(self, model: torch.nn.Module, strategy: str, layer_classes: set[type]) -> torch.nn.Module:
        if not self.use_ray:
            return model.to(self.device())
        import ray.train.torch

        if strategy == "fsdp":
            from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

            policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes)
            return ray.train.torch.prepare_model(
                model, parallel_strategy="fsdp", parallel_strategy_kwargs={"auto_wrap_policy": policy}
            )
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp")

    def latest_checkpoint_dir(self, stack: Any) -> Path | None:
        if not self.use_ray:
            return None
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        self.history.append(metrics)
        if not self.use_ray:
            return
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{metrics['step']:06d}")


class ProgressLog:
    """Rank 0's metrics to the chosen backend: stdout, loguru (a file under var/logs), or W&B."""

    def __init__(self, config: TrainConfig, rank: int) -> None:
        self.config, self.active, self.wandb = config, rank == 0, None
        if not self.active:
            return
        if config.train_log_backend == "loguru":
            setup_logging("training", log_file=Path(config.log_dir) / "file_{time}.log")
        elif config.train_log_backend == "wandb":
            import wandb

            # A stable id from the run name: a resumed run appends to the same W&B run.
            self.wandb = wandb.init(
                project=config.wandb_project,
                name=config.run_name,
                id=f"{config.run_name}-{config.seed}".replace("/", "-"),
                resume="allow",
                mode="online" if os.environ.get("WANDB_API_KEY") else "offline",
                dir=config.log_dir,
                config=asdict(config),
            )

    def log(self, metrics: dict[str, float], line: str) -> None:
        if not self.active:
            return
        if self.config.train_log_backend == "print":
            # Not print(): Ray Train patches it to log each line a second time.
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        else:
            logger.info(line)
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(metrics["step"]))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


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
def evaluate(config: TrainConfig, model: torch.nn.Module, data: PackedData, session: Session) -> dict[str, float]:
    model.eval()
    device = session.device()
    loss_sum, tokens = 0.0, 0
    for start in range(session.rank * config.micro_batch_size, len(data), session.world_size * config.micro_batch_size):
        rows = slice(start, start + config.micro_batch_size)
        with autocast(config, device):
            loss, count = token_loss(
                model, torch.tensor(data.input_ids[rows], device=device), torch.tensor(data.labels[rows], device=device)
            )
        loss_sum, tokens = loss_sum + loss.item(), tokens + count
    model.train()
    total_loss, total_tokens = all_sum(loss_sum, tokens)
    eval_loss = total_loss / max(total_tokens, 1)
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0))}


def save_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, step: int, config: TrainConfig
) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Full (unsharded) state on every rank's CPU: the same call works for a plain module, DDP and FSDP.
    model_state, optimizer_state = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "step": step,
        "samples_seen": step * config.batch_size,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "config": asdict(config),
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, folder / STATE_FILE)
    return model_state


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def export_hf(folder: Path, plain_model: torch.nn.Module, model_state: dict | None, tokenizer: Any) -> None:
    """A Hugging Face folder for the conversion job; a LoRA adapter is merged into the weights first."""
    model = plain_model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(folder / HF_FOLDER, state_dict=model_state)
    tokenizer.save_pretrained(folder / HF_FOLDER)


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict[str, float]]:
    """One worker's training: ordinary PyTorch; Ray only at the edges (Session). Returns this process's reports."""
    from contextlib import ExitStack

    config = TrainConfig(**loop_config["config"])
    session = Session(loop_config.get("use_ray", False))
    data: TrainData = loop_config["data"]
    if session.use_ray:  # an ObjectRef: fetched once per worker from the object store
        import ray

        data = ray.get(data)
    torch.set_num_threads(config.cpus_per_worker)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    device = session.device()
    model, plain_model, tokenizer = build_model(config, session)
    optimizer, scheduler = build_optimizer(config, model)
    progress = ProgressLog(config, session.rank)
    # fp16 needs loss scaling against underflowing gradients; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16" and device.type == "cuda")

    start_step = 0
    with ExitStack() as stack:
        resume_dir = session.latest_checkpoint_dir(stack)
        if resume_dir is not None:
            start_step = load_checkpoint(resume_dir, model, optimizer, scheduler)
            progress.log({"step": start_step}, f"resumed from the checkpoint at step {start_step}")

    local_batch = config.batch_size // session.world_size
    if data.eval is not None and start_step == 0:
        metrics = {"step": 0, **evaluate(config, model, data.eval, session)}
        session.report(metrics)
        progress.log(metrics, f"step 0/{config.total_steps} eval_loss {metrics['eval_loss']:.4f}")
    model.train()
    started, eval_seconds, tokens_done, last_metrics = time.perf_counter(), 0.0, 0, {}
    for step in range(start_step + 1, config.total_steps + 1):
        # This worker's share of the step's global batch, in micro-batches (the mixture order fixes every row).
        first = (step - 1) * config.batch_size + session.rank * local_batch
        rows = data.order[first : first + local_batch]
        labelled = max(int((data.train.labels[rows][:, 1:] != IGNORE_INDEX).sum()), 1)
        loss_sum, tokens = 0.0, 0
        for micro in range(config.gradient_accumulate_step):
            chunk = rows[micro * config.micro_batch_size : (micro + 1) * config.micro_batch_size]
            input_ids = torch.tensor(data.train.input_ids[chunk], device=device)
            labels = torch.tensor(data.train.labels[chunk], device=device)
            last_micro = micro == config.gradient_accumulate_step - 1
            sync = stack_no_sync(model, last_micro)
            with sync, autocast(config, device):
                loss, count = token_loss(model, input_ids, labels)
                scaler.scale(loss / labelled).backward()
            loss_sum, tokens = loss_sum + loss.item(), tokens + count
        scaler.unscale_(optimizer)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm).item()
            if config.max_grad_norm > 0
            else 0.0
        )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        total_loss, total_tokens = all_sum(loss_sum, tokens)
        tokens_done += len(rows) * config.seq_length * session.world_size
        elapsed = time.perf_counter() - started - eval_seconds  # throughput of training alone
        done = step - start_step
        metrics = {
            "step": step,
            "start_step": start_step,
            "loss": total_loss / max(total_tokens, 1),
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_done / elapsed,
            "samples_per_s": done * config.batch_size / elapsed,
        }
        if data.eval is not None and (step % config.eval_steps == 0 or step == config.total_steps):
            eval_started = time.perf_counter()
            metrics.update(evaluate(config, model, data.eval, session))
            eval_seconds += time.perf_counter() - eval_started
        if step % config.log_steps == 0 or step == config.total_steps:
            eta = elapsed / done * (config.total_steps - step)
            evaluation = f" eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
            progress.log(
                metrics,
                f"step {step}/{config.total_steps} loss {metrics['loss']:.4f}{evaluation} lr {metrics['lr']:.2e} "
                f"{metrics['tokens_per_s']:.0f} tokens/s ETA {eta:.0f}s",
            )
        if step % config.checkpoint_steps == 0 or step == config.total_steps:
            with tempfile.TemporaryDirectory(prefix="nightcap-ckpt-") as scratch:
                folder = Path(scratch)
                model_state = save_checkpoint(folder, model, optimizer, scheduler, step, config)
                if step == config.total_steps and session.rank == 0:
                    # Under FSDP the plain module holds shards; the gathered full state is what gets written.
                    export_hf(folder, plain_model, model_state if config.strategy == "fsdp" else None, tokenizer)
                # Every rank saved the same full state (a collective under FSDP); rank 0's copy is the one kept.
                session.report(metrics, folder if session.rank == 0 else None)
        else:
            session.report(metrics)
        if config.crash_after_step and step == config.crash_after_step:
            os._exit(3)  # fault injection (CRASH_ENV): the worker dies as a killed node would
        last_metrics = metrics
    progress.close()
    return session.history if session.history else [last_metrics]


def stack_no_sync(model: torch.nn.Module, last_micro: bool) -> Any:
    """DDP all-reduces gradients only on the last micro-batch of a step (plain accumulation elsewhere)."""
    from contextlib import nullcontext

    if not last_micro and hasattr(model, "no_sync"):
        return model.no_sync()
    return nullcontext()


# ---------------------------------------------------------------------------------------------------- driver


def build_run(argv: list[str] | None = None) -> tuple[argparse.Namespace, TrainConfig, TrainData, Path]:
    """Parses and checks everything the run needs, without Ray: flags, model, data. Raises on anything wrong."""
    args = build_parser().parse_args(argv)
    check_args(args)
    var = VarLayout.from_env(args.var_dir)
    # var/... data paths name files under NIGHTCAP_VAR when the job's (uploaded) working dir has no var/
    args.data = map_mixture_paths(args.data, var.resolve)
    args.eval_data = str(var.resolve(args.eval_data)) if args.eval_data else ""
    source = resolve_model_source(args.model, var)
    tokenizer = load_tokenizer(source)
    context = model_context_length(source)
    if context and args.seq_length > context:
        raise TrainingConfigError(f"--seq-length {args.seq_length} exceeds the model's context of {context} tokens")
    data, total_steps = prepare_data(args, tokenizer, args.total_steps)
    cpus = args.cpus_per_worker or (1 if args.use_gpu else max(1, (os.cpu_count() or 1) // args.num_workers))
    storage = Path(args.storage_path) if args.storage_path else var.root / "ray" / "storage"
    fields = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__ if hasattr(args, name)}
    fields.update(
        model_source=source,
        total_steps=total_steps,
        gradient_accumulate_step=args.batch_size // (args.num_workers * args.micro_batch_size),
        cpus_per_worker=cpus,
        log_dir=str(var.logs / "training" / args.run_name),
        crash_after_step=int(os.environ.get(CRASH_ENV, "0")),
    )
    return args, TrainConfig(**fields), data, storage


def run_trainer(args: argparse.Namespace, config: TrainConfig, data: TrainData, storage: Path) -> Any:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_ray = not ray.is_initialized()
    if started_ray:
        # "local" rather than Ray's default: that joins whatever /tmp/ray/ray_current_cluster names, which may be
        # a head stopped long ago (the run then hangs on its GCS address).
        address = args.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": asdict(config), "data": ray.put(data), "use_ray": True},
            scaling_config=ScalingConfig(
                num_workers=config.num_workers,
                use_gpu=config.use_gpu,
                resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=config.run_name,
                storage_path=str(storage),
                checkpoint_config=CheckpointConfig(num_to_keep=args.num_checkpoints),
                failure_config=FailureConfig(max_failures=args.max_failures),
            ),
        )
        return trainer.fit()
    finally:
        if started_ray:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    setup_logging("training")
    try:
        args, config, data, storage = build_run(argv)
    except (TrainingConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logger.info(
        "run {}: {} steps of {} rows x {} tokens on {} worker(s) ({}), {} training rows, storage {}",
        config.run_name,
        config.total_steps,
        config.batch_size,
        config.seq_length,
        config.num_workers,
        "GPU" if config.use_gpu else f"CPU x{config.cpus_per_worker}",
        len(data.train),
        storage,
    )
    from ray.train import TrainingFailedError

    try:
        result = run_trainer(args, config, data, storage)
    except TrainingFailedError as error:
        logger.error("training failed: {}", error)
        print(f"training failed; rerun with --run-name {config.run_name} to resume from its last checkpoint")
        return 1
    checkpoint = Path(result.checkpoint.path)
    final = {
        "run_name": config.run_name,
        "checkpoint": str(checkpoint),
        "hf_folder": str(checkpoint / HF_FOLDER),
        "model_source": config.model_source,
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
    }
    (storage / config.run_name / FINAL_POINTER).write_text(json.dumps(final, indent=2) + "\n")
    print(f"final checkpoint: {checkpoint / HF_FOLDER}")
    return 0


if __name__ == "__main__":
    # Import by module name so Ray pickles the loop by reference (workers import it) rather than as __main__.
    from training.finetune import main as finetune_main

    sys.exit(finetune_main())
