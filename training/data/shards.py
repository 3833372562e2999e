"""Shards on disk: writing them atomically, the manifest, a streaming reader, and splits by CT.

Layout (docs/interfaces.md): a folder with ``manifest.json`` and ``shard-<ct>-<n>.npz`` files. Each
shard holds ``images`` (N, H, W) float16 raw line integrals, ``masks`` (N, C, H*W/8) uint8 packed bits
and ``present`` (N, C) bool, C = every vocabulary class in manifest order. Shards and the manifest are
written to a temporary name and renamed, so a reader polling the folder only ever sees complete shards
and a valid manifest listing complete shards only.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; readers may run as other users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_shard(path: Path, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Write one shard atomically from float images (N,H,W) and bool masks (N,C,H,W); returns ``present``."""
    images = np.asarray(images)
    masks = np.asarray(masks, dtype=bool)
    if images.ndim != 3 or masks.ndim != 4 or masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[1:]:
        raise ValueError(f"shape mismatch: images {images.shape}, masks {masks.shape}")
    n, c = masks.shape[:2]
    packed = np.packbits(masks.reshape(n, c, -1), axis=-1)
    present = masks.reshape(n, c, -1).any(-1)
    _atomic_write(path, lambda f: np.savez_compressed(f, images=images.astype(np.float16), masks=packed,
                                                      present=present))
    return present


def unpack_masks(packed: np.ndarray, size: int) -> np.ndarray:
    """Packed shard masks (..., C, size*size/8) uint8 -> bool (..., C, size, size): the inverse of write_shard's."""
    return np.unpackbits(packed, axis=-1, count=size * size).reshape(*packed.shape[:-1], size, size).astype(bool)


def write_manifest(root: Path, manifest: dict) -> None:
    _atomic_write(Path(root) / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {root}: not a rendered shard folder")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: unsupported manifest version {manifest.get('version')!r}")
    return manifest


def new_manifest(image_size: int, classes: list[str], vocabulary_sha256: str, render: dict,
                 hidden_by: dict[str, list[str]] | None = None, known_classes: list[str] | None = None) -> dict:
    """``hidden_by``: the vocabulary's hiding rules the masks were made with (what relabelling checks against).
    ``known_classes``: the classes the body's labels can say are there or not (None: all; see
    :func:`known_class_flags`)."""
    manifest = {"version": MANIFEST_VERSION, "image_size": image_size, "classes": list(classes),
                "vocabulary_sha256": vocabulary_sha256, "hidden_by": dict(hidden_by or {}), "render": render,
                "shards": [], "items": []}
    if known_classes is not None:
        manifest["known_classes"] = sorted(set(known_classes))
    return manifest


def known_class_flags(manifest: dict) -> np.ndarray:
    """(C,) bool: whether each of the manifest's classes can be judged on its views.

    A body whose source labels only some structures (a phantom, a hand-labelled CT) has every other class
    unknown: an empty mask there means "not labelled", not "absent", so such a class is never prompted (as
    present or as absent) nor scored. Folders without ``known_classes`` know every class.
    """
    classes = manifest["classes"]
    if "known_classes" not in manifest:
        return np.ones(len(classes), bool)
    known = set(manifest["known_classes"])
    return np.array([c in known for c in classes], bool)


def presence_rates(parts: list[ShardDataset]) -> np.ndarray:
    """(C,) share of the views that know each class in which it is present (0 where no view knows it), from the
    manifests alone: how often sampling by area would even have the class to ask for."""
    present = np.zeros(len(parts[0].classes))
    known = np.zeros(len(parts[0].classes))
    for part in parts:
        index = {name: c for c, name in enumerate(part.classes)}
        known += part.known * len(part.items)
        for item in part.items:
            present[[index[name] for name in item["present"] if name in index]] += 1
    return np.divide(present, known, out=np.zeros_like(present), where=known > 0)


def add_shard(manifest: dict, file: str, ct_id: str, items: list[dict]) -> None:
    """Register a completed shard and its items (each: seed, pose, present, tools); keeps files sorted."""
    entries = [(s, [it for it in manifest["items"] if it["shard"] == k]) for k, s in enumerate(manifest["shards"])]
    entries = [e for e in entries if e[0]["file"] != file]
    entries.append(({"file": file, "ct_id": ct_id, "n": len(items)}, [dict(it, ct_id=ct_id) for it in items]))
    entries.sort(key=lambda e: e[0]["file"])
    manifest["shards"], manifest["items"] = [], []
    for k, (shard, shard_items) in enumerate(entries):
        manifest["shards"].append(shard)
        for index, item in enumerate(shard_items):
            manifest["items"].append({**item, "shard": k, "index": index})


