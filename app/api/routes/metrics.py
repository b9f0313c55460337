"""GET /metrics: Prometheus text exposition of ``dgserve.metrics.Metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from dgserve.api import get_state

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Requests, latency, queueing, batching, rejections, model load and connectivity metrics."""
    body, content_type = get_state(request).metrics.render()
    return Response(body, media_type=content_type)
