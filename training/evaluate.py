"""``fluorosam evaluate``: IoU / Dice per class, text-only and with simulated clicks, paraphrases, OOV refusal.

Works on any eval-set folder (``manifest.json`` with image and per-prompt mask PNGs; real X-rays
included) and on shard folders (rendered views, evaluated in place without augmentation). Frames
go through ``fluorosam_common.frames`` exactly as at runtime; masks are compared at the frame's resolution.

Clicks follow SAM's protocol: each new click goes to the point farthest from the boundary of the
largest error region (distance transform), positive in a missed region, negative in a false one;
the previous low-resolution mask logits are fed back as the dense prompt.

``--calibrate`` also writes the OOV thresholds (from in-vocabulary phrases only, so the refusal
rate reported on the vocabulary's nonsense prompts stays an honest, held-out number) and
``min_score`` (from the predicted-IoU vs true-IoU pairs of this eval set) into the model's model.json.

IoU is that of the mask the model answers with, whatever its score. The node also refuses masks scored
below ``min_score``; each point count's ``published`` entry says how many it would publish and what a
consumer then gets (refusals counted as empty masks).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import distance_transform_edt
from tqdm import tqdm

from fluorosam_common.frames import postprocess_masks, preprocess, refusal_reason
from fluorosam_common.thin import CENTRELINE_TOLERANCE_PX, centreline_scores, tip_error_px

if TYPE_CHECKING:  # the model stays unimported for `fluorosam compare`
    from training.model.text import TextEncoding

# Masks of fewer pixels than this are skipped (a structure cut by the image edge to a sliver).
MIN_MASK_PIXELS = 16
MIN_SCORE_USEFUL_IOU = 0.5  # min_score separates masks with IoU >= this from worse ones
LARGEST_K = 15
RECORDS_FILE = "records.jsonl"  # one row per item, prompt and click count: what `fluorosam compare` pairs
RECORD_FIELDS = ("iou", "dice", "score", "hit_px", "pred_px", "gt_px")
DEVICE_FIELDS = ("centreline_precision", "centreline_recall", "centreline_f1", "tip_error_px", "tip_error_mm")
OVERLAY_FIRST = ("left lung", "right lung", "heart")


@dataclass
class EvalItem:
    id: str
    image: np.ndarray  # frame as stored (uint8/uint16/float)
    masks: dict[str, np.ndarray]  # prompt -> bool (H, W) at the frame's resolution
    detector_pixel_mm: float | None = None  # a frame pixel's pitch on the detector, where the geometry is known


# ---------------------------------------------------------------------------------------- reading
def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA", "P", "LA"):
            im = im.convert("L")
        array = np.asarray(im)
    if array.dtype == np.int32:  # PIL "I" mode for 16-bit PNGs
        array = array.astype(np.uint16)
    return array


def _chosen(total: int, max_items: int | None, spread: bool) -> list[int]:
    if max_items is None or max_items >= total:
        return list(range(total))
    return np.linspace(0, total - 1, max_items).astype(int).tolist() if spread else list(range(max_items))


def load_eval_items(folder: str | Path, classes: list[str] | None = None,
                    max_items: int | None = None, spread: bool = False, augment: bool = False) -> Iterator[EvalItem]:
    """Items of an eval-set folder or a shard folder (detected by its manifest's ``shards`` key): the first
    ``max_items``, or with ``spread`` that many evenly spaced over the folder (renders are ordered by pose).
    ``augment`` applies training's domain randomization to a shard folder's images (an eval set is read as is)."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"no manifest.json in {folder}: not an eval-set or shard folder")
    manifest = json.loads(manifest_path.read_text())
    wanted = None if classes is None else set(classes)
    if "shards" in manifest:
        from training.data.geometry import detector_pixel_mm
        from training.data.shards import ShardDataset

        dataset = ShardDataset(folder, augment=augment)
        for i in _chosen(len(dataset), max_items, spread):
            item = dataset[i]
            masks = {name: item["masks"][c] for c, name in enumerate(dataset.classes)
                     if item["present"][c] and (wanted is None or name in wanted)}
            pose = dataset.items[i].get("pose")
            yield EvalItem(f"{folder.name}-{i}", item["image"], masks,
                           detector_pixel_mm(pose, dataset.image_size) if pose else None)
        return
    if "items" not in manifest:
        raise ValueError(f"{manifest_path}: expected an 'items' list (eval-set) or 'shards' (shard folder)")
    for i in _chosen(len(manifest["items"]), max_items, spread):
        entry = manifest["items"][i]
        image = _read_png(folder / entry["image"])
        masks = {}
        for prompt, rel in entry["masks"].items():
            if wanted is not None and prompt not in wanted:
                continue
            mask = _read_png(folder / rel) > 0
            if mask.shape != image.shape[:2]:
                raise ValueError(f"{rel}: mask {mask.shape} does not match image {image.shape[:2]}")
            masks[prompt] = mask
        yield EvalItem(str(entry.get("id", Path(entry["image"]).stem)), image, masks, entry.get("detector_pixel_mm"))


# ---------------------------------------------------------------------------------------- metrics
def mask_overlap(pred: np.ndarray, gt: np.ndarray) -> dict:
    """IoU and Dice of boolean masks (both empty counts as a perfect 1.0), plus the pixel counts that
    per-class precision and recall are pooled from (so over- and under-segmentation can be told apart)."""
    inter = int(np.logical_and(pred, gt).sum())
    pred_px, gt_px = int(pred.sum()), int(gt.sum())
    total = pred_px + gt_px
    union = total - inter
    iou, dice = (1.0, 1.0) if union == 0 else (inter / union, 2 * inter / total)
    return {"iou": float(iou), "dice": float(dice), "hit_px": inter, "pred_px": pred_px, "gt_px": gt_px,
            **{f"fp_{k}_px": v for k, v in error_placement(pred & ~gt, gt).items()},
            **{f"fn_{k}_px": v for k, v in error_placement(gt & ~pred, pred).items()}}


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU alone (both empty counts as 1.0), for scoring the candidates a predictor chose among."""
    union = int(np.logical_or(pred, gt).sum())
    return 1.0 if union == 0 else int(np.logical_and(pred, gt).sum()) / union


ERROR_PLACES = ("below", "above", "beside", "within")


def error_placement(errors: np.ndarray, reference: np.ndarray) -> dict[str, int]:
    """Where error pixels lie relative to the other mask, column by column (images are shown head up):
    ``below`` / ``above`` its lowest / highest pixel in that column, ``beside`` it (columns it does not reach)
    or ``within`` its vertical span. For a lung, false positives below the truth are spill under the dome,
    misses below the prediction mean the lung ended too high."""
    covered = reference.any(0)
    rows = np.arange(reference.shape[0])[:, None]
    top = np.where(covered, reference.argmax(0), reference.shape[0])
    bottom = np.where(covered, reference.shape[0] - 1 - reference[::-1].argmax(0), -1)
    below = int((errors & (rows > bottom) & covered).sum())
    above = int((errors & (rows < top) & covered).sum())
    beside = int((errors & ~covered).sum())
    return {"below": below, "above": above, "beside": beside, "within": int(errors.sum()) - below - above - beside}


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, int] | None:
    """Click at the interior-most pixel of the larger error region: (x, y, label) or None if perfect."""
    best = None
    for error, label in ((gt & ~pred, 1), (pred & ~gt, 0)):
        rows, cols = np.flatnonzero(error.any(1)), np.flatnonzero(error.any(0))
        if not rows.size:
            continue
        # Distances inside the error's bounding box framed by zeros equal those over the whole frame (the
        # frame stands for the image border or for pixels with no error, never farther than the nearest
        # one outside the box), at the cost of the box instead of the frame.
        y0, x0 = rows[0], cols[0]
        dist = distance_transform_edt(np.pad(error[y0:rows[-1] + 1, x0:cols[-1] + 1], 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        if best is None or dist[y, x] > best[0]:
            best = (dist[y, x], (float(x + x0), float(y + y0), label))
    return None if best is None else best[1]


# -------------------------------------------------------------------------------------- predictor
class Predictor(Protocol):
    """What the evaluation needs from a model (the torch model here; the tests use exact oracles).

    A predictor that picks one of several masks per prompt may also set ``candidates`` in ``predict``:
    per prompt, the (K, H, W) boolean masks it chose among. The evaluation then reports the best of
    them by true IoU next to the pick, which tells a weak chooser from weak masks.
    """

    def set_frame(self, frame: np.ndarray) -> None: ...

    def predict(self, prompts: list[str], clicks: list[list[tuple[float, float, int]]] | None,
                previous) -> tuple[list[np.ndarray], list[float], object]: ...

    def refused(self, prompts: list[str]) -> list[bool]: ...


class TorchPredictor:
    """The checkpoint in torch, through the runtime's pre/post-processing."""

    def __init__(self, model, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self._embedding = None
        self._geo = None
        self.candidates: list[np.ndarray] | None = None
        # Every click round re-asks the frame's prompt lists: encoded once per frame (the text side is frozen).
        self._text: dict[tuple[str, ...], TextEncoding] = {}

    @torch.no_grad()
    def set_frame(self, frame: np.ndarray) -> None:
        self._text.clear()  # prompt lists differ from frame to frame: keep the cache to this one's rounds
        image, self._geo = preprocess(frame, self.model.config.image_size)
        self._embedding = self.model.encode_image(torch.from_numpy(image).to(self.device))

    @torch.no_grad()
    def predict(self, prompts, clicks, previous, chunk: int = 32):
        """Decode in chunks of ``chunk`` prompts (an embedding copy per prompt adds up on CPU)."""
        if len(prompts) > chunk:
            parts, candidates = [], []
            for i in range(0, len(prompts), chunk):
                parts.append(self.predict(prompts[i:i + chunk], clicks[i:i + chunk] if clicks else None,
                                          previous[i:i + chunk] if previous is not None else None, chunk))
                candidates += self.candidates
            self.candidates = candidates
            return ([m for p in parts for m in p[0]], [s for p in parts for s in p[1]],
                    torch.cat([p[2] for p in parts]))
        key = tuple(prompts)
        if key not in self._text:
            self._text[key] = self.model.encode_text(prompts)
        enc = self._text[key]
        coords = labels = None
        if clicks:
            longest = max(len(c) for c in clicks)
            coords = np.zeros((len(prompts), longest, 2), np.float32)
            labels = -np.ones((len(prompts), longest), np.int64)
            for k, prompt_clicks in enumerate(clicks):
                for j, (x, y, label) in enumerate(prompt_clicks):
                    coords[k, j] = self._geo.to_input(np.array([x, y]))
                    labels[k, j] = label
            coords = torch.from_numpy(coords).to(self.device)
            labels = torch.from_numpy(labels).to(self.device)
        logits, iou_pred = self.model.decode_all_tokens(self._embedding, enc.tokens, coords, labels, previous)
        best, score, index = self.model.choose_output(logits, iou_pred, labels)
        index = index.cpu()
        # Every candidate on the frame once; the pick is the chosen token's, not upsampled again.
        every = postprocess_masks(logits.flatten(0, 1).float().cpu().numpy(), self._geo) > 0
        every = every.reshape(*logits.shape[:2], *every.shape[-2:])
        picked = every[np.arange(len(index)), index.numpy()]
        # The candidates are what the rule chose among: the single mask alone, or the three.
        self.candidates = [m[:1] if i == 0 else m[1:] for m, i in zip(every, index.tolist())]
        return list(picked), score.float().cpu().tolist(), best[:, None]

    @torch.no_grad()
    def refused(self, prompts):
        return self.model.encode_text(prompts).oov.cpu().tolist()


# ------------------------------------------------------------------------------------- evaluation
def device_scores(pred: np.ndarray, gt: np.ndarray, pixel_mm: float | None = None) -> dict:
    """A device's record fields beside IoU: centreline precision / recall / F1 within the tolerance and the
    tip error in pixels and, where the frame's detector pixel pitch ``pixel_mm`` is known (renders), in mm at the
    detector (fluorosam_common.thin; None where undefined, e.g. no predicted centreline)."""
    scores = centreline_scores(pred, gt)
    tip = tip_error_px(pred, gt)
    return {f"centreline_{k}": v for k, v in scores.items()} | {
        "tip_error_px": tip, "tip_error_mm": None if tip is None or pixel_mm is None else tip * pixel_mm}


def evaluate_items(predictor: Predictor, items, point_counts: list[int],
                   paraphrases: dict[str, list[str]] | None = None, overlay_limit: int = 0,
                   show_progress: bool = True, device_prompts: frozenset[str] = frozenset()) -> dict:
    """Run the protocol over items; returns raw records (aggregate them with :func:`summarize`). Prompts in
    ``device_prompts`` (the vocabulary's tools) also get :func:`device_scores`."""
    max_points = max(point_counts)
    records: dict[int, list[dict]] = {k: [] for k in point_counts}
    paraphrase_records: list[dict] = []
    overlays: list[dict] = []
    areas: dict[str, list[int]] = {}
    for item in tqdm(items, desc="evaluate", unit="img", disable=not show_progress):
        prompts = [p for p, m in item.masks.items() if m.sum() >= MIN_MASK_PIXELS]
        if not prompts:
            continue
        gts = [item.masks[p] for p in prompts]
        for p, g in zip(prompts, gts):
            areas.setdefault(p, []).append(int(g.sum()))
        predictor.set_frame(item.image)
        clicks: list[list[tuple[float, float, int]]] = [[] for _ in prompts]
        previous = None
        preds: list[np.ndarray] = []
        for round_index in range(max_points + 1):
            if round_index:
                for k, (pred, gt) in enumerate(zip(preds, gts)):
                    click = next_click(pred, gt)
                    # A perfect mask gets a repeated last click, or a padding point when there is none.
                    clicks[k].append(click if click is not None else (clicks[k][-1] if clicks[k] else (0., 0., -1)))
            preds, scores, previous = predictor.predict(prompts, clicks if round_index else None,
                                                        previous if round_index else None)
            candidates = getattr(predictor, "candidates", None)
            if round_index in records:
                for k, (prompt, pred, gt, score) in enumerate(zip(prompts, preds, gts, scores)):
                    record = {"item": item.id, "prompt": prompt, **mask_overlap(pred, gt), "score": float(score)}
                    if candidates is not None:
                        record["best_of_k_iou"] = max(mask_iou(c, gt) for c in candidates[k])
                    if prompt in device_prompts:
                        record.update(device_scores(pred, gt, item.detector_pixel_mm))
                    records[round_index].append(record)
            if round_index == 0 and len(overlays) < overlay_limit:
                overlays.append({"id": item.id, "image": item.image, "prompts": prompts, "gts": gts, "preds": preds})
        if paraphrases:
            text_iou = {r["prompt"]: r["iou"] for r in records[0] if r["item"] == item.id} if 0 in records else {}
            for prompt, gt in zip(prompts, gts):
                phrases = paraphrases.get(prompt, [])
                if not phrases:
                    continue
                preds_p, _, _ = predictor.predict(phrases, None, None)
                for phrase, pred in zip(phrases, preds_p):
                    paraphrase_records.append({"item": item.id, "class": prompt, "phrase": phrase,
                                               **mask_overlap(pred, gt), "name_iou": text_iou.get(prompt)})
    return {"records": records, "paraphrase": paraphrase_records, "overlays": overlays,
            "mean_area": {k: float(np.mean(v)) for k, v in areas.items()}}


def _placement_shares(rows: list[dict], kind: str, total: int) -> dict[str, float] | None:
    """Pooled shares of a class's false-positive (``fp``) or missed (``fn``) pixels per place; None if none."""
    if not total:
        return None
    return {place: sum(r[f"{kind}_{place}_px"] for r in rows) / total for place in ERROR_PLACES}


def _aggregate(rows: list[dict], key: str = "prompt") -> dict:
    """Per class: mean IoU and Dice over items; precision and recall pooled over the class's pixels
    (precision is None when nothing was ever predicted)."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row[key], []).append(row)
    per_class = {}
    for name, group in sorted(grouped.items()):
        hit, pred_px, gt_px = (sum(r[k] for r in group) for k in ("hit_px", "pred_px", "gt_px"))
        per_class[name] = {"iou": float(np.mean([r["iou"] for r in group])),
                           "dice": float(np.mean([r["dice"] for r in group])), "n": len(group),
                           "precision": hit / pred_px if pred_px else None,
                           "recall": hit / gt_px if gt_px else None,
                           "false_positives": _placement_shares(group, "fp", pred_px - hit),
                           "misses": _placement_shares(group, "fn", gt_px - hit)}
        if all("best_of_k_iou" in r for r in group):
            per_class[name]["best_of_k_iou"] = float(np.mean([r["best_of_k_iou"] for r in group]))
        if all("centreline_f1" in r for r in group):  # a device: means over the items where each is defined
            for field in DEVICE_FIELDS:
                values = [r[field] for r in group if r[field] is not None]
                per_class[name][field] = float(np.mean(values)) if values else None
    out = {"mean_iou": float(np.mean([v["iou"] for v in per_class.values()])) if per_class else float("nan"),
           "mean_dice": float(np.mean([v["dice"] for v in per_class.values()])) if per_class else float("nan"),
           "per_class": per_class}
    if per_class and all("best_of_k_iou" in v for v in per_class.values()):
        out["best_of_k_mean_iou"] = float(np.mean([v["best_of_k_iou"] for v in per_class.values()]))
    return out


def _per_class_mean(rows: list[dict], values: list[float]) -> dict[str, float]:
    """Each class's mean value, classes in the order they first appear."""
    grouped: dict[str, list[float]] = {}
    for row, value in zip(rows, values):
        grouped.setdefault(row["prompt"], []).append(value)
    return {name: float(np.mean(v)) for name, v in grouped.items()}


def _class_mean(rows: list[dict], values: list[float]) -> float | None:
    """Mean over classes of each class's mean value (None without rows)."""
    per_class = _per_class_mean(rows, values)
    return float(np.mean(list(per_class.values()))) if per_class else None


def _published(rows: list[dict], min_score: float, largest: list[str], refused_prompts: set[str]) -> dict:
    """What the node publishes with ``min_score``: it refuses every prompt in ``refused_prompts`` (out of
    vocabulary) and each mask the node's rule refuses (:func:`fluorosam_common.frames.refusal_reason`: predicted IoU
    below ``min_score``, or an empty mask).

    ``rate``: share of the (present) structures published; ``mean_iou``: class mean over published masks
    only (what a consumer that trusts a published mask gets); ``delivered_mean_iou``: class mean with each
    refusal counted as an empty mask (IoU 0), so refusing a good mask costs as much as missing it; the same
    for the largest classes; ``per_class_rate``: each class's share published.
    """
    published = [r["prompt"] not in refused_prompts and not refusal_reason(r["score"], min_score, r["pred_px"] == 0)
                 for r in rows]
    out: dict = {"min_score": float(min_score)}
    for prefix, names in (("", None), (f"largest{LARGEST_K}_", set(largest))):
        pairs = [(r, a) for r, a in zip(rows, published) if names is None or r["prompt"] in names]
        kept = [r for r, a in pairs if a]
        out[f"{prefix}rate"] = float(np.mean([a for _, a in pairs])) if pairs else None
        out[f"{prefix}mean_iou"] = _class_mean(kept, [r["iou"] for r in kept])
        out[f"{prefix}delivered_mean_iou"] = _class_mean([r for r, _ in pairs], [r["iou"] * a for r, a in pairs])
    out["per_class_rate"] = dict(sorted(_per_class_mean(rows, published).items()))
    return out


def summarize(raw: dict, oov_refusal_rate: float | None = None, false_refusal_rate: float | None = None,
              min_score: float | None = None, refused_prompts: set[str] = frozenset()) -> dict:
    """The metrics.json document. Means are over classes (each class weighs the same). With the model's
    ``min_score`` (and the prompts it refuses as out of vocabulary), each point count also says what the
    node would publish (see :func:`_published`)."""
    largest = sorted(raw["mean_area"], key=lambda k: -raw["mean_area"][k])[:LARGEST_K]
    out: dict = {"points": {}, "largest_classes": largest}
    for k, rows in raw["records"].items():
        entry = _aggregate(rows)
        sub = _aggregate([r for r in rows if r["prompt"] in largest])
        entry[f"largest{LARGEST_K}_mean_iou"] = sub["mean_iou"]
        if "best_of_k_mean_iou" in sub:
            entry[f"largest{LARGEST_K}_best_of_k_mean_iou"] = sub["best_of_k_mean_iou"]
        if min_score is not None:
            entry["published"] = _published(rows, min_score, largest, refused_prompts)
        out["points"][str(k)] = entry
    if raw["paraphrase"]:
        para = _aggregate(raw["paraphrase"], key="class")
        classes = set(para["per_class"])
        names = {k: v for k, v in out["points"].get("0", {}).get("per_class", {}).items() if k in classes}
        name_mean = float(np.mean([v["iou"] for v in names.values()])) if names else float("nan")
        para["class_name_mean_iou"] = name_mean
        para["gap"] = name_mean - para["mean_iou"]
        out["paraphrase"] = para
    else:
        out["paraphrase"] = {}
    out["oov_refusal_rate"] = oov_refusal_rate
    out["in_vocabulary_refusal_rate"] = false_refusal_rate
    return out


# ------------------------------------------------------------------------------------ calibration
def calibrate_oov(model, vocabulary, keep_fraction: float = 0.98) -> dict:
    """OOV thresholds that accept ``keep_fraction`` of held-out in-vocabulary paraphrases.

    Only in-vocabulary phrases are used, so the refusal rate on ``vocabulary.oov_examples`` is measured
    on prompts the thresholds never saw.
    """
    phrases = [p for name in vocabulary.names for p in [name, *vocabulary.heldout_phrases(name)]]
    with torch.no_grad():
        enc = model.encode_text(phrases)
    q = 1 - keep_fraction
    return {"code_distance_max": float(torch.quantile(enc.code_distance, keep_fraction)),
            "vocab_similarity_min": float(torch.quantile(enc.vocab_similarity, q)),
            "calibration": {"phrases": len(phrases), "keep_fraction": keep_fraction}}


def calibrate_min_score(rows: list[dict]) -> float:
    """Predicted-IoU threshold that best separates useful masks (IoU >= 0.5) from the rest (balanced accuracy).

    Fitted on non-empty masks only: the node refuses an empty mask whatever its score, so those are not
    decisions the threshold makes."""
    rows = [r for r in rows if r["pred_px"] > 0]
    scores = np.array([r["score"] for r in rows])
    useful = np.array([r["iou"] >= MIN_SCORE_USEFUL_IOU for r in rows])
    if useful.all() or not useful.any():
        return float(scores.min()) if len(scores) else 0.0
    best, best_acc = 0.0, -1.0
    for t in np.unique(np.round(scores, 3)):
        accept = scores >= t
        acc = 0.5 * (accept[useful].mean() + (~accept[~useful]).mean())
        if acc > best_acc:
            best, best_acc = float(t), acc
    return best


# ----------------------------------------------------------------------------------------- output
def write_markdown(metrics: dict, path: Path, title: str) -> None:
    counts = sorted(metrics["points"], key=int)
    first = counts[0]
    published_share = (metrics["points"][first].get("published") or {}).get("per_class_rate")
    lines = [f"# {title}", "", "| class | n | " + " | ".join(f"IoU {c} pt" for c in counts)
             + f" | precision {first} pt | recall {first} pt |"
             + (f" published {first} pt |" if published_share else ""),
             "|---|---|" + "---|" * (len(counts) + 2 + bool(published_share))]

    def fraction(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    classes = list(metrics["points"][first]["per_class"])
    for name in classes:
        row = [metrics["points"][c]["per_class"][name] for c in counts]
        lines.append(f"| {name} | {row[0]['n']} | " + " | ".join(f"{r['iou']:.3f}" for r in row)
                     + f" | {fraction(row[0]['precision'])} | {fraction(row[0]['recall'])} |"
                     + (f" {fraction(published_share.get(name))} |" if published_share else ""))
    lines.append("| **mean (classes)** | | " + " | ".join(f"**{metrics['points'][c]['mean_iou']:.3f}**"
                                                         for c in counts) + " | | |")
    key = f"largest{LARGEST_K}_mean_iou"
    lines.append(f"| **mean ({LARGEST_K} largest)** | | " + " | ".join(
        f"**{metrics['points'][c][key]:.3f}**" for c in counts) + " | | |")
    oracle_rows = [(label, best_key) for label, best_key in (
        ("classes", "best_of_k_mean_iou"), (f"{LARGEST_K} largest", f"largest{LARGEST_K}_best_of_k_mean_iou"))
        if all(best_key in metrics["points"][c] for c in counts)]
    for label, best_key in oracle_rows:
        lines.append(f"| best of the model's masks by true IoU, mean ({label}) | | " + " | ".join(
            f"{metrics['points'][c][best_key]:.3f}" for c in counts) + " | | |")
    lines.append("")
    lines.append("Precision: share of the predicted pixels inside the truth; recall: share of the truth's pixels "
                 "predicted (both pooled over the class's items): low precision with high recall is "
                 "over-segmentation.")
    if oracle_rows:
        lines.append("Best of the model's masks: an oracle's choice among the masks the model chose from (not a "
                     "result a user gets); its gap to the mean above is what mask selection costs.")
    largest = [name for name in metrics.get("largest_classes", []) if name in classes]
    if largest:
        lines += ["", f"Where the {first}-pt errors of the {len(largest)} largest classes lie, column by column: "
                  "false positives below / above the truth / beside it (columns it does not reach) / within its "
                  "span; misses the same against the prediction (misses below: the mask ended too high).", "",
                  "| class | false positives below / above / beside / within | misses below / above / beside / "
                  "within |", "|---|---|---|"]

        def shares(value: dict | None) -> str:
            return "-" if value is None else " / ".join(f"{100 * value[p]:.0f} %" for p in ERROR_PLACES)

        for name in largest:
            row = metrics["points"][first]["per_class"][name]
            lines.append(f"| {name} | {shares(row['false_positives'])} | {shares(row['misses'])} |")
    devices = [name for name in classes if "centreline_f1" in metrics["points"][first]["per_class"][name]]
    if devices:
        lines += ["", f"Devices: centreline precision / recall / F1 within {CENTRELINE_TOLERANCE_PX:g} px (skeletons "
                  "matched within the tolerance) and tip error in pixels (tip: the centreline end farthest from where "
                  "the device enters the frame; in mm at the detector where the geometry is known), means over the "
                  "items where each is defined.", "",
                  "| device | " + " | ".join(f"{c} pt: precision / recall / F1, tip px" for c in counts) + " |",
                  "|---|" + "---|" * len(counts)]
        for name in devices:
            cells = []
            for c in counts:
                row = metrics["points"][c]["per_class"][name]
                tip = "-" if row["tip_error_px"] is None else f"{row['tip_error_px']:.1f}"
                if row.get("tip_error_mm") is not None:
                    tip += f" ({row['tip_error_mm']:.1f} mm)"
                cells.append(" / ".join(fraction(row[f"centreline_{k}"]) for k in ("precision", "recall", "f1"))
                             + f", {tip}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| mean Dice | " + " | ".join(f"{c} pt: {metrics['points'][c]['mean_dice']:.3f}" for c in counts)
                 + " |")
    lines.append("|---|" + "---|" * len(counts))
    para = metrics.get("paraphrase") or {}
    if para:
        lines += ["", f"Held-out paraphrases (text only): mean IoU {para['mean_iou']:.3f} vs class names "
                  f"{para['class_name_mean_iou']:.3f} on the same classes (gap {para['gap']:+.3f})."]
    gated = [c for c in counts if metrics["points"][c].get("published")]
    if gated:
        gate = metrics["points"][gated[0]]["published"]["min_score"]
        lines += ["", f"What the node publishes: it refuses masks scored below min_score {gate:.3f} and empty masks.",
                  "", "| | " + " | ".join(f"{c} pt" for c in gated) + " |", "|---|" + "---|" * len(gated)]
        for label, key in (("published (share of structures)", "rate"), ("mean IoU of published masks", "mean_iou"),
                           ("mean IoU, refusals as empty", "delivered_mean_iou")):
            for prefix, group in (("", "classes"), (f"largest{LARGEST_K}_", f"{LARGEST_K} largest")):
                lines.append(f"| {label}, {group} | " + " | ".join(
                    fraction(metrics["points"][c]["published"][prefix + key]) for c in gated) + " |")
    if metrics.get("oov_refusal_rate") is not None:
        lines += ["", f"Nonsense prompts refused: {100 * metrics['oov_refusal_rate']:.1f}%; in-vocabulary "
                  f"prompts refused: {100 * metrics['in_vocabulary_refusal_rate']:.1f}%."]
    path.write_text("\n".join(lines) + "\n")


def plot_per_class(metrics: dict, path: Path, max_classes: int = 40) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted(metrics["points"], key=int)
    per0 = metrics["points"][counts[0]]["per_class"]
    order = [c for c in metrics.get("largest_classes", []) if c in per0]
    order += sorted((c for c in per0 if c not in order), key=lambda c: -per0[c]["n"])
    order = order[:max_classes]
    width = 0.8 / len(counts)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(order) + 2), 4))
    for j, c in enumerate(counts):
        values = [metrics["points"][c]["per_class"][name]["iou"] for name in order]
        ax.bar(np.arange(len(order)) + j * width, values, width, label=f"{c} points")
    ax.set_xticks(np.arange(len(order)) + 0.4 - width / 2)
    ax.set_xticklabels(order, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_overlays(overlays: list[dict], path: Path, columns: int = 4, max_prompts: int = 3) -> None:
    """Grid: frame with ground truth (outline) and text-only prediction (fill) for a few prompts each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fluorosam_common.frames import window

    if not overlays:
        return
    rows = (len(overlays) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    colors = [(1, 0.2, 0.2), (0.2, 0.6, 1), (1, 0.85, 0.1)]
    for ax in axes.flat:
        ax.axis("off")
    for ax, ov in zip(axes.flat, overlays):
        base = window(np.asarray(ov["image"]))
        rgb = np.repeat(base[..., None], 3, axis=2)
        # Laterality and the heart first (what a chest view is checked for), then the largest structures.
        chosen = sorted(range(len(ov["prompts"])), key=lambda k: (ov["prompts"][k] not in OVERLAY_FIRST,
                                                                   -ov["gts"][k].sum()))[:max_prompts]
        for color, k in zip(colors, chosen):
            rgb[ov["preds"][k]] = 0.55 * rgb[ov["preds"][k]] + 0.45 * np.array(color)
        ax.imshow(rgb)
        for color, k in zip(colors, chosen):
            ax.contour(ov["gts"][k], levels=[0.5], colors=[color], linewidths=0.8)
        ax.set_title("\n".join(ov["prompts"][k] for k in chosen), fontsize=7)
    fig.suptitle("text-only prediction (fill) vs ground truth (outline)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled default model)")
    parser.add_argument("--eval-set", required=True, help="eval-set folder (manifest.json) or a shard folder")
    parser.add_argument("--points", default="0,1,3,5", help="click counts to report, comma-separated")
    parser.add_argument("--out", required=True,
                        help="output folder for metrics.json, metrics.md, records.jsonl and PNGs")
    parser.add_argument("--classes", nargs="+", default=None, help="evaluate only these prompts")
    parser.add_argument("--max-items", type=int, default=None)
    parser.add_argument("--no-paraphrases", action="store_true", help="skip the held-out paraphrase run")
    parser.add_argument("--paraphrases-per-class", type=int, default=3,
                        help="held-out paraphrases tried per class (spread over the class's list)")
    parser.add_argument("--overlays", type=int, default=8, help="items shown in the overlay grid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--record-as", default=None,
                        help="also store this evaluation's summary in the model's model.json metrics under this key")
    parser.add_argument("--calibrate", action="store_true",
                        help="write OOV thresholds and min_score from this eval set into the model's model.json")


def write_records(records: dict[int, list[dict]], path: Path) -> None:
    """Per-item scores as JSON lines, so two evaluations of one eval set can be paired item by item."""
    with open(path, "w") as f:
        for points, rows in sorted(records.items()):
            for row in rows:
                f.write(json.dumps({"points": points, "item": row["item"], "prompt": row["prompt"],
                                    **{k: row[k] for k in (*RECORD_FIELDS, *DEVICE_FIELDS) if k in row}}) + "\n")


def summary_for_model_json(metrics: dict) -> dict:
    """The headline numbers of an evaluation (per-class tables stay in metrics.json)."""
    keep = ("mean_iou", "mean_dice", f"largest{LARGEST_K}_mean_iou", "best_of_k_mean_iou",
            f"largest{LARGEST_K}_best_of_k_mean_iou")
    points = {}
    for clicks, scores in metrics["points"].items():
        points[clicks] = {key: scores[key] for key in keep if key in scores}
        if "published" in scores:
            points[clicks]["published"] = {key: value for key, value in scores["published"].items()
                                           if key != "per_class_rate"}
    out = {"points": points,
           "oov_refusal_rate": metrics["oov_refusal_rate"],
           "in_vocabulary_refusal_rate": metrics["in_vocabulary_refusal_rate"],
           "items": metrics.get("items"), "eval_set": metrics.get("eval_set")}
    if metrics.get("paraphrase"):
        out["paraphrase"] = {k: metrics["paraphrase"][k] for k in ("mean_iou", "class_name_mean_iou", "gap")}
    return out


def _spread(values: list, k: int) -> list:
    """Up to ``k`` items evenly spread over ``values`` (deterministic)."""
    if len(values) <= k:
        return list(values)
    return [values[round(i * (len(values) - 1) / max(1, k - 1))] for i in range(k)]


def main(args: argparse.Namespace) -> int:
    from fluorosam_common.paths import default_model_dir
    from fluorosam_common.vocabulary import Vocabulary
    from training.model import load_checkpoint
    from training.model.checkpoint import META_FILE

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        point_counts = sorted({int(p) for p in args.points.split(",") if p.strip()})
    except ValueError:
        print(f"fluorosam evaluate: --points must be comma-separated integers, got {args.points!r}", file=sys.stderr)
        return 2
    if not point_counts or point_counts[0] < 0:
        print("fluorosam evaluate: --points needs non-negative counts", file=sys.stderr)
        return 2
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not (Path(args.eval_set) / "manifest.json").exists():
        print(f"fluorosam evaluate: no manifest.json in {args.eval_set}", file=sys.stderr)
        return 2
    model, meta = load_checkpoint(model_dir, device=args.device)
    vocabulary = Vocabulary.load()
    if args.calibrate:
        oov = calibrate_oov(model, vocabulary)
        model.set_oov_thresholds(oov["code_distance_max"], oov["vocab_similarity_min"])
    predictor = TorchPredictor(model, args.device)
    paraphrases = None
    if not args.no_paraphrases:
        paraphrases = {name: _spread(vocabulary.heldout_phrases(name), args.paraphrases_per_class)
                       for name in vocabulary.names}
    items = load_eval_items(args.eval_set, args.classes, args.max_items)
    devices = frozenset(c.name for c in vocabulary.classes if c.kind == "tool")
    raw = evaluate_items(predictor, items, point_counts, paraphrases, overlay_limit=args.overlays,
                         device_prompts=devices)
    oov_flags = predictor.refused(vocabulary.oov_examples) if vocabulary.oov_examples else []
    in_vocab = [p for name in vocabulary.names for p in [name, *vocabulary.heldout_phrases(name)]]
    # The node's score gate: this eval set's calibration when asked for, else the model's own.
    min_score = calibrate_min_score(raw["records"][point_counts[0]]) if args.calibrate else meta.get("min_score")
    prompts = sorted({r["prompt"] for rows in raw["records"].values() for r in rows})
    refused_prompts = {p for p, refused in zip(prompts, predictor.refused(prompts)) if refused}
    metrics = summarize(raw, float(np.mean(oov_flags)) if oov_flags else None,
                        float(np.mean(predictor.refused(in_vocab))), min_score, refused_prompts)
    metrics["model"] = str(model_dir)
    metrics["eval_set"] = str(args.eval_set)
    metrics["items"] = len({r["item"] for rows in raw["records"].values() for r in rows})
    if args.calibrate or args.record_as:
        meta_path = model_dir / META_FILE
        document = json.loads(meta_path.read_text())
        if args.calibrate:
            document["oov"] = oov
            document["min_score"] = min_score
            metrics["calibrated"] = {"oov": oov, "min_score": min_score}
        if args.record_as:
            document.setdefault("metrics", {})[args.record_as] = summary_for_model_json(metrics)
        meta_path.write_text(json.dumps(document, indent=1) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_markdown(metrics, out / "metrics.md", f"FluoroSAM evaluation: {Path(args.eval_set).name}")
    plot_per_class(metrics, out / "per_class_iou.png")
    plot_overlays(raw["overlays"], out / "overlays.png")
    write_records(raw["records"], out / RECORDS_FILE)
    summary = {k: round(v[f"largest{LARGEST_K}_mean_iou"], 4) for k, v in metrics["points"].items()}
    print(json.dumps({"mean_iou": {k: round(v["mean_iou"], 4) for k, v in metrics["points"].items()},
                      f"largest{LARGEST_K}_mean_iou": summary,
                      "paraphrase_gap": metrics["paraphrase"].get("gap"),
                      "oov_refusal_rate": metrics["oov_refusal_rate"]}))
    return 0
