"""What an export folder holds and how a runtime reads it: numpy and the standard library only.

``engine/export.py`` writes the folder (with torch); everything that runs from it (the Segmenter, the
ONNX Runtime and TensorRT backends, the node) reads it through this module, so a node started from an
export folder never imports torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "prompt_decoder.onnx"
TEXT_ENCODER_FILE = "text_encoder.onnx"  # sentence encoder + projection + VQ + OOV scores, for free text
TOKENIZER_FILE = "text_tokenizer.json"  # the sentence encoder's own tokenizer (Hugging Face tokenizers format)
TEXT_TABLE_FILE = "text_tokens.safetensors"
EXPORT_META_FILE = "export.json"
OPSET = 17  # LayerNormalization is a single op from 17 on, which TensorRT 10 maps to its normalization layer
# 2: the encoder's outputs are listed in export.json; 3: the text side is exported too (text graph + tokenizer)
EXPORT_FORMAT_VERSION = 3
ENCODER_INPUTS = ["image"]
# high-res: relative to the embedding grid; fine: the stride-2 and input-resolution maps of the fine path
EMBEDDING_NAMES = ["image_embedding", "high_res_2x", "high_res_4x", "fine_stride2", "fine_input"]
PROMPT_INPUTS = ["text_tokens", "point_coords", "point_labels", "mask_input", "has_mask_input"]
DECODER_OUTPUTS = ["masks", "scores", "iou_predictions"]
TEXT_INPUTS = ["input_ids", "attention_mask"]
TEXT_OUTPUTS = ["text_tokens", "code", "code_distance", "vocab_similarity", "oov"]


def embedding_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor the encoder hands the decoder, in graph order."""
    return {name: (1, channels, side, side)
            for name, (channels, side) in zip(EMBEDDING_NAMES, config.encoder_output_shapes)}


def decoder_input_names(config) -> list[str]:
    return [*embedding_shapes(config), *PROMPT_INPUTS]


def pack_points(point_lists: list[list[tuple[float, float, int]]], to_input) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt frame-pixel points -> (K, P, 2) model-input coords and (K, P) float labels.

    P = 0 when no prompt has points (text only, as SAM). Otherwise each row is padded with label -1
    to the longest list plus SAM's one padding point, matching ``FluoroSAM.decode``.
    """
    k = len(point_lists)
    longest = max((len(p) for p in point_lists), default=0)
    if longest == 0:
        return np.zeros((k, 0, 2), np.float32), np.zeros((k, 0), np.float32)
    coords = np.zeros((k, longest + 1, 2), np.float32)
    labels = -np.ones((k, longest + 1), np.float32)
    for row, points in enumerate(point_lists):
        for col, (x, y, label) in enumerate(points):
            if label not in (0, 1):
                raise ValueError(f"point label must be 1 (positive) or 0 (negative), got {label!r}")
            coords[row, col] = to_input(np.array([x, y], np.float32))
            labels[row, col] = label
    return coords, labels


def read_export_meta(onnx_dir: str | os.PathLike) -> dict:
    path = Path(onnx_dir) / EXPORT_META_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {EXPORT_META_FILE} in {onnx_dir}: run `fluorosam export` first")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ValueError(f"{path}: export format {meta.get('format_version')}, this runtime reads "
                         f"{EXPORT_FORMAT_VERSION}; run `fluorosam export` again")
    return meta


def load_text_table(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, bool]]:
    """``text_tokens.safetensors`` -> {normalized phrase: (token float32 (256,), oov)}."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        phrases = json.loads(handle.metadata()["phrases"])
        tokens = handle.get_tensor("codebook").astype(np.float32)[handle.get_tensor("code")]
        oov = handle.get_tensor("oov").astype(bool)
    if len(phrases) != tokens.shape[0]:
        raise ValueError(f"{path}: {len(phrases)} phrases but {tokens.shape[0]} tokens")
    return {phrase: (tokens[i], bool(oov[i])) for i, phrase in enumerate(phrases)}
