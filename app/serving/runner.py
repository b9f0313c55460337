"""Model workers: one model replica on one device, computing batches in its own thread.

A ``ModelWorker`` is a ``DynamicBatcher`` handler. Each owns a private replica (the
routing records a DG-Net stage keeps of its last forward belong to that replica, so
two threads must never share one) and a single-thread executor, so the forward pass,
post-processing and connectivity collection never run on the event loop and never
interleave with another batch on the same replica.

What a batch returns per image is final: predictions already cut to the caller's
``top_k`` / ``score_threshold``, and the connectivity both as a dict (for the
inspection store) and as JSON text serialised once in the worker thread, so the event
loop neither walks nor re-encodes the matrices (a GloRe-ResNet-50 record is ~4.3 MB).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dgserve.models.connectivity import ImageConnectivity, collect_connectivity, connectivity_sources
from dgserve.serving.images import boxes_to_original
from dgserve.serving.threads import pin_torch_threads
from dgserve.store import LoadedModel, Manifest

__all__ = ["BatchSink", "ImageResult", "InferenceItem", "ModelWorker", "strip_matrices"]

log = logging.getLogger(__name__)

MATRIX_KEYS = ("adjacency", "projection")


@dataclass(frozen=True, slots=True)
class InferenceItem:
    """One preprocessed image and what its caller asked for."""

    tensor: Tensor  # (3, H, W) float32 on the CPU
    image_size: tuple[int, int]  # original (height, width)
    part: str | None = None  # the multipart part it came from, for messages and records
    scale: float = 1.0  # detection: tensor size / original size
    top_k: int | None = None  # classification; None: the manifest's default
    score_threshold: float | None = None  # detection; None: the manifest's default


@dataclass(slots=True)
class ImageResult:
    predictions: list[dict[str, Any]]
    connectivity: dict[str, Any]
    connectivity_json: str  # json.dumps(connectivity), computed off the event loop
    record: ImageConnectivity  # the typed form, for the metrics
    inspection_id: str = ""  # set by the BatchSink once the record is stored


BatchSink = Callable[[Sequence[InferenceItem], list[ImageResult]], Awaitable[None] | None]
"""Called on the event loop after every successful batch (stores inspection records)."""


def strip_matrices(connectivity: dict[str, Any]) -> dict[str, Any]:
    """The connectivity without its matrices: what ``?connectivity=false`` returns."""
    return {
        group: [{k: v for k, v in record.items() if k not in MATRIX_KEYS} for record in records]
        for group, records in connectivity.items()
    }


class ModelWorker:
    """One replica of one model version on one device; an async batch handler."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: torch.device,
        *,
        name: str,
        sink: BatchSink | None = None,
        threads: int | None = None,
    ) -> None:
        self.loaded = loaded
        self.manifest: Manifest = loaded.manifest
        self.device = device
        self.name = name
        self.sink = sink
        # One thread per replica: the replica's forward state is not thread-safe, and
        # the event loop must never run a forward itself.
        # torch's OpenMP team size is a per-thread setting: pinned in the worker's own
        # thread, it stays whatever other threads (the decode pool) set for themselves.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=name,
            initializer=None if threads is None else pin_torch_threads,
            initargs=() if threads is None else (threads,),
        )
        self._sources = connectivity_sources(loaded.model)
        self._cuda = device.type == "cuda"
        # A stream per worker lets several instances on one GPU overlap their copies
        # and kernels instead of queueing on the device's default stream.
        self._stream = torch.cuda.Stream(device) if self._cuda else None

    async def __call__(self, items: list[InferenceItem]) -> list[ImageResult]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self.infer_batch, items)
        if self.sink is not None:
            pending = self.sink(items, results)
            if pending is not None:
                await pending
        return results

    async def warm_up(self) -> float:
        """Run one dummy batch (results discarded); returns the seconds it took."""
        height, width = self.manifest.preprocessing.input_size
        dummy = InferenceItem(torch.zeros(3, height, width), (height, width))
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self._executor, self.infer_batch, [dummy])
        return time.perf_counter() - started

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- runs in the worker thread ---------------------------------------------

    def infer_batch(self, items: Sequence[InferenceItem]) -> list[ImageResult]:
        with torch.inference_mode(), self._device_context():
            if self.manifest.task == "classification":
                predictions = self._classify(items)
            else:
                predictions = self._detect(items)
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

    def _to_device(self, tensor: Tensor) -> Tensor:
        if not self._cuda:
            return tensor
        # Page-locked memory lets the copy run asynchronously on the current stream.
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _classify(self, items: Sequence[InferenceItem]) -> list[list[dict[str, Any]]]:
        batch = self._to_device(torch.stack([item.tensor for item in items]))
        logits = self.loaded.model(batch)
        probs = torch.softmax(logits.float(), dim=1)
        num_labels = probs.shape[1]
        default_k = self.manifest.thresholds.top_k
        k_max = min(num_labels, max(item.top_k or default_k for item in items))
        scores, indices = probs.topk(k_max, dim=1)
        scores_l, indices_l = scores.cpu().tolist(), indices.cpu().tolist()  # one sync per batch
        out = []
        for item, row_s, row_i in zip(items, scores_l, indices_l, strict=True):
            k = min(num_labels, item.top_k or default_k)
            out.append(
                [
                    {"label": self.manifest.class_name(i), "index": i, "score": s}
                    for s, i in zip(row_s[:k], row_i[:k], strict=True)
                ]
            )
        return out

    def _detect(self, items: Sequence[InferenceItem]) -> list[list[dict[str, Any]]]:
        images = [self._to_device(item.tensor) for item in items]
        outputs = self.loaded.model(images)
        thresholds = self.manifest.thresholds
        out = []
        for item, output in zip(items, outputs, strict=True):
            threshold = thresholds.score_threshold if item.score_threshold is None else item.score_threshold
            scores = output["scores"].float().cpu()
            keep = (scores >= threshold).nonzero().squeeze(1)[: thresholds.max_detections]
            boxes = boxes_to_original(output["boxes"].cpu()[keep], item.scale, item.image_size)
            out.append(
                [
                    {"box": box, "label": self.manifest.class_name(label), "index": label, "score": score}
                    for box, label, score in zip(
                        boxes.tolist(), output["labels"].cpu()[keep].tolist(), scores[keep].tolist(), strict=True
                    )
                ]
            )
        return out
