"""GET /v1/models/{name}/connectivity and GET /v1/inspections/export: analysis over many records.

Both take the same filters as the listing: ``version``, ``since`` and ``until`` (ISO
8601, UTC if no offset; ``until`` exclusive), ``label`` (the top prediction's) and
``tag=key:value`` (repeatable; every one must hold). The summary groups by the
predicted ``label`` or a tag's value (``group_by=tag:truth``); the export streams
Parquet (``dgserve.analysis.export``). Both run in worker threads, at most
``HEAVY_READS`` at once (``InspectionStore.heavy_read``), so analysis never holds the
event loop that inference answers on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse

from dgserve.analysis import export, pictures
from dgserve.api.deps import get_inspections, get_models
from dgserve.api.params import IsoDateTime
from dgserve.api.schemas import ErrorResponse
from dgserve.errors import InvalidAnalysisError, ModelNotFoundError
from dgserve.inspection import InspectionStore
from dgserve.inspection.backend import Filters
from dgserve.inspection.record import to_us
from dgserve.inspection.tags import parse_filters
from dgserve.serving.served_models import ServedModels

__all__ = ["FilterParams", "filters_of", "router"]

router = APIRouter(tags=["analysis"])

Inspections = Annotated[InspectionStore, Depends(get_inspections)]
_PAGE = 4096  # rows per Parquet row group: one page in memory at a time
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "unknown model"},
    422: {"model": ErrorResponse, "description": "bad filter, time, tag, group_by or kind"},
    503: {"model": ErrorResponse, "description": "store not open, or every analysis slot busy (Retry-After)"},
}


class FilterParams:
    """The record filters every analysis route (and the listing) takes, as query parameters."""

    def __init__(
        self,
        version: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="only this model version")] = None,
        since: Annotated[IsoDateTime | None, Query(description="ISO 8601; created at or after (UTC if no offset)")] = None,
        until: Annotated[IsoDateTime | None, Query(description="ISO 8601; created before (UTC if no offset)")] = None,
        label: Annotated[str | None, Query(max_length=256, description="only this top predicted label")] = None,
        tag: Annotated[list[str], Query(description="key:value, repeatable; every one must hold")] = [],  # noqa: B006
    ) -> None:
        self.version, self.since, self.until, self.label, self.tag = version, since, until, label, tag


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
    models: Annotated[ServedModels, Depends(get_models)],
    name: Annotated[str, Path(max_length=256)],
    filters: Annotated[FilterParams, Depends()],
    group_by: Annotated[str | None, Query(description="label, or tag:KEY (a tag's value)")] = None,
    kind: Annotated[str | None, Query(description="only this connectivity kind (stages, glore_units)")] = None,
    top_k: Annotated[int, Query(ge=1, le=100, description="most frequent path patterns per stage")] = 5,
) -> JSONResponse:
    """Per group: images, and per module its statistics (open frequency, mean and std weight,
    executed frequency, active-edge fraction, path patterns and their entropy, GloRe node
    shares); and the groups' distance matrix. See ``dgserve.analysis.summary``."""
    if name not in models.groups:
        raise ModelNotFoundError(name)
    selected = filters_of(filters, name)
    summary = await inspections.summary(selected, group_by=_group_by(group_by), kind=kind, top_k=top_k)
    head = {"model": name, "version": filters.version, "since": _iso(filters.since), "until": _iso(filters.until),
            "label": filters.label, "tags": dict(selected.tags), "group_by": group_by}  # fmt: skip
    return JSONResponse({**head, **summary})


def _iso(value: datetime | None) -> str | None:
    return None if value is None else (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


_PICTURE: dict[int | str, dict[str, Any]] = {
    200: {"content": {media: {} for media in pictures.FORMATS.values()}, "description": "a PNG or an SVG"},
}


@router.get("/v1/models/{name}/connectivity.{fmt}", responses={**_ERRORS, **_PICTURE})
async def connectivity_summary_picture(
    inspections: Inspections,
    models: Annotated[ServedModels, Depends(get_models)],
    name: Annotated[str, Path(max_length=256)],
    fmt: Annotated[pictures.Format, Path(description="png or svg")],
    filters: Annotated[FilterParams, Depends()],
    group_by: Annotated[str | None, Query(description="label, or tag:KEY (a tag's value)")] = None,
    kind: Annotated[str | None, Query(description="only this connectivity kind (stages, glore_units)")] = None,
) -> Response:
    """The summary as a picture: per stage each group's open-frequency heatmap on one shared
    scale, and the groups' distance matrix (``dgserve.analysis.pictures``)."""
    response = await connectivity_summary(inspections, models, name, filters, group_by, kind, top_k=5)
    summary = json.loads(bytes(response.body))
    return Response(await asyncio.to_thread(pictures.summary_picture, summary, fmt), media_type=pictures.FORMATS[fmt])


@router.get("/v1/inspections/{inspection_id}/connectivity.{fmt}", responses={**_ERRORS, **_PICTURE})
async def record_picture(
    inspections: Inspections,
    inspection_id: Annotated[str, Path(max_length=128)],
    fmt: Annotated[pictures.Format, Path(description="png or svg")],
) -> Response:
    """One image's path as a picture: each stage's DAG and heatmap, each GloRe unit's projection."""
    record = (await inspections.get(inspection_id)).to_dict()
    return Response(await asyncio.to_thread(pictures.record_picture, record, fmt), media_type=pictures.FORMATS[fmt])


@router.get(
    "/v1/inspections/export",
    responses={**_ERRORS, 200: {"content": {export.MEDIA_TYPE: {}}, "description": "a Parquet file"}},
)
async def export_inspections(
    inspections: Inspections,
    filters: Annotated[FilterParams, Depends()],
    model: Annotated[str | None, Query(max_length=256, description="only this model's records")] = None,
    format: Annotated[Literal["parquet"], Query(description="parquet (the only format)")] = "parquet",
) -> StreamingResponse:
    """Stored records as Parquet, oldest first, one row per image (``dgserve.analysis.export``)."""
    selected = filters_of(filters, model)
    stack = contextlib.AsyncExitStack()
    await stack.enter_async_context(inspections.heavy_read())
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

    disposition = {"Content-Disposition": 'attachment; filename="inspections.parquet"'}
    return StreamingResponse(body(), media_type=export.MEDIA_TYPE, headers=disposition)
