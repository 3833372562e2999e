"""Procedural surgical tools, projected analytically into the DRR.

Why analytic projection instead of voxel insertion: X-ray line integrals add, so a tool contributes
exactly (path length of each detector ray through the tool) x (its attenuation), on the same rays as
the DRR. Computing that path length in closed form for cylinders (wires, tubes, screws, needles) and
boxes (plates) keeps sub-millimetre guidewires visible, which a 2.5 mm voxel grid would erase or blur
into a thick bar, and it costs milliseconds instead of re-voxelising the volume per view.

Structures thinner than a detector pixel would fall between the pixel-centre rays and appear dotted, so
they are drawn with an effective radius of about half a pixel and their attenuation is scaled by the
ratio of cross-sections: the projected "mass" per unit length stays that of the real wire (as a
detector pixel would integrate it) and the mask marks every pixel the wire crosses.

Attenuations are multiples of water (0 HU) at diagnostic energies, randomised per instance:
stainless steel / nitinol ~40-70x, titanium ~10-30x, barium-loaded or braided catheters ~4-8x, PVC tube
walls ~1.5-2.5x with a radiopaque stripe ~10-20x (steel at 60 keV is ~45x water).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import ANTERIOR, PATIENT_LEFT, SUPERIOR, Camera

TOOL_NAMES = ("guidewire", "catheter", "k-wire", "pedicle screw", "needle", "plate", "endotracheal tube",
              "nasogastric tube", "central venous catheter")
SUBPIXEL_RADIUS = 0.6  # effective radius of thin parts, in isocenter pixels


@dataclass(frozen=True)
class Cylinder:
    """A straight (optionally hollow) cylinder from ``p0`` to ``p1``; ``mu`` relative to water."""

    p0: np.ndarray
    p1: np.ndarray
    radius: float
    mu: float
    inner_radius: float = 0.0


@dataclass(frozen=True)
class Box:
    """An oriented box: ``axes`` rows are unit vectors, ``half`` the half-sizes along them (mm)."""

    center: np.ndarray
    axes: np.ndarray
    half: np.ndarray
    mu: float


@dataclass
class Tool:
    name: str
    parts: list = field(default_factory=list)


def _chord(source: np.ndarray, dirs: np.ndarray, p0: np.ndarray, p1: np.ndarray, radius: float) -> np.ndarray:
    """Length (in ray-parameter units, t in [0, 1]) of each ray source + t*dir inside a solid cylinder."""
    axis = p1 - p0
    length = float(np.linalg.norm(axis))
    w = axis / length
    o = source - p0
    dw = dirs @ w
    ow = float(o @ w)
    d_perp = dirs - dw[:, None] * w
    o_perp = o - ow * w
    a = np.einsum("ij,ij->i", d_perp, d_perp)
    b = 2.0 * (d_perp @ o_perp)
    c = float(o_perp @ o_perp) - radius * radius
    disc = b * b - 4 * a * c
    ok = (disc > 0) & (a > 1e-12)
    sq = np.sqrt(np.where(ok, disc, 0.0))
    a_safe = np.where(ok, a, 1.0)
    t_in, t_out = (-b - sq) / (2 * a_safe), (-b + sq) / (2 * a_safe)
    # clip to the slab 0 <= (o + t d).w <= length
    with np.errstate(divide="ignore", invalid="ignore"):
        s0, s1 = (0.0 - ow) / dw, (length - ow) / dw
    lo, hi = np.minimum(s0, s1), np.maximum(s0, s1)
    parallel = np.abs(dw) < 1e-12
    inside_slab = (ow >= 0) & (ow <= length)
    lo = np.where(parallel, -np.inf if inside_slab else np.inf, lo)
    hi = np.where(parallel, np.inf if inside_slab else -np.inf, hi)
    t0 = np.maximum.reduce([t_in, lo, np.zeros_like(lo)])
    t1 = np.minimum.reduce([t_out, hi, np.ones_like(hi)])
    return np.where(ok, np.clip(t1 - t0, 0.0, None), 0.0)


def _box_chord(source: np.ndarray, dirs: np.ndarray, box: Box) -> np.ndarray:
    o = (source - box.center) @ box.axes.T
    d = dirs @ box.axes.T
    with np.errstate(divide="ignore", invalid="ignore"):
        s0, s1 = (-box.half - o) / d, (box.half - o) / d
    lo, hi = np.minimum(s0, s1), np.maximum(s0, s1)
    parallel = np.abs(d) < 1e-12
    inside = np.abs(o) <= box.half
    lo = np.where(parallel, np.where(inside, -np.inf, np.inf), lo)
    hi = np.where(parallel, np.where(inside, np.inf, -np.inf), hi)
    t0 = np.maximum(lo.max(1), 0.0)
    t1 = np.minimum(hi.min(1), 1.0)
    return np.clip(t1 - t0, 0.0, None)


def project_tool(tool: Tool, cam: Camera, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) attenuation line integral in water-mm and (N,) bool hit mask of ``tool`` for the camera's rays."""
    dirs = targets - cam.source
    ray_mm = np.linalg.norm(dirs, axis=1)
    attenuation = np.zeros(len(targets))
    hit = np.zeros(len(targets), dtype=bool)
    min_radius = SUBPIXEL_RADIUS * cam.pixel_mm
    for part in tool.parts:
        if isinstance(part, Box):
            chord = _box_chord(cam.source, dirs, part) * ray_mm
            attenuation += part.mu * chord
        else:
            area = np.pi * (part.radius ** 2 - part.inner_radius ** 2)
            if part.radius < min_radius or part.inner_radius < min_radius:
                # unresolvable wall or wire: a solid cylinder of the same projected mass per unit length
                radius = max(part.radius, min_radius)
                chord = _chord(cam.source, dirs, part.p0, part.p1, radius) * ray_mm
                attenuation += part.mu * area / (np.pi * radius ** 2) * chord
            else:
                chord = _chord(cam.source, dirs, part.p0, part.p1, part.radius) * ray_mm
                inner = _chord(cam.source, dirs, part.p0, part.p1, part.inner_radius) * ray_mm
                attenuation += part.mu * (chord - inner)
        hit |= chord > 0
    return attenuation, hit


