"""chatctl: talk to a nightcap stack. `chatctl chat` is the OpenChatKit shell; `ask` and `status`
are one-shot commands. Built on the client library only; it imports nothing from services/."""

from __future__ import annotations

import cmd
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import typer

from clients.chatctl_model import model_app
from clients.client import (
    DEFAULT_ADDRESS,
    DEFAULT_RETRIEVAL_ADDRESS,
    ChatClient,
    ChatStarted,
    IndexClient,
    Message,
    NightcapError,
    Reply,
    SamplingParams,
    Source,
)
from clients.documents import MAX_FILE_BYTES, SUPPORTED, Document, DocumentReadError, read_documents
from nightcap.credentials import Credentials, CredentialsError
from nightcap.records import DEFAULT_K, MAX_K

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

# OpenChatKit's bot.py defaults: sampling at temperature 0.6 with top-k 40, 128 new tokens.
AddressOption = typer.Option(DEFAULT_ADDRESS, "--address", envvar="NIGHTCAP_ADDRESS", help="orchestrator host:port")
MaxTokensOption = typer.Option(128, "--max-tokens", help="most new tokens per answer")
# A question answered from the index is asked greedily unless a temperature is set: make eval's grounded questions
# were answered best so (single questions 0.733 greedy, 0.617 at 0.6 with top-k 40), as the gateway does.
PLAIN_TEMPERATURE, GROUNDED_TEMPERATURE = 0.6, 0.0
TemperatureOption = typer.Option(
    None,
    "--temperature",
    help=f"sampling temperature; 0 is greedy (deterministic). Unset: {GROUNDED_TEMPERATURE:g} with --retrieval, "
    f"{PLAIN_TEMPERATURE:g} without",
)
TopKOption = typer.Option(40, "--top-k", help="sample from the k most likely tokens; 0 turns it off")
TopPOption = typer.Option(1.0, "--top-p", help="nucleus sampling mass in (0, 1]; 1 turns it off")
RetrievalOption = typer.Option(False, "--retrieval", help="ground answers in passages from the retrieval service")
KOption = typer.Option(DEFAULT_K, "-k", help=f"passages to retrieve when retrieval is on (1-{MAX_K})")
JsonSchemaOption = typer.Option(
    None,
    "--json-schema",
    exists=True,
    dir_okay=False,
    help="a JSON Schema file: the answer is JSON valid against it (enforced token by token); printed as JSON",
)
TimeoutOption = typer.Option(300.0, "--timeout", help="seconds before a request is abandoned (its deadline)")


@dataclass
class Connection:
    """How every command connects: set by the options that come before the command."""

    credentials: Credentials = field(default_factory=Credentials)


CONNECTION = Connection()


TlsCaOption = typer.Option(
    None, "--tls-ca", envvar="NIGHTCAP_TLS_CA", help="use TLS, trusting servers signed by this CA (PEM)"
)
TlsCertOption = typer.Option(
    None, "--tls-cert", envvar="NIGHTCAP_CLIENT_CERT", help="client certificate for mutual TLS (PEM)"
)
TlsKeyOption = typer.Option(None, "--tls-key", envvar="NIGHTCAP_CLIENT_KEY", help="key of --tls-cert (PEM)")
TokenOption = typer.Option(
    None, "--token", envvar="NIGHTCAP_TOKEN", help="the token to send: chat, or admin for index add/delete"
)
TokenFileOption = typer.Option(
    None, "--token-file", envvar="NIGHTCAP_TOKEN_FILE", help="read the token from this file (reread when it changes)"
)


@app.callback()
def connection(
    tls_ca: Path | None = TlsCaOption,
    tls_cert: Path | None = TlsCertOption,
    tls_key: Path | None = TlsKeyOption,
    token: str | None = TokenOption,
    token_file: Path | None = TokenFileOption,
) -> None:
    """Connection options, given before the command: chatctl --tls-ca ca.pem --token-file chat.token ask ..."""
    CONNECTION.credentials = Credentials(tls_ca, tls_cert, tls_key, token, token_file)
    try:
        CONNECTION.credentials.check()
    except CredentialsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


@dataclass
class Settings:
    max_tokens: int
    temperature: float | None  # None: GROUNDED_TEMPERATURE with retrieval, PLAIN_TEMPERATURE without
    top_k: int
    top_p: float
    retrieval: bool
    k: int

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return GROUNDED_TEMPERATURE if self.retrieval else PLAIN_TEMPERATURE

    def params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_tokens, temperature=self.sampling_temperature, top_k=self.top_k, top_p=self.top_p
        )


