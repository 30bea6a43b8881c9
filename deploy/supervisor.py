"""The local stack's processes, kept by supervisord (PyPI ``supervisor``): it starts each service with its
log, restarts one that crashes (with backoff when it crashes again during start-up) and stops them all.

One supervisord per var dir: its config, socket and pid file live in ``var/run/``, its own log and each
service's log in ``var/logs/``. This module writes the config, starts supervisord, and talks to it over its
XML-RPC socket; restarts and the last exit of each service are read back from supervisord's log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from supervisor.xmlrpc import SupervisorTransport

from clients.client import NightcapError, check_health
from services.common.paths import VarLayout

LOG_TAIL_LINES = 30
# A service that exits within START_SECONDS of a start has failed to start: supervisord retries it after
# 1, 2, 3 ... s (START_RETRIES times) and then gives up (FATAL). One that exits later is restarted at once.
START_SECONDS = 5
START_RETRIES = 10
_EXITED = re.compile(r"^(\S+ \S+) \w+ exited: (\S+) \((.*); not expected\)$")
_STARTED = "supervisord started with pid"


@dataclass(frozen=True)
class ServiceSpec:
    """What to run for one service: the command serves grpc.health.v1 on ``address``."""

    name: str
    address: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)  # on top of the stack's own environment


@dataclass(frozen=True)
class ProcessState:
    """One service as supervisord sees it."""

    name: str
    state: str  # STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, EXITED, FATAL, UNKNOWN
    pid: int
    exit_status: int
    description: str


@dataclass(frozen=True)
class Exit:
    at: str  # supervisord's log timestamp
    how: str  # e.g. "terminated by SIGKILL", "exit status 1"


class StartupFailed(Exception):
    """A service exited or never reported SERVING; ``log_tail`` holds the end of its log from this start."""

    def __init__(self, name: str, reason: str, log_path: Path, log_tail: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name = name
        self.log_path = log_path
        self.log_tail = log_tail


class RunFolder:
    """Where the stack keeps logs, supervisord's files and its lock: ``var/logs`` and ``var/run``."""

    def __init__(self, layout: VarLayout) -> None:
        self.layout = layout

    def log_file(self, name: str) -> Path:
        return self.layout.logs / f"{name}.log"

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


class Supervisord:
    """The supervisord of one var dir."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.config = run.layout.run / "supervisord.conf"
        self.socket = run.layout.run / "supervisor.sock"
        self.pid_file = run.layout.run / "supervisord.pid"
        self.specs_file = run.layout.run / "services.json"
        self.log = run.layout.logs / "supervisord.log"

    # --- lifecycle

    def process(self) -> psutil.Process | None:
        """The running supervisord of this var dir, or None."""
        try:
            process = psutil.Process(int(self.pid_file.read_text().strip()))
            if process.status() == psutil.STATUS_ZOMBIE or str(self.config) not in process.cmdline():
                return None
            return process
        except (OSError, ValueError, psutil.Error):
            return None

    def start(self, specs: list[ServiceSpec], grace: float, env: dict[str, str]) -> None:
        """Writes the config for ``specs`` (none started yet) and starts supervisord in the background."""
        self.run.layout.logs.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self._config_text(specs, grace))
        self.specs_file.write_text(json.dumps([asdict(spec) for spec in specs], indent=2) + "\n")
        self.socket.unlink(missing_ok=True)
        supervisord = Path(sys.executable).parent / "supervisord"
        # supervisord forks into the background itself; this returns once it has
        subprocess.run([str(supervisord), "-c", str(self.config)], env=env, check=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError, xmlrpc.client.Fault):
                if self.rpc().supervisor.getState()["statename"] == "RUNNING":
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not come up within 15 s; see {self.log}")
            time.sleep(0.1)

    def specs(self) -> list[ServiceSpec]:
        """The services this supervisord was configured with."""
        try:
            return [ServiceSpec(**spec) for spec in json.loads(self.specs_file.read_text())]
        except (OSError, ValueError, TypeError):
            return []

    def shutdown(self, grace: float) -> list[str]:
        """Stops every service (SIGTERM to its process group, SIGKILL after ``grace``), then supervisord.
        Returns the command lines of processes that outlived it all (none, normally)."""
        supervisord = self.process()
        if supervisord is None:
            return []
        family = [supervisord, *supervisord.children(recursive=True)]
        with contextlib.suppress(OSError, xmlrpc.client.Fault):
            self.rpc().supervisor.stopAllProcesses(True)
        with contextlib.suppress(OSError, xmlrpc.client.Fault):
            self.rpc().supervisor.shutdown()
        alive = _wait_for_exit(family, grace + 5)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        survivors = _wait_for_exit(alive, 5)
        for path in (self.socket, self.pid_file):
            path.unlink(missing_ok=True)
        return [" ".join(p.cmdline()) for p in survivors if _is_running(p)]

    # --- services

    def rpc(self) -> xmlrpc.client.ServerProxy:
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def start_service(self, name: str) -> None:
        self.rpc().supervisor.startProcess(name, False)

    def states(self) -> dict[str, ProcessState]:
        return {
            info["name"]: ProcessState(
                info["name"], info["statename"], info["pid"], info["exitstatus"], info["description"]
            )
            for info in self.rpc().supervisor.getAllProcessInfo()
        }

    def exits(self) -> dict[str, list[Exit]]:
        """Unexpected exits of each service since this supervisord started (each one was restarted)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        since = max((n for n, line in enumerate(lines) if _STARTED in line), default=0)
        exits: dict[str, list[Exit]] = {}
        for line in lines[since:]:
            found = _EXITED.match(line)
            if found:
                exits.setdefault(found.group(2), []).append(Exit(found.group(1).split(",")[0], found.group(3)))
        return exits

    def _config_text(self, specs: list[ServiceSpec], grace: float) -> str:
        layout = self.run.layout
        sections = [
            f"[unix_http_server]\nfile={self.socket}\nchmod=0700\n",
            f"[supervisord]\nlogfile={self.log}\npidfile={self.pid_file}\ndirectory={Path.cwd()}\n"
            f"identifier=nightcap-{layout.root}\nlogfile_maxbytes=10MB\n",
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n",
            f"[supervisorctl]\nserverurl=unix://{self.socket}\n",
        ]
        for spec in specs:
            environment = ",".join(f'{key}="{value}"' for key, value in spec.env.items())
            sections.append(
                f"[program:{spec.name}]\n"
                f"command={shlex.join(spec.command).replace('%', '%%')}\n"
                f"autostart=false\nautorestart=unexpected\nexitcodes=0\n"
                f"startsecs={START_SECONDS}\nstartretries={START_RETRIES}\n"
                f"stopsignal=TERM\nstopwaitsecs={int(grace)}\nstopasgroup=true\nkillasgroup=true\n"
                f"redirect_stderr=true\nstdout_logfile={self.run.log_file(spec.name)}\n"
                "stdout_logfile_maxbytes=50MB\nstdout_logfile_backups=2\n"
                + (f"environment={environment}\n" if environment else "")
            )
        return "\n".join(sections)


