"""The Open Inference Protocol's HTTP/REST API under ``/v2``, with the binary tensor data extension.

A request body is a JSON object, optionally followed by binary tensor data: then the
``Inference-Header-Content-Length`` header gives the JSON's length, and each input
whose ``parameters.binary_data_size`` is set takes that many bytes, in input order.
Outputs go back as JSON ``data`` or, when asked (``binary_data`` on an output, or
``binary_data_output`` on the request), as binary data after the JSON in the same way.

Errors are ``{"error": "<message>"}`` with the status the protocol expects (400 for a
malformed request, 404 unknown model, 413, 503 + Retry-After, 504), handled by these
routes' own route class so ``/v1``'s error format is untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from dgserve.api.body import read_body
from dgserve.api.direct import DirectRoute
from dgserve.api.disconnect import CLIENT_CLOSED_REQUEST, until_disconnect
from dgserve.api.errors import HELD
from dgserve.errors import DGServeError
from dgserve.oip.frontend import InferRequest, InferResponse, OipFrontend, RequestedOutput
from dgserve.oip.tensors import ProtocolError, from_json_data, from_raw
from dgserve.serving.reservation import while_uploading

__all__ = ["ERROR_CONTENT", "HEADER_LENGTH", "get_frontend", "install", "parse_request", "render_response"]

HEADER_LENGTH = "inference-header-content-length"
_E = TypeVar("_E", bound=Callable[..., Any])


class OipRoute(APIRoute):
    """Answers every error of its routes as ``{"error": message}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except DGServeError as exc:
                request.scope.setdefault("state", {})["error_code"] = exc.code  # for the rejection metrics
                # The protocol answers every malformed request with 400, where /v1 says 415 or 422.
                status = 400 if exc.status_code in (415, 422) else exc.status_code
                return JSONResponse({"error": exc.message}, status, headers=exc.headers)
            except RequestValidationError as exc:
                return JSONResponse({"error": str(exc.errors())}, 400)

        return guarded


class _DirectOipRoute(OipRoute, DirectRoute):
    """The infer routes: OIP's errors around a ``DirectRoute``'s handler."""


async def get_frontend(request: Request) -> OipFrontend:
    """The app's one OIP front-end, made with its routes (the infer routes read it from the app)."""
    frontend: OipFrontend = request.app.state.dgserve_oip
    return frontend


Frontend = Annotated[OipFrontend, Depends(get_frontend)]

# What the OpenAPI document says each route answers, so that it matches what they do.
ERROR_CONTENT = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}},
                                               "required": ["error"]}}}  # fmt: skip
_ERROR_TEXT = {
    400: "a malformed request (bad JSON, shapes, datatypes or data; an image that does not decode)",
    404: "unknown model or version", 413: "body over DGSERVE_MAX_BODY_BYTES",
    503: "queue full or not ready (Retry-After)", 504: "deadline passed",
}  # fmt: skip
_EMPTY = {"content": {}}  # the health answers carry their status and no body


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": _ERROR_TEXT[status], "content": ERROR_CONTENT} for status in statuses}


_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "An inference request: JSON, or JSON followed by binary tensor data "
        "(Inference-Header-Content-Length gives the JSON's length).",
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
                "id": {"type": "string"}, "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"]}},
                "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            }}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}  # fmt: skip


