"""Training losses: SAM's focal + dice on the best of the multimask outputs, IoU-head MSE, and a
supervised contrastive loss that keeps text prompts of different classes (left vs right lung) apart
in the projected space before quantization."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FOCAL_WEIGHT = 20.0  # SAM's focal:dice ratio


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per-mask focal loss averaged over pixels: logits/targets (..., H, W) -> (...)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """Per-mask soft dice loss: (..., H, W) -> (...). An empty target asks for an empty prediction."""
    prob = logits.sigmoid().flatten(-2)
    targets = targets.flatten(-2)
    inter = (prob * targets).sum(-1)
    return 1 - (2 * inter + smooth) / (prob.sum(-1) + targets.sum(-1) + smooth)


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of boolean masks over the last two dims; two empty masks agree perfectly (1.0)."""
    pred, target = pred.flatten(-2), target.flatten(-2)
    inter = (pred & target).sum(-1).float()
    union = (pred | target).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def multimask_loss(mask_logits: Tensor, iou_pred: Tensor, targets: Tensor, focal_weight: float = FOCAL_WEIGHT,
                   focal_alpha: float = 0.25) -> dict[str, Tensor]:
    """mask_logits (N, K, H, W), iou_pred (N, K), targets (N, H, W) bool or soft coverage in [0, 1].

    Segmentation loss is the minimum over the K masks (SAM's ambiguity-aware loss); the IoU head
    regresses the true IoU of every mask (target = coverage >= 0.5). Returns the loss terms and the
    best masks' IoU. Soft (area-averaged) targets serve a loss at the decoder's low resolution; a
    structure under half a low-resolution pixel wide then never reaches coverage 0.5, so training
    defaults to targets at the model input (``training.train``'s ``loss_resolution``).
    """
    mask_logits, iou_pred = mask_logits.float(), iou_pred.float()  # losses in float32 under autocast
    t = targets[:, None].float().expand_as(mask_logits)
    per_mask = focal_weight * sigmoid_focal_loss(mask_logits, t, alpha=focal_alpha) + dice_loss(mask_logits, t)
    best_loss, best = per_mask.min(dim=1)
    with torch.no_grad():
        true_iou = mask_iou(mask_logits > 0, t >= 0.5)
    iou_loss = F.mse_loss(iou_pred, true_iou)
    rows = torch.arange(mask_logits.shape[0], device=mask_logits.device)
    return {"mask": best_loss.mean(), "iou_head": iou_loss, "best_iou": true_iou[rows, best].mean().detach(),
            "best_index": best.detach()}


def supervised_contrastive_loss(vectors: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """SupCon (Khosla et al. 2020): phrases of one class attract, other classes repel (cosine space)."""
    z = F.normalize(vectors.float(), dim=1)
    logits = z @ z.t() / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None]) & ~self_mask
    has_positive = positives.any(dim=1)
    if not has_positive.any():
        return vectors.new_zeros(())
    pos_log_prob = log_prob.masked_fill(~positives, 0).sum(1) / positives.sum(1).clamp_min(1)
    return -pos_log_prob[has_positive].mean()
