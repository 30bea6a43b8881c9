"""How a caller presents itself to a nightcap service: TLS (server CA, optional client certificate for mutual
TLS) and a bearer token in the ``authorization`` metadata. Shared by the clients and by the orchestrator, which
calls its backends with its own service token.

    channel = Credentials(tls_ca=Path("var/certs/ca.pem"), token="...").channel("generation:50051")
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# The wire contract: `authorization: Bearer <token>` (the servers also accept the bare token).
TOKEN_METADATA_KEY = "authorization"
TOKEN_SCHEME = "Bearer "


class CredentialsError(ValueError):
    """A certificate, key or token file that cannot be used; the message names it."""


def read_file(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CredentialsError(f"cannot read the {what} {path}: {error.strerror or error}") from None


class TokenFile:
    """A token kept in a file and read again when the file changes, so rotating it needs no restart."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        self.current()  # a missing or empty file is an error now, not at the first call

    def current(self) -> str:
        try:
            info = self.path.stat()
        except OSError as error:
            if self._token:  # mid-rotation (the file is being replaced): keep sending the last good token
                return self._token
            raise CredentialsError(f"cannot read the token file {self.path}: {error.strerror or error}") from None
        stamp = (info.st_mtime_ns, info.st_ino, info.st_size)
        with self._lock:
            if stamp != self._stamp:
                token = read_file(self.path, "token file").decode().strip()
                if not token:
                    if self._token:
                        return self._token
                    raise CredentialsError(f"the token file {self.path} is empty")
                self._token, self._stamp = token, stamp
            return self._token


@dataclass(frozen=True)
class Credentials:
    """What a channel presents. All empty: a plaintext channel without a token (loopback stacks)."""

    tls_ca: Path | None = None  # CA that signed the server's certificate; turns TLS on
    tls_cert: Path | None = None  # client certificate for mutual TLS (with tls_key)
    tls_key: Path | None = None
    token: str | None = None
    token_file: Path | None = None  # read again when it changes (rotation)

    @classmethod
    def from_env(cls) -> Credentials:
        """From ``NIGHTCAP_TLS_CA``, ``NIGHTCAP_CLIENT_CERT``, ``NIGHTCAP_CLIENT_KEY``, ``NIGHTCAP_TOKEN`` and
        ``NIGHTCAP_TOKEN_FILE``. (Not ``NIGHTCAP_TLS_CERT``: that is a server's own certificate.)"""

        def path(name: str) -> Path | None:
            value = os.environ.get("NIGHTCAP_" + name)
            return Path(value) if value else None

        return cls(
            path("TLS_CA"),
            path("CLIENT_CERT"),
            path("CLIENT_KEY"),
            os.environ.get("NIGHTCAP_TOKEN") or None,
            path("TOKEN_FILE"),
        )

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def check(self) -> None:
        """Raises CredentialsError now if a file is missing or the combination is unusable."""
        self.channel("localhost:1").close()  # reads every file; opening a channel connects nothing yet

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A channel to ``address``: TLS when a CA or client certificate is set, with the token on every call."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CredentialsError("a client certificate needs its key, and a key its certificate (mutual TLS)")
        if self.token and self.token_file:
            raise CredentialsError("give a token or a token file, not both")
        token_source = self._token_source()
        if self.tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read_file(self.tls_ca, "CA certificate") if self.tls_ca else None,
                private_key=read_file(self.tls_key, "client key") if self.tls_key else None,
                certificate_chain=read_file(self.tls_cert, "client certificate") if self.tls_cert else None,
            )
            channel = grpc.secure_channel(address, credentials, options=list(options))
        else:
            channel = grpc.insecure_channel(address, options=list(options))
        if token_source is None:
            return channel
        return grpc.intercept_channel(channel, _TokenInterceptor(token_source))

    def aio_channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An asyncio channel with the same TLS; its caller adds the token to each call (``token_source``)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CredentialsError("a client certificate needs its key, and a key its certificate (mutual TLS)")
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=list(options))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_file(self.tls_ca, "CA certificate") if self.tls_ca else None,
            private_key=read_file(self.tls_key, "client key") if self.tls_key else None,
            certificate_chain=read_file(self.tls_cert, "client certificate") if self.tls_cert else None,
        )
        return grpc.aio.secure_channel(address, credentials, options=list(options))

    def token_source(self) -> Callable[[], str] | None:
        """The current token on each call (a token file is reread when it changes); None without one."""
        if self.token and self.token_file:
            raise CredentialsError("give a token or a token file, not both")
        return self._token_source()

    def _token_source(self) -> Callable[[], str] | None:
        if self.token_file:
            return TokenFile(self.token_file).current
        if self.token:
            token = self.token.strip()
            return lambda: token
        return None


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call. An interceptor rather than call credentials, because gRPC sends
    call credentials only over TLS and loopback stacks run in plaintext."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), (TOKEN_METADATA_KEY, TOKEN_SCHEME + self._token())]
        return _CallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
