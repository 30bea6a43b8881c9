"""Service errors and the one interceptor that turns them into gRPC statuses.

Servicers and engines raise these; nothing else in the services calls ``context.abort``. Any other
exception is a bug: it is logged with its traceback and reported as INTERNAL, and the server goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from loguru import logger


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


def _abort_with(context: grpc.ServicerContext, method: str, error: BaseException) -> None:
    if isinstance(error, ServiceError):
        logger.info("{} -> {}: {}", method, error.code.name, error)
        context.abort(error.code, str(error))
    logger.opt(exception=error).error("{} failed with an unexpected error", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__}: {error}")


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by any handler (unary or streaming) to gRPC statuses, in one place."""

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap_unary(behavior: Callable) -> Callable:
            def call(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behavior(request_or_iterator, context)
                except Exception as error:
                    if _is_abort(context, error):
                        raise
                    _abort_with(context, method, error)

            return call

        def wrap_stream(behavior: Callable) -> Callable:
            def call(request_or_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behavior(request_or_iterator, context)
                except Exception as error:
                    if _is_abort(context, error):
                        raise
                    _abort_with(context, method, error)

            return call

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )


def _is_abort(context: grpc.ServicerContext, error: Exception) -> bool:
    # context.abort() raises a bare Exception after recording the status; let it pass through.
    return type(error) is Exception and context.code() is not None
