"""GET /metrics: Prometheus text exposition of ``dgserve.metrics.Metrics``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from dgserve.api.deps import AppState, get_state
from dgserve.metrics.merge import merge

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
    """Requests, latency, queueing, batching, rejections, model load and connectivity metrics
    (of every server process, when there are several: ``DGSERVE_SERVER_PROCESSES``)."""
    body, content_type = state.metrics.render()
    if state.siblings is not None:
        body = merge(await state.siblings.gather(body))
    return Response(body, media_type=content_type)
