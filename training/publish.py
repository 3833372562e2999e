"""``fluorosam publish --model DIR --out DIR``: a checkpoint in compact form, the form a default is committed in.

Every committed default costs every future clone its size, so a default is stored with float16 weights
and an int8 phrase table (``save_checkpoint(compact=True)``), half the bytes of training's float32
checkpoints (the rule for when one may be committed at all: docs/training_log.md).
The record (config, OOV thresholds, ``min_score``, metrics, training history) is kept, and ``published_from``
names the float32 source by its weights' hash.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from training.model.checkpoint import checkpoint_provenance, load_checkpoint, save_checkpoint


def publish(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    model, meta = load_checkpoint(model_dir)
    meta = {key: value for key, value in meta.items() if key not in ("format_version", "config")}
    meta["published_from"] = checkpoint_provenance(model_dir)
    return save_checkpoint(model, out_dir, meta, compact=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (float32, as training writes it)")
    parser.add_argument("--out", required=True, help="folder for the compact checkpoint")


def main(args: argparse.Namespace) -> int:
    out = publish(args.model, args.out)
    size = os.path.getsize(Path(args.model) / "model.safetensors") / 1e6
    print(f"{out}: {os.path.getsize(out / 'model.safetensors') / 1e6:.1f} MB compact (from {size:.1f} MB)")
    return 0
