"""Where the package's data (config/, launch/, models/) lives, for source checkouts and installs alike."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "fluorosam_ros"
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _ament_share() -> Path | None:
    """``share/fluorosam_ros`` of a colcon / ROS install, found the way ROS code finds it (the ament index)."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        return None
    try:
        return Path(get_package_share_directory(PACKAGE))
    except (PackageNotFoundError, ValueError, OSError):  # OSError: AMENT_PREFIX_PATH unset
        return None


def share_dir() -> Path:
    """Folder holding ``config/`` and ``models/``: $FLUOROSAM_HOME, the source checkout, the ament index, or
    the pip install's ``share``."""
    candidates = []
    if os.environ.get("FLUOROSAM_HOME"):
        candidates.append(Path(os.environ["FLUOROSAM_HOME"]))
    candidates.append(_SOURCE_ROOT)
    for candidate in candidates:
        if (candidate / "config").is_dir():
            return candidate
    for candidate in (_ament_share(), Path(sys.prefix) / "share" / PACKAGE):
        if candidate is not None:
            candidates.append(candidate)
            if (candidate / "config").is_dir():
                return candidate
    raise FileNotFoundError(f"no {PACKAGE} data folder (with config/) among {[str(c) for c in candidates]}")


def config_path(name: str) -> Path:
    return share_dir() / "config" / name


def default_model_dir() -> Path:
    return share_dir() / "models" / "fluorosam-tiny"