SETTING_TYPES = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "k": int}


def format_source(number: int, source: Source, width: int = 160, cited: bool = False) -> str:
    text = source.text if len(source.text) <= width else source.text[: width - 1] + "…"
    mark = (" — by title" if source.titled else "") + (" — cited" if cited else "")
    return f"[{number}] {source.title} ({where(source)}, score {source.score:.2f}){mark}\n    {text}"


def where(source: Source) -> str:
    """Where a passage came from: "report.pdf, p. 3" for a page of a PDF, else its source (a URL or path)."""
    return f"{source.source}, p. {source.page}" if source.page else source.source


def turn_notes(reply: Reply, tell_build: bool = True) -> list[str]:
    """The lines shown under an answer: the index build (when ``tell_build``), the orchestrator's notice, and
    which sources the answer cited (nothing when it cited none)."""
    build, notice = reply.started.index_build, reply.finished.notice
    notes = [f"[{build.notice}]"] if build is not None and tell_build else []
    if notice and not (build is not None and build.repeated_in(notice)):
        notes.append(f"[{notice}]")
    if reply.cited_sources:
        names = ", ".join(
            f"[{number}] {source.title or source.id}" + (f", p. {source.page}" if source.page else "")
            for number, source in reply.cited_sources
        )
        notes.append(f"cited: {names}")
    return notes


@dataclass
class ChatShell(cmd.Cmd):
    """OpenChatKit's shell: a line is a message; a line starting with / is a command."""

    client: ChatClient
    settings: Settings
    stream: bool = True
    history: list[Message] = field(default_factory=list)
    last: ChatStarted | None = None
    cited: list[int] = field(default_factory=list)  # the numbers of the last answer's sources that it cited
    told_build: bool = False  # the running index build was shown once; later answers do not repeat it
    intro: str = "Welcome to the nightcap shell.   Type /help or /? to list commands.\n"
    prompt: str = ">>> "

    def __post_init__(self) -> None:
        super().__init__()

    def precmd(self, line: str) -> str:
        if line == "EOF":
            return "quit"
        if line.startswith("/"):
            return line[1:]
        return f"say {line}" if line.strip() else ""

    def emptyline(self) -> bool:
        return False

    def default(self, line: str) -> None:
        print(f"unknown command /{line.split()[0]}: type /help for the list")

    def do_say(self, arg: str) -> None:
        """say TEXT: send a message (plain lines do this)"""
        answer: list[str] = []

        def show(text: str) -> None:
            answer.append(text)
            if self.stream:
                print(text, end="", flush=True)

        sources: tuple[Source, ...] = ()
        notes: list[str] = []
        try:
            reply = self.client.ask(
                arg,
                on_text=show,
                history=self.history,
                retrieval=self.settings.retrieval,
                k=self.settings.k,
                params=self.settings.params(),
            )
        except NightcapError as error:
            print(f"\nerror: {error}")
            return
        except KeyboardInterrupt:  # ask cancels the call: the server stops generating
            print("\n[interrupted]")
        else:
            self.last, sources, self.cited = reply.started, tuple(reply.started.sources), reply.finished.cited
            notes = turn_notes(reply, tell_build=not self.told_build)
            self.told_build = reply.started.index_build is not None
        if not self.stream:
            print("".join(answer), end="")
        for note in notes:
            print(f"\n{note}", end="")
        print("\n")
        self.history += [Message("user", arg, sources), Message("assistant", "".join(answer).strip())]

    def do_raw_prompt(self, arg: str) -> None:
        """raw_prompt: show the exact prompt the model saw for the last message"""
        print(self.last.prompt if self.last else "(nothing sent yet)")

    def do_sources(self, arg: str) -> None:
        """sources: show what was searched for the last message and the passages given to the model (those its
        answer cited are marked)"""
        if self.last and self.last.retrieval_query:
            print(f"searched: {self.last.retrieval_query}")
        if not self.last or not self.last.sources:
            if self.last is not None and self.last.retrieved_ids:
                print("(no new sources: the passages found were given in earlier turns)")
            else:
                print("(no sources: retrieval was off or found nothing)")
        for number, source in enumerate(self.last.sources if self.last else [], 1):
            print(format_source(number, source, cited=number in self.cited))

    def do_reset(self, arg: str) -> None:
        """reset: forget the conversation so far"""
        self.history, self.last, self.cited = [], None, []
        print("conversation reset")

    def do_retrieval(self, arg: str) -> None:
        """retrieval on|off: ground answers in retrieved passages, or stop doing so"""
        if arg.strip() not in ("on", "off"):
            print(f"retrieval is {'on' if self.settings.retrieval else 'off'}; use /retrieval on or /retrieval off")
            return
        self.settings.retrieval = arg.strip() == "on"
        print(f"retrieval {arg.strip()}")

    def do_hyperparameters(self, arg: str) -> None:
        """hyperparameters [name=value ...]: show the sampling settings, or change some"""
        for assignment in arg.split():
            name, _, value = assignment.partition("=")
            if name not in SETTING_TYPES or not value:
                print(f"unknown setting {assignment!r}: use max_tokens, temperature, top_k, top_p or k")
                return
            try:
                setattr(self.settings, name, SETTING_TYPES[name](value))
            except ValueError:
                print(f"{name} needs a number, got {value!r}")
                return
        for name, value in asdict(self.settings).items():
            if name == "temperature" and value is None:
                grounded = "answering from the index" if self.settings.retrieval else "retrieval off"
                value = f"{self.settings.sampling_temperature:g} (the default, {grounded})"
            print(f"{name}: {value}")

    def do_quit(self, arg: str) -> bool:
        """quit: leave the shell"""
        return True

    do_exit = do_quit


