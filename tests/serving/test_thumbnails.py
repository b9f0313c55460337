"""Thumbnails show what the model saw, so a projection map stretched over one lines up:
the letterbox's padding where the model had it, only the centre crop for ``center_crop``."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from dgserve.imaging import letterbox_geometry
from dgserve.model_store.manifest import Preprocessing
from dgserve.serving.thumbnails import model_view_thumbnail

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def pre(size: tuple[int, int], **kw: Any) -> Preprocessing:
    return Preprocessing(input_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), **kw)


def pixels(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as img:
        assert img.format == "JPEG"
        return np.asarray(img.convert("RGB")).astype(int)


def near(pixel: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool(np.abs(pixel - np.array(colour)).max() < 40)


def test_a_letterboxed_input_keeps_its_padding_where_the_model_had_it() -> None:
    wide = Image.new("RGB", (200, 100), RED)
    thumb = pixels(model_view_thumbnail(wide, pre((64, 64), resize="letterbox"), 128))
    assert thumb.shape == (64, 64, 3)  # the model's input, never larger
    (new_h, _), (_, top, _, _) = letterbox_geometry(100, 200, 64, 64)
    assert (new_h, top) == (32, 16)
    assert near(thumb[4, 32], (0, 0, 0)) and near(thumb[59, 32], (0, 0, 0))  # the bars
    assert near(thumb[top + 2, 32], RED) and near(thumb[top + new_h - 3, 32], RED)


def test_a_large_input_is_scaled_to_the_longest_side() -> None:
    thumb = pixels(model_view_thumbnail(Image.new("RGB", (300, 600), BLUE), pre((512, 384), resize="letterbox"), 96))
    assert thumb.shape == (96, 72, 3)
    thumb = pixels(model_view_thumbnail(Image.new("RGB", (300, 600), BLUE), pre((200, 400), resize="stretch"), 100))
    assert thumb.shape == (50, 100, 3) and near(thumb[25, 50], BLUE)


def test_a_centre_crop_leaves_out_what_the_model_never_saw() -> None:
    img = Image.new("RGB", (100, 50), RED)
    img.paste(GREEN, (0, 0, 20, 50))  # left of the crop (x 25..75 of the upload)
    img.paste(BLUE, (80, 0, 100, 50))  # right of it
    thumb = pixels(model_view_thumbnail(img, pre((64, 64), resize="center_crop", crop_fraction=1.0), 128))
    assert thumb.shape == (64, 64, 3)
    assert near(thumb[32, 1], RED) and near(thumb[32, 62], RED) and near(thumb[32, 32], RED)
