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


def _target_ids(value) -> list[int]:
    """The TotalSegmentator ids a mapping entry writes: an id, or ``{left: id, right: id}`` for a paired organ."""
    if isinstance(value, dict):
        if set(value) != {"left", "right"}:
            raise ValueError(f"a sided mapping entry is {{left: id, right: id}}, got {value}")
        return [int(value["left"]), int(value["right"])]
    return [int(value)]


def load_mapping(path: str | os.PathLike, vocabulary: Vocabulary | None = None) -> dict:
    """The mapping YAML, checked against the vocabulary: every known class must be made only of mapped ids."""
    mapping = yaml.safe_load(Path(path).read_text())
    if not isinstance(mapping, dict) or not isinstance(mapping.get("labels"), dict):
        raise ValueError(f"{path}: a body mapping needs a 'labels' table (source name -> TotalSegmentator id)")
    vocabulary = vocabulary or Vocabulary.load()
    mapped_ids = {i for v in mapping["labels"].values() for i in _target_ids(v)}
    for name in mapping.get("known_classes", []):
        ids = set(vocabulary.get(name).label_ids)
        if vocabulary.get(name).kind == "anatomy" and ids - mapped_ids:
            raise ValueError(f"{path}: known class {name!r} needs ids {sorted(ids - mapped_ids)}, not mapped")
        if vocabulary.get(name).kind == "group" and not ids & mapped_ids:
            raise ValueError(f"{path}: known class {name!r} has none of its ids {sorted(ids)} mapped")
    return mapping


def map_label_grid(grid: np.ndarray, names: dict[int, str], mapping: dict,
                   left_axis: tuple[int, int] | None = None) -> np.ndarray:
    """int16 grid of TotalSegmentator ids: each source id whose name the mapping lists, else 0 (unknown).

    A sided entry (``{left: id, right: id}``, for a source that labels a pair as one organ, as ICRP-110 does
    its femora and hip bones) splits at the pair's own midline: the centroid, along the grid's patient-left
    axis, of every voxel the entries of that pair cover. ``left_axis`` = (grid axis, +1 or -1: the direction
    of the patient's left along it); required when the mapping has sided entries.
    """
    unknown = sorted(set(mapping["labels"]) - set(names.values()))
    if unknown:
        raise ValueError(f"the mapping names labels the source does not have: {unknown}")
    if grid.min() < 0:
        raise ValueError("label maps hold non-negative ids")
    lookup = np.zeros(int(grid.max()) + 1, np.int16)
    pairs: dict[tuple[int, int], list[int]] = {}
    for source_id, name in names.items():
        if name in mapping["labels"] and source_id < lookup.size:
            value = mapping["labels"][name]
            if isinstance(value, dict):
                pairs.setdefault(tuple(_target_ids(value)), []).append(source_id)
            else:
                lookup[source_id] = int(value)
    mapped = lookup[grid]
    if pairs and left_axis is None:
        raise ValueError("the mapping splits organs by side; pass the grid's patient-left axis")
    for (left_id, right_id), source_ids in pairs.items():
        axis, sign = left_axis
        inside = np.isin(grid, source_ids)
        coords = np.nonzero(inside)[axis]
        if coords.size == 0:
            continue
        shape = [1] * grid.ndim
        shape[axis] = grid.shape[axis]
        position = (np.arange(grid.shape[axis]) - coords.mean()).reshape(shape) * sign
        mapped[inside] = np.where(np.broadcast_to(position > 0, grid.shape)[inside], left_id, right_id)
    return mapped


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


def read_organ_table(path: str | os.PathLike) -> dict[int, tuple[str, float]]:
    """ICRP-110 ``<phantom>_organs.dat``: organ id -> (name, density g/cm3)."""
    import re

    row = re.compile(r"^(\d+)\s+(.+?)\s+(\d+)\s+([\d.]+)\s*$")
    table = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        match = row.match(line.strip())
        if match:
            table[int(match.group(1))] = (match.group(2).strip(), float(match.group(4)))
    if not table:
        raise ValueError(f"{path}: no organ rows (id, name, tissue number, density)")
    return table


def phantom_to_nifti(phantom: str | os.PathLike, organs: str | os.PathLike, mapping_path: str | os.PathLike,
                     out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """An ICRP-110 voxel phantom as the renderer's inputs: ``ct.nii.gz`` and ``labels.nii.gz`` in ``out_dir``.

    The CT is a pseudo-CT: each organ's density as Hounsfield units, 1000 (rho / rho_water - 1), constant per
    organ (the phantom has no texture), air -1000. The phantom's array runs (slices toes -> vertex, rows anterior ->
    posterior, columns patient's right -> left); the NIfTI grid is (x, y, z) with a RAS+ affine, so the body is
    oriented as a CT is, and the labels are the mapping's TotalSegmentator ids.
    """
    import nibabel as nib

    mapping = load_mapping(mapping_path)
    table = read_organ_table(organs)
    data = np.load(str(phantom))
    ids = np.asarray(data["organ_id"]).transpose(2, 1, 0)  # (columns, rows, slices) = (x, y, z) voxel order
    dx, dy, dz = (float(v) for v in data["voxel_mm"])  # column, row, slice spacing
    density = np.zeros(int(ids.max()) + 1, np.float32)  # id 0: air outside the body
    for organ_id, (_, rho) in table.items():
        if organ_id < density.size:
            density[organ_id] = rho
    hu = np.clip(1000.0 * (density[ids] - 1.0), -1000, 3000).astype(np.int16)
    labels = map_label_grid(ids.astype(np.int64), {k: name for k, (name, _) in table.items()}, mapping,
                            left_axis=(0, 1))
    # Column index runs to the patient's left (-x in RAS), row index to the back (-y), slice index up (+z).
    affine = np.diag([-dx, -dy, dz, 1.0])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Stored in canonical RAS+ voxel order, as CTs from scanners and TotalSegmentator usually are.
    nib.save(nib.as_closest_canonical(nib.Nifti1Image(hu, affine)), str(out / "ct.nii.gz"))
    nib.save(nib.as_closest_canonical(nib.Nifti1Image(labels, affine)), str(out / "labels.nii.gz"))
    return out / "ct.nii.gz", out / "labels.nii.gz"
