"""TLS, token roles and secure-by-default, tried the way an outsider would: raw generated stubs over raw
channels, every RPC of every service, with no token, a wrong token, the wrong role and plaintext."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import nightcap.v1
from clients.client import ChatClient, IndexClient, NightcapError
from clients.documents import Document
from deploy.certs import DEFAULT_HOSTS, make_certs
from nightcap.credentials import Credentials
from nightcap.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)
from services.common import security
from services.common.security import (
    ADMIN,
    CHAT,
    METHOD_ROLES,
    InsecureBinding,
    ServerSecurity,
    TokenTable,
    is_loopback,
    required_role,
)

ROOT = Path(__file__).resolve().parents[1]
WRONG_TOKEN = "not-a-token-anyone-was-given-0123456789"


@dataclass
class Certs:
    """What `make certs` writes."""

    folder: Path

    @property
    def ca_pem(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def server_pem(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def client_pem(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"

    @property
    def tokens(self) -> Path:
        return self.folder / "tokens"

    def token(self, role: str) -> str:
        return (self.folder / f"{role}.token").read_text().strip()


@dataclass
class Stack:
    certs: Certs
    generation: str
    retrieval: str
    orchestrator: str


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    make_certs(folder, DEFAULT_HOSTS)
    return Certs(folder)


def server_security(certs: Certs, **overrides: Any) -> ServerSecurity:
    settings = {"tls_cert": certs.server_pem, "tls_key": certs.server_key, "tokens": TokenTable(certs.tokens)}
    return ServerSecurity(**{**settings, **overrides})


@pytest.fixture(scope="module")
def stack(certs: Certs, tiny_loaded, embedder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The three services, each with TLS and tokens; the orchestrator calls its backends over TLS with its token."""
    from services.generation.engine.scheduler import SchedulerConfig
    from services.generation.loading import start_engine
    from services.generation.server import start_generation_server
    from services.orchestrator.server import start_chat_server
    from services.retrieval.index import create_index, load_index
    from services.retrieval.retriever import Retriever
    from services.retrieval.server import start_retrieval_server

    engine = start_engine(tiny_loaded, SchedulerConfig(max_concurrent_requests=8))
    generation = start_generation_server(tiny_loaded, engine, "127.0.0.1:0", 8, security=server_security(certs))
    folder = create_index(tmp_path_factory.mktemp("indexes") / "secure", embedder.name, embedder.dimension)
    retriever = Retriever(embedder, load_index(folder, writable=True))
    retrieval = start_retrieval_server(retriever, "127.0.0.1:0", security=server_security(certs))
    backends = Credentials(tls_ca=certs.ca_pem, token_file=certs.folder / "orchestrator.token")
    orchestrator = start_chat_server(
        f"localhost:{generation.port}",
        f"localhost:{retrieval.port}",
        "127.0.0.1:0",
        default_max_new_tokens=4,
        backend_timeout=5,
        security=server_security(certs),
        backend_credentials=backends,
    )
    with IndexClient(f"localhost:{retrieval.port}", credentials=admin_credentials(certs)) as index:
        index.add_documents([Document("zurich", "Zurich is the largest city in Switzerland.", "Zurich")])
    try:
        yield Stack(
            certs, f"localhost:{generation.port}", f"localhost:{retrieval.port}", f"localhost:{orchestrator.port}"
        )
    finally:
        orchestrator.stop(grace=None)
        retrieval.stop(grace=None)
        generation.stop(grace=None)
        engine.shutdown(grace=1.0)
        retriever.index.close()


def admin_credentials(certs: Certs) -> Credentials:
    return Credentials(tls_ca=certs.ca_pem, token=certs.token("admin"))


# --- every RPC of every service ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    service: str  # which Stack address
    name: str  # "/package.Service/Method"
    role: str
    call: Callable[[grpc.Channel, list[tuple[str, str]]], Any]  # makes the call and returns the whole response


def _stream(call: Any) -> list[Any]:
    return list(call)


def _documents() -> Iterator[retrieval_pb2.AddDocumentsRequest]:
    yield retrieval_pb2.AddDocumentsRequest(
        document=retrieval_pb2.Document(id="intruder", text="Nobody should be able to index this.", title="Intruder")
    )


