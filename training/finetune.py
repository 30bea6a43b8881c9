"""Fine-tune a causal LM on chat data with Ray Train: one CPU, 8 GPUs or a KubeRay cluster, the same script.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python training/finetune.py --model smollm2-135m-instruct --data data.jsonl:1 --num-workers 2
    python training/finetune.py ...        # no cluster: starts a local Ray for the run

The story of a run: parse and check the flags (bad ones fail here, before Ray starts anything), tokenize and pack
the data once in the driver, then ``TorchTrainer`` runs ``train_loop_per_worker`` on each worker: ordinary PyTorch
(DDP or FSDP), a checkpoint through ``ray.train.report`` every ``--checkpoint-steps``, eval every ``--eval-steps``.
Rerunning with the same ``--run-name`` resumes from the last checkpoint. The final checkpoint holds a Hugging Face
folder (``hf/``) that the conversion job publishes; its path is printed and written to ``<run>/final.json``.

This file is the data, the loop and the driver; the rest sits beside it: ``config.py`` (flags and their checks),
``session.py`` (Ray Train's edges and the logging backend), ``model.py`` (model, optimizer, loss),
``checkpoints.py`` (save, resume, export, and the readers ``convert.py`` shares).
"""

from __future__ import annotations

import argparse
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
from loguru import logger

from services.common.logs import setup_logging
from services.common.paths import VarLayout
from training.checkpoints import (
    FINAL_POINTER,
    HF_FOLDER,
    FinalRecord,
    export_hf,
    load_checkpoint,
    save_checkpoint,
    write_final,
)
from training.config import (
    CRASH_ENV,
    TrainConfig,
    TrainingConfigError,
    build_parser,
    check_args,
    load_tokenizer,
    model_context_length,
    resolve_model_source,
)
from training.data import (
    IGNORE_INDEX,
    DataError,
    PackedData,
    load_packed,
    map_mixture_paths,
    mixture_order,
    parse_mixture,
)
from training.model import all_sum, autocast, build_model, build_optimizer, evaluate, stack_no_sync, token_loss
from training.session import ProgressLog, Session

__all__ = ["FINAL_POINTER", "HF_FOLDER", "build_parser", "build_run", "export_hf", "main", "train_loop_per_worker"]

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
            start_step = load_checkpoint(resume_dir, model, optimizer, scheduler, scaler)
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
                model_state = save_checkpoint(folder, model, optimizer, scheduler, step, config, scaler)
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
    final = FinalRecord(
        run_name=config.run_name,
        checkpoint=str(checkpoint),
        hf_folder=str(checkpoint / HF_FOLDER),
        model_source=config.model_source,
        metrics={k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
        eval_data=str(Path(args.eval_data).resolve()) if args.eval_data else "",
    )
    write_final(storage, final)
    print(f"final checkpoint: {checkpoint / HF_FOLDER}")
    if args.publish:
        from training import convert

        name = args.publish_name or config.run_name.lower()
        var = VarLayout.from_env(args.var_dir)
        argv = ["--run", config.run_name, "--storage-path", str(storage), "--var-dir", str(var.root), "--name", name]
        return convert.main([*argv, "--publish", args.publish])
    return 0


if __name__ == "__main__":
    # Import by module name so Ray pickles the loop by reference (workers import it) rather than as __main__.
    from training.finetune import main as finetune_main

    sys.exit(finetune_main())
