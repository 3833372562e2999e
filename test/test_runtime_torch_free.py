"""The node's runtime starts from an export folder with numpy + ONNX Runtime alone, and segments as before."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fluorosam_ros.demo_sequence import load_sequence

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["left lung", "right lung", "spine", "heart", "a banana"]
FRAMES = 6

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter: the node's own start-up (runner.make_segmenter from node parameters), then
# the demo frames, then proof that neither torch nor the training package was ever imported.
NODE_SCRIPT = """
import json, sys
import numpy as np
from fluorosam_ros.demo_sequence import load_sequence
from fluorosam_ros.params import NodeParams
from fluorosam_ros.runner import make_segmenter, warm_up
segmenter = make_segmenter(NodeParams(model_dir=sys.argv[1], backend="onnxruntime", threads=1))
warm_up(segmenter)
frames = load_sequence()[0][:{frames}]
masks, scores = [], []
for frame in frames:
    result = segmenter.segment(frame, {prompts!r})
    masks.append([r.mask if r.mask is not None else np.zeros(frame.shape, bool) for r in result.results])
    scores.append([r.score for r in result.results] + [r.reason for r in result.results])
np.save(sys.argv[2], np.array(masks))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training", "sentence_transformers"))
print(json.dumps({{"scores": scores, "loaded": loaded, "backend": segmenter.backend_name}}))
"""


def test_node_runtime_from_an_export_folder_needs_no_torch_and_keeps_the_masks(default_export, tmp_path):
    out = tmp_path / "masks.npy"
    done = subprocess.run([sys.executable, "-c", NODE_SCRIPT.format(frames=FRAMES, prompts=PROMPTS),
                           str(default_export), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["backend"] == "onnxruntime"
    torch_free = np.load(out)

    # The checkpoint path with torch: its own text encoder (sentence-transformers) and the torch graph.
    from engine.segmenter import Segmenter
    from fluorosam_common.paths import default_model_dir

    reference = Segmenter(default_model_dir(), backend="torch", threads=1)
    for index, frame in enumerate(load_sequence()[0][:FRAMES]):
        results = reference.segment(frame, PROMPTS).results
        scores = report["scores"][index]
        assert [r.reason for r in results] == scores[len(PROMPTS):]
        for k, result in enumerate(results):
            assert abs(result.score - scores[k]) < 2e-3, (index, result.prompt)
            if result.mask is not None:
                union = np.logical_or(result.mask, torch_free[index, k]).sum()
                assert np.logical_and(result.mask, torch_free[index, k]).sum() / union >= 0.99, (index, result.prompt)
