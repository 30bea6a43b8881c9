"""Training through a lost host: a Ray Train job loses the host of one of its two workers mid-run.

The Ray head is in h1 (no CPUs), a worker node of one CPU in h2 and in h3, so `training/finetune.py
--num-workers 2` submitted from h1 puts one DDP worker on each. The same small run goes twice: once straight,
once with every Ray process of h3 killed (``kill -9``) right after a given step, h3's node started again some
seconds later. The job restarts its worker group from the last checkpoint (``--max-failures 1``) once both
CPUs are back, and finishes. Each run's rank 0 writes every step's metrics to ``metrics.jsonl``
(training/session.py); the figures compare the two step by step:

- ``loss_max_abs_diff_after_resume``: the steps of the resumed attempt against the straight run's same steps;
- ``steps_redone``: steps done before the kill and again after the resume (the kill step less the checkpoint).
  A checkpoint counts once Ray's controller holds every rank's report of its step; it takes one report from each
  worker per poll (every 2 s), so with steps shorter than that the checkpoint rank 0 wrote just before the kill
  (``last_checkpoint_written_before_kill``) may not count yet, and the job resumes from the one before;
- ``seconds_lost``: the interrupted job's wall time less the straight one's (both from `ray job submit` to its
  exit); beside it the seconds from the kill, and from h3's node starting again, to the resumed group's first
  step;
- ``worker_addresses``: each worker group's node addresses, as the job's log names them ("(ip=..."), and
  whether each group had one worker in h2 and one in h3.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from deploy.netns.cluster import Cluster
from deploy.netns.machine import ClusterError
from deploy.netns.ray import job_submit_command, kill_ray_node, ray_env, ray_up

STEPS = 12
CHECKPOINT_STEPS = 2
KILL_AFTER_STEP = 5  # one step past the checkpoint of step 4: the resume redoes at least that step
DOWN_S = 10.0  # how long h3 stays dead before its Ray node is started again
JOB_TIMEOUT_S = 900.0
CHATS = 96
CITIES = ("Zurich", "Geneva", "Basel", "Bern", "Lausanne", "Lugano", "Paris", "Lyon", "Milan", "Vienna")
WORKER_ADDRESS = re.compile(r"\(ip=([\d.]+), pid=\d+\) world_rank=(\d+)")
CHECKPOINT_WRITTEN = re.compile(r"Checkpoint successfully created at: .*checkpoint_(\d+)")
RESUMED = "resumed from the checkpoint at step"  # finetune.py's line


def write_chats(path: Path, count: int = CHATS) -> Path:
    """Chat JSONL for the runs: a question about a city and a one-line answer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        {"messages": [{"role": "user", "content": f"Where is {city}?"},
                      {"role": "assistant", "content": f"{city} is a city in Europe."}]}
        for city in (CITIES[i % len(CITIES)] for i in range(count))
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def finetune_args(model: str, data: Path, folder: Path, run: str, steps: int, checkpoint_steps: int) -> list[str]:
    """The small settings of tests/test_training_ray.py, two workers of one CPU, one restart allowed; the
    run's storage and logs (metrics.jsonl) in ``folder``."""
    return [
        "--model", model, "--data", str(data), "--seq-length", "64", "--batch-size", "8",
        "--micro-batch-size", "2", "--num-workers", "2", "--cpus-per-worker", "1", "--total-steps", str(steps),
        "--checkpoint-steps", str(checkpoint_steps), "--lr", "3e-3", "--warmup-steps", "1", "--seed", "42",
        "--max-failures", "1", "--storage-path", str(folder / "storage"), "--var-dir", str(folder),
        "--run-name", run,
    ]  # fmt: skip


