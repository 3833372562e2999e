"""The numpy pre/post-processing computes what torch's interpolation (which the model was trained with) does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fluorosam_common.frames import letterbox, letterbox_geometry, postprocess_masks, resize

SHAPES = [(1024, 1024), (960, 1280), (480, 640), (300, 1000), (257, 255), (100, 37), (1000, 16), (40, 60)]


def _torch_letterbox(image: np.ndarray, size: int) -> np.ndarray:
    geo = letterbox_geometry(*image.shape, size)
    shrinking = geo.scaled_h < geo.orig_h
    resized = F.interpolate(torch.from_numpy(image)[None, None], size=(geo.scaled_h, geo.scaled_w),
                            mode="area" if shrinking else "bilinear", **({} if shrinking else {"align_corners": False}))
    out = np.zeros((size, size), np.float32)
    out[: geo.scaled_h, : geo.scaled_w] = resized[0, 0].numpy()
    return out


def _torch_unletterbox(logits: np.ndarray, geo) -> np.ndarray:
    t = F.interpolate(torch.from_numpy(logits)[None], size=(geo.size, geo.size), mode="bilinear", align_corners=False)
    t = t[..., : geo.scaled_h, : geo.scaled_w]
    return F.interpolate(t, size=(geo.orig_h, geo.orig_w), mode="bilinear", align_corners=False)[0].numpy()


@pytest.mark.parametrize("shape", SHAPES)
def test_letterbox_matches_torch_area_and_bilinear(shape):
    image = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    ours, geo = letterbox(image, 256)
    assert ours.shape == (256, 256) and not ours[geo.scaled_h:].any() and not ours[:, geo.scaled_w:].any()
    np.testing.assert_allclose(ours, _torch_letterbox(image, 256), atol=5e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_postprocess_masks_matches_torch_and_thresholds_alike(shape):
    logits = 4 * np.random.default_rng(len(shape) + shape[0]).standard_normal((3, 64, 64), dtype=np.float32)
    geo = letterbox_geometry(*shape, 256)
    ours, reference = postprocess_masks(logits, geo), _torch_unletterbox(logits, geo)
    assert ours.shape == (3, *shape) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=2e-4)
    # A pixel may flip only where the logit is within rounding of the threshold.
    flipped = (ours > 0) != (reference > 0)
    assert np.all(np.abs(reference[flipped]) < 2e-4)


def test_resize_up_and_down_keeps_a_constant_image_constant():
    for h, w in [(7, 300), (300, 7), (33, 33)]:
        np.testing.assert_allclose(resize(np.full((50, 60), 0.25, np.float32), h, w), 0.25, atol=1e-6)


def test_postprocess_rejects_wrong_rank():
    with pytest.raises(ValueError, match="K, h, w"):
        postprocess_masks(np.zeros((64, 64), np.float32), letterbox_geometry(64, 64, 256))
