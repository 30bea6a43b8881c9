"""The orchestrator's view of its two backends: typed calls, deadlines, and errors translated into
ServiceErrors that name the backend and its address."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nightcap.credentials import Credentials
from nightcap.records import Passage, from_message
from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from services.common.channels import channel_options, channel_target
from services.common.errors import (
    SERVER_KEY,
    BackendFailed,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from services.common.server import MAX_MESSAGE_BYTES

_ERRORS: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}
# The caller's own doing (bad input, load, a call it cancelled): passed on as they are, blaming no backend.
_PASSED_THROUGH: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def backend_error(name: str, address: str, error: grpc.RpcError, peer: str | None = None) -> ServiceError:
    """Client mistakes pass through as they are; everything else says which backend failed (``peer``:
    the replica that answered, when known)."""
    code, details = error.code(), error.details()
    if code in _PASSED_THROUGH:
        return _PASSED_THROUGH[code](details)
    where = peer or address
    return BackendFailed(
        code if code in _ERRORS else grpc.StatusCode.UNAVAILABLE,
        f"the {name} service at {where} failed: {code.name}: {details}",
        f"{name} {where}",
    )


class Backend:
    name = "backend"
    extra_options: tuple[tuple[str, Any], ...] = ()  # this backend's channel options beyond channel_options

    def __init__(self, address: str, credentials: Credentials | None = None) -> None:
        self.address = address
        self._credentials = credentials or Credentials()
        self._options = [*channel_options(address), *self.extra_options]
        self.channel = self.open_channel()
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._connectivity: grpc.ChannelConnectivity | None = None
        self.channel.subscribe(self._on_connectivity)

    def open_channel(self) -> grpc.Channel:
        """A channel to this backend's address(es), with its credentials, reconnect and balancing options."""
        return self._credentials.channel(channel_target(self.address), self._options)

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        self._connectivity = state

    def health(self, timeout: float = 2.0) -> tuple[str, str]:
        """(status, detail): SERVING / NOT_SERVING from grpc.health.v1, or the gRPC code when unreachable."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status), ""

    def error(self, error: grpc.RpcError, peer: str | None = None) -> ServiceError:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self._connectivity != grpc.ChannelConnectivity.READY:
            # a call that waited for a connection until its timeout: the backend is down, not slow
            return BackendFailed(
                grpc.StatusCode.UNAVAILABLE,
                f"the {self.name} service at {self.address} failed: UNAVAILABLE: not reachable ({error.details()})",
                f"{self.name} {self.address}",
            )
        return backend_error(self.name, self.address, error, peer)

    def close(self) -> None:
        self.channel.unsubscribe(self._on_connectivity)
        self.channel.close()


@dataclass
class GenerationStream:
    """A running Generate call; ``cancel`` is safe to call from any thread, at any time."""

    call: grpc.Future
    backend: GenerationBackend

    def __iter__(self) -> Iterator[generation_pb2.GenerateResponse]:
        try:
            yield from self.call
        except grpc.RpcError as error:
            raise self.backend.error(error, self.replica()) from None

    def replica(self) -> str | None:
        """host:port of the replica serving this stream, as it named itself; None before it answered."""
        try:
            metadata = self.call.initial_metadata()
        except grpc.RpcError:
            return None
        return dict(metadata or ()).get(SERVER_KEY)

    def cancel(self) -> None:
        self.call.cancel()


class GenerationBackend(Backend):
    """One channel: a chat turn makes one Generate call (its ModelInfo is cached and its tokens are counted here),
    so round-robin spreads the turns over the replicas."""

    name = "generation"
    extra_options = (("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),)  # a tokenizer is megabytes

    def __init__(self, address: str, credentials: Credentials | None = None) -> None:
        super().__init__(address, credentials)
        self._stub = generation_pb2_grpc.GenerationStub(self.channel)

    def model_info(self, timeout: float, tokenizer: str | None = None) -> generation_pb2.ModelInfoResponse:
        """``tokenizer``: the digest of the tokenizer held (NO_TOKENIZER: none), to be sent the served one when it
        is another; None: the info alone."""
        request = generation_pb2.ModelInfoRequest(tokenizer_held=tokenizer)
        try:
            return self._stub.ModelInfo(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as error:
            raise self.error(error) from None

    def generate(
        self, token_ids: list[int], params: common_pb2.SamplingParams, timeout: float | None, request_id: str
    ) -> GenerationStream:
        """``timeout`` None: no deadline, as the chat that asks had none."""
        request = generation_pb2.GenerateRequest(
            request_id=request_id, token_ids=generation_pb2.TokenIds(ids=token_ids), params=params
        )
        return GenerationStream(self._stub.Generate(request, timeout=timeout, wait_for_ready=True), self)

    def complete(
        self, token_ids: list[int], max_new_tokens: int, stop: list[str], timeout: float, request_id: str = ""
    ) -> str:
        """The whole greedy continuation of ``token_ids``, for the orchestrator's own short prompts."""
        params = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop)
        return "".join(response.text for response in self.generate(token_ids, params, timeout, request_id))


@dataclass(frozen=True)
class Found:
    """One search's passages, best first, and the index build when the index is still being filled."""

    passages: list[Passage]
    build: retrieval_pb2.IndexBuild | None = None


class RetrievalBackend(Backend):
    name = "retrieval"

    def __init__(
        self,
        address: str,
        credentials: Credentials | None = None,
        search_mode: int = retrieval_pb2.SEARCH_MODE_UNSPECIFIED,
        rerank: bool | None = None,
    ) -> None:
        """``search_mode``: how every search ranks (a retrieval_pb2.SearchMode); unspecified: the service's
        default. ``rerank``: whether the service's reranker reorders them; None: whenever it has one."""
        super().__init__(address, credentials)
        self._stub = retrieval_pb2_grpc.RetrievalStub(self.channel)
        self._search_mode = search_mode
        self._rerank = rerank

    def search(self, query: str, k: int, timeout: float, title: str = "", mixed: bool = False) -> Found:
        """``title``: a document title the query asks about; its first passages come first (``Passage.titled``).
        ``mixed``: the search is one of several whose cosine similarities are summed with weights (the ``recent``
        query mode), which is a sum in vector space: it ranks by vector unless keyword search was asked for. A
        follow-up's own words ("How many people live there?") find passages by words that do not name its
        subject, and the eval's follow-ups lost a third of their sources in the top 3 to them (0.95 -> 0.625)."""
        mode = self._search_mode
        if mixed and mode != retrieval_pb2.SEARCH_MODE_KEYWORD:
            mode = retrieval_pb2.SEARCH_MODE_VECTOR
        try:
            request = retrieval_pb2.SearchRequest(query=query, k=k, title=title, mode=mode, rerank=self._rerank)
            response = self._stub.Search(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as error:
            raise self.error(error) from None
        build = response.build if response.HasField("build") else None
        return Found([from_message(Passage, p) for p in response.passages], build)

    def embed(self, texts: list[str], timeout: float) -> np.ndarray:
        """The texts' vectors from the embedder that serves the index, one row per text."""
        try:
            response = self._stub.Embed(retrieval_pb2.EmbedRequest(texts=texts), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as error:
            raise self.error(error) from None
        return np.array([row.values for row in response.embeddings], dtype=np.float32).reshape(len(texts), -1)

    def stats(self, timeout: float) -> retrieval_pb2.StatsResponse:
        try:
            return self._stub.Stats(retrieval_pb2.StatsRequest(), timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as error:
            raise self.error(error) from None
