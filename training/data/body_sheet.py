"""Bodies side by side: do the phantoms' DRRs look like the chest CT's? Matching views, histograms, contrasts.

``python -m training.data.body_sheet --body chest=example --body AM=/tmp/bodies/AM --out docs/images/bodies.png``
(a body is ``NAME=example`` or ``NAME=FOLDER`` holding ``ct.nii.gz`` + ``labels.nii.gz`` with TotalSegmentator ids,
as ``fluorosam data phantom`` writes). Every body is rendered in the same poses, each aimed at that body's own
anchor (PA chest, lateral chest, AP pelvis where the body reaches it); images are shown as training sees them
(``fluorosam_common.frames.window``). The last column overlays the windowed intensity histograms of the PA
chest views, and the printed table gives, on that view, the contrasts a model keys on: raw line integral in the
spine over the heart (bone / soft tissue) and in the lungs over the heart (air / soft tissue).
"""
from __future__ import annotations

import argparse

import numpy as np

VIEWS = [  # (title, anchor, pose arguments: base, primary, secondary, sdd, sod, fov)
    ("PA chest", "chest", ("PA", 0.0, 0.0, 1200.0, 850.0, 320.0)),
    ("lateral chest", "chest", ("AP", 90.0, 0.0, 1100.0, 760.0, 300.0)),
    ("AP pelvis", "pelvis", ("AP", 0.0, 0.0, 1100.0, 760.0, 320.0)),
]
CONTRAST_CLASSES = ("spine", "heart", "lungs")


def load_body(source: str):
    from pathlib import Path

    from .ct import load_ct

    if source == "example":
        return load_ct()
    folder = Path(source)
    return load_ct(folder / "ct.nii.gz", folder / "labels.nii.gz", ct_id=folder.name)


def contrasts(image: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """Median raw line integral of spine and lungs over that of the heart (NaN where a mask is empty)."""
    heart = masks["heart"] & ~masks["spine"]
    if not heart.any():
        return {"bone/soft": float("nan"), "air/soft": float("nan")}
    soft = float(np.median(image[heart]))
    spine = masks["spine"] & ~masks["heart"]
    lungs = masks["lungs"] & ~masks["heart"] & ~masks["spine"]
    return {"bone/soft": float(np.median(image[spine]) / soft) if spine.any() else float("nan"),
            "air/soft": float(np.median(image[lungs]) / soft) if lungs.any() else float("nan")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--body", action="append", required=True, metavar="NAME=SOURCE",
                        help="NAME=example (the bundled chest CT) or NAME=FOLDER (ct.nii.gz + labels.nii.gz)")
    parser.add_argument("--out", default="docs/images/bodies.png")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fluorosam_common.frames import window
    from fluorosam_common.vocabulary import Vocabulary

    from .contact_sheet import overlay
    from .geometry import CArmPose
    from .render import ClassMasker, render_view

    vocabulary = Vocabulary.load()
    masker = ClassMasker(vocabulary)
    index = {c.name: i for i, c in enumerate(vocabulary.classes)}
    bodies = [entry.split("=", 1) for entry in args.body]
    fig, axes = plt.subplots(len(bodies), len(VIEWS) + 1, figsize=(3.2 * (len(VIEWS) + 1), 3.2 * len(bodies)),
                             squeeze=False)
    histograms: dict[str, np.ndarray] = {}
    print(f"{'body':<10} {'bone/soft':>10} {'air/soft':>10}   (PA chest, median raw line integral ratios)")
    for row, (name, source) in enumerate(bodies):
        ct = load_body(source)
        for col, (title, anchor, (base, primary, secondary, sdd, sod, fov)) in enumerate(VIEWS):
            ax = axes[row, col]
            ax.axis("off")
            if anchor not in ct.anchors:
                ax.set_title(f"{name}: {title}\n(not in this body)", fontsize=8)
                continue
            pose = CArmPose(base, primary, secondary, sdd, sod, fov, tuple(ct.anchors[anchor]), "sheet")
            view = render_view(ct, pose, args.size, masker)
            gray = window(view.image)
            masks = {c: view.masks[index[c]] for c in CONTRAST_CLASSES}
            shown = overlay(gray, view.masks[index["spine"]], (1.0, 0.8, 0.1))
            ax.imshow(shown)
            ax.set_title(f"{name}: {title}", fontsize=8)
            if col == 0:
                values = contrasts(view.image, masks)
                print(f"{name:<10} {values['bone/soft']:>10.2f} {values['air/soft']:>10.2f}")
                histograms[name] = gray.ravel()
        axes[row, -1].axis("off")
    hist = axes[0, -1]
    hist.axis("on")
    for name, values in histograms.items():
        hist.hist(values, bins=64, range=(0, 1), histtype="step", density=True, label=name)
    hist.set_title("PA chest: windowed intensity", fontsize=8)
    hist.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
