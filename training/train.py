"""``fluorosam train``: train a FluoroSAM model on rendered shards, on one CPU, one GPU or many (torchrun).

The image encoder is the cost, so every image is decoded with several prompts: up to
``--prompts-per-image`` present classes (each with a random training phrase of its class) plus one
absent class whose target is empty. With probability ``--interactive-prob`` 1-3 SAM-style rounds
follow, each adding one click sampled from the error region of the previous prediction (or, with
``--deepest-click-prob``, placed where evaluation clicks), with that prediction as the dense prompt;
``--mask-only-rounds`` adds rounds with the previous mask and no new click (as SAM), and ``--feedback``
says which of the 3 masks is fed back (the oracle's best or, as at inference, the IoU head's pick).
The text projection also sees a batch of phrases from the whole vocabulary every step (cheap), for
the VQ and a supervised contrastive loss that keeps "left lung" and "right lung" apart.

Multi-process: ``torchrun --nproc-per-node N -m training.train ...`` (gloo on CPU, nccl on GPU);
rank 0 logs and checkpoints. ``--amp``: float16 on CUDA, bfloat16 on CPUs that have it (see :func:`amp_dtype_for`).
Resume with ``--resume OUT`` (weights + optimizer + step + RNG).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from fluorosam_common.frames import letterbox, normalize, window
from fluorosam_common.vocabulary import Vocabulary
from training.evaluate import next_click
from training.losses import mask_iou, multimask_loss, supervised_contrastive_loss
from training.model import FluoroSAM, get_config, load_checkpoint, save_checkpoint
from training.model.checkpoint import checkpoint_provenance
from training.model.config import FluoroSAMConfig
from training.model.fluorosam import answers_with_single_mask

TRAIN_STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
MIN_PROMPT_PIXELS = 4  # a class needs this many target pixels (at model input size) to be prompted
VAL_PROMPTS_PER_IMAGE = 16


# Masks a round can feed back to the next: the lowest-loss one (an oracle) or the IoU head's pick.
FEEDBACK_CHOICES = ("best", "predicted")
LOSS_RESOLUTIONS = ("input", "decoder")
TRAIN_PARTS = ("all", "decoder")


@dataclass
class TrainOptions:
    steps: int = 1000
    batch: int = 4  # images per step (per process)
    lr: float = 8e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    prompts_per_image: int = 4
    absent_per_image: int = 1
    # Present tool classes (guidewire, catheter, screw...) prompted per image on top of the others: at a few
    # hundred pixels among ~100 present anatomy classes, sqrt(area) weighting asks for a tool ~1 % of the time.
    tool_prompts_per_image: int = 1
    # Non-tool classes present in fewer than this share of the views that know them are drawn first like the tools
    # (same count per image): a body seen on few views (the phantoms' pelvis, femora, skull) otherwise reaches the
    # text side a few dozen times in a run. 0 boosts only the tools.
    rare_below: float = 0.0
    # Where the mask loss is computed: "input" upsamples the logits to the model input, as evaluation and
    # the node do (a 2-px guidewire is a 0.5-coverage stripe on the decoder's 4-px grid); "decoder" is the
    # cheaper low-resolution loss against area-averaged targets that the default's stages 1-7 used.
    loss_resolution: str = "input"
    interactive_prob: float = 0.5
    # Chance that a training click follows evaluation's rule (interior-most pixel of the larger error
    # region) instead of a uniform draw from the error region; 0 is SAM's training recipe.
    deepest_click_prob: float = 0.0
    # Extra interactive rounds that add no click, only the previous mask (SAM adds 2), shuffled among
    # the click rounds: teaches the decoder to improve, not degrade, a mask it is given back.
    mask_only_rounds: int = 0
    # Which of the 3 masks is fed back as the dense prompt: "best" (lowest loss against the target,
    # an oracle) or "predicted" (highest predicted IoU: what evaluation and the node feed back).
    feedback: str = "best"
    # SAM's single-mask token: rounds with at least this many clicks also train output token 0 (focal + dice on
    # its one mask, MSE on its IoU row) and feed its mask back; the saved config then answers such prompts with
    # it (``FluoroSAMConfig.single_mask_min_points``). 0 keeps the multimask output for every prompt.
    single_mask_min_points: int = 0
    # Text-only rounds also train token 0 (as above) and feed its mask back; the saved config then answers
    # text-only prompts with it (``FluoroSAMConfig.single_mask_text_only``).
    single_mask_text_only: bool = False
    # Multimask token (1..3) copied into token 0 before training starts (warm start); 0: leave token 0 as is.
    single_mask_init_token: int = 0
    # Which parameters learn: "all", or "decoder" (prompt encoder + mask decoder; the image encoder runs frozen in
    # eval mode without a graph, the text projection and codebook stay as loaded). A decoder-only fine-tune
    # keeps the image features every other prompt relies on; 1.52 vs 1.10 images/s for all parts (tiny, batch 4,
    # 2-core CPU, same recipe).
    train_parts: str = "all"
    crop_prob: float = 0.3  # chance of cropping a render to a non-square frame (then letterboxed)
    warp_prob: float = 0.0  # chance of an affine + elastic anatomy warp (one CT stands in for many bodies)
    zoom_out_prob: float = 0.0  # chance of shrinking a render into the frame with air around it (field of view)
    inspiration_prob: float = 0.0  # chance of lowering the lungs' base under their apex (deeper inspiration)
    text_batch: int = 256  # vocabulary phrases per step for the VQ / contrastive losses
    contrastive_weight: float = 0.5
    focal_weight: float = 20.0  # SAM's focal:dice ratio
    # SAM's alpha 0.25 down-weights foreground; from scratch that leaves logits under-confident (masks
    # stay empty at threshold 0 for hundreds of steps), 0.5 keeps the decision threshold at p = 0.5.
    focal_alpha: float = 0.5
    # Weight of the soft clDice term on tool prompts (losses.centreline_dice_loss): a wire the mask drops or
    # draws beside itself costs it whole. 0 trains with focal + dice alone, as every default before the fine path.
    centreline_weight: float = 0.0
    vq_weight: float = 1.0
    restart_every: int = 50
    seed: int = 0
    init_from: str | None = None  # checkpoint whose matching tensors initialize a new run
    device: str = "cpu"
    amp: bool = False
    num_workers: int | None = None  # data loader processes; None: :func:`default_workers`
    threads: int = 0  # torch intra-op threads on CPU; 0 keeps torch's default
    log_every: int = 10
    save_every: int = 250
    val_every: int = 500
    val_items: int = 16
    extra_meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- distributed
def _dist_info() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, processes on this node); without torchrun's variables, one node."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return rank, world, int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return 0, 1, 0, 1


def init_distributed(device: str) -> bool:
    """Join the torchrun process group if launched by torchrun; returns whether distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True


