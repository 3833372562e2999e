"""Bodies from other sources than TotalSegmentator: a label map, its names, and a mapping to the vocabulary.

A source's label map (any integer ids, named in a JSON ``{"labels": {"1": "liver", ...}}``) is rewritten with
the TotalSegmentator ids the vocabulary's classes are defined on (``config/bodies/<source>.yaml``: ``labels``
name -> id), so that the renderer needs no second code path. What the source does not label is unknown, not
absent: the mapping's ``known_classes`` are the only classes a render of that body can be judged on
(``fluorosam data export-evalset --known-classes MAPPING``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import yaml

from fluorosam_common.vocabulary import Vocabulary


def load_mapping(path: str | os.PathLike, vocabulary: Vocabulary | None = None) -> dict:
    """The mapping YAML, checked against the vocabulary: every known class must be made only of mapped ids."""
    mapping = yaml.safe_load(Path(path).read_text())
    if not isinstance(mapping, dict) or not isinstance(mapping.get("labels"), dict):
        raise ValueError(f"{path}: a body mapping needs a 'labels' table (source name -> TotalSegmentator id)")
    vocabulary = vocabulary or Vocabulary.load()
    mapped_ids = {int(v) for v in mapping["labels"].values()}
    for name in mapping.get("known_classes", []):
        ids = set(vocabulary.get(name).label_ids)
        if vocabulary.get(name).kind == "anatomy" and ids - mapped_ids:
            raise ValueError(f"{path}: known class {name!r} needs ids {sorted(ids - mapped_ids)}, not mapped")
        if vocabulary.get(name).kind == "group" and not ids & mapped_ids:
            raise ValueError(f"{path}: known class {name!r} has none of its ids {sorted(ids)} mapped")
    return mapping


def map_label_grid(grid: np.ndarray, names: dict[int, str], mapping: dict) -> np.ndarray:
    """int16 grid of TotalSegmentator ids: each source id whose name the mapping lists, else 0 (unknown)."""
    unknown = sorted(set(mapping["labels"]) - set(names.values()))
    if unknown:
        raise ValueError(f"the mapping names labels the source does not have: {unknown}")
    lookup = np.zeros(int(grid.max()) + 1, np.int16)
    for source_id, name in names.items():
        if name in mapping["labels"] and source_id < lookup.size:
            lookup[source_id] = int(mapping["labels"][name])
    if grid.min() < 0:
        raise ValueError("label maps hold non-negative ids")
    return lookup[grid]


def map_labels(labels: str | os.PathLike, names: str | os.PathLike, mapping_path: str | os.PathLike,
               out: str | os.PathLike) -> Path:
    """Write the source's label map with TotalSegmentator ids (same grid and affine) to ``out``."""
    import nibabel as nib

    mapping = load_mapping(mapping_path)
    document = json.loads(Path(names).read_text())
    table = {int(k): str(v) for k, v in document.get("labels", document).items()}
    image = nib.load(str(labels))
    grid = np.asarray(image.dataobj).astype(np.int64)
    mapped = map_label_grid(grid, table, mapping)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mapped, image.affine, image.header), str(out))
    return out
