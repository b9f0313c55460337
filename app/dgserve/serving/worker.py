"""Model workers: one model replica on one device, computing batches in its own thread.

A ``ModelWorker`` is a ``DynamicBatcher`` handler. Each owns a private replica (the
routing records a DG-Net stage keeps of its last forward belong to that replica, so
two threads must never share one) and a single-thread executor, so the forward pass,
post-processing and connectivity collection never run on the event loop and never
interleave with another batch on the same replica.

What the model computes and how its outputs become predictions is the task's
business (``Task.predict``); the worker supplies the thread, the device and the
connectivity. What a batch returns per image is final and immutable: predictions
already cut to the caller's options, and the connectivity both as a dict (for the
inspection store) and as JSON text serialised once in the worker thread, so the event
loop neither walks nor re-encodes the matrices (a GloRe-ResNet-50 record is ~4.3 MB).
The worker stores nothing: records are the serving service's business, after the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from dgserve.connectivity import ImageConnectivity
from dgserve.errors import UnsupportedPrecisionError
from dgserve.model_store import LoadedModel, Manifest
from dgserve.model_store.manifest import Precision
from dgserve.models.connectivity import collect_connectivity, connectivity_sources
from dgserve.serving.threads import compute_thread
from dgserve.settings import MemoryFormat
from dgserve.tasks import ImageInfo, InferenceItem, get_task

__all__ = [
    "ImageResult", "MemoryFormat", "ModelWorker", "autocast_dtype", "configure_compiling_thread", "set_memory_format",
    "warm_up_sizes",
]

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES: dict[Precision, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

_MEMORY_FORMATS: dict[MemoryFormat, torch.memory_format] = {
    "channels_last": torch.channels_last, "contiguous": torch.contiguous_format,
}


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The dtype ``precision`` autocasts to on ``device`` (None for fp32), or ``UnsupportedPrecisionError``.

    fp16 is refused off CUDA: CPU autocast has no fp16 kernels worth having, and a
    model quietly running slower and less exact than asked is worse than a load error.
    """
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise UnsupportedPrecisionError(f"precision fp16 needs a CUDA device, not {device}; use bf16 or fp32")
    return _AUTOCAST_DTYPES[precision]


def set_memory_format(model: nn.Module, memory_format: MemoryFormat) -> None:
    """Lay out the weights of ``model``'s 2-D convolutions in ``memory_format`` (DGSERVE_MEMORY_FORMAT).

    A convolution whose weight is channels_last (NHWC) returns its output in that layout,
    so the feature maps of the whole network follow, and so do the element-wise ops that
    preserve their input's layout (batch norm, ReLU, DG-Net's weighted sums). NHWC is
    oneDNN's native layout on a CPU, and PyTorch's NCHW max pooling there is about eight
    times slower than its NHWC one (``docs/performance.md``). Outputs differ from the NCHW
    forward's by float rounding in the convolutions. 3-D convolutions (video) keep theirs.
    """
    torch.nn.utils.convert_conv2d_weight_memory_format(model, _MEMORY_FORMATS[memory_format])


def warm_up_sizes(manifest: Manifest, max_batch_size: int | None = None, inputs_per_image: int = 1) -> tuple[int, ...]:
    """The batch sizes a worker's warm-up runs: one; for a compiled forward also 2 and the largest.

    torch.compile specialises its first graph on the batch size it sees. A second size
    makes it compile once more with the batch dimension dynamic (size one keeps its own
    graph: PyTorch specialises dimensions of size 0 and 1). oneDNN's convolutions then
    split that range at 16: one graph serves batches of 2 to 15, another 16 and up, and
    the largest batch compiles it wherever a batch can reach it. The largest is the
    largest batch the model sees: ``max_batch_size`` images times ``inputs_per_image``
    (a video's other clips go through the model in one call; the warm-up's blank images
    give one input each). So 1, 2 and the largest leave nothing to compile while serving
    (``tests/serving/test_worker.py`` serves sizes on both sides of 16 under
    ``fail_on_recompile``), and a model served in small batches compiles two graphs.
    """
    if not manifest.torch_compile:
        return (1,)
    largest = (max_batch_size or manifest.batching.max_batch_size) * inputs_per_image
    return tuple(sorted({size for size in (1, 2, largest) if size <= largest}))