# ------------------------------------------------------------------------------------------- text
class PhraseBank:
    """Every training phrase of the dataset's classes with its sentence embedding (computed once)."""

    def __init__(self, model: FluoroSAM, vocabulary, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        phrases, owners = [], []
        for index, name in enumerate(self.class_names):
            for phrase in vocabulary.training_phrases(name):
                phrases.append(phrase)
                owners.append(index)
        self.phrases = phrases
        self.owner = torch.tensor(owners, dtype=torch.long)
        self.embeddings = model.sentence_embeddings(phrases).cpu()
        self.by_class = [torch.nonzero(self.owner == c).flatten() for c in range(len(self.class_names))]

    def class_centroids(self) -> Tensor:
        return torch.stack([F.normalize(self.embeddings[idx].mean(0), dim=0) for idx in self.by_class])

    def sample_for_classes(self, classes: Tensor, generator: torch.Generator) -> Tensor:
        """A random training phrase for each class index -> (N, text_dim) embeddings."""
        picks = [self.by_class[int(c)][torch.randint(len(self.by_class[int(c)]), (1,), generator=generator)]
                 for c in classes]
        return self.embeddings[torch.cat(picks)] if picks else self.embeddings[:0]

    def sample_batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``n`` phrases from ~n/4 random classes (so most anchors have positives): (embeddings, class ids)."""
        n_classes = max(2, min(len(self.class_names), n // 4))
        classes = torch.randperm(len(self.class_names), generator=generator)[:n_classes]
        classes = classes[torch.randint(n_classes, (n,), generator=generator)]
        return self.sample_for_classes(classes, generator), classes


# ------------------------------------------------------------------------------------------- data
def random_crop_to_aspect(image: np.ndarray, masks: torch.Tensor, rng: np.random.Generator,
                          min_aspect: float = 0.7) -> tuple[np.ndarray, torch.Tensor]:
    """Crop a square render to a random portrait or landscape rectangle (aspect in [min_aspect, 1]).

    Real frames are rarely square; the runtime letterboxes them (pad bottom/right), so training sees
    the same padding instead of meeting it for the first time on real X-rays.
    """
    h, w = image.shape
    aspect = rng.uniform(min_aspect, 1.0)
    if rng.random() < 0.5:
        new_w = max(8, round(w * aspect))
        x0 = int(rng.integers(0, w - new_w + 1))
        return image[:, x0:x0 + new_w], masks[:, :, x0:x0 + new_w]
    new_h = max(8, round(h * aspect))
    y0 = int(rng.integers(0, h - new_h + 1))
    return image[y0:y0 + new_h], masks[:, y0:y0 + new_h]


def prepare_batch(items: list[dict], image_size: int, crop_prob: float = 0.0, seed: int = 0) -> dict:
    """Collate dataset items into model inputs exactly as the runtime does: window the frame, letterbox
    it to the model size (pad bottom/right), normalize; masks go through the same letterbox (nearest).

    ``crop_prob``: chance of first cropping an item to a non-square frame (training augmentation).
    """
    images, masks = [], []
    for item in items:
        frame = np.asarray(item["image"], dtype=np.float32)
        m = torch.as_tensor(np.asarray(item["masks"]))
        if crop_prob:
            rng = np.random.default_rng([seed, int(item.get("index", 0)), len(images)])
            if rng.random() < crop_prob:
                frame, m = random_crop_to_aspect(frame, m, rng)
        image, geo = letterbox(window(frame), image_size)
        if (geo.scaled_h, geo.scaled_w) != m.shape[1:]:
            m = F.interpolate(m[None].float(), size=(geo.scaled_h, geo.scaled_w), mode="nearest")[0] > 0.5
        padded = torch.zeros((m.shape[0], image_size, image_size), dtype=torch.bool)
        padded[:, :geo.scaled_h, :geo.scaled_w] = m
        images.append(torch.from_numpy(normalize(image).astype(np.float32)))
        masks.append(padded)
    masks_t = torch.stack(masks)
    # numpy counts bools ~6x faster than torch's sum (which widens to int64 first): this ran in the loader.
    area = np.count_nonzero(masks_t.numpy().reshape(*masks_t.shape[:2], -1), axis=-1)
    # A class the item's body does not label has area -1: neither present nor absent, so never prompted.
    known = np.stack([np.asarray(item.get("known", np.ones(area.shape[1], bool))) for item in items])
    area = torch.from_numpy(np.where(known, area, -1))
    return {"images": torch.stack(images)[:, None], "masks": masks_t, "area": area}


class _Collate:
    def __init__(self, image_size: int, crop_prob: float, seed: int) -> None:
        self.image_size = image_size
        self.crop_prob = crop_prob
        self.seed = seed

    def __call__(self, items: list[dict]) -> dict:
        return prepare_batch(items, self.image_size, self.crop_prob, self.seed)


def sample_prompts(area: Tensor, prompts_per_image: int, absent_per_image: int, generator: torch.Generator,
                   boosted: Tensor | None = None, boosted_per_image: int = 0) -> tuple[Tensor, Tensor]:
    """Pick (image index, class index) pairs: present classes weighted by sqrt(area), plus absent ones.

    sqrt(area) favours the large structures users ask for without starving small ones. ``boosted`` (bool per
    class) marks classes of which up to ``boosted_per_image`` present ones are drawn first, uniformly, on top
    of the ``prompts_per_image`` weighted draws (the tools: thin, rare and asked for by name).
    """
    image_index, class_index = [], []
    for b in range(area.shape[0]):
        is_present = area[b] >= MIN_PROMPT_PIXELS
        if boosted is not None and boosted_per_image:
            candidates = torch.nonzero(is_present & boosted).flatten()
            chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:boosted_per_image]]
            image_index += [b] * chosen.numel()
            class_index += chosen.tolist()
            is_present = is_present.clone()
            is_present[chosen] = False
        present = torch.nonzero(is_present).flatten()
        absent = torch.nonzero(area[b] == 0).flatten()
        if present.numel():
            k = min(prompts_per_image, present.numel())
            weights = area[b, present].float().sqrt()
            chosen = present[torch.multinomial(weights, k, replacement=False, generator=generator)]
            image_index += [b] * k
            class_index += chosen.tolist()
        if absent.numel() and absent_per_image:
            k = min(absent_per_image, absent.numel())
            chosen = absent[torch.randperm(absent.numel(), generator=generator)[:k]]
            image_index += [b] * k
            class_index += chosen.tolist()
    return torch.tensor(image_index, dtype=torch.long), torch.tensor(class_index, dtype=torch.long)


def sample_error_points(pred: Tensor, target: Tensor, n_points: int,
                        generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """SAM-style corrective clicks: pixels drawn uniformly from the error region (x, y), label = target.

    Where the prediction is already perfect, clicks fall on the target (positive) or, for an empty
    target, anywhere (negative). pred/target bool (N, H, W) -> coords (N, P, 2) float, labels (N, P).
    """
    n, h, w = target.shape
    error = (pred ^ target).flatten(1).float()
    fallback = target.flatten(1).float()
    fallback = torch.where(fallback.sum(1, keepdim=True) > 0, fallback, torch.ones_like(fallback))
    weights = torch.where(error.sum(1, keepdim=True) > 0, error, fallback)
    flat = torch.multinomial(weights.cpu(), n_points, replacement=True, generator=generator).to(target.device)
    ys, xs = flat // w, flat % w
    labels = torch.gather(target.flatten(1), 1, flat).long()
    coords = torch.stack([xs, ys], dim=-1).float()
    return coords, labels


def with_deepest_clicks(pred: Tensor, target: Tensor, coords: Tensor, labels: Tensor,
                        chosen: Tensor) -> tuple[Tensor, Tensor]:
    """Replace the single click of each ``chosen`` prompt by evaluation's click (``next_click``).

    Uniform error clicks mostly land near boundaries; evaluation and users click deep inside the
    largest mistake, often a negative click in a false-positive blob. Training on both covers both.
    pred/target bool (N, H, W), coords (N, 1, 2) (x, y), labels (N, 1), chosen bool (N,).
    """
    coords, labels = coords.clone(), labels.clone()
    pred_np, target_np = pred.cpu().numpy(), target.cpu().numpy()
    for k in torch.nonzero(chosen.cpu()).flatten().tolist():
        click = next_click(pred_np[k], target_np[k])
        if click is not None:
            coords[k, 0] = torch.tensor(click[:2], dtype=coords.dtype, device=coords.device)
            labels[k, 0] = click[2]
    return coords, labels


# ------------------------------------------------------------------------------------------ model
class TrainingStep(nn.Module):
    """The whole forward of one training step in a single ``forward`` so DDP can wrap it."""

    def __init__(self, model: FluoroSAM, options: TrainOptions, generator: torch.Generator) -> None:
        super().__init__()
        if options.feedback not in FEEDBACK_CHOICES:
            raise ValueError(f"feedback must be one of {FEEDBACK_CHOICES}, not {options.feedback!r}")
        if options.train_parts not in TRAIN_PARTS:
            raise ValueError(f"train_parts must be one of {TRAIN_PARTS}, not {options.train_parts!r}")
        if options.loss_resolution not in LOSS_RESOLUTIONS:
            raise ValueError(f"loss_resolution must be one of {LOSS_RESOLUTIONS}, not {options.loss_resolution!r}")
        self.model = model
        self.options = options
        self.generator = generator  # CPU generator for the corrective clicks

    def forward(self, images: Tensor, masks: Tensor, image_index: Tensor, class_index: Tensor,
                prompt_embeddings: Tensor, text_embeddings: Tensor, text_labels: Tensor,
                interactive_points: int, thin: Tensor | None = None) -> dict[str, Tensor]:
        model, options, generator = self.model, self.options, self.generator
        n_prompts = image_index.shape[0]
        # The text side stays in float32 under autocast: nearest-code search in 16 bits would flip codes.
        with torch.autocast(device_type=images.device.type, enabled=False):
            vectors = model.project_text(torch.cat([prompt_embeddings, text_embeddings]))
            quantized, _, _, vq_loss = model.quantizer(vectors)
            contrastive = supervised_contrastive_loss(vectors, torch.cat([class_index, text_labels]))
        tokens = quantized[:n_prompts]

        if options.train_parts == "decoder":  # frozen encoder: inference's features (no drop-path), no graph
            model.image_encoder.eval()
            with torch.no_grad():
                features = model.encode_image(images)
            model.image_encoder.train(model.training)
        else:
            features = model.encode_image(images)
        embeddings = tuple(e[image_index] for e in features)
        if options.loss_resolution == "input":
            # Loss and clicks over the model input, on logits upsampled as evaluation and the node do.
            targets = masks[image_index, class_index].float()
            scored, to_input_px = model.upsample_to_input, (lambda xy: xy)
        else:
            # Decoder resolution (4x the embedding) against area-averaged soft targets: cheaper, but a
            # structure under half a low-resolution pixel wide never reaches coverage 0.5.
            factor = model.config.image_size // model.config.mask_hw
            targets = F.avg_pool2d(masks[image_index, class_index][:, None].float(), factor)[:, 0]
            scored, to_input_px = (lambda x: x), (lambda xy: xy * factor + (factor - 1) / 2)
        all_logits, all_iou = model.decode_all_tokens(embeddings, tokens)
        loss, first, single, prev_low = self._score_round(all_logits, all_iou, targets, scored, clicks=0, thin=thin)
        out = {"mask": first["mask"].detach(), "iou_head": first["iou_head"].detach(),
               "iou_text": first["best_iou"]}
        if single is not None:
            out["iou_text_single"] = single["best_iou"]
        if interactive_points:
            # SAM-style rounds: each adds ONE click drawn from the current error region (or none, for a
            # mask-only round), with the previous mask as the dense prompt, as evaluation and users do.
            coords = torch.zeros(n_prompts, 0, 2, device=all_logits.device)
            labels = torch.zeros(n_prompts, 0, dtype=torch.long, device=all_logits.device)
            rounds = [True] * interactive_points + [False] * options.mask_only_rounds
            rounds = [rounds[i] for i in torch.randperm(len(rounds), generator=generator).tolist()]
            for adds_click in rounds:
                if adds_click:
                    pred, target = scored(prev_low)[:, 0] > 0, targets >= 0.5
                    click, label = sample_error_points(pred, target, 1, generator)
                    if options.deepest_click_prob:
                        chosen = torch.rand(n_prompts, generator=generator) < options.deepest_click_prob
                        click, label = with_deepest_clicks(pred, target, click, label, chosen)
                    coords = torch.cat([coords, to_input_px(click)], 1)
                    labels = torch.cat([labels, label], 1)
                all_logits, all_iou = model.decode_all_tokens(embeddings, tokens, coords, labels, prev_low)
                round_total, round_loss, single, prev_low = self._score_round(all_logits, all_iou, targets, scored,
                                                                              clicks=coords.shape[1], thin=thin)
                if single is not None:
                    out["iou_single"] = single["best_iou"]
                loss = loss + round_total / len(rounds)
            out["iou_points"] = round_loss["best_iou"]
        loss = loss + options.vq_weight * vq_loss + options.contrastive_weight * contrastive
        out.update(loss=loss, vq=vq_loss.detach(), contrastive=contrastive.detach())
        out["_vectors"] = vectors.detach()
        return out

    def _score_round(self, all_logits: Tensor, all_iou: Tensor, targets: Tensor, scored: Callable[[Tensor], Tensor],
                     clicks: int, thin: Tensor | None = None) -> tuple[Tensor, dict, dict | None, Tensor]:
        """One round's loss (best of the 3 masks, plus token 0's one mask where the output rule answers a prompt
        with ``clicks`` clicks with it), the multimask and single-mask loss terms (None where the token does not
        answer) and the (N, 1, h, w) logits fed back to the next round: what inference would answer with. ``thin``
        (N,) marks the prompts that also pay the centreline term."""
        options = self.options
        centreline = dict(thin=thin, centreline_weight=options.centreline_weight)
        multi = multimask_loss(scored(all_logits[:, 1:]), all_iou[:, 1:], targets, options.focal_weight,
                               options.focal_alpha, **centreline)
        total = multi["mask"] + multi["iou_head"]
        if not answers_with_single_mask(clicks, options.single_mask_min_points, options.single_mask_text_only):
            return total, multi, None, self._feedback(all_logits[:, 1:], all_iou[:, 1:], multi["best_index"])
        single = multimask_loss(scored(all_logits[:, :1]), all_iou[:, :1], targets, options.focal_weight,
                                options.focal_alpha, **centreline)
        return total + single["mask"] + single["iou_head"], multi, single, all_logits[:, :1].detach()

    def _feedback(self, logits: Tensor, iou_pred: Tensor, best_index: Tensor) -> Tensor:
        """The (N, 1, h, w) mask logits the next round gets as its dense prompt (no gradient through it)."""
        if self.options.feedback == "predicted":
            chosen, _ = self.model.best_mask(logits, iou_pred)
        else:
            chosen = logits[torch.arange(logits.shape[0], device=logits.device), best_index]
        return chosen.detach()[:, None]


def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX present: without them the CPU emulates bfloat16 (torch's private probes; False
    if a future torch drops them, which only costs the speed-up)."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """Mixed-precision type: float16 on CUDA (tensor cores, with gradient scaling), bfloat16 on a CPU with
    native bfloat16, None (float32) on other CPUs.

    On CPUs with AMX / AVX512-BF16 (Sapphire Rapids and later) bfloat16 autocast made a training step's
    compute 1.44-1.74x faster than float32 (measured on this project's 2-core Xeon, where a loader worker
    process costs more than it saves: see :func:`default_workers`). On a 2-core AMD EPYC with AVX2 only,
    emulated bfloat16 took 64 s per step against 4.9 s in float32 (tiny config, batch 4), so there
    ``--amp`` falls back to float32 rather than run 13x slower.
    """
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bfloat16() else None


def default_workers(device: torch.device, cpus: int | None = None, processes: int = 1) -> int:
    """Loader processes per training process when none are asked for: on a GPU, most of this process's
    share of the cores (``processes`` training processes on the node) feed it; on a CPU, 0 up to 2 cores.

    The loader costs ~0.36 s per step of 4 images in process on this project's 2-core machine (16 % of a
    bfloat16 step); one worker process beside torch's 2 threads oversubscribes the cores and slows the
    step by more than that (1.57 vs 1.75 images/s, measured in one run), so 2 cores train without workers.
    """
    cpus = max(1, (cpus or os.cpu_count() or 1) // max(1, processes))
    if device.type == "cuda":
        return min(8, max(1, cpus - 1))
    return 0 if cpus <= 2 else 1


def lr_at(step: int, options: TrainOptions) -> float:
    """Linear warmup then cosine decay to 1% of the base rate."""
    if step < options.warmup_steps:
        return options.lr * (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
    return options.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ------------------------------------------------------------------------------------- validation
@torch.no_grad()
def quick_validate(model: FluoroSAM, dataset: Dataset, class_names: list[str], max_items: int,
                   device: torch.device) -> dict:
    """Text-only mean IoU (class names as prompts) over the largest present classes of the first items.

    Per image only the ``VAL_PROMPTS_PER_IMAGE`` largest structures are prompted, to keep it cheap.
    """
    model.eval()
    name_embeddings = model.sentence_embeddings(class_names).to(device)
    enc = model.encode_text_embeddings(name_embeddings)
    per_class: dict[str, list[float]] = {}
    for i in range(min(max_items, len(dataset))):
        batch = prepare_batch([dataset[i]], model.config.image_size)
        present = torch.nonzero(batch["area"][0] >= MIN_PROMPT_PIXELS).flatten()
        if present.numel() == 0:
            continue
        present = present[torch.argsort(batch["area"][0, present], descending=True)][:VAL_PROMPTS_PER_IMAGE]
        emb = model.encode_image(batch["images"].to(device))
        logits, iou_pred = model.decode_all_tokens(emb, enc.tokens[present.to(device)])
        best, _, _ = model.choose_output(logits, iou_pred)
        pred = model.upsample_to_input(best[:, None])[:, 0] > 0
        ious = mask_iou(pred.cpu(), batch["masks"][0, present])
        for c, v in zip(present.tolist(), ious.tolist()):
            per_class.setdefault(class_names[c], []).append(v)
    model.train()
    means = {k: float(np.mean(v)) for k, v in per_class.items()}
    return {"val_mean_iou": float(np.mean(list(means.values()))) if means else float("nan"),
            "val_per_class": means, "val_classes": len(means), "val_items": min(max_items, len(dataset))}


# ----------------------------------------------------------------------------------------- output
def plot_curves(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_mean_iou" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train], label="total")
        axes[0].plot(steps, [r["mask"] for r in train], label="mask (focal+dice)")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("step")
        axes[0].legend()
        axes[0].set_title("training loss")
        axes[1].plot(steps, [r["iou_text"] for r in train], label="train IoU, text only", alpha=0.6)
        pts = [r for r in train if "iou_points" in r]
        if pts:
            axes[1].plot([r["step"] for r in pts], [r["iou_points"] for r in pts], label="train IoU, +points",
                         alpha=0.6)
        for key, label in (("iou_single", "train IoU, single-mask token (interactive rounds)"),
                           ("iou_text_single", "train IoU, single-mask token (text only)")):
            rows = [r for r in train if key in r]
            if rows:
                axes[1].plot([r["step"] for r in rows], [r[key] for r in rows], alpha=0.6, label=label)
    if val:
        axes[1].plot([r["step"] for r in val], [r["val_mean_iou"] for r in val], "o-", label="val IoU, text only")
    axes[1].set_xlabel("step")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    axes[1].set_title("IoU (training: best of the 3 masks, or the single mask)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def manifest_sha256(roots: list[str]) -> str | None:
    """Hash of the data folders' manifest.json files (in order), for provenance in model.json."""
    digest = hashlib.sha256()
    found = False
    for root in roots:
        path = Path(root) / "manifest.json"
        if path.exists():
            digest.update(path.read_bytes())
            found = True
    return digest.hexdigest() if found else None


