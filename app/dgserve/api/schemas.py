"""Request and response schemas, named by role, as OpenAPI documents them.

The inference and inspection routes write their JSON themselves (the connectivity
matrices are serialised once, in the worker thread, and spliced in); these models are
what that JSON conforms to, declared on the routes so ``/openapi.json`` describes it.
The connectivity and inference schemas are derived from the connectivity kinds and the
tasks, so a new kind or task documents itself.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from functools import cache
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, Field, create_model

from dgserve.connectivity import ConnectivityRecord, kinds
from dgserve.connectivity.base import field_description
from dgserve.tasks import Task

# --- errors ---------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. model_not_found, overloaded")
    message: str
    request_id: str = Field(description="the X-Request-ID of the request (echoed as a header too)")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- connectivity: derived from the kinds' own declarations (dgserve.connectivity) ----------


@cache
def record_schema(kind: type[ConnectivityRecord]) -> type[BaseModel]:
    """One kind's record as a pydantic model: its fields, matrix fields optional, then its derived figures."""
    hints = get_type_hints(kind)
    fields: dict[str, Any] = {}
    for name in kind.field_names:
        description = field_description(kind, name)
        if name in kind.matrix_fields:
            fields[name] = (hints[name] | None, Field(None, description=description))
        else:
            fields[name] = (hints[name], Field(description=description))
    for name in kind.derived:
        prop = getattr(kind, name)
        fields[name] = (get_type_hints(prop.fget)["return"], Field(description=(prop.__doc__ or "").strip()))
    return create_model(kind.__name__, __doc__=kind.__doc__, **fields)


@cache
def connectivity_schema() -> type[BaseModel]:
    """The connectivity of one image: one list per registered kind."""
    fields: dict[str, Any] = {
        kind.kind: (list[record_schema(kind)], Field(default_factory=list)) for kind in kinds()  # type: ignore[misc]
    }
    return create_model("Connectivity", **fields)


@cache
def graph_schema() -> type[BaseModel]:
    """A loaded model's graph structure: one list per registered kind."""
    fields: dict[str, Any] = {}
    for kind in kinds():
        graph = kind.Graph
        hints = get_type_hints(graph)
        item = create_model(graph.__name__, **{f.name: (hints[f.name], ...) for f in dataclasses.fields(graph)})
        fields[kind.kind] = (list[item], Field(default_factory=list))  # type: ignore[valid-type]
    return create_model("GraphInfo", **fields)


Connectivity = connectivity_schema()
GraphInfo = graph_schema()


# --- inference ------------------------------------------------------------------------


class ImageInfo(BaseModel):
    part: str | None = Field(None, description="the multipart part (file name or field) the image came from")
    width: int
    height: int
    frames: int | None = Field(None, description="videos only: the frames decoded (width and height are a frame's)")
    seconds: float | None = Field(None, description="videos only: the video's length")


@cache
def inference_response(task: Task) -> type[BaseModel]:
    """What ``POST /v1/models/{name}/{task.endpoint}`` answers, from the task's prediction schema."""
    title = task.endpoint.capitalize()
    result = create_model(
        f"{title}Result",
        id=(str | None, Field(description="inspection id: GET /v1/inspections/{id}; null when the record was "
                              "dropped because the inspection store's queue was full (DGSERVE_INSPECTION_WHEN_FULL)")),
        image=(ImageInfo, ...),
        predictions=(task.predictions_schema(), ...),
        connectivity=(Connectivity, ...),
    )
    return create_model(
        f"{title}Response",
        model=(str, ...),
        version=(int, ...),
        task=(Literal[task.name], ...),  # type: ignore[valid-type]
        results=(list[result], Field(description="one per image, in request order")),  # type: ignore[valid-type]
    )


# --- inspections -----------------------------------------------------------------------


class InspectionPrediction(BaseModel):
    image: ImageInfo
    predictions: list[dict[str, Any]] | dict[str, Any] = Field(
        description="exactly as the inference response gave them (one object per image for segmentation)"
    )
    replica: str | None = Field(None, description="the server that wrote the record (DGSERVE_REPLICA)")
    request_id: str | None = Field(None, description="the client's id for the request (the OIP request id)")


class InspectionRecordResponse(BaseModel):
    id: str
    model: str
    version: int
    task: str
    created_at: datetime
    tags: dict[str, str] = Field(default_factory=dict, description="the request's tags (?tag=key:value)")
    prediction: InspectionPrediction
    connectivity: Connectivity = Field(  # type: ignore[valid-type]
        description="the full connectivity, matrices included; equal to the inference response's"
    )


class InspectionListResponse(BaseModel):
    records: list[InspectionRecordResponse] = Field(description="oldest first; connectivity {} when left out")
    count: int


# --- models and health -------------------------------------------------------------------


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_delay_ms: float
    max_queue_size: int


class ModelVersionInfo(BaseModel):
    version: int
    state: Literal["pending", "loading", "ready", "failed"]
    ready: bool
    error: ErrorDetail | None = Field(None, description="why loading failed (request_id empty)")
    task: str | None = None
    architecture: str | None = None
    family: str | None = None
    description: str | None = None
    labels: list[str] | None = None
    preprocessing: dict[str, Any] | None = None
    thresholds: dict[str, Any] | None = None
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(
        None, description="the forward's autocast precision (the manifest's, or DGSERVE_PRECISION's)"
    )
    torch_compile: bool | None = Field(
        None, description="whether the forward runs through torch.compile (the manifest's, or DGSERVE_TORCH_COMPILE's)"
    )
    batching: BatchingInfo | None = Field(None, description="effective values (manifest + overrides)")
    devices: list[str] = Field(default_factory=list, description="one entry per worker")
    queue_depth: int | None = None
    in_flight: int | None = None
    load_seconds: float | None = Field(None, description="load + warm-up")
    graph: GraphInfo | None = Field(None, description="known once loaded")  # type: ignore[valid-type]


class ModelInfoResponse(BaseModel):
    name: str
    default_version: int | None
    ready: bool
    error: str | None = Field(None, description="set when the model is configured but missing from the store")
    versions: list[ModelVersionInfo]


class ModelListResponse(BaseModel):
    models: list[ModelInfoResponse]


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    models: list[str] = Field(description="name:version of every ready model")
