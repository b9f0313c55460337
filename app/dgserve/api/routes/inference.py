"""POST /v1/models/{name}/{endpoint}: images in, predictions and paths out, one route per task.

Each registered task (``dgserve.tasks``) gets its route: ``classify``, ``detect``, ...,
with the task's options as query parameters and its response schema. The body is one
image (``Content-Type: image/*``) or ``multipart/form-data`` with one or more image
parts. The route only translates HTTP to the serving service and back; the path a
request takes, and why:

1. the model is looked up and its batcher asked whether it would take the request
   (404/422, and 503 for a model not ready or a full queue, cost nothing: the body is
   not even read; ``Retry-After`` is the batcher's estimate);
2. the body is read with the size limit enforced as it streams in: a declared
   ``Content-Length`` over the limit is refused before reading, and counting stops the
   read as soon as the limit is passed, so nothing unbounded is ever buffered;
3. the service decodes and preprocesses in its bounded decode pool, never on the loop;
4. the service submits each image to the model's batcher with the request's deadline
   (``?timeout_ms=`` or ``DGSERVE_DEFAULT_TIMEOUT_MS``, counted from arrival), so an
   expired request is dropped before compute and answered 504 at its deadline, and
   records each image's inspection record once the results are in;
5. while it waits, a watcher listens for the client's ``http.disconnect``: uvicorn does
   not cancel a handler whose client left, so the watcher cancels the wait instead,
   which removes the request's images from the queue before any compute (status 499
   in the metrics; nobody is left to read a response).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, Field, create_model
from starlette.requests import ClientDisconnect

from dgserve.api.direct import DirectRoute
from dgserve.api.disconnect import CLIENT_CLOSED_REQUEST, until_disconnect
from dgserve.api.errors import HELD
from dgserve.api.params import QueryModel
from dgserve.api.schemas import ErrorResponse, inference_response
from dgserve.connectivity import strip_matrices
from dgserve.api.body import read_uploads
from dgserve.inspection.tags import parse_pairs
from dgserve.serving.reservation import while_uploading
from dgserve.serving.service import ImagePrediction, ServingService
from dgserve.tasks import Task, tasks

__all__ = ["install"]


def _upload_body(content_types: frozenset[str]) -> dict[str, Any]:
    """The OpenAPI request body of a task's route: one upload of its content types, or multipart."""
    return {
        "requestBody": {
            "required": True,
            "description": "One file, or multipart/form-data with one or more files (any field names).",
            "content": {
                **{ct: {"schema": {"type": "string", "format": "binary"}} for ct in sorted(content_types)},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
                    },
                    "required": ["images"],
                    }
                },
            },
        }
    }
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "malformed multipart body",
        404: "unknown model or version",
        413: "body over DGSERVE_MAX_BODY_BYTES",
        415: "unsupported content type",
        422: "undecodable image, too many pixels, wrong task, or bad parameter",
        503: "queue full or model not ready (Retry-After)",
        504: "deadline passed",
    }.items()
}


class V1Params(BaseModel):
    """The query parameters every /v1 inference route takes; a task adds its own options."""

    version: int | None = Field(None, ge=1, description="model version (default: the highest)")
    connectivity: bool = Field(True, description="false leaves the matrices out (they are still stored)")
    timeout_ms: float | None = Field(None, gt=0, description="deadline in ms (default DGSERVE_DEFAULT_TIMEOUT_MS)")
    tag: list[str] = Field(
        default_factory=list,
        description="key:value, repeatable (at most 16): kept with each image's record, for filtering and grouping",
    )


def _route(task: Task) -> tuple[Callable[..., Awaitable[Response]], QueryModel[V1Params]]:
    query: QueryModel[V1Params] = QueryModel(create_model(  # type: ignore[call-overload]
        f"{task.endpoint.capitalize()}Params", __base__=(V1Params, task.Options)
    ))
    option_names = set(task.Options.model_fields)

    async def endpoint(request: Request, name: str) -> Response:
        service: ServingService = request.app.state.dgserve.service
        params = query.parse(request.query_params)  # 422 before anything is read
        options = task.Options(**params.model_dump(include=option_names))
        return await _infer(request, service, task, name, params, options)

    endpoint.__doc__ = task.summary
    return endpoint, query


def install(app: FastAPI) -> None:
    """One ``POST /v1/models/{name}/{endpoint}`` per task registered when the app is built.

    On the app's own router, not an included one: ``DirectRoute`` checks the app's
    dependencies, which only a route made there carries.
    """
    for task in tasks():
        endpoint, query = _route(task)
        # The query parameters are read by the endpoint (``QueryModel``), so they are
        # documented here; FastAPI lists them after the path's ``name``.
        extra = _upload_body(task.content_types) | {"parameters": query.openapi_parameters()}
        app.router.add_api_route(
            f"/v1/models/{{name}}/{task.endpoint}",
            endpoint,
            methods=["POST"],
            name=task.endpoint,
            tags=["inference"],
            response_model=inference_response(task),
            responses=_ERRORS,
            openapi_extra=extra,
            route_class_override=DirectRoute,
        )


async def _infer(
    request: Request, service: ServingService, task: Task, name: str, params: V1Params, options: Any
) -> Response:
    deadline = service.deadline(params.timeout_ms)
    tags = parse_pairs(params.tag)  # 422 before anything is read
    known = service.models.lookup(name, params.version)  # 404 for names the store does not have
    request.scope["state"]["model"] = (known.name, known.version)  # metric labels from here on
    served, reservation = service.admit(name, params.version, task, request.scope["state"].get(HELD))
    with reservation:  # the queue place, held while the body is read (its first second: while_uploading) and decoded
        try:
            uploads = await while_uploading(reservation, read_uploads(request, service.settings, task.content_types))
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        items = await service.prepare(served, uploads, options)
        work = service.infer(served, items, deadline, tags=tags, reservation=reservation)
        predictions = await until_disconnect(request, work)
    if predictions is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = _render(served.name, served.version, task.name, predictions, params.connectivity)
    return Response(body, media_type="application/json", headers=committed_header(predictions))


COMMITTED_HEADER = "X-Inspection-Committed"


def committed_header(predictions: Sequence[ImagePrediction]) -> dict[str, str]:
    """``X-Inspection-Committed: false`` when some record was not yet durable as the answer went out."""
    committed = all(p.committed for p in predictions if p.id is not None)
    return {COMMITTED_HEADER: "true" if committed else "false"}


# --- response --------------------------------------------------------------------------------


def _render(
    model: str, version: int, task: str, predictions: Sequence[ImagePrediction], with_matrices: bool
) -> bytes:
    # The connectivity JSON was made once in the worker thread; it is spliced in as is,
    # which is also what guarantees the response equals the stored record.
    entries = []
    for p in predictions:
        head = json.dumps({"id": p.id, "image": p.image.to_dict(), "predictions": p.result.predictions})
        result = p.result
        connectivity = result.connectivity_json if with_matrices else json.dumps(strip_matrices(result.connectivity))
        entries.append(f'{head[:-1]},"connectivity":{connectivity}}}')
    head = json.dumps({"model": model, "version": version, "task": task})
    return f'{head[:-1]},"results":[{",".join(entries)}]}}'.encode()
