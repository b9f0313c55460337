"""Generated motion clips: deterministic, balanced, and only telling their class across frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgserve.data.clips import MOTIONS, MotionClips, render_clip
from dgserve.imaging import IMAGENET_MEAN, IMAGENET_STD
from dgserve.model_store.manifest import ClipSampling, Preprocessing
from dgserve.video import clip_indices

PRE = Preprocessing(
    input_size=(32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_fraction=1.0,
    clips=ClipSampling(frames_per_clip=8, frame_stride=2, num_clips=2),
)  # fmt: skip


def _fill(frames: np.ndarray) -> np.ndarray:
    """The shape's colour, found from the pixels only.

    The pixels the shape passes over show either the fill or the background, so the
    fill is one of their two commonest colours (up to grain): the commonest, unless
    that one covers over a third of the frame (a solid background; a shape covers at
    most a fifth), then the commonest that is far from it (fills keep >= 96 of contrast).
    """
    changing = (frames.max(0).astype(int) - frames.min(0)).max(-1) > 60
    samples = frames[:, changing].reshape(-1, 3).astype(int)
    colours, counts = np.unique(samples // 16, axis=0, return_counts=True)
    order = colours[np.argsort(-counts)] * 16 + 8
    first = samples[(samples // 16 == order[0] // 16).all(1)].mean(0)
    if _mask(frames[0], first).mean() < 1 / 3:
        return first
    far = next(c for c in order if np.linalg.norm(c - first) > 90)
    return samples[(samples // 16 == far // 16).all(1)].mean(0)


def _mask(frame: np.ndarray, fill: np.ndarray) -> np.ndarray:
    return np.linalg.norm(frame.astype(float) - fill, axis=-1) < 40


def _centre(frame: np.ndarray, fill: np.ndarray) -> tuple[float, float, int]:
    """Centroid (x, y) and area of the pixels of the shape's colour."""
    mask = _mask(frame, fill)
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean()), int(mask.sum())


def test_a_clip_is_a_pure_function_of_seed_and_index() -> None:
    a, label_a = render_clip(3, 11, 32, 12)
    b, label_b = render_clip(3, 11, 32, 12)
    c, _ = render_clip(4, 11, 32, 12)
    assert a.shape == (12, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and label_a == label_b
    assert not np.array_equal(a, c)


def test_labels_cycle_through_the_motions() -> None:
    assert [render_clip(0, i, 16, 2)[1] for i in range(14)] == [i % len(MOTIONS) for i in range(14)]


def test_keep_renders_the_same_motion_for_fewer_frames() -> None:
    full, _ = render_clip(1, 5, 32, 16)
    some, _ = render_clip(1, 5, 32, 16, keep=[0, 15])
    assert some.shape[0] == 2
    # Only the per-frame grain differs, a few levels at most.
    assert np.abs(some.astype(int) - full[[0, 15]].astype(int)).max() <= 2 * 6 + 1


@pytest.mark.parametrize("motion", MOTIONS)
def test_each_motion_moves_the_shape_as_its_name_says(motion: str) -> None:
    index = MOTIONS.index(motion) + 7 * 3  # any clip of that class
    frames, label = render_clip(7, index, 48, 16)
    assert MOTIONS[label] == motion
    fill = _fill(frames)
    (x0, y0, a0), (x1, y1, a1) = _centre(frames[0], fill), _centre(frames[-1], fill)
    dx, dy = x1 - x0, y1 - y0
    if motion.startswith("move_"):
        expected = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}[motion]
        moved = (dx, dy)[0 if expected[0] else 1] * sum(expected)
        still = (dx, dy)[1 if expected[0] else 0]
        assert moved > 4 and abs(still) < 1.5, (dx, dy)
    elif motion in ("grow", "shrink"):
        assert (a1 / a0 > 1.8) if motion == "grow" else (a0 / a1 > 1.8), (a0, a1)
        assert abs(dx) < 1.5 and abs(dy) < 1.5
    else:  # rotate: in place, same area, different pixels
        assert abs(dx) < 1.5 and abs(dy) < 1.5 and 0.8 < a1 / a0 < 1.25
        assert not np.array_equal(frames[0], frames[-1])


def test_one_frame_does_not_tell_the_motion() -> None:
    """A shape's size mid-clip is alike across motions: no single-frame shortcut."""
    areas: dict[str, list[int]] = {m: [] for m in MOTIONS}
    for index in range(7 * 12):
        frames, label = render_clip(9, index, 32, 8)
        areas[MOTIONS[label]].append(_centre(frames[len(frames) // 2], _fill(frames))[2])
    # Medians: the colour heuristic of _fill can mistake a smooth background for the shape.
    medians = {m: float(np.median(v)) for m, v in areas.items()}
    assert max(medians.values()) / min(medians.values()) < 1.6, medians


def test_dataset_cuts_clips_as_the_server_does() -> None:
    held_out = MotionClips(3, 1, PRE, length=24)
    clips, label = held_out[2]
    assert clips.shape == (2, 3, 8, 32, 32) and label == 2
    assert clip_indices(24, PRE.clips) == [list(range(0, 15, 2)), list(range(9, 24, 2))]  # type: ignore[arg-type]
    training = MotionClips(3, 0, PRE, length=24, jitter=True)
    one, _ = training[0]
    assert one.shape == (1, 3, 8, 32, 32)
    assert torch.equal(one, training[0][0])  # the random start is drawn from (seed, index)


def test_dataset_refuses_preprocessing_without_clips() -> None:
    with pytest.raises(ValueError, match="preprocessing.clips"):
        MotionClips(1, 0, PRE.model_copy(update={"clips": None}))
