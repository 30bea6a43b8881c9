"""Checkpoints of a run: what a worker saves and resumes from, the Hugging Face folder it exports, and the
readers the conversion job uses to find a run's final weights (``<storage>/<run>/final.json``)."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import TrainConfig

STATE_FILE = "train_state.pt"
HF_FOLDER = "hf"
FINAL_POINTER = "final.json"


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    step: int,
    config: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
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
        # fp16's loss scale: resumed at 65536 instead, the first steps after a resume would skip their updates
        # while it halves back down to where the run had it (empty for bf16 and fp32, whose scaler is off)
        "scaler": scaler.state_dict() if scaler is not None else {},
    }
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, folder / STATE_FILE)
    return model_state


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: torch.amp.GradScaler | None = None
) -> int:
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
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):  # a checkpoint without fp16 has none
        scaler.load_state_dict(state["scaler"])
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


# ------------------------------------------------------------------------------------- reading a finished run


class CheckpointNotFound(FileNotFoundError):
    """A run or checkpoint the conversion job was pointed at does not exist; the message says where it looked."""


@dataclass
class FinalRecord:
    """``<storage>/<run>/final.json``: where a finished run left its weights."""

    run_name: str
    checkpoint: str
    hf_folder: str
    model_source: str
    metrics: dict[str, float]
    eval_data: str = ""


def write_final(storage: Path, record: FinalRecord) -> Path:
    path = storage / record.run_name / FINAL_POINTER
    path.write_text(json.dumps(asdict(record), indent=2) + "\n")
    return path


def read_final(storage: Path, run_name: str) -> FinalRecord:
    path = storage / run_name / FINAL_POINTER
    if not path.is_file():
        runs = sorted(p.parent.name for p in storage.glob(f"*/{FINAL_POINTER}")) if storage.is_dir() else []
        raise CheckpointNotFound(
            f"no finished run {run_name!r}: {path} does not exist (finished runs under {storage}: "
            f"{', '.join(runs) or 'none'}; pass --storage-path if the run used another storage)"
        )
    raw = json.loads(path.read_text())
    known = set(FinalRecord.__dataclass_fields__)
    return FinalRecord(**{k: v for k, v in raw.items() if k in known})


@dataclass
class TrainingState:
    """What a checkpoint folder's train_state.pt says about the model (the optimizer state is left out)."""

    model_state: dict[str, torch.Tensor]
    step: int
    config: dict[str, Any]


def read_training_state(folder: Path) -> TrainingState:
    """The full model state a worker saved (``save_checkpoint``), for a checkpoint with no exported ``hf/``."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointNotFound(f"{folder} holds neither {HF_FOLDER}/ nor {STATE_FILE}: not a finetune checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return TrainingState(model_state=state["model"], step=int(state["step"]), config=state["config"])
