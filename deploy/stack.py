"""The local stack behind `make up`, `make down`, `make status` and `make chat`.

    python -m deploy.stack up       # prepare the default model and index, start all three, ask "Where is Zurich?"
    python -m deploy.stack status   # pid, address and health of each service; the model and the index
    python -m deploy.stack down     # SIGTERM, then SIGKILL after a grace period; nothing is left behind

`up` runs the prepare steps in the foreground (their progress bars show), then starts generation and
retrieval in the background, then the orchestrator once both are SERVING. Logs go to var/logs/<service>.log,
pid files to var/run/<service>.pid. It says what it reuses: the model, the index, services already running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from clients.client import ChatClient, NightcapError, SamplingParams
from deploy.supervisor import (
    PidRecord,
    RunFolder,
    ServiceSpec,
    StartedService,
    StartupFailed,
    address_taken_by,
    child_environment,
    health,
    live_process,
    start_service,
    stop_processes,
    wait_until_serving,
)
from nightcap.records import GENERATION_ADDRESS, ORCHESTRATOR_ADDRESS, RETRIEVAL_ADDRESS
from services.common.paths import VAR_ENV, VarLayout
from services.generation.registry import DEFAULT_MODEL, ModelRegistry
from services.retrieval.index import DEFAULT_INDEX_NAME as DEFAULT_INDEX
from services.retrieval.index import FORMAT_VERSION, MANIFEST_FILE

# The services' own defaults, repeated: importing them would load torch and slow every `status` and `down`.
DEFAULT_QUESTION = "Where is Zurich?"
BACKENDS = ("generation", "retrieval")
SERVICES = (*BACKENDS, "orchestrator")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])

VarDir = Annotated[Path, typer.Option(envvar=VAR_ENV, help="Runtime folder: model registry, indexes, logs, pid files.")]
OrchestratorAddress = Annotated[
    str,
    typer.Option(
        # NIGHTCAP_ADDRESS is where the client and chatctl look for the orchestrator.
        envvar=["NIGHTCAP_ORCHESTRATOR_ADDRESS", "NIGHTCAP_ADDRESS"],
        help="host:port the orchestrator (nightcap.v1.Chat) serves on.",
    ),
]
GenerationAddress = Annotated[
    str, typer.Option(envvar="NIGHTCAP_GENERATION_ADDRESS", help="host:port the generation service serves on.")
]
RetrievalAddress = Annotated[
    str, typer.Option(envvar="NIGHTCAP_RETRIEVAL_ADDRESS", help="host:port the retrieval service serves on.")
]
Grace = Annotated[
    float,
    typer.Option(envvar="NIGHTCAP_STOP_GRACE", help="Seconds a service gets to drain after SIGTERM before SIGKILL."),
]


def main() -> None:
    app()


@app.command()
def up(
    var_dir: VarDir = Path("var"),
    model: Annotated[
        str | None,
        typer.Option(
            envvar="NIGHTCAP_MODEL",
            help=f"Model to serve (registry name or HF folder); unset: prepare and serve {DEFAULT_MODEL}.",
        ),
    ] = None,
    index: Annotated[
        str | None,
        typer.Option(
            envvar="NIGHTCAP_RETRIEVAL_INDEX",
            help=f"Index to serve (name under var/indexes or a folder); unset: build and serve {DEFAULT_INDEX}.",
        ),
    ] = None,
    orchestrator_address: OrchestratorAddress = ORCHESTRATOR_ADDRESS,
    generation_address: GenerationAddress = GENERATION_ADDRESS,
    retrieval_address: RetrievalAddress = RETRIEVAL_ADDRESS,
    ask: Annotated[
        bool, typer.Option(envvar="NIGHTCAP_ASK", help="Ask the question once the stack is up (with retrieval).")
    ] = True,
    question: Annotated[str, typer.Option(envvar="NIGHTCAP_QUESTION", help="The question to ask.")] = (
        DEFAULT_QUESTION
    ),
    max_new_tokens: Annotated[
        int | None,
        typer.Option(envvar="NIGHTCAP_MAX_NEW_TOKENS", help="Answer length cap; unset: the server's default."),
    ] = None,
    start_timeout: Annotated[
        float,
        typer.Option(envvar="NIGHTCAP_START_TIMEOUT", help="Seconds each start phase may take to report SERVING."),
    ] = 180.0,
    grace: Grace = 15.0,
    log_level: Annotated[
        str, typer.Option(envvar="NIGHTCAP_LOG_LEVEL", help="Log level passed to the three services.")
    ] = "INFO",
) -> None:
    """Prepare the model and index, start the three services, wait until SERVING, ask the question."""
    layout = VarLayout.from_env(var_dir)
    run = RunFolder(layout)
    addresses = {
        "generation": generation_address,
        "retrieval": retrieval_address,
        "orchestrator": orchestrator_address,
    }
    if len(set(addresses.values())) < len(addresses):
        _fail(f"the three services need three different addresses, got {addresses}")
    specs = _service_specs(layout, addresses, model or DEFAULT_MODEL, index or DEFAULT_INDEX, log_level)

    with run.lock(on_wait=lambda: typer.echo("waiting for another deploy.stack command on this var dir ...")):
        running = _running_services(run, specs)
        if len(running) == len(SERVICES) and all(health(r.address) == "SERVING" for r in running.values()):
            typer.echo(f"nightcap is already up (var dir {layout.root}):")
            _print_service_table(run, addresses)
            return
        to_start = [specs[name] for name in SERVICES if name not in running]
        _refuse_taken_addresses(to_start)

        timings: list[str] = []
        names_to_start = {spec.name for spec in to_start}
        begin = time.monotonic()
        started: list[StartedService] = []
        try:
            # the prepare commands are no-ops once their output exists, but each costs seconds of imports:
            # look first, and leave the full checks to the services when they load
            if "generation" in names_to_start and model is None:
                versions = ModelRegistry(layout.models).versions(DEFAULT_MODEL)
                if versions:
                    typer.echo(f"default model: reusing {DEFAULT_MODEL}:{versions[-1]}")
                else:
                    _prepare("model", ["services.generation", "prepare-default"], layout, log_level)
            if "retrieval" in names_to_start and index is None:
                if _index_is_current(layout.indexes / DEFAULT_INDEX):
                    typer.echo(f"default index: reusing {layout.indexes / DEFAULT_INDEX}")
                else:
                    _prepare("index", ["services.retrieval", "build-default"], layout, log_level)
            timings.append(f"prepare {time.monotonic() - begin:.1f} s")
            for phase in (BACKENDS, ("orchestrator",)):
                phase_started = [start_service(s, run, child_environment()) for s in to_start if s.name in phase]
                started += phase_started
                typer.echo(
                    "waiting for "
                    + ", ".join(f"{name} ({addresses[name]})" for name in phase)
                    + f" to report SERVING (timeout {start_timeout:.0f} s) ..."
                )
                phase_begin = time.monotonic()
                _wait(phase_started, [running[n] for n in phase if n in running], start_timeout)
                timings.append(f"{'+'.join(phase)} healthy after {time.monotonic() - phase_begin:.1f} s")
        except StartupFailed as failure:
            typer.secho(f"\n{failure}. Last lines of {failure.log_path}:", fg="red", err=True)
            typer.echo(textwrap.indent(failure.log_tail or "(empty)", "  | "), err=True)
            _stop_started(run, started, grace)
            _fail(f"nightcap did not start: {failure}")
        except KeyboardInterrupt:
            typer.echo("\ninterrupted: stopping what this run started", err=True)
            _stop_started(run, started, grace)
            raise typer.Exit(130) from None

    typer.echo(f"nightcap is up in {time.monotonic() - begin:.1f} s ({'; '.join(timings)}):")
    _print_service_table(run, addresses)
    if ask:
        _ask(orchestrator_address, question, max_new_tokens)


@app.command()
def down(var_dir: VarDir = Path("var"), grace: Grace = 15.0) -> None:
    """Stop every service `up` started (SIGTERM, then SIGKILL after the grace period)."""
    run = RunFolder(VarLayout.from_env(var_dir))
    with run.lock(on_wait=lambda: typer.echo("waiting for another deploy.stack command on this var dir ...")):
        records = [record for name in SERVICES if (record := run.record(name)) is not None]
        if not records:
            typer.echo(f"nothing to stop (no pid files in {run.layout.run})")
            return
        outcome = stop_processes(records, grace)
        for record in records:
            typer.echo(f"{record.name:<13} {outcome[record.name].message}")
            run.forget(record.name)
    if any(result.survived for result in outcome.values()):
        _fail("some processes could not be stopped")


@app.command()
def status(
    var_dir: VarDir = Path("var"),
    orchestrator_address: OrchestratorAddress = ORCHESTRATOR_ADDRESS,
    generation_address: GenerationAddress = GENERATION_ADDRESS,
    retrieval_address: RetrievalAddress = RETRIEVAL_ADDRESS,
) -> None:
    """Pid, address and health of each service, and the model and index behind the orchestrator.

    Exits 0 when all three are SERVING, 1 otherwise. Addresses come from the pid files when there are."""
    run = RunFolder(VarLayout.from_env(var_dir))
    addresses = {
        "generation": generation_address,
        "retrieval": retrieval_address,
        "orchestrator": orchestrator_address,
    }
    healths = _print_service_table(run, addresses)
    record = run.record("orchestrator")
    orchestrator = record.address if record else orchestrator_address
    try:
        with ChatClient(orchestrator) as client:
            stack = client.status()
    except NightcapError as error:
        typer.echo(f"model, index: unknown ({error})")
    else:
        typer.echo(f"model: {_describe(stack.model, ['name', 'version', 'architecture', 'device'])}")
        typer.echo(f"index: {_describe(stack.index, ['passages', 'documents', 'embedder', 'index_path'])}")
    if any(h != "SERVING" for h in healths):
        raise typer.Exit(1)


def _service_specs(
    layout: VarLayout, addresses: dict[str, str], model: str, index: str, log_level: str
) -> dict[str, ServiceSpec]:
    var_dir = str(layout.root)
    arguments = {
        "generation": ["--model", model, "--var-dir", var_dir],
        "retrieval": ["--index", index, "--var-dir", var_dir],
        "orchestrator": ["--generation", addresses["generation"], "--retrieval", addresses["retrieval"]],
    }
    specs = {}
    for name in SERVICES:
        serve = [sys.executable, "-m", f"services.{name}", "serve", "--address", addresses[name]]
        specs[name] = ServiceSpec(name, addresses[name], [*serve, *arguments[name], "--log-level", log_level])
    return specs


def _running_services(run: RunFolder, specs: dict[str, ServiceSpec]) -> dict[str, PidRecord]:
    """Services of an earlier `up` that are still running, by name; stale pid files are removed. A running
    service started with other settings is an error: reusing it would serve something not asked for."""
    running: dict[str, PidRecord] = {}
    for name, spec in specs.items():
        record = run.record(name)
        if record is None:
            continue
        if live_process(record) is None:
            typer.echo(f"{name}: removing a stale pid file (pid {record.pid} has exited)")
            run.forget(name)
            continue
        if _settings(record.command) != _settings(spec.command):
            _fail(
                f"{name} is already running with other settings (pid {record.pid}):\n"
                f"  running: {' '.join(record.command[1:])}\n  asked:   {' '.join(spec.command[1:])}\n"
                "Run `python -m deploy.stack down` first."
            )
        running[name] = record
    return running


def _refuse_taken_addresses(specs: list[ServiceSpec]) -> None:
    for spec in specs:
        holder = address_taken_by(spec.address)
        if holder is not None:
            _fail(
                f"{spec.name}: {spec.address} is already in use by {holder}, which this stack did not start.\n"
                f"Stop it, or choose another address with --{spec.name}-address."
            )


def _settings(command: list[str]) -> list[str]:
    """The part of a service command that decides what it serves: not the interpreter, not the log level."""
    arguments = command[1:]
    if "--log-level" in arguments:
        at = arguments.index("--log-level")
        del arguments[at : at + 2]
    return arguments


def _index_is_current(folder: Path) -> bool:
    """A complete index in this code's format (its manifest copy says so); anything else, an older format
    included, goes to build-default, which rebuilds it."""
    try:
        return json.loads((folder / MANIFEST_FILE).read_text()).get("format") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def _prepare(what: str, module_command: list[str], layout: VarLayout, log_level: str) -> None:
    """Runs a prepare step in the foreground, its output (and progress bar) straight to the terminal."""
    command = [sys.executable, "-m", *module_command, "--var-dir", str(layout.root), "--log-level", log_level]
    typer.echo(f"preparing the default {what}: python {' '.join(command[1:])}")
    begin = time.monotonic()
    code = subprocess.run(command, env=child_environment(), check=False).returncode
    if code != 0:
        _fail(f"preparing the default {what} failed (exit code {code}); see the output above")
    typer.echo(f"default {what} ready in {time.monotonic() - begin:.1f} s")


def _wait(started: list[StartedService], reused: list[PidRecord], timeout: float) -> None:
    for record in reused:
        typer.echo(f"  {record.name:<13} reusing pid {record.pid}")

    def on_serving(service: StartedService, seconds: float) -> None:
        typer.echo(f"  {service.record.name:<13} SERVING after {seconds:.1f} s (pid {service.record.pid})")

    def on_waiting(pending: list[StartedService], seconds: float) -> None:
        for service in pending:
            typer.echo(f"  {service.record.name:<13} still loading ({seconds:.0f} s; log {service.record.log})")

    wait_until_serving(started, timeout, on_serving, on_waiting)
    for record in reused:
        # Reused services were SERVING or still loading from an earlier `up`; they get the same deadline.
        deadline = time.monotonic() + timeout
        while health(record.address) != "SERVING":
            if live_process(record) is None or time.monotonic() > deadline:
                _fail(f"{record.name} (pid {record.pid}) is running but not SERVING; see {record.log}")
            time.sleep(0.5)


def _stop_started(run: RunFolder, started: list[StartedService], grace: float) -> None:
    if not started:
        return
    outcome = stop_processes([s.record for s in started], grace)
    for service in started:
        typer.echo(f"  stopped {service.record.name}: {outcome[service.record.name].message}", err=True)
        run.forget(service.record.name)


def _print_service_table(run: RunFolder, addresses: dict[str, str]) -> list[str]:
    """One line per service: pid (from its pid file), address, health. Returns the healths in order."""
    healths = []
    typer.echo(f"  {'service':<13} {'pid':>8}  {'address':<22} health")
    for name in SERVICES:
        record = run.record(name)
        if record is None:
            pid = "-"
        elif live_process(record) is None:
            pid = f"{record.pid}?"  # the pid file is stale: that process is gone
        else:
            pid = str(record.pid)
        address = record.address if record else addresses[name]
        healths.append(health(address))
        typer.echo(f"  {name:<13} {pid:>8}  {address:<22} {healths[-1]}")
    return healths


def _ask(address: str, question: str, max_new_tokens: int | None) -> None:
    """Streams the answer to ``question`` (with retrieval), then its first source passage."""
    typer.echo(f"\n> {question}")

    def show(text: str) -> None:
        typer.echo(text, nl=False)
        sys.stdout.flush()

    try:
        with ChatClient(address) as client:
            reply = client.ask(
                question, on_text=show, retrieval=True, params=SamplingParams(max_new_tokens=max_new_tokens)
            )
    except NightcapError as error:
        _fail(f"\nthe stack is up, but the question failed: {error}")
    sources, finished = reply.started.sources, reply.finished
    typer.echo()
    if sources:
        first = sources[0]
        typer.echo(f"Source: {first.title} ({first.source})")
        typer.echo(f"  {textwrap.shorten(first.text, width=240, placeholder=' ...')}")
    else:
        typer.echo(f"Source: none ({finished.notice or 'no passage was retrieved'})")


def _describe(fields: dict | None, keys: list[str]) -> str:
    if fields is None:
        return "unavailable"
    return ", ".join(f"{key} {fields[key]}" for key in keys if fields.get(key) not in (None, "")) or "(empty)"


def _fail(message: str) -> NoReturn:
    typer.secho(message, fg="red", err=True)
    raise typer.Exit(1)


if __name__ == "__main__":
    main()
