"""Swin backbone (timm, random init, 1 input channel) + FPN-style fusion + SAM's neck.

The stages at and below the embedding stride are projected to 256 channels, upsampled to the
embedding grid and summed, so the embedding carries the deep stages' global context (telling the
left lung from the right needs the whole chest in view), then SAM's neck (1x1 conv, LayerNorm2d,
3x3 conv, LayerNorm2d) shapes it into the decoder's 256-channel embedding.
"""
from __future__ import annotations

import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from timm.models.swin_transformer import SwinTransformer
from torch import Tensor, nn

from .config import FluoroSAMConfig


class SwinImageEncoder(nn.Module):
    def __init__(self, config: FluoroSAMConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = SwinTransformer(
            img_size=config.image_size, patch_size=config.patch_size, in_chans=1, num_classes=0,
            embed_dim=config.swin_embed_dim, depths=config.swin_depths, num_heads=config.swin_heads,
            window_size=config.window_size, drop_path_rate=config.drop_path_rate, strict_img_size=True)
        # The classifier's final norm is unused: intermediates are taken before it.
        self.backbone.norm = nn.Identity()
        strides = [config.patch_size * 2 ** i for i in range(len(config.swin_depths))]
        channels = [config.swin_embed_dim * 2 ** i for i in range(len(config.swin_depths))]
        self.stage_indices = [i for i, s in enumerate(strides) if s >= config.embed_stride]
        self.laterals = nn.ModuleList(nn.Conv2d(channels[i], config.embed_dim, kernel_size=1)
                                      for i in self.stage_indices)
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.embed_dim, kernel_size=1, bias=False),
            LayerNorm2d(config.embed_dim),
            nn.Conv2d(config.embed_dim, config.embed_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.embed_dim),
        )

    def forward(self, images: Tensor) -> Tensor:
        """(B, 1, S, S) normalized images -> (B, 256, S/stride, S/stride) embeddings."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[2:] != (size, size):
            raise ValueError(f"expected images of shape (B, 1, {size}, {size}), got {tuple(images.shape)}")
        features = self.backbone.forward_intermediates(images, indices=self.stage_indices, intermediates_only=True)
        hw = self.config.embed_hw
        fused = None
        for feature, lateral in zip(features, self.laterals):
            x = lateral(feature)
            if x.shape[-1] != hw:
                x = F.interpolate(x, size=(hw, hw), mode="bilinear", align_corners=False)
            fused = x if fused is None else fused + x
        return self.neck(fused)
