"""GET /v1/models/{name}/connectivity and GET /v1/inspections/export: analysis over many records.

Both take the same filters as the listing: ``version``, ``since`` and ``until`` (ISO
8601, UTC if no offset; ``until`` exclusive), ``label`` (the top prediction's) and
``tag=key:value`` (repeatable; every one must hold). The summary groups by the
predicted ``label`` or a tag's value (``group_by=tag:truth``); the export streams
Parquet (``dgserve.analysis.export``). Both, and the pictures, run in the reader
processes (``dgserve.inspection.readers``, at a low priority, so that they take only
the CPU inference leaves), or with ``DGSERVE_READ_WORKERS=0`` in worker threads; at
most ``HEAVY_READS`` at once (``InspectionStore.heavy_read``) either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse

from dgserve.analysis import export, pictures
from dgserve.api.deps import get_inspections, get_models, get_readers, get_settings
from dgserve.api.params import IsoDateTime
from dgserve.api.schemas import ErrorResponse
from dgserve.errors import InvalidAnalysisError, ModelNotFoundError
from dgserve.inspection import InspectionStore
from dgserve.inspection.backend import Filters
from dgserve.inspection.readers import ReaderPool
from dgserve.inspection.readjobs import Job
from dgserve.inspection.record import to_us
from dgserve.inspection.tags import parse_filters
from dgserve.serving.served_models import ServedModels
from dgserve.settings import Settings

__all__ = ["FilterParams", "Filtered", "Readers", "filter_params", "filters_of", "router", "streamed"]

router = APIRouter(tags=["analysis"])

Inspections = Annotated[InspectionStore, Depends(get_inspections)]
Readers = Annotated[ReaderPool | None, Depends(get_readers)]
_PAGE = 4096  # rows per Parquet row group: one page in memory at a time
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "unknown model"},
    422: {"model": ErrorResponse, "description": "bad filter, time, tag, group_by or kind"},
    503: {"model": ErrorResponse, "description": "store not open, or every analysis slot busy (Retry-After)"},
}


@dataclass(frozen=True)
class FilterParams:
    """The record filters every analysis route (and the listing) takes, as query parameters."""

    version: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    label: str | None = None
    tag: list[str] = field(default_factory=list)


async def filter_params(
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="only this model version")] = None,
    since: Annotated[IsoDateTime | None, Query(description="ISO 8601; created at or after (UTC if no offset)")] = None,
    until: Annotated[IsoDateTime | None, Query(description="ISO 8601; created before (UTC if no offset)")] = None,
    label: Annotated[str | None, Query(max_length=256, description="only this top predicted label")] = None,
    tag: Annotated[list[str], Query(description="key:value, repeatable; every one must hold")] = [],  # noqa: B006
) -> FilterParams:
    """The filters' dependency. ``async def``, as every dependency here (``api/deps.py``): a
    class or a plain ``def`` would be run in FastAPI's thread pool on every read."""
    return FilterParams(version, since, until, label, tag)


Filtered = Annotated[FilterParams, Depends(filter_params)]


def _us(value: datetime | None, what: str) -> int | None:
    if value is None:
        return None
    try:
        return to_us(value if value.tzinfo is not None else value.replace(tzinfo=UTC), what)
    except OverflowError:  # a time at the calendar's edge whose offset takes it past year 9999
        raise InvalidAnalysisError(f"{what} {value.isoformat()} is out of range") from None


def filters_of(params: FilterParams, model: str | None) -> Filters:
    """``Filters`` from query parameters: tags validated (422 ``invalid_tag``), times in UTC."""
    since_us, until_us = _us(params.since, "since"), _us(params.until, "until")
    if since_us is not None and until_us is not None and until_us <= since_us:
        raise InvalidAnalysisError(f"until ({params.until}) must be after since ({params.since})")
    return Filters(model=model, version=params.version, since_us=since_us, until_us=until_us, label=params.label,
                   tags=parse_filters(params.tag))  # fmt: skip


def _group_by(value: str | None) -> str | None:
    if value is None or value == "label":
        return value
    if value.startswith("tag:"):
        parse_filters([f"{value[4:]}:x"])  # the key obeys the tag rules (422 invalid_tag)
        return value
    raise InvalidAnalysisError(f"group_by must be 'label' or 'tag:KEY', got {value!r}")


@router.get("/v1/models/{name}/connectivity", responses=_ERRORS)
async def connectivity_summary(
    inspections: Inspections,
    readers: Readers,
    models: Annotated[ServedModels, Depends(get_models)],
    name: Annotated[str, Path(max_length=256)],
    filters: Filtered,
    group_by: Annotated[str | None, Query(description="label, or tag:KEY (a tag's value)")] = None,
    kind: Annotated[str | None, Query(description="only this connectivity kind (stages, glore_units)")] = None,
    top_k: Annotated[int, Query(ge=1, le=100, description="most frequent path patterns per stage")] = 5,
) -> Response:
    """Per group: images, and per module its statistics (open frequency, mean and std weight,
    executed frequency, active-edge fraction, path patterns and their entropy, GloRe node
    shares); and the groups' distance matrix. See ``dgserve.analysis.summary``."""
    return await _summary(inspections, readers, models, name, filters, group_by, kind, top_k, None)