@app.command()
def chat(
    address: str = AddressOption,
    max_tokens: int = MaxTokensOption,
    temperature: float | None = TemperatureOption,
    top_k: int = TopKOption,
    top_p: float = TopPOption,
    retrieval: bool = RetrievalOption,
    k: int = KOption,
    no_stream: bool = typer.Option(False, "--no-stream", help="print each answer whole instead of as it streams"),
    timeout: float = TimeoutOption,
) -> None:
    """The OpenChatKit-style shell: type a message, get a streamed answer; /help lists commands."""
    with ChatClient(address, timeout=timeout, credentials=CONNECTION.credentials) as client:
        try:
            client.health()
        except NightcapError as error:
            typer.echo(f"error: {error}\nIs the stack up? `make up` starts it.", err=True)
            raise typer.Exit(1) from None
        shell = ChatShell(client, Settings(max_tokens, temperature, top_k, top_p, retrieval, k), stream=not no_stream)
        try:
            shell.cmdloop()
        except KeyboardInterrupt:
            print()


@app.command()
def ask(
    question: str = typer.Argument(..., help="the message to send"),
    address: str = AddressOption,
    max_tokens: int = MaxTokensOption,
    temperature: float | None = TemperatureOption,
    top_k: int = TopKOption,
    top_p: float = TopPOption,
    retrieval: bool = RetrievalOption,
    k: int = KOption,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (answer, sources, token counts)"),
    json_schema: Path | None = JsonSchemaOption,
    regex: str | None = typer.Option(None, "--regex", help="the whole answer matches this regular expression"),
    timeout: float = TimeoutOption,
) -> None:
    """Ask one question, print the answer (and its sources), and exit. With --json-schema or --regex only the
    structured answer is printed (exit 1 when --max-tokens cut it short)."""
    settings = Settings(max_tokens, temperature, top_k, top_p, retrieval, k)
    params = settings.params()
    if json_schema is not None and regex is not None:
        typer.echo("error: --json-schema and --regex are one constraint each: give one", err=True)
        raise typer.Exit(2)
    if json_schema is not None:
        try:
            params.json_schema = json.dumps(json.loads(json_schema.read_text()))
        except (ValueError, OSError) as error:
            typer.echo(f"error: {json_schema} is not a JSON file: {error}", err=True)
            raise typer.Exit(2) from None
    params.regex = regex
    structured = json_schema is not None or regex is not None
    with ChatClient(address, timeout=timeout, credentials=CONNECTION.credentials) as client:
        try:
            reply = client.ask(
                question,
                on_text=None if as_json or structured else lambda text: print(text, end="", flush=True),
                retrieval=retrieval,
                k=k,
                params=params,
            )
        except NightcapError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(1) from None
    started, finished = reply.started, reply.finished
    parsed = None
    if json_schema is not None and finished.finish_reason != "length":
        try:
            parsed = json.loads(reply.text)
        except ValueError:
            typer.echo(f"error: the answer is not JSON: {reply.text!r}", err=True)
            raise typer.Exit(1) from None
    if as_json:
        print(
            json.dumps(
                {
                    "answer": reply.text.strip(),
                    **({"structured": parsed} if json_schema is not None else {}),
                    "model": started.model,
                    "retrieval_query": started.retrieval_query,
                    "sources": [asdict(s) for s in started.sources],
                    "index_build": asdict(started.index_build) if started.index_build else None,
                    **asdict(finished),
                },
                ensure_ascii=False,
            )
        )
        return
    if structured:
        if finished.finish_reason == "length":
            typer.echo(f"error: --max-tokens ({max_tokens}) cut the answer short: {reply.text!r}", err=True)
            raise typer.Exit(1)
        print(json.dumps(parsed, ensure_ascii=False, indent=2) if json_schema is not None else reply.text)
        return
    print()
    for note in turn_notes(reply):
        print(note)
    for number, source in enumerate(started.sources, 1):
        print(format_source(number, source, cited=number in finished.cited))


@app.command()
def status(address: str = AddressOption) -> None:
    """Each service's health, the model being served and the index being searched."""
    with ChatClient(address, credentials=CONNECTION.credentials) as client:
        try:
            report = client.status()
        except NightcapError as error:
            typer.echo(f"orchestrator  {address}  UNAVAILABLE\nerror: {error}", err=True)
            raise typer.Exit(1) from None
    healthy = report.orchestrator_health == "SERVING"
    print(f"{'orchestrator':<13} {address:<22} {report.orchestrator_health}")
    for backend in report.backends:
        healthy &= backend.health == "SERVING"
        detail = f"  ({backend.detail})" if backend.detail else ""
        print(f"{backend.name:<13} {backend.address:<22} {backend.health}{detail}")
    if report.model:
        model = report.model
        version = f":{model['version']}" if model.get("version") else ""
        print(
            f"model         {model.get('name', '?')}{version}  {model.get('architecture', '?')}"
            f"  context {model.get('context_length', '?')}  {model.get('dtype', '?')} on {model.get('device', '?')}"
            f"  prompt format {model.get('prompt_format', '?')}"
        )
    if report.index:
        index = report.index
        print(
            f"index         {index.get('passages', 0)} passages from {index.get('documents', 0)} documents"
            f"  {index.get('index_type', '?')}  dim {index.get('dimension', '?')}"
            f"  embedder {index.get('embedder', '?')}"
        )
        if index.get("build") is not None:
            print(f"{'':<13} {index['build'].describe()}")
    if not healthy:
        raise typer.Exit(1)


index_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Feed and inspect the retrieval service's index directly (it has its own address, not the orchestrator's).",
)
app.add_typer(index_app, name="index")
app.add_typer(model_app, name="model")
IndexAddressOption = typer.Option(
    DEFAULT_RETRIEVAL_ADDRESS, "--address", envvar="NIGHTCAP_RETRIEVAL_ADDRESS", help="retrieval service host:port"
)
PathsArgument = typer.Argument(
    ..., help="files or folders: .txt, .md, .pdf, .docx, .html, .jsonl (a 'text' field), .parquet"
)
IdsArgument = typer.Argument(..., help="document ids (for files: the path as it was added)")
IndexTimeoutOption = typer.Option(3600.0, "--timeout", help="seconds before one call (one batch) is abandoned")