@dataclass
class Job:
    """One `ray job submit` from h1, followed to its end."""

    run: str
    process: subprocess.Popen
    log: Path
    metrics: Path
    started: float
    ended: float | None = None

    def steps(self) -> list[dict]:
        """metrics.jsonl: every logged step (a line with only ``step`` marks a resume from that step)."""
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def wait_step(self, step: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(s["step"] >= step and "loss" in s for s in self.steps()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"{self.run}: no step {step} in {timeout:.0f} s; job log:\n{self.tail()}")
            time.sleep(0.1)

    def finish(self, timeout: float) -> None:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise ClusterError(f"{self.run}: not finished in {timeout:.0f} s; job log:\n{self.tail()}") from None
        self.ended = time.time()
        if code != 0:
            raise ClusterError(f"{self.run}: `ray job submit` exited {code}; job log:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"


def submit(cluster: Cluster, folder: Path, model: str, data: Path, run: str, steps: int, checkpoint_steps: int) -> Job:
    entrypoint = ["python", "training/finetune.py", *finetune_args(model, data, folder, run, steps, checkpoint_steps)]
    log = folder / f"{run}-job.log"
    process = cluster.spawn("h1", job_submit_command(cluster, entrypoint), log=log, env=ray_env(cluster))
    return Job(run, process, log, folder / "logs" / "training" / run / "metrics.jsonl", time.time())


def worker_addresses(log: Path, workers: int = 2) -> list[list[str]]:
    """Each worker group the job started, as its log names them: the node address of rank 0, 1, ..."""
    found = [(match.group(1), int(match.group(2))) for match in WORKER_ADDRESS.finditer(log.read_text())]
    groups = [found[i : i + workers] for i in range(0, len(found), workers)]
    return [[address for address, _ in sorted(group, key=lambda entry: entry[1])] for group in groups]


def checkpoints_written_before_resume(log: Path) -> list[int]:
    """The steps whose checkpoint rank 0 had written to storage before the job first resumed (Ray commits
    one only once the controller holds every rank's report of that step)."""
    before = log.read_text().split(RESUMED, 1)[0]
    return [int(step) for step in CHECKPOINT_WRITTEN.findall(before)]


def losses(steps: list[dict]) -> dict[int, float]:
    return {s["step"]: s["loss"] for s in steps if "loss" in s}


@dataclass
class Interruption:
    """What ``lose_host`` did to a running job."""

    host: str
    processes_killed: int
    killed_at: float
    restarted_at: float
    done_before_kill: int  # the last step the job had logged when the host died


def lose_host(cluster: Cluster, job: Job, host: str, after_step: int, down_s: float, timeout: float) -> Interruption:
    """Once ``job`` has logged ``after_step``: every Ray process of ``host`` killed, its node started again
    ``down_s`` seconds later (``ray_up`` starts only what is missing)."""
    job.wait_step(after_step, timeout)
    killed = kill_ray_node(cluster, host)
    killed_at = time.time()
    done = max(losses(job.steps()))
    time.sleep(down_s)
    restarted_at = time.time()
    ray_up(cluster)
    return Interruption(host, killed, killed_at, restarted_at, done)


def training_through_lost_host(
    cluster: Cluster,
    model: str,
    folder: Path,
    var_dir: Path | None = None,
    steps: int = STEPS,
    checkpoint_steps: int = CHECKPOINT_STEPS,
    kill_after_step: int = KILL_AFTER_STEP,
    down_s: float = DOWN_S,
    timeout: float = JOB_TIMEOUT_S,
) -> dict:
    """The scenario (module docstring) on ``cluster`` (3 hosts, up): Ray started, the two runs, the figures.
    ``model``: what finetune.py's --model takes, a registered name looked up in ``var_dir`` (the runs' own
    --var-dir is ``folder``: their storage and logs stay there)."""
    from services.common.paths import VarLayout
    from training.config import resolve_model_source

    if len(cluster.hosts) != 3:
        raise ClusterError(f"the training scenario wants 3 hosts, cluster {cluster.prefix} has {len(cluster.hosts)}")
    model = resolve_model_source(model, VarLayout.from_env(var_dir))
    ray_up(cluster)
    data = write_chats(folder / "data" / "train.jsonl")
    straight = submit(cluster, folder, model, data, "straight", steps, checkpoint_steps)
    straight.finish(timeout)
    logger.info("straight run: {} steps in {:.1f} s", steps, straight.ended - straight.started)
    interrupted = submit(cluster, folder, model, data, "interrupted", steps, checkpoint_steps)
    try:
        interruption = lose_host(cluster, interrupted, "h3", kill_after_step, down_s, timeout)
        interrupted.finish(timeout)
    finally:
        if interrupted.process.poll() is None:
            interrupted.process.kill()
    figures = compare_runs(cluster, straight, interrupted, interruption, checkpoint_steps)
    logger.info("training through a lost host: {}", json.dumps(figures))
    return figures


def compare_runs(
    cluster: Cluster, straight: Job, interrupted: Job, interruption: Interruption, checkpoint_steps: int
) -> dict:
    """The figures of the module docstring from the two jobs' metrics.jsonl and logs."""
    reference = losses(straight.steps())
    history = interrupted.steps()
    markers = [s["step"] for s in history if "loss" not in s]
    if not markers:
        raise ClusterError(f"the interrupted run never resumed from a checkpoint; job log:\n{interrupted.tail()}")
    resumed_from = markers[-1]
    resumed = {s["step"]: s for s in history if "loss" in s and s.get("start_step") == resumed_from}
    before = {s["step"]: s["loss"] for s in history if "loss" in s and s.get("start_step") == 0}
    first_resumed = min(resumed.values(), key=lambda s: s["step"])
    done = interruption.done_before_kill
    h2, h3 = sorted([cluster.host("h2").address, cluster.host("h3").address])
    groups = {"straight": worker_addresses(straight.log), "interrupted": worker_addresses(interrupted.log)}
    straight_s, interrupted_s = straight.ended - straight.started, interrupted.ended - interrupted.started
    return {
        "steps": max(reference),
        "checkpoint_steps": checkpoint_steps,
        "killed_after_step": done,
        "ray_processes_killed_in_h3": interruption.processes_killed,
        "last_checkpoint_written_before_kill": max(checkpoints_written_before_resume(interrupted.log), default=0),
        "resumed_from_checkpoint_step": resumed_from,
        "steps_redone": done - resumed_from,
        "resumes": len(markers),
        "loss_max_abs_diff_after_resume": max(abs(s["loss"] - reference[step]) for step, s in resumed.items()),
        "loss_max_abs_diff_before_kill": max(abs(loss - reference[step]) for step, loss in before.items()),
        "final_loss": {"straight": reference[max(reference)], "interrupted": resumed[max(resumed)]["loss"]},
        "seconds_straight": round(straight_s, 2),
        "seconds_interrupted": round(interrupted_s, 2),
        "seconds_lost": round(interrupted_s - straight_s, 2),
        "seconds_h3_down": round(interruption.restarted_at - interruption.killed_at, 2),
        "seconds_kill_to_first_resumed_step": round(first_resumed["time"] - interruption.killed_at, 2),
        "seconds_node_back_to_first_resumed_step": round(first_resumed["time"] - interruption.restarted_at, 2),
        "worker_addresses": groups,
        "workers_on_h2_and_h3": all(runs and all(sorted(g) == [h2, h3] for g in runs) for runs in groups.values()),
    }
