"""Server configuration: every knob is a ``DGSERVE_*`` environment variable or a CLI flag.

``Settings`` is only ever built by the CLI or by whoever calls ``create_app`` (tests,
benchmarks); nothing here runs at import time, so importing dgserve never reads the
environment. The README's settings table is written by hand from the descriptions below,
at more length where a measured figure explains a default.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

import dgserve
from dgserve.cores import available_cores, visible_gpus

__all__ = ["AUTO_SERVER_PROCESSES", "BatchingOverride", "MemoryFormat", "Settings", "default_model_store"]

MemoryFormat = Literal["channels_last", "contiguous"]

# What DGSERVE_SERVER_PROCESSES=auto starts where the models compute on the CPU and 2 or
# more cores are there. One process runs its event loop, decoding and a Python-heavy
# forward on one GIL: on 2 cores it served the smallest model at 0.57-0.63 of what 2
# served, and under 25x overload kept 0.62-0.74 of its peak where 2 kept 0.9-1.5
# (docs/performance.md, "Two server processes by default"). More than 2 was not measured
# to pay, and each process holds its own copy of every model, so more is the user's
# choice. On a GPU, auto is 1: each process would hold its own CUDA context and copy of
# every model in the GPU's memory, which nothing here measured; Triton and TorchServe
# likewise start one instance per GPU unless told otherwise.
AUTO_SERVER_PROCESSES = 2


def default_model_store() -> Path:
    """The repository's bundled ``model_store/`` when dgserve runs from a checkout, else ./model_store."""
    bundled = Path(dgserve.__file__).resolve().parents[2] / "model_store"
    return bundled if bundled.is_dir() else Path("model_store")


def _default_decode_threads() -> int:
    # Decoding releases the GIL inside PIL, so a few threads overlap well; more than the
    # cores (a container's quota included) would only steal time from the model's threads.
    return min(4, available_cores())


