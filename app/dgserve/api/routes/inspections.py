"""GET /v1/inspections/{id} and GET /v1/inspections: stored records, one or many.

The listing is for analysis: ``Accept: application/x-ndjson`` or ``?format=ndjson``
streams one JSON record per line as the store pages them in, so a long listing never
sits in memory whole; plain JSON (the default) gathers them into one document. It takes
the analysis routes' filters (``analysis.FilterParams``): version, since, until, label
and ``tag=key:value``. Listings run in the reader processes (``dgserve.inspection.readers``,
at a low priority), which build the JSON there; with ``DGSERVE_READ_WORKERS=0``, or while
records wait to be committed, on the event loop as the store pages them in.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from dgserve.api.deps import get_inspections, get_settings
from dgserve.api.routes.analysis import Filtered, Readers, filters_of, streamed
from dgserve.api.schemas import ErrorResponse, InspectionListResponse, InspectionRecordResponse
from dgserve.errors import InvalidRequestError
from dgserve.inspection import InspectionStore
from dgserve.inspection.readjobs import Job
from dgserve.settings import Settings

__all__ = ["router"]

router = APIRouter(tags=["inspections"])

NDJSON = "application/x-ndjson"

Inspections = Annotated[InspectionStore, Depends(get_inspections)]


@router.get(
    "/v1/inspections/{inspection_id}",
    response_model=InspectionRecordResponse,
    responses={404: {"model": ErrorResponse, "description": "no record with this id (or it has expired)"}},
)
async def get_inspection(inspections: Inspections, inspection_id: Annotated[str, Path(max_length=128)]) -> Response:
    """The stored record of one image: model, version, time, predictions, full connectivity."""
    record = await inspections.get(inspection_id)
    return Response(json.dumps(record.to_dict()), media_type="application/json")


@router.get(
    "/v1/inspections",
    response_model=InspectionListResponse,
    responses={
        200: {"content": {NDJSON: {"schema": {"$ref": "#/components/schemas/InspectionRecordResponse"}}}},
        422: {"model": ErrorResponse},
    },
)
async def list_inspections(
    request: Request,
    inspections: Inspections,
    readers: Readers,
    settings: Annotated[Settings, Depends(get_settings)],
    filters: Filtered,
    model: Annotated[str | None, Query(description="only this model's records")] = None,
    limit: Annotated[int, Query(ge=1, description="most records (at most DGSERVE_INSPECTION_LIST_MAX)")] = 100,
    connectivity: Annotated[bool, Query(description="false leaves connectivity out ({}), much smaller")] = True,
    format: Annotated[Literal["json", "ndjson"] | None, Query(description="ndjson: one record per line")] = None,
) -> Response:
    """Records oldest first (created_at, then id)."""
    cap = settings.inspection_list_max
    if limit > cap:
        raise InvalidRequestError(f"limit {limit} is over the maximum of {cap}; page with ?since=")
    selected = filters_of(filters, model)
    ndjson = format == "ndjson" or (format is None and NDJSON in request.headers.get("accept", ""))
    if readers is not None:
        stack = contextlib.AsyncExitStack()
        # Committed first, so that the reader process, which reads only the backend, sees
        # every record answered before this call; if that takes too long, read here.
        if await stack.enter_async_context(inspections.heavy_read()):
            options = {"limit": limit, "include_connectivity": connectivity, "format": "ndjson" if ndjson else "json"}
            job = Job("list", selected, options)
            if ndjson:
                return await streamed(readers.stream(job), stack, NDJSON)
            async with stack:
                return Response(await readers.result(job), media_type="application/json")
        await stack.aclose()
    records = inspections.list(limit=limit, include_connectivity=connectivity, filters=selected)
    if ndjson:
        return StreamingResponse(_ndjson(records), media_type=NDJSON)
    lines = [json.dumps(record.to_dict()) async for record in records]
    return Response(f'{{"records":[{",".join(lines)}],"count":{len(lines)}}}', media_type="application/json")


async def _ndjson(records: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    async for record in records:
        yield (json.dumps(record.to_dict()) + "\n").encode()
