"""Contact sheet of real renders of the bundled CT: views x colored masks for several prompts.

``python -m training.data.contact_sheet --out docs/images/contact_sheet.png``. Images are shown the way
training sees them before augmentation (``fluorosam_common.frames.window``), masks as translucent fills.
"""
from __future__ import annotations

import argparse

import numpy as np

VIEWS = [  # (title, pose arguments, tools)
    ("PA chest", ("PA", 0.0, 0.0, 1200.0, 850.0, 320.0), ()),
    ("AP, LAO 30, cranial 15", ("AP", 30.0, 15.0, 1000.0, 700.0, 260.0), ("central venous catheter",)),
    ("PA, RAO 40, caudal 20", ("PA", -40.0, -20.0, 1100.0, 760.0, 240.0), ("guidewire", "pedicle screw")),
    ("lateral", ("AP", 90.0, 0.0, 1100.0, 760.0, 300.0), ("endotracheal tube", "nasogastric tube")),
    ("AP fluoro zoom", ("AP", -10.0, 5.0, 1000.0, 720.0, 190.0), ("k-wire", "needle")),
]
PROMPTS = [("left lung", (1.0, 0.2, 0.2)), ("right lung", (0.2, 0.4, 1.0)), ("heart", (0.2, 0.9, 0.3)),
           ("spine", (1.0, 0.8, 0.1)), ("tools", (1.0, 0.3, 1.0))]


def overlay(gray: np.ndarray, mask: np.ndarray, color) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array(color)
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    rgb[edge] = color
    return rgb


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images/contact_sheet.png")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fluorosam_common.frames import window
    from fluorosam_common.vocabulary import Vocabulary

    from .ct import load_ct
    from .geometry import CArmPose
    from .render import ClassMasker, render_view
    from .tools import make_tool

    vocab = Vocabulary.load()
    masker = ClassMasker(vocab)
    ct = load_ct()
    rng = np.random.default_rng(args.seed)
    fig, axes = plt.subplots(len(VIEWS), 1 + len(PROMPTS), figsize=(2.2 * (1 + len(PROMPTS)), 2.3 * len(VIEWS)))
    for r, (title, pose_args, tool_names) in enumerate(VIEWS):
        pose = CArmPose(*pose_args, isocenter=tuple(ct.anchors["chest"] + np.array([0.0, 0.0, -15.0])))
        tools = [t for t in (make_tool(n, rng, ct) for n in tool_names) if t is not None]
        view = render_view(ct, pose, args.size, masker, tools)
        gray = window(view.image)
        axes[r, 0].imshow(gray, cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(title, fontsize=8)
        for c, (prompt, color) in enumerate(PROMPTS, start=1):
            if prompt == "tools":
                mask = np.zeros_like(gray, dtype=bool)
                for name in view.tools:
                    mask |= view.masks[vocab.names.index(name)]
                label = ", ".join(view.tools) or "no tools"
            else:
                mask, label = view.masks[vocab.names.index(prompt)], prompt
            axes[r, c].imshow(overlay(gray, mask, color))
            axes[r, c].set_title(label, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("DRRs of the bundled CT with projected masks (patient's left on the image's right)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
