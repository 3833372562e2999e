"""Evaluation: exact oracles give IoU 1.0 / 0.0, clicks land in the error region, the CLI writes its outputs."""
import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from mini_model import MINI
from PIL import Image
from synthetic_evalset import Oracle, write_evalset

from training.evaluate import (
    TorchPredictor,
    add_arguments,
    calibrate_min_score,
    error_placement,
    evaluate_items,
    load_eval_items,
    main,
    mask_overlap,
    next_click,
    summarize,
)
from training.model import FluoroSAM, save_checkpoint


@pytest.mark.parametrize("perfect,expected", [(True, 1.0), (False, 0.0)])
def test_oracles_give_exact_iou(tmp_path, perfect, expected):
    items = list(load_eval_items(write_evalset(tmp_path)))
    assert len(items) == 3 and items[0].masks["left lung"].dtype == bool
    paraphrases = {"left lung": ["left lung:paraphrase"]}
    raw = evaluate_items(Oracle(perfect), items, [0, 1, 3], paraphrases, show_progress=False)
    metrics = summarize(raw, oov_refusal_rate=1.0, false_refusal_rate=0.0)
    for k in ("0", "1", "3"):
        assert metrics["points"][k]["mean_iou"] == expected
        assert metrics["points"][k]["mean_dice"] == expected
        assert metrics["points"][k]["per_class"]["right lung"] == {
            "iou": expected, "dice": expected, "n": 3, "recall": expected, "precision": 1.0 if perfect else None,
            "false_positives": None,  # neither oracle draws a pixel outside the truth
            "misses": None if perfect else {"below": 0.0, "above": 0.0, "beside": 1.0, "within": 0.0}}
    assert metrics["paraphrase"]["mean_iou"] == expected and metrics["paraphrase"]["gap"] == 0.0


def test_mask_overlap_and_clicks():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b = np.zeros_like(a)
    b[2:6, 2:4] = True
    overlap = mask_overlap(b, a)
    assert {k: overlap[k] for k in ("iou", "dice", "hit_px", "pred_px", "gt_px")} == {
        "iou": 0.5, "dice": pytest.approx(2 / 3), "hit_px": 8, "pred_px": 8, "gt_px": 16}
    assert overlap["fn_beside_px"] == 8 and overlap["fp_below_px"] + overlap["fn_below_px"] == 0
    both_empty = mask_overlap(np.zeros_like(a), np.zeros_like(a))
    assert (both_empty["iou"], both_empty["dice"]) == (1.0, 1.0)
    x, y, label = next_click(b, a)  # missed columns 4-5 -> positive click inside them
    assert label == 1 and a[int(y), int(x)] and not b[int(y), int(x)]
    x, y, label = next_click(a, b)  # false positive columns -> negative click there
    assert label == 0 and a[int(y), int(x)] and not b[int(y), int(x)]
    assert next_click(a, a) is None


def test_clicks_match_the_whole_frame_distance_transform():
    """next_click works on the error's bounding box: the same click as SAM's rule over the whole frame (distance
    to the nearest pixel without error or to the image border, first maximum in raster order), also for errors
    touching the border, split in pieces or tied."""
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    def whole_frame_click(pred, gt):
        best = None
        for error, label in ((gt & ~pred, 1), (pred & ~gt, 0)):
            if error.any():
                dist = distance_transform_edt(np.pad(error, 1))[1:-1, 1:-1]
                y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
                if best is None or dist[y, x] > best[0]:
                    best = (dist[y, x], (float(x), float(y), label))
        return None if best is None else best[1]

    rng = np.random.default_rng(0)
    for trial in range(200):
        shape = tuple(rng.integers(8, 90, size=2))
        gt, pred = (gaussian_filter(rng.normal(size=shape), rng.uniform(0.5, 6)) > rng.uniform(-0.3, 0.3)
                    for _ in range(2))
        assert next_click(pred, gt) == whole_frame_click(pred, gt), trial
    square = np.zeros((9, 9), bool)
    square[2:5, 2:5] = True  # a tie-free centre; then two equal blobs: the first in raster order wins
    assert next_click(np.zeros_like(square), square) == (3.0, 3.0, 1)
    twins = square | np.roll(square, 4, axis=1)
    assert next_click(np.zeros_like(twins), twins) == whole_frame_click(np.zeros_like(twins), twins) == (3.0, 3.0, 1)


