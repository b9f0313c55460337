"""The video task: decoding under limits, clip sampling, clip averaging, and the per-frame connectivity."""

from __future__ import annotations

import io
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import Tensor, nn

from dgserve.connectivity import GloReUnitConnectivity
from dgserve.errors import InvalidImageError, InvalidVideoError, VideoTooLargeError, VideoTooLongError
from dgserve.model_store.manifest import ClipSampling, Manifest
from dgserve.models.connectivity import collect_connectivity
from dgserve.models.registry import create_model
from dgserve.settings import Settings
from dgserve.tasks import InferenceItem, get_task
from dgserve.tasks.classification import ClassificationOptions
from dgserve.tasks.video import VideoClassification, VideoInfo
from dgserve.video import VideoLimits, clip_indices, container_of, decode_video

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from video_files import encode_audio, encode_video, noise  # noqa: E402

TASK = get_task("video_classification")
LIMITS = VideoLimits(max_seconds=60, max_frames=500, max_frame_pixels=64 * 64)
CLIPS = {"frames_per_clip": 4, "frame_stride": 2, "num_clips": 3}


def manifest(clips: dict[str, int] | None = CLIPS, top_k: int = 2) -> Manifest:
    pre: dict[str, Any] = {"input_size": [16, 16], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_fraction": 1.0}
    if clips is not None:
        pre["clips"] = clips
    return Manifest.model_validate({
        "schema_version": 1, "name": "v", "version": 1, "architecture": "glore_resnet18_3d_slim",
        "task": "video_classification", "arch_kwargs": {"num_classes": 3}, "labels": ["a", "b", "c"],
        "preprocessing": pre, "thresholds": {"top_k": top_k}, "weights": {"sha256": "0" * 64},
        "created_at": datetime.now(UTC),
    })  # fmt: skip


# --- the task's place among the tasks -------------------------------------------------


def test_the_task_takes_videos_on_its_own_route() -> None:
    assert isinstance(TASK, VideoClassification) and TASK.endpoint == "classify-video"
    assert {"video/mp4", "video/webm", "image/gif"} <= TASK.content_types
    assert "image/png" not in TASK.content_types and "video/mp4" not in get_task("classification").content_types


def test_a_video_manifest_needs_clips_and_an_image_manifest_writes_none() -> None:
    with pytest.raises(ValidationError, match="preprocessing.clips"):
        manifest(clips=None)
    assert manifest().preprocessing.clips == ClipSampling(**CLIPS)
    with pytest.raises(ValidationError, match="frames_per_clip"):
        manifest(clips={**CLIPS, "frames_per_clip": 0})
    image_pre = get_task("classification").default_preprocessing(32)
    assert "clips" not in image_pre.model_dump_json()  # image manifests read and write as before
    assert TASK.default_preprocessing(32).clips is not None


# --- decoding --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("container", "codec"),
    [("mp4", "libx264"), ("mov", "libx264"), ("webm", "libvpx"), ("webm", "libvpx-vp9"), ("matroska", "libx264"),
     ("gif", "gif"), ("mp4", "libsvtav1")],
)  # fmt: skip
def test_allowed_containers_and_codecs_decode_every_frame(container: str, codec: str) -> None:
    video = decode_video(encode_video(noise(6, 48), container, codec), LIMITS, cover=(16, 16))
    assert len(video.frames) == 6 and (video.width, video.height) == (48, 48)
    assert video.frames[0].size == (16, 16) and video.frames[0].mode == "RGB"  # kept only as large as needed
    assert video.seconds == pytest.approx(6 / 25, abs=0.02)