RPCS = [
    Rpc("generation", "/nightcap.v1.Generation/Generate", CHAT, lambda ch, md: _stream(
        generation_pb2_grpc.GenerationStub(ch).Generate(generation_pb2.GenerateRequest(
            text="Hello", params=common_pb2.SamplingParams(max_new_tokens=2)), metadata=md, timeout=30))),
    Rpc("generation", "/nightcap.v1.Generation/ModelInfo", CHAT, lambda ch, md: generation_pb2_grpc.GenerationStub(
        ch).ModelInfo(generation_pb2.ModelInfoRequest(), metadata=md, timeout=30)),
    Rpc("generation", "/nightcap.v1.Generation/Tokenize", CHAT, lambda ch, md: generation_pb2_grpc.GenerationStub(
        ch).Tokenize(generation_pb2.TokenizeRequest(text="Hello"), metadata=md, timeout=30)),
    Rpc("retrieval", "/nightcap.v1.Retrieval/Search", CHAT, lambda ch, md: retrieval_pb2_grpc.RetrievalStub(
        ch).Search(retrieval_pb2.SearchRequest(query="Zurich", k=1), metadata=md, timeout=30)),
    Rpc("retrieval", "/nightcap.v1.Retrieval/Stats", CHAT, lambda ch, md: retrieval_pb2_grpc.RetrievalStub(
        ch).Stats(retrieval_pb2.StatsRequest(), metadata=md, timeout=30)),
    Rpc("retrieval", "/nightcap.v1.Retrieval/AddDocuments", ADMIN, lambda ch, md: retrieval_pb2_grpc.RetrievalStub(
        ch).AddDocuments(_documents(), metadata=md, timeout=30)),
    Rpc("retrieval", "/nightcap.v1.Retrieval/DeleteDocuments", ADMIN, lambda ch, md: retrieval_pb2_grpc.RetrievalStub(
        ch).DeleteDocuments(retrieval_pb2.DeleteDocumentsRequest(ids=["zurich"]), metadata=md, timeout=30)),
    Rpc("orchestrator", "/nightcap.v1.Chat/Chat", CHAT, lambda ch, md: _stream(chat_pb2_grpc.ChatStub(ch).Chat(
        chat_pb2.ChatRequest(message="Where is Zurich?", retrieval=True), metadata=md, timeout=60))),
    Rpc("orchestrator", "/nightcap.v1.Chat/Status", CHAT, lambda ch, md: chat_pb2_grpc.ChatStub(ch).Status(
        chat_pb2.StatusRequest(), metadata=md, timeout=30)),
]  # fmt: skip
ADMIN_RPCS = [rpc for rpc in RPCS if rpc.role == ADMIN]


def tls_channel(stack: Stack, service: str) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=stack.certs.ca_pem.read_bytes())
    return grpc.secure_channel(getattr(stack, service), credentials)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def documents_indexed(stack: Stack) -> int:
    with IndexClient(stack.retrieval, credentials=admin_credentials(stack.certs)) as index:
        return index.stats().documents


