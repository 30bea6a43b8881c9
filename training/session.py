"""Where a worker touches the outside: Ray Train (rank, device, reports, checkpoints) and the logging backend."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from services.common.logs import setup_logging
from training.config import TrainConfig

# Every logged step at full precision, one JSON line each, appended across attempts (a resumed run adds its own).
METRICS_FILE = "metrics.jsonl"


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
    """Rank 0's metrics to the chosen backend: stdout, loguru (a file under var/logs), or W&B; and to
    ``<log_dir>/metrics.jsonl`` whatever the backend."""

    def __init__(self, config: TrainConfig, rank: int) -> None:
        self.config, self.active, self.wandb, self.metrics_file = config, rank == 0, None, None
        if not self.active:
            return
        Path(config.log_dir).mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(Path(config.log_dir) / METRICS_FILE, "a")  # noqa: SIM115 (closed by close())
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
        self.metrics_file.write(json.dumps({"time": time.time(), **metrics}) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(metrics["step"]))

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()
