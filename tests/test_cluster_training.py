"""A Ray Train job across hosts made of network namespaces (deploy/netns/training.py): the Ray head in h1,
one DDP worker in each of h2 and h3; every Ray process of h3 killed mid-run, its node started again, and the
job resumes from a checkpoint, redoes the lost steps with the same losses and finishes.

The full comparison with an uninterrupted run is `python -m deploy.netns.bench --scenarios training`; this test
checks the interrupted run against itself (the steps it did twice), which needs one job instead of two.
Skipped, with the reason, where namespaces cannot be made (not root, no ``ip``/``iptables``, no CAP_NET_ADMIN)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from deploy import netns
from deploy.netns import Cluster
from deploy.netns.ray import ray_up
from deploy.netns.training import lose_host, submit, worker_addresses, write_chats

TEST_PREFIX = re.compile(r"^nctr(\d+)-h\d+$")
JOB_TIMEOUT_S = 300.0


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Three hosts with a Ray node each (head in h1, no CPUs; one CPU in h2 and in h3), taken down after.
    Its state in a short /tmp folder: Ray's sockets live under each node's temp dir, at most 107 bytes a path."""
    reason = netns.probe()
    if reason is not None:
        pytest.skip(reason)
    for name in netns.namespaces():  # what a killed earlier run left: its pytest process is gone
        match = TEST_PREFIX.match(name)
        if match and not psutil.pid_exists(int(match.group(1))):
            Cluster(name.rsplit("-", 1)[0], 1).down(grace=1)
    with tempfile.TemporaryDirectory(prefix="nctr-") as state:
        made = Cluster(f"nctr{os.getpid() % 1_000_000}", 3, "10.214.0.0/24", state_dir=Path(state) / "hosts")
        try:
            made.up()
            ray_up(made)
            yield made
        finally:
            made.down(grace=2)


def test_a_job_whose_worker_host_dies_resumes_from_a_checkpoint_on_the_same_losses(
    cluster: Cluster, tiny_model_dir: Path, tmp_path: Path
):
    data = write_chats(tmp_path / "data" / "train.jsonl")
    job = submit(cluster, tmp_path, str(tiny_model_dir), data, "lost-h3", steps=8, checkpoint_steps=2)
    try:
        lost = lose_host(cluster, job, "h3", after_step=5, down_s=2.0, timeout=JOB_TIMEOUT_S)
        job.finish(JOB_TIMEOUT_S)
    finally:
        if job.process.poll() is None:
            job.process.kill()
    history = job.steps()
    (resumed_from,) = [s["step"] for s in history if "loss" not in s]  # finetune.py's "resumed from" line
    first = {s["step"]: s["loss"] for s in history if "loss" in s and s["start_step"] == 0}
    resumed = {s["step"]: s["loss"] for s in history if "loss" in s and s["start_step"] == resumed_from}
    assert lost.processes_killed > 0 and 2 <= resumed_from < lost.done_before_kill
    assert sorted(resumed) == list(range(resumed_from + 1, 9))
    redone = sorted(set(first) & set(resumed))
    assert redone and [resumed[step] for step in redone] == [first[step] for step in redone]  # bit for bit
    h2, h3 = cluster.host("h2").address, cluster.host("h3").address
    groups = worker_addresses(job.log)
    assert len(groups) == 2 and all(sorted(group) == sorted([h2, h3]) for group in groups), groups