class BatchingOverride(BaseModel):
    """Per-model batching values that replace the manifest's (unset fields keep it)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: PositiveInt | None = None
    max_delay_ms: NonNegativeFloat | None = None
    max_queue_size: PositiveInt | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DGSERVE_", extra="ignore", protected_namespaces=())

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    grpc_port: int | None = Field(
        8001, ge=0, le=65535,
        description="Port of the Open Inference Protocol gRPC service (needs dgserve[grpc]); empty turns it off.",
    )
    model_store: Path = Field(
        default_factory=default_model_store,
        description="Model store directory (default: the repo's bundled model_store/, else ./model_store).",
    )
    data_dir: Path = Field(Path("data"), description="Where the inspection database lives.")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated model names to serve; empty means every model in the store.",
    )
    versions: Literal["all", "latest"] = Field(
        "all", description="Load every stored version of each model, or only the highest."
    )

    server_processes: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="HTTP server processes sharing the port, each a whole server with its own batchers and "
        "model replicas (its own GIL), sharing the inspection store; /metrics merges them. A supervisor "
        'restarts one that dies and passes SIGTERM on, so each drains. "auto": 1 where the models compute '
        "on a GPU; else 2 where this process may use 2 or more cores (its affinity and its container's CPU "
        "quota), else 1.",
    )
    devices: str = Field("auto", description='"auto" (every GPU, else CPU), "cpu", or e.g. "cuda:0,cuda:1".')
    instances_per_device: PositiveInt = Field(
        1, description="Workers (model replicas) per model per device, each with its own thread."
    )
    model_workers: Literal["thread", "process"] = Field(
        "thread",
        description='Where each replica computes: "thread" (a thread of the server process) or "process" '
        "(a child process of its own, off the server's GIL: faster for small or Python-heavy models, "
        "and the model keeps computing while the server is busy refusing an overload).",
    )
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(
        None,
        description="Forward precision of every model (torch.autocast), replacing each manifest's precision: "
        "fp32, bf16 (CPU or CUDA) or fp16 (CUDA only; a CPU worker refuses to load). Outputs stay float32.",
    )
    torch_compile: bool | None = Field(
        None,
        description="Compile every model's forward with torch.compile (inductor), replacing each manifest's "
        "torch_compile. Compiling happens while the model loads (it needs a C++ compiler on a CPU host) and adds "
        "tens of seconds there; DG-Net then runs its masked execution, which has no host reads to break the graph.",
    )
    memory_format: MemoryFormat = Field(
        "channels_last",
        description="Layout of every model's 2-D convolution weights, which their feature maps follow: channels_last "
        "(NHWC, the native layout of oneDNN's CPU kernels and of cuDNN's tensor cores) or contiguous (NCHW, as stored).",
    )
    malloc_keep_large_blocks: bool = Field(
        True,
        description="Have glibc keep freed feature maps for reuse instead of unmapping them (dgserve.allocator): "
        "forwards stop page-faulting fresh maps in, at the price of keeping the peak heap. Off: glibc's own policy.",
    )
    torch_threads: PositiveInt | None = Field(
        None,
        description="torch intra-op threads for CPU workers; default: the cores this process may use (its affinity and "
        "its container's CPU quota) / (CPU instances per model × server processes).",
    )

    max_batch_size: PositiveInt | None = Field(None, description="Global override of every manifest's max_batch_size.")
    max_delay_ms: NonNegativeFloat | None = Field(None, description="Global override of every manifest's max_delay_ms.")
    max_queue_size: PositiveInt | None = Field(None, description="Global override of every manifest's max_queue_size.")
    batching: dict[str, BatchingOverride] = Field(
        default_factory=dict,
        description='Per-model overrides as JSON, e.g. {"name": {"max_batch_size": 16}}; beat the global ones.',
    )

    default_timeout_ms: float = Field(
        30_000.0, gt=0, description="Deadline of a request without ?timeout_ms=, from arrival to result."
    )
    max_body_bytes: PositiveInt = Field(32 * 1024 * 1024, description="Largest request body accepted (413 above).")
    max_image_pixels: PositiveInt = Field(
        40_000_000, description="Largest decoded image (width × height) accepted (422 above): stops decompression bombs."
    )
    max_images_per_request: PositiveInt = Field(64, description="Most image parts in one multipart request.")
    max_video_seconds: float = Field(
        120.0, gt=0, description="Longest video accepted, in seconds (413 above; header, then while decoding)."
    )
    max_video_frames: PositiveInt = Field(
        3600, description="Most frames in one video (413 above; checked as decoding goes, whatever the header says)."
    )
    max_video_frame_pixels: PositiveInt = Field(
        3840 * 2160, description="Largest video frame (width × height) accepted (422 above), checked before decoding."
    )
    jpeg_draft: bool = Field(
        True,
        description="Decode a JPEG at the smallest DCT scale (1/2, 1/4 or 1/8) that still covers the size the model's "
        "preprocessing resizes it to (libjpeg's scaled decoding), for tasks that resize the whole image "
        "(classification). Off: every JPEG is decoded at full size, then resized.",
    )
    decode_threads: PositiveInt = Field(
        default_factory=_default_decode_threads, description="Threads that decode and resize images."
    )
    compute_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much nicer (lower CPU priority, Linux) than the event loop the decode threads and the CPU "
        "model workers run, so that the loop, which reads requests, refuses and answers, gets a core first when it "
        "wakes (dgserve.serving.threads). 0: the same priority.",
    )
    warmup: bool = Field(True, description="Run one dummy batch through each worker before it is marked ready.")

    replica: str = Field(
        default_factory=lambda: socket.gethostname() or "dgserve",
        description="Names this server in every inspection record it writes (default: the host name, "
        "which is the pod name on Kubernetes), so records from several replicas can be told apart.",
    )
    inspection_url: str | None = Field(
        None,
        description="Where inspection records are kept, as a URL (sqlite:///path.db, "
        "postgresql://user:password@host:port/db) or a path; default: inspections.sqlite3 in the data directory.",
    )
    inspection_max_age_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Inspection records older than this are deleted."
    )
    inspection_max_records: PositiveInt = Field(1_000_000, description="Most inspection records kept (oldest go first).")
    inspection_list_max: PositiveInt = Field(10_000, description="Largest ?limit= of GET /v1/inspections.")
    inspection_commit_timeout_s: float = Field(
        2.0, ge=0,
        description="How long an answer waits for its inspection records to be committed, so that every id "
        "handed out survives a crash; past it (or at once while storage is down) the answer goes out marked "
        "uncommitted. 0 answers without waiting (records written behind; a crash loses the last ones).",
    )
    inspection_max_pending: PositiveInt = Field(
        10_000,
        description="Inspection records kept in memory while storage is behind or down; then the queue is full.",
    )
    # drop by default: with a shared database down, "wait" would hold every answer until
    # the database came back, and predictions must still answer. Records are diagnostics;
    # their loss is counted (dgserve_inspection_dropped_records_total) and logged.
    inspection_when_full: Literal["drop", "wait"] = Field(
        "drop",
        description="When the inspection queue is full: drop new records (counted, logged; the answer still "
        "goes out, with no id for a dropped record) or make the request wait for room (nothing lost).",
    )

    # Off by default: an upload may be private, and a thumbnail keeps a recognisable copy of it.
    inspection_thumbnails: bool = Field(
        False,
        description="Keep a small JPEG thumbnail of each uploaded image (as the model saw it) with its inspection "
        "record, and draw GloRe projection maps over it in GET /v1/inspections/{id}/connectivity.png|svg. Off: none "
        "is stored, and none already stored is used.",
    )
    inspection_thumbnail_px: int = Field(
        128, ge=16, le=512, description="The longest side of a stored thumbnail, in pixels.",
    )

    # Heavy reads (inspection/readers.py): listings, exports, summaries and pictures run in
    # child processes at a low priority, so that on a small machine they take only the CPU
    # inference leaves.
    read_workers: int = Field(
        2, ge=0, le=16, description="Processes that run the heavy inspection reads (listings, the export, summaries, "
        "pictures), started at the first read; also how many run at once. 0 runs them in the server's threads.",
    )
    read_nice: int = Field(
        19, ge=0, le=19, description="The niceness of those processes (0-19): 19 gives inference the CPU first.",
    )
    read_yield_ms: float = Field(
        50.0, ge=0, le=1000, description="Unless inference has been quiet for 50 ms (no request arriving or "
        "computing), a heavy read waits for that, up to this long, before it starts and before each further chunk, "
        "so that reads looped back to back cannot take the CPU from inference. 0: reads never wait.",
    )

    inspection_durability: Literal["sync", "async"] = Field(
        "sync",
        description="sync: an answer waits (up to inspection_commit_timeout_s) until its inspection records are "
        "committed, group-committed with every answer waiting meanwhile, so an id a client holds survives a crash. "
        "async: answers go out at once and records are written behind; a crash loses the last ones.",
    )

    # API keys (api/auth.py): off unless one of these is given. SecretStr, so that no repr
    # or log of the settings shows a key.
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys, each KEY or KEY:SCOPES with scopes infer and read joined by + "
        "(a bare key has both); once any key is set, every route but the probes, /metrics and the docs needs one.",
    )
    api_keys_file: Path | None = Field(
        None, description="A file of API keys' SHA-256 hashes, one per line as HEX [SCOPES] (# comments).",
    )

    # Connection guards (api/connections.py): a client must not hold a connection without
    # sending a request, and there are only so many file descriptors.
    header_timeout_s: float = Field(
        10.0, gt=0, description="Most seconds from a request's first byte (or the connection's opening) to the "
        "end of its headers; 408 and close past it (slow-loris clients).",
    )
    body_timeout_s: float = Field(
        20.0, gt=0, description="Seconds a request body has from the end of its headers, each byte received adding "
        "1/body_min_rate s; 408 and close past it.",
    )
    body_min_rate: PositiveInt = Field(
        64 * 1024, description="Bytes per second at or above which an upload never times out (body_timeout_s).",
    )
    max_connections: PositiveInt | None = Field(
        1000, description="Most open client connections; one more gets 503 and is closed. Empty: no cap.",
    )

    # The SIGTERM drain (api/drain.py). The grace runs inside the drain timeout, so the
    # Kubernetes grace period only has to cover the drain timeout (tests/deploy checks it).
    shutdown_grace_s: float = Field(
        5.0, ge=0, description="Seconds after SIGTERM during which new requests still get an answer (503 "
        "shutting_down, Retry-After) before the listener closes, so a load balancer still sending meanwhile "
        "sees an HTTP answer rather than a refused connection.",
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="Seconds after SIGTERM (the grace included) that accepted requests, in flight or "
        "queued, have to finish; then what is left gets 503 shutting_down, and the records are flushed.",
    )

    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    access_log: bool = Field(True, description="uvicorn's per-request access log.")

    @field_validator("grpc_port", "max_connections", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "off", "none") else value

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu"):
            return value
        for item in value.split(","):
            kind, _, index = item.strip().partition(":")
            if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
                raise ValueError(f"{item!r} is not a device; use auto, cpu, cuda or cuda:N")
        return value

    @property
    def server_process_count(self) -> int:
        """``server_processes`` as a number, "auto" resolved (see ``AUTO_SERVER_PROCESSES``)."""
        if self.server_processes != "auto":
            return self.server_processes
        on_gpu = "cuda" in self.devices or (self.devices == "auto" and visible_gpus() > 0)
        return 1 if on_gpu else min(AUTO_SERVER_PROCESSES, available_cores())

    @property
    def inspection_commit_wait_s(self) -> float:
        """How long an answer waits for its records' commit: none with ``inspection_durability="async"``."""
        return self.inspection_commit_timeout_s if self.inspection_durability == "sync" else 0.0

    @property
    def inspection_location(self) -> str | Path:
        """``inspection_url``, or the embedded SQLite file under ``data_dir``."""
        return self.inspection_url or self.data_dir / "inspections.sqlite3"
