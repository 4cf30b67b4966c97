"""Every error the server returns, in OpenAI's shape, mapped to HTTP in this one place:
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from model.engine.interface import EngineInputError
from server.dispatcher import QueueFullError, TooManyQuestionsError

log = logging.getLogger("groupwise.server")

# HTTP status -> (OpenAI error type, default code)
ERROR_KINDS = {
    400: ("invalid_request_error", "invalid_value"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    499: ("invalid_request_error", "client_disconnected"),  # never read: the client left
    500: ("server_error", "internal_error"),
    503: ("service_unavailable", "unavailable"),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or ERROR_KINDS.get(status, ERROR_KINDS[500])[1]


class ClientDisconnected(APIError):
    def __init__(self):
        super().__init__(499, "the client closed the connection")


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    kind, default_code = ERROR_KINDS.get(status, ERROR_KINDS[500])
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": code or default_code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


def format_location(location: tuple) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    text = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def validation_message(error: dict) -> tuple[str, str | None]:
    """One pydantic/FastAPI error -> (message, param)."""
    param = format_location(tuple(error.get("loc", ())))
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = "unsupported field (nothing a request asks for is silently ignored)"
    if param is None and error.get("type") == "value_error":  # a check of the whole body
        return message, None
    if param is None:
        return ("the request body must be a JSON object, sent with "
                "Content-Type: application/json"), None
    return f"{param}: {message}", param


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    message, param = validation_message(errors[0]) if errors else ("invalid request", None)
    return error_response(400, message, param)


async def _on_engine_input_error(request: Request, exc: EngineInputError) -> JSONResponse:
    return error_response(400, str(exc), exc.param)


async def _on_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{request.url.path} does not take {request.method}; it takes {allowed}"
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


RETRY_AFTER_S = 1  # a step frees room within seconds; clients back off from there


async def _on_queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    return error_response(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)})


async def _on_too_many_questions(request: Request, exc: TooManyQuestionsError) -> JSONResponse:
    return error_response(400, str(exc), "questions")


Handler = Callable[[Request, Any], Awaitable[Response]]  # Any: the exception it is registered for
HANDLERS: dict[type[Exception], Handler] = {
    APIError: _on_api_error,
    RequestValidationError: _on_validation_error,
    EngineInputError: _on_engine_input_error,
    HTTPException: _on_http_exception,
    QueueFullError: _on_queue_full,
    TooManyQuestionsError: _on_too_many_questions,
}


def install_error_handlers(app: FastAPI) -> None:
    """Unexpected exceptions are turned into 500s by the middleware (server/middleware.py)."""
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)
