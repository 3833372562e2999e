"""Fit the mask-aware IoU head alone on a frozen model (``fluorosam fit-iou-head``).

Why a separate step: the head only chooses among masks the rest of the model already makes, so with
everything else frozen its inputs are fixed per (image, prompt, clicks). They are computed once, over
training renders as evaluation sees them (or domain-randomized with ``--augment``), text only and then
one click placed by evaluation's rule with the previous mask fed back, as evaluation and the node do,
and the head is fitted on them for many epochs.
Training it inside ``fluorosam train`` with the rest frozen costs a full training step per sample and,
on this CPU, had not improved the pick after 400 steps. A checkpoint with SAM's token-only head gets the
mask-aware head here (config ``mask_aware_iou_head``); every other tensor is copied bit for bit.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fluorosam_common.frames import postprocess_masks, preprocess
from training.evaluate import load_eval_items, next_click
from training.losses import mask_iou
from training.model import FluoroSAM, load_checkpoint, save_checkpoint
from training.model.decoder import MaskAwareIoUHead


def with_mask_aware_head(model: FluoroSAM, seed: int = 0) -> FluoroSAM:
    """The same model with a freshly initialized mask-aware head (a copy; every other tensor shared by value)."""
    torch.manual_seed(seed)
    new = FluoroSAM(dataclasses.replace(model.config, mask_aware_iou_head=True))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("mask_decoder.iou_prediction_head.")}
    new.set_phrase_table(model.phrase_table)
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("mask_decoder.iou_prediction_head.") for k in missing)
    new.set_oov_thresholds(model.oov_code_distance_max, model.oov_vocab_similarity_min)
    return new.eval()


@torch.no_grad()
def collect_head_examples(model: FluoroSAM, items, click_rounds: int = 1,
                          progress: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mask-aware head inputs (S, 3, F), true IoU at the frame's resolution (S, 3), the model's own predicted IoU
    (S, 3) and the item index (S,), for every present class of every item: text only, then after each of
    ``click_rounds`` clicks (evaluation's next_click on the model's answer under its output rule, that mask fed
    back). Works whatever head the model has."""
    decoder = model.mask_decoder
    captured: dict[str, Tensor] = {}
    hooks = [decoder.iou_prediction_head.register_forward_hook(
                 lambda module, args, out: captured.__setitem__("token", args[0])),
             decoder.output_upscaling[-1].register_forward_hook(
                 lambda module, args, out: captured.__setitem__("features", out))]
    xs, ys, preds, owners = [], [], [], []
    try:
        for index, item in enumerate(tqdm(items, desc="head inputs", unit="image", disable=not progress)):
            prompts = [p for p, m in item.masks.items() if m.any()]
            if not prompts:
                continue
            truth = [item.masks[p] for p in prompts]
            truth_t = torch.from_numpy(np.stack(truth))[:, None]
            image, geo = preprocess(item.image, model.config.image_size)
            embeddings = model.encode_image(torch.from_numpy(image))
            tokens = model.encode_text(prompts).tokens
            clicks: list[list[tuple[float, float, int]]] = [[] for _ in prompts]
            previous = coords = labels = chosen = None
            for round_index in range(click_rounds + 1):
                if round_index:
                    for k in range(len(prompts)):
                        click = next_click(chosen[k], truth[k])
                        clicks[k].append(click if click else clicks[k][-1] if clicks[k] else (0.0, 0.0, -1))
                    coords = torch.tensor(np.array([[geo.to_input(np.array(c[:2])) for c in cl] for cl in clicks]),
                                          dtype=torch.float32)
                    labels = torch.tensor([[c[2] for c in cl] for cl in clicks])
                all_logits, all_iou = model.decode_all_tokens(embeddings, tokens, coords, labels, previous)
                # Inputs for every output token (the head's mask index one-hot counts token 0), kept for the 3.
                xs.append(MaskAwareIoUHead.inputs(captured["token"], all_logits, captured["features"])[:, 1:].float())
                n, k_tokens = all_logits.shape[:2]
                flat = all_logits.reshape(n * k_tokens, *all_logits.shape[2:]).float().numpy()
                masks = torch.from_numpy(postprocess_masks(flat, geo) > 0)
                masks = masks.reshape(n, k_tokens, *masks.shape[1:])
                ys.append(mask_iou(masks[:, 1:], truth_t))  # as evaluation's mask_overlap: two empty masks agree
                preds.append(all_iou[:, 1:].float())
                owners.append(torch.full((n,), index))
                # The next click and the fed-back mask follow the model's own output rule, as evaluation's do.
                _, _, token = model.choose_output(all_logits, all_iou, labels)
                chosen = masks[torch.arange(n), token].numpy()
                previous = all_logits[torch.arange(n), token][:, None]
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(xs), torch.cat(ys), torch.cat(preds), torch.cat(owners)


