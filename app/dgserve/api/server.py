"""``serve(settings)``: serve the app with uvicorn in this process, draining on SIGTERM.

``dgserve serve`` calls it through ``processes.run``, once, or in each of
``DGSERVE_SERVER_PROCESSES`` children, each on a socket of its own on the shared port."""

from __future__ import annotations

import socket

import uvicorn

from dgserve.api.admission import Admission
from dgserve.api.app import create_app
from dgserve.api.connections import ConnectionLimits, protocol_class
from dgserve.api.deps import AppState
from dgserve.api.drain import BACKSTOP_S, DrainingServer
from dgserve.api.siblings import Siblings
from dgserve.settings import Settings

__all__ = ["connection_limits", "serve"]


def connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        body_min_rate=settings.body_min_rate,
        max_connections=settings.max_connections,
    )


def serve(settings: Settings, sockets: list[socket.socket] | None = None, siblings: Siblings | None = None) -> None:
    """Build the app and serve it in this process: on ``sockets`` if given, else on host:port."""
    app = create_app(settings, siblings)
    state: AppState = app.state.dgserve
    state.service.freeze_after_load = True  # this process is the server: its models live as long as it does
    admission = Admission(state.service, state.api_keys, state.drain, state.metrics)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # Starts after the drain (api/drain.py), which has given requests DGSERVE_DRAIN_TIMEOUT_S.
        timeout_graceful_shutdown=BACKSTOP_S,
        # Request ids and client addresses come from our own middleware and settings;
        # a proxy's X-Forwarded-* is only honoured when configured via uvicorn itself.
        proxy_headers=False,
        # uvicorn's httptools protocol with header/body read timeouts, a connection cap and
        # a lingering close (api/connections.py).
        # It also asks the admission gate (api/admission.py) to take an inference
        # request's queue place, or refuse it, before the app sees it.
        http=protocol_class(connection_limits(settings), admission.app_for),
    )
    DrainingServer(config, state.drain, state.service.stop_work,
                   grace_s=settings.shutdown_grace_s, timeout_s=settings.drain_timeout_s).run(sockets)  # fmt: skip
