"""Apply a vocabulary's ``hidden_by`` rules to an existing render, without rendering again.

Rendering is the slow part of the data engine (about a second per view on a CPU). A mask convention
change such as "the lung field ends at the diaphragm" only removes the pixels of one class where other
classes' projections are, and those projections are already in the shards. So the relabelled masks are
bit-identical to a fresh render with the new vocabulary, provided that

- the source was rendered with the same class list (names and order), and
- every hiding class is stored as its plain projection (it has no ``hidden_by`` itself), and
- the source's own ``hidden_by`` rules are a subset of the new ones (removing pixels cannot be undone;
  applying a rule twice changes nothing). Checked against the rules the source's manifest records; older
  manifests do not record them, and then this condition is the user's to keep.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fluorosam_common.vocabulary import Vocabulary

from .render import apply_hiding, hiding_plan
from .shards import read_manifest, unpack_masks, write_manifest, write_shard


def _check_hiders_are_plain(rules: dict[str, list[str]]) -> None:
    """A render stores a hiding class after its own hiding: relabelling can only use plain projections."""
    for name, hiders in rules.items():
        for hider in hiders:
            if hider in rules:
                raise ValueError(f"class {name!r} is hidden by {hider!r}, which is itself hidden_by other classes: "
                                 "its stored mask is not its plain projection, so relabelling would not match a render")


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
    rules = vocab.hiding_rules
    _check_hiders_are_plain(rules)
    lost = [f"{name} by {hider}" for name, hiders in manifest.get("hidden_by", {}).items() for hider in hiders
            if hider not in rules.get(name, [])]
    if lost:
        raise ValueError(f"{src} already hides {', '.join(lost)}, which the new vocabulary does not: removed pixels "
                         "cannot come back, render again instead")
    out.mkdir(parents=True, exist_ok=True)
    new = dict(manifest, vocabulary_sha256=vocab.sha256, hidden_by=rules,
               relabeled_from={"data": str(src.resolve()), "vocabulary_sha256": manifest["vocabulary_sha256"]})
    present = []
    for shard in tqdm(manifest["shards"], unit="shard", desc="relabel", disable=not progress):
        with np.load(src / shard["file"]) as z:
            images, packed = z["images"], z["masks"]
        masks = apply_hiding(unpack_masks(packed, manifest["image_size"]), plan)
        present.append(write_shard(out / shard["file"], images, masks))
    new["items"] = []
    for item in manifest["items"]:
        flags = present[item["shard"]][item["index"]]
        new["items"].append(dict(item, present=[name for name, flag in zip(vocab.names, flags) if flag]))
    write_manifest(out, new)
    return new