def test_error_placement_is_column_by_column():
    """A 4x4 truth block; errors under it, over it, in a column it never reaches and in a hole of its span."""
    truth = np.zeros((12, 10), bool)
    truth[4:8, 2:6] = True
    truth[5, 3] = False  # a hole: within the column's span
    errors = np.zeros_like(truth)
    errors[9:11, 2] = True  # 2 below
    errors[1, 3:6] = True  # 3 above
    errors[6, 8] = True  # 1 beside (column 8 has no truth)
    errors[5, 3] = True  # 1 within
    assert error_placement(errors, truth) == {"below": 2, "above": 3, "beside": 1, "within": 1}
    assert error_placement(errors, np.zeros_like(truth)) == {"below": 0, "above": 0, "beside": 7, "within": 0}


class Oversegmenter(Oracle):
    """The true mask plus as many pixels again below it: twice the area, every true pixel found."""

    def predict(self, prompts, clicks, previous):
        masks, scores, _ = super().predict(prompts, clicks, previous)
        return [m | np.roll(m, int(m.any(1).sum()), axis=0) for m in masks], scores, None


def test_precision_and_recall_tell_over_segmentation_apart(tmp_path):
    items = list(load_eval_items(write_evalset(tmp_path, size=(80, 56))))  # room below the masks
    metrics = summarize(evaluate_items(Oversegmenter(perfect=True), items, [0], show_progress=False))
    entry = metrics["points"]["0"]["per_class"]["left lung"]
    assert entry["recall"] == 1.0 and entry["precision"] == pytest.approx(0.5) and entry["iou"] == pytest.approx(0.5)
    from training.evaluate import write_markdown

    write_markdown(metrics, tmp_path / "metrics.md", "t")
    row = next(line for line in (tmp_path / "metrics.md").read_text().splitlines() if line.startswith("| left lung"))
    assert row.endswith("| 0.500 | 0.500 | 1.000 |")
    assert entry["false_positives"] == {"below": 1.0, "above": 0.0, "beside": 0.0, "within": 0.0}
    assert "| left lung | 100 % / 0 % / 0 % / 0 % | - |" in (tmp_path / "metrics.md").read_text()


class WrongChooser(Oracle):
    """Picks an empty mask while the perfect one is among its candidates: a weak chooser, not weak masks."""

    def predict(self, prompts, clicks, previous):
        perfect, scores, _ = super().predict(prompts, clicks, previous)
        self.candidates = [np.stack([np.zeros_like(m), m]) for m in perfect]
        return [np.zeros_like(m) for m in perfect], scores, None


def test_best_of_candidates_tells_a_weak_chooser_apart(tmp_path):
    items = list(load_eval_items(write_evalset(tmp_path)))
    metrics = summarize(evaluate_items(WrongChooser(perfect=True), items, [0, 1], show_progress=False))
    for k in ("0", "1"):
        entry = metrics["points"][k]
        assert entry["mean_iou"] == 0.0 and entry["best_of_k_mean_iou"] == 1.0
        assert entry["largest15_best_of_k_mean_iou"] == 1.0
        assert entry["per_class"]["left lung"]["best_of_k_iou"] == 1.0
    from training.evaluate import write_markdown

    write_markdown(metrics, tmp_path / "metrics.md", "t")
    assert "| best of the model's masks by true IoU, mean (classes) | | 1.000 | 1.000 | | |" in (
        tmp_path / "metrics.md").read_text()
    plain = summarize(evaluate_items(Oracle(perfect=True), items, [0], show_progress=False))
    assert "best_of_k_mean_iou" not in plain["points"]["0"]  # a predictor without candidates reports none


class UnsureOfTheRightLung(Oracle):
    """Perfect masks, scored 0.9 for the left lung and 0.2 for the right one."""

    def predict(self, prompts, clicks, previous):
        masks, _, _ = super().predict(prompts, clicks, previous)
        return masks, [0.2 if p == "right lung" else 0.9 for p in prompts], None


