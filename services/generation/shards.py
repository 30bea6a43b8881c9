"""Tensor parallelism: one process per rank, each holding 1/N of every layer.

As TGI's launcher does, ``serve --num-shard N`` is rank 0 and starts ranks 1..N-1 as child processes
(``python -m services.generation shard ...`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set).
Every rank loads the model through transformers' tensor-parallel plan (``tp_plan="auto"``: column-wise
q/k/v and up projections, row-wise output projections, an all-reduce after each row-wise layer), over
torch.distributed: nccl with one GPU per rank on CUDA, gloo on CPU.

Rank 0 owns gRPC, the scheduler and sampling. Each step it broadcasts the scheduler's ``ModelStep``
(plain data) and every rank runs it on its own runner (``execute_step``), so all apply the same cache
operations to their shard of the KV cache and meet in the same all-reduces. While idle, rank 0 broadcasts a
heartbeat, so every collective, idle or not, has a deadline: a rank that dies or hangs ends the service within
``timeout`` seconds instead of leaving it hanging.

Across hosts (``Rendezvous``, from the environment): rank 0 listens for the others on
NIGHTCAP_SHARD_MASTER_ADDR (an address they reach, not loopback) and NIGHTCAP_SHARD_MASTER_PORT, and with
NIGHTCAP_SHARD_LAUNCH=external starts none of them itself: each is started on its own host, by whatever places
processes there, as ``python -m services.generation shard`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
(torchrun's names). gloo talks over the interface GLOO_SOCKET_IFNAME names (else the address the host's name
resolves to). A host cut off mid-step is a collective that times out: the service goes NOT_SERVING and its
calls end in UNAVAILABLE within ``timeout`` seconds, as for a rank that died.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from loguru import logger

from services.common.errors import FailedPrecondition, Unavailable
from services.common.server import free_port
from services.generation.engine.runner import Runner, execute_step
from services.generation.engine.scheduler import ModelStep

JOIN_TIMEOUT = 300.0  # seconds for every rank to start and join the group
HEARTBEAT = ModelStep(step=-1)
STOP = ModelStep(step=-1, stop=True)


class ShardFailure(Unavailable):
    """A rank died, hung past the timeout or failed a step: the sharded model is gone."""

    fatal = True  # the engine stops and fails every request instead of going on


@dataclass(frozen=True)
class ShardSpec:
    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout: float = 60.0  # seconds any collective may take before the service gives up

    @classmethod
    def from_env(cls, timeout: float) -> ShardSpec:
        """The torchrun / TGI launcher convention: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT."""
        return cls(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ.get("MASTER_PORT", "29500")),
            timeout,
        )


def check_shardable(config, num_shard: int) -> None:
    """Raises FailedPrecondition, naming the architecture and N, unless the model can be split N ways."""
    architecture = (getattr(config, "architectures", None) or [config.model_type])[0]
    if not getattr(config, "base_model_tp_plan", None):
        raise FailedPrecondition(
            f"{architecture} has no tensor-parallel plan in transformers, so it cannot be split over"
            f" --num-shard {num_shard} ranks: serve it with --num-shard 1 (or --device-map auto)"
        )
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, name, None)
        if heads and heads % num_shard:
            raise FailedPrecondition(
                f"{architecture} has {name}={heads}, which --num-shard {num_shard} does not divide:"
                f" pick a number of shards that divides {heads}"
            )


def shard_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


def init_rank(spec: ShardSpec, device: torch.device) -> None:
    """Joins the process group: nccl on CUDA, gloo on CPU, every collective bounded by ``spec.timeout``."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.update(
        RANK=str(spec.rank), LOCAL_RANK=str(spec.rank), WORLD_SIZE=str(spec.world_size),
        MASTER_ADDR=spec.master_addr, MASTER_PORT=str(spec.master_port),
    )  # fmt: skip
    # joining waits for every rank to start (seconds to import torch on a busy machine), so it gets
    # its own, longer deadline; after that every collective has spec.timeout
    store = dist.TCPStore(
        spec.master_addr, spec.master_port, spec.world_size, is_master=spec.rank == 0,
        timeout=timedelta(seconds=max(JOIN_TIMEOUT, spec.timeout)),
    )  # fmt: skip
    dist.init_process_group(
        backend, store=store, rank=spec.rank, world_size=spec.world_size, timeout=timedelta(seconds=spec.timeout)
    )
    logger.info("rank {}/{} joined the {} group on {}", spec.rank, spec.world_size, backend, device)


@dataclass(frozen=True)
class Rendezvous:
    """Where rank 0 waits for the other ranks, and whether it starts them (``local``) or they are started on
    their own hosts (``external``)."""

    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0: a free port of master_addr (local ranks only: external ones must be told it)
    launch: str = "local"

    @classmethod
    def from_env(cls) -> Rendezvous:
        """NIGHTCAP_SHARD_MASTER_ADDR, NIGHTCAP_SHARD_MASTER_PORT and NIGHTCAP_SHARD_LAUNCH (local, external)."""
        return cls.checked(
            os.environ.get("NIGHTCAP_SHARD_MASTER_ADDR") or "127.0.0.1",
            int(os.environ.get("NIGHTCAP_SHARD_MASTER_PORT") or 0),
            os.environ.get("NIGHTCAP_SHARD_LAUNCH") or "local",
        )

    @classmethod
    def checked(cls, master_addr: str, master_port: int, launch: str) -> Rendezvous:
        """`serve`'s --shard-master-addr, --shard-master-port and --shard-launch (or their environment variables)."""
        if launch not in ("local", "external"):
            raise ValueError(f"--shard-launch {launch!r}: local or external")
        if launch == "external" and not master_port:
            raise ValueError("--shard-launch external needs --shard-master-port: the ranks are told it")
        return cls(master_addr, master_port, launch)