# ------------------------------------------------------------------------------------------- loop
def bodies_of(roots: list[str]) -> list[str]:
    """The bodies (CT ids) whose views the shard folders hold, from their manifests: model.json's record of what
    a model saw, which is what a cross-patient figure needs to be honest."""
    from training.data.shards import read_manifest

    return sorted({ct["ct_id"] for root in roots for ct in read_manifest(root)["render"].get("cts", [])})


def warm_start(model: FluoroSAM, checkpoint_dir: str | os.PathLike) -> tuple[int, list[str]]:
    """Copy every tensor of another checkpoint whose name and shape match (e.g. a model of a changed
    config); returns (tensors loaded, names left at their initialization). The phrase table is not
    a weight: training rebuilds it from its own vocabulary, so it is neither copied nor reported."""
    from safetensors.torch import load_file

    from training.model.checkpoint import WEIGHTS_FILE

    source = load_file(str(Path(checkpoint_dir) / WEIGHTS_FILE))
    target = {k: v for k, v in model.state_dict().items() if k != "phrase_table"}
    matched = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    if not matched:
        raise ValueError(f"{checkpoint_dir}: no tensor matches this model's names and shapes")
    model.load_state_dict(matched, strict=False)
    return len(matched), sorted(k for k in target if k not in matched)