def test_published_view_counts_what_the_node_refuses(tmp_path):
    """The node refuses masks scored below min_score and out-of-vocabulary prompts: the ``published`` entry
    reports the share it publishes, the IoU of what it publishes, and the IoU with refusals as empty masks."""
    items = list(load_eval_items(write_evalset(tmp_path)))
    raw = evaluate_items(UnsureOfTheRightLung(perfect=True), items, [0, 1], show_progress=False)
    assert "published" not in summarize(raw)["points"]["0"]  # no min_score: nothing to say
    metrics = summarize(raw, min_score=0.5)
    for k in ("0", "1"):
        entry = metrics["points"][k]
        assert entry["mean_iou"] == 1.0  # IoU of the answer, whatever its score
        assert entry["published"] == {"min_score": 0.5, "rate": 0.5, "mean_iou": 1.0, "delivered_mean_iou": 0.5,
                                      "largest15_rate": 0.5, "largest15_mean_iou": 1.0,
                                      "largest15_delivered_mean_iou": 0.5,
                                      "per_class_rate": {"left lung": 1.0, "right lung": 0.0}}
    nothing = summarize(raw, min_score=0.5, refused_prompts={"left lung"})["points"]["0"]["published"]
    assert (nothing["rate"], nothing["mean_iou"], nothing["delivered_mean_iou"]) == (0.0, None, 0.0)
    from training.evaluate import write_markdown

    write_markdown(metrics, tmp_path / "metrics.md", "t")
    text = (tmp_path / "metrics.md").read_text()
    assert "refuses masks scored below min_score 0.500 and empty masks" in text
    assert "| mean IoU, refusals as empty, classes | 0.500 | 0.500 |" in text
    right = next(line for line in text.splitlines() if line.startswith("| right lung"))
    assert right.endswith("| 1.000 | 1.000 | 0.000 |")  # precision, recall, published share at 0 pt


def test_min_score_separates_good_from_bad():
    rows = [{"score": s, "iou": i, "pred_px": 10} for s, i in [(0.9, 0.8), (0.8, 0.7), (0.3, 0.1), (0.2, 0.0),
                                                                 (0.6, 0.6)]]
    assert calibrate_min_score(rows) == pytest.approx(0.6)
    # Confident empty masks are refused by the node anyway: they must not drag the threshold up.
    empties = [{"score": 0.7, "iou": 0.0, "pred_px": 0}] * 4
    assert calibrate_min_score(rows + empties) == pytest.approx(0.6)
    assert calibrate_min_score(rows + [dict(e, pred_px=10) for e in empties]) == pytest.approx(0.8)  # were they drawn


class EmptyRightLung(Oracle):
    """Perfect left lung, an empty right lung, both scored 0.9 (the model saying "absent" with confidence)."""

    def predict(self, prompts, clicks, previous):
        masks, _, _ = super().predict(prompts, clicks, previous)
        masks = [np.zeros_like(m) if p == "right lung" else m for m, p in zip(masks, prompts)]
        return masks, [0.9] * len(prompts), None


def test_published_view_refuses_empty_masks_as_the_node_does(tmp_path):
    items = list(load_eval_items(write_evalset(tmp_path)))
    raw = evaluate_items(EmptyRightLung(perfect=True), items, [0], show_progress=False)
    published = summarize(raw, min_score=0.5)["points"]["0"]["published"]
    assert published["per_class_rate"] == {"left lung": 1.0, "right lung": 0.0}
    assert (published["rate"], published["mean_iou"], published["delivered_mean_iou"]) == (0.5, 1.0, 0.5)


def test_eval_set_mask_shape_mismatch_is_a_clear_error(tmp_path):
    root = write_evalset(tmp_path, n=1)
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(root / "img0_left_lung.png")
    with pytest.raises(ValueError, match="does not match image"):
        list(load_eval_items(root))


