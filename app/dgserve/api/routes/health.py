"""GET /healthz (the process answers) and GET /readyz (every configured model serves,
and the inspection store is open)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from dgserve.api.deps import get_service
from dgserve.api.schemas import ErrorResponse, HealthResponse, ReadyResponse
from dgserve.errors import NotReadyError
from dgserve.serving.service import ServingService

__all__ = ["router"]

router = APIRouter(tags=["health"])

# Loading a model takes seconds; asking again sooner only adds load.
_RETRY_AFTER_S = 5.0


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """Liveness: answers as soon as the server runs, even while models load."""
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ErrorResponse}})
async def readyz(service: Annotated[ServingService, Depends(get_service)]) -> ReadyResponse:
    """Readiness: 200 once every configured model version is loaded and warmed up and the
    inspection store is open, else 503 + Retry-After with a message naming each one that is not."""
    missing = service.not_ready()
    if missing:
        raise NotReadyError("not ready: " + "; ".join(missing), retry_after_s=_RETRY_AFTER_S)
    ready = [f"{s.name}:{s.version}" for g in service.models.groups.values() for s in g.versions.values()]
    return ReadyResponse(status="ready", models=sorted(ready))
