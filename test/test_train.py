"""Training: the loss goes down on a few samples, DDP replicas stay identical, resume continues."""
import dataclasses
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from mini_model import MINI, record_decodes
from torch.utils.data import Dataset

from fluorosam_common.vocabulary import Vocabulary
from training.losses import multimask_loss
from training.model import FluoroSAM, load_checkpoint, save_checkpoint
from training.train import (
    TrainingStep,
    TrainOptions,
    run_training,
    sample_error_points,
    sample_prompts,
    with_deepest_clicks,
)

CLASSES = ["left lung", "right lung", "heart", "liver"]


class EllipseChests(Dataset):
    """Few fixed synthetic 'chest' images: lungs either side, heart between, liver below (contract dict)."""

    def __init__(self, n: int = 4, size: int = 64, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.classes = list(CLASSES)
        yy, xx = np.mgrid[:size, :size] / size
        self.items = []
        for _ in range(n):
            dx, dy = rng.uniform(-0.05, 0.05, 2)
            masks = np.stack([
                ((xx - 0.70 - dx) / 0.15) ** 2 + ((yy - 0.40 - dy) / 0.25) ** 2 < 1,  # patient's left: image right
                ((xx - 0.30 - dx) / 0.15) ** 2 + ((yy - 0.40 - dy) / 0.25) ** 2 < 1,
                ((xx - 0.52 - dx) / 0.10) ** 2 + ((yy - 0.55 - dy) / 0.10) ** 2 < 1,
                ((xx - 0.35 - dx) / 0.20) ** 2 + ((yy - 0.85 - dy) / 0.10) ** 2 < 1,
            ])
            image = 1.0 - 0.6 * masks[:2].any(0) + 0.3 * masks[2] + 0.2 * masks[3]
            image = image + rng.normal(0, 0.05, image.shape)
            self.items.append((image.astype(np.float32), masks))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        image, masks = self.items[i]
        return {"image": image, "masks": masks, "present": masks.any((1, 2)), "ct_id": "synthetic", "index": i}


def _options(**kw) -> TrainOptions:
    base = dict(steps=30, batch=2, lr=2e-3, warmup_steps=5, prompts_per_image=3, text_batch=32, num_workers=0,
                log_every=5, save_every=1000, val_every=0, restart_every=10, threads=1)
    base.update(kw)
    return TrainOptions(**base)


def test_sample_prompts_and_error_points():
    g = torch.Generator().manual_seed(0)
    area = torch.tensor([[100, 0, 5, 2], [0, 0, 0, 50]])
    image_index, class_index = sample_prompts(area, prompts_per_image=8, absent_per_image=1, generator=g)
    pairs = set(zip(image_index.tolist(), class_index.tolist()))
    assert {(0, 0), (0, 2), (1, 3)} <= pairs  # all present classes (>= 4 px) when fewer than requested
    assert (0, 3) not in pairs  # 2 px is below the prompting threshold, and not "absent" either
    assert sum(1 for b, c in pairs if area[b, c] == 0) == 2  # one absent class per image
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, 2:4, 2:4] = True
    coords, labels = sample_error_points(torch.zeros_like(target), target, 5, g)
    assert labels.tolist() == [[1] * 5]  # missed foreground -> positive clicks inside it
    assert ((coords >= 2) & (coords < 4)).all()
    coords, labels = sample_error_points(torch.ones_like(target), target, 5, g)
    assert labels.tolist() == [[0] * 5]  # false positives -> negative clicks outside the target


def test_deepest_clicks_follow_evaluation_rule_only_where_chosen():
    target = torch.zeros(2, 16, 16, dtype=torch.bool)
    target[:, 2:5, 2:5] = True  # a small miss ...
    pred = torch.zeros_like(target)
    pred[:, 8:15, 8:15] = True  # ... and a larger false-positive blob: the click goes to its centre, negative
    coords = torch.zeros(2, 1, 2)
    labels = torch.ones(2, 1, dtype=torch.long)
    new_coords, new_labels = with_deepest_clicks(pred, target, coords, labels, torch.tensor([True, False]))
    assert new_coords[0, 0].tolist() == [11.0, 11.0] and new_labels[0, 0] == 0
    assert new_coords[1, 0].tolist() == [0.0, 0.0] and new_labels[1, 0] == 1  # not chosen: unchanged
    assert coords[0, 0].tolist() == [0.0, 0.0]  # inputs are not modified in place
    perfect, _ = with_deepest_clicks(target, target, coords, labels, torch.tensor([True, True]))
    assert torch.equal(perfect, coords)  # nothing to fix: the uniform fallback click stays


