"""Backends run the two graphs of engine/export.py; the Segmenter owns caching and pre/post-processing.

Every backend has ``name``, ``encode(image (1,1,S,S) float32) -> embedding`` (an opaque handle for the
encoder's outputs, the 256-channel embedding and any high-res features, that may stay on the device) and
``decode(embedding, text_tokens, point_coords, point_labels, mask_input, has_mask_input) -> (masks
(K,4h,4w), scores (K,), iou_predictions (K,3))`` as float32 numpy arrays.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Backend(Protocol):
    name: str

    def encode(self, image: np.ndarray) -> Any: ...

    def decode(self, embedding: Any, text_tokens: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray,
               mask_input: np.ndarray, has_mask_input: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
