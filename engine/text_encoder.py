"""The exported text side: prompt -> quantized token and OOV flag with numpy + ONNX Runtime alone.

The graph (engine/export.py's ``TextEncoderExport``) holds the frozen sentence encoder, the projection,
the VQ codebook and the OOV scores with their calibrated thresholds; its tokenizer is the sentence
encoder's own ``tokenizer.json``, run by Hugging Face ``tokenizers`` (Rust, no torch). Prompts arrive
already normalized (fluorosam_common.prompts), as the model was trained on them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.export_format import TEXT_INPUTS


def load_tokenizer(path: str | os.PathLike, max_length: int, pad_id: int):
    """The tokenizer with sentence-transformers' settings: truncate to ``max_length``, pad to the longest."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id))
    return tokenizer


def tokenize(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 (N, L)."""
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], np.int64)
    mask = np.array([e.attention_mask for e in encodings], np.int64)
    return ids, mask


class OnnxTextEncoder:
    """``encode(texts) -> (tokens float32 (N, 256), oov bool (N,))`` from an export folder's text graph."""

    def __init__(self, onnx_dir: str | os.PathLike, record: dict) -> None:
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        self.tokenizer = load_tokenizer(onnx_dir / record["tokenizer"], record["max_length"], record["pad_id"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a prompt is encoded once (then cached): no thread pool for it
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_dir / record["graph"]), options,
                                            providers=["CPUExecutionProvider"])

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = tokenize(self.tokenizer, texts)
        tokens, _, _, _, oov = self.session.run(None, dict(zip(TEXT_INPUTS, (ids, mask))))
        return tokens.astype(np.float32), oov.astype(bool)