@pytest.mark.parametrize("loss_resolution", ["input", "decoder"])
@pytest.mark.parametrize("feedback", ["best", "predicted"])
def test_interactive_rounds_add_clicks_and_mask_only_rounds(feedback, loss_resolution):
    """2 click rounds + 1 mask-only round: 3 decodes after text, one keeping the click count, each fed
    the previous round's mask chosen as ``feedback`` says."""
    torch.manual_seed(0)
    model = FluoroSAM(MINI)
    step = TrainingStep(model, _options(mask_only_rounds=1, feedback=feedback, loss_resolution=loss_resolution),
                        torch.Generator().manual_seed(0))
    calls = record_decodes(model, multimask_only=True)
    item = EllipseChests(n=1)[0]
    images = torch.from_numpy(item["image"])[None, None]
    masks = torch.from_numpy(item["masks"])[None]
    bank = torch.randn(2, model.config.text_dim)
    step(images, masks, torch.tensor([0, 0]), torch.tensor([0, 2]), bank, torch.randn(8, model.config.text_dim),
         torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), interactive_points=2)
    counts = [c[0] for c in calls]
    assert counts[0] == 0 and calls[0][1] is None and len(calls) == 4
    assert sorted(counts[1:]) in ([0, 1, 2], [1, 1, 2], [1, 2, 2])  # one round adds no click
    assert counts[-1] == 2 and all(b - a in (0, 1) for a, b in zip(counts, counts[1:]))
    factor = MINI.image_size // MINI.mask_hw
    targets = masks[[0, 0], [0, 2]].float()
    if loss_resolution == "decoder":
        targets = torch.nn.functional.avg_pool2d(targets[:, None], factor)[:, 0]
    for (_, _, logits, iou), (_, fed, _, _) in zip(calls, calls[1:]):
        if feedback == "predicted":
            expected = FluoroSAM.best_mask(logits, iou)[0]
        else:
            scored = model.upsample_to_input(logits) if loss_resolution == "input" else logits
            best_index = multimask_loss(scored, iou, targets, 20.0, 0.5)["best_index"]
            expected = logits[torch.arange(2), best_index]
        assert torch.equal(fed[:, 0], expected)


def test_single_mask_token_learns_on_multi_click_rounds_and_answers_them():
    """With ``single_mask_min_points`` 2, rounds with 2+ clicks also score token 0 and feed ITS mask back
    (what inference answers with); rounds with fewer clicks feed back the multimask pick as before."""
    torch.manual_seed(0)
    model = FluoroSAM(MINI)
    step = TrainingStep(model, _options(mask_only_rounds=0, feedback="predicted", single_mask_min_points=2),
                        torch.Generator().manual_seed(0))
    calls = record_decodes(model)
    item = EllipseChests(n=1)[0]
    out = step(torch.from_numpy(item["image"])[None, None], torch.from_numpy(item["masks"])[None],
               torch.tensor([0, 0]), torch.tensor([0, 2]), torch.randn(2, MINI.text_dim),
               torch.randn(8, MINI.text_dim), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), interactive_points=3)
    assert [c[0] for c in calls] == [0, 1, 2, 3]
    for (clicks, _, logits, iou), (_, fed, _, _) in zip(calls, calls[1:]):
        expected = logits[:, 0] if clicks >= 2 else FluoroSAM.best_mask(logits[:, 1:], iou[:, 1:])[0]
        assert torch.equal(fed[:, 0], expected)
    assert 0.0 <= float(out["iou_single"]) <= 1.0
    out["loss"].backward()
    hypernetwork = model.mask_decoder.output_hypernetworks_mlps[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in hypernetwork.parameters())


