"""Who may call what, for every service: TLS (optionally mutual), bearer tokens with roles checked by one
server interceptor, and secure by default off loopback.

- Roles: ``chat`` may call the methods that answer questions; ``admin`` may call those and every method that
  changes state. ``METHOD_ROLES`` is the one table; a method missing from it needs ``admin`` (fail closed).
- Health is always open (probes and load balancers call it); reflection is open when it is on (``--reflection``).
- Tokens: a file (``--tokens-file``) and/or ``NIGHTCAP_TOKENS``, one ``ROLE TOKEN [NAME]`` per line. The file is
  read again when it changes, so rotating a token needs no restart. Tokens are compared in constant time.
- A service bound to anything but loopback refuses to start without TLS and tokens unless ``--insecure``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from grpc_health.v1 import health_pb2_grpc
from loguru import logger

from nightcap.credentials import TOKEN_METADATA_KEY, TOKEN_SCHEME, CredentialsError, read_file

CHAT, ADMIN = "chat", "admin"
ROLES = (CHAT, ADMIN)
# What each role may call: admin tokens may call chat methods too.
GRANTS: dict[str, frozenset[str]] = {CHAT: frozenset({CHAT}), ADMIN: frozenset({CHAT, ADMIN})}

# The role each method needs: "/package.Service/Method", or "package.Service" for every method of a service.
METHOD_ROLES: dict[str, str] = {
    "/nightcap.v1.Chat/Chat": CHAT,
    "/nightcap.v1.Chat/Status": CHAT,
    "/nightcap.v1.Generation/Generate": CHAT,
    "/nightcap.v1.Generation/ModelInfo": CHAT,
    "/nightcap.v1.Generation/Tokenize": CHAT,
    "/nightcap.v1.Retrieval/Search": CHAT,
    "/nightcap.v1.Retrieval/Stats": CHAT,
    "/nightcap.v1.Retrieval/Embed": CHAT,
    "/nightcap.v1.Retrieval/Rerank": CHAT,
    "/nightcap.v1.Retrieval/ListDocuments": CHAT,
    "/nightcap.v1.Retrieval/AddDocuments": ADMIN,
    "/nightcap.v1.Retrieval/DeleteDocuments": ADMIN,
    "/nightcap.v1.Retrieval/Compact": ADMIN,
    "nightcap.v1.ModelAdmin": ADMIN,  # load, switch and roll back model versions
}
# The HTTP gateway's routes on the same roles: a path or a folder of paths ("/v1/documents" covers
# "/v1/documents/ID"). Any other /v1 path needs admin (fail closed); everything else (the web page, /health,
# /metrics, /v1/nightcap/config) is open, like gRPC health.
HTTP_ROUTE_ROLES: dict[str, str] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": CHAT,
    "/v1/models": CHAT,
    "/v1/embeddings": CHAT,
    "/v1/rerank": CHAT,
    "/v1/index": CHAT,
    "/v1/documents": ADMIN,  # the page's "your documents": list, add, delete
}
OPEN_HTTP_ROUTES = ("/v1/nightcap/config",)
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

ENV_TOKENS = "NIGHTCAP_TOKENS"
MIN_TOKEN_CHARS = 16
# How often a call may look at the tokens file's mtime; a rotated token is honoured within this.
RELOAD_CHECK_S = 1.0


def required_role(method: str) -> str | None:
    """The role ``method`` ("/package.Service/Method") needs, or None when it is open to anyone."""
    service = method.lstrip("/").partition("/")[0]
    if service == HEALTH_SERVICE or service in REFLECTION_SERVICES:
        return None
    return METHOD_ROLES.get(method) or METHOD_ROLES.get(service) or ADMIN


def matching_route(path: str, routes: Iterable[str]) -> str | None:
    """The route ``path`` is or lies under ("/v1/documents/a.md" is under "/v1/documents"), if any."""
    return next((route for route in routes if path == route or path.startswith(route + "/")), None)


def required_http_role(path: str) -> str | None:
    """The role an HTTP ``path`` needs, or None when it is open to anyone."""
    if not path.startswith("/v1/") or path in OPEN_HTTP_ROUTES:
        return None
    route = matching_route(path, HTTP_ROUTE_ROLES)
    return HTTP_ROUTE_ROLES[route] if route is not None else ADMIN


# --- tokens ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    role: str
    name: str  # for logs; the secret itself is never logged
    digest: bytes = field(repr=False)  # sha256 of the secret: equal-length values for compare_digest


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_tokens(text: str, origin: str) -> list[Token]:
    """``ROLE TOKEN [NAME]`` per line; blank lines and ``#`` comments are skipped. Errors name the line."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{origin} line {number}"
        if len(fields) not in (2, 3):
            raise CredentialsError(f"{where}: expected 'ROLE TOKEN [NAME]', got {len(fields)} fields")
        role, secret = fields[0], fields[1]
        if role not in ROLES:
            raise CredentialsError(f"{where}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        if len(secret) < MIN_TOKEN_CHARS:
            raise CredentialsError(f"{where}: a token needs at least {MIN_TOKEN_CHARS} characters")
        tokens.append(Token(role, fields[2] if len(fields) == 3 else f"{role}-{number}", _digest(secret)))
    return tokens


class TokenTable:
    """The tokens a server accepts: from a file (read again when it changes) plus fixed ones (from the env)."""

    def __init__(self, path: Path | None = None, text: str = "") -> None:
        self.path = Path(path) if path else None
        self._fixed = parse_tokens(text, ENV_TOKENS) if text else []
        self._from_file: list[Token] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        if self.path is not None:
            self._load(self.path.stat() if self.path.exists() else None)
        if not self._fixed and not self._from_file:
            raise CredentialsError(f"no tokens in {self.path or ENV_TOKENS}: add lines of 'ROLE TOKEN [NAME]'")

    @classmethod
    def from_sources(cls, path: Path | None) -> TokenTable | None:
        """The file and ``NIGHTCAP_TOKENS``; None when neither is given (authentication off)."""
        text = os.environ.get(ENV_TOKENS, "")
        return cls(path, text) if path or text.strip() else None

    def _load(self, info: os.stat_result | None) -> None:
        assert self.path is not None
        if info is None:
            raise CredentialsError(f"the tokens file {self.path} does not exist")
        self._from_file = parse_tokens(read_file(self.path, "tokens file").decode(), str(self.path))
        self._stamp = (info.st_mtime_ns, info.st_ino, info.st_size)

    def reload_if_changed(self) -> None:
        """Reads the file again when its mtime, inode or size changed; a broken file keeps the old tokens."""
        if self.path is None or time.monotonic() - self._checked_at < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked_at = time.monotonic()
            try:
                info = self.path.stat()
            except OSError:
                return  # mid-rotation (a Secret's symlink swap): keep what we have
            if (info.st_mtime_ns, info.st_ino, info.st_size) == self._stamp:
                return
            try:
                self._load(info)
            except CredentialsError as error:
                self._stamp = (info.st_mtime_ns, info.st_ino, info.st_size)  # say so once per change, not per call
                logger.error("keeping the previous tokens: {}", error)
                return
            logger.info("tokens reloaded from {}: {} tokens", self.path, len(self._from_file))

    def find(self, presented: str) -> Token | None:
        """The token matching ``presented``; every known token is compared, in constant time each."""
        self.reload_if_changed()
        digest = _digest(presented)
        match = None
        for token in [*self._fixed, *self._from_file]:
            if hmac.compare_digest(token.digest, digest) and match is None:
                match = token
        return match


# --- the interceptor -------------------------------------------------------------------------------------------


def presented_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == TOKEN_METADATA_KEY:
            value = value.decode() if isinstance(value, bytes) else str(value)
            return value[len(TOKEN_SCHEME) :] if value.startswith(TOKEN_SCHEME) else value
    return None


class _TokenGuard:
    """The check both auth interceptors make: None when the call may go on, else the status refusing it."""

    def __init__(self, tokens: TokenTable) -> None:
        self.tokens = tokens

    def refusal(self, handler_call_details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str] | None:
        method = handler_call_details.method
        needed = required_role(method)
        if needed is None:
            return None
        presented = presented_token(handler_call_details.invocation_metadata)
        token = self.tokens.find(presented) if presented else None
        if token is None:
            why = "no token was sent" if not presented else "the token is not valid"
            logger.warning("{} refused: {}", method, why)
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs a {needed} token and {why}: send 'authorization: Bearer TOKEN' "
                "(chatctl --token / --token-file, or NIGHTCAP_TOKEN)",
            )
        if needed not in GRANTS[token.role]:
            logger.warning(
                "{} refused: token {} has role {}, the method needs {}", method, token.name, token.role, needed
            )
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} needs the {needed} role; this token has the {token.role} role",
            )
        return None


