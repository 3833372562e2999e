"""Export rendered views in the eval-set format shared with real X-rays (docs/interfaces.md).

``manifest.json`` = ``{"items": [{"image": "a.png", "masks": {"left lung": "a_left_lung.png"}}]}``;
images are 16-bit grayscale PNGs windowed exactly as training windows them (``fluorosam_common.frames.window``),
masks are 8-bit PNGs with 255 = structure; items of renders also give ``detector_pixel_mm`` (tip errors in mm).
A render made with known classes exports only those by default.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fluorosam_common.frames import window

from .geometry import detector_pixel_mm
from .shards import ShardDataset, _atomic_write


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def export_evalset(data: str | Path, out: str | Path, classes: list[str] | None = None,
                   ct_ids: list[str] | None = None, max_items: int | None = None, progress: bool = True) -> dict:
    """Write views of the shard folder ``data`` as an eval set in ``out``; returns its manifest."""
    dataset = ShardDataset(data, ct_ids=ct_ids)
    if classes is None and not dataset.known.all():  # what the body's labels can judge, no more
        classes = [c for c, known in zip(dataset.classes, dataset.known) if known]
    if classes:
        unknown = [c for c in classes if c not in dataset.classes]
        if unknown:
            raise ValueError(f"classes not in the rendered data: {unknown}")
    wanted = [dataset.classes.index(c) for c in (classes or dataset.classes)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    count = len(dataset) if max_items is None else min(max_items, len(dataset))
    items = []
    for i in tqdm(range(count), desc="export", unit="image", disable=not progress):
        sample = dataset[i]
        stem = f"{_slug(sample['ct_id'])}_{i:05d}"
        image16 = np.round(window(sample["image"]) * 65535).astype(np.uint16)
        Image.fromarray(image16).save(out / f"{stem}.png")
        masks = {}
        for c in wanted:
            if sample["present"][c]:
                name = dataset.classes[c]
                file = f"{stem}_{_slug(name)}.png"
                Image.fromarray(sample["masks"][c].astype(np.uint8) * 255).save(out / file)
                masks[name] = file
        pose = dataset.items[i].get("pose")
        items.append({"image": f"{stem}.png", "masks": masks, "ct_id": sample["ct_id"],
                      **({"detector_pixel_mm": detector_pixel_mm(pose, dataset.image_size)} if pose else {})})
    manifest = {"items": items, "source": str(Path(data).resolve())}
    _atomic_write(out / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest
