"""Make the demo's bundled fluoroscopy sequence once (needs DiffDRR; the demo itself does not).

``python -m fluorosam_ros.demo_sequence [--frames 30] [--size 256] [--out fluorosam_ros/demo_data/sequence.npz]``

An AP chest fluoroscopy run of the example CT: the C-arm pans slowly and a guidewire advances along
its vascular route, one tip segment per frame. Stored as uint16 frames (line integrals scaled to the
detector's 16-bit range, as a C-arm driver would publish mono16) plus ground-truth masks (packed bits)
for the demo's prompts, so the demo can report IoU against the truth.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

DEFAULT_OUT = Path(__file__).resolve().parent / "demo_data" / "sequence.npz"
TRUTH_CLASSES = ("left lung", "right lung", "heart", "spine", "guidewire")


def render_sequence(frames: int, size: int, seed: int) -> dict:
    from fluorosam_common.vocabulary import Vocabulary
    from training.data.ct import load_ct
    from training.data.geometry import CArmPose
    from training.data.render import ClassMasker, render_view
    from training.data.tools import Tool, make_tool

    vocabulary = Vocabulary.load()
    masker = ClassMasker(vocabulary)
    ct = load_ct()
    rng = np.random.default_rng(seed)
    wire = None
    while wire is None or len(wire.parts) < frames:
        wire = make_tool("guidewire", rng, ct)
    chest = np.asarray(ct.anchors["chest"], np.float64)
    channels = [vocabulary.names.index(name) for name in TRUTH_CLASSES]
    images, masks, poses = [], [], []
    for i in tqdm(range(frames), desc="render", unit="frame"):
        t = i / max(1, frames - 1)
        pose = CArmPose("AP", primary_deg=-6.0 + 12.0 * t, secondary_deg=0.0, sdd_mm=1100.0, sod_mm=760.0,
                        fov_mm=300.0, isocenter=tuple(chest + np.array([0.0, 0.0, -8.0 + 16.0 * t])), family="demo")
        advanced = Tool(wire.name, wire.parts[: max(1, int(round(len(wire.parts) * (0.3 + 0.7 * t))))])
        view = render_view(ct, pose, size, masker, [advanced])
        images.append(view.image)
        masks.append(view.masks[channels])
        poses.append(dataclasses.asdict(pose))
    stack = np.stack(images)
    lo, hi = float(stack.min()), float(stack.max())
    frames16 = np.round((stack - lo) / (hi - lo) * 65535.0).astype(np.uint16)
    packed = np.packbits(np.stack(masks).reshape(frames, len(channels), -1), axis=-1)
    meta = {"classes": list(TRUTH_CLASSES), "size": size, "seed": seed, "poses": poses,
            "source": "DiffDRR example CT (training.data renderer), AP pan + advancing guidewire"}
    return {"frames": frames16, "masks": packed, "meta": np.array(json.dumps(meta))}


def load_sequence(path: str | Path = DEFAULT_OUT) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(frames uint16 (N,H,W), {class: bool (N,H,W)}, meta) from a bundled sequence file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no demo sequence at {path}; make it with `python -m fluorosam_ros.demo_sequence`")
    with np.load(path) as data:
        frames, packed, meta = data["frames"], data["masks"], json.loads(str(data["meta"]))
    n, h, w = frames.shape
    masks = np.unpackbits(packed, axis=-1, count=h * w).reshape(n, len(meta["classes"]), h, w).astype(bool)
    return frames, {name: masks[:, c] for c, name in enumerate(meta["classes"])}, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    arrays = render_sequence(args.frames, args.size, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {args.frames} frames at {args.size} px)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
