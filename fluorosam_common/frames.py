"""The one pre/post-processing path, shared by training, export and every backend (numpy only).

Frames arrive as mono8, mono16 or float images of any size. Windowing maps them to [0, 1] with
robust percentiles taken on a strided thumbnail (a few thousand pixels: microseconds, not the
per-frame k-means of the reference code). The image is then letterboxed (resized so the long
side fits, padded bottom/right) to the model's square input. Masks go back through the exact
inverse: crop the padding, then resize to the original frame, so non-square frames come back aligned.

The resizes follow torch's ``F.interpolate`` definitions (``area`` = adaptive average pooling when
shrinking, ``bilinear`` with ``align_corners=False``) so that the model, trained with them, sees the
same pixels; test/test_frames.py checks the two agree. Small resizes are 1-D operators per axis (cached
matrices); the one large step, masks up to the frame's resolution, is OpenCV's ``INTER_LINEAR``, the
same half-pixel bilinear definition (SIMD, ~10x torch's on a loaded 2-core CPU for 8 masks at 1024 px).
"""
from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 operator of a 1-D bilinear resize with ``align_corners=False`` (torch's).

    Cached (read-only): a stream keeps one frame geometry, so its operators are built once."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    low = np.minimum(src.astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = src - low
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    matrix[rows, low] += 1.0 - frac  # each row once per statement; low == high at the edge adds up to 1
    matrix[rows, high] += frac
    matrix.setflags(write=False)
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
    if (height, width) == (h, w):  # both of torch's modes are the identity at the same size
        return image.astype(np.float32, copy=True)
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


@functools.lru_cache(maxsize=16)
def _to_square_crop(mask_side: int, size: int, scaled: int) -> np.ndarray:
    """(scaled, mask side) float32: upsample to the input square and keep the frame's part (the crop)."""
    matrix = bilinear_matrix(mask_side, size)[:scaled].astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def postprocess_masks(logits: np.ndarray, geo: Letterbox) -> np.ndarray:
    """(K, h, w) low-res mask logits over the square input -> (K, orig_h, orig_w) float32 logits on the frame.

    Upsample to the input square, crop away the padding, then resize to the frame: the inverse of
    :func:`letterbox`, so that masks of non-square frames line up with the anatomy.
    """
    import cv2

    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 3:
        raise ValueError(f"expected (K, h, w) logits, got shape {tuple(logits.shape)}")
    k, h, w = logits.shape
    rows = _to_square_crop(h, geo.size, geo.scaled_h)
    cols_t = _to_square_crop(w, geo.size, geo.scaled_w).T.copy()
    # Two plain GEMMs (a broadcast batch matmul takes numpy's slow path): rows, then columns.
    cropped = ((rows @ logits).reshape(k * geo.scaled_h, w) @ cols_t).reshape(k, geo.scaled_h, geo.scaled_w)
    out = np.empty((k, geo.orig_h, geo.orig_w), np.float32)
    for i, mask in enumerate(cropped):
        out[i] = cv2.resize(mask, (geo.orig_w, geo.orig_h), interpolation=cv2.INTER_LINEAR)
    return out


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
