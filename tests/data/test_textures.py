"""Scene textures: two-colour patterns, dilation, and fills that stand out from what is under them."""

from __future__ import annotations

import numpy as np
import pytest

from dgserve.data.scenes import BACKGROUNDS
from dgserve.data.textures import dilate, pattern, pick_fill


@pytest.mark.parametrize("kind", BACKGROUNDS)
def test_background_patterns_mix_two_colours(kind: str) -> None:
    # The contrast guarantee assumes every background pixel lies between colours A and B.
    w = pattern(np.random.default_rng(0), kind, 40, 40, (3.0, 8.0))
    assert w.shape == (40, 40) and w.dtype == np.float32
    assert float(w.min()) >= 0.0 and float(w.max()) <= 1.0


@pytest.mark.parametrize("radius", [0, 1, 3])
def test_dilation_grows_a_pixel_into_its_square(radius: int) -> None:
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = True
    grown = dilate(mask, radius)
    expected = np.zeros((9, 9), dtype=bool)
    expected[4 - radius : 5 + radius, 4 - radius : 5 + radius] = True
    assert np.array_equal(grown, expected)
    assert mask.sum() == 1  # the input is left as it was


@pytest.mark.parametrize("textured", [False, True])
def test_a_fill_keeps_its_contrast_from_every_pixel_under_it(textured: bool) -> None:
    rng = np.random.default_rng(5)
    under = rng.uniform(0.0, 255.0, (50, 3)).astype(np.float32)
    picked = pick_fill(rng, under, textured, 60.0)
    assert picked is not None
    for colour in picked:
        assert np.sqrt(((under - colour) ** 2).sum(axis=1)).min() >= 60.0


def test_no_fill_is_found_when_every_colour_is_under_the_object() -> None:
    cube = np.array([[r, g, b] for r in range(0, 256, 32) for g in range(0, 256, 32) for b in range(0, 256, 32)])
    assert pick_fill(np.random.default_rng(0), cube.astype(np.float32), False, 60.0) is None
