"""The local stack behind `make up`, `make down`, `make status` and `make chat`.

    python -m deploy.stack up       # prepare the default model, start all services, ask "Where is Zurich?"
    python -m deploy.stack status   # pid, address and health of each service; the model, the index, its build
    python -m deploy.stack down     # SIGTERM, then SIGKILL after a grace period; nothing is left behind

`up` prepares the default model in the foreground (its progress bar shows), then has supervisord start
generation (``--generation-replicas N``: N processes) and retrieval, then the orchestrator once they are
SERVING. The default index is not built first: retrieval serves with ``--build-default`` and fills it in the
background, so `up` asks its question as soon as the services are SERVING (answered from what is indexed so
far), then waits for the index with a progress bar and asks again. supervisord restarts a service that
crashes (a restarted retrieval resumes the build); `status` shows its restarts and last exit. Logs go to
var/logs/<service>.log, supervisord's files and up-timing.json to var/run/. It says what it reuses: the
model, the index, a stack already up.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from tqdm import tqdm

from clients.client import ChatClient, IndexClient, NightcapError, SamplingParams
from deploy.llamacpp import importable, missing_compiler
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
from nightcap.records import (
    BUILDING,
    COMPLETE,
    FAILED,
    GATEWAY_ADDRESS,
    GENERATION_ADDRESS,
    ORCHESTRATOR_ADDRESS,
    RETRIEVAL_ADDRESS,
    IndexBuild,
    IndexStats,
)
from services.common.paths import VAR_ENV, VarLayout
from services.common.registry import DEFAULT_MODEL, ModelRegistry
from services.retrieval.build_plan import CorpusSelection, recorded_build
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
INDEX_POLL_S = 1.0  # how often `up` asks retrieval's Stats how far the index build is
# How long the build may show no progress (retrieval unreachable or not building) before `up` gives up waiting:
# enough for supervisord to restart a crashed retrieval (backoff, embedder load) that then resumes the build.
INDEX_STALL_S = 180.0
TIMING_FILE = "up-timing.json"  # under var/run/: what the last `up` measured, for benchmarks to read

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
            help="What runs the model: auto (llama.cpp for a GGUF model such as the default on a CPU, built into the"
            " venv in the background on a first run while transformers serves; transformers otherwise), llamacpp"
            " (`make llamacpp` installs it first) or transformers.",
        ),
    ] = "auto",
    ask: Annotated[
        bool, typer.Option(envvar="NIGHTCAP_ASK", help="Ask the question once the stack is up (with retrieval).")
    ] = True,
    wait_index: Annotated[
        bool,
        typer.Option(
            envvar="NIGHTCAP_WAIT_INDEX",
            help="While retrieval builds the default index in the background, wait for it (a progress bar), then "
            "ask the question again on the complete index. --no-wait-index returns once the services answer.",
        ),
    ] = True,
    index_build_limit: Annotated[
        int | None,
        typer.Option(
            envvar="NIGHTCAP_INDEX_BUILD_LIMIT",
            min=0,
            help="A new default index holds only the first N articles (plus any --index-build-titles): quick "
            "stacks for tests and demos. Recorded in the index; an existing one keeps what it recorded.",
        ),
    ] = None,
    index_build_titles: Annotated[
        str,
        typer.Option(
            envvar="NIGHTCAP_INDEX_BUILD_TITLES", help="Comma-separated article titles a new default index holds."
        ),
    ] = "",
    started_at: Annotated[
        float | None,
        typer.Option(
            envvar="NIGHTCAP_UP_STARTED",
            help="When `make up` started (Unix seconds; the Makefile passes the time it was invoked, so setup "
            "counts): the timing line's first_answer_s and index_complete_s are measured from it. Default: now.",
        ),
    ] = None,
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
    """Prepare the model, start the services under supervisord (retrieval fills the default index while it
    serves), wait until SERVING, ask; then wait for the index and ask again."""
    timing = UpTiming(started_at if started_at is not None else time.time())
    layout = VarLayout.from_env(var_dir)
    run = RunFolder(layout)
    addresses = _addresses(
        orchestrator_address, generation_address, retrieval_address, gateway_address, generation_replicas
    )
    if len(set(addresses.values())) < len(addresses):
        _fail(f"the services need different addresses, got {addresses}")
    # the default index is always served with --build-default: a complete one starts no build, an incomplete
    # one (a first run, or a build that was stopped) is filled in the background, also after a restart
    selection = CorpusSelection.parse(index_build_limit, index_build_titles) if index is None else None
    specs = _service_specs(
        layout, addresses, model or DEFAULT_MODEL, index or DEFAULT_INDEX, log_level, runner, selection
    )
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
                timing.already_up = True
                _answer_and_wait_for_index(
                    timing, layout, orchestrator_address, retrieval_address, ask, wait_index, question, max_new_tokens
                )
                return
        else:
            running = set()
            _refuse_taken_addresses(list(specs.values()))
        to_start = [spec for name, spec in specs.items() if name not in running]

        timings: list[str] = []
        names_to_start = {spec.name for spec in to_start}
        begin = time.monotonic()
        wants_llamacpp = runner == "auto" and (model is None or model.endswith(".gguf"))
        llamacpp = None
        if wants_llamacpp and wait_index and any(name.startswith("generation") for name in names_to_start):
            llamacpp = LlamaCppBuild.start_if_missing(layout)
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
                folder = layout.indexes / DEFAULT_INDEX
                state, recorded = _default_index_state(folder)
                if state == COMPLETE:
                    typer.echo(f"default index: reusing {folder}")
                elif recorded is not None:
                    typer.echo(
                        f"default index: retrieval goes on building {folder} in the background while it serves "
                        f"({recorded.documents_done:,} of {recorded.documents_total:,} documents so far)"
                    )
                elif state == BUILDING:
                    typer.echo(f"default index: retrieval builds {folder} in the background while it serves")
                else:  # an older format or damaged: build-default rebuilds it (or migrates a format it can)
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
    if llamacpp is not None:
        typer.echo(llamacpp.started_line())
    _answer_and_wait_for_index(
        timing, layout, orchestrator_address, retrieval_address, ask, wait_index, question, max_new_tokens
    )
    if llamacpp is not None:
        _serve_on_llamacpp_once_built(llamacpp, supervisord, specs, start_timeout, timing, layout)


# A first run builds llama-cpp-python while the stack serves on transformers: niced, so the first answer and
# the index build keep the cores they had, and the build takes what they leave.
LLAMACPP_BUILD_NICENESS = 10


@dataclass
class LlamaCppBuild:
    """``python -m deploy.llamacpp`` in the background (a build of about 4 minutes on 2 cores, a cached wheel
    in seconds); generation starts on the transformers runner meanwhile (its --runner auto finds no
    llama_cpp) and is restarted on llama.cpp when the install is done."""

    process: subprocess.Popen
    log_path: Path
    began: float

    @classmethod
    def start_if_missing(cls, layout: VarLayout) -> LlamaCppBuild | None:
        """Starts the install when ``import llama_cpp`` fails in this venv; None when it imports."""
        if importable() is not None:
            return None
        folder = layout.root / "llamacpp"
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "install.log"
        command = [sys.executable, "-m", "deploy.llamacpp", "--no-converter", "--var-dir", str(layout.root)]
        with log_path.open("w") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=child_environment(),
                preexec_fn=lambda: os.nice(LLAMACPP_BUILD_NICENESS),
            )  # fmt: skip
        return cls(process, log_path, time.monotonic())

    def started_line(self) -> str:
        return (
            "llama.cpp runner: installing llama-cpp-python in the background (a first build takes about 4 minutes"
            f" on 2 cores; log {self.log_path}); generation serves on the transformers runner until it is done"
        )

    def wait(self) -> str:
        """Waits for the install; '' when it succeeded, else one line saying why and how to fix it."""
        if self.process.poll() is None:
            typer.echo("waiting for the llama-cpp-python install to finish ...")
        if self.process.wait() == 0:
            return ""
        compiler = missing_compiler()
        reason = compiler or f"its build failed: see {self.log_path.parent / 'build.log'}"
        fix = "install a C/C++ compiler (Debian: apt-get install build-essential)" if compiler else "fix the build"
        return (
            f"llama.cpp runner unavailable: llama-cpp-python could not be installed ({reason}); generation stays on"
            f" the transformers runner, 3-5x slower for one stream: {fix}, then `make llamacpp` and"
            " `make down && make up`"
        )


def _serve_on_llamacpp_once_built(
    build: LlamaCppBuild,
    supervisord: Supervisord,
    specs: dict[str, ServiceSpec],
    timeout: float,
    timing: UpTiming,
    layout: VarLayout,
) -> None:
    """After the background install: restarts each generation process, whose --runner auto now loads the GGUF
    into llama.cpp. A failed install leaves the stack on transformers with one line; `up` still succeeds."""
    problem = build.wait()
    if problem:
        typer.secho(problem, fg="yellow")
        return
    generations = [spec for name, spec in specs.items() if name.startswith("generation")]
    typer.echo(
        f"llama-cpp-python installed in {time.monotonic() - build.began:.0f} s: restarting "
        + ", ".join(spec.name for spec in generations)
        + " on the llama.cpp runner"
    )
    try:
        for spec in generations:
            with contextlib.suppress(xmlrpc.client.Fault):  # not running (between restarts): start it all the same
                supervisord.rpc().supervisor.stopProcess(spec.name, True)
            supervisord.start_service(spec.name)
        _wait(supervisord, generations, [], timeout)
    except StartupFailed as failure:
        typer.secho(f"\n{failure}. Last lines of {failure.log_path}:", fg="red", err=True)
        typer.echo(textwrap.indent(failure.log_tail or "(empty)", "  | "), err=True)
        _fail(f"generation did not start again on llama.cpp: {failure}")
    timing.llamacpp_serving_s = timing.mark()
    _write_timing(layout, timing)
    typer.echo(f"timing: llamacpp_serving_s {timing.llamacpp_serving_s:.1f} (the stack serves on llama.cpp)")


@dataclass
class UpTiming:
    """What `up` measured, in seconds since ``started_at`` (when `make up` was typed): written to
    var/run/up-timing.json. None: it did not happen in this run (--no-ask, --no-wait-index)."""

    started_at: float
    serving_s: float | None = None
    first_answer_s: float | None = None
    index_complete_s: float | None = None
    documents_at_first_answer: int | None = None  # of the index, when the first answer searched it
    documents_total: int | None = None
    already_up: bool = False
    llamacpp_serving_s: float | None = None  # a first run: generation restarted on llama.cpp after its install

    def mark(self) -> float:
        return round(time.time() - self.started_at, 1)

    def line(self) -> str:
        def shown(seconds: float | None) -> str:
            return "-" if seconds is None else f"{seconds:.1f}"

        return (
            f"timing: first_answer_s {shown(self.first_answer_s)}, index_complete_s {shown(self.index_complete_s)}"
            f" (seconds since `make up` started; serving_s {shown(self.serving_s)})"
        )


def _answer_and_wait_for_index(
    timing: UpTiming,
    layout: VarLayout,
    orchestrator_address: str,
    retrieval_address: str,
    ask: bool,
    wait_index: bool,
    question: str,
    max_new_tokens: int | None,
) -> None:
    """Asks at once (from what is indexed so far), waits for a background index build unless told not to,
    records the timing, and asks again on the complete index: that answer is the last thing shown."""
    timing.serving_s = timing.mark()
    stats = _index_stats(retrieval_address)
    build = stats.build if stats is not None else None
    building = build is not None and build.state == BUILDING
    if build is not None:
        typer.echo(build.describe())
        timing.documents_total = build.documents_total
    if stats is not None and (build is None or build.state == COMPLETE):  # no build record: made whole
        timing.index_complete_s = timing.serving_s
    if ask:
        if build is not None and building:
            typer.echo(
                f"asking now, with {build.documents_done:,} of {build.documents_total:,} documents indexed; "
                "the rest is embedded in the background"
            )
        _ask(orchestrator_address, question, max_new_tokens)
        timing.first_answer_s = timing.mark()
        timing.documents_at_first_answer = stats.documents if stats is not None else None
    if build is not None and building and wait_index:
        build = _wait_for_index(retrieval_address, build)
        typer.echo(build.describe())
        if build.state == COMPLETE:
            timing.index_complete_s = timing.mark()
    elif building:
        typer.echo("not waiting for the index (--no-wait-index): `make status` shows how far it is")
    _write_timing(layout, timing)
    if build is not None and build.state == FAILED:
        _fail(f"{build.describe()}\nthe stack serves what was indexed; see {layout.logs / 'retrieval.log'}")
    typer.echo(timing.line())
    if ask and building and build is not None and build.state == COMPLETE:
        _ask(orchestrator_address, question, max_new_tokens)


def _index_stats(retrieval_address: str) -> IndexStats | None:
    """The retrieval service's Stats (its ``build`` set while a build fills the index); None if unreachable."""
    try:
        with IndexClient(retrieval_address) as client:
            return client.stats(timeout=10)
    except NightcapError as error:
        typer.echo(f"index: unknown ({error})")
        return None