async def _summary(
    inspections: InspectionStore,
    readers: ReaderPool | None,
    models: ServedModels,
    name: str,
    filters: FilterParams,
    group_by: str | None,
    kind: str | None,
    top_k: int,
    fmt: pictures.Format | None,
) -> Response:
    """The summary as JSON, or with ``fmt`` as its picture."""
    if name not in models.groups:
        raise ModelNotFoundError(name)
    selected = filters_of(filters, name)
    grouping = _group_by(group_by)
    head = {"model": name, "version": filters.version, "since": _iso(filters.since), "until": _iso(filters.until),
            "label": filters.label, "tags": dict(selected.tags), "group_by": group_by}  # fmt: skip
    if readers is not None:
        async with inspections.heavy_read() as committed:
            if committed:  # else records still queued would be missed: read in-process, below
                options = {"group_by": grouping, "kind": kind, "top_k": top_k, "head": head, "fmt": fmt}
                body = await readers.result(Job("summary" if fmt is None else "summary_picture", selected, options))
                return Response(body, media_type="application/json" if fmt is None else pictures.FORMATS[fmt])
    summary = await inspections.summary(selected, group_by=grouping, kind=kind, top_k=top_k)
    response = JSONResponse({**head, **summary})
    if fmt is None:
        return response
    document = json.loads(bytes(response.body))
    return Response(await asyncio.to_thread(pictures.summary_picture, document, fmt), media_type=pictures.FORMATS[fmt])


def _iso(value: datetime | None) -> str | None:
    return None if value is None else (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


_PICTURE: dict[int | str, dict[str, Any]] = {
    200: {"content": {media: {} for media in pictures.FORMATS.values()}, "description": "a PNG or an SVG"},
}


@router.get("/v1/models/{name}/connectivity.{fmt}", responses={**_ERRORS, **_PICTURE})
async def connectivity_summary_picture(
    inspections: Inspections,
    readers: Readers,
    models: Annotated[ServedModels, Depends(get_models)],
    name: Annotated[str, Path(max_length=256)],
    fmt: Annotated[pictures.Format, Path(description="png or svg")],
    filters: Filtered,
    group_by: Annotated[str | None, Query(description="label, or tag:KEY (a tag's value)")] = None,
    kind: Annotated[str | None, Query(description="only this connectivity kind (stages, glore_units)")] = None,
) -> Response:
    """The summary as a picture: per stage each group's open-frequency heatmap on one shared
    scale, and the groups' distance matrix (``dgserve.analysis.pictures``)."""
    return await _summary(inspections, readers, models, name, filters, group_by, kind, 5, fmt)


@router.get("/v1/inspections/{inspection_id}/connectivity.{fmt}", responses={**_ERRORS, **_PICTURE})
async def record_picture(
    inspections: Inspections,
    readers: Readers,
    settings: Annotated[Settings, Depends(get_settings)],
    inspection_id: Annotated[str, Path(max_length=128)],
    fmt: Annotated[pictures.Format, Path(description="png or svg")],
) -> Response:
    """One image's path as a picture: each stage's DAG and heatmap, each GloRe unit's projection
    (over the image's stored thumbnail, with DGSERVE_INSPECTION_THUMBNAILS on)."""
    stored = await inspections.get(inspection_id)
    record = stored.to_dict()
    if settings.inspection_thumbnails and stored.thumbnail is not None:
        record["thumbnail"] = stored.thumbnail  # for the picture only: no JSON answer carries it
    if readers is not None:
        picture = await readers.result(Job("record_picture", options={"record": record, "fmt": fmt}))
    else:
        picture = await asyncio.to_thread(pictures.record_picture, record, fmt)
    return Response(picture, media_type=pictures.FORMATS[fmt])


@router.get(
    "/v1/inspections/export",
    responses={**_ERRORS, 200: {"content": {export.MEDIA_TYPE: {}}, "description": "a Parquet file"}},
)
async def export_inspections(
    inspections: Inspections,
    readers: Readers,
    filters: Filtered,
    model: Annotated[str | None, Query(max_length=256, description="only this model's records")] = None,
    format: Annotated[Literal["parquet"], Query(description="parquet (the only format)")] = "parquet",
) -> Response:
    """Stored records as Parquet, oldest first, one row per image (``dgserve.analysis.export``)."""
    selected = filters_of(filters, model)
    disposition = {"Content-Disposition": 'attachment; filename="inspections.parquet"'}
    stack = contextlib.AsyncExitStack()
    committed = await stack.enter_async_context(inspections.heavy_read())
    if readers is not None and committed:
        return await streamed(readers.stream(Job("export", selected)), stack, export.MEDIA_TYPE, disposition)
    try:
        plan = export.plan(await inspections.layouts(selected))
    except BaseException:
        await stack.aclose()
        raise
    pages = inspections.analysis_pages(selected, page_size=_PAGE, include_connectivity=plan.needs_connectivity)
    chunks = export.parquet_chunks(plan, pages)

    async def body() -> AsyncIterator[bytes]:
        try:
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield chunk
        finally:
            # Still running in a thread if this was cancelled mid-page: then it ends there.
            with contextlib.suppress(ValueError):
                chunks.close()
            await stack.aclose()

    return StreamingResponse(body(), media_type=export.MEDIA_TYPE, headers=disposition)


async def streamed(
    chunks: AsyncIterator[bytes], stack: contextlib.AsyncExitStack, media_type: str, headers: dict[str, str] | None = None
) -> Response:
    """A reader's body as a streamed answer, ``stack`` (the read's turn) closed after it.

    The first chunk is awaited here, so that an error before it (a bad filter, a reader
    that died) is still the JSON error with its status; after it the body is under way
    and a failure can only cut it short.
    """
    try:
        first = await anext(chunks, None)
    except BaseException:
        await stack.aclose()
        raise
    if first is None:
        await stack.aclose()
        return Response(b"", media_type=media_type, headers=headers)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]  # an async generator's
            await stack.aclose()

    return StreamingResponse(body(), media_type=media_type, headers=headers)
