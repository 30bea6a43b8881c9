"""The local stack behind `make up`, `make down`, `make status` and `make chat`.

    python -m deploy.stack up       # prepare the default model and index, start all three, ask "Where is Zurich?"
    python -m deploy.stack status   # pid, address and health of each service; the model and the index
    python -m deploy.stack down     # SIGTERM, then SIGKILL after a grace period; nothing is left behind

`up` runs the prepare steps in the foreground (their progress bars show), then has supervisord start
generation (``--generation-replicas N``: N processes) and retrieval, then the orchestrator once they are
SERVING. supervisord restarts a service that crashes; `status` shows its restarts and last exit. Logs go to
var/logs/<service>.log, supervisord's files to var/run/. It says what it reuses: the model, the index, a
stack already up.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
import xmlrpc.client
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from clients.client import ChatClient, NightcapError, SamplingParams
from deploy.supervisor import (
    RunFolder,
    ServiceSpec,
    StartupFailed,
    Supervisord,
    address_taken_by,
    child_environment,
    health,
    wait_until_serving,
)
from nightcap.records import GATEWAY_ADDRESS, GENERATION_ADDRESS, ORCHESTRATOR_ADDRESS, RETRIEVAL_ADDRESS
from services.common.paths import VAR_ENV, VarLayout
from services.common.registry import DEFAULT_MODEL, ModelRegistry
from services.retrieval.index import DEFAULT_INDEX_NAME as DEFAULT_INDEX
from services.retrieval.index import FORMAT_VERSION, MANIFEST_FILE

# glibc's malloc gives each thread that allocates its own arena (up to 8 x cores) and, after a large free,
# raises its mmap threshold so later large tensors come from those arenas and stay resident. Two arenas and a
# fixed 1 MiB threshold bound generation's RSS: SmolLM2-135M after rounds of 32 concurrent requests held
# 1773 MB with glibc's defaults and 1052 MB with these, flat from round to round in both (a high-water mark,
# not a leak; tests/bench/generation_rss.py, 2 shared CPU cores, round times within the noise).
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(1024 * 1024)}
# The services' own defaults, repeated: importing them would load torch and slow every `status` and `down`.
DEFAULT_QUESTION = "Where is Zurich?"
# Started once the backends are SERVING: they call the backends, nothing calls them.
FRONTS = ("orchestrator", "gateway")

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
GatewayAddress = Annotated[
    str,
    typer.Option(
        envvar="NIGHTCAP_GATEWAY_ADDRESS",
        help="host:port the HTTP gateway (OpenAI-compatible API and web chat page) serves on.",
    ),
]
Grace = Annotated[
    float,
    typer.Option(envvar="NIGHTCAP_STOP_GRACE", help="Seconds a service gets to drain after SIGTERM before SIGKILL."),
]


def main() -> None:
    app()


Replicas = Annotated[
    int,
    typer.Option(
        envvar=["GENERATION_REPLICAS", "NIGHTCAP_GENERATION_REPLICAS"],
        min=1,
        help="Generation processes; replica i > 0 listens on the generation port + 10 i, and the orchestrator"
        " spreads chats over all of them (gRPC round_robin with health checks).",
    ),
]


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
    gateway_address: GatewayAddress = GATEWAY_ADDRESS,
    generation_replicas: Replicas = 1,
    runner: Annotated[
        str,
        typer.Option(
            envvar="NIGHTCAP_RUNNER",
            help="What runs the model: transformers, or llamacpp (the GGUF in llama.cpp; `make llamacpp` installs it).",
        ),
    ] = "transformers",
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
    """Prepare the model and index, start the services under supervisord, wait until SERVING, ask."""
    layout = VarLayout.from_env(var_dir)
    run = RunFolder(layout)
    addresses = _addresses(
        orchestrator_address, generation_address, retrieval_address, gateway_address, generation_replicas
    )
    if len(set(addresses.values())) < len(addresses):
        _fail(f"the services need different addresses, got {addresses}")
    specs = _service_specs(layout, addresses, model or DEFAULT_MODEL, index or DEFAULT_INDEX, log_level, runner)
    supervisord = Supervisord(run)

    with run.lock(on_wait=lambda: typer.echo("waiting for another deploy.stack command on this var dir ...")):
        started_supervisord = False
        if supervisord.process() is not None:
            _refuse_other_settings(supervisord, specs)
            states = supervisord.states()
            running = {name for name, state in states.items() if state.state in ("RUNNING", "STARTING")}
            if len(running) == len(specs) and all(health(spec.address) == "SERVING" for spec in specs.values()):
                typer.echo(f"nightcap is already up (var dir {layout.root}):")
                _print_service_table(supervisord, specs)
                _print_urls(gateway_address)
                if ask:
                    _ask(orchestrator_address, question, max_new_tokens)
                return
        else:
            running = set()
            _refuse_taken_addresses(list(specs.values()))
        to_start = [spec for name, spec in specs.items() if name not in running]

        timings: list[str] = []
        names_to_start = {spec.name for spec in to_start}
        begin = time.monotonic()
        try:
            # the prepare commands are no-ops once their output exists, but each costs seconds of imports:
            # look first, and leave the full checks to the services when they load
            if any(name.startswith("generation") for name in names_to_start) and model is None:
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
            if supervisord.process() is None:
                supervisord.start(list(specs.values()), grace, child_environment())
                started_supervisord = True
            backends = [name for name in specs if name not in FRONTS]
            # the gateway's /health is 200 only once the orchestrator (and every backend) is SERVING
            for phase in (backends, list(FRONTS)):
                phase_specs = [spec for spec in to_start if spec.name in phase]
                for spec in phase_specs:
                    supervisord.start_service(spec.name)
                typer.echo(
                    "waiting for "
                    + ", ".join(f"{name} ({addresses[name]})" for name in phase)
                    + f" to report SERVING (timeout {start_timeout:.0f} s) ..."
                )
                phase_begin = time.monotonic()
                _wait(supervisord, phase_specs, [specs[n] for n in phase if n in running], start_timeout)
                timings.append(f"{'+'.join(phase)} healthy after {time.monotonic() - phase_begin:.1f} s")
        except StartupFailed as failure:
            typer.secho(f"\n{failure}. Last lines of {failure.log_path}:", fg="red", err=True)
            typer.echo(textwrap.indent(failure.log_tail or "(empty)", "  | "), err=True)
            _stop_started(supervisord, started_supervisord, to_start, grace)
            _fail(f"nightcap did not start: {failure}")
        except KeyboardInterrupt:
            typer.echo("\ninterrupted: stopping what this run started", err=True)
            _stop_started(supervisord, started_supervisord, to_start, grace)
            raise typer.Exit(130) from None

    typer.echo(f"nightcap is up in {time.monotonic() - begin:.1f} s ({'; '.join(timings)}):")
    _print_service_table(supervisord, specs)
    _print_urls(gateway_address)
    if ask:
        _ask(orchestrator_address, question, max_new_tokens)


@app.command()
def down(var_dir: VarDir = Path("var"), grace: Grace = 15.0) -> None:
    """Stop every service `up` started, and supervisord (SIGTERM, then SIGKILL after the grace period)."""
    run = RunFolder(VarLayout.from_env(var_dir))
    supervisord = Supervisord(run)
    with run.lock(on_wait=lambda: typer.echo("waiting for another deploy.stack command on this var dir ...")):
        process = supervisord.process()
        if process is None:
            typer.echo(f"nothing to stop (no supervisord for {run.layout.root})")
            return
        states = supervisord.states()
        began = time.monotonic()
        survivors = supervisord.shutdown(grace)
        for name, state in states.items():
            was = f"pid {state.pid}" if state.pid else state.state.lower()
            typer.echo(f"{name:<13} {was}: stopped")
        typer.echo(f"supervisord   pid {process.pid}: stopped in {time.monotonic() - began:.1f} s")
    if survivors:
        _fail("some processes could not be stopped: " + "; ".join(survivors))


@app.command()
def status(
    var_dir: VarDir = Path("var"),
    orchestrator_address: OrchestratorAddress = ORCHESTRATOR_ADDRESS,
    generation_address: GenerationAddress = GENERATION_ADDRESS,
    retrieval_address: RetrievalAddress = RETRIEVAL_ADDRESS,
    gateway_address: GatewayAddress = GATEWAY_ADDRESS,
) -> None:
    """State, pid, address, health, restarts and last exit of each service; the model and the index.

    Exits 0 when all are SERVING, 1 otherwise. Addresses come from the running stack when there is one."""
    run = RunFolder(VarLayout.from_env(var_dir))
    supervisord = Supervisord(run)
    specs = {spec.name: spec for spec in supervisord.specs()} if supervisord.process() else {}
    if not specs:
        addresses = _addresses(orchestrator_address, generation_address, retrieval_address, gateway_address, 1)
        specs = {name: ServiceSpec(name, _health_address(name, address), []) for name, address in addresses.items()}
    healths = _print_service_table(supervisord, specs)
    orchestrator = specs["orchestrator"].address
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


def _addresses(orchestrator: str, generation: str, retrieval: str, gateway: str, replicas: int) -> dict[str, str]:
    """Service name -> address; replica i > 0 of generation is ``generation-<i+1>`` on the port + 10 i."""
    host, _, port = generation.rpartition(":")
    replica_addresses = {
        "generation" if i == 0 else f"generation-{i + 1}": f"{host}:{int(port) + 10 * i}" for i in range(replicas)
    }
    return {**replica_addresses, "retrieval": retrieval, "orchestrator": orchestrator, "gateway": gateway}


def _health_address(name: str, address: str) -> str:
    """Where a service's health is asked: gRPC health at host:port, the gateway's GET /health at its URL."""
    return f"http://{address}" if name == "gateway" else address


def _print_urls(gateway: str) -> None:
    typer.echo(f"web chat: http://{gateway}   OpenAI-compatible API: base_url http://{gateway}/v1")


def _service_specs(
    layout: VarLayout, addresses: dict[str, str], model: str, index: str, log_level: str, runner: str = "transformers"
) -> dict[str, ServiceSpec]:
    var_dir = str(layout.root)
    generations = [name for name in addresses if name.startswith("generation")]
    backends = [
        "--generation",
        ",".join(addresses[name] for name in generations),
        "--retrieval",
        addresses["retrieval"],
    ]
    arguments = {
        "retrieval": ["--index", index, "--var-dir", var_dir],
        "gateway": ["--orchestrator", addresses["orchestrator"], *backends],
        "orchestrator": backends,
    }
    metrics_host, _, metrics_port = os.environ.get("NIGHTCAP_METRICS_ADDRESS", "127.0.0.1:9400").rpartition(":")
    for n, name in enumerate(generations):
        arguments[name] = [
            "--model",
            model,
            "--var-dir",
            var_dir,
            *(["--runner", runner] if runner != "transformers" else []),
        ]
        if n > 0:  # each replica its own metrics port (port 0 stays "any free port")
            port = int(metrics_port) + n if int(metrics_port) else 0
            arguments[name] += ["--metrics-address", f"{metrics_host}:{port}"]
    specs = {}
    for name in addresses:
        module = "generation" if name.startswith("generation") else name
        serve = [sys.executable, "-m", f"services.{module}", "serve", "--address", addresses[name]]
        command = [*serve, *arguments[name], "--log-level", log_level]
        specs[name] = ServiceSpec(
            name, _health_address(name, addresses[name]), command, ALLOCATOR_ENV if module == "generation" else {}
        )
    return specs


def _refuse_other_settings(supervisord: Supervisord, specs: dict[str, ServiceSpec]) -> None:
    """A stack up with other settings is an error: reusing it would serve something not asked for."""
    running = {spec.name: spec for spec in supervisord.specs()}
    for name in sorted(set(running) | set(specs)):
        have, want = running.get(name), specs.get(name)
        if have is None or want is None or _settings(have.command) != _settings(want.command):
            _fail(
                f"{name}: the stack is already up with other settings:\n"
                f"  running: {' '.join(have.command[1:]) if have else '(not part of it)'}\n"
                f"  asked:   {' '.join(want.command[1:]) if want else '(not asked for)'}\n"
                "Run `python -m deploy.stack down` first."
            )


def _refuse_taken_addresses(specs: list[ServiceSpec]) -> None:
    for spec in specs:
        holder = address_taken_by(spec.address)
        if holder is not None:
            option = "generation" if spec.name.startswith("generation") else spec.name
            _fail(
                f"{spec.name}: {spec.address} is already in use by {holder}, which this stack did not start.\n"
                f"Stop it, or choose another address with --{option}-address."
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


def _wait(supervisord: Supervisord, started: list[ServiceSpec], reused: list[ServiceSpec], timeout: float) -> None:
    for spec in reused:
        typer.echo(f"  {spec.name:<13} reusing the running process")

    def on_serving(spec: ServiceSpec, seconds: float) -> None:
        pid = supervisord.states()[spec.name].pid
        typer.echo(f"  {spec.name:<13} SERVING after {seconds:.1f} s (pid {pid})")

    def on_waiting(pending: list[ServiceSpec], seconds: float) -> None:
        for spec in pending:
            typer.echo(f"  {spec.name:<13} still loading ({seconds:.0f} s; log {supervisord.run.log_file(spec.name)})")

    # Reused services were SERVING or still loading (or restarting) from an earlier `up`: same deadline.
    wait_until_serving(supervisord, [*started, *reused], timeout, on_serving, on_waiting)


def _stop_started(
    supervisord: Supervisord, started_supervisord: bool, started: list[ServiceSpec], grace: float
) -> None:
    if started_supervisord:
        supervisord.shutdown(grace)
        typer.echo("  stopped supervisord and every service it ran", err=True)
        return
    for spec in started:
        with contextlib.suppress(OSError, xmlrpc.client.Fault):
            supervisord.rpc().supervisor.stopProcess(spec.name, True)
            typer.echo(f"  stopped {spec.name}", err=True)


def _print_service_table(supervisord: Supervisord, specs: dict[str, ServiceSpec]) -> list[str]:
    """One line per service: supervisord's state and pid, address, health, restarts, last exit. Returns the
    healths in order."""
    try:
        states = supervisord.states() if supervisord.process() else {}
    except (OSError, xmlrpc.client.Fault):
        states = {}
    exits = supervisord.exits()
    healths = []
    typer.echo(f"  {'service':<13} {'state':<9} {'pid':>8}  {'address':<22} {'health':<12} restarts  last exit")
    for name, spec in specs.items():
        state = states.get(name)
        pid = str(state.pid) if state and state.pid else "-"
        healths.append(health(spec.address))
        service_exits = exits.get(name, [])
        last = f"{service_exits[-1].how} at {service_exits[-1].at}" if service_exits else "-"
        typer.echo(
            f"  {name:<13} {state.state if state else 'DOWN':<9} {pid:>8}  {spec.address:<22} {healths[-1]:<12}"
            f" {len(service_exits):>8}  {last}"
        )
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