@pytest.mark.slow
def test_cli_with_a_real_checkpoint_writes_all_outputs(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(FluoroSAM(MINI), tmp_path / "model", {})
    evalset = write_evalset(tmp_path / "evalset", n=2, size=(50, 70))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--eval-set", str(evalset), "--points", "0,2",
                              "--out", str(tmp_path / "out"), "--calibrate", "--overlays", "2",
                              "--record-as", "synthetic"])
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["points"]) == {"0", "2"}
    assert set(metrics["points"]["0"]["per_class"]) == {"left lung", "right lung"}
    assert 0.0 <= metrics["points"]["2"]["mean_iou"] <= 1.0
    assert 0.0 <= metrics["oov_refusal_rate"] <= 1.0
    for name in ("metrics.md", "per_class_iou.png", "overlays.png", "records.jsonl"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    model_json = json.loads((tmp_path / "model" / "model.json").read_text())
    assert model_json["oov"]["vocab_similarity_min"] is not None and model_json["min_score"] is not None
    recorded = model_json["metrics"]["synthetic"]
    assert recorded["points"]["2"]["mean_iou"] == metrics["points"]["2"]["mean_iou"]
    for entry in metrics["points"].values():  # the pick is one of the candidates, so never beats their best
        assert all(row["best_of_k_iou"] >= row["iou"] for row in entry["per_class"].values())
    assert recorded["points"]["0"]["best_of_k_mean_iou"] == metrics["points"]["0"]["best_of_k_mean_iou"]
    # The node's view uses the min_score this run calibrated, and is recorded with the headline numbers.
    published = metrics["points"]["2"]["published"]
    assert recorded["points"]["2"]["published"] == {k: v for k, v in published.items() if k != "per_class_rate"}
    assert metrics["points"]["0"]["published"]["min_score"] == model_json["min_score"]


def test_torch_predictor_answers_multi_click_prompts_with_the_single_mask_token():
    """A model trained for it answers 2+ clicks with token 0: that mask is the only candidate (no choice made),
    while a 1-click prompt in the same batch still chooses among the three."""
    config = dataclasses.replace(MINI, single_mask_min_points=2)
    torch.manual_seed(0)
    predictor = TorchPredictor(FluoroSAM(config))
    predictor.set_frame(np.random.default_rng(0).uniform(0, 1, (50, 70)).astype(np.float32))
    masks, _, low_res = predictor.predict(["left lung", "right lung"], [[(10.0, 20.0, 1)],
                                                                        [(10.0, 20.0, 1), (40.0, 30.0, 0)]], None)
    assert [c.shape[0] for c in predictor.candidates] == [3, 1]
    assert np.array_equal(masks[1], predictor.candidates[1][0])
    assert any(np.array_equal(masks[0], c) for c in predictor.candidates[0])
    assert low_res.shape == (2, 1, config.mask_hw, config.mask_hw)


@pytest.mark.parametrize("perfect", [True, False])
def test_device_prompts_get_centreline_and_tip_scores(tmp_path, perfect):
    from training.evaluate import write_markdown, write_records

    items = list(load_eval_items(write_evalset(tmp_path / "set")))
    raw = evaluate_items(Oracle(perfect), items, [0], show_progress=False, device_prompts=frozenset({"left lung"}))
    metrics = summarize(raw)
    device = metrics["points"]["0"]["per_class"]["left lung"]
    if perfect:
        assert (device["centreline_f1"], device["centreline_recall"], device["tip_error_px"]) == (1.0, 1.0, 0.0)
    else:
        assert device["centreline_f1"] == 0.0 and device["centreline_precision"] is None
        assert device["tip_error_px"] is None
    assert "centreline_f1" not in metrics["points"]["0"]["per_class"]["right lung"]
    write_markdown(metrics, tmp_path / "metrics.md", "t")
    assert "| left lung | " in (tmp_path / "metrics.md").read_text().split("Devices:")[1]
    write_records(raw["records"], tmp_path / "records.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert all(("centreline_f1" in r) == (r["prompt"] == "left lung") for r in rows)


def test_tip_error_in_mm_follows_the_detector_pixel_pitch():
    """A render's pixel is fov / size in the isocenter plane, magnified sdd / sod on the detector: a tip 2 px off
    on a 256-px, 320-mm view at magnification 1.5 is 3.75 mm off; a film (no geometry) has no mm figure."""
    from training.data.geometry import detector_pixel_mm
    from training.evaluate import device_scores

    pitch = detector_pixel_mm({"fov_mm": 320.0, "sdd_mm": 1200.0, "sod_mm": 800.0}, 256)
    assert pitch == pytest.approx(1.875)
    truth = np.zeros((64, 64), bool)
    truth[10:50, 30:32] = True
    shifted = np.roll(truth, 2, axis=0)
    scores = device_scores(shifted, truth, pitch)
    assert scores["tip_error_mm"] == pytest.approx(scores["tip_error_px"] * pitch)
    assert device_scores(shifted, truth)["tip_error_mm"] is None
