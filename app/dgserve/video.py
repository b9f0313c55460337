"""Video uploads: decoding with limits, and cutting the decoded frames into clips.

Decoding uses PyAV (FFmpeg). Uploaded bytes are hostile until proven otherwise, and
FFmpeg has dozens of demuxers and decoders, so the same rules as for images apply:

* the container is identified from its magic bytes and opened with that one demuxer
  (``mov`` for MP4/MOV, ``matroska`` for WebM/Matroska, ``gif``), never by FFmpeg's
  own probing, so an upload cannot reach a rarer demuxer;
* only allow-listed codecs are decoded (``ALLOWED_CODECS``);
* the frame size, the declared frame count and the declared duration are checked
  from the headers before any frame is decoded, and again while decoding, since a
  header can lie. Too long (frames, seconds) is 413; too many pixels per frame 422.

Frames are kept downscaled to what the manifest's preprocessing needs, so a long
upload costs little memory. Clips are cut as the manifest says
(``Preprocessing.clips``): ``num_clips`` clips of ``frames_per_clip`` frames, every
``frame_stride``-th frame, spread evenly over the video (one clip: the centre one,
as the GloRe paper's single-clip figures).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import torch
from PIL import Image

from dgserve.errors import InvalidVideoError, VideoTooLargeError, VideoTooLongError
from dgserve.imaging import preprocess
from dgserve.model_store.manifest import ClipSampling, Preprocessing

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream

__all__ = [
    "ALLOWED_CODECS", "VIDEO_CONTENT_TYPES", "DecodedVideo", "VideoLimits", "clip_indices", "clips_tensor",
    "decode_video",
]

VIDEO_CONTENT_TYPES: Final[frozenset[str]] = frozenset(
    {"video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "image/gif"}
)
ALLOWED_CODECS: Final[frozenset[str]] = frozenset({"h264", "vp8", "vp9", "av1", "gif"})
MAX_KEPT_BYTES: Final = 512 * 2**20
"""Most decoded RGB bytes one upload keeps while its clips are cut (413 past it)."""

# FFmpeg's demuxer names, as opened and as they report themselves once open.
_DEMUXERS: Final[dict[str, str]] = {"mov": "mov,mp4,m4a,3gp,3g2,mj2", "matroska": "matroska,webm", "gif": "gif"}
_ALLOWED_CONTAINERS: Final = "mp4/mov, webm/matroska, gif"
# Boxes an ISO-BMFF (MP4/MOV) file may start with, at byte 4.
_MP4_BOXES: Final = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")


@dataclass(frozen=True, slots=True)
class VideoLimits:
    """What an upload may hold (``DGSERVE_MAX_VIDEO_*``)."""

    max_seconds: float
    max_frames: int
    max_frame_pixels: int


@dataclass(frozen=True, slots=True)
class DecodedVideo:
    frames: list[Image.Image]  # RGB, downscaled to cover the requested size
    width: int  # as uploaded
    height: int
    seconds: float  # the last frame's timestamp plus one frame; 0 when unknown


def container_of(data: bytes) -> str | None:
    """FFmpeg's demuxer for these bytes, from their magic; ``None`` for anything not allowed."""
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska and WebM
        return "matroska"
    if len(data) >= 8 and data[4:8] in _MP4_BOXES:
        return "mov"
    return None


def decode_video(data: bytes, limits: VideoLimits, *, cover: tuple[int, int], part: str | None = None) -> DecodedVideo:
    """Decode every frame of an upload, each downscaled (never up) to just cover ``cover`` (h, w).

    Raises ``InvalidVideoError`` (422) for anything that is not a complete video in an
    allowed container and codec, ``VideoTooLargeError`` (422) for frames over
    ``max_frame_pixels`` and ``VideoTooLongError`` (413) past ``max_frames`` or
    ``max_seconds``; each names ``part``.
    """
    import av  # PyAV: imported here, so image-only servers never load FFmpeg

    if not data:
        raise InvalidVideoError("empty upload", part)
    demuxer = container_of(data)
    if demuxer is None:
        raise InvalidVideoError(f"not a video in an allowed container ({_ALLOWED_CONTAINERS})", part)
    try:
        container = av.open(io.BytesIO(data), mode="r", format=demuxer)
    except Exception as exc:
        raise InvalidVideoError(f"could not read the {demuxer} container ({_describe(exc)})", part) from exc
    try:
        if container.format.name not in (demuxer, _DEMUXERS[demuxer]):  # FFmpeg reports either spelling
            raise InvalidVideoError(f"container {container.format.name!r} is not allowed ({_ALLOWED_CONTAINERS})", part)
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise InvalidVideoError(f"no video stream (streams: {', '.join(kinds)})", part)
        stream = container.streams.video[0]
        if stream.codec_context is None:  # PyAV leaves it unset when FFmpeg has no decoder for the codec
            raise InvalidVideoError("no decoder for the video stream's codec", part)
        # The codec's canonical name: the decoder FFmpeg picked may be a library (libdav1d for av1).
        codec = stream.codec_context.codec.canonical_name
        if codec not in ALLOWED_CODECS:
            raise InvalidVideoError(f"codec {codec!r} is not allowed; use one of {', '.join(sorted(ALLOWED_CODECS))}", part)
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_pixels(width, height, limits, part)
        _check_declared(stream, container, limits, part)
        # One thread: the decode pool already runs several uploads side by side.
        stream.codec_context.thread_count = 1
        frames, seconds = _decode_frames(container, stream, limits, cover, part)
    finally:
        container.close()
    if not frames:
        raise InvalidVideoError("the video stream holds no decodable frame", part)
    return DecodedVideo(frames, width, height, seconds)