def expect_status(rpc: Rpc, channel: grpc.Channel, metadata: list[tuple[str, str]], code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        rpc.call(channel, metadata)
    assert raised.value.code() == code, f"{rpc.name}: {raised.value.code()} {raised.value.details()}"
    return raised.value.details() or ""


def test_the_role_table_names_every_method_of_every_service_in_the_protos() -> None:
    """A new RPC without a row would silently need admin; this makes adding the row part of adding the RPC."""
    methods = {}
    for module_info in pkgutil.iter_modules(nightcap.v1.__path__):
        if module_info.name.endswith("_pb2"):
            module = importlib.import_module(f"nightcap.v1.{module_info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                for method in service.methods:
                    methods[f"/{service.full_name}/{method.name}"] = service.full_name
    assert {rpc.name for rpc in RPCS} <= set(methods)
    for method, service in methods.items():
        assert method in METHOD_ROLES or service in METHOD_ROLES, f"{method} has no row in METHOD_ROLES"
    expected_admin = {"AddDocuments", "DeleteDocuments", "Compact"}
    for method, service in methods.items():
        wanted = ADMIN if method.rsplit("/", 1)[1] in expected_admin or service == "nightcap.v1.ModelAdmin" else CHAT
        assert required_role(method) == wanted, method
    assert required_role("/nightcap.v1.ModelAdmin/LoadVersion") == ADMIN
    assert required_role("/nightcap.v1.Unknown/Anything") == ADMIN  # fail closed
    assert required_role("/grpc.health.v1.Health/Check") is None


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.name)
def test_every_rpc_without_a_token_or_with_a_wrong_one_is_unauthenticated(stack: Stack, rpc: Rpc) -> None:
    before = documents_indexed(stack)
    with tls_channel(stack, rpc.service) as channel:
        details = expect_status(rpc, channel, [], grpc.StatusCode.UNAUTHENTICATED)
        assert "no token was sent" in details and rpc.name in details
        details = expect_status(rpc, channel, bearer(WRONG_TOKEN), grpc.StatusCode.UNAUTHENTICATED)
        assert "not valid" in details
        expect_status(rpc, channel, [("authorization", "")], grpc.StatusCode.UNAUTHENTICATED)
    assert documents_indexed(stack) == before


@pytest.mark.parametrize("rpc", ADMIN_RPCS, ids=lambda rpc: rpc.name)
def test_admin_rpcs_with_a_chat_or_service_token_are_permission_denied(stack: Stack, rpc: Rpc) -> None:
    before = documents_indexed(stack)
    with tls_channel(stack, rpc.service) as channel:
        for role in ("chat", "orchestrator"):
            details = expect_status(rpc, channel, bearer(stack.certs.token(role)), grpc.StatusCode.PERMISSION_DENIED)
            assert "needs the admin role" in details
    assert documents_indexed(stack) == before


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.name)
def test_every_rpc_in_plaintext_against_a_tls_port_is_unavailable(stack: Stack, rpc: Rpc) -> None:
    before = documents_indexed(stack)
    with grpc.insecure_channel(getattr(stack, rpc.service)) as channel:
        expect_status(rpc, channel, bearer(stack.certs.token("admin")), grpc.StatusCode.UNAVAILABLE)
    assert documents_indexed(stack) == before


@pytest.mark.parametrize("rpc", RPCS, ids=lambda rpc: rpc.name)
def test_the_right_role_over_tls_is_served(stack: Stack, rpc: Rpc) -> None:
    """The positive control: the same calls succeed with a token of the right role (admin may call chat methods)."""
    roles = ["admin"] if rpc.role == ADMIN else ["chat", "admin"]
    with tls_channel(stack, rpc.service) as channel:
        for role in roles:
            assert rpc.call(channel, bearer(stack.certs.token(role))) is not None
    if rpc.name.endswith("DeleteDocuments"):  # put back what the control deleted, for the tests that follow
        with IndexClient(stack.retrieval, credentials=admin_credentials(stack.certs)) as index:
            index.add_documents([Document("zurich", "Zurich is the largest city in Switzerland.", "Zurich")])


def test_a_chat_through_the_orchestrator_reaches_both_backends_over_tls_with_its_service_token(stack: Stack) -> None:
    credentials = Credentials(tls_ca=stack.certs.ca_pem, token_file=stack.certs.folder / "chat.token")
    with ChatClient(stack.orchestrator, timeout=60, credentials=credentials) as client:
        reply = client.ask("Where is Zurich?", retrieval=True, k=1)
        status = client.status()
    assert [source.title for source in reply.started.sources] == ["Zurich"]
    assert reply.finished.completion_tokens > 0
    assert {backend.name: backend.health for backend in status.backends} == {
        "generation": "SERVING",
        "retrieval": "SERVING",
    }


def test_an_orchestrator_without_a_service_token_says_the_backend_refused_it(stack: Stack, certs: Certs) -> None:
    from services.orchestrator.server import start_chat_server

    orchestrator = start_chat_server(
        stack.generation, None, "127.0.0.1:0", backend_timeout=5, backend_credentials=Credentials(tls_ca=certs.ca_pem)
    )
    try:
        with ChatClient(orchestrator.address, timeout=30) as client, pytest.raises(NightcapError) as raised:
            client.ask("Hello")
    finally:
        orchestrator.stop(grace=None)
    assert "generation" in raised.value.message and "UNAUTHENTICATED" in raised.value.message


def test_health_is_open_and_reflection_is_open_only_when_on(stack: Stack, certs: Certs) -> None:
    from services.common.server import start_server

    with tls_channel(stack, "retrieval") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        listed = list_services(channel)
    assert "nightcap.v1.Retrieval" in listed

    quiet = start_server([], "127.0.0.1:0", security=server_security(certs, reflection=False))
    try:
        with tls_channel(Stack(certs, f"localhost:{quiet.port}", "", ""), "generation") as channel:
            with pytest.raises(grpc.RpcError) as raised:
                list_services(channel)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        quiet.stop(grace=None)


def list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return [service.name for response in responses for service in response.list_services_response.service]


def test_the_health_port_answers_probes_in_plaintext_and_serves_nothing_else(certs: Certs) -> None:
    from services.common.server import free_port, start_server

    probe_address = f"127.0.0.1:{free_port()}"
    running = start_server([], "127.0.0.1:0", security=server_security(certs, health_address=probe_address))
    try:
        with grpc.insecure_channel(probe_address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as raised:
                list_services(channel)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        running.stop(grace=None)
    with grpc.insecure_channel(probe_address) as channel, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)


# --- mutual TLS ------------------------------------------------------------------------------------------------


def test_mutual_tls_refuses_a_client_without_a_certificate_and_serves_one_with(stack: Stack, certs: Certs) -> None:
    from services.common.server import start_server

    running = start_server([], "127.0.0.1:0", security=server_security(certs, tls_client_ca=certs.ca_pem))
    address = f"localhost:{running.port}"
    try:
        with Credentials(tls_ca=certs.ca_pem).channel(address) as channel, pytest.raises(grpc.RpcError) as raised:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        mutual = Credentials(tls_ca=certs.ca_pem, tls_cert=certs.client_pem, tls_key=certs.client_key)
        with mutual.channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop(grace=None)


# --- tokens ----------------------------------------------------------------------------------------------------