# Dynamo's cache holds graphs per forward's code, shared by every model whose forward is the
# same function (torchvision's ResNet.forward serves several bundled models); a frozen graph
# is pinned to its replica's weights, so each replica adds its own 2-3 (``warm_up_sizes``).
_RECOMPILE_LIMIT = 256
_ACCUMULATED_RECOMPILE_LIMIT = 1024


def configure_compiling_thread() -> None:
    """Set, in the calling thread, how a served forward compiles (cheap when already set).

    torch keeps dynamo's and inductor's settings per thread (and per context), so they are
    set where the forward runs (a worker's thread, a process worker child's), not where
    the worker was built, and checked at every batch rather than remembered.

    * Inductor treats the weights as constants (``freezing``): a served model's weights never
      change after it loads, and every forward runs under ``inference_mode``. It then folds
      each batch norm into the convolution before it and lays the convolution weights out
      once for oneDNN instead of at every forward. DG-Net ResNet-50's compiled forward took
      16 % less time at batch 1 and 11 % less at batch 8 (docs/performance.md). A weight
      changed after the compile would not be seen, which a served replica never does. The
      price: each replica compiles its own graphs, where unfrozen replicas shared them.
    * Past dynamo's limit of 8 graphs per forward's code it would run the rest eagerly
      without a word, so room is made for dozens of replicas.
    """
    import torch._inductor.config  # inductor's own import: only where a worker compiles

    dynamo, inductor = torch._dynamo.config, torch._inductor.config
    if inductor.freezing and dynamo.recompile_limit >= _RECOMPILE_LIMIT:
        return
    inductor.freezing = True
    dynamo.recompile_limit = max(dynamo.recompile_limit, _RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, _ACCUMULATED_RECOMPILE_LIMIT)


def effective_manifest(manifest: Manifest, precision: Precision | None, torch_compile: bool | None) -> Manifest:
    """``manifest`` with the server's overrides (DGSERVE_PRECISION, DGSERVE_TORCH_COMPILE) applied.

    The manifest a worker keeps says what actually runs, so GET /v1/models shows it.
    """
    update: dict[str, Any] = {}
    if precision is not None and precision != manifest.precision:
        update["precision"] = precision
    if torch_compile is not None and torch_compile != manifest.torch_compile:
        update["torch_compile"] = torch_compile
    return manifest.model_copy(update=update) if update else manifest


@dataclass(frozen=True, slots=True)
class ImageResult:
    """What the model made of one image."""

    predictions: Any  # JSON-able, as the task made it (a list of labels or boxes, a label map)
    connectivity: dict[str, Any]
    connectivity_json: str  # json.dumps(connectivity), computed off the event loop
    record: ImageConnectivity  # the typed form, for the metrics