def launch_ranks(
    world_size: int, port: int, rank_args: list[str], env: dict[str, str] | None = None, master_addr: str = "127.0.0.1"
):
    """Starts ranks 1..N-1 as child processes running ``services.generation shard`` with ``rank_args``."""
    children = []
    for rank in range(1, world_size):
        child_env = {
            **os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size), "MASTER_ADDR": master_addr, "MASTER_PORT": str(port),
        }  # fmt: skip
        command = [sys.executable, "-m", "services.generation", "shard", *rank_args]
        children.append(subprocess.Popen(command, env=child_env))
        logger.info("started rank {} (pid {})", rank, children[-1].pid)
    return children


def _broadcast(step: ModelStep | None) -> ModelStep:
    message = [step]
    dist.broadcast_object_list(message, src=0)
    return message[0]


class ShardedExecutor:
    """Rank 0's side: broadcasts each step, then runs it on its own shard. Called by the engine."""

    def __init__(self, runner: Runner, timeout: float, on_failure: Callable[[BaseException], None]) -> None:
        self.runner = runner
        self.timeout = timeout
        self.on_failure = on_failure
        self.failure: ShardFailure | None = None
        self._lock = threading.Lock()  # one collective at a time, in the same order on every rank
        self._last = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="shard-heartbeat", daemon=True)
        self._heartbeat.start()

    def __call__(self, step: ModelStep) -> torch.Tensor | None:
        with self._lock:
            if self.failure is not None:
                raise self.failure
            try:
                _broadcast(step)
                logits = execute_step(self.runner, step)
            except Exception as error:
                raise self._fail(error) from error
            self._last = time.monotonic()
            return logits

    def close(self) -> None:
        """Tells the other ranks to leave their loop (when they are still there)."""
        self._closed.set()
        with self._lock:
            if self.failure is None:
                try:
                    _broadcast(STOP)
                except Exception as error:  # they are gone already
                    logger.warning("could not tell the ranks to stop: {}", error)

    def _beat(self) -> None:
        interval = max(0.2, self.timeout / 4)
        while not self._closed.wait(interval):
            with self._lock:
                if self.failure is not None or self._closed.is_set():
                    return
                if time.monotonic() - self._last < interval:
                    continue
                try:
                    _broadcast(HEARTBEAT)
                    self._last = time.monotonic()
                except Exception as error:
                    self._fail(error)
                    return

    def _fail(self, error: BaseException) -> ShardFailure:
        if self.failure is None:
            self.failure = ShardFailure(
                f"a model shard failed ({type(error).__name__}: {error}); the sharded service is going down"
            )
            logger.error("{}", self.failure)
            self.on_failure(self.failure)
        return self.failure


def follow_rank0(runner: Runner) -> None:
    """Ranks 1..N-1: run every step rank 0 broadcasts until it says stop. Raises when rank 0 is gone
    (the broadcast fails or times out) or a step fails, so the process exits non-zero."""
    steps = 0
    while True:
        step = _broadcast(None)
        if step.stop:
            logger.info("rank {} stops after {} steps", dist.get_rank(), steps)
            return
        if step.step >= 0:
            execute_step(runner, step)
            steps += 1


class ShardGroup:
    """Rank 0's view of a sharded service: it starts the other ranks, joins their process group, drives
    them through a ``ShardedExecutor`` and takes them down with it."""

    def __init__(self, world_size: int, timeout: float, children: list[subprocess.Popen]) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self.children = children
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] = lambda _error: None
        self._executor: ShardedExecutor | None = None

    @classmethod
    def launch(
        cls,
        world_size: int,
        timeout: float,
        device: torch.device,
        rank_args: list[str],
        rendezvous: Rendezvous | None = None,
    ) -> ShardGroup:
        """Starts ranks 1..N-1 (unless they are external) and joins them as rank 0 (blocks until all have
        joined, or the join timeout). ``rendezvous``: default ``Rendezvous.from_env()``."""
        where = rendezvous or Rendezvous.from_env()
        port = where.master_port or free_port(where.master_addr)
        children = []
        if where.launch == "local":
            rank_args = [*rank_args, "--shard-timeout", str(timeout)]
            children = launch_ranks(world_size, port, rank_args, master_addr=where.master_addr)
        else:
            logger.info(
                "waiting for ranks 1..{} on {}:{} (started on their hosts)", world_size - 1, where.master_addr, port
            )
        group = cls(world_size, timeout, children)
        try:
            init_rank(ShardSpec(0, world_size, where.master_addr, port, timeout), shard_device(device, 0))
        except Exception:
            group.close()
            raise
        return group

    def executor(self, runner: Runner) -> ShardedExecutor:
        """Rank 0's ``execute`` for the engine: ``runner`` holds this rank's shard."""
        self._executor = ShardedExecutor(runner, self.timeout, self._failed)
        return self._executor

    def close(self, wait: float = 10.0) -> None:
        """Stops the other ranks: politely when they are healthy, by signal when not."""
        if self._executor is not None:
            self._executor.close()
        deadline = time.monotonic() + wait
        for child in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("rank pid {} did not stop; killing it", child.pid)
                child.kill()
                child.wait(5)

    def _failed(self, error: BaseException) -> None:
        self.failure = error
        self.on_failure(error)
