"""``fluorosam compare OLD NEW``: paired per-item differences between two evaluations of one eval set.

Two models scored on 8 films or 40 renders differ by less than the images differ from each other, so
the class means in ``metrics.md`` cannot tell a change from a lucky draw. Pairing by item removes each
image's own difficulty: per item, the mean IoU over the chosen classes under each model, then the mean
and standard error of the per-item differences. Reads the ``records.jsonl`` that ``fluorosam evaluate``
writes beside ``metrics.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from training.evaluate import LARGEST_K, RECORDS_FILE

ALL_CLASSES = "all classes"


def load_records(folder: str | Path) -> list[dict]:
    """The per-item rows of one evaluation output folder."""
    path = Path(folder) / RECORDS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: evaluate with a fluorosam version that writes {RECORDS_FILE}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _per_item_means(rows: list[dict], points: int, classes: set[str] | None) -> dict[str, float]:
    """Item -> mean IoU over its prompts among ``classes`` (all prompts when None) at ``points`` clicks."""
    grouped: dict[str, list[float]] = {}
    for row in rows:
        if row["points"] == points and (classes is None or row["prompt"] in classes):
            grouped.setdefault(row["item"], []).append(row["iou"])
    return {item: float(np.mean(values)) for item, values in grouped.items()}


def paired_difference(old: list[dict], new: list[dict], points: int, classes: set[str] | None = None) -> dict:
    """Mean per-item IoU of both evaluations and the mean +- standard error of NEW - OLD, over shared items."""
    old_means, new_means = _per_item_means(old, points, classes), _per_item_means(new, points, classes)
    shared = sorted(set(old_means) & set(new_means))
    if not shared:
        raise ValueError(f"no item has the chosen classes at {points} clicks in both evaluations "
                         "(were they run on the same eval set?)")
    before = np.array([old_means[i] for i in shared])
    after = np.array([new_means[i] for i in shared])
    diff = after - before
    stderr = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"items": len(shared), "old": float(before.mean()), "new": float(after.mean()),
            "difference": float(diff.mean()), "stderr": stderr,
            "unpaired_items": len(set(old_means) ^ set(new_means)),
            "per_item": {i: [old_means[i], new_means[i]] for i in shared}}


def compare(old_dir: str | Path, new_dir: str | Path, groups: dict[str, set[str] | None]) -> dict:
    """{group: {points: paired_difference}} for every click count both evaluations report."""
    old, new = load_records(old_dir), load_records(new_dir)
    points = sorted({r["points"] for r in old} & {r["points"] for r in new})
    if not points:
        raise ValueError("the two evaluations share no click count")
    return {name: {str(k): paired_difference(old, new, k, classes) for k in points}
            for name, classes in groups.items()}


def default_groups(old_dir: str | Path) -> dict[str, set[str] | None]:
    """The old evaluation's largest classes (as its metrics.json lists them) and all classes."""
    metrics_path = Path(old_dir) / "metrics.json"
    groups: dict[str, set[str] | None] = {}
    if metrics_path.exists():
        largest = json.loads(metrics_path.read_text()).get("largest_classes")
        if largest:
            groups[f"{LARGEST_K} largest"] = set(largest)
    groups[ALL_CLASSES] = None
    return groups


def plot_paired(result: dict, path: str | Path) -> None:
    """One scatter per class group and click count: each item's IoU under OLD (x) and NEW (y), and the diagonal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, k, r) for name, by_points in result.items() for k, r in by_points.items()]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (name, k, r) in zip(axes.flat, panels):
        pairs = np.array(list(r["per_item"].values()))
        ax.plot([0, 1], [0, 1], color="0.6", lw=1)
        ax.scatter(pairs[:, 0], pairs[:, 1], s=14)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="old IoU", ylabel="new IoU", aspect="equal")
        ax.set_title(f"{name[:28]}, {k} clicks\n{r['difference']:+.3f} +- {r['stderr']:.3f} (n={r['items']})",
                     fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", help="output folder of `fluorosam evaluate` for the reference model")
    parser.add_argument("new", help="output folder of `fluorosam evaluate` for the candidate, same eval set")
    parser.add_argument("--classes", nargs="+", default=None,
                        help="one group of these classes (default: the old run's largest classes, and all)")
    parser.add_argument("--out", default=None, help="also write the result (with per-item IoUs) as JSON here")
    parser.add_argument("--plot", default=None, help="also draw per-item old vs new IoU scatters to this PNG")


def main(args: argparse.Namespace) -> int:
    groups = {", ".join(args.classes): set(args.classes)} if args.classes else default_groups(args.old)
    try:
        result = compare(args.old, args.new, groups)
    except (FileNotFoundError, ValueError) as error:
        print(f"fluorosam compare: {error}", file=sys.stderr)
        return 2
    print("| classes | clicks | items | old | new | new - old (paired, +- s.e.) |")
    print("|---|---|---|---|---|---|")
    for name, by_points in result.items():
        for k, r in by_points.items():
            print(f"| {name} | {k} | {r['items']} | {r['old']:.3f} | {r['new']:.3f} | "
                  f"{r['difference']:+.3f} +- {r['stderr']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot_paired(result, args.plot)
    return 0
