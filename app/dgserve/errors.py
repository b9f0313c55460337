"""Every error dgserve raises on purpose, in one place.

Each carries the HTTP status and a stable machine-readable ``code``; the API's one
exception handler turns them into ``{"error": {"code", "message", "request_id"}}``.
This module is pure Python so the batcher, the store and the CLI can use it without
pulling in FastAPI or torch.
"""

from __future__ import annotations

from pathlib import Path


class DGServeError(Exception):
    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        return {}


# --- 404 -------------------------------------------------------------------


class NotFoundError(DGServeError):
    status_code = 404
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} is not in the store")
        self.name = name


class VersionNotFoundError(NotFoundError):
    code = "version_not_found"

    def __init__(self, name: str, version: int | str, available: list[int]) -> None:
        have = ", ".join(map(str, available)) or "none"
        super().__init__(f"model {name!r} has no version {version!r} (available: {have})")
        self.name = name
        self.version = version


class InspectionNotFoundError(NotFoundError):
    code = "inspection_not_found"

    def __init__(self, inspection_id: str) -> None:
        super().__init__(f"no inspection record with id {inspection_id!r}")


# --- who may call (API keys, dgserve.api.auth) ------------------------------------


class UnauthorizedError(DGServeError):
    """No API key, or one the server does not know: 401 with ``WWW-Authenticate``."""

    status_code = 401
    code = "unauthorized"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="dgserve"'}


class ForbiddenError(DGServeError):
    """A known API key without the scope this call needs."""

    status_code = 403
    code = "forbidden"


# --- request content ---------------------------------------------------------


class UnsupportedMediaTypeError(DGServeError):
    status_code = 415
    code = "unsupported_media_type"


class PayloadTooLargeError(DGServeError):
    status_code = 413
    code = "payload_too_large"


class MalformedBodyError(DGServeError):
    """A body that cannot be parsed as its declared type: a broken multipart body."""

    status_code = 400
    code = "bad_request"


class InvalidRequestError(DGServeError):
    status_code = 422
    code = "invalid_request"


class InvalidTagError(InvalidRequestError):
    """A request tag (``?tag=key:value``, OIP ``tags``) or tag filter that breaks the rules."""

    code = "invalid_tag"


class InvalidAnalysisError(InvalidRequestError):
    """An aggregate or export over inspection records that cannot be answered as asked:
    a tag key no record has, a kind the model lacks, a time range that is empty."""

    code = "invalid_analysis"


class InvalidImageError(DGServeError):
    status_code = 422
    code = "invalid_image"

    def __init__(self, message: str, part: str | None = None) -> None:
        super().__init__(f"part {part!r}: {message}" if part else message)
        self.part = part


class ImageTooLargeError(InvalidImageError):
    """More pixels than the configured limit: a decompression bomb is refused."""

    code = "image_too_large"


class InvalidVideoError(InvalidImageError):
    """Not a complete video in an allowed container and codec (no video stream, truncated, ...).

    An undecodable upload like an image, naming its part the same way; its own code.
    """

    code = "invalid_video"


class VideoTooLargeError(InvalidVideoError):
    """Frames with more pixels than DGSERVE_MAX_VIDEO_FRAME_PIXELS, as images over their limit."""

    code = "video_too_large"


class VideoTooLongError(InvalidVideoError):
    """More frames or seconds than DGSERVE_MAX_VIDEO_FRAMES / _SECONDS: too much content, 413."""

    status_code = 413
    code = "video_too_long"


# --- capacity and time -------------------------------------------------------


class RetryableError(DGServeError):
    status_code = 503

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class QueueFullError(RetryableError):
    code = "overloaded"


class NotReadyError(RetryableError):
    code = "not_ready"


class ShuttingDownError(RetryableError):
    code = "shutting_down"


class ReadWorkerError(RetryableError):
    """A reader process (``inspection/readers.py``) died or could not start; the next read
    starts another."""

    code = "read_worker_failed"


class WorkerCrashedError(RetryableError):
    """A model worker process died with this request's batch (it is started again)."""

    code = "worker_crashed"


class DeadlineExceededError(DGServeError):
    status_code = 504
    code = "deadline_exceeded"


# --- model store (raised at load time; a bad store never crashes the server) ---


class StoreError(DGServeError):
    code = "store_error"


class ManifestError(StoreError):
    """A manifest that is missing, malformed, or disagrees with its architecture."""

    code = "invalid_manifest"

    def __init__(self, path: Path | str, field: str | None, message: str) -> None:
        where = f"{path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.field = field


class UnsupportedPrecisionError(StoreError):
    """A forward precision the worker's device cannot compute in (fp16 off CUDA)."""

    code = "unsupported_precision"


class WeightsError(StoreError):
    """Weights that are missing, corrupt, fail their checksum or do not fit the model."""

    code = "invalid_weights"

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
