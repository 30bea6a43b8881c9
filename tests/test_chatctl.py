"""chatctl as a user runs it: a subprocess talking to the real stack."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import typer

from services.common.server import free_port


def chatctl(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.chatctl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ask_json_answers_with_the_zurich_source(orchestrator_address):
    result = chatctl(
        "ask", "Where is Zurich?", "--retrieval", "-k", "2", "--json", "--temperature", "0", "--max-tokens", "8",
        "--address", orchestrator_address,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["sources"][0]["title"] == "Zurich"
    assert reply["context_used"] is True
    assert reply["completion_tokens"] > 0
    assert reply["finish_reason"] in {"length", "eos", "stop_sequence"}


def test_ask_prints_the_answer_then_its_sources(orchestrator_address):
    result = chatctl(
        "ask", "Where is Zurich?", "--retrieval", "-k", "1", "--max-tokens", "4", "--address", orchestrator_address
    )
    assert result.returncode == 0, result.stderr
    assert "[1] Zurich (https://en.wikipedia.org/wiki/Zurich" in result.stdout


def test_status_shows_every_service_serving(orchestrator_address):
    result = chatctl("status", "--address", orchestrator_address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("orchestrator", "generation", "retrieval"):
        assert any(line.startswith(name) and line.endswith("SERVING") for line in lines), result.stdout
    assert "GPTNeoXForCausalLM" in result.stdout
    assert "passages from" in result.stdout


def test_an_address_that_does_not_answer_is_a_clear_error_not_a_traceback():
    dead = f"127.0.0.1:{free_port()}"
    for args in (["status"], ["ask", "Hi", "--timeout", "10"], ["chat", "--timeout", "10"]):
        result = chatctl(*args, "--address", dead)
        assert result.returncode == 1
        assert "UNAVAILABLE" in result.stderr and dead in result.stderr
        assert "Traceback" not in result.stderr


def test_bad_parameters_are_reported_with_their_status(orchestrator_address):
    result = chatctl("ask", "Hi", "--top-p", "2", "--address", orchestrator_address)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT: top_p must be in (0, 1]" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_shell_keeps_a_conversation_and_its_commands_work(orchestrator_address):
    script = "\n".join(
        [
            "/hyperparameters temperature=0 max_tokens=6",
            "Hello.",
            "/raw_prompt",
            "/sources",
            "/retrieval on",
            "Where is Zurich?",
            "/sources",
            "/raw_prompt",
            "/reset",
            "/raw_prompt",
            "/nonsense",
            "/quit",
        ]
    )
    result = chatctl("chat", "--address", orchestrator_address, "--no-stream", stdin=script + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Welcome to the nightcap shell.")
    assert "temperature: 0.0" in out and "max_tokens: 6" in out
    assert "<human>: Hello.\n<bot>:" in out
    assert "(no sources: retrieval was off or found nothing)" in out
    assert "retrieval on" in out
    assert "[1] Zurich (https://en.wikipedia.org/wiki/Zurich" in out
    # the second prompt carries the first turn as history
    assert "<human>: Hello.\n<bot>: " in out.split("[1] Zurich")[1]
    assert "conversation reset" in out
    assert "(nothing sent yet)" in out
    assert "unknown command /nonsense" in out


def commands_of(group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """Every command under a (typer-built click) group, sub-groups included, by its path of names."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands_of(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_flag_of_every_command_is_explained_in_its_help():
    from clients.chatctl import app

    commands = dict(commands_of(typer.main.get_command(app)))
    assert {("chat",), ("ask",), ("status",), ("index", "add"), ("index", "search")} <= set(commands)
    for path, command in commands.items():
        result = chatctl(*path, "--help")
        assert result.returncode == 0, result.stderr
        shown = " ".join(result.stdout.replace("│", " ").split())  # rich wraps help over lines inside boxes
        for parameter in command.params:
            if parameter.param_type_name == "option" and parameter.name != "help":
                assert parameter.help, f"chatctl {' '.join(path)} {parameter.opts[0]} has no help text"
                for flag in parameter.opts:
                    assert flag in shown, f"chatctl {' '.join(path)} --help does not show {flag}"
                assert " ".join(parameter.help.split()[:3]) in shown, f"{parameter.opts[0]}'s help is not shown"
