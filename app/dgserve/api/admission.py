"""Refusing an inference request whose model's queue is full, before the app sees it.

Under overload most requests are refused, so refusing must cost next to nothing
(issue 13, finding 1). Through the whole stack (the request-context and drain
middleware, FastAPI's routing, the query model, the dependency that checks the API
key, the exception handler) a refusal cost about 1.3 ms of one interpreter's time,
the same interpreter that decodes and answers the requests being served: at 25
times the clients a model can serve, the refusals took the server from the requests
it had accepted, their goodput fell to a third, and a refusal waited seconds for
its turn.

``Admission`` is asked by the connection's protocol (``api/connections.py``) as soon
as a request's headers are parsed: for ``POST /v1/models/{name}/{endpoint}`` and the
Open Inference Protocol's ``POST /v2/models/{name}[/versions/{v}]/infer``, if the
model version is serving, it takes the request's place in the batcher's queue then
and there (``Reservation``; the route's ``admit`` finds it in the scope). When the
queue is full, the request is answered by a small ASGI callable instead of the app:
the same 503, JSON body, ``Retry-After`` and ``X-Request-ID`` as the app's, counted
in the same metrics, written to the socket by the protocol itself (no ASGI cycle, no
task), the body (if any) read and thrown away. A connection gets at most one such refusal
per ``REFUSAL_INTERVAL_S`` (a sooner one is held until then), so that a client retrying in a
tight loop cannot take the event loop from the requests being served.
Everything else, including any doubt (an unknown model, an endpoint of another task,
a bad API key, a drain under way), goes through the app, which gives its usual answer.

``GET /healthz`` is answered the same way, never held: liveness asks whether the
event loop runs, and under overload a probe that had to wait for the app's middleware
and routing behind a loop full of refusals took hundreds of milliseconds to say so.
"""

from __future__ import annotations

import http
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from dgserve.api.auth import ApiKeys, presented_key
from dgserve.api.drain import DrainState
from dgserve.api.errors import HELD, REQUEST_ID_HEADER, error_body
from dgserve.errors import DGServeError, QueueFullError
from dgserve.metrics import Metrics
from dgserve.randomness import request_id as new_request_id
from dgserve.serving.reservation import Reservation
from dgserve.serving.service import ServingService
from dgserve.tasks import get_task

__all__ = ["HELD", "Admission", "AsgiApp", "EarlyAnswer"]

AsgiApp = Callable[[dict[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[None]]], Awaitable[None]]

_V1 = re.compile(rb"/v1/models/([^/?]+)/([a-z_-]+)/?(?:\?(.*))?")
_V2 = re.compile(rb"/v2/models/([^/?]+)(?:/versions/([0-9]+))?/infer/?(?:\?(.*))?")
_VERSION = re.compile(rb"(?:^|&)version=([0-9]+)(?:&|$)")
_HEALTHZ = re.compile(rb"/healthz(?:\?.*)?")
_ALIVE_BODY = b'{"status":"ok"}'  # what the app's /healthz answers (api/routes/health.py)
# The route templates, as the app's metrics label them.
_V1_TEMPLATE = "/v1/models/{name}/%s"
_V2_TEMPLATES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


