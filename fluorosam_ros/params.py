"""Node parameters: one dataclass, read from the ROS 2 parameter YAML (``<node>: ros__parameters: {...}``).

The same file drives the rclpy node (as ROS parameters), the non-ROS runner and replay, so the
defaults below mirror ``config/fluorosam.yaml``. Unknown names and wrong types are errors, not
silently ignored: a typo in a topic name must not leave a robot listening to nothing.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

NODE_NAME = "fluorosam_node"
RELIABILITIES = ("best_effort", "reliable")


@dataclass
class NodeParams:
    image_topic: str = "/carm/image"
    prompt_topic: str = "/fluorosam/prompt"
    mask_topic: str = "/fluorosam/mask"
    detections_topic: str = "/fluorosam/detections"
    results_topic: str = "/fluorosam/results"
    overlay_topic: str = "/fluorosam/overlay"
    diagnostics_topic: str = "/diagnostics"
    image_qos_depth: int = 1
    image_qos_reliability: str = "best_effort"
    prompt_qos_depth: int = 1
    output_qos_depth: int = 5
    model_dir: str = ""
    backend: str = "auto"
    min_score: float = -1.0
    near_duplicate_threshold: float = -1.0
    temporal_prompt: bool = False
    threads: int = 0
    initial_prompt: str = ""
    publish_overlay: bool = True
    overlay_alpha: float = 0.45
    diagnostics_period_s: float = 1.0
    stale_after_s: float = 2.0
    zmq_input_endpoint: str = "tcp://127.0.0.1:5555"
    zmq_output_endpoint: str = "tcp://127.0.0.1:5556"
    zmq_curve_secret_key_file: str = ""
    zmq_curve_authorized_keys_dir: str = ""
    dds_domain_id: int = -1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = {"str": str, "int": int, "float": float, "bool": bool}[f.type]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(f"parameter {f.name} must be {f.type}, got {value!r}")
        if self.image_qos_reliability not in RELIABILITIES:
            raise ValueError(f"image_qos_reliability must be one of {RELIABILITIES}, "
                             f"got {self.image_qos_reliability!r}")
        for name in ("image_qos_depth", "prompt_qos_depth", "output_qos_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.stale_after_s <= 0 or self.diagnostics_period_s <= 0:
            raise ValueError("stale_after_s and diagnostics_period_s must be > 0")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise ValueError("overlay_alpha must be in [0, 1]")
        if not -1 <= self.dds_domain_id <= 232:
            raise ValueError("dds_domain_id must be in 0..232, or -1 to follow ROS_DOMAIN_ID")

    # Optional values are stored ROS-style (no None in ROS parameters): negative or empty means "unset".
    @property
    def min_score_or_none(self) -> float | None:
        return None if self.min_score < 0 else self.min_score

    @property
    def near_duplicate_or_none(self) -> float | None:
        return None if self.near_duplicate_threshold < 0 else self.near_duplicate_threshold

    @property
    def model_dir_or_none(self) -> str | None:
        return self.model_dir or None

    def replace(self, **changes) -> NodeParams:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PARAMETER_NAMES = tuple(f.name for f in dataclasses.fields(NodeParams))


def load_params(path: str | os.PathLike | None = None, node_name: str = NODE_NAME, **overrides) -> NodeParams:
    """Read ``node_name``'s (or the ``/**`` wildcard's) ``ros__parameters`` from a ROS 2 parameter YAML.

    ``path=None`` reads the packaged ``config/fluorosam.yaml``. ``overrides`` win over the file.
    """
    if path is None:
        from fluorosam_common.paths import config_path

        path = config_path("fluorosam.yaml")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"parameter file {path} does not exist")
    document = yaml.safe_load(path.read_text()) or {}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping of node names to ros__parameters")
    values: dict = {}
    found = False
    for key in ("/**", node_name, "/" + node_name.lstrip("/")):
        section = document.get(key)
        if section is None:
            continue
        if not isinstance(section, dict) or not isinstance(section.get("ros__parameters"), dict):
            raise ValueError(f"{path}: '{key}' must contain a 'ros__parameters' mapping")
        values.update(section["ros__parameters"])
        found = True
    if not found:
        raise ValueError(f"{path}: no '{node_name}: ros__parameters:' section (found {sorted(document)})")
    values.update(overrides)
    unknown = sorted(set(values) - set(PARAMETER_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown parameters {unknown}; known: {list(PARAMETER_NAMES)}")
    return NodeParams(**values)
