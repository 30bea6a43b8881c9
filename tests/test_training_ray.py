"""Fine-tuning through real Ray Train: a tiny GPT-NeoX on 2 CPU workers (DDP over gloo), a run killed after a
checkpoint and resumed by name, and one small job submitted with `ray job submit` to a local Ray head.

One Ray head serves the file (`finetune.py --ray-address` runs join it; the job is submitted to it) and is
stopped at the end with its `ray start --block` process group, so no Ray process outlives the tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_training import city_chats, write_jsonl

from services.common.server import free_port
from training import finetune

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def ray_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    # Ray 2.60 heads use token auth (~/.ray/auth_token); clients joining one (the job CLI, ray.init with an
    # address) send the token only in token mode.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A local Ray head with the jobs API (what `make ray-up` starts): (jobs address, GCS address, its
    NIGHTCAP_VAR).

    One head serves this module; it is stopped with its whole `ray start --block` process group."""
    port, dashboard = free_port(), free_port()
    var = tmp_path_factory.mktemp("head-var")
    # A head turns token authentication on only in token mode, with a token to check: on a machine that never
    # had one, a head started plainly ran open while the token-mode job CLI refused to run without a token.
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "NIGHTCAP_VAR": str(var), "RAY_AUTH_MODE": "token"}
    assert ray_cli("get-auth-token", "--generate").returncode == 0
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while ray_cli("job", "list", "--address", address).returncode != 0:
            assert head.poll() is None, "ray start --head exited early"
            assert time.monotonic() < deadline, "the Ray head's jobs API did not come up in 180 s"
            time.sleep(1)
        yield address, f"127.0.0.1:{port}", var
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def finetune_on(head: tuple[str, str], args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`python training/finetune.py` joining the head, as a user on the head's machine runs it."""
    return subprocess.run(
        [sys.executable, "training/finetune.py", *args, "--ray-address", head[1]],
        capture_output=True, text=True, timeout=400, cwd=REPO, env={**os.environ, "RAY_AUTH_MODE": "token", **env},
    )  # fmt: skip


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("chat-data")
    return write_jsonl(folder / "train.jsonl", city_chats(96)), write_jsonl(folder / "eval.jsonl", city_chats(8, 3))


def run_args(model: Path, data: tuple[Path, Path], storage: Path, name: str) -> list[str]:
    train, held_out = data
    return [
        "--model", str(model), "--data", str(train), "--eval-data", str(held_out),
        "--seq-length", "64", "--batch-size", "8", "--micro-batch-size", "2", "--num-workers", "2",
        "--cpus-per-worker", "1", "--total-steps", "8", "--checkpoint-steps", "3", "--eval-steps", "4",
        "--lr", "3e-3", "--warmup-steps", "1", "--storage-path", str(storage), "--run-name", name,
    ]  # fmt: skip


def final_pointer(storage: Path, name: str) -> dict:
    return json.loads((storage / name / finetune.FINAL_POINTER).read_text())


@pytest.fixture(scope="module")
def straight_run(ray_head, tiny_model_dir, chat_data, tmp_path_factory) -> tuple[Path, dict]:
    storage = tmp_path_factory.mktemp("ray-storage")
    run = finetune_on(ray_head, run_args(tiny_model_dir, chat_data, storage, "straight"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return storage, final_pointer(storage, "straight")


def test_two_workers_lower_the_loss_and_leave_a_loadable_final_checkpoint(straight_run, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    storage, final = straight_run
    metrics = final["metrics"]
    assert metrics["step"] == 8 and metrics["start_step"] == 0
    assert metrics["eval_loss"] < 5.5  # the random tiny model starts near ln(vocab) = 6.1
    checkpoints = sorted(p.name for p in (storage / "straight").glob("checkpoint_0*"))
    assert checkpoints == ["checkpoint_000006", "checkpoint_000008"]  # CheckpointConfig(num_to_keep=2)
    hf = Path(final["hf_folder"])
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.vocab_size == before.config.vocab_size == len(tokenizer)
    assert not model.gpt_neox.embed_in.weight.equal(before.gpt_neox.embed_in.weight)  # trained weights


def test_a_killed_run_resumes_at_its_checkpoint_and_ends_with_the_same_loss(
    ray_head, straight_run, tiny_model_dir, chat_data, tmp_path
):
    args = run_args(tiny_model_dir, chat_data, tmp_path, "interrupted")
    # Every worker dies after step 5; the last checkpoint is step 3.
    crashed = finetune_on(ray_head, args, **{finetune.CRASH_ENV: "5"})
    assert crashed.returncode == 1 and "rerun with --run-name interrupted to resume" in crashed.stdout
    assert [p.name for p in (tmp_path / "interrupted").glob("checkpoint_0*")] == ["checkpoint_000003"]
    resumed_run = finetune_on(ray_head, args)
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    assert "resumed from the checkpoint at step 3" in resumed_run.stdout + resumed_run.stderr
    resumed, straight = final_pointer(tmp_path, "interrupted")["metrics"], straight_run[1]["metrics"]
    assert resumed["start_step"] == 3 and resumed["step"] == 8
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-5)


def test_ray_job_submit_runs_finetune_on_a_local_head(ray_head, tiny_model_dir, chat_data, tmp_path):
    storage = tmp_path / "storage"
    args = run_args(tiny_model_dir, chat_data, storage, "submitted")
    args[args.index("--total-steps") + 1] = "2"
    args[args.index("--num-workers") + 1] = "1"
    submit = ray_cli(
        "job", "submit", "--address", ray_head[0], "--working-dir", str(REPO), "--",
        "python", "training/finetune.py", *args, timeout=400,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert f"final checkpoint: {storage / 'submitted'}" in submit.stdout
    job_id = re.search(r"Job '(\w+)' succeeded", submit.stdout + submit.stderr)
    assert job_id, submit.stdout[-2000:]
    status = ray_cli("job", "status", "--address", ray_head[0], job_id.group(1))
    assert "succeeded" in (status.stdout + status.stderr).lower()
    assert final_pointer(storage, "submitted")["metrics"]["step"] == 2


def training_guide_ray_job_command() -> list[str]:
    """The `ray job submit` command of the training guide (docs/training.md), as a user copies it."""
    guide = (REPO / "docs" / "training.md").read_text()
    found = re.search(r"^RAY_AUTH_MODE=token (\.venv/bin/ray job submit .*?)\n(?=\S)", guide, re.M | re.S)
    assert found, "docs/training.md has no `ray job submit` command"
    return found.group(1).replace("\\\n", " ").split()


def test_the_training_guide_s_ray_job_submit_command_works_as_written(ray_head, tiny_model_dir):
    """The guide's data paths are var/..., which the job's uploaded working dir lacks (var/ is git-ignored):
    they must name the files under the head's NIGHTCAP_VAR. Only the address, the model (the tiny one) and
    the step count (2) are changed for the test."""
    command = training_guide_ray_job_command()
    assert "var/data/wiki-chat/train.jsonl:1" in command
    command[command.index("--address") + 1] = ray_head[0]
    command[command.index("--model") + 1] = str(tiny_model_dir)
    command[command.index("--total-steps") + 1] = "2"
    data = ray_head[2] / "data" / "wiki-chat"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(data / "train.jsonl", city_chats(96))
    write_jsonl(data / "eval.jsonl", city_chats(8, 3))
    for _ in range(12):  # a head that just started may have no job agent yet ("try again later")
        submit = ray_cli(*command[1:], timeout=400)
        if "No available agent to submit job" not in submit.stderr:
            break
        time.sleep(10)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert re.search(r"Job '\w+' succeeded", submit.stdout + submit.stderr), submit.stdout[-2000:]
    assert f"final checkpoint: {ray_head[2] / 'ray' / 'storage'}" in submit.stdout
