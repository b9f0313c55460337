"""The Open Inference Protocol over the serving service, whichever transport carries it.

HTTP (``http.py``) and gRPC (``grpc.py``) parse their wire format into an
``InferRequest`` and write an ``InferResponse`` back; everything in between is here,
and everything below is the same ``ServingService`` that ``/v1`` uses, so the batcher,
deadlines, 503 + Retry-After, limits, metrics and inspection records apply alike.

A model takes one input per request, either of:

* ``image``: ``BYTES [N]``, each element an encoded image (JPEG, PNG, ...), decoded and
  preprocessed by the server with the manifest, as OpenVINO Model Server does;
* ``input``: ``FP32 [N, 3, H, W]``, already preprocessed at the manifest's input size
  (the task's ``input_shape``: a video model takes one clip each, ``[N, 3, T, H, W]``).

It answers with its task's prediction tensors (``Task.tensor_outputs``), the
``inspection_id`` of each image (``BYTES [N]``: ``GET /v1/inspections/{id}``), and one
tensor per module that records connectivity, named ``<kind>/<module>``: each DG-Net
stage's thresholded adjacency (``stages/layer1``, ``FP32 [N, n, n]``) and each GloRe
unit's projection map (``glore_units/layer3.units.0``, ``INT32 [N, H, W]``).

Request ``parameters``: ``timeout`` (microseconds, as Triton reads it) sets the
deadline; ``tags`` (a string, ``"truth:cat,split:val"``: what ``?tag=`` is on ``/v1``,
checked by the same rules, ``dgserve.inspection.tags``) goes with every image's
inspection record; the task's options (``top_k``, ``score_threshold``) are taken by name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from dgserve import __version__
from dgserve.connectivity import kinds
from dgserve.errors import VersionNotFoundError
from dgserve.inspection.tags import parse_list
from dgserve.oip.tensors import DTYPES, ProtocolError, Tensor
from dgserve.serving.reservation import Reservation
from dgserve.serving.served_models import ServedModel
from dgserve.serving.service import ImagePrediction, ServingService, Upload
from dgserve.tasks import Options, Task, TensorSpec, get_task

__all__ = ["EXTENSIONS", "InferRequest", "InferResponse", "OipFrontend", "RequestedOutput", "Watch"]

EXTENSIONS = ["binary_tensor_data", "dgserve_connectivity"]
Watch = Callable[[Awaitable[list[ImagePrediction]]], Awaitable[list[ImagePrediction] | None]]
IMAGE_INPUT, TENSOR_INPUT, ID_OUTPUT = "image", "input", "inspection_id"


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request's default


@dataclass(frozen=True, slots=True)
class InferRequest:
    inputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None  # None: every output


@dataclass(frozen=True, slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str | None
    outputs: list[tuple[Tensor, bool | None]]  # each with the binary wish of its request
    parameters: dict[str, Any] = field(default_factory=dict)


class OipFrontend:
    """Server and model metadata, readiness, and inference in the protocol's terms."""

    def __init__(self, service: ServingService) -> None:
        self.service = service
        # A loaded model's outputs never change, and every response names them: made once.
        self._specs: dict[tuple[str, int], list[TensorSpec]] = {}

    # --- metadata and health ---------------------------------------------------------

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "dgserve", "version": __version__, "extensions": EXTENSIONS}

    def server_ready(self) -> bool:
        return not self.service.not_ready()

    def model_ready(self, name: str, version: str | None) -> bool:
        return self.lookup(name, version).ready

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        served = self.lookup(name, version)
        group = self.service.models.groups[served.name]
        meta: dict[str, Any] = {
            "name": served.name,
            "versions": [str(v) for v in sorted(group.versions)],
            "platform": "dgserve",
            "inputs": [],
            "outputs": [],
        }
        manifest = served.manifest
        if manifest is None:
            return meta  # a broken store entry: nothing is known about its tensors
        shape = get_task(manifest.task).input_shape(manifest.preprocessing)
        meta["inputs"] = [
            _spec(TensorSpec(IMAGE_INPUT, "BYTES", (-1,), "encoded files (JPEG, PNG, ...; MP4, WebM); or input")),
            _spec(TensorSpec(TENSOR_INPUT, "FP32", (-1, *shape), "preprocessed inputs (video: a clip each); or image")),
        ]
        meta["outputs"] = [_spec(s) for s in self._output_specs(served)]
        return meta

    def _output_specs(self, served: ServedModel) -> list[TensorSpec]:
        key = (served.name, served.version)
        cached = self._specs.get(key)
        if cached is not None:
            return cached
        assert served.manifest is not None
        specs = [*get_task(served.manifest.task).tensor_outputs(served.manifest)]
        specs.append(TensorSpec(ID_OUTPUT, "BYTES", (-1,), "each image's record: GET /v1/inspections/{id}"))
        for kind in kinds():  # known once the model is loaded
            if kind.tensor is None:
                continue
            for graph in (served.graph or {}).get(kind.kind, []):
                specs.append(TensorSpec(f"{kind.kind}/{graph['name']}", kind.tensor.datatype,
                                        (-1, *kind.tensor_dims(graph)), f"{kind.__name__}.{kind.tensor.field}"))  # fmt: skip
        if served.graph is not None:  # the connectivity outputs are known once it has loaded
            self._specs[key] = specs
        return specs

    def lookup(self, name: str, version: str | None) -> ServedModel:
        """A model version by the protocol's names (the version is a path segment); 404 if none."""
        models = self.service.models
        if version is None or version == "":
            return models.lookup(name)
        if not (version.isascii() and version.isdigit()):  # "latest", "1.0" or "¹" are no version here
            group = models.groups.get(name)
            raise VersionNotFoundError(name, version, sorted(group.versions) if group else [])
        return models.lookup(name, int(version))

    # --- inference ----------------------------------------------------------------------

    def admit(
        self, name: str, version: str | None, held: Reservation | None = None
    ) -> tuple[ServedModel, Task, Reservation]:
        """The ready model (404 / 503 as on /v1), its task, and the queue place held for the
        request (``with`` it; pass it to ``infer``), before a body is read."""
        known = self.lookup(name, version)
        # Any task: the protocol has one infer for all, and the model's manifest names its task.
        served, reservation = self.service.admit(known.name, known.version, None, held)
        assert served.manifest is not None  # ready models have one
        return served, get_task(served.manifest.task), reservation

    async def infer(
        self, served: ServedModel, task: Task, request: InferRequest, reservation: Reservation | None = None,
        watch: Watch | None = None,
    ) -> InferResponse | None:
        """Decode, batch and answer ``request``. ``watch`` wraps the wait for the batch, as
        ``/v1`` does (``api/disconnect.py``): None from it (the client left, its images taken
        out of the queue) is None here."""
        options = _options(task, request.parameters)
        timeout_us = request.parameters.get("timeout")
        if timeout_us is not None and (not isinstance(timeout_us, int | float) or timeout_us <= 0):
            raise ProtocolError(f"parameter timeout must be a positive number of microseconds, got {timeout_us!r}")
        deadline = self.service.deadline(None if timeout_us is None else timeout_us / 1000.0)
        tags = _tags(request.parameters.get("tags"))
        items = await self._items(served, request.inputs, options)
        work = self.service.infer(served, items, deadline, request.id, tags, reservation)
        answers = await (work if watch is None else watch(work))
        if answers is None:
            return None
        outputs = self._outputs(served, task, request, answers)
        # Whether every inspection record was durable before this answer went out.
        committed = all(a.committed for a in answers if a.id is not None)
        return InferResponse(served.name, str(served.version), request.id, outputs, {"inspection_committed": committed})

    async def _items(self, served: ServedModel, inputs: Sequence[Tensor], options: Options) -> list[Any]:
        if len(inputs) != 1 or inputs[0].name not in (IMAGE_INPUT, TENSOR_INPUT):
            names = [t.name for t in inputs]
            raise ProtocolError(f"send exactly one input, {IMAGE_INPUT!r} (BYTES) or {TENSOR_INPUT!r} (FP32); got {names}")
        tensor = inputs[0]
        count = tensor.array.shape[0] if tensor.array.ndim else 0
        limit = self.service.settings.max_images_per_request
        if not 1 <= count <= limit:
            raise ProtocolError(f"input {tensor.name!r}: {count} images; send 1 to {limit}")
        if tensor.name == IMAGE_INPUT:
            if tensor.datatype != "BYTES" or tensor.array.ndim != 1:
                raise ProtocolError(f"input {IMAGE_INPUT!r} must be BYTES of shape [N], got {tensor.datatype} {tensor.shape}")
            uploads = [Upload(f"{IMAGE_INPUT}[{i}]", data, "") for i, data in enumerate(tensor.array)]
            return await self.service.prepare(served, uploads, options)
        assert served.manifest is not None
        dims = get_task(served.manifest.task).input_shape(served.manifest.preprocessing)
        if tensor.datatype != "FP32" or tensor.array.ndim != 1 + len(dims):
            wanted = ", ".join(["N", *map(str, dims)])
            raise ProtocolError(f"input {TENSOR_INPUT!r} must be FP32 of shape [{wanted}], got {tensor.datatype} {tensor.shape}")
        batch = torch.from_numpy(np.array(tensor.array, dtype=np.float32))  # a copy the request owns
        return self.service.prepare_tensors(served, list(batch.unbind(0)), options)

    def _outputs(
        self, served: ServedModel, task: Task, request: InferRequest, answers: Sequence[ImagePrediction]
    ) -> list[tuple[Tensor, bool | None]]:
        assert served.manifest is not None
        specs = {s.name: s for s in self._output_specs(served)}
        wanted = request.outputs if request.outputs is not None else [RequestedOutput(n) for n in specs]
        unknown = [o.name for o in wanted if o.name not in specs]
        if unknown:
            raise ProtocolError(f"unknown outputs {unknown}; this model has {list(specs)}")
        names = {o.name for o in wanted}
        arrays = task.to_tensors([a.result.predictions for a in answers], served.manifest)
        # Empty where the record was dropped (the store's queue was full): no id is handed out.
        arrays[ID_OUTPUT] = np.array([(a.id or "").encode() for a in answers], dtype=object)
        arrays.update(_connectivity_tensors([a.result.record for a in answers], names))
        return [(Tensor(o.name, specs[o.name].datatype, arrays[o.name]), o.binary) for o in wanted]