def test_single_mask_token_learns_on_text_only_rounds_and_answers_them():
    """With ``single_mask_text_only``, the text-only round and a mask-only round before any click score token
    0 and feed ITS mask back; a 1-click round feeds back the multimask pick (a lone click stays ambiguous)."""
    torch.manual_seed(0)
    model = FluoroSAM(MINI)
    step = TrainingStep(model, _options(mask_only_rounds=1, feedback="predicted", single_mask_min_points=2,
                                        single_mask_text_only=True), torch.Generator().manual_seed(0))
    calls = record_decodes(model)
    item = EllipseChests(n=1)[0]
    out = step(torch.from_numpy(item["image"])[None, None], torch.from_numpy(item["masks"])[None],
               torch.tensor([0, 0]), torch.tensor([0, 2]), torch.randn(2, MINI.text_dim),
               torch.randn(8, MINI.text_dim), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), interactive_points=2)
    assert [c[0] for c in calls] == [0, 0, 1, 2]  # text, mask-only (this seed draws it first), 1 click, 2 clicks
    for (clicks, _, logits, iou), (_, fed, _, _) in zip(calls, calls[1:]):
        expected = logits[:, 0] if clicks != 1 else FluoroSAM.best_mask(logits[:, 1:], iou[:, 1:])[0]
        assert torch.equal(fed[:, 0], expected)
    assert 0.0 <= float(out["iou_text_single"]) <= 1.0
    out["loss"].backward()
    hypernetwork = model.mask_decoder.output_hypernetworks_mlps[0]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in hypernetwork.parameters())


def test_decoder_only_training_keeps_encoder_and_text_side_and_saves_the_rule(tmp_path):
    """--train-parts decoder: the image encoder, text projection and codebook stay bit-exact, the decoder
    learns; token 0 starts as a copy of the chosen multimask token and model.json carries the output rule."""
    torch.manual_seed(0)
    start = tmp_path / "start"
    save_checkpoint(FluoroSAM(MINI), start, {})
    before, _ = load_checkpoint(start)
    model, _ = run_training(MINI, lambda epoch: EllipseChests(), Vocabulary.load(), tmp_path / "run",
                            _options(steps=4, val_every=0, interactive_prob=1.0, init_from=str(start),
                                     single_mask_min_points=2, single_mask_init_token=2, train_parts="decoder",
                                     single_mask_text_only=True))
    after, meta = load_checkpoint(tmp_path / "run")
    assert after.config.single_mask_min_points == 2 and meta["config"]["single_mask_min_points"] == 2
    assert after.config.single_mask_text_only and meta["config"]["single_mask_text_only"]
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    frozen = [k for k in old if not k.startswith(("prompt_encoder.", "mask_decoder."))]
    assert len(frozen) > 20 and all(torch.equal(old[k], new[k]) for k in frozen)
    assert not torch.equal(old["mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"],
                           new["mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"])
    with pytest.raises(ValueError, match="train_parts"):
        TrainingStep(FluoroSAM(MINI), _options(train_parts="encoder"), torch.Generator())


def test_unknown_feedback_or_loss_resolution_is_refused():
    with pytest.raises(ValueError, match="feedback"):
        TrainingStep(FluoroSAM(MINI), _options(feedback="oracle"), torch.Generator())
    with pytest.raises(ValueError, match="loss_resolution"):
        TrainingStep(FluoroSAM(MINI), _options(loss_resolution="full"), torch.Generator())


def test_tool_prompts_come_on_top_of_area_weighted_ones():
    """A 30-px tool among large classes is prompted on every image that shows it, once, and never twice."""
    area = torch.tensor([[9000, 8000, 30, 0, 7000], [9000, 8000, 0, 0, 7000]])
    is_tool = torch.tensor([False, False, True, True, False])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        image_index, class_index = sample_prompts(area, 1, 0, g, is_tool, boosted_per_image=1)
        pairs = list(zip(image_index.tolist(), class_index.tolist()))
        assert pairs.count((0, 2)) == 1 and len(pairs) == 3  # image 0: the tool + one weighted draw
        assert [c for b, c in pairs if b == 1] != [3]  # an absent tool is not "present"
    g = torch.Generator().manual_seed(0)
    hits = sum((0, 2) in zip(*(t.tolist() for t in sample_prompts(area, 1, 0, g, is_tool, 0))) for _ in range(50))
    assert hits < 10  # without the boost sqrt(area) rarely picks it


