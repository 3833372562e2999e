"""C-arm geometry: pose sampling and the rays of every detector pixel, in patient (RAS+) world millimetres.

The renderer builds its own rays (source point, one target point per pixel) instead of DiffDRR's
pose/detector classes, so that the same rays serve the DRR (``DRR.render``), the analytic tool
projection and the analytic sphere test, and so that the display convention is explicit:

* head up: image rows run from the patient's head to the feet (the superior axis projected on the
  detector points up);
* radiological left/right: the patient's LEFT is on the image's RIGHT for AP and PA views alike. The
  view from the source shows the patient's left on the right for AP beams but on the left for PA beams,
  so PA-family views are mirrored, as every PACS displays a PA chest radiograph;
* near-lateral views (less than ~10 degrees from a true lateral) show the patient's anterior on the
  image's right.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Patient axes in RAS+ world coordinates (NIfTI / torchio): +x = patient's right, +y = anterior, +z = superior.
PATIENT_LEFT = np.array([-1.0, 0.0, 0.0])
ANTERIOR = np.array([0.0, 1.0, 0.0])
SUPERIOR = np.array([0.0, 0.0, 1.0])
_LATERAL_BAND = math.sin(math.radians(10.0))


@dataclass(frozen=True)
class CArmPose:
    """One C-arm view. Angles in degrees, lengths in mm, ``isocenter`` in world coordinates.

    ``primary_deg`` rotates the beam about the patient's head-foot axis away from the base view's
    beam (``base``: "AP" = beam anterior->posterior, "PA" = posterior->anterior); ``secondary_deg``
    tilts it about the patient's left-right axis, cranial (+, detector toward the head) or caudal (-).
    ``fov_mm`` is the field of view in the isocenter plane.
    """

    base: str
    primary_deg: float
    secondary_deg: float
    sdd_mm: float
    sod_mm: float
    fov_mm: float
    isocenter: tuple[float, float, float]
    family: str = "custom"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["isocenter"] = [round(float(v), 3) for v in self.isocenter]
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> CArmPose:
        return cls(**{**d, "isocenter": tuple(d["isocenter"])})


def _rotate(v: np.ndarray, axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues rotation of ``v`` about unit ``axis``."""
    a = math.radians(degrees)
    return v * math.cos(a) + np.cross(axis, v) * math.sin(a) + axis * np.dot(axis, v) * (1 - math.cos(a))


@dataclass(frozen=True)
class Camera:
    """Source, detector centre and the detector's image axes (unit vectors in world coordinates)."""

    source: np.ndarray  # (3,)
    direction: np.ndarray  # unit beam direction, source -> detector
    right: np.ndarray  # world direction of increasing image column
    down: np.ndarray  # world direction of increasing image row
    mirrored: bool
    sdd: float
    sod: float
    pixel_mm: float  # pixel pitch in the isocenter plane
    size: int

    def targets(self) -> np.ndarray:
        """(size*size, 3) detector pixel centres, row-major (row 0 = top of the image)."""
        n = self.size
        offsets = (np.arange(n) - (n - 1) / 2.0) * self.pixel_mm * (self.sdd / self.sod)
        centre = self.source + self.sdd * self.direction
        rows = offsets[:, None, None] * self.down[None, None, :]
        cols = offsets[None, :, None] * self.right[None, None, :]
        return (centre + rows + cols).reshape(-1, 3)

    def project(self, points: np.ndarray) -> np.ndarray:
        """World points (..., 3) -> image (col, row) pixel coordinates (pixel centres at integers)."""
        rel = np.asarray(points, dtype=np.float64) - self.source
        depth = rel @ self.direction
        scale = self.sdd / depth / (self.pixel_mm * self.sdd / self.sod)
        col = (rel @ self.right) * scale + (self.size - 1) / 2.0
        row = (rel @ self.down) * scale + (self.size - 1) / 2.0
        return np.stack([col, row], axis=-1)


def detector_pixel_mm(pose: dict, size: int) -> float:
    """A render's pixel pitch on the detector (a pose as the manifest stores it): the isocenter-plane pitch
    (fov / size) times the magnification sdd / sod. Tip errors in mm use it."""
    return pose["fov_mm"] / size * pose["sdd_mm"] / pose["sod_mm"]


def camera(pose: CArmPose, size: int) -> Camera:
    """The rays' geometry for ``pose`` with a ``size`` x ``size`` detector, display convention applied."""
    if pose.base not in ("AP", "PA"):
        raise ValueError(f"pose base must be 'AP' or 'PA', got {pose.base!r}")
    if not 0 < pose.sod_mm < pose.sdd_mm:
        raise ValueError(f"need 0 < sod ({pose.sod_mm}) < sdd ({pose.sdd_mm})")
    if size < 2 or pose.fov_mm <= 0:
        raise ValueError(f"bad detector: size {size}, fov {pose.fov_mm} mm")
    direction = -ANTERIOR if pose.base == "AP" else ANTERIOR
    direction = _rotate(direction, SUPERIOR, pose.primary_deg)
    tilt_axis = np.cross(direction, SUPERIOR)
    tilt_axis /= np.linalg.norm(tilt_axis)
    # positive secondary = cranial: the beam gains a superior component (detector toward the head)
    direction = _rotate(direction, tilt_axis, pose.secondary_deg)
    direction /= np.linalg.norm(direction)
    up = SUPERIOR - np.dot(SUPERIOR, direction) * direction
    up /= np.linalg.norm(up)
    right = np.cross(direction, up)  # the right-hand side as seen from the source
    toward_left = float(np.dot(right, PATIENT_LEFT))
    mirrored = toward_left < 0 if abs(toward_left) > _LATERAL_BAND else float(np.dot(right, ANTERIOR)) < 0
    if mirrored:
        right = -right
    iso = np.asarray(pose.isocenter, dtype=np.float64)
    return Camera(source=iso - pose.sod_mm * direction, direction=direction, right=right, down=-up,
                  mirrored=mirrored, sdd=pose.sdd_mm, sod=pose.sod_mm, pixel_mm=pose.fov_mm / size, size=size)


