"""Model sizes as plain dataclasses, so a checkpoint's ``model.json`` can rebuild the exact network.

``tiny`` trains on a laptop CPU and runs the default demo; ``base`` and ``large`` are GPU configs.
``large`` follows the FluoroSAM paper (Swin-L, 448 px, 256-channel embedding). The paper's public
code reaches a 64x64 embedding from 448 px with a stride-7 patch embedding, which does not tile
Swin's windows; we keep Swin's standard patch-4 stem and take the embedding at stride 8 (56x56),
the nearest grid that the hierarchy produces, with 4x upsampled masks of 224x224.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# Channels of the fine path at stride 2 and at the input: the decoder runs them once per prompt, over 16x and
# 64x the stride-4 grid's pixels, so they stay narrow (~20 M multiply-adds per prompt at 256 px).
FINE_CHANNELS = (16, 8)


@dataclass(frozen=True)
class FluoroSAMConfig:
    name: str
    image_size: int  # square model input side in pixels
    patch_size: int = 4
    swin_embed_dim: int = 48
    swin_depths: tuple[int, ...] = (2, 2, 4, 2)
    swin_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 8
    drop_path_rate: float = 0.1
    embed_stride: int = 8  # image embedding = image_size / embed_stride per side
    embed_dim: int = 256  # channels of the image embedding and of every prompt token (SAM's)
    # SAM 2's high-resolution features: backbone stages at 1/2 and 1/4 of the embedding stride are
    # added inside the decoder's mask upscaling, so mask edges follow the image instead of the grid.
    high_res_features: bool = False
    # The fine-structure path (ours, after HQ-SAM's early-feature fusion): the patch-2 stem's stride-2 stage
    # and a light convolution of the input itself refine the stride-4 mask features up to the input resolution,
    # so that a wire a pixel or two wide can be drawn at all (the 4x grid leaves it a quarter of a cell).
    # Needs high_res_features, a stride-2 stage (patch_size 2) and embed_stride 16 (a stride-4 mask grid).
    fine_features: bool = False
    text_encoder: str = "minilm"  # "minilm" (packaged, offline) | "clip" (needs clip_path)
    clip_path: str = ""  # local folder of a Hugging Face CLIP model, used only with text_encoder="clip"
    text_dim: int = 384  # sentence-embedding width of the frozen text encoder
    codebook_size: int = 512
    vq_commitment: float = 0.25
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_hidden_dim: int = 256
    # The IoU head also reads what each mask covers (see decoder.py; ``fluorosam fit-iou-head`` fits it on a
    # frozen checkpoint). False is SAM's token-only head, still the default: the first fit, on clean renders,
    # picked better masks on renders and worse ones on real films (docs/training_log.md).
    mask_aware_iou_head: bool = False
    mask_in_chans: int = 16
    # SAM's rule for its fourth (single-mask) output token: a prompt with at least this many clicks gets that
    # one mask (trained on multi-click rounds, see ``fluorosam train --single-mask-min-points``) instead of the
    # pick among the three ambiguity-aware masks. 0: never (the token is then untrained and unused).
    single_mask_min_points: int = 0
    # Text-only prompts (no clicks) answer with the single-mask token too (trained on text-only rounds, see
    # ``fluorosam train --single-mask-text-only``): a class name, unlike a lone click, names one structure, so
    # it needs no ambiguity-aware choice. A lone click keeps the pick among the three either way.
    single_mask_text_only: bool = False
    extra: dict = field(default_factory=dict)  # free-form notes carried into model.json

    def __post_init__(self) -> None:
        if self.image_size % self.embed_stride:
            raise ValueError(f"image_size {self.image_size} is not divisible by embed_stride {self.embed_stride}")
        deepest = self.patch_size * 2 ** (len(self.swin_depths) - 1)
        if self.embed_stride < self.patch_size or self.embed_stride > deepest:
            raise ValueError(f"embed_stride {self.embed_stride} outside the backbone's strides "
                             f"{self.patch_size}..{deepest}")
        if (self.image_size // deepest) % self.window_size and self.image_size // deepest > self.window_size:
            raise ValueError(f"window_size {self.window_size} does not tile the deepest stage "
                             f"({self.image_size // deepest} tokens per side)")
        if self.high_res_features and self.patch_size > self.embed_stride // 4:
            raise ValueError(f"high_res_features needs a backbone stage at stride {self.embed_stride // 4}; "
                             f"patch_size {self.patch_size} starts at stride {self.patch_size}")
        if self.fine_features and not (self.high_res_features and self.patch_size == 2 and self.embed_stride == 16):
            raise ValueError("fine_features refines the stride-4 mask grid at stride 2 and 1: it needs "
                             "high_res_features, a stride-2 stage (patch_size 2) and embed_stride 16")
        if self.single_mask_min_points < 0:
            raise ValueError(f"single_mask_min_points must be >= 0, got {self.single_mask_min_points}")
        if self.text_encoder not in ("minilm", "clip"):
            raise ValueError(f"text_encoder must be 'minilm' or 'clip', got {self.text_encoder!r}")

    @property
    def embed_hw(self) -> int:
        """Side of the image embedding grid."""
        return self.image_size // self.embed_stride

    @property
    def prompt_mask_hw(self) -> int:
        """Side of the mask features a dense (previous-mask) prompt is read at: 4x the embedding, as SAM."""
        return 4 * self.embed_hw

    @property
    def mask_hw(self) -> int:
        """Side of the mask logits the decoder returns and takes back as a mask prompt: 4x the embedding as
        SAM, or the input itself with ``fine_features``."""
        return self.image_size if self.fine_features else self.prompt_mask_hw

    @property
    def high_res_shapes(self) -> list[tuple[int, int]]:
        """(channels, side) of each high-resolution feature map, coarse to fine; empty when disabled.

        Channels match the decoder's upscaling stages (embed_dim/4 at 2x, embed_dim/8 at 4x the grid).
        """
        if not self.high_res_features:
            return []
        return [(self.embed_dim // 4, 2 * self.embed_hw), (self.embed_dim // 8, 4 * self.embed_hw)]

    @property
    def fine_shapes(self) -> list[tuple[int, int]]:
        """(channels, side) of the fine-structure features (stride 2, then the input's own); empty when disabled."""
        if not self.fine_features:
            return []
        return [(FINE_CHANNELS[0], self.image_size // 2), (FINE_CHANNELS[1], self.image_size)]

    @property
    def encoder_output_shapes(self) -> list[tuple[int, int]]:
        """(channels, side) of every tensor the image encoder hands the decoder: the embedding, the high-res
        features, then the fine ones. One definition for the model's checks, the export and the backends."""
        return [(self.embed_dim, self.embed_hw), *self.high_res_shapes, *self.fine_shapes]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["swin_depths"] = list(self.swin_depths)
        out["swin_heads"] = list(self.swin_heads)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FluoroSAMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FluoroSAMConfig fields {sorted(unknown)}")
        data = dict(data)
        for key in ("swin_depths", "swin_heads"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


CONFIGS: dict[str, FluoroSAMConfig] = {
    # 256 px, patch 2 -> Swin stages at stride 2/4/8/16 -> 16x16x256 embedding, 64x64 masks.
    # Why this shape: on a CPU the decoder cost grows with the embedding grid and the encoder cost with
    # the token count of its first stages. The patch-2 stem spends the compute in the encoder (~90 ms,
    # onnxruntime, 1 thread) and the 16x16 grid keeps a prompt's decode near 2 ms, so a prompt change
    # or a held frame costs ~1/24 of a new frame. (The stride-8, patch-4 model it replaced spent 30 ms
    # encoding and 8 ms per prompt decoding: a held frame saved only 4x.) The coarse grid drew masks in
    # 16-px steps that ignored edges, so the stride-8 and stride-4 stages also feed the mask upscaling
    # (high_res_features, as SAM 2): edges from the image at a few % of the decoder's cost.
    "tiny": FluoroSAMConfig(name="tiny", image_size=256, patch_size=2, swin_embed_dim=48, swin_depths=(2, 2, 2, 2),
                            swin_heads=(3, 6, 12, 24), window_size=8, embed_stride=16, codebook_size=512,
                            high_res_features=True),
    # Swin-B at 448 px -> 28x28 embedding (stride 16), 112x112 masks.
    "base": FluoroSAMConfig(name="base", image_size=448, swin_embed_dim=128, swin_depths=(2, 2, 18, 2),
                            swin_heads=(4, 8, 16, 32), window_size=7, drop_path_rate=0.3, embed_stride=16,
                            codebook_size=2048, high_res_features=True),
    # The paper's: Swin-L at 448 px, 8192 codes; embedding 56x56 at stride 8 (see module docstring).
    "large": FluoroSAMConfig(name="large", image_size=448, swin_embed_dim=192, swin_depths=(2, 2, 18, 2),
                             swin_heads=(6, 12, 24, 48), window_size=7, drop_path_rate=0.3, embed_stride=8,
                             codebook_size=8192),
}


def get_config(name: str) -> FluoroSAMConfig:
    """Look up a registered config by name, with a clear error for unknown names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}") from None