def _connectivity_tensors(records: Sequence[Any], names: set[str]) -> dict[str, np.ndarray]:
    """``<kind>/<module>`` -> the batch's stacked tensor field, ragged images padded.

    Every image of a batch has the same modules in the same order, so a module's name
    is read once, from the first image, and its field gathered across the batch.
    """
    out: dict[str, np.ndarray] = {}
    if not records:
        return out
    for kind in kinds():
        spec = kind.tensor
        if spec is None:
            continue
        dtype = DTYPES[spec.datatype]
        for index, first in enumerate(records[0][kind.kind]):
            name = f"{kind.kind}/{getattr(first, kind.name_field)}"
            if name in names:
                values = [getattr(image[kind.kind][index], spec.field) for image in records]
                out[name] = _stack(values, dtype, spec.pad)
    return out


def _stack(values: Sequence[Any], dtype: np.dtype[Any], pad: float) -> np.ndarray:
    try:
        return np.array(values, dtype=dtype)  # the usual case: every image's field has one shape
    except ValueError:  # ragged: images of different sizes (a detector's projection maps)
        arrays = [np.asarray(v, dtype=dtype) for v in values]
        shape = tuple(max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim))
        out = np.full((len(arrays), *shape), pad, dtype=dtype)
        for i, a in enumerate(arrays):
            out[(i, *(slice(0, n) for n in a.shape))] = a
        return out


def _tags(value: Any) -> dict[str, str]:
    # A string parameter: what every OIP client (Triton's HTTP and gRPC, KServe's) can send.
    if value is None:
        return {}
    if not isinstance(value, str):
        raise ProtocolError(f"parameter tags must be a string of key:value pairs separated by commas, got {value!r}")
    return parse_list(value)


def _options(task: Task, parameters: dict[str, Any]) -> Options:
    mine = {k: v for k, v in parameters.items() if k in task.Options.model_fields}
    try:
        return task.Options.model_validate(mine)
    except ValidationError as exc:
        problems = "; ".join(f"parameter {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ProtocolError(problems) from exc


def _spec(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}