def fit_head(head: MaskAwareIoUHead, x: Tensor, y: Tensor, epochs: int = 30, lr: float = 1e-3,
             batch: int = 256, seed: int = 0, progress: bool = True) -> dict:
    """MSE fit of the head's MLP on standardized inputs, then the standardization folded into its first layer
    (exact), so the model needs no extra normalization. Returns the fitted head's MSE on (x, y)."""
    generator = torch.Generator().manual_seed(seed)
    mean = x.flatten(0, 1).mean(0)
    std = x.flatten(0, 1).std(0).clamp_min(1e-4)
    with torch.no_grad():
        for layer in head.mlp.layers:
            layer.reset_parameters()
    z = (x - mean) / std
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    head.train()
    bar = tqdm(range(epochs), desc="fit IoU head", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(z), generator=generator)
        for start in range(0, len(z), batch):
            rows = order[start:start + batch]
            loss = F.mse_loss(head.mlp(z[rows]).squeeze(-1), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{loss.item():.4f}")
    head.eval()
    with torch.no_grad():
        first = head.mlp.layers[0]
        first.bias -= first.weight @ (mean / std)
        first.weight /= std
        return {"mse": float(F.mse_loss(head.mlp(x).squeeze(-1), y))}


def pick_iou(iou_pred: Tensor, y: Tensor) -> float:
    """Mean true IoU of the mask each prediction picks."""
    return float(y[torch.arange(len(y)), iou_pred.argmax(1)].mean())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder whose IoU head is (re)fitted")
    parser.add_argument("--data", action="append", required=True,
                        help="shard or eval-set folder (repeatable): training renders, never the eval set")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument("--max-items", type=int, default=None, help="items per folder, spread over it")
    parser.add_argument("--click-rounds", type=int, default=1, help="click rounds after the text-only one")
    parser.add_argument("--augment", action="store_true",
                        help="domain-randomize the shard renders first, as training does (for transfer to real films)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, meta = load_checkpoint(args.model)
    items = [item for folder in args.data for item in load_eval_items(folder, max_items=args.max_items, spread=True,
                                                                     augment=args.augment)]
    x, y, own_pred, owner = collect_head_examples(model, items, args.click_rounds)
    if not model.config.mask_aware_iou_head:
        model = with_mask_aware_head(model, args.seed)
    head = model.mask_decoder.iou_prediction_head
    # A held-out tenth of the images first, for an honest report; the shipped fit then uses every example.
    n_held = max(1, len(items) // 10)
    held = torch.isin(owner, torch.randperm(len(items), generator=torch.Generator().manual_seed(args.seed))[:n_held])
    fit_head(head, x[~held], y[~held], args.epochs, args.lr, seed=args.seed)
    with torch.no_grad():
        refit = pick_iou(head.mlp(x[held]).squeeze(-1), y[held])
    report = fit_head(head, x, y, args.epochs, args.lr, seed=args.seed)
    report["previous_head_mse"] = float(F.mse_loss(own_pred, y))
    report.update(examples=len(y), items=len(items), held_out_images=n_held,
                  held_out_pick_iou={"previous_head": round(pick_iou(own_pred[held], y[held]), 4),
                                     "fitted_head": round(refit, 4),
                                     "best_of_3": round(float(y[held].max(1).values.mean()), 4)})
    meta["iou_head_fit"] = {"command": "fluorosam fit-iou-head " + " ".join(sys.argv[2:]), "data": args.data,
                            "click_rounds": args.click_rounds, "augment": args.augment,
                            "epochs": args.epochs, "lr": args.lr,
                            "seed": args.seed, "wall_time_s": round(time.time() - t0, 1), **report}
    meta["min_score"] = None  # the scores changed: evaluate --calibrate sets it again
    meta.pop("config", None)
    meta.pop("format_version", None)
    save_checkpoint(model, args.out, meta)
    picks = report["held_out_pick_iou"]
    print(f"IoU head fitted on {len(y)} examples from {len(items)} images: MSE {report['previous_head_mse']:.4f} "
          f"(previous head) -> {report['mse']:.4f}; {n_held} held-out images, IoU of the picked mask: previous head "
          f"{picks['previous_head']:.3f}, fitted {picks['fitted_head']:.3f}, best of 3 {picks['best_of_3']:.3f}; "
          f"wrote {args.out} (run evaluate --calibrate next)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