def run_training(model_config: FluoroSAMConfig, make_train_dataset: Callable[[int], Dataset],
                 vocabulary, out_dir: str | os.PathLike, options: TrainOptions,
                 val_dataset: Dataset | None = None, resume: str | os.PathLike | None = None,
                 data_manifest_sha256: str | None = None) -> tuple[FluoroSAM, dict]:
    """Train; ``make_train_dataset(epoch)`` is called every epoch (so new shards are picked up).

    Returns this replica's trained model and the last logged metrics (rank 0). Rank 0 writes
    checkpoints, ``metrics.jsonl`` and ``training_curve.png``.
    """
    rank, world, local_rank, local_world = _dist_info()
    if options.single_mask_min_points and not resume:
        model_config = replace(model_config, single_mask_min_points=options.single_mask_min_points)
    if options.single_mask_text_only and not resume:
        model_config = replace(model_config, single_mask_text_only=True)
    device = torch.device(options.device if not options.device.startswith("cuda") or world == 1
                          else f"cuda:{local_rank}")
    if options.threads and device.type == "cpu":
        torch.set_num_threads(options.threads)
    out = Path(out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)  # identical initial weights on every rank
    dataset = make_train_dataset(0)
    class_names = list(dataset.classes)
    missing = [c for c in class_names if c not in vocabulary.names]
    if missing:
        raise ValueError(f"dataset classes not in the vocabulary: {missing[:5]}")

    start_step = start_epoch = 0
    if resume:
        model, _ = load_checkpoint(resume)
        model.train()
    else:
        model = FluoroSAM(model_config)
        if options.init_from:
            loaded, skipped = warm_start(model, options.init_from)
            if rank == 0:
                listed = ", ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else "")
                print(f"warm start from {options.init_from}: {loaded} tensors loaded, "
                      f"{len(skipped)} left at random init ({listed})")
        if options.single_mask_init_token:
            model.mask_decoder.copy_mask_token(options.single_mask_init_token, 0)
    if options.train_parts == "decoder":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("prompt_encoder.", "mask_decoder.")))
    model.to(device)
    bank = PhraseBank(model, vocabulary, class_names)
    is_tool = torch.tensor([vocabulary.get(name).kind == "tool" for name in class_names])
    boosted = is_tool.clone()
    if options.rare_below > 0:
        from training.data.shards import presence_rates

        parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
        rates = torch.from_numpy(presence_rates(parts))
        boosted |= (rates > 0) & (rates < options.rare_below)
        if rank == 0:
            rare = [name for name, b, t in zip(class_names, boosted.tolist(), is_tool.tolist()) if b and not t]
            print(f"rare classes drawn first like the tools ({len(rare)}): {', '.join(rare[:12])}"
                  + (" ..." if len(rare) > 12 else ""))
    if not resume and not options.init_from:
        with torch.no_grad():
            model.quantizer.initialize(model.project_text(bank.class_centroids().to(device)))
    model.set_phrase_table(bank.embeddings)

    generator = torch.Generator().manual_seed(options.seed * 1000 + rank)
    step_module: nn.Module = TrainingStep(model, options, generator)
    if world > 1:
        # Interactive rounds and absent classes vary per rank, so some parameters go unused on some steps.
        # Buffers are not broadcast every step: the VQ usage is synchronized at dead-code restarts instead.
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True, broadcast_buffers=False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "relative_position_bias_table" in name or "codebook" in name
         else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=options.lr)
    amp_dtype = amp_dtype_for(device) if options.amp else None
    if options.amp and amp_dtype is None and rank == 0:
        print("fluorosam train: --amp ignored, training in float32: this CPU has no native bfloat16 "
              "(AVX512-BF16 or AMX), and emulated bfloat16 was 13x slower than float32", file=sys.stderr)
    workers = default_workers(device, processes=local_world) if options.num_workers is None else options.num_workers
    # Gradient scaling only for float16: bfloat16 has float32's exponent range.
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    # Wall time and images seen up to the resumed checkpoint, so a resumed run reports the whole run's
    # time and throughput (work done after that checkpoint was lost with the process and is not counted).
    elapsed_before, samples_seen = 0.0, 0
    if resume and (Path(resume) / TRAIN_STATE_FILE).exists():
        state = torch.load(Path(resume) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step = int(state["step"])
        # The interrupted epoch starts again with its own shuffle and augmentation seeds, not epoch 0's.
        start_epoch = int(state.get("epoch", 0))
        elapsed_before, samples_seen = float(state.get("elapsed_s", 0.0)), int(state.get("samples_seen", 0))
        generator.set_state(state["generators"][min(rank, len(state["generators"]) - 1)])

    metrics_path = out / METRICS_FILE
    last: dict = {}
    t_start = time.time() - elapsed_before
    step = start_step
    epoch = start_epoch
    bar = tqdm(total=options.steps, initial=start_step, disable=rank != 0, unit="step", dynamic_ncols=True,
               desc="train")
    running: dict[str, float] = {}
    model.train()
    while step < options.steps:
        if epoch > 0:
            dataset = make_train_dataset(epoch)
        sampler = (DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=options.seed,
                                      drop_last=True) if world > 1 else None)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=options.batch, shuffle=sampler is None, sampler=sampler,
                            num_workers=workers, collate_fn=_Collate(model_config.image_size, options.crop_prob,
                                                                options.seed + 7919 * epoch),
                            drop_last=True, persistent_workers=False,
                            generator=torch.Generator().manual_seed(options.seed + epoch))
        if len(loader) == 0:
            raise ValueError(f"training set has {len(dataset)} items, fewer than one batch of {options.batch}")
        for batch in loader:
            if step >= options.steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, options)
            image_index, class_index = sample_prompts(batch["area"], options.prompts_per_image,
                                                      options.absent_per_image, generator, boosted,
                                                      options.tool_prompts_per_image)
            prompt_emb = bank.sample_for_classes(class_index, generator)
            text_emb, text_labels = bank.sample_batch(options.text_batch, generator)
            interactive = 0
            if torch.rand((), generator=generator) < options.interactive_prob:
                interactive = int(torch.randint(1, 4, (), generator=generator))
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                result = step_module(batch["images"].to(device), batch["masks"].to(device),
                                     image_index.to(device), class_index.to(device), prompt_emb.to(device),
                                     text_emb.to(device), text_labels.to(device), interactive,
                                     is_tool[class_index].to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(result["loss"]).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            samples_seen += batch["images"].shape[0] * world
            if options.restart_every and step % options.restart_every == 0 and options.train_parts == "all":
                model.quantizer.restart_dead_codes(result["_vectors"])
                if world > 1:  # every replica must keep rank 0's codebook
                    dist.broadcast(model.quantizer.codebook.data, 0)
                    dist.broadcast(model.quantizer.usage, 0)
            for key in ("loss", "mask", "iou_head", "vq", "contrastive", "iou_text", "iou_points", "iou_single",
                        "iou_text_single"):
                if key in result:
                    running.setdefault(key, []).append(float(result[key].detach()))
            bar.update(1)
            if rank == 0 and (step % options.log_every == 0 or step == options.steps):
                elapsed = time.time() - t_start
                last = {"step": step, "epoch": epoch, "lr": lr_at(step - 1, options),
                        "grad_norm": float(grad_norm), "elapsed_s": round(elapsed, 1),
                        "images_per_s": round(samples_seen / max(elapsed, 1e-9), 3),
                        "prompts": int(image_index.numel()), "train_items": len(dataset),
                        **{k: float(np.mean(v)) for k, v in running.items()}}
                running = {}
                with metrics_path.open("a") as f:
                    f.write(json.dumps(last) + "\n")
                bar.set_postfix(loss=f"{last['loss']:.3f}", iou=f"{last['iou_text']:.3f}",
                                img_s=f"{last['images_per_s']:.2f}")
            if rank == 0 and val_dataset is not None and options.val_every and (
                    step % options.val_every == 0 or step == options.steps):
                val = quick_validate(model, val_dataset, class_names, options.val_items, device)
                row = {"step": step, "val_mean_iou": val["val_mean_iou"], "val_classes": val["val_classes"]}
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                last.update(val)
                tqdm.write(f"step {step}: val text-only mean IoU {val['val_mean_iou']:.3f} "
                           f"over {val['val_classes']} classes")
            if rank == 0 and (step % options.save_every == 0 or step == options.steps):
                _save(model, out, optimizer, scaler, step, epoch, generator, options, model_config,
                      vocabulary, data_manifest_sha256, last, time.time() - t_start, samples_seen, world)
        epoch += 1
    bar.close()
    if world > 1:
        dist.barrier()
    return model, last


def _save(model, out, optimizer, scaler, step, epoch, generator, options, model_config, vocabulary,
          data_manifest_sha256, last, elapsed, samples_seen, world) -> None:
    meta = {"vocabulary_sha256": vocabulary.sha256, "data_manifest_sha256": data_manifest_sha256,
            "metrics": {k: v for k, v in last.items() if not k.startswith("_")},
            "training": {"steps": step, "world_size": world, "wall_time_s": round(elapsed, 1),
                         "options": {k: v for k, v in asdict(options).items() if k != "extra_meta"},
                         **options.extra_meta}}
    previous = out / "model.json"
    if previous.exists():  # keep calibration written by the evaluation step across resumed runs
        old = json.loads(previous.read_text())
        for key in ("oov", "min_score"):
            if old.get(key) is not None:
                meta[key] = old[key]
    save_checkpoint(model, out, meta)
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step, "epoch": epoch,
                "elapsed_s": elapsed, "samples_seen": samples_seen, "generators": [generator.get_state()]},
               out / TRAIN_STATE_FILE)
    if (out / METRICS_FILE).exists():
        plot_curves(out / METRICS_FILE, out / "training_curve.png")


