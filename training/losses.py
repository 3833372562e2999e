"""Training losses: SAM's focal + dice on the best of the multimask outputs, IoU-head MSE, a centreline term
for thin structures (soft clDice), and a supervised contrastive loss that keeps text prompts of different
classes (left vs right lung) apart in the projected space before quantization."""
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


def _soft_erode(x: Tensor) -> Tensor:
    return torch.minimum(-F.max_pool2d(-x, (3, 1), 1, (1, 0)), -F.max_pool2d(-x, (1, 3), 1, (0, 1)))


def soft_skeleton(x: Tensor, iterations: int = 3) -> Tensor:
    """Soft skeleton of probability maps (B, 1, H, W) by iterated min/max pooling (Shit et al., clDice, 2021)."""
    def opened(t: Tensor) -> Tensor:
        return F.max_pool2d(_soft_erode(t), 3, 1, 1)

    skeleton = F.relu(x - opened(x))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - opened(x))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def centreline_dice_loss(logits: Tensor, targets: Tensor, iterations: int = 3, eps: float = 1e-6) -> Tensor:
    """Soft clDice loss per mask: (M, H, W) logits and targets -> (M,).

    Precision of the predicted skeleton inside the target and recall of the target's skeleton inside the
    prediction: a wire that is dropped, or drawn as a band beside the true one, costs the whole term, which
    dice on a thin mask of a few hundred pixels barely notices against a large band's overlap.
    """
    prob = logits.sigmoid()[:, None]
    targets = targets[:, None].float()
    skel_pred, skel_true = soft_skeleton(prob, iterations), soft_skeleton(targets, iterations)
    precision = ((skel_pred * targets).flatten(1).sum(1) + eps) / (skel_pred.flatten(1).sum(1) + eps)
    recall = ((skel_true * prob).flatten(1).sum(1) + eps) / (skel_true.flatten(1).sum(1) + eps)
    return 1 - 2 * precision * recall / (precision + recall)


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of boolean masks over the last two dims; two empty masks agree perfectly (1.0)."""
    pred, target = pred.flatten(-2), target.flatten(-2)
    inter = (pred & target).sum(-1).float()
    union = (pred | target).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def multimask_loss(mask_logits: Tensor, iou_pred: Tensor, targets: Tensor, focal_weight: float = FOCAL_WEIGHT,
                   focal_alpha: float = 0.25, thin: Tensor | None = None,
                   centreline_weight: float = 0.0) -> dict[str, Tensor]:
    """mask_logits (N, K, H, W), iou_pred (N, K), targets (N, H, W) bool or soft coverage in [0, 1].

    Segmentation loss is the minimum over the K masks (SAM's ambiguity-aware loss); the IoU head
    regresses the true IoU of every mask (target = coverage >= 0.5). Returns the loss terms and the
    best masks' IoU. ``thin`` (N,) bool marks prompts of thin classes (tools), whose masks also pay
    ``centreline_weight`` x :func:`centreline_dice_loss` where their target is not empty. Soft
    (area-averaged) targets serve a loss at the decoder's low resolution; a structure under half a
    low-resolution pixel wide then never reaches coverage 0.5, so training defaults to targets at the
    model input (``training.train``'s ``loss_resolution``).
    """
    mask_logits, iou_pred = mask_logits.float(), iou_pred.float()  # losses in float32 under autocast
    t = targets[:, None].float().expand_as(mask_logits)
    per_mask = focal_weight * sigmoid_focal_loss(mask_logits, t, alpha=focal_alpha) + dice_loss(mask_logits, t)
    if centreline_weight and thin is not None:
        rows = torch.nonzero(thin & (targets.flatten(1).amax(1) > 0)).flatten()  # thin prompts with a target
        if rows.numel():
            n, k, h, w = mask_logits.shape
            cl = centreline_dice_loss(mask_logits[rows].reshape(-1, h, w), t[rows].reshape(-1, h, w)).reshape(-1, k)
            per_mask = per_mask.index_add(0, rows, centreline_weight * cl)
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
