"""Background processes of the local stack: start one with a log and a pid file, find it again, stop it.

A pid file (``var/run/<service>.pid``) is JSON: pid, address, command, create time and log path. A pid is
only ever signalled while the process behind it still has the recorded create time and command line, so a
pid the kernel has reused for something else is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import psutil

from clients.client import NightcapError, check_health
from services.common.paths import VarLayout

LOG_TAIL_LINES = 30


@dataclass(frozen=True)
class ServiceSpec:
    """What to run for one service: the command serves grpc.health.v1 on ``address``."""

    name: str
    address: str
    command: list[str]


@dataclass(frozen=True)
class PidRecord:
    """The pid file of a service this supervisor started."""

    name: str
    pid: int
    address: str
    command: list[str]
    create_time: float
    log: str
    started_at: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> PidRecord | None:
        """The record in ``path``; None when there is none or it cannot be read (treated as stale)."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


@dataclass
class StartedService:
    """A service started by this run: its record, its Popen and where its log began."""

    record: PidRecord
    popen: subprocess.Popen
    log_offset: int


class StartupFailed(Exception):
    """A service exited or never reported SERVING; ``log_tail`` holds the end of its log from this start."""

    def __init__(self, name: str, reason: str, log_path: Path, log_tail: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name = name
        self.log_path = log_path
        self.log_tail = log_tail


class RunFolder:
    """Where the supervisor keeps logs, pid files and its lock: ``var/logs`` and ``var/run``."""

    def __init__(self, layout: VarLayout) -> None:
        self.layout = layout

    def pid_file(self, name: str) -> Path:
        return self.layout.run / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.layout.logs / f"{name}.log"

    def record(self, name: str) -> PidRecord | None:
        return PidRecord.load(self.pid_file(name))

    def forget(self, name: str) -> None:
        self.pid_file(name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, on_wait: Callable[[], None]) -> Iterator[None]:
        """Serialises up/down/... on one var dir; ``on_wait`` runs once if another holder is there."""
        self.layout.run.mkdir(parents=True, exist_ok=True)
        with open(self.layout.run / "stack.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait()
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield


def live_process(record: PidRecord) -> psutil.Process | None:
    """The process a record describes, if it is still running; None if it exited or its pid was reused."""
    try:
        process = psutil.Process(record.pid)
        if abs(process.create_time() - record.create_time) > 0.01 or process.cmdline() != record.command:
            return None
        return process if _is_running(process) else None
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _is_running(process: psutil.Process) -> bool:
    # A zombie has exited; it lingers only until its parent (or init) reaps it.
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_service(spec: ServiceSpec, run: RunFolder, env: dict[str, str]) -> StartedService:
    """Starts ``spec`` in its own session (Ctrl-C in the terminal does not reach it), output appended to
    its log, and writes its pid file."""
    log_path = run.log_file(spec.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now().astimezone().isoformat(timespec="seconds")
    with open(log_path, "ab") as log:
        log.write(f"\n=== {started_at} deploy.stack: {shlex.join(spec.command)}\n".encode())
        log.flush()
        offset = log.tell()
        popen = subprocess.Popen(
            spec.command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    record = PidRecord(
        name=spec.name,
        pid=popen.pid,
        address=spec.address,
        command=spec.command,
        create_time=psutil.Process(popen.pid).create_time(),
        log=str(log_path),
        started_at=started_at,
    )
    record.save(run.pid_file(spec.name))
    return StartedService(record=record, popen=popen, log_offset=offset)


@dataclass(frozen=True)
class StopOutcome:
    message: str  # how it ended, e.g. "pid 123 stopped in 0.4 s"
    survived: bool = False  # something of it outlived SIGKILL (a process stuck in the kernel)


def stop_processes(records: list[PidRecord], grace: float) -> dict[str, StopOutcome]:
    """SIGTERM each recorded process (it drains and stops its own workers), SIGKILL whatever of it and its
    descendants is left after ``grace`` seconds. Returns how each one ended, by service name."""
    outcome: dict[str, StopOutcome] = {}
    families: dict[str, list[psutil.Process]] = {}
    for record in records:
        process = live_process(record)
        if process is None:
            outcome[record.name] = StopOutcome(
                f"pid {record.pid} now belongs to another process: left alone"
                if psutil.pid_exists(record.pid) and not _is_zombie(record.pid)
                else f"pid {record.pid} had already exited"
            )
            continue
        try:
            families[record.name] = [process, *process.children(recursive=True)]
            process.terminate()
        except psutil.NoSuchProcess:
            outcome[record.name] = StopOutcome(f"pid {record.pid} exited by itself")
    started = time.monotonic()
    left = _wait_for_exit([p for family in families.values() for p in family], grace)
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    survivors = set(_wait_for_exit(left, 5.0))
    for record in records:
        family = families.get(record.name)
        if family is None or record.name in outcome:
            continue
        if any(p in survivors for p in family):
            outcome[record.name] = StopOutcome(f"pid {record.pid} survived SIGKILL", survived=True)
        elif any(p in left for p in family):
            outcome[record.name] = StopOutcome(f"pid {record.pid} killed after {grace:.0f} s grace")
        else:
            outcome[record.name] = StopOutcome(f"pid {record.pid} stopped in {time.monotonic() - started:.1f} s")
    return outcome


def _wait_for_exit(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    alive = processes
    while True:
        alive = [p for p in alive if _is_running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def health(address: str, timeout: float = 2.0) -> str:
    """SERVING / NOT_SERVING per grpc.health.v1, or the gRPC status of the failed check (UNAVAILABLE, ...)."""
    try:
        return check_health(address, timeout=timeout)
    except NightcapError as error:
        return error.code.name


def wait_until_serving(
    started: list[StartedService],
    timeout: float,
    on_serving: Callable[[StartedService, float], None],
    on_waiting: Callable[[list[StartedService], float], None],
) -> None:
    """Polls each service's health until all report SERVING; raises StartupFailed as soon as one exits or
    when ``timeout`` seconds pass. ``on_waiting`` is called about every 15 s with those still pending."""
    begin = time.monotonic()
    next_notice = begin + 15.0
    pending = list(started)
    while pending:
        for service in list(pending):
            code = service.popen.poll()
            if code is not None:
                raise _failure(service, f"exited with code {code} during start-up")
            if health(service.record.address) == "SERVING":
                pending.remove(service)
                on_serving(service, time.monotonic() - begin)
        if not pending:
            return
        now = time.monotonic()
        if now - begin > timeout:
            raise _failure(pending[0], f"did not report SERVING within {timeout:.0f} s")
        if now >= next_notice:
            on_waiting(pending, now - begin)
            next_notice = now + 15.0
        time.sleep(0.5)


def _failure(service: StartedService, reason: str) -> StartupFailed:
    log_path = Path(service.record.log)
    return StartupFailed(service.record.name, reason, log_path, log_tail(log_path, service.log_offset))


def log_tail(path: Path, offset: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``path`` written after byte ``offset``."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def address_taken_by(address: str) -> str | None:
    """None when ``address`` can be bound now; otherwise who holds it, as well as can be told."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    port = int(port_text)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # gRPC binds with SO_REUSEADDR too, so connections of a stopped server in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "0.0.0.0", port))
            return None
        except OSError as error:
            return _listener_of(port) or str(error)


def _listener_of(port: int) -> str | None:
    try:
        connections = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
            try:
                return f"pid {connection.pid} ({shlex.join(psutil.Process(connection.pid).cmdline())})"
            except psutil.Error:
                return f"pid {connection.pid}"
    return None


def child_environment() -> dict[str, str]:
    """The supervisor's environment, with unbuffered Python output so logs are written as they happen."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}