# -------------------------------------------------------------------------------------------- CLI
def vocabulary_mismatches(roots: list[str], vocabulary: Vocabulary) -> list[str]:
    """Shard folders whose manifest names another vocabulary: its classes and ``hidden_by`` rules made their
    masks, and model.json would otherwise record the wrong vocabulary for the model."""
    mismatched = []
    for root in roots:
        made_with = json.loads((Path(root) / "manifest.json").read_text()).get("vocabulary_sha256")
        if made_with is not None and made_with != vocabulary.sha256:
            mismatched.append(f"{root} (vocabulary {made_with[:12]})")
    return mismatched


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainOptions()
    parser.add_argument("--config", default="tiny", help="model config name (tiny | base | large)")
    parser.add_argument("--data", action="append", required=True, help="shard folder (repeatable)")
    parser.add_argument("--vocabulary", default=None,
                        help="vocabulary YAML the shards were rendered or relabelled with (default: the package's "
                             "config/vocabulary.yaml); its hash goes into model.json")
    parser.add_argument("--allow-vocabulary-mismatch", action="store_true",
                        help="train on shards made with another vocabulary (only when phrases changed, not classes "
                             "or hidden_by rules: the masks must mean the same)")
    parser.add_argument("--val", help="held-out shard folder for periodic validation")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--batch", type=int, default=d.batch, help="images per step per process")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--warmup", type=int, default=d.warmup_steps)
    parser.add_argument("--prompts-per-image", type=int, default=d.prompts_per_image)
    parser.add_argument("--tool-prompts-per-image", type=int, default=d.tool_prompts_per_image,
                        help="present tool classes prompted per image on top of --prompts-per-image (tools are "
                             "small: area-weighted sampling alone rarely asks for one)")
    parser.add_argument("--rare-below", type=float, default=d.rare_below,
                        help="also draw first, like the tools, the classes present in fewer than this share of the "
                             "views that know them (bodies seen on few views); 0: tools only")
    parser.add_argument("--loss-resolution", choices=LOSS_RESOLUTIONS, default=d.loss_resolution,
                        help="mask loss over the model input (logits upsampled, as evaluated; thin tools need it) "
                             "or at the decoder's 4x-embedding grid (cheaper, area-averaged targets)")
    parser.add_argument("--interactive-prob", type=float, default=d.interactive_prob)
    parser.add_argument("--deepest-click-prob", type=float, default=d.deepest_click_prob,
                        help="chance a training click goes where evaluation clicks (deepest point of the "
                             "larger error region) instead of a uniform draw from the error region")
    parser.add_argument("--mask-only-rounds", type=int, default=d.mask_only_rounds,
                        help="extra interactive rounds with no new click, only the previous mask (SAM: 2)")
    parser.add_argument("--feedback", choices=FEEDBACK_CHOICES, default=d.feedback,
                        help="mask fed back between rounds: lowest-loss (oracle) or highest predicted IoU "
                             "(what evaluation and the node feed back)")
    parser.add_argument("--single-mask-min-points", type=int, default=d.single_mask_min_points,
                        help="train SAM's single-mask token on rounds with at least this many clicks and answer such "
                             "prompts with it (0: never)")
    parser.add_argument("--single-mask-text-only", action="store_true",
                        help="train the single-mask token on text-only rounds too and answer text-only prompts with it")
    parser.add_argument("--single-mask-init-token", type=int, choices=(0, 1, 2, 3), default=d.single_mask_init_token,
                        help="copy this multimask token (1..3) into the single-mask token before training (0: no)")
    parser.add_argument("--train-parts", choices=TRAIN_PARTS, default=d.train_parts,
                        help="parameters that learn: all, or decoder (prompt encoder + mask decoder; encoder frozen)")
    parser.add_argument("--fine-features", action="store_true",
                        help="train the fine-structure mask path (masks at input resolution; FluoroSAMConfig."
                             "fine_features); with --init-from a model without it, it starts at zero: same masks")
    parser.add_argument("--centreline-weight", type=float, default=d.centreline_weight,
                        help="weight of the soft clDice term on tool prompts (0: focal + dice only)")
    parser.add_argument("--focal-weight", type=float, default=d.focal_weight)
    parser.add_argument("--focal-alpha", type=float, default=d.focal_alpha,
                        help="focal loss foreground weight (SAM: 0.25; 0.5 keeps thresholds calibrated)")
    parser.add_argument("--crop-prob", type=float, default=d.crop_prob,
                        help="chance of cropping a render to a non-square frame before letterboxing")
    parser.add_argument("--warp-prob", type=float, default=d.warp_prob,
                        help="chance of an affine + elastic warp of image and masks (anatomy variation)")
    parser.add_argument("--zoom-out-prob", type=float, default=d.zoom_out_prob,
                        help="chance of shrinking a render and its masks into the frame, air around them "
                             "(field of view: lungs that do not fill the frame)")
    parser.add_argument("--inspiration-prob", type=float, default=d.inspiration_prob,
                        help="chance of stretching a render and its masks between the lung apex and base, the "
                             "abdomen shifted down (deeper inspiration: a lower dome under the same apex)")
    parser.add_argument("--resume", help="checkpoint folder to continue from (weights, optimizer, step, epoch, RNG, "
                                           "wall time); --steps may change the schedule's length")
    parser.add_argument("--init-from", default=None,
                        help="start a NEW run from another checkpoint's weights wherever names and shapes match")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: float16 + grad scaling on CUDA, bfloat16 on CPUs with "
                             "AMX/AVX512-BF16; other CPUs train in float32 with a warning")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--workers", type=int, default=d.num_workers,
                        help="data loader worker processes per training process (default: 0 on a CPU with "
                             "<= 2 cores, 1 on larger CPUs, cores - 1 up to 8 on a GPU; cores shared among ranks)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--log-every", type=int, default=d.log_every)
    parser.add_argument("--save-every", type=int, default=d.save_every)
    parser.add_argument("--val-every", type=int, default=d.val_every)
    parser.add_argument("--val-items", type=int, default=d.val_items)


