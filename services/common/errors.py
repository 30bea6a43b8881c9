"""Service errors and the one interceptor that turns them into gRPC statuses.

Servicers and engines raise these; nothing else in the services calls ``context.abort``. Any other
exception is a bug: it is logged with its traceback and reported as INTERNAL, and the server goes on.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import empty_pb2, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError
from loguru import logger

# Metadata a failing call carries so a client can tell "I reached the server, but its backend failed"
# from "I could not reach the server": ``name address`` of the backend that failed.
FAILED_SERVICE_KEY = "nightcap-failed-service"
# Initial metadata of every server-streaming call: which server (host:port) is answering it, so that a
# client of several replicas can say which one a broken stream came from.
SERVER_KEY = "nightcap-server"
HEALTH_SERVICE_PREFIX = "/grpc.health.v1."


class ServiceError(Exception):
    """An error a client can act on; ``code`` is the gRPC status it becomes."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class BackendFailed(ServiceError):
    """A backend this server called failed; ``service`` names it (e.g. "generation 127.0.0.1:50051")."""

    def __init__(self, code: grpc.StatusCode, message: str, service: str) -> None:
        super().__init__(message)
        self.code = code
        self.service = service


def _failure(method: str, error: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status, message and trailing metadata ``error`` becomes, logged: the one mapping both servers use."""
    trailing: tuple[tuple[str, str], ...] = ()
    if isinstance(error, BackendFailed):
        # a negative pushback tells gRPC clients not to retry: this server already waited for its backend
        trailing = ((FAILED_SERVICE_KEY, error.service), ("grpc-retry-pushback-ms", "-1"))
    if isinstance(error, ServiceError):
        logger.info("{} -> {}: {}", method, error.code.name, error)
        return error.code, str(error), trailing
    logger.opt(exception=error).error("{} failed with an unexpected error", method)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__}: {error}", trailing


def _abort_with(context: grpc.ServicerContext, method: str, error: BaseException) -> None:
    code, message, trailing = _failure(method, error)
    if trailing:
        context.set_trailing_metadata(trailing)
    context.abort(code, message)


async def _abort_with_async(context: grpc.aio.ServicerContext, method: str, error: BaseException) -> None:
    code, message, trailing = _failure(method, error)
    await context.abort(code, message, trailing)


@dataclass(frozen=True)
class _Refused:
    """What a guarded deserializer returns for a request it will not parse; the handler raises ``error``."""

    error: ServiceError


def invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path (``history[1].content``) of the first string field in ``data`` that is not valid UTF-8.

    The parser only says "error parsing message"; re-reading the bytes as unknown fields of an empty
    message gives each field's raw bytes without validating them, so each string can be checked by name."""
    holder = empty_pb2.Empty()
    try:
        holder.ParseFromString(data)
    except DecodeError:
        return None
    seen: dict[str, int] = {}
    for raw in unknown_fields.UnknownFieldSet(holder):
        field = descriptor.fields_by_number.get(raw.field_number)
        if field is None or raw.wire_type != 2:  # 2: length-delimited (strings, bytes, messages)
            continue
        name = prefix + field.name
        if field.is_repeated:
            seen[field.name] = seen.get(field.name, -1) + 1
            name += f"[{seen[field.name]}]"
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                raw.data.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            found = invalid_utf8_field(field.message_type, raw.data, name + ".")
            if found is not None:
                return found
    return None


def guarded_deserializer(deserialize: Callable[[bytes], Any] | None, max_input_bytes: int) -> Callable:
    """Wraps a request deserializer: a request over ``max_input_bytes`` is refused before it is parsed, and
    one that does not parse (e.g. a lone UTF-16 surrogate from a JavaScript client in a string field) is
    INVALID_ARGUMENT naming the field. grpcio deserializes before any handler runs and would answer both
    with INTERNAL "Exception deserializing request!"."""
    message_class = getattr(deserialize, "__self__", None)

    def parse(data: bytes) -> Any:
        if len(data) > max_input_bytes:
            return _Refused(
                InvalidArgument(
                    f"the request is {len(data):,} bytes; this server accepts at most {max_input_bytes:,}"
                    " (--max-input-bytes): send a shorter message"
                )
            )
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except DecodeError as error:
            descriptor = getattr(message_class, "DESCRIPTOR", None)
            field = invalid_utf8_field(descriptor, data) if descriptor is not None else None
            if field is not None:
                return _Refused(InvalidArgument(f"field {field} is not valid UTF-8 (strings must be UTF-8)"))
            return _Refused(InvalidArgument(f"the request could not be parsed as {descriptor.full_name}: {error}"))

    return parse


def _checked(requests: Iterable[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, _Refused):
            raise request.error
        yield request


async def _checked_async(requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Refused):
            raise request.error
        yield request


def _unrefused(request: Any) -> Any:
    if isinstance(request, _Refused):
        raise request.error
    return request


class _CallGuard:
    """What the threaded and the asyncio interceptor share: the bound on calls running at once (health
    checks always pass), the size and parse check of requests, and the server's name."""

    def __init__(
        self, max_concurrent_rpcs: int = 1 << 30, max_input_bytes: int = 1 << 30, server_name: str = ""
    ) -> None:
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.max_input_bytes = max_input_bytes
        self.server_name = server_name
        self._running = 0
        self._lock = threading.Lock()

    def _enter(self, method: str) -> None:
        if method.startswith(HEALTH_SERVICE_PREFIX):
            return
        with self._lock:
            if self._running >= self.max_concurrent_rpcs:
                raise ResourceExhausted(
                    f"this server is running its limit of {self.max_concurrent_rpcs} concurrent calls"
                    " (--max-concurrent-rpcs): retry later"
                )
            self._running += 1

    def _leave(self, method: str) -> None:
        if not method.startswith(HEALTH_SERVICE_PREFIX):
            with self._lock:
                self._running -= 1

    def _rewrapped(
        self, handler: grpc.RpcMethodHandler, wrap_unary: Callable, wrap_stream: Callable
    ) -> grpc.RpcMethodHandler:
        """``handler`` with its behaviour wrapped by shape and its deserializer guarded."""
        deserialize = guarded_deserializer(handler.request_deserializer, self.max_input_bytes)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), deserialize, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), deserialize, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), deserialize, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), deserialize, handler.response_serializer
        )