@pytest.mark.parametrize("loss_resolution, sees_line", [("input", True), ("decoder", False)])
def test_thin_tool_is_only_seen_by_the_input_resolution_loss(loss_resolution, sees_line):
    """A 2-px wire straddling two decoder cells is 0.25 coverage there: the decoder-resolution target is
    empty, so a mask drawn over the wire scores IoU 0 and is pushed away; at input resolution it counts."""
    config = dataclasses.replace(MINI, swin_depths=(1, 1, 1, 1), swin_heads=(1, 2, 4, 8), embed_stride=16)
    torch.manual_seed(0)
    model = FluoroSAM(config)
    size, factor = config.image_size, config.image_size // config.mask_hw
    assert factor == 4  # SAM's (and the tiny default's) decoder grid: 4 input pixels per cell
    masks = torch.zeros(1, 1, size, size, dtype=torch.bool)
    masks[0, 0, :, 11:13] = True  # the wire: columns 11-12, half in cell 2, half in cell 3
    drawn = torch.full((1, 4, config.mask_hw, config.mask_hw), -10.0)
    drawn[..., 2:4] = 10.0  # every mask covers the decoder cells the wire crosses

    model.decode_all_tokens = lambda *args, **kwargs: (drawn, torch.zeros(1, 4))
    step = TrainingStep(model, _options(loss_resolution=loss_resolution), torch.Generator().manual_seed(0))
    out = step(torch.zeros(1, 1, size, size), masks, torch.tensor([0]), torch.tensor([0]),
               torch.randn(1, config.text_dim), torch.randn(8, config.text_dim), torch.arange(8) % 4, 0)
    assert bool(out["iou_text"] > 0.1) is sees_line


@pytest.mark.slow
def test_short_training_lowers_loss_and_resumes(tmp_path):
    vocabulary = Vocabulary.load()
    _, last = run_training(MINI, lambda epoch: EllipseChests(), vocabulary, tmp_path,
                           _options(steps=40, val_every=20, val_items=2, deepest_click_prob=0.5),
                           val_dataset=EllipseChests(n=2, seed=1))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    assert last["step"] == 40 and (tmp_path / "training_curve.png").stat().st_size > 0
    assert 0.0 <= last["val_mean_iou"] <= 1.0 and set(last["val_per_class"]) <= set(CLASSES)
    assert [r["step"] for r in rows if "val_mean_iou" in r] == [20, 40]
    model, meta = load_checkpoint(tmp_path)
    assert meta["vocabulary_sha256"] == vocabulary.sha256 and meta["training"]["steps"] == 40
    assert model.phrase_table.shape[0] == sum(len(vocabulary.training_phrases(c)) for c in CLASSES)
    # Resume runs only the remaining steps, in the epoch it stopped in (not epoch 0's seeds again).
    stopped_epoch = [r["epoch"] for r in rows if "loss" in r][-1]
    assert stopped_epoch > 0
    first_wall_time = meta["training"]["wall_time_s"]
    run_training(MINI, lambda epoch: EllipseChests(), vocabulary, tmp_path, _options(steps=45), resume=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-2:] == [40, 45]
    assert [r["epoch"] for r in rows if "loss" in r][-1] >= stopped_epoch  # a fresh start would be back near 0
    # Time and throughput cover the whole run, not only the resumed process (5 steps of 45).
    _, meta = load_checkpoint(tmp_path)
    assert meta["training"]["wall_time_s"] >= first_wall_time and rows[-1]["elapsed_s"] >= first_wall_time


def test_amp_uses_bfloat16_only_on_cpus_that_have_it(monkeypatch):
    from training import train

    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(train, "cpu_has_native_bfloat16", lambda native=native: native)
        assert train.amp_dtype_for(torch.device("cpu")) is expected
    assert train.amp_dtype_for(torch.device("cuda")) is torch.float16