def wait_until_serving(
    supervisord: Supervisord,
    specs: list[ServiceSpec],
    timeout: float,
    on_serving: Callable[[ServiceSpec, float], None],
    on_waiting: Callable[[list[ServiceSpec], float], None],
) -> None:
    """Polls each service's health until all report SERVING; raises StartupFailed as soon as one exits (a
    start-up failure is not retried here: its log says why) or when ``timeout`` seconds pass."""
    begin = time.monotonic()
    next_notice = begin + 15.0
    offsets = {spec.name: _size(supervisord.run.log_file(spec.name)) for spec in specs}
    exits_before = {name: len(found) for name, found in supervisord.exits().items()}
    pending = list(specs)
    while pending:
        states = supervisord.states()
        # a service that takes longer than START_SECONDS to fail (imports on a loaded machine) is restarted at
        # once and never shows BACKOFF: its exit in supervisord's log counts as a failed start too
        exits = supervisord.exits()
        for spec in list(pending):
            state = states[spec.name]
            new_exits = exits.get(spec.name, [])[exits_before.get(spec.name, 0) :]
            if state.state in ("BACKOFF", "EXITED", "FATAL") or new_exits:
                how = new_exits[-1].how if new_exits else f"exit status {state.exit_status}"
                code = how.removeprefix("exit status ")
                reason = f"exited with code {code}" if code != how else f"exited ({how})"
                raise _failure(supervisord, spec, f"{reason} during start-up", offsets)
            if health(spec.address) == "SERVING":
                pending.remove(spec)
                on_serving(spec, time.monotonic() - begin)
        if not pending:
            return
        now = time.monotonic()
        if now - begin > timeout:
            raise _failure(supervisord, pending[0], f"did not report SERVING within {timeout:.0f} s", offsets)
        if now >= next_notice:
            on_waiting(pending, now - begin)
            next_notice = now + 15.0
        time.sleep(0.5)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _failure(supervisord: Supervisord, spec: ServiceSpec, reason: str, offsets: dict[str, int]) -> StartupFailed:
    log_path = supervisord.run.log_file(spec.name)
    return StartupFailed(spec.name, reason, log_path, log_tail(log_path, offsets.get(spec.name, 0)))


def _is_running(process: psutil.Process) -> bool:
    # A zombie has exited; it lingers only until its parent (or init) reaps it.
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


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
    """SERVING / NOT_SERVING per grpc.health.v1, or the gRPC status of the failed check (UNAVAILABLE, ...).

    An ``http://`` address (the gateway) is asked ``GET /health``: 200 is SERVING, 503 NOT_SERVING."""
    if address.startswith(("http://", "https://")):
        return _http_health(address, timeout)
    try:
        return check_health(address, timeout=timeout)
    except NightcapError as error:
        return error.code.name


def _http_health(url: str, timeout: float) -> str:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as reply:
            return "SERVING" if reply.status == 200 else "NOT_SERVING"
    except urllib.error.HTTPError as error:
        return "NOT_SERVING" if error.code == 503 else f"HTTP_{error.code}"
    except (urllib.error.URLError, OSError):
        return "UNAVAILABLE"


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
    """None when ``address`` (host:port, or an http:// URL) can be bound now; otherwise who holds it."""
    host, _, port_text = address.split("://", 1)[-1].rpartition(":")
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
    """The stack's environment, with unbuffered Python output so logs are written as they happen."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}