# ---------------------------------------------------------------- placement -------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _smooth(points: np.ndarray, passes: int = 2) -> np.ndarray:
    for _ in range(passes):
        if len(points) < 3:
            break
        points = np.concatenate([points[:1], (points[:-2] + 2 * points[1:-1] + points[2:]) / 4, points[-1:]])
    return points


def _resample(points: np.ndarray, step_mm: float) -> np.ndarray:
    """Points along the polyline every ``step_mm`` (keeps both ends)."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    dist = np.concatenate([[0.0], np.cumsum(seg)])
    if dist[-1] < 1e-6:
        return points[:1]
    s = np.append(np.arange(0.0, dist[-1], step_mm), dist[-1])
    return np.stack([np.interp(s, dist, points[:, k]) for k in range(3)], axis=1)


def _wiggle(rng: np.random.Generator, points: np.ndarray, amplitude_mm: float) -> np.ndarray:
    noise = rng.normal(0, amplitude_mm, points.shape)
    noise[0] = noise[-1] = 0
    return points + _smooth(noise, passes=4)


def _tube(points: np.ndarray, radius: float, mu: float, inner: float = 0.0) -> list[Cylinder]:
    return [Cylinder(points[i], points[i + 1], radius, mu, inner) for i in range(len(points) - 1)
            if np.linalg.norm(points[i + 1] - points[i]) > 1e-6]


def _j_tip(rng: np.random.Generator, path: np.ndarray, radius_mm: float) -> np.ndarray:
    """Append a curled tip (a J or pigtail): an arc in the plane of the end tangent and a random normal."""
    tangent = _unit(path[-1] - path[-2])
    normal = _unit(np.cross(tangent, rng.normal(size=3)))
    angles = np.linspace(0, rng.uniform(np.pi * 0.8, np.pi * 1.6), 12)[1:]
    centre = path[-1] + normal * radius_mm
    curl = centre - normal * radius_mm * np.cos(angles)[:, None] + tangent * radius_mm * np.sin(angles)[:, None]
    return np.concatenate([path, curl])


def _spine_points(ct) -> np.ndarray:
    """Vertebral body centres (T1..L5) from head to feet, from the label map."""
    pts = [ct.centroid([i]) for i in range(43, 26, -1)]
    return np.array([p for p in pts if p is not None]).reshape(-1, 3)


def _vascular_route(rng: np.random.Generator, ct) -> np.ndarray | None:
    """A plausible endovascular path: IVC -> SVC (venous) or along the descending aorta (arterial)."""
    venous = np.concatenate([ct.centerline([62]), ct.centerline([63])]) if rng.random() < 0.4 else np.zeros((0, 3))
    if len(venous) >= 4:
        path = venous[::-1]  # from the feet upward
    else:
        spine = _spine_points(ct)
        if len(spine) < 3:
            return None
        path = spine[::-1] + PATIENT_LEFT * rng.uniform(12, 25) + ANTERIOR * rng.uniform(18, 30)
        keep = rng.integers(max(1, len(path) // 2), len(path) + 1)
        path = path[:keep]
    return _wiggle(rng, _resample(_smooth(path), 6.0), 1.5)


def _guidewire(rng, ct) -> Tool | None:
    path = _vascular_route(rng, ct)
    if path is None:
        return None
    if rng.random() < 0.6:
        path = _j_tip(rng, path, rng.uniform(3, 6))
    return Tool("guidewire", _tube(path, rng.uniform(0.3, 0.5), rng.uniform(40, 70)))


def _catheter(rng, ct) -> Tool | None:
    path = _vascular_route(rng, ct)
    if path is None:
        return None
    if rng.random() < 0.5:
        path = _j_tip(rng, path, rng.uniform(5, 10))
    radius = rng.uniform(0.8, 1.3)
    return Tool("catheter", _tube(path, radius, rng.uniform(4.0, 8.0), inner=radius * rng.uniform(0.55, 0.75)))


def _bone_target(rng, ct) -> np.ndarray | None:
    present = ct.present_ids()
    bones = [i for i in (*range(27, 44), 69, 70, 71, 72, 73, 74, 116, *range(92, 116)) if i in present]
    return None if not bones else ct.centroid([bones[int(rng.integers(len(bones)))]])


def _femoral_neck_kwire(rng, ct) -> Tool | None:
    """A guide wire for a cannulated hip screw: from the lateral femoral cortex up the neck into the head."""
    sides = [(name, 1.0 if name == "left hip" else -1.0) for name in ("left hip", "right hip") if name in ct.anchors]
    if not sides:
        return None
    name, side = sides[int(rng.integers(len(sides)))]
    head = ct.anchors[name] + rng.normal(0, 4, 3)
    neck_shaft = np.radians(rng.uniform(35, 50))  # the wire's angle below the horizontal (neck-shaft ~130 deg)
    outward = _unit(PATIENT_LEFT * side * np.cos(neck_shaft) - SUPERIOR * np.sin(neck_shaft)
                    + ANTERIOR * rng.normal(0, 0.15))
    length = rng.uniform(150, 230)  # tip in the head; the rest runs out through the thigh into the air
    return Tool("k-wire", [Cylinder(head + outward * length, head, rng.uniform(1.0, 1.6), rng.uniform(40, 60))])


def _kwire(rng, ct) -> Tool | None:
    if rng.random() < 0.6:
        wire = _femoral_neck_kwire(rng, ct)
        if wire is not None:
            return wire
    target = _bone_target(rng, ct)
    if target is None:
        return None
    direction = _unit(rng.normal(size=3))
    length = rng.uniform(100, 180)
    start = target - direction * length * rng.uniform(0.3, 0.7)
    return Tool("k-wire", [Cylinder(start, start + direction * length, rng.uniform(0.8, 1.25), rng.uniform(40, 60))])


def _pedicle_screws(rng, ct) -> Tool | None:
    present = ct.present_ids()
    levels = [i for i in range(27, 44) if i in present]
    if not levels:
        return None
    first = int(rng.integers(len(levels)))
    chosen = levels[first:first + int(rng.integers(1, 4))]
    parts = []
    mu = rng.uniform(12, 30)
    for level in chosen:
        centre = ct.centroid([level])
        for side in (-1.0, 1.0):
            lateral = PATIENT_LEFT * side
            entry = centre - ANTERIOR * rng.uniform(18, 28) + lateral * rng.uniform(12, 20)
            convergence = np.radians(rng.uniform(8, 22))
            direction = _unit(ANTERIOR * np.cos(convergence) - lateral * np.sin(convergence)
                              + SUPERIOR * rng.normal(0, 0.08))
            length = rng.uniform(35, 50)
            parts.append(Cylinder(entry, entry + direction * length, rng.uniform(2.5, 3.5), mu))
            parts.append(Cylinder(entry - direction * rng.uniform(9, 13), entry, rng.uniform(4.5, 6.0), mu))
    return Tool("pedicle screw", parts)


def _needle(rng, ct) -> Tool | None:
    candidates = [a for k, a in sorted(ct.anchors.items()) if k != "chest"]
    bone = _bone_target(rng, ct)
    if bone is not None:
        candidates.append(bone)
    if not candidates:
        return None
    tip = candidates[int(rng.integers(len(candidates)))] + rng.normal(0, 10, 3)
    approach = _unit(-ANTERIOR * rng.uniform(0.3, 1.0) + PATIENT_LEFT * rng.normal(0, 0.7)
                     + SUPERIOR * rng.normal(0, 0.3))
    length = rng.uniform(90, 150)
    hub_start = tip + approach * length
    mu = rng.uniform(40, 60)
    return Tool("needle", [Cylinder(tip, hub_start, rng.uniform(0.45, 0.7), mu),
                           Cylinder(hub_start, hub_start + approach * rng.uniform(12, 20), rng.uniform(3.0, 4.0),
                                    rng.uniform(1.5, 2.5))])


def _plate(rng, ct) -> Tool | None:
    present = ct.present_ids()
    options = []
    for clav in (73, 74):
        if clav in present:
            options.append((ct.centroid([clav]), PATIENT_LEFT, ANTERIOR))
    if 116 in present:
        options.append((ct.centroid([116]), SUPERIOR, ANTERIOR))
    spine = _spine_points(ct)
    if len(spine):
        options.append((spine[int(rng.integers(len(spine)))] - ANTERIOR * 35, SUPERIOR, -ANTERIOR))
    for rib in [i for i in range(92, 116) if i in present]:
        options.append((ct.centroid([rib]), _unit(ANTERIOR + SUPERIOR * rng.normal(0, 0.3)), PATIENT_LEFT))
    if not options:
        return None
    centre, long_axis, normal = options[int(rng.integers(len(options)))]
    long_axis = _unit(long_axis + rng.normal(0, 0.1, 3))
    normal = _unit(normal - np.dot(normal, long_axis) * long_axis)
    axes = np.stack([long_axis, np.cross(normal, long_axis), normal])
    half = np.array([rng.uniform(30, 70), rng.uniform(5, 7), rng.uniform(1.2, 2.0)])
    return Tool("plate", [Box(centre + normal * rng.uniform(5, 12), axes, half, rng.uniform(10, 22))])


def _airway_tube(rng, name: str, path: np.ndarray, outer: float, stripe_mu: tuple[float, float]) -> Tool:
    path = _resample(_smooth(path), 8.0)
    inner = outer * rng.uniform(0.7, 0.8)
    parts = _tube(path, outer, rng.uniform(1.5, 2.5), inner=inner)
    # the radiopaque line moulded into the tube wall
    offset = _unit(np.cross(path[-1] - path[0], rng.normal(size=3))) * (outer + inner) / 2
    parts += _tube(path + offset, rng.uniform(0.4, 0.7), rng.uniform(*stripe_mu))
    return Tool(name, parts)


def _endotracheal_tube(rng, ct) -> Tool | None:
    trachea = ct.centerline([16])
    if len(trachea) < 4:
        return None
    stop = int(len(trachea) * rng.uniform(0.45, 0.8))  # tip a few cm above the carina
    mouth = trachea[0] + SUPERIOR * 80 + ANTERIOR * 60
    path = np.concatenate([[mouth, trachea[0] + SUPERIOR * 30 + ANTERIOR * 15], trachea[:stop]])
    return _airway_tube(rng, "endotracheal tube", path, rng.uniform(4.5, 5.5), (10, 20))


def _nasogastric_tube(rng, ct) -> Tool | None:
    oesophagus = ct.centerline([15])
    if len(oesophagus) < 4:
        return None
    path = np.concatenate([[oesophagus[0] + SUPERIOR * 60 + ANTERIOR * 30], oesophagus])
    stomach = ct.centroid([6])
    if stomach is not None:
        path = np.concatenate([path, [stomach + rng.normal(0, 10, 3)]])
    centerline = _wiggle(rng, _resample(path, 8.0), 1.0)
    return _airway_tube(rng, "nasogastric tube", centerline, rng.uniform(2.0, 3.0), (10, 20))


def _central_venous_catheter(rng, ct) -> Tool | None:
    svc = ct.centerline([62])
    if len(svc) < 2:
        return None
    side = 1.0 if rng.random() < 0.7 else -1.0  # right-sided lines are commoner
    clavicle = ct.centroid([74 if side > 0 else 73])
    vein = ct.centroid([60 if side > 0 else 59])
    start = clavicle if clavicle is not None else svc[0] - PATIENT_LEFT * side * 60 + SUPERIOR * 20
    route = [start + SUPERIOR * 10, *([vein] if vein is not None else []), *svc]
    path = _wiggle(rng, _resample(_smooth(np.array(route)), 6.0), 1.0)
    radius = rng.uniform(0.8, 1.2)
    return Tool("central venous catheter", _tube(path, radius, rng.uniform(4.0, 8.0), inner=radius * 0.6))


MAKERS = {"guidewire": _guidewire, "catheter": _catheter, "k-wire": _kwire, "pedicle screw": _pedicle_screws,
          "needle": _needle, "plate": _plate, "endotracheal tube": _endotracheal_tube,
          "nasogastric tube": _nasogastric_tube, "central venous catheter": _central_venous_catheter}


def make_tool(name: str, rng: np.random.Generator, ct) -> Tool | None:
    """One procedurally placed tool of kind ``name`` for ``ct`` (None when its anatomy is missing)."""
    if name not in MAKERS:
        raise ValueError(f"unknown tool {name!r}; known: {', '.join(TOOL_NAMES)}")
    return MAKERS[name](rng, ct)


def sample_tools(rng: np.random.Generator, ct, probability: float = 0.5, max_tools: int = 3) -> list[Tool]:
    """A random set of distinct tools for one view (none with probability 1 - ``probability``)."""
    if rng.random() >= probability:
        return []
    count = int(rng.integers(1, max_tools + 1))
    names = rng.choice(len(TOOL_NAMES), size=count, replace=False)
    tools = [make_tool(TOOL_NAMES[int(i)], rng, ct) for i in names]
    return [t for t in tools if t is not None]
