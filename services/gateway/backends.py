"""The gateway's view of the stack: one grpc.aio channel per backend, so a request is one asyncio task and
not one thread, and gRPC failures translated into HTTP errors that name the backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nightcap.credentials import TOKEN_METADATA_KEY, TOKEN_SCHEME, Credentials
from nightcap.v1 import admin_pb2_grpc, chat_pb2_grpc, generation_pb2, generation_pb2_grpc, retrieval_pb2_grpc
from services.common.channels import channel_options, channel_target
from services.common.errors import FAILED_SERVICE_KEY

HEALTH_TIMEOUT_S = 2.0
# ModelInfo is asked at most this often; a hot swap shows in responses within this time (the stream's own
# first message names the version that served it, and that is what a response reports).
MODEL_INFO_TTL_S = 2.0


class GatewayError(Exception):
    """An HTTP error in OpenAI's shape; ``retry`` false sends ``x-should-retry: false`` (deterministic)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        retry: bool | None = None,
        retry_after: float | None = None,
        backend: str = "",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.backend = backend  # "name address" of the backend that failed, for 503s
        self.retry = retry if retry is not None else status in (408, 409, 429, 503)
        self.retry_after = retry_after


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_request") -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", param, code, retry=False)


# gRPC status -> (HTTP status, OpenAI error type, code)
_HTTP: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_request"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_request"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "already_exists"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "engine_full"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "backend_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
    grpc.StatusCode.CANCELLED: (503, "service_unavailable", "cancelled"),
}


def http_error(name: str, address: str, error: grpc.aio.AioRpcError) -> GatewayError:
    """The HTTP error for a failed call to backend ``name``. A backend of the orchestrator that failed is
    named by the orchestrator's trailing metadata; a backend we cannot reach at all is named by us."""
    code = error.code()
    status, type_, short = _HTTP.get(code, (500, "server_error", "internal"))
    details = error.details() or code.name
    failed = dict(error.trailing_metadata() or ()).get(FAILED_SERVICE_KEY)
    if code is grpc.StatusCode.UNAVAILABLE:
        where = failed or f"{name} {address}"
        message = details if failed else f"the {name} service at {address} is unavailable: {details}"
        return GatewayError(503, message, type_, None, short, retry=True, retry_after=1, backend=where)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return GatewayError(429, details, type_, None, short, retry=True, retry_after=1)
    if code is grpc.StatusCode.CANCELLED:
        message = f"the {name} service cancelled the request (shutting down?): {details}"
        return GatewayError(503, message, type_, None, short, retry=True, retry_after=1)
    return GatewayError(status, details, type_, None, short, retry=False)


@dataclass
class ModelNames:
    label: str  # name:version, or name when served from a folder
    name: str
    info: generation_pb2.ModelInfoResponse
    asked_at: float

    def matches(self, requested: str | None) -> bool:
        return not requested or requested in (self.label, self.name)


class Backends:
    """Stubs for the orchestrator, generation and (optionally) retrieval, made inside the server's event loop.

    Calls carry the caller's own bearer token when it sent one (each backend checks its role again), else the
    gateway's service token, if any."""

    def __init__(self, orchestrator: str, generation: str, retrieval: str | None, credentials: Credentials) -> None:
        self.addresses = {"orchestrator": orchestrator, "generation": generation}
        if retrieval:
            self.addresses["retrieval"] = retrieval
        self._channels = {
            name: credentials.aio_channel(channel_target(address), channel_options(address))
            for name, address in self.addresses.items()
        }
        self._service_token = credentials.token_source()
        self.chat = chat_pb2_grpc.ChatStub(self._channels["orchestrator"])
        self.generation = generation_pb2_grpc.GenerationStub(self._channels["generation"])
        self.admin = admin_pb2_grpc.ModelAdminStub(self._channels["generation"])
        self.retrieval = retrieval_pb2_grpc.RetrievalStub(self._channels["retrieval"]) if retrieval else None
        self._model: ModelNames | None = None

    def metadata(self, caller_token: str | None, request_id: str) -> tuple[tuple[str, str], ...]:
        token = caller_token or (self._service_token() if self._service_token else None)
        pairs = [("x-request-id", request_id)]
        if token:
            pairs.append((TOKEN_METADATA_KEY, TOKEN_SCHEME + token))
        return tuple(pairs)

    async def health(self) -> dict[str, str]:
        """SERVING, NOT_SERVING or UNAVAILABLE for each backend, asked at once."""

        async def one(name: str) -> str:
            stub = health_pb2_grpc.HealthStub(self._channels[name])
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                return error.code().name
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

        names = list(self._channels)
        states = await asyncio.gather(*(one(name) for name in names))
        return dict(zip(names, states, strict=True))

    async def model(self, metadata: Sequence[tuple[str, str]], fresh: bool = False) -> ModelNames:
        """The served model's names, asked again after MODEL_INFO_TTL_S (or at once with ``fresh``)."""
        now = time.monotonic()
        if self._model is None or fresh or now - self._model.asked_at > MODEL_INFO_TTL_S:
            try:
                info = await self.generation.ModelInfo(
                    generation_pb2.ModelInfoRequest(), timeout=HEALTH_TIMEOUT_S * 2, metadata=metadata
                )
            except grpc.aio.AioRpcError as error:
                raise http_error("generation", self.addresses["generation"], error) from None
            label = f"{info.name}:{info.version}" if info.version else info.name
            self._model = ModelNames(label, info.name, info, now)
        return self._model

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
