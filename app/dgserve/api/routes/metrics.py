"""GET /metrics: Prometheus text exposition of ``dgserve.metrics.Metrics``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from dgserve.api.deps import get_metrics
from dgserve.metrics import Metrics

__all__ = ["router"]

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(metrics: Annotated[Metrics, Depends(get_metrics)]) -> Response:
    """Requests, latency, queueing, batching, rejections, model load and connectivity metrics."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
