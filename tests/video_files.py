"""Real video files for the tests, encoded with PyAV: the containers and codecs a client sends.

Imported by the video tests (``sys.path`` holds ``tests/``); not a test module itself.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np


def encode_video(
    frames: np.ndarray, container: str = "mp4", codec: str = "libx264", fps: float = 25, **options: str
) -> bytes:
    """``uint8 [T, H, W, 3]`` frames as a video file; ``options`` go to the encoder (``crf="12"``)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=options or None)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def encode_audio(seconds: float = 0.5, container: str = "mp4") -> bytes:
    """An audio-only file (AAC): a container with no video stream."""
    buf = io.BytesIO()
    rate, block = 8000, 1024
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream("aac", rate=rate)
        for i in range(int(seconds * rate) // block):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, block), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i * block
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def noise(frames: int = 16, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
