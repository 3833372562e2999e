"""Apply a vocabulary's ``hidden_by`` rules to an existing render, without rendering again.

Rendering is the slow part of the data engine (about a second per view on a CPU). A mask convention
change such as "the lung field ends at the diaphragm" only removes the pixels of one class where other
classes' projections are, and those projections are already in the shards. So the relabelled masks are
bit-identical to a fresh render with the new vocabulary, provided that

- the source was rendered with the same class list (names and order), and
- every hiding class is stored as its plain projection (it has no ``hidden_by`` itself), and
- the source's own ``hidden_by`` rules are a subset of the new ones (removing pixels cannot be undone;
  applying a rule twice changes nothing).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from training.vocabulary import Vocabulary

from .shards import read_manifest, write_manifest, write_shard


def hiding_plan(vocab: Vocabulary) -> dict[int, list[int]]:
    """Class index -> indices of the classes that hide it, for every class with ``hidden_by``."""
    index = {name: i for i, name in enumerate(vocab.names)}
    plan = {}
    for c in vocab.classes:
        if not c.hidden_by:
            continue
        for name in c.hidden_by:
            if vocab.get(name).hidden_by:
                raise ValueError(f"class {c.name!r} is hidden by {name!r}, which is itself hidden_by other classes: "
                                 "its stored mask is not its plain projection, so relabelling would not match a render")
        plan[index[c.name]] = [index[name] for name in c.hidden_by]
    return plan


def apply_hiding(masks: np.ndarray, plan: dict[int, list[int]]) -> np.ndarray:
    """Masks (N, C, H, W) bool with each planned class cut where any of its hiding classes is."""
    out = masks.copy()
    for target, hiders in plan.items():
        out[:, target] &= ~masks[:, hiders].any(1)
    return out


def relabel_dataset(src: str | Path, out: str | Path, vocabulary: str | None = None,
                    progress: bool = True) -> dict:
    """Write ``src``'s views to ``out`` with ``vocabulary``'s hidden_by applied; returns the new manifest."""
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise ValueError("relabel writes a new folder: --out must differ from --data")
    manifest = read_manifest(src)
    vocab = Vocabulary.load(vocabulary)
    if manifest["classes"] != vocab.names:
        raise ValueError(f"{src} was rendered with another class list ({len(manifest['classes'])} classes vs "
                         f"{len(vocab.names)}): render again instead")
    plan = hiding_plan(vocab)
    if not plan:
        raise ValueError("the vocabulary has no hidden_by rules: nothing to relabel")
    out.mkdir(parents=True, exist_ok=True)
    new = dict(manifest, vocabulary_sha256=vocab.sha256, shards=list(manifest["shards"]), items=[],
               relabeled_from={"data": str(src.resolve()), "vocabulary_sha256": manifest["vocabulary_sha256"]})
    side = manifest["image_size"]
    by_shard: dict[int, list[dict]] = {}
    for item in manifest["items"]:
        by_shard.setdefault(item["shard"], []).append(item)
    for k, shard in enumerate(tqdm(manifest["shards"], unit="shard", desc="relabel", disable=not progress)):
        with np.load(src / shard["file"]) as z:
            images, packed = z["images"], z["masks"]
        n, c = packed.shape[:2]
        masks = np.unpackbits(packed, axis=-1, count=side * side).astype(bool).reshape(n, c, side, side)
        present = write_shard(out / shard["file"], images, apply_hiding(masks, plan))
        for item in sorted(by_shard.get(k, []), key=lambda it: it["index"]):
            flags = present[item["index"]]
            new["items"].append(dict(item, present=[name for name, flag in zip(vocab.names, flags) if flag]))
    write_manifest(out, new)
    return new