class AuthInterceptor(_TokenGuard, grpc.ServerInterceptor):
    """Checks the caller's token against the role the method needs, before the request is even parsed.

    No token or an unknown one: UNAUTHENTICATED. A token whose role does not grant the method: PERMISSION_DENIED.
    """

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        refused = self.refusal(handler_call_details) if handler is not None else None
        if refused is None:
            return handler

        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(*refused)

        return _refusal(handler, refuse)


class AsyncAuthInterceptor(_TokenGuard, grpc.aio.ServerInterceptor):
    """AuthInterceptor for a ``grpc.aio`` server."""

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        refused = self.refusal(handler_call_details) if handler is not None else None
        if refused is None:
            return handler

        async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(*refused)

        return _refusal(handler, refuse)


def _refusal(handler: grpc.RpcMethodHandler, refuse: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same shape that runs ``refuse``. No deserializer: the request is never parsed."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


# --- what a server runs with -----------------------------------------------------------------------------------


class InsecureBinding(RuntimeError):
    """A service asked to listen beyond loopback without TLS and tokens, and without --insecure."""


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` (or ``[v6]:port``, or a unix socket) is reachable only from this machine."""
    if address.startswith("unix:"):
        return True
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost, or "" (all interfaces)


@dataclass
class ServerSecurity:
    """How a server is reached: TLS (``client_ca`` makes it mutual) and tokens; empty is open plaintext."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # require client certificates signed by this CA
    tokens: TokenTable | None = None
    insecure: bool = False  # explicitly allow open plaintext beyond loopback
    reflection: bool = True
    health_address: str = ""  # also serve grpc.health.v1 alone, in plaintext, here (for TLS-less probes)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CredentialsError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise CredentialsError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check_address(self, address: str) -> None:
        """Refuses an address beyond loopback without TLS and tokens, unless ``insecure``; says so either way."""
        if is_loopback(address) or (self.tls and self.tokens):
            return
        missing = " and ".join(what for what, there in (("TLS", self.tls), ("tokens", self.tokens)) if not there)
        if self.insecure:
            logger.warning("serving on {} without {} (--insecure): anyone who reaches it may call it", address, missing)
            return
        raise InsecureBinding(
            f"refusing to serve on {address} without {missing}: it is reachable beyond this machine. "
            "Pass --tls-cert/--tls-key and --tokens-file (`make certs` makes them), listen on 127.0.0.1, "
            "or pass --insecure to serve it open anyway"
        )

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [AuthInterceptor(self.tokens)] if self.tokens else []

    def aio_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [AsyncAuthInterceptor(self.tokens)] if self.tokens else []

    def add_port(self, server: grpc.Server | grpc.aio.Server, address: str) -> int:
        if not self.tls:
            return server.add_insecure_port(address)
        assert self.tls_cert is not None and self.tls_key is not None
        credentials = grpc.ssl_server_credentials(
            [(read_file(self.tls_key, "TLS key"), read_file(self.tls_cert, "TLS certificate"))],
            root_certificates=read_file(self.tls_client_ca, "client CA") if self.tls_client_ca else None,
            require_client_auth=self.tls_client_ca is not None,
        )
        return server.add_secure_port(address, credentials)

    def start_health_port(self, health_servicer: Any) -> grpc.Server | None:
        """A second, plaintext server with only grpc.health.v1 on ``health_address``: Kubernetes' gRPC probes
        speak neither TLS nor tokens, and health is open anyway."""
        if not self.health_address:
            return None
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if server.add_insecure_port(self.health_address) == 0:
            raise OSError(f"could not bind the health port {self.health_address}: is another process listening there?")
        server.start()
        return server

    async def start_aio_health_port(self, health_servicer: Any) -> grpc.aio.Server | None:
        """``start_health_port`` for a ``grpc.aio`` server: the same, on its event loop, with its asyncio
        health servicer."""
        if not self.health_address:
            return None
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if server.add_insecure_port(self.health_address) == 0:
            raise OSError(f"could not bind the health port {self.health_address}: is another process listening there?")
        await server.start()
        return server

    def describe(self) -> str:
        tls = "mutual TLS" if self.tls_client_ca else "TLS" if self.tls else "plaintext"
        return f"{tls}, {'tokens' if self.tokens else 'no tokens'}, reflection {'on' if self.reflection else 'off'}"


# --- the flags every service takes -----------------------------------------------------------------------------

TlsCertOption = Annotated[
    Path | None,
    typer.Option("--tls-cert", envvar="NIGHTCAP_TLS_CERT", help="server certificate (PEM); turns TLS on"),
]
TlsKeyOption = Annotated[
    Path | None, typer.Option("--tls-key", envvar="NIGHTCAP_TLS_KEY", help="private key of --tls-cert (PEM)")
]
TlsClientCaOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-client-ca",
        envvar="NIGHTCAP_TLS_CLIENT_CA",
        help="mutual TLS: accept only clients with a certificate signed by this CA (PEM)",
    ),
]
TokensFileOption = Annotated[
    Path | None,
    typer.Option(
        "--tokens-file",
        envvar="NIGHTCAP_TOKENS_FILE",
        help="accepted tokens, one 'ROLE TOKEN [NAME]' per line (roles: chat, admin); reread when it changes. "
        f"{ENV_TOKENS} may hold more lines. Without either, no token is asked for",
    ),
]
InsecureOption = Annotated[
    bool,
    typer.Option(
        "--insecure",
        envvar="NIGHTCAP_INSECURE",
        help="allow listening beyond loopback without TLS and tokens (refused otherwise)",
    ),
]
ReflectionOption = Annotated[
    bool,
    typer.Option(
        "--reflection/--no-reflection",
        envvar="NIGHTCAP_REFLECTION",
        help="serve gRPC server reflection (open to anyone, like health)",
    ),
]
HealthAddressOption = Annotated[
    str,
    typer.Option(
        "--health-address",
        envvar="NIGHTCAP_HEALTH_ADDRESS",
        help="also serve grpc.health.v1 alone, in plaintext, on this host:port (for probes that cannot speak TLS, "
        "such as Kubernetes' gRPC probes); empty: off",
    ),
]

# The orchestrator's side of its calls to the backends.
SERVICE_TOKEN_ENV = "NIGHTCAP_SERVICE_TOKEN"
BackendTlsCaOption = Annotated[
    Path | None,
    typer.Option(
        "--backend-tls-ca",
        envvar="NIGHTCAP_BACKEND_TLS_CA",
        help="call the backends over TLS, trusting this CA (PEM); unset: plaintext",
    ),
]
BackendTlsCertOption = Annotated[
    Path | None,
    typer.Option(
        "--backend-tls-cert",
        envvar="NIGHTCAP_BACKEND_TLS_CERT",
        help="client certificate (PEM) for backends that require mutual TLS",
    ),
]
BackendTlsKeyOption = Annotated[
    Path | None,
    typer.Option("--backend-tls-key", envvar="NIGHTCAP_BACKEND_TLS_KEY", help="private key of --backend-tls-cert"),
]
ServiceTokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--service-token-file",
        envvar="NIGHTCAP_SERVICE_TOKEN_FILE",
        help=f"the token this service sends to its backends, reread when it changes (or {SERVICE_TOKEN_ENV})",
    ),
]


def server_security_or_exit(
    address: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    tokens_file: Path | None,
    insecure: bool,
    reflection: bool,
    health_address: str = "",
) -> ServerSecurity:
    """The security a service's flags ask for, checked against its address; a clear error and exit 2 if unusable."""
    try:
        security = ServerSecurity(
            tls_cert, tls_key, tls_client_ca, TokenTable.from_sources(tokens_file), insecure, reflection, health_address
        )
        security.check_address(address)
        for path, what in ((tls_cert, "TLS certificate"), (tls_key, "TLS key"), (tls_client_ca, "client CA")):
            if path is not None:
                read_file(path, what)  # unreadable now rather than at bind time, after a model has loaded
    except (CredentialsError, InsecureBinding) as error:
        logger.error("{}", error)
        raise typer.Exit(2) from None
    logger.info("security on {}: {}", address, security.describe())
    return security