@dataclass(frozen=True)
class ViewFamily:
    """A standard view and the spread of C-arm poses around it.

    ``primary`` / ``secondary`` are ranges in degrees; ``signed_primary`` / ``signed_secondary`` draw the
    magnitude from the range and then a random sign (left and right laterals; pelvic inlet and outlet).
    ``anchors`` are the isocenter candidates (``CTVolume.anchors`` names): the family is only drawn for a
    body that has one of them; None aims at any anchor; ``spread_mm`` scatters the isocenter around it.
    """

    share: float
    base: str
    primary: tuple[float, float]
    secondary: tuple[float, float]
    fov: tuple[float, float]
    anchors: tuple[str, ...] | None = None
    signed_primary: bool = False
    signed_secondary: bool = False
    spread_mm: float = 20.0  # standard deviation of the isocenter around its anchor, per axis


# Chest-radiograph-like PA views get a large share because many real images are PA chest radiographs. The
# surgical views (pelvis, inlet / outlet, lumbar spine, hip) exist for bodies whose labels reach there; the
# oblique family covers any C-arm pose of yaw +-90 and tilt +-30 degrees around any anchor.
VIEW_FAMILIES = {
    "pa_chest": ViewFamily(0.35, "PA", (-8, 8), (-8, 8), (260, 330), ("chest",), spread_mm=10.0),
    "ap_fluoro": ViewFamily(0.25, "AP", (-45, 45), (-30, 30), (180, 320)),
    "pa_fluoro": ViewFamily(0.2, "PA", (-45, 45), (-30, 30), (180, 320)),
    "lateral": ViewFamily(0.2, "AP", (75, 105), (-15, 15), (220, 330), signed_primary=True),
    "oblique": ViewFamily(0.1, "AP", (-90, 90), (-30, 30), (180, 320)),
    "ap_pelvis": ViewFamily(0.15, "AP", (-15, 15), (-10, 10), (260, 340), ("pelvis",)),
    "pelvic_inlet_outlet": ViewFamily(0.1, "AP", (-15, 15), (20, 40), (240, 330), ("pelvis",),
                                      signed_secondary=True),
    "ap_lumbar": ViewFamily(0.15, "AP", (-20, 20), (-15, 15), (180, 280), ("lumbar spine",)),
    "lateral_lumbar": ViewFamily(0.1, "AP", (75, 105), (-15, 15), (200, 300), ("lumbar spine",),
                                 signed_primary=True),
    "hip": ViewFamily(0.15, "AP", (-30, 30), (-15, 15), (150, 240), ("left hip", "right hip")),
}


def sample_pose(rng: np.random.Generator, anchors: dict[str, np.ndarray], family: str | None = None,
                z_range: tuple[float, float] | None = None) -> CArmPose:
    """Random C-arm pose around a standard view aimed at one of the CT's ``anchors`` (name -> world point).

    ``anchors`` must contain "chest" (used by chest-radiograph-like views); other entries (structure
    centroids) are isocenter candidates for fluoroscopy-like views, and the surgical families are drawn only
    where their anchors exist. ``z_range`` (the CT's head-foot extent in world mm) keeps the field of view
    inside the scanned range where it fits, so that the CT's truncation edge does not cut across the image.
    (The bundled CT spans 333 mm head to foot, which is why chest-radiograph-like views stop at a 330 mm
    field of view.)
    """
    def aims(view: ViewFamily) -> list[str]:
        return sorted(anchors) if view.anchors is None else [a for a in view.anchors if a in anchors]

    if family is None:
        names = [n for n, view in VIEW_FAMILIES.items() if aims(view)]
        shares = np.array([VIEW_FAMILIES[n].share for n in names])
        family = names[int(rng.choice(len(names), p=shares / shares.sum()))]
    if family not in VIEW_FAMILIES:
        raise ValueError(f"unknown view family {family!r}; known: {', '.join(VIEW_FAMILIES)}")
    view = VIEW_FAMILIES[family]
    candidates = aims(view)
    if not candidates:
        raise ValueError(f"view family {family!r} aims at {view.anchors}, which this body does not have")
    primary_deg = float(rng.uniform(*view.primary))
    if view.signed_primary and rng.random() < 0.5:
        primary_deg = -primary_deg
    secondary_deg = float(rng.uniform(*view.secondary))
    if view.signed_secondary and rng.random() < 0.5:
        secondary_deg = -secondary_deg
    sdd = float(rng.uniform(900, 1300))
    sod = float(sdd * rng.uniform(0.6, 0.78))
    fov_mm = float(rng.uniform(*view.fov))
    iso = anchors[candidates[int(rng.integers(len(candidates)))]] + rng.normal(0, view.spread_mm, 3)
    if z_range is not None:
        half = 0.55 * fov_mm
        low, high = z_range[0] + half, z_range[1] - half
        iso[2] = float(np.clip(iso[2], low, high)) if low <= high else (z_range[0] + z_range[1]) / 2
    return CArmPose(base=view.base, primary_deg=primary_deg, secondary_deg=secondary_deg, sdd_mm=sdd,
                    sod_mm=sod, fov_mm=fov_mm, isocenter=tuple(float(v) for v in iso), family=family)