def install(app: FastAPI, frontend: OipFrontend) -> None:
    """Serve ``frontend`` under ``/v2`` on ``app``.

    The routes go on the app's own router, where the infer routes can be ``DirectRoute``s:
    they answer every inference request, and skip FastAPI's dependency solving
    (``dgserve.api.direct``), as ``/v1``'s do.
    """
    app.state.dgserve_oip = frontend

    def route(method: str, path: str, route_class: type[APIRoute] = OipRoute, **kwargs: Any) -> Callable[[_E], _E]:
        def add(endpoint: _E) -> _E:
            app.router.add_api_route(path, endpoint, methods=[method], route_class_override=route_class,
                                     tags=["open inference protocol"], **kwargs)  # fmt: skip
            return endpoint

        return add

    @route("GET", "/v2", summary="Server metadata")
    async def server_metadata(frontend: Frontend) -> dict[str, Any]:
        return frontend.server_metadata()

    @route("GET", "/v2/health/live", summary="Server liveness", response_class=Response, responses={200: _EMPTY})
    async def live() -> Response:
        return Response(status_code=200)

    @route("GET", "/v2/health/ready", summary="Server readiness", response_class=Response,
           responses={200: _EMPTY, 503: {"description": "not ready", **_EMPTY}})  # fmt: skip
    async def ready(frontend: Frontend) -> Response:
        return Response(status_code=200 if frontend.server_ready() else 503)

    for suffix in ("", "/versions/{version}"):
        base = "/v2/models/{name}" + suffix

        @route("GET", base, summary="Model metadata", responses=_errors(400, 404))
        async def model_metadata(frontend: Frontend, name: str, version: str | None = None) -> dict[str, Any]:
            return frontend.model_metadata(name, version)

        @route("GET", base + "/ready", summary="Model readiness", response_class=Response,
               responses={200: _EMPTY, 503: {"description": "not ready", **_EMPTY}, **_errors(400, 404)})  # fmt: skip
        async def model_ready(frontend: Frontend, name: str, version: str | None = None) -> Response:
            return Response(status_code=200 if frontend.model_ready(name, version) else 503)

        # Without a version in the path, ``?version=`` names one (an optional string query
        # parameter, which a direct route passes on as given).
        @route("POST", base + "/infer", route_class=_DirectOipRoute, summary="Inference", response_class=Response,
               openapi_extra=_INFER_BODY,
               responses={200: {"description": "the outputs: JSON, then any binary tensor data",
                                "content": {"application/json": {"schema": {"type": "object"}},
                                            "application/octet-stream": {"schema": {}}}},
                          **_errors(400, 404, 413, 503, 504)})  # fmt: skip
        async def infer(request: Request, name: str, version: str | None = None) -> Response:
            frontend: OipFrontend = request.app.state.dgserve_oip
            known = frontend.lookup(name, version)  # 404 before anything else
            request.scope["state"]["model"] = (known.name, known.version)  # metric labels from here on
            served, task, reservation = frontend.admit(name, version, request.scope["state"].get(HELD))
            with reservation:  # the queue place, held while the body is read (its first second) and parsed
                try:
                    read = read_body(request, frontend.service.settings.max_body_bytes)
                    body = await while_uploading(reservation, read)
                except ClientDisconnect:
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                parsed = parse_request(body, request.headers.get(HEADER_LENGTH))
                # A client that leaves while its images wait takes them out of the queue before compute.
                watch = partial(until_disconnect, request)
                response = await frontend.infer(served, task, parsed, reservation, watch)
            if response is None:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            content, headers = render_response(response, bool(parsed.parameters.get("binary_data_output", False)))
            media = "application/octet-stream" if HEADER_LENGTH in headers else "application/json"
            return Response(content, media_type=media, headers=headers)


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """An inference request from its body: JSON, then binary tensor data if the header says so."""
    if header_length is None:
        json_end = len(body)
    else:
        if not header_length.strip().isdigit():
            raise ProtocolError(f"Inference-Header-Content-Length must be a byte count, got {header_length!r}")
        json_end = int(header_length)
        if json_end > len(body):
            raise ProtocolError(f"Inference-Header-Content-Length is {json_end} but the body has {len(body)} bytes")
    try:
        doc = json.loads(body[:json_end])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the request is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object")
    inputs, offset = [], json_end
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not {"name", "datatype", "shape"} <= spec.keys():
            raise ProtocolError("each input needs name, datatype and shape")
        name, datatype, shape = str(spec["name"]), spec["datatype"], spec["shape"]
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is None:
            if "data" not in spec:
                raise ProtocolError(f"input {name!r} has neither data nor parameters.binary_data_size")
            inputs.append(from_json_data(name, datatype, shape, spec["data"]))
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} runs past the body's binary data")
        inputs.append(from_raw(name, datatype, shape, body[offset : offset + size]))
        offset += size
    if offset != len(body):
        raise ProtocolError(f"{len(body) - offset} bytes of binary data after the last input belong to no input")
    return InferRequest(inputs, _request_id(doc.get("id")), parameters, _requested_outputs(doc.get("outputs")))


def _request_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise ProtocolError("'id' must be a string of at most 256 characters")
    return value


def _requested_outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(o, dict) and "name" in o for o in value):
        raise ProtocolError("'outputs' must be a list of objects with a name")
    out = []
    for o in value:
        binary = (o.get("parameters") or {}).get("binary_data")
        out.append(RequestedOutput(str(o["name"]), None if binary is None else bool(binary)))
    return out


def render_response(response: InferResponse, binary_default: bool) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, then the binary outputs in order."""
    outputs, blobs = [], []
    for tensor, binary in response.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary if binary is not None else binary_default:
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensor.json_data()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version,
                           "outputs": outputs}  # fmt: skip
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    head = json.dumps(doc).encode()
    if not blobs:
        return head, {}
    return head + b"".join(blobs), {HEADER_LENGTH: str(len(head))}
