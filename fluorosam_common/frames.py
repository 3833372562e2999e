"""The one pre/post-processing path, shared by training, export and every backend (numpy only).

Frames arrive as mono8, mono16 or float images of any size. Windowing maps them to [0, 1] with
robust percentiles taken on a strided thumbnail (a few thousand pixels: microseconds, not the
per-frame k-means of the reference code). The image is then letterboxed (resized so the long
side fits, padded bottom/right) to the model's square input. Masks go back through the exact
inverse: crop the padding, then resize to the original frame, so non-square frames come back aligned.

The resizes follow torch's ``F.interpolate`` definitions (``area`` = adaptive average pooling when
shrinking, ``bilinear`` with ``align_corners=False``) so that the model, trained with them, sees the
same pixels; test/test_frames.py checks the two agree. They are separable, written as one sparse
1-D operator per axis: the two bilinear steps of :func:`postprocess_masks` compose into a single
(frame side x mask side) matrix per axis, two small matrix products per mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 operator of a 1-D bilinear resize with ``align_corners=False`` (torch's)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(src.astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def _area_axis0(image: np.ndarray, n_out: int) -> np.ndarray:
    """Adaptive average pooling along axis 0 (torch's ``area``): window i is rows
    [floor(i n / n_out), ceil((i + 1) n / n_out)), summed as a few whole-row gathers."""
    n_in = image.shape[0]
    index = np.arange(n_out)
    start = (index * n_in) // n_out
    length = ((index + 1) * n_in + n_out - 1) // n_out - start
    out = np.zeros((n_out, *image.shape[1:]), np.float32)
    for offset in range(int(length.max())):
        rows = image[np.minimum(start + offset, n_in - 1)]
        rows[length <= offset] = 0
        out += rows
    out /= length.astype(np.float32).reshape(-1, *([1] * (image.ndim - 1)))
    return out


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (h, w) -> (height, width): area averaging when shrinking, bilinear otherwise (as letterbox)."""
    h, w = image.shape
    if height < h:
        rows_done = np.ascontiguousarray(_area_axis0(image.astype(np.float32, copy=False), height).T)
        return np.ascontiguousarray(_area_axis0(rows_done, width).T)
    rows = bilinear_matrix(h, height).astype(np.float32)
    cols = bilinear_matrix(w, width).astype(np.float32)
    return rows @ image.astype(np.float32) @ cols.T


def letterbox_geometry(h: int, w: int, size: int) -> Letterbox:
    scale = size / max(h, w)
    return Letterbox(h, w, size, max(1, round(h * scale)), max(1, round(w * scale)))


def letterbox(image01: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize so the long side is ``size`` (area-averaging when shrinking), pad bottom/right with 0."""
    geo = letterbox_geometry(*image01.shape, size)
    out = np.zeros((size, size), np.float32)
    out[: geo.scaled_h, : geo.scaled_w] = resize(image01, geo.scaled_h, geo.scaled_w)
    return out, geo


def normalize(image01):
    """Windowed [0, 1] image -> model input scale. Works on numpy arrays and tensors alike."""
    return (image01 - PIXEL_MEAN) / PIXEL_STD


def preprocess(frame: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Frame of any supported dtype/size -> (1, 1, size, size) float32 model input and its letterbox."""
    image, geo = letterbox(window(frame), size)
    return normalize(image)[None, None].astype(np.float32), geo


def unletterbox_matrix(mask_side: int, geo: Letterbox, axis: int) -> np.ndarray:
    """(frame side, mask side) float32: upsample to the input square, crop the padding, resize to the frame."""
    scaled, orig = (geo.scaled_h, geo.orig_h) if axis == 0 else (geo.scaled_w, geo.orig_w)
    to_square = bilinear_matrix(mask_side, geo.size)[:scaled]
    return (bilinear_matrix(scaled, orig) @ to_square).astype(np.float32)


def postprocess_masks(logits: np.ndarray, geo: Letterbox) -> np.ndarray:
    """(K, h, w) low-res mask logits over the square input -> (K, orig_h, orig_w) float32 logits on the frame.

    Upsample to the input square, crop away the padding, then resize to the frame: the inverse of
    :func:`letterbox`, so that masks of non-square frames line up with the anatomy.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 3:
        raise ValueError(f"expected (K, h, w) logits, got shape {tuple(logits.shape)}")
    rows = unletterbox_matrix(logits.shape[1], geo, 0)
    cols = unletterbox_matrix(logits.shape[2], geo, 1)
    k = logits.shape[0]
    along_rows = (rows @ logits).reshape(k * rows.shape[0], logits.shape[2])  # (K * frame h, mask w)
    return (along_rows @ cols.T).reshape(k, rows.shape[0], cols.shape[0])


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