def test_amp_on_a_cpu_without_bfloat16_trains_in_float32_and_says_so(tmp_path, monkeypatch, capsys):
    from training import train

    monkeypatch.setattr(train, "cpu_has_native_bfloat16", lambda: False)
    model, _ = run_training(MINI, lambda epoch: EllipseChests(n=4), Vocabulary.load(), tmp_path,
                            _options(steps=2, amp=True))
    assert "--amp ignored" in capsys.readouterr().err
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
def test_bfloat16_autocast_on_cpu_trains_and_keeps_float32_weights_and_codes(tmp_path, monkeypatch):
    from training import train

    monkeypatch.setattr(train, "cpu_has_native_bfloat16", lambda: True)  # the bfloat16 path on any CPU
    vocabulary = Vocabulary.load()
    model, _ = run_training(MINI, lambda epoch: EllipseChests(), vocabulary, tmp_path, _options(steps=40, amp=True))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts activations only
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["training"]["options"]["amp"] is True
    assert all(v.dtype != torch.bfloat16 for v in loaded.state_dict().values())
    # Under autocast the image side runs in bfloat16 but the text side (nearest-code search) in float32.
    from training.train import TrainingStep, prepare_batch

    batch = prepare_batch([EllipseChests()[0]], MINI.image_size)
    step = TrainingStep(loaded.train(), _options(), torch.Generator().manual_seed(0))
    embeddings = loaded.sentence_embeddings(CLASSES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = loaded.decode(loaded.encode_image(batch["images"]), loaded.encode_text(CLASSES[:1]).tokens)
        assert logits.dtype == torch.bfloat16
        out = step(batch["images"], batch["masks"], torch.zeros(4, dtype=torch.long), torch.arange(4), embeddings,
                   embeddings, torch.arange(4), 1)
    assert out["_vectors"].dtype == torch.float32 and out["loss"].dtype == torch.float32
    assert torch.isfinite(out["loss"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # Each rank sees different data (DistributedSampler) and different random prompts.
        model, _ = run_training(MINI, lambda epoch: EllipseChests(n=8), Vocabulary.load(), out_dir,
                                _options(steps=12, restart_every=5))
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_processes_keep_replicas_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    differing = [k for k in a if k != "quantizer.usage" and not torch.equal(a[k], b[k])]
    assert not differing, differing[:5]
    loaded, meta = load_checkpoint(tmp_path)  # rank 0's checkpoint is the replicas' weights
    assert meta["training"]["world_size"] == 2
    assert all(torch.equal(v, a[k]) for k, v in loaded.state_dict().items())


def test_prepare_batch_crop_keeps_masks_aligned_with_pixels():
    from training.train import prepare_batch

    chest = EllipseChests(n=1, size=64)
    item = dict(chest[0])
    item["image"] = item["masks"][0].astype(np.float32) * 2.0 + 1.0  # the image IS the left-lung mask
    for seed in range(6):
        batch = prepare_batch([item], 64, crop_prob=1.0, seed=seed)
        image, mask = batch["images"][0, 0], batch["masks"][0, 0]
        assert batch["images"].shape == (1, 1, 64, 64) and batch["masks"].shape == (1, 4, 64, 64)
        # Windowing maps mask pixels to 1 -> +2 and the rest (and the zero padding) to 0 -> -2.
        assert torch.equal(image > 0, mask)
        assert batch["area"][0, 0] == mask.sum()


def test_warm_start_copies_matching_tensors_only(tmp_path):
    from training.model import FluoroSAM, save_checkpoint
    from training.model.checkpoint import checkpoint_provenance
    from training.train import warm_start

    torch.manual_seed(0)
    source = FluoroSAM(MINI).eval()
    source.set_phrase_table(torch.randn(5, MINI.text_dim))
    save_checkpoint(source, tmp_path / "src", {})
    torch.manual_seed(1)
    target = FluoroSAM(dataclasses.replace(MINI, patch_size=4, high_res_features=False))  # another stem
    loaded, skipped = warm_start(target, tmp_path / "src")
    assert "image_encoder.backbone.patch_embed.proj.weight" in skipped and loaded > 50
    # The phrase table is rebuilt from the vocabulary by training: not a weight, not copied, not reported.
    assert "phrase_table" not in skipped and target.phrase_table.shape[0] == 0
    src_state, dst_state = source.state_dict(), target.state_dict()
    assert torch.equal(dst_state["mask_decoder.iou_token.weight"], src_state["mask_decoder.iou_token.weight"])
    assert not torch.equal(dst_state["image_encoder.backbone.patch_embed.proj.weight"].flatten()[:4],
                           src_state["image_encoder.backbone.patch_embed.proj.weight"].flatten()[:4])
    record = checkpoint_provenance(tmp_path / "src")
    assert record["config"]["name"] == "mini" and len(record["checkpoint_sha256"]) == 64
    assert "averaged_from" not in record
    # A weight average has no training record of its own: the chain goes on through its ingredients.
    soup = [{"path": "a", "training": {"steps": 1}}, {"path": "b", "training": {"steps": 2}}]
    save_checkpoint(source, tmp_path / "soup", {"averaged_from": soup})
    assert checkpoint_provenance(tmp_path / "soup")["averaged_from"] == soup

    from safetensors.torch import save_file

    (tmp_path / "other").mkdir()
    save_file({"unrelated.weight": torch.zeros(3)}, str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(ValueError, match="no tensor matches"):
        warm_start(target, tmp_path / "other")


def test_default_workers_skip_loader_processes_on_two_cores():
    from training.train import default_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_workers(cpu, cpus=2) == 0 and default_workers(cpu, cpus=1) == 0
    assert default_workers(cpu, cpus=16) == 1
    assert default_workers(cuda, cpus=2) == 1 and default_workers(cuda, cpus=16) == 8
    assert default_workers(cuda, cpus=16, processes=8) == 1  # torchrun: 8 ranks share the node's cores
    assert default_workers(cpu, cpus=16, processes=8) == 0


def test_train_refuses_shards_made_with_another_vocabulary(tmp_path, capsys):
    """Masks follow the vocabulary they were made with (classes, hidden_by): training under another one's hash
    is refused before any work; the vocabulary they were made with (--vocabulary FILE) matches."""
    import argparse

    from fluorosam_common.paths import config_path
    from training.train import add_arguments, main, vocabulary_mismatches

    other = tmp_path / "other.yaml"
    other.write_text(config_path("vocabulary.yaml").read_text() + "\n# edited\n")
    other_sha = Vocabulary.load(other).sha256
    data = tmp_path / "shards"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"vocabulary_sha256": other_sha}))
    assert vocabulary_mismatches([str(data)], Vocabulary.load()) == [f"{data} (vocabulary {other_sha[:12]})"]
    assert vocabulary_mismatches([str(data)], Vocabulary.load(other)) == []

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert main(parser.parse_args(["--data", str(data), "--out", str(tmp_path / "run")])) == 2
    assert "made with another vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_centreline_loss_sees_a_dropped_or_displaced_wire_that_dice_forgives():
    """A 2-px wire beside a large structure's scale: the right wire costs ~0, an empty mask and a band drawn
    next to the wire cost the whole clDice term; a prompt not marked thin pays nothing extra."""
    from training.losses import centreline_dice_loss

    target = torch.zeros(3, 64, 64)
    target[:, 8:56, 30:32] = 1
    logits = torch.full((3, 64, 64), -12.0)
    logits[0, 8:56, 30:32] = 12.0  # right
    logits[2, 8:56, 36:40] = 12.0  # beside it
    loss = centreline_dice_loss(logits, target)
    assert loss[0] < 0.05 and loss[1] > 0.95 and loss[2] > 0.95
    thin = torch.tensor([True, True, False])
    with_term = multimask_loss(logits[:, None], torch.zeros(3, 1), target, thin=thin, centreline_weight=1.0)
    without = multimask_loss(logits[:, None], torch.zeros(3, 1), target)
    assert with_term["mask"] > without["mask"] + 0.25


def test_classes_a_body_does_not_label_are_never_prompted():
    """prepare_batch marks the classes outside an item's known set with area -1: neither present nor absent."""
    from training.train import prepare_batch

    masks = np.zeros((3, 64, 64), bool)
    masks[0, 10:40, 10:40] = True
    item = {"image": np.random.default_rng(0).random((64, 64), np.float32), "masks": masks,
            "known": np.array([True, True, False])}
    batch = prepare_batch([item], 64)
    assert batch["area"][0].tolist() == [900, 0, -1]
    for seed in range(10):
        _, classes = sample_prompts(batch["area"], 2, 2, torch.Generator().manual_seed(seed))
        assert 2 not in classes.tolist() and 1 in classes.tolist()  # class 1 is known absent; 2 unknown


def test_presence_rates_count_only_the_views_that_know_a_class():
    """A class a body does not label is neither rare nor common there: its rate is over the views that know it."""
    from types import SimpleNamespace

    from training.data.shards import presence_rates

    classes = ["lungs", "pelvis", "guidewire"]
    chest = SimpleNamespace(classes=classes, known=np.array([True, True, True]),
                            items=[{"present": ["lungs"]}] * 9 + [{"present": ["lungs", "guidewire"]}])
    phantom = SimpleNamespace(classes=classes, known=np.array([True, True, False]),
                              items=[{"present": ["lungs", "pelvis"]}, {"present": ["pelvis"]}])
    rates = presence_rates([chest, phantom])
    assert rates.tolist() == pytest.approx([11 / 12, 2 / 12, 1 / 10])