class ErrorInterceptor(_CallGuard, grpc.ServerInterceptor):
    """Maps exceptions raised by any handler (unary or streaming) to gRPC statuses, in one place; refuses
    oversized and unparsable requests; bounds the calls running at once (health checks always pass).

    ``server_name`` (host:port) goes out as initial metadata of every server-streaming call."""

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        checked = _checked if handler.request_streaming else _unrefused

        def wrap_unary(behavior: Callable) -> Callable:
            def call(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                try:
                    self._enter(method)
                except ServiceError as error:
                    _abort_with(context, method, error)
                try:
                    return behavior(checked(request_or_iterator), context)
                except Exception as error:
                    if _is_abort(context, error):
                        raise
                    _abort_with(context, method, error)
                finally:
                    self._leave(method)

            return call

        def wrap_stream(behavior: Callable) -> Callable:
            def call(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    self._enter(method)
                except ServiceError as error:
                    _abort_with(context, method, error)
                try:
                    if self.server_name and not _sent_server_name(context, self.server_name):
                        return  # the client went away before the call started
                    yield from behavior(checked(request_or_iterator), context)
                except Exception as error:
                    if _is_abort(context, error):
                        raise
                    _abort_with(context, method, error)
                finally:
                    self._leave(method)

            return call

        return self._rewrapped(handler, wrap_unary, wrap_stream)


class AsyncErrorInterceptor(_CallGuard, grpc.aio.ServerInterceptor):
    """ErrorInterceptor for a ``grpc.aio`` server, whose handlers are coroutines and async generators.

    A call that ends because its client cancelled, hung up or ran out of time raises
    ``asyncio.CancelledError`` in its handler; that passes through untouched (it is no error of ours)."""

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        checked = _checked_async if handler.request_streaming else _unrefused

        def wrap_unary(behavior: Callable) -> Callable:
            async def call(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    self._enter(method)
                except ServiceError as error:
                    await _abort_with_async(context, method, error)
                try:
                    return await behavior(checked(request_or_iterator), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await _abort_with_async(context, method, error)
                finally:
                    self._leave(method)

            return call

        def wrap_stream(behavior: Callable) -> Callable:
            async def call(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    self._enter(method)
                except ServiceError as error:
                    await _abort_with_async(context, method, error)
                try:
                    if self.server_name:
                        await context.send_initial_metadata(((SERVER_KEY, self.server_name),))
                    responses = behavior(checked(request_or_iterator), context)
                    if not inspect.isasyncgen(responses):
                        await responses  # a handler that writes with context.write (health's Watch)
                        return
                    async with contextlib.aclosing(responses):  # its finally runs when the client leaves
                        async for response in responses:
                            yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await _abort_with_async(context, method, error)
                finally:
                    self._leave(method)

            return call

        return self._rewrapped(handler, wrap_unary, wrap_stream)


def _sent_server_name(context: grpc.ServicerContext, server_name: str) -> bool:
    """Sends the server's name as initial metadata; False when the call was cancelled meanwhile (seen in
    the soak: a queued call whose client gave up raised here and was logged as an unexpected error)."""
    try:
        context.send_initial_metadata(((SERVER_KEY, server_name),))
    except grpc.RpcError:
        if context.is_active():
            raise
        return False
    return True


def _is_abort(context: grpc.ServicerContext, error: Exception) -> bool:
    # context.abort() raises a bare Exception after recording the status; let it pass through.
    return type(error) is Exception and context.code() is not None
