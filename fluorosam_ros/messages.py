"""Transport-neutral message model (the fields of std_msgs/Header and sensor_msgs/Image) and image <-> numpy.

Every transport converts its wire type into these, so the node core sees one shape. The image
conversion validates what cv_bridge trusts: the encoding is known, ``step`` covers a row, the data
holds exactly ``step * height`` bytes, and multi-byte pixels honour ``is_bigendian`` (cv_bridge's
16-bit byte-order and row-padding bugs are the reason this is not delegated to it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_SIDE = 8192  # same limit as fluorosam_common.frames: larger frames are rejected before any allocation

# encoding -> (numpy dtype, channels)
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "mono8": (np.dtype(np.uint8), 1),
    "8UC1": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32FC1": (np.dtype(np.float32), 1),
    "rgb8": (np.dtype(np.uint8), 3),
}


class ImageError(ValueError):
    """An image message that cannot be turned into pixels (unknown encoding, wrong step or size)."""


@dataclass
class Header:
    stamp_sec: int = 0
    stamp_nanosec: int = 0
    frame_id: str = ""

    @property
    def stamp_ns(self) -> int:
        return int(self.stamp_sec) * 1_000_000_000 + int(self.stamp_nanosec)

    @classmethod
    def from_ns(cls, stamp_ns: int, frame_id: str = "") -> Header:
        return cls(int(stamp_ns) // 1_000_000_000, int(stamp_ns) % 1_000_000_000, frame_id)


@dataclass
class ImageMsg:
    header: Header = field(default_factory=Header)
    height: int = 0
    width: int = 0
    encoding: str = ""
    is_bigendian: int = 0
    step: int = 0
    data: bytes | bytearray | memoryview = b""


def image_to_numpy(msg: ImageMsg) -> np.ndarray:
    """Pixels of ``msg`` as (H, W) or (H, W, 3) in native byte order; a view of ``data`` where possible.

    Raises :class:`ImageError` naming the first thing that is wrong.
    """
    if msg.encoding not in ENCODINGS:
        raise ImageError(f"unsupported encoding {msg.encoding!r}; expected one of {sorted(ENCODINGS)}")
    dtype, channels = ENCODINGS[msg.encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageError(f"image has zero size ({height}x{width})")
    if height > MAX_SIDE or width > MAX_SIDE:
        raise ImageError(f"image {height}x{width} exceeds the {MAX_SIDE}-pixel side limit")
    row_bytes = width * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageError(f"step {step} is smaller than one row of {width} {msg.encoding} pixels ({row_bytes} bytes)")
    size = memoryview(msg.data).nbytes
    if size != step * height:
        raise ImageError(f"data holds {size} bytes but step * height = {step} * {height} = {step * height}")
    if msg.is_bigendian not in (0, 1, False, True):
        raise ImageError(f"is_bigendian must be 0 or 1, got {msg.is_bigendian!r}")
    wire_dtype = dtype.newbyteorder(">" if msg.is_bigendian else "<") if dtype.itemsize > 1 else dtype
    # A strided view straight onto the wire bytes: row padding is skipped, nothing is copied.
    pixels = np.ndarray((height, width * channels), dtype=wire_dtype, buffer=msg.data, strides=(step, dtype.itemsize))
    if not pixels.dtype.isnative:
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
    return pixels.reshape(height, width, channels) if channels > 1 else pixels


def numpy_to_image(array: np.ndarray, encoding: str | None = None, header: Header | None = None) -> ImageMsg:
    """Contiguous little-endian image message from (H, W) or (H, W, 3) pixels; encoding inferred from dtype."""
    array = np.asarray(array)
    if encoding is None:
        inferred = {(np.uint8, 2): "mono8", (np.uint16, 2): "mono16", (np.float32, 2): "32FC1",
                    (np.uint8, 3): "rgb8"}
        encoding = inferred.get((array.dtype.type, array.ndim))
        if encoding is None:
            raise ImageError(f"no image encoding for dtype {array.dtype} with {array.ndim} dimensions")
    if encoding not in ENCODINGS:
        raise ImageError(f"unsupported encoding {encoding!r}; expected one of {sorted(ENCODINGS)}")
    dtype, channels = ENCODINGS[encoding]
    expected_ndim = 3 if channels > 1 else 2
    if array.ndim != expected_ndim or (channels > 1 and array.shape[2] != channels):
        raise ImageError(f"{encoding} needs shape (H, W{f', {channels}' if channels > 1 else ''}), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image has zero size {array.shape[:2]}")
    pixels = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<"))
    height, width = pixels.shape[:2]
    return ImageMsg(header or Header(), height, width, encoding, 0, width * channels * dtype.itemsize,
                    pixels.tobytes())