def split_by_ct(manifest_root: str | Path, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint (train, val) CT id lists: views of one CT never land on both sides.

    With a single CT there is nothing to hold out: val is empty and validation needs a separate
    render (e.g. other seeds into another folder).
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ct_ids = sorted({s["ct_id"] for s in read_manifest(manifest_root)["shards"]})
    order = np.random.default_rng(seed).permutation(len(ct_ids))
    n_val = (0 if len(ct_ids) < 2 or val_fraction == 0
             else min(len(ct_ids) - 1, max(1, round(val_fraction * len(ct_ids)))))
    val = sorted(ct_ids[i] for i in order[:n_val])
    return [c for c in ct_ids if c not in val], val


class ShardDataset(torch.utils.data.Dataset):
    """Items of a shard folder as dicts: image (H,W) float32, masks (C,H,W) bool, present (C,), known (C,) (see
    :func:`known_class_flags`), ct_id, index.

    ``augment=True`` applies :func:`training.data.augment.domain_randomize` seeded by (seed, epoch, item's
    render seed), so an epoch is reproducible; call :meth:`set_epoch` each epoch. ``warp_prob``: chance of
    also applying :func:`training.data.augment.anatomy_warp` (same seeding) to image and masks together;
    ``zoom_out_prob``: chance of first shrinking the raw render and masks into the frame (:func:`zoom_out`);
    ``inspiration_prob``: chance of, before that, lowering the lungs' base under their apex
    (:func:`inspiration_stretch`, anchored on the ``lungs`` class; views of folders without it are left alone).
    :meth:`refresh` picks up shards that a running render has finished since. Decompressed shards are kept in
    a small LRU cache.
    """

    def __init__(self, root, ct_ids=None, augment: bool = False, seed: int = 0, cache_shards: int = 8,
                 warp_prob: float = 0.0, zoom_out_prob: float = 0.0, inspiration_prob: float = 0.0):
        self.root = Path(root)
        self.ct_ids = None if ct_ids is None else set(ct_ids)
        self.augment = augment
        self.warp_prob = warp_prob
        self.zoom_out_prob = zoom_out_prob
        self.inspiration_prob = inspiration_prob
        self.seed = seed
        self.epoch = 0
        self.cache_shards = cache_shards
        self._cache: OrderedDict[str, dict] = OrderedDict()
        self.refresh()

    def refresh(self) -> None:
        manifest = read_manifest(self.root)
        self.manifest = manifest
        self.classes: list[str] = manifest["classes"]
        self.image_size: int = manifest["image_size"]
        self.known = known_class_flags(manifest)
        self.items = [it for it in manifest["items"] if self.ct_ids is None or it["ct_id"] in self.ct_ids]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _shard(self, file: str) -> dict:
        if file in self._cache:
            self._cache.move_to_end(file)
            return self._cache[file]
        with np.load(self.root / file) as data:
            shard = {k: data[k] for k in ("images", "masks", "present")}
        self._cache[file] = shard
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return shard

    def _draws(self, probability: float, view_seed: int, *stream: int) -> bool:
        """Whether an optional augmentation applies to this view this epoch (its own seeded stream per kind)."""
        return bool(probability) and \
            np.random.default_rng([self.seed, self.epoch, view_seed, *stream]).random() < probability

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self.items):
            raise IndexError(f"item {i} out of range for {len(self.items)} items")
        item = self.items[i]
        shard = self._shard(self.manifest["shards"][item["shard"]]["file"])
        k, size = item["index"], self.image_size
        image = shard["images"][k].astype(np.float32)
        masks = unpack_masks(shard["masks"][k], size)
        if self.augment:
            from .augment import anatomy_warp, domain_randomize, inspiration_stretch, zoom_out

            view_seed = int(item.get("seed", i))
            if "lungs" in self.classes and self._draws(self.inspiration_prob, view_seed, 2):
                image, masks = inspiration_stretch(image, masks, self.classes.index("lungs"), self.seed, self.epoch,
                                                   view_seed)
            if self._draws(self.zoom_out_prob, view_seed, 1):
                image, masks = zoom_out(image, masks, self.seed, self.epoch, view_seed)
            image = domain_randomize(image, self.seed, self.epoch, view_seed)
            if self._draws(self.warp_prob, view_seed):
                image, masks = anatomy_warp(image, masks, self.seed, self.epoch, view_seed)
        return {"image": image, "masks": masks, "present": shard["present"][k].copy(), "known": self.known,
                "ct_id": item["ct_id"], "index": i}
