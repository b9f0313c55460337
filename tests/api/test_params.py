"""``QueryModel`` reads and documents a query model exactly as FastAPI's ``Annotated[M, Query()]`` does.

Each check runs the same query string through a FastAPI twin route, which declares the
model the ordinary way, and through ``QueryModel``, for every registered task's model.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, create_model
from starlette.datastructures import QueryParams

from dgserve.api.errors import install_error_handlers
from dgserve.api.params import QueryModel
from dgserve.api.auth import authorize
from dgserve.api.routes.inference import V1Params, install
from dgserve.tasks import Task, tasks

TASKS = {task.endpoint: task for task in tasks()}


def _model(task: Task) -> type[BaseModel]:
    model: type[BaseModel] = create_model(  # type: ignore[call-overload]
        f"{task.endpoint.capitalize()}Params", __base__=(V1Params, task.Options)
    )
    return model


def _twin(model: type[BaseModel]) -> FastAPI:
    """An app with one GET route that takes ``model`` as FastAPI's query model and echoes it."""
    app = FastAPI()
    install_error_handlers(app)

    async def echo(params: Any) -> dict[str, Any]:
        return params.model_dump(mode="json")  # type: ignore[no-any-return]

    # As the inference routes once declared it: the model only exists at run time.
    echo.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[model, Query()]),
    ])
    app.add_api_route("/echo", echo, methods=["GET"])
    return app


QUERIES = [
    "",
    "timeout_ms=250&version=2&connectivity=false",
    "tag=a:1&tag=b:2&tag=a:3",
    "version=1&version=3",  # a repeated scalar: the last value
    "connectivity=no&connectivity=yes",
    "unknown=1&top_k=2&score_threshold=0.5&iou_threshold=0.4&max_detections=7",
    "timeout_ms=0",
    "timeout_ms=abc&version=0",
    "version=1.5",
    "connectivity=maybe",
    "top_k=0",
    "score_threshold=2",
    "tag=",
    "frames=3",
]


async def _same_as_fastapi(model: type[BaseModel], queries: list[str]) -> None:
    query = QueryModel(model)
    transport = httpx.ASGITransport(app=_twin(model))
    async with httpx.AsyncClient(transport=transport, base_url="http://twin") as client:
        for text in queries:
            twin = await client.get(f"/echo?{text}")
            try:
                ours: Any = query.parse(QueryParams(text)).model_dump(mode="json")
                status = 200
            except RequestValidationError as exc:
                ours = exc.errors()
                status = 422
            assert status == twin.status_code, (text, twin.text)
            if status == 200:
                assert ours == twin.json(), text
            else:
                # The one error handler turns the locations and messages into the message.
                message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in ours)
                assert twin.json()["error"]["message"] == message, text


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("endpoint", sorted(TASKS))
async def test_query_model_reads_like_fastapi(endpoint: str) -> None:
    await _same_as_fastapi(_model(TASKS[endpoint]), QUERIES)


class _Optional(BaseModel):
    """Shapes no task uses yet: an optional list, an optional scalar."""

    many: list[int] | None = None
    one: float | None = None


@pytest.mark.asyncio(loop_scope="session")
async def test_optional_lists_read_like_fastapi() -> None:
    await _same_as_fastapi(_Optional, ["", "many=1&many=2", "many=x", "one=1&one=2.5", "one=&many=3", "other=1"])


@pytest.mark.parametrize("endpoint", sorted(TASKS))
def test_inference_routes_document_their_query_like_fastapi(endpoint: str) -> None:
    app = FastAPI(dependencies=[Depends(authorize)])
    install(app)
    name, *query = app.openapi()["paths"][f"/v1/models/{{name}}/{endpoint}"]["post"]["parameters"]
    assert (name["name"], name["in"]) == ("name", "path")
    assert query == _twin(_model(TASKS[endpoint])).openapi()["paths"]["/echo"]["get"]["parameters"]


def test_a_model_that_would_take_unknown_parameters_is_refused() -> None:
    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")
        a: int = 1

    with pytest.raises(ValueError, match="unknown parameters"):
        QueryModel(Strict)
