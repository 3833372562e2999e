"""Where the package's data (config/, launch/, models/) lives, for source checkouts and installs alike."""
from __future__ import annotations

import os
import sys
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def share_dir() -> Path:
    """Folder holding ``config/`` and ``models/``: $FLUOROSAM_HOME, the source checkout, or the install share."""
    candidates = []
    if os.environ.get("FLUOROSAM_HOME"):
        candidates.append(Path(os.environ["FLUOROSAM_HOME"]))
    candidates += [_SOURCE_ROOT, Path(sys.prefix) / "share" / "fluorosam_ros"]
    for candidate in candidates:
        if (candidate / "config").is_dir():
            return candidate
    raise FileNotFoundError(f"no fluorosam_ros data folder among {[str(c) for c in candidates]}")


def config_path(name: str) -> Path:
    return share_dir() / "config" / name


def default_model_dir() -> Path:
    return share_dir() / "models" / "fluorosam-tiny"
