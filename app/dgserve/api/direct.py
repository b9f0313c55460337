"""``DirectRoute``: a route answered without FastAPI's per-request dependency solving.

The inference routes (``/v1`` and OIP's infer) run on every request the server
answers, and solving their dependencies took more of the event loop than any step of
their own (docs/performance.md, "The inference route's own loop time"). Such a route
is declared as usual, so OpenAPI sees it unchanged, but its handler does by hand the
little FastAPI would do for it:

- awaits each of its dependencies (the app's ``authorize``) with the request, in order,
  each once, as FastAPI's per-request cache does;
- calls the endpoint with the request, its path parameters and its optional query
  parameters, all plain strings, as the request gives them. The endpoint reads
  anything else (a query model, the body) itself, and returns a ``Response``.

Building fails for any declaration whose answer this could change: a dependency that
takes more than the request, has dependencies of its own or is not a coroutine
function; a dependency whose value the endpoint takes; an endpoint that is not a
coroutine function or is not declared to return a ``Response``; a header, cookie,
body or connection parameter; a path or query parameter that is not a plain string
(a type, a constraint, a validator, an alias, a path convertor other than ``str`` or
``path``); and inclusion through ``include_router``, whose extra dependencies the
checks cannot see. While the app overrides any dependency (``app.dependency_overrides``,
as tests do), requests take FastAPI's own path, which honours overrides.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import fastapi.routing
from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.convertors import PathConvertor, StringConvertor

__all__ = ["DirectRoute"]

_STRING = (str, str | None)
Dependency = Callable[..., Coroutine[Any, Any, Any]]


class DirectRoute(APIRoute):
    """See the module's docstring."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant, endpoint = self.dependant, self.endpoint
        checks = _dependencies(self.path, dependant.dependencies)
        if not inspect.iscoroutinefunction(endpoint) or not _returns_response(endpoint):
            raise TypeError(f"{self.path}: a direct route's endpoint is a coroutine function returning a Response")
        if dependant.request_param_name is None:
            raise TypeError(f"{self.path}: a direct route's endpoint takes the request")
        request_name = dependant.request_param_name
        path_names = [_string_field(self.path, p, optional=False) for p in dependant.path_params]
        for name, convertor in self.param_convertors.items():
            if type(convertor) not in (StringConvertor, PathConvertor):
                raise TypeError(f"{self.path}: a direct route's {name!r} must be a string path parameter")
        query_names = [_string_field(self.path, p, optional=True) for p in dependant.query_params]
        solved_elsewhere = [p.name for p in (*dependant.header_params, *dependant.cookie_params, *dependant.body_params)]
        provided = (dependant.response_param_name, dependant.background_tasks_param_name,
                    dependant.security_scopes_param_name, dependant.websocket_param_name,
                    dependant.http_connection_param_name)  # fmt: skip
        if solved_elsewhere or any(name is not None for name in provided):
            raise TypeError(f"{self.path}: a direct route's endpoint takes the request, path and string query "
                            f"parameters only, not {solved_elsewhere or 'FastAPI-provided objects'}")  # fmt: skip
        # FastAPI (0.165) builds an included route's handler inside that inclusion's context,
        # whose dependencies the checks above do not see: a direct route must not be included.
        inclusion = getattr(fastapi.routing, "_effective_route_context_var", None)
        if inclusion is not None and inclusion.get() is not None:
            raise TypeError(f"{self.path}: add a direct route on the app's router, not through include_router")
        solved = super().get_route_handler()

        async def handler(request: Request) -> Response:
            if request.app.dependency_overrides:
                return await solved(request)
            for call, name in checks:
                await call(**{name: request})
            path, query = request.path_params, request.query_params
            kwargs: dict[str, Any] = {name: path[name] for name in path_names}
            for name in query_names:
                kwargs[name] = query.get(name)
            response: Response = await endpoint(**{request_name: request}, **kwargs)
            return response

        return handler


def _dependencies(path: str, dependencies: Sequence[Dependant]) -> list[tuple[Dependency, str]]:
    """Each dependency to run, with the name it takes the request by: in order, each call once
    (FastAPI's per-request cache) unless it opted out. Refuses any that needs solving."""
    calls: list[tuple[Dependency, str]] = []
    for dependency in dependencies:
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
        if dependency.name is not None:  # Depends(...) as an endpoint parameter: its value is wanted
            raise TypeError(f"{path}: a direct route's endpoint takes no dependency's value ({dependency.name!r})")
        if dependency.use_cache and any(call is seen for seen, _ in calls):
            continue
        calls.append((call, dependency.request_param_name))
    return calls


def _returns_response(endpoint: Callable[..., Any]) -> bool:
    try:
        annotation = inspect.signature(endpoint, eval_str=True).return_annotation
    except (NameError, TypeError):
        return False
    return isinstance(annotation, type) and issubclass(annotation, Response)


def _string_field(path: str, field: Any, *, optional: bool) -> str:
    """The name of a path (or optional query) parameter, which must be declared as a plain
    string: the direct handler passes it as the request gives it, with no conversion or check."""
    info = field.field_info
    plain = (info.annotation in _STRING and not info.metadata and info.validation_alias is None
             and field.alias == field.name)  # fmt: skip
    if not plain or (optional and (info.is_required() or field.default is not None)):
        kind = "an optional string query" if optional else "a string path"
        raise TypeError(f"{path}: a direct route's {field.name!r} must be {kind} parameter")
    return str(field.name)
