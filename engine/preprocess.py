"""The one pre/post-processing path, shared by training, export and every backend.

Frames arrive as mono8, mono16 or float images of any size. Windowing maps them to [0, 1] with
robust percentiles taken on a strided thumbnail (a few thousand pixels: microseconds, not the
per-frame k-means of the reference code). The image is then letterboxed (resized so the long
side fits, padded bottom/right) to the model's square input. Masks go back through the exact
inverse: crop the padding, then resize to the original frame, so non-square frames come back aligned.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SUPPORTED_DTYPES = (np.uint8, np.uint16, np.float32, np.float64)
MAX_SIDE = 8192
MIN_SIDE = 8
WINDOW_PERCENTILES = (0.5, 99.5)
THUMBNAIL_PIXELS = 4096
# Normalised input = (windowed - MEAN) / STD; a fixed affine map so that every backend agrees.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


class FrameError(ValueError):
    """A frame that cannot be segmented (empty, wrong dtype or shape, non-finite, too large)."""


@dataclass(frozen=True)
class Letterbox:
    """How a frame was fitted into the square model input, so that masks can be mapped back."""

    orig_h: int
    orig_w: int
    size: int  # model input side
    scaled_h: int  # frame height inside the padded square
    scaled_w: int

    @property
    def scale(self) -> float:
        return self.scaled_h / self.orig_h

    def to_input(self, xy: np.ndarray) -> np.ndarray:
        """Frame pixel coordinates (x, y) -> model-input pixel coordinates."""
        xy = np.asarray(xy, dtype=np.float32)
        return xy * np.array([self.scaled_w / self.orig_w, self.scaled_h / self.orig_h], np.float32)


def validate_frame(frame: np.ndarray) -> np.ndarray:
    """Return a 2-D view of ``frame`` or raise :class:`FrameError` saying what is wrong."""
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim != 2:
        raise FrameError(f"frame must be 2-D grayscale (H, W), got shape {frame.shape}")
    if frame.dtype.type not in SUPPORTED_DTYPES:
        raise FrameError(f"unsupported dtype {frame.dtype}; expected uint8, uint16, float32 or float64")
    h, w = frame.shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise FrameError(f"frame {h}x{w} is smaller than {MIN_SIDE}x{MIN_SIDE}")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise FrameError(f"frame {h}x{w} exceeds the {MAX_SIDE}-pixel side limit")
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        raise FrameError("frame contains NaN or infinite values")
    return frame


def window(frame: np.ndarray) -> np.ndarray:
    """Map a validated frame to float32 [0, 1] with robust percentiles from a strided thumbnail."""
    frame = validate_frame(frame)
    stride = max(1, int(np.sqrt(frame.size / THUMBNAIL_PIXELS)))
    thumb = frame[::stride, ::stride]
    lo, hi = np.percentile(thumb, WINDOW_PERCENTILES)
    if hi - lo < 1e-6 * max(1.0, abs(float(hi))):
        lo, hi = float(thumb.min()), float(thumb.max())
    out = frame.astype(np.float32)
    if hi <= lo:  # a flat frame carries no information; keep it finite and mid-grey
        return np.full(frame.shape, 0.5, np.float32)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def letterbox_geometry(h: int, w: int, size: int) -> Letterbox:
    scale = size / max(h, w)
    return Letterbox(h, w, size, max(1, round(h * scale)), max(1, round(w * scale)))


def letterbox(image01: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize so the long side is ``size`` (area-averaging when shrinking), pad bottom/right with 0."""
    geo = letterbox_geometry(*image01.shape, size)
    t = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32))[None, None]
    shrinking = geo.scaled_h < geo.orig_h
    resized = F.interpolate(t, size=(geo.scaled_h, geo.scaled_w), mode="area" if shrinking else "bilinear",
                            **({} if shrinking else {"align_corners": False}))
    out = np.zeros((size, size), np.float32)
    out[: geo.scaled_h, : geo.scaled_w] = resized[0, 0].numpy()
    return out, geo


def normalize(image01: np.ndarray | torch.Tensor):
    """Windowed [0, 1] image -> model input scale. Works on numpy arrays and tensors alike."""
    return (image01 - PIXEL_MEAN) / PIXEL_STD


def preprocess(frame: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Frame of any supported dtype/size -> (1, 1, size, size) float32 model input and its letterbox."""
    image, geo = letterbox(window(frame), size)
    return normalize(image)[None, None].astype(np.float32), geo


def postprocess_masks(logits: np.ndarray | torch.Tensor, geo: Letterbox) -> torch.Tensor:
    """(K, h, w) low-res mask logits over the square input -> (K, orig_h, orig_w) logits on the frame.

    Upsample to the input square, crop away the padding, then resize to the frame: the inverse of
    :func:`letterbox`, so that masks of non-square frames line up with the anatomy.
    """
    t = torch.as_tensor(logits, dtype=torch.float32)
    if t.ndim != 3:
        raise ValueError(f"expected (K, h, w) logits, got shape {tuple(t.shape)}")
    t = F.interpolate(t[None], size=(geo.size, geo.size), mode="bilinear", align_corners=False)
    t = t[..., : geo.scaled_h, : geo.scaled_w]
    t = F.interpolate(t, size=(geo.orig_h, geo.orig_w), mode="bilinear", align_corners=False)
    return t[0]


def refusal_reason(score: float, min_score: float, mask_is_empty: bool) -> str:
    """Why a decoded mask is not published ("" when it is): the node's rule, which evaluation reports too.

    A score below ``min_score`` is refused before the mask is looked at; a confident but empty mask (the
    model's way of saying the structure is absent) is refused as well, since it gives a consumer nothing to act on.
    """
    if score < min_score:
        return "low_score"
    if mask_is_empty:
        return "empty_mask"
    return ""
