"""Checkpoints: ``model.safetensors`` (weights, bit-exact) + ``model.json`` (config and provenance).

``model.json`` keys: ``config`` (FluoroSAMConfig), ``vocabulary_sha256``, ``data_manifest_sha256``,
``metrics``, ``oov`` ({"code_distance_max", "vocab_similarity_min"}), ``min_score``, plus anything
else the caller passes in ``meta`` (training command, steps, timing). The frozen sentence encoder is
not stored: its weights ship with its package.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fluorosam_common.checkpoint_files import META_FILE, WEIGHTS_FILE, read_meta
from fluorosam_common.hashing import file_sha256

from .config import FluoroSAMConfig
from .fluorosam import FluoroSAM

__all__ = ["META_FILE", "WEIGHTS_FILE", "checkpoint_provenance", "load_checkpoint", "model_from_state", "read_meta",
           "save_checkpoint", "quantize_rows", "dequantize_rows"]
FORMAT_VERSION = 1
PHRASE_TABLE, PHRASE_SCALE = "phrase_table", "phrase_table_scale"


def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm rows -> int8 rows and a float16 scale each (symmetric, scale = max |x| / 127).

    Why int8 is enough: the table only feeds a max-cosine OOV score; a row's rounding error is at most
    scale / 2 per component (~1e-3 for 384-d unit vectors), which moves a cosine by ~1e-3 in the worst
    case and by ~1e-4 typically, against a refusal threshold calibrated with a margin of hundredths.
    """
    table = table.float()
    scale = (table.abs().amax(dim=1) / 127).clamp_min(1e-12).half()
    return torch.round(table / scale.float()[:, None]).to(torch.int8), scale


def dequantize_rows(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (rows.float() * scale.float()[:, None]).half()


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def save_checkpoint(model: FluoroSAM, out_dir: str | os.PathLike, meta: dict | None = None,
                    compact: bool = False) -> Path:
    """Write weights and metadata atomically (temp files, then rename); returns the folder.

    ``compact`` (how a committed default is stored, ``fluorosam publish``): weights as float16 and the phrase
    table as int8 with a float16 scale per row (:func:`quantize_rows`); :func:`model_from_state` loads
    both back into the float32 model and its float16 table.
    """
    model = getattr(model, "module", model)  # unwrap DDP
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    meta.setdefault("oov", {"code_distance_max": _finite_or_none(model.oov_code_distance_max),
                            "vocab_similarity_min": _finite_or_none(model.oov_vocab_similarity_min)})
    meta.setdefault("min_score", None)
    meta.setdefault("metrics", {})
    meta.setdefault("vocabulary_sha256", None)
    meta.setdefault("data_manifest_sha256", None)
    document = {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), **meta}
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    if compact:
        tensors = {name: t.half() if t.is_floating_point() else t for name, t in tensors.items()}
        tensors[PHRASE_TABLE], tensors[PHRASE_SCALE] = quantize_rows(tensors[PHRASE_TABLE])
    tmp_weights, tmp_meta = out / (WEIGHTS_FILE + ".tmp"), out / (META_FILE + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_meta.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    for tmp in (tmp_weights, tmp_meta):
        os.chmod(tmp, 0o644)  # readable by the node's user, whatever the writer's umask
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    os.replace(tmp_meta, out / META_FILE)
    return out


def load_checkpoint(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[FluoroSAM, dict]:
    """Rebuild the model from ``model.json`` and load its weights strictly; returns (model in eval mode, meta)."""
    meta = read_meta(model_dir)
    weights_path = Path(model_dir) / WEIGHTS_FILE
    if not weights_path.exists():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {model_dir}")
    model = model_from_state(meta, load_file(str(weights_path)))
    return model.to(device).eval(), meta


def checkpoint_provenance(checkpoint_dir: str | os.PathLike) -> dict:
    """One link of a model's chain (a warm start's source, a weight average's input): path, weights hash and
    that checkpoint's own training record (or, for a weight average, which has none, its ``averaged_from``), so
    a model.json traces the whole chain."""
    meta = read_meta(checkpoint_dir)
    record = {"path": str(checkpoint_dir), "checkpoint_sha256": file_sha256(Path(checkpoint_dir) / WEIGHTS_FILE),
              "config": meta.get("config"), "training": meta.get("training")}
    if "averaged_from" in meta:
        record["averaged_from"] = meta["averaged_from"]
    return record


def bodies_seen(record: dict) -> list[str]:
    """The bodies (CT ids) a model's weights learned from: its own training views' and, down the chain, those of
    its warm start and of a weight average's inputs (``model.json`` or a provenance record)."""
    training = record.get("training") or {}
    bodies = set(training.get("bodies") or record.get("bodies") or [])
    for source in (training.get("initialized_from"), *(record.get("averaged_from") or [])):
        if source:
            bodies.update(bodies_seen(source))
    return sorted(bodies)


def model_from_state(meta: dict, state: dict[str, torch.Tensor]) -> FluoroSAM:
    """The model that ``meta`` (a ``model.json`` document: config, OOV thresholds) and ``state`` describe.

    The phrase table's length depends on the vocabulary, so it is sized from the state before the strict load;
    a missing OOV threshold refuses nothing.
    """
    model = FluoroSAM(FluoroSAMConfig.from_dict(meta["config"]))
    if PHRASE_SCALE in state:  # a compact checkpoint
        state = {**state, PHRASE_TABLE: dequantize_rows(state[PHRASE_TABLE], state[PHRASE_SCALE])}
        del state[PHRASE_SCALE]
    if PHRASE_TABLE in state:
        model.set_phrase_table(state[PHRASE_TABLE])
    model.load_state_dict(state, strict=True)
    oov = meta.get("oov") or {}
    model.set_oov_thresholds(
        oov.get("code_distance_max") if oov.get("code_distance_max") is not None else math.inf,
        oov.get("vocab_similarity_min") if oov.get("vocab_similarity_min") is not None else -math.inf)
    return model
