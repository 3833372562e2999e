"""A tiny synthetic eval set (two lung bands per frame) and oracles that read it: shared by the evaluation,
comparison and IoU-head tests, so each checks its own code against the same known answers."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

VALUES = {"left lung": 100, "right lung": 200}


def write_evalset(root: Path, n: int = 3, size: tuple[int, int] = (40, 56)) -> Path:
    """``n`` frames of ``size`` with the right lung on the image's left (patient's right), in the eval-set format."""
    root.mkdir(parents=True, exist_ok=True)
    items = []
    rng = np.random.default_rng(0)
    for i in range(n):
        image = np.zeros(size, np.uint8)
        x0 = int(rng.integers(2, 10))
        image[5:30, x0:x0 + 15] = VALUES["right lung"]
        image[5:30, x0 + 25:x0 + 40] = VALUES["left lung"]
        Image.fromarray(image).save(root / f"img{i}.png")
        masks = {}
        for name, value in VALUES.items():
            slug = name.replace(" ", "_")
            Image.fromarray(((image == value) * 255).astype(np.uint8)).save(root / f"img{i}_{slug}.png")
            masks[name] = f"img{i}_{slug}.png"
        items.append({"image": f"img{i}.png", "masks": masks})
    (root / "manifest.json").write_text(json.dumps({"items": items}))
    return root


class Oracle:
    """Reads the answer off the synthetic frame (perfect) or answers nothing (empty)."""

    def __init__(self, perfect: bool) -> None:
        self.perfect = perfect
        self.frame = None

    def set_frame(self, frame):
        self.frame = frame

    def predict(self, prompts, clicks, previous):
        names = [p if p in VALUES else p.split(":")[0] for p in prompts]
        masks = [(self.frame == VALUES[n]) if self.perfect else np.zeros(self.frame.shape, bool) for n in names]
        return masks, [1.0] * len(prompts), None

    def refused(self, prompts):
        return [p not in VALUES for p in prompts]
