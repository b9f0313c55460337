"""POST /v1/models/{name}/classify and /detect: images in, predictions and paths out.

The body is one image (``Content-Type: image/*``) or ``multipart/form-data`` with one
or more image parts. The path a request takes, and why:

1. the model is looked up and its queue checked first (404/422, and 503 for a model
   not ready or a full queue, cost nothing: the body is not even read);
2. the body is read with the size limit enforced as it streams in: a declared
   ``Content-Length`` over the limit is refused before reading, and counting stops the
   read as soon as the limit is passed, so nothing unbounded is ever buffered;
3. decoding and preprocessing run in the app's bounded decode pool, never on the loop;
4. each image is submitted to the model's batcher with the request's deadline
   (``?timeout_ms=`` or ``DGSERVE_DEFAULT_TIMEOUT_MS``, counted from arrival), so an
   expired request is dropped before compute and answered 504 at its deadline;
5. while it waits, a watcher listens for the client's ``http.disconnect``: uvicorn does
   not cancel a handler whose client left, so the watcher cancels the wait instead,
   which removes the request's images from the queue before any compute (status 499
   in the metrics; nobody is left to read a response).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request, Response
from starlette.requests import ClientDisconnect
from PIL import Image

from dgserve.api import AppState, get_state
from dgserve.api.schemas import ClassifyResponse, DetectResponse, ErrorResponse
from dgserve.errors import DGServeError, InvalidRequestError, PayloadTooLargeError, QueueFullError
from dgserve.serving.batcher import DynamicBatcher
from dgserve.serving.images import (
    ALLOWED_CONTENT_TYPES,
    check_content_type,
    decode_image,
    preprocess_classification,
    preprocess_detection,
)
from dgserve.serving.runner import ImageResult, InferenceItem, strip_matrices
from dgserve.store import Manifest

__all__ = ["router"]

router = APIRouter(tags=["inference"])

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499  # nginx's convention; only ever seen in logs and metrics
# Multipart parts often arrive untyped (curl without ;type=, files without an extension);
# their bytes are sniffed by the decoder, which only accepts the allowed formats anyway.
_UNTYPED_PARTS = {"", "application/octet-stream"}

_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One image, or multipart/form-data with one or more image files (any field names).",
        "content": {
            **{ct: {"schema": {"type": "string", "format": "binary"}} for ct in sorted(ALLOWED_CONTENT_TYPES)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        404: "unknown model or version",
        413: "body over DGSERVE_MAX_BODY_BYTES",
        415: "unsupported content type",
        422: "undecodable image, too many pixels, wrong task, or bad parameter",
        503: "queue full or model not ready (Retry-After)",
        504: "deadline passed",
    }.items()
}

Version = Annotated[int | None, Query(ge=1, description="model version (default: the highest)")]
Connectivity = Annotated[bool, Query(description="false leaves the matrices out (they are still stored)")]
TimeoutMs = Annotated[float | None, Query(gt=0, description="deadline in ms (default DGSERVE_DEFAULT_TIMEOUT_MS)")]


@router.post(
    "/v1/models/{name}/classify", response_model=ClassifyResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY
)
async def classify(
    request: Request,
    name: str,
    version: Version = None,
    top_k: Annotated[int | None, Query(ge=1, description="labels per image (default: manifest; clamped)")] = None,
    connectivity: Connectivity = True,
    timeout_ms: TimeoutMs = None,
) -> Response:
    """Classify one or more images; each result carries its top-k labels and its path through the network."""
    return await _infer(request, name, version, "classification", top_k, None, connectivity, timeout_ms)


@router.post("/v1/models/{name}/detect", response_model=DetectResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
async def detect(
    request: Request,
    name: str,
    version: Version = None,
    score_threshold: Annotated[float | None, Query(ge=0, le=1, description="default: manifest")] = None,
    connectivity: Connectivity = True,
    timeout_ms: TimeoutMs = None,
) -> Response:
    """Detect objects; boxes are xyxy in the uploaded image's pixels."""
    return await _infer(request, name, version, "detection", None, score_threshold, connectivity, timeout_ms)


@dataclass(frozen=True, slots=True)
class _Upload:
    part: str | None
    data: bytes
    content_type: str