class Admission:
    """``app_for(method, url, headers, app, state)``: the ASGI app to run this request with."""

    def __init__(self, service: ServingService, keys: ApiKeys, drain: DrainState, metrics: Metrics) -> None:
        self.service = service
        self.keys = keys
        self.drain = drain
        self.metrics = metrics

    def app_for(
        self, method: bytes, url: bytes, headers: Sequence[tuple[bytes, bytes]], app: AsgiApp, state: dict[str, Any]
    ) -> AsgiApp:
        """``app`` itself, or an early answer, or ``app`` holding the request's queue place (``HELD`` in ``state``).

        The place is taken here, as the headers are parsed, not when the app's task
        first runs: in one turn of the event loop a burst of requests are all parsed
        before any task runs, and each would see room that the others then took.
        """
        if method == b"GET" and _HEALTHZ.fullmatch(url):
            return self._alive(headers)
        admitted = self._admit(method, url, headers)
        if admitted is None:
            return app
        if isinstance(admitted, Reservation):
            state[HELD] = admitted
            return _holding(app, admitted)
        return admitted

    def _admit(
        self, method: bytes, url: bytes, headers: Sequence[tuple[bytes, bytes]]
    ) -> EarlyAnswer | Reservation | None:
        if method != b"POST" or self.drain.draining:
            return None
        v1 = _V1.fullmatch(url)
        if v1 is not None:
            name, endpoint, oip = v1.group(1), v1.group(2).decode(), False
            version, template = _query_version(v1.group(3)), _V1_TEMPLATE % endpoint
        else:
            v2 = _V2.fullmatch(url)
            if v2 is None:
                return None
            name, endpoint, oip = v2.group(1), None, True
            template = _V2_TEMPLATES[v2.group(2) is not None]
            # The unversioned route also takes ?version= (oip/http.py); a version in the path wins.
            version = int(v2.group(2)) if v2.group(2) else _query_version(v2.group(3))
        served = self._served(name.decode("utf-8", "replace"), version)
        if served is None or served.batcher is None or served.manifest is None:
            return None
        if endpoint is not None and get_task(served.manifest.task).endpoint != endpoint:
            return None
        if not self._authorised(headers):
            return None
        try:
            return served.batcher.reserve()  # counts a rejection, and estimates the drain
        except QueueFullError as exc:
            return self._answer(exc, served.name, served.version, template, oip, headers)
        except DGServeError:
            return None  # stopping or not started: the app says so

    def _served(self, name: str, version: int | None) -> Any:
        group = self.service.models.groups.get(name)
        if group is None:
            return None
        served = group.default if version is None else group.versions.get(version)
        return served if served is not None and served.ready else None

    def _authorised(self, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        if not self.keys.enabled:
            return True
        key = presented_key((n.decode("latin-1"), v.decode("latin-1")) for n, v in headers)
        try:
            self.keys.check(key, "infer")
        except Exception:
            return False  # the app answers 401 or 403
        return True

    def _answer(
        self, exc: QueueFullError, model: str, version: int, template: str, oip: bool,
        headers: Sequence[tuple[bytes, bytes]],
    ) -> EarlyAnswer:  # fmt: skip
        request_id = _request_id(headers)
        # The protocol's own error shape on the OIP.
        body = json.dumps({"error": exc.message}).encode() if oip else error_body(exc.code, exc.message, request_id)
        extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        observe = partial(self.metrics.observe_request, model, version, template, 503)
        return EarlyAnswer(503, _json_headers(body, request_id, extra), body, observe, paced=True)

    def _alive(self, headers: Sequence[tuple[bytes, bytes]]) -> EarlyAnswer:
        observe = partial(self.metrics.observe_request, "", "", "/healthz", 200)  # as the app counts it
        return EarlyAnswer(200, _json_headers(_ALIVE_BODY, _request_id(headers)), _ALIVE_BODY, observe, paced=False)


def _query_version(query: bytes | None) -> int | None:
    """The ``version=`` a query string names, as the routes read it; None without one."""
    found = _VERSION.search(query or b"")
    return int(found.group(1)) if found else None


def _request_id(headers: Sequence[tuple[bytes, bytes]]) -> str:
    request_id = next((v.decode("latin-1") for n, v in headers if n == REQUEST_ID_HEADER.encode()), "")
    return request_id[:128] or new_request_id()


def _json_headers(
    body: bytes, request_id: str, extra: Sequence[tuple[bytes, bytes]] = ()
) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (REQUEST_ID_HEADER.encode(), request_id.encode("latin-1")),
        *extra,
    ]


class EarlyAnswer:
    """An answer decided as the headers were parsed (a 503 for a full queue, or liveness),
    written straight to the socket by the protocol (``api/connections.py``); it is an ASGI
    app too, for a server that runs it as one. ``observe(seconds)`` counts it in the request
    metrics (a refusal's rejection the batcher's observer has counted itself). ``paced``: a
    refusal, of which a connection gets one per ``REFUSAL_INTERVAL_S`` (a client retrying at once)."""

    def __init__(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, observe: Callable[[float], None],
        paced: bool,
    ) -> None:  # fmt: skip
        self.status = status
        self.headers = headers
        self.body = body
        self.observe = observe
        self.paced = paced
        self.started = time.perf_counter()

    def response(self, keep_alive: bool) -> bytes:
        status = http.HTTPStatus(self.status)
        lines = [b"HTTP/1.1 %d %s" % (status.value, status.phrase.encode()),
                 *(name + b": " + value for name, value in self.headers)]  # fmt: skip
        if not keep_alive:
            lines.append(b"connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Callable[..., Awaitable[None]]) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})
        self.observe(time.perf_counter() - self.started)

def _holding(app: AsgiApp, reservation: Reservation) -> AsgiApp:
    """``app``, giving back the request's place however it ends, unless its item took it."""

    async def holding(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        finally:
            reservation.release()

    return holding