def _index_error(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(2 if isinstance(error, DocumentReadError) else 1)


@index_app.command("add")
def index_add(
    paths: list[str] = PathsArgument,
    address: str = IndexAddressOption,
    batch: int = typer.Option(
        256, "--batch", min=1, envvar="NIGHTCAP_INDEX_BATCH", help="documents per call; each call is one commit"
    ),
    timeout: float = IndexTimeoutOption,
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    max_file_mb: float = typer.Option(
        MAX_FILE_BYTES / 2**20, "--max-file-mb", min=0, envvar="NIGHTCAP_MAX_FILE_MB", help="the largest file read"
    ),
) -> None:
    """Index files: each file (or JSONL line, parquet row) is one document whose id is its path. A PDF's
    passages know their page.

    Adding an id again replaces it. Every file is read before anything is sent, so a bad file sends nothing."""
    from tqdm import tqdm

    try:
        documents = list(read_documents(paths, max_bytes=int(max_file_mb * 2**20)))
    except DocumentReadError as error:
        raise _index_error(error) from None
    if not documents:
        typer.echo(f"error: no files nightcap reads ({SUPPORTED}) under {' '.join(paths)}", err=True)
        raise typer.Exit(2)
    totals = dict.fromkeys(("documents_added", "documents_replaced", "passages_added", "passages_removed"), 0)
    report = None
    with (
        IndexClient(address, timeout=timeout, credentials=CONNECTION.credentials) as client,
        tqdm(total=len(documents), unit="doc", desc="indexing", disable=quiet) as bar,
    ):
        for start in range(0, len(documents), batch):
            chunk: list[Document] = documents[start : start + batch]
            try:
                report = client.add_documents(chunk)
            except NightcapError as error:
                bar.close()
                committed = f" ({start} documents were committed before this batch)" if start else ""
                typer.echo(f"error: {error}{committed}", err=True)
                raise typer.Exit(1) from None
            for name in totals:
                totals[name] += getattr(report, name)
            bar.update(len(chunk))
    assert report is not None
    print(
        f"added {totals['documents_added']} documents, replaced {totals['documents_replaced']}: "
        f"{totals['passages_added']} passages in, {totals['passages_removed']} out; the index now holds "
        f"{report.passages_total} passages of {report.documents_total} documents"
    )


@index_app.command("delete")
def index_delete(
    ids: list[str] = IdsArgument,
    address: str = IndexAddressOption,
    timeout: float = IndexTimeoutOption,
) -> None:
    """Remove documents by id; if any id is unknown nothing is removed."""
    with IndexClient(address, timeout=timeout, credentials=CONNECTION.credentials) as client:
        try:
            report = client.delete_documents(ids)
        except NightcapError as error:
            raise _index_error(error) from None
    print(
        f"deleted {report.documents_deleted} documents ({report.passages_removed} passages); the index now holds "
        f"{report.passages_total} passages of {report.documents_total} documents"
    )


@index_app.command("compact")
def index_compact(
    address: str = IndexAddressOption,
    timeout: float = IndexTimeoutOption,
) -> None:
    """Merge the index's vector segments into one and drop the vectors of deleted documents (searches and
    additions go on meanwhile). Each add is a new segment; compacting keeps searches over many of them fast."""
    with IndexClient(address, timeout=timeout) as client:
        try:
            report = client.compact()
        except NightcapError as error:
            raise _index_error(error) from None
    print(
        f"compacted {report.segments_before} segments into {report.segments_after}, dropped "
        f"{report.vectors_dropped} vectors of deleted passages: {report.bytes_before / 2**20:.1f} MB -> "
        f"{report.bytes_after / 2**20:.1f} MB in {report.seconds:.1f}s"
    )


@index_app.command("stats")
def index_stats(
    address: str = IndexAddressOption,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Passages, documents, index type, dimension, embedder and bytes on disk."""
    with IndexClient(address, timeout=30, credentials=CONNECTION.credentials) as client:
        try:
            stats = client.stats()
        except NightcapError as error:
            raise _index_error(error) from None
    if as_json:
        print(json.dumps(asdict(stats)))
        return
    for name, value in asdict(stats).items():
        print(f"{name:<14} {value}")


@index_app.command("search")
def index_search(
    query: str = typer.Argument(..., help="the text to search for"),
    k: int = typer.Option(DEFAULT_K, "-k", help=f"passages to return (1-{MAX_K})"),
    title: str = typer.Option(
        "",
        "--title",
        help='also look up the documents titled so (case ignored; "X (qualifier)" too): their first passages come'
        " first",
    ),
    mode: str = typer.Option(
        "",
        "--mode",
        help="hybrid (vectors and keywords together), vector or keyword; default: the service's --search-mode",
    ),
    address: str = IndexAddressOption,
) -> None:
    """The k passages that best match the query, best first."""
    with IndexClient(address, timeout=60, credentials=CONNECTION.credentials) as client:
        try:
            found = client.search(query, k, title=title, mode=mode)
        except (NightcapError, ValueError) as error:
            raise _index_error(error) from None
    for number, source in enumerate(found, 1):
        print(format_source(number, source))


def main() -> None:
    app(prog_name="chatctl")


if __name__ == "__main__":
    sys.exit(main())
