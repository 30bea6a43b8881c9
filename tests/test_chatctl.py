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


def test_ask_names_the_sources_the_answer_cited_and_the_index_build_once(cited_orchestrator_address):
    result = chatctl("ask", "Where is Zurich?", "--retrieval", "--address", cited_orchestrator_address)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Switzerland [2]." in out
    assert "cited: [2] Zurich\n" in out
    assert "[2] Zurich (https://en.wikipedia.org/wiki/Zurich, score 0.83) — cited" in out
    assert "[1] Geneva (https://en.wikipedia.org/wiki/Geneva, score 0.61)\n" in out  # not cited: no mark
    assert out.count("4,000 of 10,033 documents") == 1  # the orchestrator's notice says it too: shown once
    assert "[the index is still building: 4,000 of 10,033 documents indexed]" in out
    reply = json.loads(chatctl("ask", "Where?", "--json", "--address", cited_orchestrator_address).stdout)
    assert reply["cited"] == [2] and reply["cited_ids"] == ["zurich#0"]
    assert reply["index_build"]["state"] == "building" and reply["index_build"]["documents_total"] == 10033


def test_the_shell_marks_cited_sources_and_tells_the_index_build_only_once(cited_orchestrator_address):
    script = "Where is Zurich?\n/sources\nAnd Geneva?\n/quit\n"
    result = chatctl("chat", "--retrieval", "--address", cited_orchestrator_address, stdin=script)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("cited: [2] Zurich") == 2  # after each answer
    assert "[2] Zurich (https://en.wikipedia.org/wiki/Zurich, score 0.83) — cited" in out
    assert out.count("the index is still b") == 1


def test_an_answer_that_cites_nothing_shows_no_cited_line(orchestrator_address):
    result = chatctl("ask", "Where is Zurich?", "--retrieval", "--max-tokens", "4", "--address", orchestrator_address)
    assert result.returncode == 0, result.stderr
    assert "cited:" not in result.stdout and "— cited" not in result.stdout


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


def test_an_unset_temperature_is_greedy_answering_from_the_index_and_0_6_otherwise():
    from clients.chatctl import Settings

    grounded = Settings(max_tokens=8, temperature=None, top_k=40, top_p=1.0, retrieval=True, k=3)
    assert grounded.params().temperature == 0.0
    grounded.retrieval = False
    assert grounded.params().temperature == 0.6
    grounded.temperature = 0.9  # set by --temperature or /hyperparameters: it wins either way
    assert grounded.params().temperature == 0.9
    grounded.retrieval = True
    assert grounded.params().temperature == 0.9
