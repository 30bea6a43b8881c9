"""Every failure as an OpenAI error body: GatewayError, FastAPI's validation errors, unknown routes, and
whatever else escapes a route."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from loguru import logger
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway import openai_responses as replies
from services.gateway import openai_types as wire
from services.gateway import translate
from services.gateway.backends import GatewayError, bad_request

JSON_HEADERS = {"Cache-Control": "no-store"}
_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def error_response(error: GatewayError) -> JSONResponse:
    headers = {"x-should-retry": "true" if error.retry else "false", **JSON_HEADERS}
    if error.retry_after is not None:
        headers["Retry-After"] = str(int(error.retry_after))
    return JSONResponse(
        replies.error_body(error.message, error.type, error.param, error.code),
        status_code=error.status,
        headers=headers,
    )


def unsupported(error: wire.Unsupported) -> GatewayError:
    return bad_request(str(error), error.param, "unsupported_parameter")


def checked(body: Any, *limits: Any) -> None:
    """``body.check(*limits)``: a field this server does not support is a 400 that names it."""
    try:
        body.check(*limits)
    except wire.Unsupported as error:
        raise unsupported(error) from None


def named(error: GatewayError, body: Any) -> GatewayError:
    """A backend's 400 (INVALID_ARGUMENT) with ``param`` set to the client's field its message names."""
    if error.status == 400 and error.param is None:
        error.param = translate.backend_param(error.message, body)
    return error


def _param(location: tuple) -> str | None:
    """``messages[0].content`` from pydantic's location, without "body" and the tags of union members."""
    parts = [
        str(p)
        for p in location
        if p != "body" and (isinstance(p, int) or (str(p).isidentifier() and str(p) not in _UNION_TAGS))
    ]
    if not parts:
        return None
    text = parts[0]
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def validation_error(error: RequestValidationError) -> GatewayError:
    """FastAPI's 422 as OpenAI's 400, naming the first field that is wrong."""
    first = error.errors()[0]
    kind, param = first.get("type", ""), _param(tuple(first.get("loc", ())))
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    if kind == "extra_forbidden":
        return bad_request(f"unknown field {param!r}: this server does not support it", param, "unknown_field")
    if kind == "missing":
        if param is None:
            return bad_request("the request needs a JSON body")
        return bad_request(f"{param} is required", param, "missing_field")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return bad_request(f"{param}: {message}" if param else message, param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, error: GatewayError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see /v1/models, /v1/chat/completions, ..."
            return error_response(
                GatewayError(404, message, "invalid_request_error", None, "unknown_route", retry=False)
            )
        if error.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
            return error_response(
                GatewayError(405, message, "invalid_request_error", None, "method_not_allowed", retry=False)
            )
        return error_response(GatewayError(error.status_code, str(error.detail), "invalid_request_error", retry=False))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.opt(exception=error).error("{} {} failed with an unexpected error", request.method, request.url.path)
        return error_response(GatewayError(500, f"internal error: {type(error).__name__}: {error}", "server_error"))
