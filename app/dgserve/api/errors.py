"""The one place errors become HTTP responses, and the request-id boundary.

Every error response, whatever raised it, has the body
``{"error": {"code", "message", "request_id"}}``:

* ``DGServeError`` subclasses (``dgserve.errors``) carry their own status, code and
  headers (``Retry-After`` on 503);
* FastAPI's ``RequestValidationError`` (a bad query parameter) is a 422
  ``invalid_request`` naming the parameter;
* Starlette's ``HTTPException`` (unknown route 404, wrong method 405) keeps its
  status and headers;
* anything else is logged with the request id and answered with a plain 500
  ``internal_error`` -- by ``RequestContextMiddleware``, which sits inside Starlette's
  own error middleware so the traceback is logged once, with the request id, and
  never re-raised into the server;
* a request the server cancels (uvicorn does, when its shutdown timeout runs out) is
  answered ``503 shutting_down``, not with uvicorn's plain-text 500.

The middleware also accepts ``X-Request-ID`` (or makes one), echoes it on every
response, and reports each answered request (endpoint template, status, seconds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dgserve.errors import DGServeError, ShuttingDownError
from dgserve.randomness import request_id as new_request_id

__all__ = [
    "RequestContextMiddleware", "endpoint_of", "error_body", "error_response", "install_error_handlers",
    "request_id_of", "typed_error_response",
]  # fmt: skip

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Where a request's ``scope["state"]`` keeps the queue place the admission gate took for it
# (``api/admission.py``), for the route's ``admit`` to use.
HELD = "dgserve.reservation"
# A client's id is echoed back and logged: keep it short and free of control characters.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

ResponseObserver = Callable[[Scope, int, float], None]


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


def _document(code: str, message: str, request_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def error_response(
    status: int, code: str, message: str, request_id: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(_document(code, message, request_id), status_code=status, headers=dict(headers or {}))


def error_body(code: str, message: str, request_id: str) -> bytes:
    """The same body as ``error_response``'s, for answers written below the app (``connections.py``)."""
    return json.dumps(_document(code, message, request_id), separators=(",", ":")).encode()


def typed_error_response(scope: Scope, exc: DGServeError) -> JSONResponse:
    """A ``DGServeError``'s answer: its status, code and headers (also for the drain, ``api/drain.py``)."""
    scope.setdefault("state", {})["error_code"] = exc.code  # for the rejection metrics
    return error_response(exc.status_code, exc.code, exc.message, request_id_of(scope), exc.headers)


async def _dgserve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DGServeError)
    if exc.status_code >= 500 and exc.status_code != 503:
        log.warning("request %s: %s: %s", request_id_of(request.scope), exc.code, exc.message)
    return typed_error_response(request.scope, exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, code, message, request_id_of(request.scope), exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    message = "; ".join(problems) or "invalid request"
    return error_response(422, "invalid_request", message, request_id_of(request.scope))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DGServeError, _dgserve_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)


class RequestContextMiddleware:
    """Request ids, the 500 boundary, and per-request metrics, as plain ASGI (no per-request task)."""

    def __init__(self, app: ASGIApp, on_response: ResponseObserver | None = None) -> None:
        self.app = app
        self.on_response = on_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _incoming_request_id(scope) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: unhandled error", request_id)
            if not response_started:
                response = error_response(500, "internal_error", "internal server error", request_id)
                await response(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # Only uvicorn's shutdown cancels a request task (api/drain.py's backstop); the
            # answer goes out before the cancellation goes on.
            if not response_started:
                exc = ShuttingDownError("the server shut down before this request finished")
                await typed_error_response(scope, exc)(scope, receive, send_with_id)
            raise
        finally:
            if self.on_response is not None:
                try:
                    self.on_response(scope, status, time.perf_counter() - started)
                except Exception:
                    log.exception("request %s: response observer failed", request_id)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1").strip()
            return text if _VALID_REQUEST_ID.match(text) else None
    return None


def endpoint_of(scope: Scope) -> str:
    """The matched route's path template (bounded label values), or "unmatched"."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