def main(args: argparse.Namespace) -> int:
    from training.data.shards import ShardDataset

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("fluorosam train: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    distributed = init_distributed(args.device)
    vocabulary = Vocabulary.load(args.vocabulary)
    roots = args.data + ([args.val] if args.val else [])
    for root in roots:
        if not (Path(root) / "manifest.json").exists():
            print(f"fluorosam train: no manifest.json in {root}", file=sys.stderr)
            return 2
    mismatched = vocabulary_mismatches(roots, vocabulary)
    if mismatched and not args.allow_vocabulary_mismatch:
        print(f"fluorosam train: {', '.join(mismatched)} made with another vocabulary than "
              f"{args.vocabulary or 'config/vocabulary.yaml'} ({vocabulary.sha256[:12]}); pass the one they were made "
              "with (--vocabulary), relabel or render them again, or --allow-vocabulary-mismatch if only phrases "
              "changed", file=sys.stderr)
        return 2
    options = TrainOptions(
        steps=args.steps, batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup,
        prompts_per_image=args.prompts_per_image, tool_prompts_per_image=args.tool_prompts_per_image,
        rare_below=args.rare_below,
        loss_resolution=args.loss_resolution, interactive_prob=args.interactive_prob,
        deepest_click_prob=args.deepest_click_prob, mask_only_rounds=args.mask_only_rounds,
        feedback=args.feedback, seed=args.seed, single_mask_min_points=args.single_mask_min_points,
        single_mask_text_only=args.single_mask_text_only,
        single_mask_init_token=args.single_mask_init_token, train_parts=args.train_parts,
        crop_prob=args.crop_prob, warp_prob=args.warp_prob, zoom_out_prob=args.zoom_out_prob,
        inspiration_prob=args.inspiration_prob,
        focal_weight=args.focal_weight,
        focal_alpha=args.focal_alpha, centreline_weight=args.centreline_weight,
        init_from=args.init_from, device=args.device, amp=args.amp, num_workers=args.workers, threads=args.threads,
        log_every=args.log_every, save_every=args.save_every, val_every=args.val_every, val_items=args.val_items,
        extra_meta={"command": "fluorosam train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "",
                    "data": args.data, "val": args.val, "bodies": bodies_of(args.data),
                    **({"val_bodies": bodies_of([args.val])} if args.val else {}),
                    **({"initialized_from": checkpoint_provenance(args.init_from)} if args.init_from else {})})

    parts = [ShardDataset(root, augment=True, seed=args.seed, warp_prob=args.warp_prob,
                          zoom_out_prob=args.zoom_out_prob, inspiration_prob=args.inspiration_prob)
             for root in args.data]

    def make_train_dataset(epoch: int) -> Dataset:
        """Re-read the manifests (a render may still be adding shards) and reseed the augmentation."""
        for part in parts:
            if epoch:
                part.refresh()
            part.set_epoch(epoch)
        if any(p.classes != parts[0].classes for p in parts):
            raise ValueError("all --data folders must share one class list (same vocabulary)")
        dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        dataset.classes = parts[0].classes
        return dataset

    val_dataset = ShardDataset(args.val, augment=False) if args.val else None
    model_config = get_config(args.config)
    if args.fine_features:
        model_config = replace(model_config, fine_features=True)
    _, last = run_training(model_config, make_train_dataset, vocabulary, args.out, options,
                           val_dataset=val_dataset, resume=args.resume,
                           data_manifest_sha256=manifest_sha256(args.data))
    if distributed:
        dist.destroy_process_group()
    if _dist_info()[0] == 0 and last:
        print(json.dumps({k: v for k, v in last.items() if not isinstance(v, dict) and not k.startswith("_")}))
    return 0


if __name__ == "__main__":  # torchrun --nproc-per-node N -m training.train ...
    parser = argparse.ArgumentParser(prog="training.train")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
