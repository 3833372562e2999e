"""SAM's mask decoder, generalized to one image embedding PER PROMPT or one shared by all prompts.

SAM's ``MaskDecoder.predict_masks`` repeat-interleaves a single image embedding over the prompts.
Training batches several images, each with several prompts, so here the embedding may be
(N, C, h, w) (one per prompt) or (1, C, h, w), which broadcasts over the N prompts without a copy
(the dense prompt is added on top, which is the one per-prompt tensor SAM makes as well).

``high_res_features`` (SAM 2's decoder): feature maps at 2x and 4x the embedding grid, added after
each transposed convolution of the mask upscaling, also one per prompt or one shared.
"""
from __future__ import annotations

import torch
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import Tensor


class BatchedMaskDecoder(MaskDecoder):
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
        if high_res_features:
            coarse, fine = high_res_features
            upconv1, norm1, act1, upconv2, act2 = self.output_upscaling
            upscaled = act2(upconv2(act1(norm1(upconv1(src) + coarse))) + fine)
        else:
            upscaled = self.output_upscaling(src)
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                               dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
