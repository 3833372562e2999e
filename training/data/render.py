"""One synthetic view: DRR + a mask for every vocabulary class, from a CT, a pose and optional tools."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluorosam_common.vocabulary import Vocabulary

from .ct import CTVolume, render_line_integrals
from .geometry import CArmPose, camera, sample_pose
from .tools import Tool, project_tool, sample_tools


@dataclass
class RenderedView:
    image: np.ndarray  # (H, W) float32 line integrals: bone bright, patient's left on the image's right
    masks: np.ndarray  # (C, H, W) bool, C = len(vocabulary.classes) in vocabulary order
    pose: CArmPose
    tools: list[str]


def _in_volume(label_ids, n_labels: int) -> list[int]:
    """The label ids that this CT's label volume can contain (0 is background)."""
    return [i for i in label_ids if 0 < i < n_labels]


def hiding_plan(vocabulary: Vocabulary) -> dict[int, list[int]]:
    """Class index -> indices of the classes that hide it, for every class with ``hidden_by``."""
    index = {name: i for i, name in enumerate(vocabulary.names)}
    return {index[name]: [index[h] for h in hiders] for name, hiders in vocabulary.hiding_rules.items()}


def apply_hiding(masks: np.ndarray, plan: dict[int, list[int]]) -> np.ndarray:
    """Plain projections (..., C, H, W) bool -> a copy with each planned class cut wherever one of its hiding
    classes' plain projections is (the one place ``hidden_by`` is applied: renders and relabelling)."""
    out = masks.copy()
    for target, hiders in plan.items():
        out[..., target, :, :] &= ~masks[..., hiders, :, :].any(-3)
    return out


class ClassMasker:
    """Turns per-label ray hits into vocabulary-ordered masks: anatomy = its label, group = union, tool = own.

    A class with ``hidden_by`` loses every pixel whose ray also meets one of those classes.
    """

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary
        self.names = vocabulary.names
        self._hiding = hiding_plan(vocabulary)

    def masks(self, hits: np.ndarray, tool_masks: dict[str, np.ndarray]) -> np.ndarray:
        n_labels = hits.shape[0]
        out = np.zeros((len(self.names), *hits.shape[1:]), dtype=bool)
        for c, cls in enumerate(self.vocabulary.classes):
            if cls.kind == "tool":
                if cls.name in tool_masks:
                    out[c] = tool_masks[cls.name]
            else:
                ids = _in_volume(cls.label_ids, n_labels)
                if ids:
                    out[c] = hits[ids].any(0)
        return apply_hiding(out, self._hiding)


def render_view(ct: CTVolume, pose: CArmPose, size: int, masker: ClassMasker,
                tools: list[Tool] = ()) -> RenderedView:
    """Render ``pose`` at ``size`` px: the DRR with the tools' attenuation added, and all class masks."""
    cam = camera(pose, size)
    targets = cam.targets()
    image, hits = render_line_integrals(ct, cam.source, targets)
    image = image.numpy().astype(np.float64)
    tool_masks: dict[str, np.ndarray] = {}
    for tool in tools:
        attenuation, hit = project_tool(tool, cam, targets)
        image += attenuation * ct.water_density
        tool_masks[tool.name] = tool_masks.get(tool.name, np.zeros(len(targets), bool)) | hit
    hits = hits.numpy().reshape(-1, size, size)
    tool_masks = {k: v.reshape(size, size) for k, v in tool_masks.items()}
    return RenderedView(image=image.reshape(size, size).astype(np.float32),
                        masks=masker.masks(hits, tool_masks), pose=pose, tools=sorted(tool_masks))


def render_random_view(ct: CTVolume, seed: int, size: int, masker: ClassMasker,
                       tool_probability: float = 0.5) -> RenderedView:
    """The view of ``seed``: pose and tools drawn from one generator, so a seed always gives the same view."""
    rng = np.random.default_rng(seed)
    pose = sample_pose(rng, ct.anchors, z_range=ct.z_range)
    tools = sample_tools(rng, ct, probability=tool_probability)
    return render_view(ct, pose, size, masker, tools)
