"""A checkpoint folder's files: ``model.safetensors`` (weights) and ``model.json`` (config, provenance,
OOV thresholds, ``min_score``). training/model/checkpoint.py writes and loads them with torch; a runtime
hashes the weights and reads the record without it."""
from __future__ import annotations

import json
import os
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


def read_meta(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {META_FILE} in {model_dir}: not a FluoroSAM checkpoint folder")
    return json.loads(path.read_text())
