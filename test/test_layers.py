"""The house: layers import only downwards, and what runs the node imports no torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bottom to top: each layer may import itself and the layers before it, never one after it.
LAYERS = ["fluorosam_common", "training", "engine", "fluorosam_ros"]
# The modules a node started from an export folder loads (the ROS node adds rclpy on top of these).
RUNTIME_MODULES = ["engine.segmenter", "engine.text_encoder", "engine.backends.onnxruntime_backend",
                   "engine.backends.tensorrt_backend", "fluorosam_ros.core", "fluorosam_ros.runner",
                   "fluorosam_ros.rclpy_node", "fluorosam_ros.transports.zmq_transport",
                   "fluorosam_ros.transports.dds", "fluorosam_ros.replay"]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (a lazy import still couples layers)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layers_import_only_downwards():
    violations = []
    for rank, layer in enumerate(LAYERS):
        allowed = set(LAYERS[: rank + 1])
        for path in sorted((ROOT / layer).rglob("*.py")):
            for name in _imports(path):
                top = name.split(".")[0]
                if top in LAYERS and top not in allowed:
                    violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not violations, "upward imports (an import circle in waiting):\n" + "\n".join(violations)


BOTTOM_LAYER_DEPENDENCIES = {"numpy", "yaml", "scipy", "skimage", "cv2", "ament_index_python"}


def test_the_bottom_layer_needs_no_torch():
    for path in sorted((ROOT / "fluorosam_common").rglob("*.py")):
        third_party = {n.split(".")[0] for n in _imports(path)} - set(sys.stdlib_module_names) - set(LAYERS)
        assert third_party <= BOTTOM_LAYER_DEPENDENCIES, (path.name, sorted(third_party))


def test_runtime_modules_do_not_import_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in RUNTIME_MODULES)
            + "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training'))\n"
            + "print(loaded)\nsys.exit(1 if loaded else 0)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"torch or training imported: {done.stdout[-2000:]}{done.stderr[-2000:]}"
