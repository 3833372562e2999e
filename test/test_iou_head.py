"""fit-iou-head: the fit learns from badly scaled inputs (folded standardization), collection works for either head,
only the head changes, and the CLI writes a loadable checkpoint with an honest held-out report."""
import argparse
import dataclasses

import pytest
import torch
from mini_model import MINI, record_decodes
from synthetic_evalset import write_evalset

from training.iou_head import add_arguments, collect_head_examples, fit_head, main, with_mask_aware_head
from training.model import FluoroSAM, load_checkpoint, save_checkpoint
from training.model.decoder import MaskAwareIoUHead


def test_fit_learns_from_inputs_on_very_different_scales():
    """Inputs spanning 1e-3 to 1e3: only a correct fold of the standardization into the first layer fits them."""
    torch.manual_seed(0)
    head = MaskAwareIoUHead(token_dim=8, feature_dim=4, num_masks=3, hidden_dim=32)
    features = 8 + 2 * 4 + 2 + 3
    scale = torch.logspace(-3, 3, features)
    x = torch.randn(2000, 3, features) * scale
    y = torch.sigmoid(x[..., 0] / scale[0] - x[..., -4] / scale[-4])  # depends on the smallest and a large one
    baseline = float(((y - y.mean()) ** 2).mean())
    report = fit_head(head, x, y, epochs=20, lr=3e-3, progress=False)
    assert report["mse"] < 0.2 * baseline
    with torch.no_grad():
        assert abs(float(((head.mlp(x).squeeze(-1) - y) ** 2).mean()) - report["mse"]) < 1e-6


@pytest.mark.parametrize("mask_aware", [True, False])
def test_collect_and_convert_keep_every_mask(tmp_path, mask_aware):
    from training.evaluate import load_eval_items

    torch.manual_seed(1)
    model = FluoroSAM(dataclasses.replace(MINI, mask_aware_iou_head=mask_aware)).eval()
    items = list(load_eval_items(write_evalset(tmp_path / "set", n=2, size=(48, 64))))
    x, y, own, owner = collect_head_examples(model, items, click_rounds=1, progress=False)
    assert x.shape == (8, 3, MINI.embed_dim + 2 * MINI.embed_dim // 8 + 2 + 4) and y.shape == own.shape == (8, 3)
    assert owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and ((0 <= y) & (y <= 1)).all()
    converted = with_mask_aware_head(model)
    assert converted.config.mask_aware_iou_head
    image = torch.randn(1, 1, 64, 64)
    tokens = model.encode_text(["left lung", "right lung"]).tokens
    with torch.no_grad():
        before = model.decode(model.encode_image(image), tokens)[0]
        after = converted.decode(converted.encode_image(image), tokens)[0]
    assert torch.equal(before, after)


def test_collection_feeds_back_what_the_output_rule_answers(tmp_path):
    """A model answering text-only and 2-click prompts with token 0: rounds 0 and 2 feed back token 0's mask,
    the 1-click round the IoU head's pick among the 3 (what evaluation and the node answer with)."""
    from training.evaluate import load_eval_items

    torch.manual_seed(3)
    model = FluoroSAM(dataclasses.replace(MINI, single_mask_min_points=2, single_mask_text_only=True)).eval()
    items = list(load_eval_items(write_evalset(tmp_path / "set", n=1, size=(48, 64))))
    calls = record_decodes(model)
    collect_head_examples(model, items, click_rounds=3, progress=False)
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    for (clicks, _, logits, iou), (_, fed, _, _) in zip(calls, calls[1:]):
        expected = logits[:, 0] if clicks != 1 else FluoroSAM.best_mask(logits[:, 1:], iou[:, 1:])[0]
        assert torch.equal(fed[:, 0], expected)


def test_cli_changes_only_the_head_and_reports_held_out_picks(tmp_path):
    torch.manual_seed(2)
    save_checkpoint(FluoroSAM(dataclasses.replace(MINI, mask_aware_iou_head=False)), tmp_path / "model",
                    {"min_score": 0.3, "vocabulary_sha256": "abc"})
    data = write_evalset(tmp_path / "train", n=10, size=(48, 64))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args(["--model", str(tmp_path / "model"), "--data", str(data), "--out",
                                   str(tmp_path / "out"), "--epochs", "3", "--max-items", "10"])) == 0
    old, _ = load_checkpoint(tmp_path / "model")
    new, meta = load_checkpoint(tmp_path / "out")
    assert new.config.mask_aware_iou_head and not old.config.mask_aware_iou_head
    old_state = old.state_dict()
    for name, tensor in new.state_dict().items():
        if not name.startswith("mask_decoder.iou_prediction_head."):
            assert torch.equal(tensor, old_state[name]), name
    fit = meta["iou_head_fit"]
    assert fit["items"] == 10 and fit["held_out_images"] == 1 and fit["examples"] == 10 * 2 * 2
    assert set(fit["held_out_pick_iou"]) == {"previous_head", "fitted_head", "best_of_3"}
    assert fit["held_out_pick_iou"]["best_of_3"] >= fit["held_out_pick_iou"]["fitted_head"]
    assert meta["min_score"] is None and meta["vocabulary_sha256"] == "abc"  # scores changed; provenance kept
