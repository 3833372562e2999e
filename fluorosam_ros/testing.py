"""Helpers for the node's tests and the demo, and for trying the node before a trained model exists.

``save_random_model`` writes a small randomly initialised checkpoint through training.model's own
``save_checkpoint``, so the real Segmenter loads it exactly like the trained default model.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

# Small enough that a CPU forward pass takes milliseconds; same architecture as "tiny".
MINI_OVERRIDES = dict(name="mini-random", image_size=64, swin_embed_dim=16, swin_depths=(1, 1, 1),
                      swin_heads=(1, 2, 4), window_size=4, embed_stride=8, codebook_size=16,
                      decoder_mlp_dim=64, drop_path_rate=0.0)


def save_random_model(out_dir: str | os.PathLike, seed: int = 0, config: str = "tiny", mini: bool = True) -> Path:
    """A random-init FluoroSAM checkpoint folder (min_score 0: every non-empty mask is published)."""
    import torch

    from training.model import FluoroSAM, get_config, save_checkpoint

    cfg = get_config(config)
    if mini:
        cfg = dataclasses.replace(cfg, **MINI_OVERRIDES)
    torch.manual_seed(seed)
    return save_checkpoint(FluoroSAM(cfg).eval(), out_dir, {"min_score": 0.0, "note": "random init, for tests"})


def write_params(path: str | os.PathLike, **values) -> Path:
    """A ROS-format parameter file for ``fluorosam_node`` with ``values``."""
    path = Path(path)
    path.write_text(yaml.safe_dump({"fluorosam_node": {"ros__parameters": values}}))
    return path


def start_node_process(transport: str, params_file: str | os.PathLike, log_file: str | os.PathLike,
                       env: dict | None = None) -> subprocess.Popen:
    """``fluorosam node --transport T --params F`` as a separate process, output to ``log_file``."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", NO_ALBUMENTATIONS_UPDATE="1", **(env or {}))
    with open(log_file, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "fluorosam_ros.cli", "node", "--transport", transport,
                                 "--params", str(params_file)], stdout=log, stderr=subprocess.STDOUT, env=full_env)


def wait_for(predicate, timeout_s: float, poll_s: float = 0.02):
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout_s`` passes (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    return None
