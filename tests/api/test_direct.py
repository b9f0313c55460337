"""``DirectRoute`` (``api/direct.py``): it answers as FastAPI would, and refuses to build
for anything it would not run as FastAPI does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.routing import APIRoute
from starlette.requests import HTTPConnection

from dgserve.api.direct import DirectRoute

ASYNC = pytest.mark.asyncio(loop_scope="session")

# The endpoints' and dependencies' annotations name module-level imports: FastAPI resolves them here.
calls: list[str] = []


async def first(request: Request) -> None:
    calls.append(f"first {request.path_params}")


async def keyword_only(*, request: Request) -> None:
    calls.append("keyword")


async def second(request: Request) -> None:
    if request.headers.get("x-deny"):
        raise PermissionError("denied")
    calls.append("second")


async def echo(request: Request, name: str, version: str | None = None, tag: str | None = None) -> Response:
    return Response(f"{request.method} {name} {version!r} {tag!r}")


async def no_request(name: str) -> Response:
    return Response(name)


async def takes_nothing() -> None: ...


async def takes_more(request: Request, x: int) -> None: ...


def synchronous(request: Request) -> None: ...


async def nested(request: Request, inner: None = Depends(first)) -> None: ...


async def int_query(request: Request, name: str, n: int = 0) -> Response:
    return Response()


async def required_query(request: Request, name: str, q: str) -> Response:
    return Response()


async def int_path(request: Request, name: int) -> Response:
    return Response()


async def header(request: Request, name: str, x_token: str | None = Header(None)) -> Response:
    return Response()


async def wants_value(request: Request, name: str, value: None = Depends(first)) -> Response:
    return Response()


def synchronous_endpoint(request: Request, name: str) -> Response:
    return Response()


async def connection(request: Request, name: str, conn: HTTPConnection) -> Response:
    return Response()


async def returns_dict(request: Request, name: str) -> dict[str, str]:
    return {}


async def constrained(request: Request, name: Annotated[str, Path(max_length=3)]) -> Response:
    return Response()


async def aliased(request: Request, name: str, v: Annotated[str | None, Query(validation_alias="ver")] = None) -> Response:
    return Response()


def app_with(route_class: type[APIRoute], dependencies: list[Any], endpoint: Callable[..., Any] = echo) -> FastAPI:
    app = FastAPI(dependencies=dependencies)
    for path in ("/m/{name}", "/m/{name}/v/{version}"):
        app.router.add_api_route(path, endpoint, methods=["POST"], route_class_override=route_class)
    return app


async def answers(app: FastAPI, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, list[str]]:
    calls.clear()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                 base_url="http://t") as client:  # fmt: skip
        response = await client.post(path, headers=headers)
    return response.status_code, response.content, list(calls)


@ASYNC
@pytest.mark.parametrize("path", ["/m/a", "/m/a?version=2", "/m/a%20b?tag=x&tag=y&version=", "/m/a/v/3?version=9",
                                  "/m/a?other=1", "/m/%C3%A9/v/%20"])  # fmt: skip
async def test_a_direct_route_answers_as_fastapis_own(path: str) -> None:
    # The same dependency twice runs once (FastAPI's per-request cache); one takes the request by keyword only.
    dependencies = [Depends(first), Depends(keyword_only), Depends(second), Depends(first)]
    direct = await answers(app_with(DirectRoute, dependencies), path)
    assert direct == await answers(app_with(APIRoute, dependencies), path)
    assert direct[0] == 200 and direct[2][1:] == ["keyword", "second"]  # every dependency ran, in order
    denied = await answers(app_with(DirectRoute, dependencies), path, {"x-deny": "1"})
    assert denied[0] == 500 and denied[2] == direct[2][:2]  # the endpoint did not run


@ASYNC
async def test_a_direct_route_honours_dependency_overrides() -> None:
    app = app_with(DirectRoute, [Depends(second)])

    async def allow(request: Request) -> None:
        calls.append("overridden")

    app.dependency_overrides[second] = allow
    assert (await answers(app, "/m/a", {"x-deny": "1"}))[::2] == (200, ["overridden"])


@pytest.mark.parametrize(
    ("dependency", "endpoint", "why"),
    [
        (takes_nothing, echo, "take the request alone"),
        (takes_more, echo, "take the request alone"),
        (synchronous, echo, "take the request alone"),
        (nested, echo, "take the request alone"),
        (first, no_request, "takes the request"),
        (first, int_query, "'n' must be an optional string query"),
        (first, required_query, "'q' must be an optional string query"),
        (first, int_path, "'name' must be a string path"),
        (first, header, "not \\['x_token'\\]"),
        (first, wants_value, "takes no dependency's value"),
        (first, synchronous_endpoint, "coroutine function returning a Response"),
        (first, returns_dict, "coroutine function returning a Response"),
        (first, connection, "FastAPI-provided objects"),
        (first, constrained, "'name' must be a string path"),
        (first, aliased, "'v' must be an optional string query"),
    ],
)
def test_a_direct_route_refuses_what_it_would_not_run(dependency: Any, endpoint: Any, why: str) -> None:
    with pytest.raises(TypeError, match=why):
        app_with(DirectRoute, [Depends(dependency)], endpoint)


def test_a_direct_route_refuses_a_path_convertor_that_is_not_a_string() -> None:
    app = FastAPI()
    with pytest.raises(TypeError, match="'name' must be a string path"):
        app.router.add_api_route("/m/{name:int}", echo, methods=["POST"], route_class_override=DirectRoute)
    app.router.add_api_route("/p/{name:path}", echo, methods=["POST"], route_class_override=DirectRoute)


@ASYNC
async def test_a_direct_route_refuses_to_be_included() -> None:
    # An inclusion's extra dependencies would be skipped; FastAPI builds included routes when first routed.
    router = APIRouter()
    router.add_api_route("/m/{name}", echo, methods=["POST"], route_class_override=DirectRoute)
    app = FastAPI()
    app.include_router(router, dependencies=[Depends(second)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        with pytest.raises(TypeError, match="include_router"):
            await client.post("/m/a")