async def _infer(
    request: Request,
    name: str,
    version: int | None,
    task: str,
    top_k: int | None,
    score_threshold: float | None,
    with_matrices: bool,
    timeout_ms: float | None,
) -> Response:
    state = get_state(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (timeout_ms or state.settings.default_timeout_ms) / 1000.0
    known = state.registry.lookup(name, version)  # 404 for names the store does not have
    request.scope["state"]["model"] = (known.name, known.version)  # metric labels from here on
    served = state.registry.require(name, version, task)
    assert served.batcher is not None and served.manifest is not None
    batcher = served.batcher
    if batcher.queue_depth >= batcher.max_queue_size:
        # Refused before the body is read or decoded: under overload that work is wasted.
        state.metrics.observe_rejection(served.name, served.version, "queue_full")
        raise QueueFullError(f"{batcher.name}: queue full ({batcher.max_queue_size} waiting)")

    try:
        uploads = await _read_uploads(request, state)
    except ClientDisconnect:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    pool = state.require_decode_pool()
    manifest, max_pixels = served.manifest, state.settings.max_image_pixels
    prepared = await asyncio.gather(
        *(loop.run_in_executor(pool, _prepare, u, manifest, max_pixels, top_k, score_threshold) for u in uploads),
        return_exceptions=True,
    )
    items, infos = [], []
    for outcome in prepared:  # the first bad part, in request order, fails the request
        if isinstance(outcome, BaseException):
            raise outcome
        items.append(outcome[0])
        infos.append(outcome[1])

    submitted = _submit_all(batcher, items, deadline)
    results = await _until_disconnect(request, submitted)
    if results is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = _render(served.name, served.version, task, infos, results, with_matrices)
    return Response(body, media_type="application/json")


# --- body -------------------------------------------------------------------------------


async def _read_uploads(request: Request, state: AppState) -> list[_Upload]:
    limit = state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"body of {declared} bytes exceeds the limit of {limit}")
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() == "multipart/form-data":
        return await _read_multipart(request, limit, state.settings.max_images_per_request)
    media_type = check_content_type(content_type)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"body exceeds the limit of {limit} bytes")
    return [_Upload(None, bytes(body), media_type)]


async def _read_multipart(request: Request, limit: int, max_parts: int) -> list[_Upload]:
    received = 0

    async def receive() -> Any:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise PayloadTooLargeError(f"body exceeds the limit of {limit} bytes")
        return message

    form = await Request(request.scope, receive).form(max_files=max_parts, max_fields=max_parts)
    try:
        uploads = []
        for index, (field, value) in enumerate(form.multi_items()):
            if isinstance(value, str):
                continue  # plain form fields carry no image; tolerated, ignored
            part = value.filename or field or f"#{index}"
            media_type = (value.content_type or "").split(";", 1)[0].strip().lower()
            if media_type not in _UNTYPED_PARTS:
                check_content_type(media_type, part)
            uploads.append(_Upload(part, await value.read(), media_type))
    finally:
        await form.close()
    if not uploads:
        raise InvalidRequestError("the multipart body has no file parts; send each image as a file")
    return uploads


def _prepare(
    upload: _Upload, manifest: Manifest, max_pixels: int, top_k: int | None, score_threshold: float | None
) -> tuple[InferenceItem, dict[str, Any]]:
    """Runs in the decode pool: bytes to a preprocessed tensor."""
    img: Image.Image = decode_image(upload.data, max_pixels=max_pixels, part=upload.part)
    size = (img.height, img.width)
    if manifest.task == "classification":
        tensor, scale = preprocess_classification(img, manifest.preprocessing), 1.0
    else:
        tensor, scale = preprocess_detection(img, manifest.preprocessing)
    item = InferenceItem(
        tensor, size, part=upload.part, scale=scale, top_k=top_k, score_threshold=score_threshold
    )
    return item, {"part": upload.part, "width": img.width, "height": img.height}


# --- waiting ------------------------------------------------------------------------------


async def _submit_all(
    batcher: DynamicBatcher[InferenceItem, ImageResult], items: Sequence[InferenceItem], deadline: float
) -> list[ImageResult]:
    if len(items) == 1:
        return [await batcher.submit(items[0], deadline=deadline)]
    tasks = [asyncio.ensure_future(batcher.submit(item, deadline=deadline)) for item in items]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # One image failing fails the request: its siblings leave the queue at once.
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
    if errors:
        raise next((e for e in errors if isinstance(e, DGServeError)), errors[0])
    return [t.result() for t in tasks]


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait((task,))
        return None
    finally:
        watcher.cancel()
        task.cancel()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next message can only be the disconnect (which
    # servers also send once the response is complete; by then nobody is waiting).
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- response --------------------------------------------------------------------------------


def _render(
    model: str,
    version: int,
    task: str,
    infos: Sequence[dict[str, Any]],
    results: Sequence[ImageResult],
    with_matrices: bool,
) -> bytes:
    # The connectivity JSON was made once in the worker thread; it is spliced in as is,
    # which is also what guarantees the response equals the stored record.
    entries = []
    for info, result in zip(infos, results, strict=True):
        head = json.dumps({"id": result.inspection_id, "image": info, "predictions": result.predictions})
        connectivity = result.connectivity_json if with_matrices else json.dumps(strip_matrices(result.connectivity))
        entries.append(f'{head[:-1]},"connectivity":{connectivity}}}')
    head = json.dumps({"model": model, "version": version, "task": task})
    return f'{head[:-1]},"results":[{",".join(entries)}]}}'.encode()