def _wait_for_index(retrieval_address: str, build: IndexBuild) -> IndexBuild:
    """Polls Stats with a progress bar of documents until the build is complete or has failed."""
    stalled_since: float | None = None
    with (
        IndexClient(retrieval_address) as client,
        tqdm(total=build.documents_total, initial=build.documents_done, unit="doc", desc="indexing") as bar,
    ):
        while build.state not in (COMPLETE, FAILED):
            time.sleep(INDEX_POLL_S)
            try:
                reported = client.stats(timeout=10).build
            except NightcapError as error:  # retrieval restarting: its next start resumes the build
                reported, problem = None, str(error)
            else:
                problem = "it reports no build" if reported is None else f"it reports {reported.state}"
            if reported is not None and reported.state in (BUILDING, COMPLETE, FAILED):
                build, stalled_since = reported, None
                bar.total, bar.n = build.documents_total, build.documents_done
                bar.set_postfix_str(f"{build.passages_per_second:.1f} passages/s", refresh=False)
                bar.refresh()
                continue
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > INDEX_STALL_S:
                _fail(f"gave up waiting for the index after {INDEX_STALL_S:.0f} s without progress: {problem}")
    return build


def _write_timing(layout: VarLayout, timing: UpTiming) -> None:
    layout.run.mkdir(parents=True, exist_ok=True)
    (layout.run / TIMING_FILE).write_text(json.dumps(asdict(timing), indent=2) + "\n")


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
        build = (stack.index or {}).get("build")
        if build is not None:
            typer.echo(build.describe())
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
    layout: VarLayout,
    addresses: dict[str, str],
    model: str,
    index: str,
    log_level: str,
    runner: str = "auto",
    build: CorpusSelection | None = None,
) -> dict[str, ServiceSpec]:
    """Each service's command; ``build``: retrieval fills the index from that part of the default corpus."""
    var_dir = str(layout.root)
    generations = [name for name in addresses if name.startswith("generation")]
    backends = [
        "--generation",
        ",".join(addresses[name] for name in generations),
        "--retrieval",
        addresses["retrieval"],
    ]
    build_arguments = []
    if build is not None:
        build_arguments = ["--build-default"]
        build_arguments += ["--build-limit", str(build.limit)] if build.limit is not None else []
        build_arguments += ["--build-titles", ",".join(build.titles)] if build.titles else []
    arguments = {
        "retrieval": ["--index", index, "--var-dir", var_dir, *build_arguments],
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
            "--runner",
            runner,
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


def _default_index_state(folder: Path) -> tuple[str, IndexBuild | None]:
    """From the index's manifest copy: COMPLETE (reuse it), BUILDING (retrieval's --build-default creates it, or
    goes on with the build it records: that record comes along) or "rebuild" (an older format or unreadable:
    build-default rebuilds it, or migrates a format it can)."""
    if not folder.exists():
        return BUILDING, None
    try:
        state = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return "rebuild", None
    if state.get("format") != FORMAT_VERSION:
        return "rebuild", None
    recorded = recorded_build(state.get("details") or {}, state.get("documents", 0), state.get("passages", 0))
    if recorded is None or recorded.state == COMPLETE:  # made whole by build-default, or a finished build
        return COMPLETE, recorded
    return BUILDING, recorded


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
