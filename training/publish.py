"""``fluorosam publish --model DIR --out DIR``: a checkpoint in compact form, the form a default is committed in.

Every committed default costs every future clone its size, so a default is stored with float16 weights
and an int8 phrase table (``save_checkpoint(compact=True)``), half the bytes of training's float32
checkpoints (the rule for when one may be committed at all: docs/training_log.md).
The record (config, OOV thresholds, ``min_score``, metrics, training history) is kept, and ``published_from``
names the float32 source by path and weights hash.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from fluorosam_common.hashing import file_sha256
from training.model.checkpoint import WEIGHTS_FILE, load_checkpoint, save_checkpoint


def publish(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    model, meta = load_checkpoint(model_dir)
    meta = {key: value for key, value in meta.items() if key not in ("format_version", "config")}
    # The record itself is kept whole above; the float32 source is named by its weights' hash.
    meta["published_from"] = {"path": str(model_dir), "checkpoint_sha256": file_sha256(Path(model_dir) / WEIGHTS_FILE)}
    return save_checkpoint(model, out_dir, meta, compact=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (float32, as training writes it)")
    parser.add_argument("--out", required=True, help="folder for the compact checkpoint")


def main(args: argparse.Namespace) -> int:
    out = publish(args.model, args.out)
    size = os.path.getsize(Path(args.model) / WEIGHTS_FILE) / 1e6
    print(f"{out}: {os.path.getsize(out / WEIGHTS_FILE) / 1e6:.1f} MB compact (from {size:.1f} MB)")
    return 0