def test_frames_are_never_upscaled_and_keep_their_aspect() -> None:
    video = decode_video(encode_video(noise(2, 32)[:, :, :, :][:, :16]), LIMITS, cover=(24, 24))
    assert video.frames[0].size == (32, 16)  # smaller than the cover: left as it is


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: b"", InvalidVideoError, "empty upload"),
        (lambda: encode_video(noise(4), "avi", "mpeg4"), InvalidVideoError, "allowed container"),
        (lambda: encode_video(noise(4), "mp4", "mpeg4"), InvalidVideoError, "codec 'mpeg4' is not allowed"),
        (lambda: encode_audio(), InvalidVideoError, r"no video stream \(streams: audio\)"),
        (lambda: encode_video(noise(12))[:2500], InvalidVideoError, "could not read the mov container"),
        (lambda: b"\x00\x00\x00\x18ftypisom" + bytes(64), InvalidVideoError, "could not read"),
        (lambda: encode_video(noise(4, 66)), VideoTooLargeError, "66x66 = 4356 pixels"),
        (lambda: encode_video(noise(501, 8), fps=100), VideoTooLongError, "501 frames"),
        (lambda: encode_video(noise(3, 8), fps=0.04), VideoTooLongError, "75.0 s long"),
    ],
)
def test_bad_uploads_are_refused_with_their_reason(make: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as caught:
        decode_video(make(), LIMITS, cover=(16, 16), part="clip.mp4")
    assert "part 'clip.mp4'" in str(caught.value)
    assert caught.value.status_code == (413 if error is VideoTooLongError else 422)  # type: ignore[attr-defined]


def test_a_header_that_hides_the_frame_count_is_caught_while_decoding() -> None:
    # WebM declares no frame count, so only counting as frames decode can stop it.
    data = encode_video(noise(30, 8), "webm", "libvpx")
    with pytest.raises(VideoTooLongError, match="more than the limit of 20 frames"):
        decode_video(data, VideoLimits(60, 20, 4096), cover=(8, 8))


def test_containers_are_told_by_their_magic_bytes_only() -> None:
    assert container_of(encode_video(noise(2))) == "mov"
    assert container_of(encode_video(noise(2), "webm", "libvpx")) == "matroska"
    assert container_of(b"GIF89a....") == "gif"
    assert container_of(b"RIFF....AVI ") is None and container_of(b"\x89PNG\r\n\x1a\n") is None


# --- clips -----------------------------------------------------------------------------


def test_clips_spread_evenly_and_one_clip_is_the_centre_one() -> None:
    sampling = ClipSampling(frames_per_clip=4, frame_stride=2, num_clips=3)
    assert clip_indices(17, sampling) == [[0, 2, 4, 6], [5, 7, 9, 11], [10, 12, 14, 16]]
    assert clip_indices(17, sampling.model_copy(update={"num_clips": 1})) == [[5, 7, 9, 11]]
    # Shorter than one clip's span: one clip, the stride kept, the last frame repeated.
    assert clip_indices(5, sampling) == [[0, 2, 4, 4]]
    assert clip_indices(1, sampling) == [[0, 0, 0, 0]]
    assert clip_indices(7, sampling) == [[0, 2, 4, 6]]  # exactly one span: no duplicate clips


def test_prepare_upload_gives_the_manifests_clips_and_what_was_sent() -> None:
    pre = manifest().preprocessing
    tensor, info, _ = TASK.prepare_upload(encode_video(noise(17, 32)), "v.mp4", pre, Settings())
    assert tensor.shape == (3, 3, 4, 16, 16)
    assert isinstance(info, VideoInfo) and info.to_dict() == {
        "part": "v.mp4", "width": 32, "height": 32, "frames": 17, "seconds": pytest.approx(0.68),
    }  # fmt: skip


def test_the_video_limits_come_from_the_settings() -> None:
    pre = manifest().preprocessing
    with pytest.raises(VideoTooLongError):
        TASK.prepare_upload(encode_video(noise(9, 8)), None, pre, Settings(max_video_frames=8))
    with pytest.raises(VideoTooLargeError):
        TASK.prepare_upload(encode_video(noise(2, 16)), None, pre, Settings(max_video_frame_pixels=100))


def test_image_tasks_still_decode_images_through_the_default_hook() -> None:
    png = Image.new("RGB", (20, 10), "red")
    buf = io.BytesIO()
    png.save(buf, "PNG")
    pre = get_task("classification").default_preprocessing(8)
    tensor, info, context = get_task("classification").prepare_upload(buf.getvalue(), "p", pre, Settings())
    assert tensor.shape == (3, 8, 8) and (info.width, info.height, info.part) == (20, 10, "p") and context is None
    with pytest.raises(InvalidImageError):
        get_task("classification").prepare_upload(encode_video(noise(2)), "p", pre, Settings())


# --- prediction ---------------------------------------------------------------------------


class ClipMean(nn.Module):
    """Logits from each clip's mean pixel, so clips with different content score differently."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.mean(dim=(1, 2, 3, 4))
        return torch.stack([m, -m, torch.zeros_like(m)], dim=1) * 4


def item(clips: Tensor) -> InferenceItem:
    return InferenceItem(clips, VideoInfo(None, 16, 16), ClassificationOptions())


def test_predict_averages_each_videos_clip_probabilities() -> None:
    a = torch.stack([torch.full((3, 4, 16, 16), v) for v in (1.0, -1.0, 0.5)])
    b = torch.full((1, 3, 4, 16, 16), -0.25)
    out = TASK.predict(ClipMean(), [item(a), item(b)], manifest(top_k=3), lambda t: t)
    for clips, preds in zip((a, b), out, strict=True):
        expected = torch.softmax(ClipMean()(clips), dim=1).mean(0)
        assert {p["label"]: p["score"] for p in preds} == {
            label: pytest.approx(float(s), abs=1e-6) for label, s in zip("abc", expected, strict=True)
        }


def test_connectivity_is_one_record_per_video_from_its_centre_clip() -> None:
    model = create_model("glore_resnet18_3d_slim", num_classes=3, width=8).eval()
    videos = [torch.randn(3, 3, 8, 32, 32), torch.randn(1, 3, 8, 32, 32), torch.randn(2, 3, 8, 32, 32)]
    with torch.inference_mode():
        TASK.predict(model, [item(v) for v in videos], manifest(), lambda t: t)
        records = collect_connectivity(model, len(videos))
        centres = torch.stack([v[len(v) // 2] for v in videos])
        model(centres)
        expected = collect_connectivity(model, len(videos))
    got = [r.of(GloReUnitConnectivity)[0] for r in records]
    assert [g.projection for g in got] == [e.of(GloReUnitConnectivity)[0].projection for e in expected]
    assert all(g.frames == 4 for g in got)


def test_a_still_image_is_a_one_frame_video_and_tensors_are_one_clip() -> None:
    pre = manifest().preprocessing
    tensor, _ = TASK.prepare(Image.new("RGB", (16, 16)), pre)
    assert tensor.shape == (1, 3, 4, 16, 16) and torch.equal(tensor[0, :, 0], tensor[0, :, 3])
    assert TASK.input_shape(pre) == (3, 4, 16, 16)
    clip = torch.zeros(3, 4, 16, 16)
    assert TASK.prepare_tensor(clip)[0].shape == (1, 3, 4, 16, 16)


def test_loss_and_evaluation_read_batches_of_clips() -> None:
    from dgserve.training.config import TrainConfig

    model = create_model("glore_resnet18_3d_slim", num_classes=3, width=8)
    clips, labels = torch.randn(2, 2, 3, 8, 32, 32), torch.tensor([0, 2])
    loss, size = TASK.loss(model, (clips, labels), TrainConfig(name="x"), torch.Generator())
    assert size == 2 and loss.requires_grad
    figures = TASK.evaluate(model, [(clips, labels)], 3, progress=False)
    assert figures["images"] == 2 and 0.0 <= figures["top1"] <= 1.0 and len(figures["per_class_top1"]) == 3


def test_class_folders_of_videos_are_a_training_source(tmp_path: Path) -> None:
    from dgserve.training.config import TrainConfig

    for name, seed in (("slow", 0), ("fast", 1)):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.mp4").write_bytes(encode_video(noise(10 + i * 10, 24, seed + i)))
        (tmp_path / name / "notes.txt").write_text("not a video")
    config = TrainConfig(name="t", data="imagefolder", data_path=tmp_path, val_fraction=0.34)
    data = TASK.datasets(config, manifest().preprocessing)
    assert data.labels == ["fast", "slow"] and len(data.train) == 4 and len(data.val) == 2  # type: ignore[arg-type]
    # Every item has num_clips clips (a 10-frame video holds one, repeated), so batches stack.
    shapes = {tuple(data.train[i][0].shape) for i in range(4)} | {tuple(data.val[i][0].shape) for i in range(2)}
    assert shapes == {(3, 3, 4, 16, 16)}
    assert "2 classes" in data.description


def test_dgserve_train_writes_a_servable_video_model(tmp_path: Path) -> None:
    from dgserve.model_store import ModelStore
    from dgserve.training.config import TrainConfig
    from dgserve.training.run import train

    config = TrainConfig(
        name="tiny-video", architecture="glore_resnet18_3d_slim", store=tmp_path, arch_kwargs={"width": 4},
        train_size=14, val_size=7, input_size=16, epochs=1, batch_size=7, threads=1, progress=False,
    )  # fmt: skip
    stored, history = train(config)
    manifest = stored.manifest
    assert manifest.task == "video_classification" and manifest.labels[:2] == ["grow", "move_down"]
    assert manifest.preprocessing.clips is not None and manifest.preprocessing.clips.frames_per_clip == 8
    card = (stored.path / "card.md").read_text()
    assert "held-out videos" in card and "no flips" in card
    loaded = ModelStore(tmp_path).load("tiny-video")
    tensor, _, _ = TASK.prepare_upload(encode_video(noise(24, 16)), None, manifest.preprocessing, Settings())
    with torch.inference_mode():
        [preds] = TASK.predict(loaded.model, [item(tensor)], manifest, lambda t: t)
    assert len(preds) == 5 and history.epochs[0]["images"] == 7


def test_decoded_frames_past_the_memory_budget_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import dgserve.video as video_module

    data = encode_video(noise(10, 32))
    monkeypatch.setattr(video_module, "MAX_KEPT_BYTES", 32 * 32 * 3 * 6)  # room for six 32x32 frames
    with pytest.raises(VideoTooLongError, match="MiB once decoded"):
        decode_video(data, LIMITS, cover=(32, 32))
    monkeypatch.setattr(video_module, "MAX_KEPT_BYTES", 32 * 32 * 3 * 10)
    assert len(decode_video(data, LIMITS, cover=(32, 32)).frames) == 10


def test_timestamps_count_from_the_streams_first_frame() -> None:
    # A clip cut from a longer stream starts at a late timestamp; its length is what counts.
    buf = io.BytesIO()
    import av

    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for index, pixels in enumerate(noise(5, 16)):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = 25 * 100 + index  # 100 s into the stream, at 25 frames a second
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    video = decode_video(buf.getvalue(), VideoLimits(60, 100, 4096), cover=(16, 16))
    assert len(video.frames) == 5 and video.seconds < 1
