"""The orchestrator's view of its two backends: typed calls, deadlines, and errors translated into
ServiceErrors that name the backend and its address."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nightcap.records import Passage, from_message
from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

_ERRORS: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def backend_error(name: str, address: str, error: grpc.RpcError) -> ServiceError:
    """Client mistakes pass through as they are; everything else says which backend failed."""
    code, details = error.code(), error.details()
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return _ERRORS[code](details)
    kind = _ERRORS.get(code, Unavailable)
    return kind(f"the {name} service at {address} failed: {code.name}: {details}")


class Backend:
    name = "backend"

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def health(self, timeout: float = 2.0) -> tuple[str, str]:
        """(status, detail): SERVING / NOT_SERVING from grpc.health.v1, or the gRPC code when unreachable."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as error:
            return error.code().name, error.details() or ""
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status), ""

    def error(self, error: grpc.RpcError) -> ServiceError:
        return backend_error(self.name, self.address, error)

    def close(self) -> None:
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
            raise self.backend.error(error) from None

    def cancel(self) -> None:
        self.call.cancel()


class GenerationBackend(Backend):
    name = "generation"

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self._stub = generation_pb2_grpc.GenerationStub(self.channel)

    def model_info(self, timeout: float) -> generation_pb2.ModelInfoResponse:
        try:
            return self._stub.ModelInfo(generation_pb2.ModelInfoRequest(), timeout=timeout)
        except grpc.RpcError as error:
            raise self.error(error) from None

    def count_tokens(self, text: str, timeout: float) -> int:
        try:
            return self._stub.Tokenize(generation_pb2.TokenizeRequest(text=text), timeout=timeout).token_count
        except grpc.RpcError as error:
            raise self.error(error) from None

    def tokenize(self, text: str, timeout: float) -> list[int]:
        request = generation_pb2.TokenizeRequest(text=text, return_ids=True)
        try:
            return list(self._stub.Tokenize(request, timeout=timeout).token_ids)
        except grpc.RpcError as error:
            raise self.error(error) from None

    def generate(
        self, token_ids: list[int], params: common_pb2.SamplingParams, timeout: float, request_id: str
    ) -> GenerationStream:
        request = generation_pb2.GenerateRequest(
            request_id=request_id, token_ids=generation_pb2.TokenIds(ids=token_ids), params=params
        )
        return GenerationStream(self._stub.Generate(request, timeout=timeout), self)

    def complete(
        self, token_ids: list[int], max_new_tokens: int, stop: list[str], timeout: float, request_id: str = ""
    ) -> str:
        """The whole greedy continuation of ``token_ids``, for the orchestrator's own short prompts."""
        params = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop)
        return "".join(response.text for response in self.generate(token_ids, params, timeout, request_id))


class RetrievalBackend(Backend):
    name = "retrieval"

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self._stub = retrieval_pb2_grpc.RetrievalStub(self.channel)

    def search(self, query: str, k: int, timeout: float) -> list[Passage]:
        try:
            response = self._stub.Search(retrieval_pb2.SearchRequest(query=query, k=k), timeout=timeout)
            return [from_message(Passage, p) for p in response.passages]
        except grpc.RpcError as error:
            raise self.error(error) from None

    def stats(self, timeout: float) -> retrieval_pb2.StatsResponse:
        try:
            return self._stub.Stats(retrieval_pb2.StatsRequest(), timeout=timeout)
        except grpc.RpcError as error:
            raise self.error(error) from None
