"""The local stack (`make up` / `make status` / `make down`), run as a user runs it: a subprocess that has
supervisord start the three real services in the background, here on free ports with a tiny model and a
small index, and a var dir of the test's own."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from deploy.supervisor import RunFolder, Supervisord
from services.common.paths import VarLayout

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("generation", "retrieval", "orchestrator", "gateway")
STACK_TIMEOUT_S = 300


@dataclass
class LocalStack:
    var_dir: Path
    addresses: dict[str, str]

    def run(self, command: str, *options: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``python -m deploy.stack <command>`` against this var dir and these addresses (``env``: more
        variables, which reach the services too)."""
        shared = ["--var-dir", str(self.var_dir)]
        if command != "down":
            shared += [f"--{name}-address={address}" for name, address in self.addresses.items()]
        return subprocess.run(
            [sys.executable, "-m", "deploy.stack", command, *shared, *options],
            cwd=REPO_ROOT,
            # any free port for the metrics endpoint, so a stack the user has up does not collide
            env={**os.environ, "NIGHTCAP_METRICS_ADDRESS": "127.0.0.1:0", **(env or {})},
            capture_output=True,
            text=True,
            timeout=STACK_TIMEOUT_S,
        )

    @property
    def supervisord(self) -> Supervisord:
        return Supervisord(RunFolder(VarLayout(self.var_dir.resolve())))

    def recorded_pids(self) -> dict[str, int]:
        """Service name -> pid, as supervisord has them; {} when no supervisord runs for this var dir."""
        if self.supervisord.process() is None:
            return {}
        return {name: state.pid for name, state in self.supervisord.states().items() if state.pid}

    def processes_serving_its_addresses(self) -> list[str]:
        """Command lines of live processes started for one of this stack's addresses (none after `down`)."""
        found = []
        for process in psutil.process_iter(["cmdline", "status"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if process.info["status"] != psutil.STATUS_ZOMBIE and any(a in cmdline for a in self.addresses.values()):
                found.append(cmdline)
        return found


def _free_addresses(count: int) -> list[str]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))  # held together, so the ports differ
        return [f"127.0.0.1:{probe.getsockname()[1]}" for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    local = LocalStack(tmp_path / "var", dict(zip(SERVICES, _free_addresses(len(SERVICES)), strict=True)))
    try:
        yield local
    finally:
        local.run("down", "--grace", "5")


@pytest.fixture
def small_index_folder(small_index: tuple[Path, str]) -> Path:
    var_dir, name = small_index
    return var_dir / "indexes" / name


def test_up_serves_all_three_answers_and_down_leaves_no_process_behind(
    stack: LocalStack, tiny_model_dir: Path, small_index_folder: Path
) -> None:
    up_options = ["--model", str(tiny_model_dir), "--index", str(small_index_folder), "--max-new-tokens", "8"]

    up = stack.run("up", *up_options)
    assert up.returncode == 0, _output(up)
    assert "> Where is Zurich?" in up.stdout
    assert "Source: " in up.stdout
    pids = stack.recorded_pids()
    assert sorted(pids) == sorted(SERVICES)
    assert (stack.var_dir / "logs" / "generation.log").stat().st_size > 0

    status = stack.run("status")
    assert status.returncode == 0, _output(status)
    for name, address in stack.addresses.items():
        line = rf"{name}\s+(RUNNING|STARTING)\s+{pids[name]}\s+(http://)?{re.escape(address)}\s+SERVING\s+0\s+-"
        assert re.search(line, status.stdout), status.stdout
    assert "model: name " in status.stdout
    assert "index: passages " in status.stdout
    gateway = f"http://{stack.addresses['gateway']}"
    assert f"web chat: {gateway}" in up.stdout
    answer = httpx.post(
        f"{gateway}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=60
    )
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in ("stop", "length")

    again = stack.run("up", *up_options)
    assert again.returncode == 0, _output(again)
    assert "already up" in again.stdout
    assert stack.recorded_pids() == pids
    supervisord = stack.supervisord.process()

    down = stack.run("down")
    assert down.returncode == 0, _output(down)
    assert [name for name, pid in pids.items() if _is_alive(pid)] == []
    assert stack.recorded_pids() == {}
    assert stack.processes_serving_its_addresses() == []
    assert not _is_alive(supervisord.pid)

    after = stack.run("status")
    assert after.returncode == 1
    assert not re.search(r"\bSERVING", after.stdout), after.stdout


def test_a_first_up_answers_while_retrieval_builds_the_default_index_and_times_both(
    stack: LocalStack, tiny_model_dir: Path
) -> None:
    # a slice of the default corpus, a few documents per commit; both reach retrieval through the environment
    build = {"NIGHTCAP_INDEX_BUILD_LIMIT": "30", "NIGHTCAP_INDEX_BUILD_COMMIT_DOCUMENTS": "6"}
    started = time.time() - 100  # as if `make up` had begun with 100 s of setup
    options = ["--model", str(tiny_model_dir), "--max-new-tokens", "8", "--started-at", str(started)]

    up = stack.run("up", *options, env=build)

    assert up.returncode == 0, _output(up)
    assert "preparing the default index" not in up.stdout  # no build before the services start
    assert "in the background" in up.stdout
    assert "index complete (30 documents)" in up.stdout
    assert "> Where is Zurich?" in up.stdout and "Source: " in up.stdout
    timing = re.search(r"first_answer_s (\d+\.\d), index_complete_s (\d+\.\d)", up.stdout)
    assert timing, up.stdout
    assert all(float(seconds) > 100 for seconds in timing.groups())  # measured from --started-at
    recorded = json.loads((stack.var_dir / "run" / "up-timing.json").read_text())
    assert (recorded["first_answer_s"], recorded["index_complete_s"]) == tuple(map(float, timing.groups()))
    retrieval = next(spec for spec in stack.supervisord.specs() if spec.name == "retrieval")
    assert "--build-default --build-limit 30" in " ".join(retrieval.command)

    status = stack.run("status")
    assert status.returncode == 0, _output(status)
    assert "index complete (30 documents)" in status.stdout
    chatctl = subprocess.run(
        [str(Path(sys.executable).parent / "chatctl"), "status", "--address", stack.addresses["orchestrator"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "index complete (30 documents)" in chatctl.stdout, chatctl.stdout + chatctl.stderr
    again = stack.run("up", *options, "--no-ask", env=build)
    assert again.returncode == 0, _output(again)
    assert "already up" in again.stdout and "index complete (30 documents)" in again.stdout


def test_a_service_that_fails_to_start_fails_up_with_its_log_and_leaves_nothing_running(
    stack: LocalStack, small_index_folder: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"

    up = stack.run("up", "--model", str(missing), "--index", str(small_index_folder), "--no-ask")

    assert up.returncode != 0, _output(up)
    assert "generation exited with code" in up.stderr, _output(up)
    assert "Last lines of" in up.stderr
    assert str(missing) in up.stderr.split("Last lines of", 1)[1]  # the service's own error, from its log
    assert stack.recorded_pids() == {}
    assert stack.processes_serving_its_addresses() == []


def _wait_for_restart(stack: LocalStack, name: str, old_pid: int, timeout: float = 120) -> str:
    """`status` output once ``name`` runs again under a new pid and is SERVING."""
    deadline = time.monotonic() + timeout
    while True:
        status = stack.run("status")
        pid = stack.recorded_pids().get(name)
        if pid and pid != old_pid and re.search(rf"{name}\s+(RUNNING|STARTING)\s+{pid}\s+\S+\s+SERVING", status.stdout):
            return status.stdout
        assert time.monotonic() < deadline, f"{name} did not come back within {timeout} s:\n{status.stdout}"
        time.sleep(1)


def test_a_killed_service_is_restarted_counted_and_usable_at_once(
    stack: LocalStack, tiny_model_dir: Path, small_index_folder: Path
) -> None:
    up_options = ["--model", str(tiny_model_dir), "--index", str(small_index_folder), "--max-new-tokens", "4"]
    up = stack.run("up", *up_options, "--no-ask")
    assert up.returncode == 0, _output(up)

    for name in ("generation", "retrieval"):
        old_pid = stack.recorded_pids()[name]
        os.kill(old_pid, signal.SIGKILL)
        status = _wait_for_restart(stack, name, old_pid)
        assert re.search(rf"{name}\s+(RUNNING|STARTING).*SERVING\s+1\s+terminated by SIGKILL at ", status), status
        # `make up`'s own question, as soon as the restarted service reports SERVING
        again = stack.run("up", *up_options)
        assert again.returncode == 0, _output(again)
        assert "Source: none" not in again.stdout and "Source: " in again.stdout, again.stdout

    down = stack.run("down")
    assert down.returncode == 0, _output(down)
    assert stack.processes_serving_its_addresses() == []


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python missing: make llamacpp")
def test_up_serves_the_default_model_from_its_gguf_in_llama_cpp_without_being_asked(
    stack: LocalStack, small_index_folder: Path
) -> None:
    up = stack.run("up", "--index", str(small_index_folder), "--max-new-tokens", "24")
    assert up.returncode == 0, _output(up)
    assert "> Where is Zurich?" in up.stdout and "Source: Zurich" in up.stdout
    assert "installing llama-cpp-python" not in up.stdout  # installed already: nothing is built, nothing restarts
    log = (stack.var_dir / "logs" / "generation.log").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf into llama.cpp" in log and "llama.cpp context for" in log
    assert "Q4_1 on cpu, the llamacpp runner" in log


def test_a_failed_llama_cpp_install_leaves_up_on_transformers_with_one_line_saying_how_to_fix_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from deploy import stack as deploy_stack

    monkeypatch.setattr(deploy_stack, "missing_compiler", lambda: "no C or C++ compiler on PATH")
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    failed.wait()  # done before `up` looks: no "waiting for ..." line
    build = deploy_stack.LlamaCppBuild(failed, tmp_path / "llamacpp" / "install.log", time.monotonic())
    timing = deploy_stack.UpTiming(time.time())
    # a failed install touches no service: supervisord is never asked to restart generation
    deploy_stack._serve_on_llamacpp_once_built(build, None, {}, 1.0, timing, VarLayout(tmp_path))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "llama.cpp runner unavailable" in lines[0] and "no C or C++ compiler on PATH" in lines[0]
    assert "apt-get install build-essential" in lines[0] and "`make llamacpp`" in lines[0]
    assert "stays on the transformers runner" in lines[0]
    assert timing.llamacpp_serving_s is None


def test_a_finished_llama_cpp_install_restarts_every_generation_replica_and_times_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from deploy import stack as deploy_stack

    calls: list[str] = []

    class Supervisor:
        def stopProcess(self, name: str, wait: bool) -> None:  # supervisord XML-RPC name
            calls.append(f"stop {name}")

    class FakeSupervisord:
        def rpc(self):
            return type("Proxy", (), {"supervisor": Supervisor()})()

        def start_service(self, name: str) -> None:
            calls.append(f"start {name}")

    monkeypatch.setattr(deploy_stack, "_wait", lambda _s, started, _r, _t: calls.append(f"wait {len(started)}"))
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    build = deploy_stack.LlamaCppBuild(done, tmp_path / "llamacpp" / "install.log", time.monotonic())
    addresses = deploy_stack._addresses("127.0.0.1:1", "127.0.0.1:50051", "127.0.0.1:3", "127.0.0.1:4", 2)
    specs = deploy_stack._service_specs(VarLayout(tmp_path), addresses, "smollm2", "wiki", "INFO")
    assert all("--runner auto" in " ".join(specs[name].command) for name in ("generation", "generation-2"))
    timing = deploy_stack.UpTiming(time.time() - 5)
    deploy_stack._serve_on_llamacpp_once_built(build, FakeSupervisord(), specs, 1.0, timing, VarLayout(tmp_path))
    assert calls == ["stop generation", "start generation", "stop generation-2", "start generation-2", "wait 2"]
    assert "restarting generation, generation-2 on the llama.cpp runner" in capsys.readouterr().out
    assert timing.llamacpp_serving_s is not None and timing.llamacpp_serving_s >= 5
    recorded = json.loads((tmp_path / "run" / "up-timing.json").read_text())
    assert recorded["llamacpp_serving_s"] == timing.llamacpp_serving_s
