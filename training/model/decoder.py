"""SAM's mask decoder, generalized to one image embedding PER PROMPT or one shared by all prompts.

SAM's ``MaskDecoder.predict_masks`` repeat-interleaves a single image embedding over the prompts.
Training batches several images, each with several prompts, so here the embedding may be
(N, C, h, w) (one per prompt) or (1, C, h, w), which broadcasts over the N prompts without a copy
(the dense prompt is added on top, which is the one per-prompt tensor SAM makes as well).

``high_res_features`` (SAM 2's decoder): feature maps at 2x and 4x the embedding grid, added after
each transposed convolution of the mask upscaling, also one per prompt or one shared.

``fine_channels`` (ours, the fine-structure path): two more transposed convolutions take the stride-4 mask
features to stride 2 and to the input, each adding that resolution's image features (the encoder's stride-2
stage, a convolution of the input); a second hypernetwork per output token reads them, and its logits are added
to the bilinearly upsampled stride-4 logits. Its last layer starts at zero: a warm start answers exactly as the
model it came from, at input resolution.

``mask_aware_iou``: SAM's IoU head reads only the IoU token, which never sees the masks it scores; on
X-rays it picked the best of the 3 masks little better than always taking the second one. The
mask-aware head (ours) also reads, per mask, the decoder's upscaled features averaged inside and
outside the soft mask, its area and its stability (area at logit > 1 over area at logit > -1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from torch import Tensor, nn


class MaskAwareIoUHead(nn.Module):
    """Predicted IoU of each mask from the IoU token plus pooled statistics of that mask.

    The masks and features enter detached: the head judges the masks and must not reshape them to be
    easier to judge.
    """

    def __init__(self, token_dim: int, feature_dim: int, num_masks: int, hidden_dim: int, depth: int = 3) -> None:
        super().__init__()
        self.mlp = MLP(token_dim + 2 * feature_dim + 2 + num_masks, hidden_dim, 1, depth)

    @staticmethod
    def inputs(iou_token: Tensor, mask_logits: Tensor, features: Tensor) -> Tensor:
        """iou_token (N, D), mask_logits (N, K, h, w), features (N or 1, C, h, w) -> MLP inputs (N, K, F)."""
        n, k = mask_logits.shape[:2]
        logits = mask_logits.detach().flatten(2)
        prob = logits.sigmoid()
        feats = features.detach().flatten(2)  # (N or 1, C, P)
        pixels = logits.shape[-1]
        area = prob.sum(-1, keepdim=True)
        inside_sum = prob @ feats.transpose(1, 2)  # (N, K, C), broadcasting a shared feature map
        outside_sum = feats.sum(-1)[:, None] - inside_sum
        inside = inside_sum / area.clamp_min(1e-3)
        outside = outside_sum / (pixels - area).clamp_min(1e-3)
        stability = ((logits > 1).sum(-1, keepdim=True).float() + 1) / ((logits > -1).sum(-1, keepdim=True).float() + 1)
        index = torch.eye(k, dtype=prob.dtype, device=prob.device).expand(n, k, k)
        return torch.cat([iou_token[:, None].expand(n, k, -1).to(prob.dtype), inside, outside, area / pixels,
                          stability, index], dim=-1)

    def forward(self, iou_token: Tensor, mask_logits: Tensor, features: Tensor) -> Tensor:
        """-> predicted IoU (N, K)."""
        return self.mlp(self.inputs(iou_token, mask_logits, features))[..., 0]


def _per_token(mlps: nn.ModuleList, tokens: Tensor) -> Tensor:
    """Each output token (N, K, D) through its own hypernetwork MLP -> (N, K, C)."""
    return torch.stack([mlp(tokens[:, i, :]) for i, mlp in enumerate(mlps)], dim=1)


class BatchedMaskDecoder(MaskDecoder):
    def __init__(self, *args, mask_aware_iou: bool = False, fine_channels: tuple[int, int] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mask_aware_iou = mask_aware_iou
        self.fine_channels = fine_channels
        if fine_channels:
            dim = kwargs["transformer_dim"]
            stride2, full = fine_channels
            self.fine_upscaling = nn.ModuleList([
                nn.ConvTranspose2d(dim // 8, stride2, kernel_size=2, stride=2), LayerNorm2d(stride2), nn.GELU(),
                nn.ConvTranspose2d(stride2, full, kernel_size=2, stride=2), nn.GELU()])
            self.fine_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, full, 3) for _ in range(self.num_mask_tokens))
            for mlp in self.fine_hypernetworks_mlps:
                nn.init.zeros_(mlp.layers[-1].weight)
                nn.init.zeros_(mlp.layers[-1].bias)
        if mask_aware_iou:
            dim = kwargs["transformer_dim"]
            self.iou_prediction_head = MaskAwareIoUHead(dim, dim // 8, self.num_mask_tokens,
                                                        kwargs.get("iou_head_hidden_dim", 256),
                                                        kwargs.get("iou_head_depth", 3))

    @torch.no_grad()
    def copy_mask_token(self, source: int, target: int) -> None:
        """Make output token ``target`` a copy of ``source`` (its embedding, hypernetwork MLP and IoU-head row).

        Warm-starts SAM's single-mask token 0, untrained while only the multimask output is used, from
        the ambiguity-aware mask it would otherwise have to learn from scratch to match.
        """
        if self.mask_aware_iou:
            raise ValueError("copy_mask_token handles SAM's token-only IoU head; the mask-aware head has no "
                             "per-token output row")
        self.mask_tokens.weight[target] = self.mask_tokens.weight[source]
        self.output_hypernetworks_mlps[target].load_state_dict(self.output_hypernetworks_mlps[source].state_dict())
        if self.fine_channels:
            self.fine_hypernetworks_mlps[target].load_state_dict(self.fine_hypernetworks_mlps[source].state_dict())
        last = self.iou_prediction_head.layers[-1]
        last.weight[target] = last.weight[source]
        last.bias[target] = last.bias[source]

    def predict_masks(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                      dense_prompt_embeddings: Tensor,
                      high_res_features: tuple[Tensor, ...] = ()) -> tuple[Tensor, Tensor]:
        n = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, n):
            raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {n} prompts; "
                             "pass one per prompt or one shared")
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        src = image_embeddings + dense_prompt_embeddings
        if src.shape[0] != n:  # shared embedding and shared (no-mask) dense prompt
            src = src.expand(n, -1, -1, -1)
        pos_src = image_pe.expand(n, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1: (1 + self.num_mask_tokens), :]

        src = src.transpose(1, 2).reshape(b, c, h, w)
        expected = 4 if self.fine_channels else 2
        if high_res_features and len(high_res_features) != expected:
            raise ValueError(f"{len(high_res_features)} high-res feature maps; this decoder takes {expected}")
        if high_res_features:
            coarse, fine = high_res_features[:2]
            upconv1, norm1, act1, upconv2, act2 = self.output_upscaling
            upscaled = act2(upconv2(act1(norm1(upconv1(src) + coarse))) + fine)
        else:
            upscaled = self.output_upscaling(src)
        hyper_in = _per_token(self.output_hypernetworks_mlps, mask_tokens_out)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        if self.mask_aware_iou:  # judged on the stride-4 masks and features, where both live
            iou_pred = self.iou_prediction_head(iou_token_out, masks, upscaled)
        else:
            iou_pred = self.iou_prediction_head(iou_token_out)
        if self.fine_channels:
            masks = self._fine_logits(upscaled, mask_tokens_out, masks, *high_res_features[2:])
        return masks, iou_pred

    def _fine_logits(self, upscaled: Tensor, mask_tokens_out: Tensor, masks: Tensor, stride2: Tensor,
                     full: Tensor) -> Tensor:
        """Stride-4 logits (N, K, h, w) -> input-resolution logits (N, K, 4h, 4w): bilinear plus the fine path."""
        up1, norm, act1, up2, act2 = self.fine_upscaling
        features = act2(up2(act1(norm(up1(upscaled) + stride2))) + full)
        hyper = _per_token(self.fine_hypernetworks_mlps, mask_tokens_out)
        n, c, h, w = features.shape
        fine = (hyper @ features.reshape(n, c, h * w)).reshape(n, -1, h, w)
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False) + fine
