"""``DirectRoute``: a route answered without FastAPI's per-request dependency solving.

The inference routes (``/v1`` and OIP's infer) run on every request the server
answers, and solving their dependencies took more of the event loop than any step of
their own (docs/performance.md, "The inference route's own loop time"). Such a route
is declared as usual, so OpenAPI sees it unchanged, but its handler does by hand the
little FastAPI would do for it:

- awaits each of its dependencies (the app's ``authorize``) with the request, in order;
- calls the endpoint with the request, its path parameters as strings, and its
  optional string query parameters (``request.query_params.get``, as FastAPI reads a
  single value); the endpoint reads anything else (a query model, the body) itself.

What keeps the shortcut honest: building fails for anything it would not run as
FastAPI does. That is a dependency that takes more than the request (or has its own
dependencies, or is not a coroutine function), an endpoint parameter that is not a
string, and a route made through ``include_router``: FastAPI builds those inside the
inclusion's context, whose extra dependencies the checks do not see. While the app
overrides any dependency (``app.dependency_overrides``, as tests do), requests take
FastAPI's own path, which honours overrides.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

import fastapi.routing
from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

__all__ = ["DirectRoute"]

_STRING = (str, str | None)


class DirectRoute(APIRoute):
    """See the module's docstring."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        checks = [_request_only(self.path, d) for d in dependant.dependencies]
        if dependant.request_param_name is None:
            raise TypeError(f"{self.path}: a direct route's endpoint takes the request")
        request_name = dependant.request_param_name
        path_names = [_string_field(self.path, p, optional=False) for p in dependant.path_params]
        query_names = [_string_field(self.path, p, optional=True) for p in dependant.query_params]
        solved_elsewhere = [p.name for p in (*dependant.header_params, *dependant.cookie_params, *dependant.body_params)]
        if solved_elsewhere or any(
            name is not None
            for name in (dependant.response_param_name, dependant.background_tasks_param_name,
                         dependant.security_scopes_param_name, dependant.websocket_param_name)
        ):  # fmt: skip
            raise TypeError(f"{self.path}: a direct route's endpoint takes the request, path and string query "
                            f"parameters only, not {solved_elsewhere or 'FastAPI-provided objects'}")  # fmt: skip
        # FastAPI (0.165) builds an included route's handler inside that inclusion's context,
        # whose dependencies the checks above do not see: a direct route must not be included.
        inclusion = getattr(fastapi.routing, "_effective_route_context_var", None)
        if inclusion is not None and inclusion.get() is not None:
            raise TypeError(f"{self.path}: add a direct route on the app's router, not through include_router")
        solved = super().get_route_handler()
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            if request.app.dependency_overrides:
                return await solved(request)
            for check in checks:
                await check(request)
            path, query = request.path_params, request.query_params
            kwargs: dict[str, Any] = {name: path[name] for name in path_names}
            for name in query_names:
                kwargs[name] = query.get(name)
            response: Response = await endpoint(**{request_name: request}, **kwargs)
            return response

        return handler


def _request_only(path: str, dependency: Dependant) -> Callable[[Request], Coroutine[Any, Any, Any]]:
    """``dependency``'s coroutine function, which must take the request and nothing else."""
    call = dependency.call
    params = [*dependency.path_params, *dependency.query_params, *dependency.header_params,
              *dependency.cookie_params, *dependency.body_params]  # fmt: skip
    if (
        call is None
        or not inspect.iscoroutinefunction(call)
        or dependency.dependencies
        or params
        or dependency.request_param_name is None
        or len(inspect.signature(call).parameters) != 1
    ):
        raise TypeError(f"{path}: a direct route runs dependencies that take the request alone, "
                        f"not {getattr(call, '__qualname__', call)!r}")  # fmt: skip
    return call


def _string_field(path: str, field: Any, *, optional: bool) -> str:
    """The name of a path (or optional query) parameter, which must be declared as a string:
    the direct handler passes it as the request gives it, with no conversion."""
    annotation, required = field.field_info.annotation, field.field_info.is_required()
    if annotation not in _STRING or field.alias != field.name or (optional and (required or field.default is not None)):
        kind = "an optional string query" if optional else "a string path"
        raise TypeError(f"{path}: a direct route's {field.name!r} must be {kind} parameter")
    return str(field.name)
