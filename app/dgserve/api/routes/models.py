"""GET /v1/models and /v1/models/{name}: what is served, how, and whether it is ready."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from dgserve.api.deps import get_models
from dgserve.api.schemas import (
    BatchingInfo,
    ErrorDetail,
    ErrorResponse,
    GraphInfo,
    ModelInfoResponse,
    ModelListResponse,
    ModelVersionInfo,
)
from dgserve.errors import ModelNotFoundError
from dgserve.models.registry import UnknownArchitectureError, get_entry
from dgserve.serving.served_models import ModelGroup, ServedModel, ServedModels

Models = Annotated[ServedModels, Depends(get_models)]

__all__ = ["router"]

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelListResponse)
async def list_models(models: Models) -> ModelListResponse:
    """Every configured model with its versions, readiness, batching and graph structure."""
    groups = models.groups
    return ModelListResponse(models=[_group_info(groups[name]) for name in sorted(groups)])


@router.get("/v1/models/{name}", response_model=ModelInfoResponse, responses={404: {"model": ErrorResponse}})
async def get_model(models: Models, name: str) -> ModelInfoResponse:
    """One model: its versions (highest is the default), readiness and load errors."""
    group = models.groups.get(name)
    if group is None:
        raise ModelNotFoundError(name)
    return _group_info(group)


def _group_info(group: ModelGroup) -> ModelInfoResponse:
    default = group.default
    versions = [_version_info(group.versions[v]) for v in sorted(group.versions)]
    return ModelInfoResponse(
        name=group.name,
        default_version=default.version if default is not None else None,
        ready=bool(versions) and all(v.ready for v in versions),
        error=group.error,
        versions=versions,
    )


def _version_info(served: ServedModel) -> ModelVersionInfo:
    info: dict[str, Any] = {
        "version": served.version,
        "state": served.state,
        "ready": served.ready,
        "devices": served.devices,
        "load_seconds": served.load_seconds,
    }
    if served.error is not None:
        info["error"] = ErrorDetail(code=served.error_code or "load_failed", message=served.error, request_id="")
    manifest = served.manifest
    if manifest is not None:
        try:
            family: str | None = get_entry(manifest.architecture).family
        except UnknownArchitectureError:
            family = None
        info.update(
            task=manifest.task,
            architecture=manifest.architecture,
            family=family,
            description=manifest.description,
            labels=manifest.labels,
            preprocessing=manifest.preprocessing.model_dump(),
            thresholds=manifest.thresholds.model_dump(),
            precision=manifest.precision,
            torch_compile=manifest.torch_compile,
        )
    if served.batching is not None:
        info["batching"] = BatchingInfo(**served.batching.model_dump())
    if served.batcher is not None:
        info.update(queue_depth=served.batcher.queue_depth, in_flight=served.batcher.in_flight)
    if served.graph is not None:
        info["graph"] = GraphInfo.model_validate(served.graph)
    return ModelVersionInfo(**info)