def test_a_rotated_token_file_is_honoured_without_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(security, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "tokens"
    path.write_text("chat first-token-0123456789 alice\n")
    table = TokenTable(path)
    assert table.find("first-token-0123456789").name == "alice"
    path.write_text("admin second-token-0123456789 bob\n")
    assert table.find("first-token-0123456789") is None
    assert table.find("second-token-0123456789").role == ADMIN
    path.write_text("admin short\n")  # a broken file keeps the tokens that worked
    assert table.find("second-token-0123456789") is not None


def test_a_rotated_token_is_refused_by_a_running_server(certs: Certs, tmp_path: Path, monkeypatch) -> None:
    from services.common.server import start_server

    monkeypatch.setattr(security, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "tokens"
    path.write_text("chat old-token-0123456789abcdef\n")
    running = start_server(
        [_chat_binding()], "127.0.0.1:0", security=ServerSecurity(tokens=TokenTable(path), reflection=False)
    )
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = chat_pb2_grpc.ChatStub(channel)
            stub.Status(chat_pb2.StatusRequest(), metadata=bearer("old-token-0123456789abcdef"), timeout=10)
            path.write_text("chat new-token-0123456789abcdef\n")
            with pytest.raises(grpc.RpcError) as raised:
                stub.Status(chat_pb2.StatusRequest(), metadata=bearer("old-token-0123456789abcdef"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            stub.Status(chat_pb2.StatusRequest(), metadata=bearer("new-token-0123456789abcdef"), timeout=10)
    finally:
        running.stop(grace=None)


def _chat_binding():
    """A Chat servicer whose Status answers with nothing: enough to see the interceptor let a call through."""
    from services.common.server import ServiceBinding

    class EmptyStatus(chat_pb2_grpc.ChatServicer):
        def Status(self, request, context):
            return chat_pb2.StatusResponse()

    return ServiceBinding("nightcap.v1.Chat", chat_pb2_grpc.add_ChatServicer_to_server, EmptyStatus())


def test_tokens_from_the_environment_count_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(security.ENV_TOKENS, "admin env-token-0123456789abcdef ops")
    table = TokenTable.from_sources(None)
    assert table is not None and table.find("env-token-0123456789abcdef").name == "ops"
    monkeypatch.delenv(security.ENV_TOKENS)
    assert TokenTable.from_sources(None) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("root 0123456789abcdef0123", "unknown role 'root'"),
        ("chat tooshort", "at least 16 characters"),
        ("chat", r"tokens line 1: expected 'ROLE TOKEN \[NAME\]', got 1 fields"),
        ("# only a comment\n", "no tokens"),
    ],
)
def test_a_bad_tokens_file_is_a_clear_error_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        TokenTable(path)


# --- secure by default -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.0.0.2:0", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.1.2.3:50051", False),
        ("nightcap-generation:50051", False),
    ],
)
def test_only_loopback_addresses_count_as_local(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_beyond_loopback_a_server_needs_tls_and_tokens_or_insecure(certs: Certs) -> None:
    with pytest.raises(InsecureBinding, match=r"without TLS and tokens.*--insecure"):
        ServerSecurity().check_address("0.0.0.0:50051")
    with pytest.raises(InsecureBinding, match=r"without tokens"):
        ServerSecurity(tls_cert=certs.server_pem, tls_key=certs.server_key).check_address("0.0.0.0:50051")
    with pytest.raises(InsecureBinding, match=r"without TLS"):
        ServerSecurity(tokens=TokenTable(certs.tokens)).check_address("0.0.0.0:50051")
    server_security(certs).check_address("0.0.0.0:50051")
    ServerSecurity(insecure=True).check_address("0.0.0.0:50051")
    ServerSecurity().check_address("127.0.0.1:50051")


def test_a_service_asked_to_listen_openly_beyond_loopback_refuses_to_start_and_says_why() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.orchestrator", "serve", "--address", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "refusing to serve on 0.0.0.0:0 without TLS and tokens" in result.stderr
    assert "--insecure" in result.stderr


def test_every_service_takes_the_security_flags_with_env_variables() -> None:
    from typer.testing import CliRunner

    for service in ("generation", "retrieval", "orchestrator"):
        app = importlib.import_module(f"services.{service}.__main__").app
        result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
        assert result.exit_code == 0, result.output
        for flag, env in [
            ("--tls-cert", "NIGHTCAP_TLS_CERT"),
            ("--tls-key", "NIGHTCAP_TLS_KEY"),
            ("--tls-client-ca", "NIGHTCAP_TLS_CLIENT_CA"),
            ("--tokens-file", "NIGHTCAP_TOKENS_FILE"),
            ("--insecure", "NIGHTCAP_INSECURE"),
            ("--reflection", "NIGHTCAP_REFLECTION"),
            ("--health-address", "NIGHTCAP_HEALTH_ADDRESS"),
        ]:
            assert flag in result.output and env in result.output, (service, flag)


# --- the clients -----------------------------------------------------------------------------------------------


def chatctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.chatctl", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_chatctl_asks_over_tls_with_a_token_and_explains_a_missing_one(stack: Stack) -> None:
    tls = ["--tls-ca", str(stack.certs.ca_pem)]
    ok = chatctl(*tls, "--token-file", str(stack.certs.folder / "chat.token"),
                 "ask", "Where is Zurich?", "--max-tokens", "2", "--address", stack.orchestrator)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    refused = chatctl(*tls, "ask", "Where is Zurich?", "--address", stack.orchestrator)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr and "--token" in refused.stderr


def test_chatctl_index_writes_need_an_admin_token(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "geneva.txt").write_text("Geneva is a city on Lake Geneva.")
    tls = ["--tls-ca", str(stack.certs.ca_pem)]
    before = documents_indexed(stack)
    refused = chatctl(*tls, "--token", stack.certs.token("chat"), "index", "add", str(tmp_path / "geneva.txt"),
                      "--address", stack.retrieval, "--quiet")  # fmt: skip
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    assert documents_indexed(stack) == before
    added = chatctl(*tls, "--token", stack.certs.token("admin"), "index", "add", str(tmp_path / "geneva.txt"),
                    "--address", stack.retrieval, "--quiet")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert documents_indexed(stack) == before + 1


def test_chatctl_names_an_unreadable_ca_file() -> None:
    result = chatctl("--tls-ca", "/nonexistent/ca.pem", "status")
    assert result.returncode == 2
    assert "cannot read the CA certificate /nonexistent/ca.pem" in result.stderr


def test_the_orchestrator_command_serves_tls_and_tokens_from_its_flags(certs: Certs) -> None:
    """The flags as a user types them: TLS and tokens on, a chat token answered, no token refused, health open."""
    import time

    from services.common.server import free_port

    port, health_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "services.orchestrator", "serve", f"--address=127.0.0.1:{port}",
        f"--health-address=127.0.0.1:{health_port}", f"--generation=127.0.0.1:{free_port()}", "--retrieval=",
        f"--tls-cert={certs.server_pem}", f"--tls-key={certs.server_key}", f"--tokens-file={certs.tokens}",
        "--no-reflection",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as probe:
            deadline = time.monotonic() + 60
            while True:
                try:
                    health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    assert process.poll() is None and time.monotonic() < deadline, "the orchestrator did not start"
                    time.sleep(0.2)
        stack = Stack(certs, "", "", f"localhost:{port}")
        status = next(rpc for rpc in RPCS if rpc.name.endswith("Chat/Status"))
        with tls_channel(stack, "orchestrator") as channel:
            response = status.call(channel, bearer(certs.token("chat")))
            assert [backend.name for backend in response.backends] == ["generation"]
            expect_status(status, channel, [], grpc.StatusCode.UNAUTHENTICATED)
            with pytest.raises(grpc.RpcError) as raised:
                list_services(channel)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    assert "security on 127.0.0.1:" in output and "TLS, tokens, reflection off" in output


def every_method_in_the_protos() -> list[tuple[str, bool, bool]]:
    """(method, client streams, server streams) of every RPC in protos/, including ones added after this test."""
    found = []
    for module_info in pkgutil.iter_modules(nightcap.v1.__path__):
        if module_info.name.endswith("_pb2"):
            module = importlib.import_module(f"nightcap.v1.{module_info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                for method in service.methods:
                    found.append((f"/{service.full_name}/{method.name}", method.client_streaming,
                                  method.server_streaming))  # fmt: skip
    return found


# Which server of the stack serves each service (ModelAdmin is served beside Generation).
SERVED_BY = {
    "nightcap.v1.Generation": "generation",
    "nightcap.v1.ModelAdmin": "generation",
    "nightcap.v1.Retrieval": "retrieval",
    "nightcap.v1.Chat": "orchestrator",
}


def raw_call(channel: grpc.Channel, method: str, client_streams: bool, server_streams: bool, metadata) -> Any:
    """Calls ``method`` with an empty message, as bytes: no stub needed, so RPCs added later are tried too."""
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    kind = kinds[(client_streams, server_streams)]
    request = iter([b""]) if client_streams else b""
    response = kind(method)(request, metadata=metadata, timeout=30)
    return list(response) if server_streams else response


@pytest.mark.parametrize(("method", "client_streams", "server_streams"), every_method_in_the_protos(),
                         ids=lambda value: value if isinstance(value, str) else "")  # fmt: skip
def test_every_method_in_the_protos_is_refused_without_the_right_token(
    stack: Stack, method: str, client_streams: bool, server_streams: bool
) -> None:
    service = method.strip("/").split("/")[0]
    assert service in SERVED_BY, f"{service}: say which server of the stack serves it"
    before = documents_indexed(stack)
    with tls_channel(stack, SERVED_BY[service]) as channel:
        try:
            raw_call(channel, method, client_streams, server_streams, [])
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                pytest.skip(f"{method} is not served by this test's {SERVED_BY[service]} server")
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
        else:
            pytest.fail(f"{method} answered a call without a token")
        for metadata in (bearer(WRONG_TOKEN), [("authorization", "Bearer ")]):
            with pytest.raises(grpc.RpcError) as raised:
                raw_call(channel, method, client_streams, server_streams, metadata)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        if required_role(method) == ADMIN:
            with pytest.raises(grpc.RpcError) as raised:
                raw_call(channel, method, client_streams, server_streams, bearer(stack.certs.token("chat")))
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc.insecure_channel(getattr(stack, SERVED_BY[service])) as plaintext, pytest.raises(grpc.RpcError) as raised:
        raw_call(plaintext, method, client_streams, server_streams, bearer(stack.certs.token("admin")))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert documents_indexed(stack) == before
