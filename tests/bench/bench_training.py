"""Training throughput: `training/finetune.py` on Ray Train (1 and 2 CPU workers) against a plain single-process
PyTorch loop, on the same model, data, batch and step count, in one run. Writes var/bench/training.json.

    .venv/bin/python tests/bench/bench_training.py [--steps 8]

The model is a random GPT-NeoX of about 19M parameters (hidden 512, 6 layers) with a byte-level BPE tokenizer
trained on the spot, so the run needs no download and compute, not Ray's start-up, dominates a step. Each
system is timed from the start of its first step to the end of its last (model loading and Ray start-up excluded);
the plain loop is timed twice, before and after the Ray runs, and its better time is the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(Path(__file__).parent)]

import torch  # noqa: E402
from report import BenchReport  # noqa: E402

MODEL_NAME = "gpt-neox-19m-shape"
SEQ_LENGTH, BATCH, LR = 256, 8, 1e-4


def build_model(folder: Path) -> Path:
    from conftest import build_tiny_gpt_neox
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    build_tiny_gpt_neox(folder)
    tiny = GPTNeoXConfig.from_pretrained(folder)
    config = GPTNeoXConfig(
        vocab_size=tiny.vocab_size,
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        intermediate_size=2048,
        max_position_embeddings=1024,
        eos_token_id=tiny.eos_token_id,
        bos_token_id=tiny.bos_token_id,
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    return folder


def write_chat_data(path: Path, articles: int = 400) -> Path:
    from services.retrieval.corpus import read_wikipedia_summaries

    with path.open("w") as out:
        for doc in read_wikipedia_summaries(limit=articles):
            messages = [
                {"role": "user", "content": f"Tell me about {doc.title}."},
                {"role": "assistant", "content": doc.text},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def plain_loop(model_dir: Path, data_path: Path, steps: int) -> dict[str, float]:
    """The baseline: one process, every core, the textbook loop (HF loss, AdamW), on finetune.py's exact rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.data import load_packed, mixture_order

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_packed(data_path, tokenizer, SEQ_LENGTH)
    order = mixture_order([len(data)], [1.0], steps * BATCH, seed=42)
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    started = time.perf_counter()
    for step in range(steps):
        rows = order[step * BATCH : (step + 1) * BATCH]
        loss = model(input_ids=torch.tensor(data.input_ids[rows]), labels=torch.tensor(data.labels[rows])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    return {"samples_per_s": steps * BATCH / elapsed, "tokens_per_s": steps * BATCH * SEQ_LENGTH / elapsed}


def ray_run(model_dir: Path, data_path: Path, steps: int, workers: int, storage: Path) -> dict[str, float]:
    from training import finetune

    argv = [
        "--model", str(model_dir), "--data", str(data_path), "--seq-length", str(SEQ_LENGTH),
        "--batch-size", str(BATCH), "--micro-batch-size", str(BATCH // workers), "--num-workers", str(workers),
        "--total-steps", str(steps), "--checkpoint-steps", str(steps), "--lr", str(LR), "--warmup-steps", "0",
        "--lr-scheduler", "constant", "--storage-path", str(storage), "--run-name", f"bench-{workers}w",
        "--log-steps", str(steps),
    ]  # fmt: skip
    if finetune.main(argv) != 0:
        raise SystemExit(f"finetune.py with {workers} worker(s) failed")
    metrics = json.loads((storage / f"bench-{workers}w" / finetune.FINAL_POINTER).read_text())["metrics"]
    return {"samples_per_s": metrics["samples_per_s"], "tokens_per_s": metrics["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per system")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = BenchReport("training")
    params = {"batch": BATCH, "seq_length": SEQ_LENGTH, "steps": args.steps, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        root = Path(scratch)
        model_dir = build_model(root / "model")
        data_path = write_chat_data(root / "chat.jsonl")
        # The baseline runs before and after the Ray runs and keeps its better result: on a shared machine the
        # load drifts, and the ratio should not flatter finetune.py.
        first = plain_loop(model_dir, data_path, args.steps)
        one = ray_run(model_dir, data_path, args.steps, 1, root / "storage")
        two = ray_run(model_dir, data_path, args.steps, 2, root / "storage")
        baseline = max(first, plain_loop(model_dir, data_path, args.steps), key=lambda m: m["samples_per_s"])
        report.add("train", "plain-pytorch-loop", MODEL_NAME, {**params, "workers": 1}, baseline)
        report.add("train", "finetune.py (Ray Train)", MODEL_NAME, {**params, "workers": 1}, one)
        report.add("train", "finetune.py (Ray Train)", MODEL_NAME, {**params, "workers": 2}, two)
    report.ratio("ray_1worker_vs_plain_loop", one["samples_per_s"] / baseline["samples_per_s"])
    report.ratio("ray_2workers_vs_plain_loop", two["samples_per_s"] / baseline["samples_per_s"])
    report.write()


if __name__ == "__main__":
    main()
