"""Swin backbone (timm, random init, 1 input channel) + FPN-style fusion + SAM's neck.

The stages at and below the embedding stride are projected to 256 channels, upsampled to the
embedding grid and summed, so the embedding carries the deep stages' global context (telling the
left lung from the right needs the whole chest in view), then SAM's neck (1x1 conv, LayerNorm2d,
3x3 conv, LayerNorm2d) shapes it into the decoder's 256-channel embedding.

With ``high_res_features`` the stages at 1/2 and 1/4 of the embedding stride also leave the encoder
(LayerNorm2d then a 1x1 projection, as SAM 2's ``conv_s0``/``conv_s1``; the norm because the raw
Swin stages run at std ~5-25, whose gradients would dominate the clipped global norm) for the
decoder's mask upscaling. The projections start at zero, so a checkpoint without them warm-starts
to exactly its old masks.

With ``fine_features`` two more maps leave it for the decoder's fine path: the stride-2 stage (the patch-2
stem's first Swin stage; LayerNorm2d + 1x1 projection as above) and a two-layer 3x3 convolution of the input
image at full resolution. Both are per image, so a held frame reuses them like the embedding.
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
        # Coarse to fine: the stage at embed_stride/2, then at embed_stride/4.
        self.high_res_indices = [strides.index(config.embed_stride // f) for f in (2, 4)] \
            if config.high_res_features else []
        self.high_res = nn.ModuleList(
            nn.Sequential(LayerNorm2d(channels[i]), nn.Conv2d(channels[i], out_channels, kernel_size=1))
            for i, (out_channels, _) in zip(self.high_res_indices, config.high_res_shapes))
        for projection in self.high_res:
            nn.init.zeros_(projection[1].weight)
            nn.init.zeros_(projection[1].bias)
        self.fine_index = strides.index(2) if config.fine_features else None
        if config.fine_features:
            (stride2_channels, _), (full_channels, _) = config.fine_shapes
            self.stride2 = nn.Sequential(LayerNorm2d(channels[self.fine_index]),
                                         nn.Conv2d(channels[self.fine_index], stride2_channels, kernel_size=1))
            self.full_res = nn.Sequential(nn.Conv2d(1, full_channels, kernel_size=3, padding=1), nn.GELU(),
                                          nn.Conv2d(full_channels, full_channels, kernel_size=3, padding=1))
        self.feature_indices = sorted(set(self.stage_indices) | set(self.high_res_indices)
                                      | ({self.fine_index} if config.fine_features else set()))

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """(B, 1, S, S) normalized images -> (embedding (B, 256, S/stride, S/stride), *high-res, *fine features)."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 1 or images.shape[2:] != (size, size):
            raise ValueError(f"expected images of shape (B, 1, {size}, {size}), got {tuple(images.shape)}")
        features = dict(zip(self.feature_indices, self.backbone.forward_intermediates(
            images, indices=self.feature_indices, intermediates_only=True)))
        hw = self.config.embed_hw
        fused = None
        for index, lateral in zip(self.stage_indices, self.laterals):
            x = lateral(features[index])
            if x.shape[-1] != hw:
                x = F.interpolate(x, size=(hw, hw), mode="bilinear", align_corners=False)
            fused = x if fused is None else fused + x
        high_res = tuple(projection(features[i]) for i, projection in zip(self.high_res_indices, self.high_res))
        fine = (self.stride2(features[self.fine_index]), self.full_res(images)) if self.config.fine_features else ()
        return (self.neck(fused), *high_res, *fine)
