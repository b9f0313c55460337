"""Request and response schemas, named by role, as OpenAPI documents them.

The inference and inspection routes write their JSON themselves (the connectivity
matrices are serialised once, in the worker thread, and spliced in); these models are
what that JSON conforms to, declared on the routes so ``/openapi.json`` describes it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

# --- errors ---------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. model_not_found, overloaded")
    message: str
    request_id: str = Field(description="the X-Request-ID of the request (echoed as a header too)")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- connectivity -----------------------------------------------------------------


class StageConnectivity(BaseModel):
    """One DG-Net stage for one image. Node 0 is the input, 1..N the blocks, N+1 the output."""

    stage: str
    nodes: list[str]
    adjacency: list[list[float]] | None = Field(
        None, description="adjacency[target][source] edge weight after thresholding (closed edges 0); "
        "left out with ?connectivity=false"
    )
    thresholds: list[float | None] = Field(description="each node's threshold tau (None for input and output)")
    executed: list[bool] = Field(description="which nodes ran for this image")
    open_edges: int
    possible_edges: int
    active_edge_fraction: float
    skipped_nodes: int


class ProjectedNode(BaseModel):
    node: int
    fraction: float = Field(description="share of the feature map's locations projecting most to this node")


class ProjectionSummary(BaseModel):
    height: int
    width: int
    nodes_used: int = Field(description="graph nodes that some location projects to most strongly")
    top_nodes: list[ProjectedNode]


class GloReUnitConnectivity(BaseModel):
    """One GloRe unit for one image."""

    unit: str
    num_nodes: int
    adjacency: list[list[float]] | None = Field(
        None, description="the learned N x N interaction graph A_g; left out with ?connectivity=false"
    )
    adjacency_digest: str = Field(
        "", description="names A_g's content: equal digests, equal matrices (A_g is a weight, so one per unit per version)"
    )
    projection: list[list[int]] | None = Field(
        None, description="per feature-map location, the node it projects to most; left out with ?connectivity=false"
    )
    projection_summary: ProjectionSummary


class Connectivity(BaseModel):
    stages: list[StageConnectivity] = Field(default_factory=list)
    glore_units: list[GloReUnitConnectivity] = Field(default_factory=list)


# --- inference ------------------------------------------------------------------------


class ImageInfo(BaseModel):
    part: str | None = Field(None, description="the multipart part (file name or field) the image came from")
    width: int
    height: int


class ClassPrediction(BaseModel):
    label: str
    index: int
    score: float


class Detection(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2] in the uploaded image's pixels", min_length=4, max_length=4)
    label: str
    index: int = Field(description="class id (0 is background, never returned)")
    score: float


class ClassifyResult(BaseModel):
    id: str = Field(description="inspection id: GET /v1/inspections/{id}")
    image: ImageInfo
    predictions: list[ClassPrediction]
    connectivity: Connectivity


class DetectResult(BaseModel):
    id: str
    image: ImageInfo
    predictions: list[Detection]
    connectivity: Connectivity


class ClassifyResponse(BaseModel):
    model: str
    version: int
    task: Literal["classification"]
    results: list[ClassifyResult] = Field(description="one per image, in request order")


class DetectResponse(BaseModel):
    model: str
    version: int
    task: Literal["detection"]
    results: list[DetectResult]


# --- inspections -----------------------------------------------------------------------


class InspectionPrediction(BaseModel):
    image: ImageInfo
    predictions: list[dict[str, Any]] = Field(description="exactly as the inference response gave them")


class InspectionRecordResponse(BaseModel):
    id: str
    model: str
    version: int
    task: str
    created_at: datetime
    prediction: InspectionPrediction
    connectivity: Connectivity = Field(
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


class GraphStage(BaseModel):
    name: str
    nodes: list[str]
    possible_edges: int


class GraphUnit(BaseModel):
    name: str
    num_nodes: int
    num_states: int
    in_channels: int


class GraphInfo(BaseModel):
    stages: list[GraphStage]
    glore_units: list[GraphUnit]


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
    batching: BatchingInfo | None = Field(None, description="effective values (manifest + overrides)")
    devices: list[str] = Field(default_factory=list, description="one entry per worker")
    queue_depth: int | None = None
    in_flight: int | None = None
    load_seconds: float | None = Field(None, description="load + warm-up")
    graph: GraphInfo | None = Field(None, description="known once loaded")


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
