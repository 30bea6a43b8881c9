"""One gRPC server bootstrap for all three services: health, reflection, the error interceptor,
port 0 support, and a SIGTERM-driven graceful stop.

``start_server`` is the threaded server (a thread per running call: retrieval, orchestrator);
``start_aio_server`` is the same server on ``grpc.aio`` in an event loop of its own thread, for generation,
whose streams would otherwise each hold a thread that competes with torch for the CPU."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass, field
from typing import Annotated, Any

import grpc
import typer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from loguru import logger

from services.common.channels import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS
from services.common.errors import AsyncErrorInterceptor, ErrorInterceptor
from services.common.security import ServerSecurity

# Messages are mostly small; retrieval batches and long prompts stay well under this.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Threads beyond the call limit: health checks (never refused) and the refusals themselves need one each.
SPARE_THREADS = 8
# An asyncio server's threads for blocking work (a submit waiting out an in-place swap, tokenizing a prompt):
# a few, whatever the number of streams.
AIO_BLOCKING_THREADS = 4


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now: for a child process to bind (a rank group's rendezvous, a
    service a test or benchmark starts). Another process could take it first; callers that start a
    server on it find out when it fails to bind."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# The clients' keepalive (services/common/channels.py) pings every KEEPALIVE_TIME_MS, calls or not: a server
# left at gRPC's defaults (pings at most every 5 min without data, 2 strikes) answers that with GOAWAY
# "too_many_pings" and drops the connection. It accepts them at half that interval (a ping may come early) and
# never strikes; it pings its clients the same way, so a stream to a client cut off by a partition is cancelled
# (and its batch slot freed) within seconds instead of after TCP's retransmissions (15 minutes).
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    *SERVER_KEEPALIVE_OPTIONS,
]


@dataclass(frozen=True)
class ServerLimits:
    """What one server accepts: calls running at once (beyond: RESOURCE_EXHAUSTED) and request size."""

    max_concurrent_rpcs: int = 256
    max_input_bytes: int = 1024 * 1024


# The two limits as CLI options; every service's `serve` takes them the same way.
MaxConcurrentRpcs = Annotated[
    int,
    typer.Option(
        envvar="NIGHTCAP_MAX_CONCURRENT_RPCS",
        min=1,
        help="Calls this server runs at once (streams included); beyond, RESOURCE_EXHAUSTED. Health is exempt.",
    ),
]
MaxInputBytes = Annotated[
    int,
    typer.Option(
        envvar="NIGHTCAP_MAX_INPUT_BYTES",
        min=1,
        help="Largest request message accepted, in bytes; larger ones are refused unread (INVALID_ARGUMENT).",
    ),
]


@dataclass
class ServiceBinding:
    """A servicer and how to attach it: ``add`` is the generated ``add_XServicer_to_server``."""

    full_name: str  # e.g. "nightcap.v1.Generation", from the generated DESCRIPTOR
    add: Callable[[Any, grpc.Server], None]
    servicer: Any


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str] = field(default_factory=list)
    health_port: grpc.Server | None = None  # ServerSecurity.health_address: health alone, in plaintext

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def stop(self, grace: float | None = 5.0) -> None:
        self.set_serving(False)
        self.server.stop(grace).wait()
        if self.health_port is not None:
            self.health_port.stop(0)


def start_server(
    bindings: list[ServiceBinding],
    address: str,
    limits: ServerLimits | None = None,
    security: ServerSecurity | None = None,
) -> RunningServer:
    """Starts a server on ``address`` ("host:port"; port 0 picks a free one) and marks it SERVING.

    Each running call holds a thread (a stream too), so the pool is sized to the call limit. ``security``
    (default: open plaintext, refused beyond loopback) sets TLS, tokens and reflection."""
    limits = limits or ServerLimits()
    security = security or ServerSecurity()
    security.check_address(address)
    interceptor = ErrorInterceptor(limits.max_concurrent_rpcs, limits.max_input_bytes)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.max_concurrent_rpcs + SPARE_THREADS, thread_name_prefix="grpc"),
        interceptors=[*security.interceptors(), interceptor],
        # grpcio's own hard bound, above ours so that ours (which names the flag) answers first
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs + SPARE_THREADS,
        options=SERVER_OPTIONS,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    port = _attach(server, health_servicer, bindings, address, security)
    health_port = security.start_health_port(health_servicer)
    interceptor.server_name = _server_name(address, port)
    server.start()
    names = [binding.full_name for binding in bindings]
    running = RunningServer(server, port, health_servicer, names, health_port)
    running.set_serving(True)
    return running


@dataclass
class AsyncRunningServer:
    """A ``grpc.aio`` server and the thread its event loop runs on. Its methods are for other threads
    (tests, ``serve_until_signalled``, a failing shard's thread): each waits for the loop to do the work."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    service_names: list[str] = field(default_factory=list)
    health_port: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_serving(self, serving: bool) -> None:
        _on_loop(self.loop, _set_health(self.health, self.service_names, serving))

    def stop(self, grace: float | None = 5.0) -> None:
        """Stops admitting calls, lets running ones finish for ``grace`` seconds, cancels the rest, then ends
        the loop. A second call does nothing."""
        if self.loop.is_closed():
            return
        self.set_serving(False)
        _on_loop(self.loop, self._stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()

    async def _stop(self, grace: float | None) -> None:
        await self.server.stop(grace)
        if self.health_port is not None:
            await self.health_port.stop(0)


def start_aio_server(
    bindings: list[ServiceBinding],
    address: str,
    limits: ServerLimits | None = None,
    security: ServerSecurity | None = None,
) -> AsyncRunningServer:
    """``start_server`` on ``grpc.aio``: the same health, reflection, limits, errors and security, with the
    servicers' methods as coroutines and async generators. A running call holds no thread; the server's
    loop runs in a thread of its own, so this returns once the server is SERVING, as ``start_server`` does."""
    limits = limits or ServerLimits()
    security = security or ServerSecurity()
    security.check_address(address)
    loop = asyncio.new_event_loop()
    blocking = futures.ThreadPoolExecutor(max_workers=AIO_BLOCKING_THREADS, thread_name_prefix="grpc-aio-blocking")
    loop.set_default_executor(blocking)  # asyncio.to_thread in the servicers
    thread = threading.Thread(target=_run_loop, args=(loop, blocking), name="grpc-aio", daemon=True)
    thread.start()
    try:
        server, port, health_servicer, health_port = _on_loop(loop, _start_aio(bindings, address, limits, security))
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        raise
    running = AsyncRunningServer(
        server, port, health_servicer, loop, thread, [b.full_name for b in bindings], health_port
    )
    running.set_serving(True)
    return running


async def _start_aio(
    bindings: list[ServiceBinding], address: str, limits: ServerLimits, security: ServerSecurity
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer, grpc.aio.Server | None]:
    """The server is made here because a ``grpc.aio`` server belongs to the loop it was made on."""
    interceptor = AsyncErrorInterceptor(limits.max_concurrent_rpcs, limits.max_input_bytes)
    server = grpc.aio.server(
        interceptors=[*security.aio_interceptors(), interceptor],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs + SPARE_THREADS,  # as in start_server
        options=SERVER_OPTIONS,
    )
    health_servicer = health_aio.HealthServicer()
    port = _attach(server, health_servicer, bindings, address, security)
    health_port = await security.start_aio_health_port(health_servicer)
    interceptor.server_name = _server_name(address, port)
    await server.start()
    return server, port, health_servicer, health_port


def _run_loop(loop: asyncio.AbstractEventLoop, blocking: futures.ThreadPoolExecutor) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        # a worker may still wait out an in-place swap for a call that is gone; nobody waits for it
        blocking.shutdown(wait=False, cancel_futures=True)
        loop.close()


def _on_loop(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Runs ``coroutine`` on ``loop`` (in its own thread) and waits for its result."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result()


async def _set_health(servicer: health_aio.HealthServicer, names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await servicer.set(name, status)


def _attach(
    server: Any, health_servicer: Any, bindings: list[ServiceBinding], address: str, security: ServerSecurity
) -> int:
    """Health, the services and reflection onto either kind of server, bound to ``address``; returns the port."""
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [binding.full_name for binding in bindings]
    for binding in bindings:
        binding.add(binding.servicer, server)
    if security.reflection:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        port = security.add_port(server, address)
    except RuntimeError:  # grpcio >= 1.60 raises "Failed to bind to address" where older ones returned 0
        port = 0
    if port == 0:
        raise OSError(f"could not bind {address}: is another process listening there?")
    return port


def _server_name(address: str, port: int) -> str:
    """host:port as a client would name this server; a wildcard host becomes this machine's name."""
    host = address.rpartition(":")[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


def serve_until_signalled(
    running: RunningServer | AsyncRunningServer,
    name: str,
    grace: float = 10.0,
    on_stop: Callable[[float], None] | None = None,
) -> None:
    """Blocks until SIGTERM or SIGINT, then stops admitting calls and drains for ``grace`` seconds.

    ``on_stop(grace)`` runs first (e.g. the engine finishing its running requests)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("{} got {}; draining for up to {:.0f}s", name, signal.Signals(signum).name, grace)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("{} serving on port {}", name, running.port)
    stop.wait()
    running.set_serving(False)
    if on_stop is not None:
        on_stop(grace)
    running.stop(grace)
    logger.info("{} stopped", name)