class ModelWorker:
    """One replica of one model version on one device; an async batch handler."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        *,
        name: str,
        threads: int | None = None,
        nice: int = 0,
        precision: Precision | None = None,
        memory_format: MemoryFormat = "channels_last",
        torch_compile: bool | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        """``threads`` and ``nice`` (CPU workers): the worker thread's torch threads and how much
        lower its CPU priority is than the event loop's (``serving/threads.py``). ``precision``
        and ``torch_compile``, when given, replace the manifest's. ``max_batch_size``: the
        largest batch it will be given, when not the manifest's (the warm-up runs it)."""
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        set_memory_format(loaded.model, memory_format)  # the replica is this worker's own
        self.task = get_task(loaded.manifest.task)
        wanted = loaded.manifest.torch_compile if torch_compile is None else torch_compile
        if wanted and not self.task.compiles:
            log.warning("%s: runs eagerly: torch.compile cannot serve a %s model's forward", name, self.task.name)
        self.manifest: Manifest = effective_manifest(loaded.manifest, precision, wanted and self.task.compiles)
        self._autocast = autocast_dtype(self.manifest.precision, device)  # refuses fp16 off CUDA before any thread starts
        # Compiled lazily, in the worker thread, by the first forwards (the warm-up's). The
        # compiled module shares the replica's parameters and state: the routing records
        # still land on ``loaded.model``, where the connectivity is collected.
        self._forward: nn.Module = loaded.model
        if self.manifest.torch_compile:
            self._forward = torch.compile(loaded.model)  # type: ignore[assignment]
        self.device = device
        self.name = name
        # One thread per replica: the replica's forward state is not thread-safe, and
        # the event loop must never run a forward itself.
        # torch's OpenMP team size is a per-thread setting: pinned in the worker's own
        # thread, it stays whatever other threads (the decode pool) set for themselves.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=name,
            initializer=None if threads is None else compute_thread,
            initargs=() if threads is None else (threads, nice),
        )
        self._sources = connectivity_sources(loaded.model)
        self._cuda = device.type == "cuda"
        # A stream per worker lets several instances on one GPU overlap their copies
        # and kernels instead of queueing on the device's default stream.
        self._stream = torch.cuda.Stream(device) if self._cuda else None
        if self._stream is not None:
            # The replica's weights were copied and laid out (set_memory_format above, the
            # copy of an extra replica) on the default stream; the forwards on this one
            # must not start before that work is done.
            self._stream.wait_stream(torch.cuda.current_stream(device))

    async def __call__(self, items: list[InferenceItem]) -> list[ImageResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.infer_batch, items)

    async def warm_up(self) -> float:
        """Run dummy batches (results discarded; ``warm_up_sizes``); returns the seconds they took."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self._executor, self.run_warm_up)
        return time.perf_counter() - started

    def run_warm_up(self) -> None:
        """``warm_up``'s batches, in the calling thread (the worker's, or a process worker's child)."""
        height, width = self.manifest.preprocessing.input_size
        # Through the task's own preparation, so the batch is shaped like a real one.
        tensor, context = self.task.prepare(Image.new("RGB", (width, height)), self.manifest.preprocessing)
        dummy = InferenceItem(tensor, ImageInfo(None, width, height), self.task.Options(), context)
        per_image = self.task.model_inputs_per_image(self.manifest.preprocessing)
        for size in warm_up_sizes(self.manifest, self.max_batch_size, per_image):
            self.infer_batch([dummy] * size)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- runs in the worker thread ---------------------------------------------

    def infer_batch(self, items: Sequence[InferenceItem]) -> list[ImageResult]:
        if self.manifest.torch_compile:
            configure_compiling_thread()
        with torch.inference_mode(), self._device_context():
            with self._precision_context():
                predictions = self.task.predict(self._forward, items, self.manifest, self._to_device)
            # Outside autocast: the records are read back (and digested) as float32.
            records = collect_connectivity(self.loaded.model, len(items), self._sources)
        results = []
        for preds, record in zip(predictions, records, strict=True):
            connectivity = record.to_dict()
            results.append(ImageResult(preds, connectivity, json.dumps(connectivity), record))
        return results

    def _device_context(self) -> contextlib.AbstractContextManager[object]:
        if self._stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self._stream))
        return stack

    def _precision_context(self) -> contextlib.AbstractContextManager[object]:
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast)

    def _to_device(self, tensor: Tensor) -> Tensor:
        if not self._cuda:
            return tensor
        # Page-locked memory lets the copy run asynchronously on the current stream.
        return tensor.pin_memory().to(self.device, non_blocking=True)
