"""The Open Inference Protocol's gRPC service, on its own port (``DGSERVE_GRPC_PORT``, 8001 as Triton).

The service definition is not copied here: it comes from tritonclient's generated
``GRPCInferenceService`` (the OIP service plus Triton's own calls, which answer
UNIMPLEMENTED), so it is exactly what ``tritonclient.grpc`` speaks. Install it with
``pip install 'dgserve[grpc]'``.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer are
served; inputs come in ``raw_input_contents`` or typed ``contents``, and outputs go
back in ``raw_output_contents``. Errors map onto gRPC status codes.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from dgserve.api.auth import ApiKeys, grpc_need, presented_key
from dgserve.errors import DGServeError, NotFoundError
from dgserve.oip.frontend import InferRequest, OipFrontend, RequestedOutput
from dgserve.oip.tensors import ProtocolError, Tensor, from_json_data, from_raw
from dgserve.serving.service import ServingService

__all__ = ["start_grpc_server"]

log = logging.getLogger(__name__)

_STATUS = {
    401: grpc.StatusCode.UNAUTHENTICATED, 403: grpc.StatusCode.PERMISSION_DENIED,
    400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}  # fmt: skip
# Typed contents by datatype, for requests that do not use raw_input_contents.
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def _parameters(params: Any) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(value, which)
    return out


def _tensor_metadata(spec: dict[str, Any]) -> Any:
    return service_pb2.ModelMetadataResponse.TensorMetadata(name=spec["name"], datatype=spec["datatype"],
                                                            shape=spec["shape"])  # fmt: skip


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, frontend: OipFrontend) -> None:
        self.frontend = frontend

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 (the protocol's names)
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=self.frontend.server_ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            ready = self.frontend.model_ready(request.name, request.version or None)
        except NotFoundError:
            ready = False  # as over HTTP, where the client reads the 404 as "not ready"
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        meta = self.frontend.server_metadata()
        return service_pb2.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                                  extensions=meta["extensions"])  # fmt: skip

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        meta = await self._guard(context, lambda: self.frontend.model_metadata(request.name, request.version or None))
        return service_pb2.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[_tensor_metadata(t) for t in meta["inputs"]], outputs=[_tensor_metadata(t) for t in meta["outputs"]],
        )  # fmt: skip

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        try:
            served, task, reservation = self.frontend.admit(request.model_name, request.model_version or None)
            with reservation:
                parsed = InferRequest(
                    inputs=_inputs(request, self.frontend.service.settings.max_body_bytes),
                    id=request.id or None,
                    parameters=_parameters(request.parameters),
                    outputs=[RequestedOutput(o.name) for o in request.outputs] or None,
                )
                # A cancelled call (or one past its deadline) cancels this wait: grpc.aio ends the handler.
                response = await self.frontend.infer(served, task, parsed, reservation)
                assert response is not None  # None only comes from a watch
        except DGServeError as exc:
            await context.abort(_STATUS.get(exc.status_code, grpc.StatusCode.INTERNAL), exc.message)
            raise  # abort raises; this line is never reached
        reply = service_pb2.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                               id=response.id or "")  # fmt: skip
        for key, value in response.parameters.items():
            reply.parameters[key].bool_param = bool(value)  # the only one today: inspection_committed
        for tensor, _ in response.outputs:
            reply.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            reply.raw_output_contents.append(tensor.raw())
        return reply

    async def _guard(self, context: Any, call: Any) -> Any:
        try:
            return call()
        except DGServeError as exc:
            await context.abort(_STATUS.get(exc.status_code, grpc.StatusCode.INTERNAL), exc.message)


def _inputs(request: Any, limit: int) -> list[Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    if sum(len(r) for r in raw) > limit:
        raise ProtocolError(f"raw inputs exceed the limit of {limit} bytes")
    tensors = []
    for index, spec in enumerate(request.inputs):
        shape = list(spec.shape)
        if raw:
            tensors.append(from_raw(spec.name, spec.datatype, shape, raw[index]))
            continue
        field = _CONTENTS.get(spec.datatype)
        if field is None:
            raise ProtocolError(f"input {spec.name!r}: unknown datatype {spec.datatype!r}")
        tensors.append(from_json_data(spec.name, spec.datatype, shape, list(getattr(spec.contents, field))))
    return tensors


class _KeyInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """API keys from the call's metadata (``authorization: Bearer`` or ``x-api-key``), as over HTTP."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        try:
            self.keys.check(presented_key(details.invocation_metadata or ()), grpc_need(details.method))
        except DGServeError as exc:
            refusal = exc

            async def refuse(request: Any, context: Any) -> Any:
                await context.abort(_STATUS[refusal.status_code], refusal.message)

            if handler is None:  # no such method: gRPC answers UNIMPLEMENTED, as without keys
                return None
            # The same kind of handler (unary or streaming), answering only the refusal.
            kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
            return handler._replace(**{kind: refuse for kind in kinds if getattr(handler, kind) is not None})
        return handler


async def start_grpc_server(
    service: ServingService, host: str, port: int, keys: ApiKeys | None = None
) -> tuple[grpc.aio.Server, int]:
    """Serve the OIP gRPC service on ``host:port`` (0: any free port); returns the server and its port.

    ``keys``: the API keys calls must carry (none: open)."""
    interceptors = [_KeyInterceptor(keys)] if keys is not None and keys.enabled else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", service.settings.max_body_bytes + 1024 * 1024),
        ("grpc.max_send_message_length", -1),
    ])  # fmt: skip
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(OipFrontend(service)), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"gRPC could not bind {host}:{port}")
    await server.start()
    log.info("OIP gRPC service on %s:%d", host, bound)
    return server, bound
