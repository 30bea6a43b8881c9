"""What a route needs from the app, read from ``request.app.state``: the settings, the backends and the
metrics, the metadata of its backend calls, the model it is answered by."""

from __future__ import annotations

import uuid

import grpc
from fastapi import Request

from nightcap.v1 import retrieval_pb2_grpc
from services.gateway.backends import Backends, GatewayError, http_error
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings


def gateway_settings(request: Request) -> GatewaySettings:
    return request.app.state.settings


def backends(request: Request) -> Backends:
    return request.app.state.backends


def gateway_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


def call_metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """The caller's token (or the service token) and a request id, for one backend call."""
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:12]
    return backends(request).metadata(request.state.token, request_id)


async def served_model(request: Request, requested: str | None) -> str:
    """The served model's name:version; a request naming another is 404."""
    metadata = call_metadata(request)
    names = await backends(request).model(metadata)
    if not names.matches(requested):
        names = await backends(request).model(metadata, fresh=True)  # perhaps it was just swapped in
    if not names.matches(requested):
        raise GatewayError(
            404,
            f"the model {requested!r} is not served here; this server serves {names.label!r} "
            f"(also accepted: {names.name!r}, or leave model out). GET /v1/models lists it",
            "invalid_request_error",
            "model",
            "model_not_found",
            retry=False,
        )
    return names.label


def retrieval_stub(request: Request) -> retrieval_pb2_grpc.RetrievalStub:
    """The retrieval stub; 503 when the gateway was started without one."""
    stub = backends(request).retrieval
    if stub is None:
        raise GatewayError(
            503, "no retrieval service is configured (--retrieval)", "service_unavailable", None, "no_retrieval"
        )
    return stub


def retrieval_error(request: Request, error: grpc.aio.AioRpcError) -> GatewayError:
    return http_error("retrieval", backends(request).addresses.get("retrieval", ""), error)