def _check_pixels(width: int, height: int, limits: VideoLimits, part: str | None) -> None:
    if width < 1 or height < 1:
        raise InvalidVideoError(f"video frames have no pixels ({width}x{height})", part)
    if width * height > limits.max_frame_pixels:
        raise VideoTooLargeError(
            f"frames are {width}x{height} = {width * height} pixels, more than the limit of {limits.max_frame_pixels}",
            part,
        )


def _check_declared(stream: VideoStream, container: InputContainer, limits: VideoLimits, part: str | None) -> None:
    # What the headers claim; 0 / None where a container does not say (WebM has no frame count).
    if stream.frames > limits.max_frames:
        raise VideoTooLongError(f"{stream.frames} frames, more than the limit of {limits.max_frames}", part)
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    else:  # the container's, in AV_TIME_BASE units (microseconds)
        seconds = container.duration / 1e6 if container.duration else 0.0
    if seconds > limits.max_seconds:
        raise VideoTooLongError(f"{seconds:.1f} s long, more than the limit of {limits.max_seconds:g} s", part)


def _decode_frames(
    container: InputContainer, stream: VideoStream, limits: VideoLimits, cover: tuple[int, int], part: str | None
) -> tuple[list[Image.Image], float]:
    frames: list[Image.Image] = []
    last_time, step, kept = 0.0, 0.0, 0
    start: float | None = None  # a clip cut from a stream may start at any timestamp
    try:
        for frame in container.decode(stream):
            if len(frames) == limits.max_frames:
                raise VideoTooLongError(f"more than the limit of {limits.max_frames} frames", part)
            _check_pixels(frame.width, frame.height, limits, part)  # a stream may change size mid-way
            if frame.time is not None:
                start = float(frame.time) if start is None else start
                step = max(step, float(frame.time) - start - last_time) if frames else 0.0
                last_time = float(frame.time) - start
                if last_time > limits.max_seconds:
                    raise VideoTooLongError(f"frames past {limits.max_seconds:g} s, the limit", part)
            h, w = _covering(frame.height, frame.width, cover)
            kept += h * w * 3
            if kept > MAX_KEPT_BYTES:
                # Frames are kept until the clips are cut: a long or very wide video must not
                # take the process's memory with it, whatever the frame and pixel limits allow.
                raise VideoTooLongError(
                    f"its frames take more than {MAX_KEPT_BYTES // 2**20} MiB once decoded; send a shorter or smaller video",
                    part,
                )
            frames.append(frame.to_image(width=w, height=h))
    except (InvalidVideoError, VideoTooLongError):
        raise
    except Exception as exc:
        if not frames:
            raise InvalidVideoError(f"could not decode video data ({_describe(exc)})", part) from exc
        # A damaged tail after good frames: FFmpeg's players show what decoded, and so
        # do we; a clip needs only a few frames.
    return frames, last_time + step


def _covering(height: int, width: int, cover: tuple[int, int]) -> tuple[int, int]:
    """The smallest aspect-preserving size at or below (height, width) that covers ``cover``."""
    scale = max(cover[0] / height, cover[1] / width)
    if scale >= 1.0:
        return height, width
    return max(cover[0], math.ceil(height * scale)), max(cover[1], math.ceil(width * scale))


def cover_size(pre: Preprocessing) -> tuple[int, int]:
    """What a frame must cover for ``preprocess`` to lose nothing: the centre crop's source, else the input."""
    height, width = pre.input_size
    if pre.resize == "center_crop":
        return round(height / pre.crop_fraction), round(width / pre.crop_fraction)
    return height, width


# --- clips -------------------------------------------------------------------------


def clip_indices(num_frames: int, sampling: ClipSampling) -> list[list[int]]:
    """The frame indices of each clip: ``num_clips`` clips spread evenly, the centre one for one clip.

    A video shorter than one clip's span gives one clip, its last frame repeated to
    fill it (the frame rate, which the model learned motion at, is kept).
    """
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    t, stride, k = sampling.frames_per_clip, sampling.frame_stride, sampling.num_clips
    span = (t - 1) * stride + 1
    room = num_frames - span
    if room < 0:
        starts = [0]
    elif k == 1:
        starts = [room // 2]
    else:
        starts = sorted({round(i * room / (k - 1)) for i in range(k)})
    return [[min(start + i * stride, num_frames - 1) for i in range(t)] for start in starts]


def clips_tensor(
    frames: Sequence[Image.Image] | Mapping[int, Image.Image], clips: Sequence[Sequence[int]], pre: Preprocessing
) -> torch.Tensor:
    """float32 ``(clips, 3, T, H, W)``, each frame preprocessed as an image model's input is.

    ``frames`` maps a frame index to its image: the whole video, or just the frames the clips use.
    """
    prepared: dict[int, torch.Tensor] = {}
    for index in {i for clip in clips for i in clip}:
        prepared[index] = preprocess(frames[index], pre)
    return torch.stack([torch.stack([prepared[i] for i in clip], dim=1) for clip in clips])


def _describe(exc: BaseException) -> str:
    # FFmpeg's errors carry their message as strerror; str() adds the errno and file name.
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
