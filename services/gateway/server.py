"""The gateway on uvicorn: bound to a socket we open (so port 0 works and the caller learns the port), served
in a thread for tests and benchmarks, or in the main thread by the CLI (uvicorn handles SIGTERM there)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings

START_TIMEOUT_S = 30.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def bind(address: str) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one)."""
    host, port = _split(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(
            f"could not bind {address}: {error.strerror or error}; is another process listening there?"
        ) from None
    sock.listen(2048)
    return sock


def uvicorn_config(
    settings: GatewaySettings,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    grace: float = 5.0,
    log_level: str = "warning",
) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        timeout_graceful_shutdown=grace,
        log_level=log_level.lower(),
        access_log=False,  # the gateway logs one line per request itself
        lifespan="on",
        server_header=False,
        timeout_keep_alive=30,
    )


@dataclass
class RunningGateway:
    server: uvicorn.Server
    thread: threading.Thread
    port: int
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        self.server.should_exit = True
        self.thread.join(grace + 5)


def start_gateway(
    settings: GatewaySettings,
    address: str = "127.0.0.1:0",
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> RunningGateway:
    """The gateway serving in a background thread; returns once it accepts requests."""
    sock = bind(address)
    server = uvicorn.Server(uvicorn_config(settings, tls_cert, tls_key, grace=1.0))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True, name="gateway")
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start (see the log above)")
        time.sleep(0.02)
    return RunningGateway(server, thread, sock.getsockname()[1], "https" if tls_cert else "http")
