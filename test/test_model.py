"""Shapes, dtypes and invariants of the FluoroSAM model, its quantizer and checkpoints."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from mini_model import MINI  # small and fast; the real "tiny" is exercised where it matters (encode_image)
from safetensors.torch import load_file

from training.model import CONFIGS, FluoroSAM, FluoroSAMConfig, get_config, load_checkpoint, save_checkpoint
from training.model.text import VectorQuantizer


@pytest.fixture(scope="module")
def mini_model():
    torch.manual_seed(0)
    return FluoroSAM(MINI).eval()


def test_registry_and_derived_sizes():
    assert set(CONFIGS) == {"tiny", "base", "large"}
    tiny = get_config("tiny")
    assert (tiny.image_size, tiny.embed_hw, tiny.mask_hw) == (256, 16, 64)
    assert get_config("large").swin_embed_dim == 192 and get_config("large").image_size == 448
    with pytest.raises(KeyError, match="unknown model config"):
        get_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(tiny, image_size=250)
    assert FluoroSAMConfig.from_dict(tiny.to_dict()) == tiny
    assert tiny.high_res_shapes == [(64, 32), (32, 64)]
    with pytest.raises(ValueError, match="high_res_features needs a backbone stage"):
        dataclasses.replace(tiny, patch_size=8, swin_depths=(2, 2), swin_heads=(3, 6))
    # A model.json written before the field existed rebuilds the model it described (no high-res path).
    old = tiny.to_dict()
    del old["high_res_features"]
    assert FluoroSAMConfig.from_dict(old).high_res_shapes == []


def test_tiny_encode_image_shape_and_dtype():
    model = FluoroSAM(get_config("tiny")).eval()
    with torch.no_grad():
        emb = model.encode_image(torch.randn(2, 1, 256, 256))
    assert [tuple(t.shape) for t in emb] == [(2, 256, 16, 16), (2, 64, 32, 32), (2, 32, 64, 64)]
    assert all(t.dtype == torch.float32 for t in emb)
    with pytest.raises(ValueError, match="expected images"):
        model.encode_image(torch.randn(1, 3, 256, 256))


def test_text_encoding_fields(mini_model):
    with torch.no_grad():
        enc = mini_model.encode_text(["left lung", "The LEFT lung.", "banana bread"])
    assert enc.tokens.shape == (3, 256) and enc.tokens.dtype == torch.float32
    assert enc.code.dtype == torch.int64 and enc.code.shape == (3,)
    assert enc.code_distance.shape == (3,) and (enc.code_distance >= 0).all()
    assert enc.oov.dtype == torch.bool
    # Normalization makes the two spellings one phrase: identical tokens.
    assert torch.equal(enc.tokens[0], enc.tokens[1])
    # Quantized tokens are codebook rows.
    assert torch.equal(enc.tokens, mini_model.quantizer.codebook[enc.code])
    with pytest.raises(TypeError):
        mini_model.encode_text("left lung")


def test_oov_flags_follow_thresholds(mini_model):
    with torch.no_grad():
        emb = mini_model.sentence_embeddings(["left lung", "right lung", "pizza with pineapple"])
        mini_model.set_phrase_table(emb[:2])
        mini_model.set_oov_thresholds(math.inf, 0.8)
        enc = mini_model.encode_text_embeddings(emb)
    mini_model.set_phrase_table(torch.zeros(0, MINI.text_dim))
    mini_model.set_oov_thresholds(math.inf, -math.inf)
    assert enc.vocab_similarity[0] == pytest.approx(1.0, abs=1e-2)
    assert enc.oov.tolist() == [False, False, True]


def _random_embeddings(config, batch: int = 1) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, c, side, side) for c, side in config.encoder_output_shapes)


def test_decode_shapes_and_shared_embedding_broadcast(mini_model):
    torch.manual_seed(1)
    n, hw = 3, MINI.embed_hw
    emb = _random_embeddings(MINI)
    tokens = torch.randn(n, 256)
    coords = torch.rand(n, 2, 2) * MINI.image_size
    labels = torch.tensor([[1, 0], [1, -1], [0, 1]])
    masks = torch.randn(n, 1, 4 * hw, 4 * hw)
    with torch.no_grad():
        shared = mini_model.decode(emb, tokens, coords, labels, masks)
        repeated = mini_model.decode(tuple(e.expand(n, -1, -1, -1).clone() for e in emb), tokens, coords, labels,
                                     masks)
        text_only = mini_model.decode(emb, tokens)
    assert shared[0].shape == (n, 3, 4 * hw, 4 * hw) and shared[1].shape == (n, 3)
    assert shared[0].dtype == torch.float32
    torch.testing.assert_close(shared[0], repeated[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shared[1], repeated[1], rtol=1e-4, atol=1e-4)
    assert text_only[0].shape == (n, 3, 4 * hw, 4 * hw)
    # Each prompt's result depends only on its own inputs: decoding one alone gives the same masks.
    with torch.no_grad():
        single = mini_model.decode(emb, tokens[1:2], coords[1:2], labels[1:2], masks[1:2])
    torch.testing.assert_close(single[0][0], shared[0][1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="image_embeddings"):
        mini_model.decode(_random_embeddings(MINI, batch=2), tokens)
    with pytest.raises(ValueError, match="image_embeddings"):
        mini_model.decode(emb[:1], tokens)  # the high-res features are missing
    with pytest.raises(ValueError, match="mask_input"):
        mini_model.decode(emb, tokens, mask_input=torch.randn(n, 1, 8, 8))


def test_high_res_features_start_silent_then_shape_the_masks(tmp_path):
    """Zero-initialized projections: a model warm-started from one without high-res features decodes
    exactly as before; once the projections are nonzero, the fine features change the masks."""
    from training.train import warm_start

    torch.manual_seed(3)
    without = FluoroSAM(dataclasses.replace(MINI, high_res_features=False)).eval()
    with_high_res = FluoroSAM(MINI).eval()
    images, tokens = torch.randn(1, 1, 64, 64), torch.randn(2, 256)
    save_checkpoint(without, tmp_path, {})
    _, left_at_init = warm_start(with_high_res, tmp_path)
    assert {name.split(".")[1] for name in left_at_init} == {"high_res"}
    with torch.no_grad():
        before = without.decode(without.encode_image(images), tokens)[0]
        torch.testing.assert_close(with_high_res.decode(with_high_res.encode_image(images), tokens)[0], before)
        for projection in with_high_res.image_encoder.high_res:
            projection[1].weight.normal_(0, 0.5)
        after = with_high_res.decode(with_high_res.encode_image(images), tokens)[0]
    assert (after - before).abs().max() > 1e-2


def test_mask_aware_iou_head_reads_each_mask_and_leaves_the_masks_alone():
    """Same IoU token, other masks -> other predicted IoU (SAM's head cannot tell); no gradient reaches the
    masks or features, and one shared feature map scores like a copy per prompt."""
    torch.manual_seed(4)
    head = FluoroSAM(dataclasses.replace(MINI, mask_aware_iou_head=True)).mask_decoder.iou_prediction_head
    side, channels = MINI.mask_hw, MINI.embed_dim // 8
    token = torch.randn(2, MINI.embed_dim)
    features = torch.randn(1, channels, side, side, requires_grad=True)
    logits = torch.randn(2, 4, side, side, requires_grad=True)
    scores = head(token, logits, features)
    assert scores.shape == (2, 4)
    assert (scores - head(token, -logits, features)).abs().max() > 1e-4
    scores.sum().backward()
    assert logits.grad is None and features.grad is None
    assert all(p.grad is not None for p in head.parameters())
    with torch.no_grad():
        torch.testing.assert_close(head(token, logits, features),
                                   head(token, logits, features.expand(2, -1, -1, -1).clone()))
    token_only = FluoroSAM(dataclasses.replace(MINI, mask_aware_iou_head=False)).eval()
    with torch.no_grad():
        masks, iou = token_only.decode(_random_embeddings(MINI), torch.randn(2, MINI.embed_dim))
    assert iou.shape == (2, 3) and masks.shape == (2, 3, side, side)


def test_vector_quantizer_straight_through_and_restart():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4).train()
    z = torch.randn(5, 4, requires_grad=True)
    quantized, code, distance, loss = vq(z)
    torch.testing.assert_close(quantized, vq.codebook[code])
    torch.testing.assert_close(distance, (z - vq.codebook[code]).norm(dim=1))
    (quantized.sum() + loss).backward()
    assert z.grad is not None and torch.all(z.grad != 0)  # straight-through passes gradients to z
    vq.usage.zero_()
    far = torch.randn(6, 4) * 100
    restarted = vq.restart_dead_codes(far)
    assert 1 <= restarted <= 3  # only candidates farther than the median are used
    _, d = vq.nearest(far)
    assert (d == 0).sum() >= restarted


def test_checkpoint_round_trip_bit_exact(mini_model, tmp_path):
    mini_model.set_phrase_table(torch.randn(7, MINI.text_dim))
    mini_model.set_oov_thresholds(3.5, 0.6)
    meta = {"vocabulary_sha256": "abc", "data_manifest_sha256": "def", "metrics": {"iou": 0.5}, "min_score": 0.4}
    save_checkpoint(mini_model, tmp_path, meta)
    loaded, loaded_meta = load_checkpoint(tmp_path)
    original = mini_model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == original[name].dtype and torch.equal(tensor, original[name]), name
    assert loaded.phrase_table.dtype == torch.float16 and loaded.phrase_table.shape == (7, MINI.text_dim)
    assert loaded_meta["oov"] == {"code_distance_max": 3.5, "vocab_similarity_min": 0.6}
    assert loaded_meta["min_score"] == 0.4 and loaded_meta["config"]["name"] == "mini"
    assert (loaded.oov_code_distance_max, loaded.oov_vocab_similarity_min) == (3.5, 0.6)
    assert not any(k.startswith("sentence") for k in load_file(str(tmp_path / "model.safetensors")))
    with torch.no_grad():
        x = torch.randn(1, 1, 64, 64)
        assert all(torch.equal(a, b) for a, b in zip(loaded.encode_image(x), mini_model.encode_image(x), strict=True))
    mini_model.set_phrase_table(torch.zeros(0, MINI.text_dim))
    mini_model.set_oov_thresholds(math.inf, -math.inf)


def test_load_checkpoint_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_checkpoint(tmp_path)


def test_average_of_fine_tunes(tmp_path):
    """The mean of the weights, the strictest refusal thresholds until recalibrated, mismatches refused."""
    from training.average import average_checkpoints

    torch.manual_seed(1)
    table = torch.randn(5, MINI.text_dim)
    folders = []
    for k, (distance_max, similarity_min, min_score) in enumerate(((3.0, 0.5, 0.3), (4.0, 0.7, None))):
        model = FluoroSAM(MINI).eval()
        model.set_phrase_table(table)
        model.set_oov_thresholds(distance_max, similarity_min)
        save_checkpoint(model, tmp_path / str(k), {"vocabulary_sha256": "v", "data_manifest_sha256": "d",
                                                   "min_score": min_score})
        folders.append(tmp_path / str(k))
    states = [load_file(str(f / "model.safetensors")) for f in folders]
    averaged, meta = average_checkpoints(folders)
    for name, tensor in averaged.state_dict().items():
        a, b = states[0][name], states[1][name]
        expected = a if not a.is_floating_point() else ((a.double() + b.double()) / 2).to(a.dtype)
        assert tensor.dtype == a.dtype and torch.equal(tensor, expected), name
    assert not torch.equal(states[0]["quantizer.codebook"], states[1]["quantizer.codebook"])  # a real average
    assert (averaged.oov_code_distance_max, averaged.oov_vocab_similarity_min) == (3.0, 0.7)
    assert meta["min_score"] == 0.3 and meta["data_manifest_sha256"] == "d" and len(meta["averaged_from"]) == 2
    save_checkpoint(averaged, tmp_path / "soup", meta)
    reloaded, _ = load_checkpoint(tmp_path / "soup")
    assert all(torch.equal(t, averaged.state_dict()[n]) for n, t in reloaded.state_dict().items())
    # An average of an average keeps the inner one's ingredients (it has no training record of its own).
    _, nested = average_checkpoints([tmp_path / "soup", folders[0]])
    assert nested["averaged_from"][0]["averaged_from"] == meta["averaged_from"]
    assert "averaged_from" not in nested["averaged_from"][1]

    # The same phrase table recomputed on another machine, an ulp apart in places: the same table, the first kept.
    nudged, _ = load_checkpoint(folders[1])
    ulp_apart = table.half().clone()
    ulp_apart[0, :7] = torch.nextafter(ulp_apart[0, :7], torch.full_like(ulp_apart[0, :7], 2.0))
    nudged.set_phrase_table(ulp_apart)
    save_checkpoint(nudged, tmp_path / "nudged", {"vocabulary_sha256": "v"})
    assert not torch.equal(nudged.phrase_table, states[0]["phrase_table"])
    assert torch.equal(average_checkpoints([folders[0], tmp_path / "nudged"])[0].phrase_table,
                       states[0]["phrase_table"])
    other = FluoroSAM(MINI).eval()
    other.set_phrase_table(torch.randn(5, MINI.text_dim))
    save_checkpoint(other, tmp_path / "other-table", {"vocabulary_sha256": "v"})
    with pytest.raises(ValueError, match="phrase_table is not trained"):
        average_checkpoints([folders[0], tmp_path / "other-table"])
    save_checkpoint(FluoroSAM(MINI).eval(), tmp_path / "other-vocab", {"vocabulary_sha256": "w"})
    with pytest.raises(ValueError, match="vocabulary_sha256"):
        average_checkpoints([folders[0], tmp_path / "other-vocab"])
    with pytest.raises(ValueError, match="at least two"):
        average_checkpoints(folders[:1])
    from fluorosam_ros.cli import main
    assert main(["average", str(folders[0]), str(tmp_path / "other-vocab"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_output_rule_takes_the_single_mask_token_only_with_enough_clicks():
    """SAM's rule, shared by evaluation and the exported decoder: >= N clicks (padding not counted) -> token 0."""
    from training.model.fluorosam import choose_output

    logits = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4, 1, 1).expand(3, 4, 2, 2)
    iou = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.9, 0.7, 0.1, 0.2], [0.0, 0.1, 0.2, 0.3]])
    labels = torch.tensor([[1, -1, -1], [1, 0, -1], [0, 1, 1]])  # 1, 2 and 3 clicks
    chosen, score, index = choose_output(logits, iou, labels, 2)
    assert (index == 0).tolist() == [False, True, True]
    assert chosen[:, 0, 0].tolist() == [2.0, 4.0, 8.0] and score.tolist() == pytest.approx([0.8, 0.9, 0.0])
    for never in (choose_output(logits, iou, labels, 0), choose_output(logits, iou, None, 2)):
        assert not (never[2] == 0).any() and never[0][:, 0, 0].tolist() == [2.0, 5.0, 11.0]


def test_output_rule_answers_text_only_prompts_with_the_single_mask_token_when_asked():
    """``single_mask_text_only``: no click (None, or padding only) -> token 0; a lone click keeps the pick."""
    from training.model.fluorosam import choose_output

    logits = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4, 1, 1)
    iou = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.9, 0.7, 0.1, 0.2], [0.0, 0.1, 0.2, 0.3]])
    labels = torch.tensor([[-1, -1], [1, -1], [1, 0]])  # 0, 1 and 2 clicks
    assert choose_output(logits, iou, labels, 0, True)[2].tolist() == [0, 1, 3]
    assert choose_output(logits, iou, labels, 2, True)[2].tolist() == [0, 1, 0]
    assert choose_output(logits, iou, None, 0, True)[2].tolist() == [0, 0, 0]
    assert choose_output(logits, iou, torch.zeros(3, 0, dtype=torch.long), 2, True)[2].tolist() == [0, 0, 0]
    assert choose_output(logits, iou, None, 2, False)[2].tolist() == [2, 1, 3]


def test_copied_mask_token_answers_like_its_source():
    torch.manual_seed(0)
    model = FluoroSAM(MINI).eval()
    model.mask_decoder.copy_mask_token(2, 0)
    emb = _random_embeddings(MINI)
    with torch.no_grad():
        masks, iou = model.decode_all_tokens(emb, torch.randn(2, MINI.embed_dim))
    torch.testing.assert_close(masks[:, 0], masks[:, 2])
    torch.testing.assert_close(iou[:, 0], iou[:, 2])
    with pytest.raises(ValueError, match="mask-aware"):
        FluoroSAM(dataclasses.replace(MINI, mask_aware_iou_head=True)).mask_decoder.copy_mask_token(2, 0)


def test_fine_path_answers_at_input_resolution_starting_as_the_model_it_warm_starts_from(tmp_path):
    """The fine path's hypernetworks start at zero: a warm start from a model without it returns that model's
    masks bilinearly upsampled to the input, exactly; a previous mask at input resolution is a valid prompt; once
    the hypernetworks are nonzero, the stride-2 and input-resolution features shape the masks."""
    from training.train import warm_start

    torch.manual_seed(5)
    config = dataclasses.replace(MINI, swin_depths=(1, 1, 1, 1), swin_heads=(1, 2, 4, 8), embed_stride=16)
    coarse = FluoroSAM(config).eval()
    fine = FluoroSAM(dataclasses.replace(config, fine_features=True)).eval()
    assert fine.config.mask_hw == 64 and fine.config.prompt_mask_hw == coarse.config.mask_hw == 16
    save_checkpoint(coarse, tmp_path, {})
    _, left_at_init = warm_start(fine, tmp_path)
    assert {name.split(".")[1] for name in left_at_init} == {"stride2", "full_res", "fine_upscaling",
                                                             "fine_hypernetworks_mlps"}
    images, tokens = torch.randn(1, 1, 64, 64), torch.randn(3, 256)
    with torch.no_grad():
        features = fine.encode_image(images)
        assert [tuple(t.shape[1:]) for t in features[-2:]] == [(16, 32, 32), (8, 64, 64)]
        before = coarse.decode(coarse.encode_image(images), tokens)[0]
        logits = fine.decode(features, tokens)[0]
        assert logits.shape == (3, 3, 64, 64)
        torch.testing.assert_close(logits, coarse.upsample_to_input(before))
        again = fine.decode(features, tokens, mask_input=logits[:, :1])[0]
        reference = coarse.decode(coarse.encode_image(images), tokens, mask_input=F.avg_pool2d(logits[:, :1], 4))[0]
        torch.testing.assert_close(again, coarse.upsample_to_input(reference))
        with pytest.raises(ValueError, match="mask_input"):
            fine.decode(features, tokens, mask_input=logits[:, :1, ::2, ::2])  # the prompt side, not the output
        for mlp in fine.mask_decoder.fine_hypernetworks_mlps:
            mlp.layers[-1].weight.normal_(0, 0.5)
        after = fine.decode(features, tokens)[0]
    assert (after - logits).abs().max() > 1e-2


def test_fine_path_needs_a_stride_2_stage():
    with pytest.raises(ValueError, match="stride-2 stage"):
        dataclasses.replace(get_config("base"), fine_features=True)


def test_average_of_a_model_and_its_fine_path_fine_tune(tmp_path):
    """The shared tensors are averaged, the fine path's come from the input that has it; other configs are refused."""
    from training.average import average_checkpoints

    torch.manual_seed(6)
    config = dataclasses.replace(MINI, swin_depths=(1, 1, 1, 1), swin_heads=(1, 2, 4, 8), embed_stride=16)
    table = torch.randn(5, config.text_dim)
    models = [FluoroSAM(config).eval(), FluoroSAM(dataclasses.replace(config, fine_features=True)).eval()]
    records = [{}, {"training": {"bodies": ["phantom"], "initialized_from": {"training": {"bodies": ["chest"]}}}}]
    for k, model in enumerate(models):
        model.set_phrase_table(table)
        save_checkpoint(model, tmp_path / str(k), {"vocabulary_sha256": "v", **records[k]})
    averaged, meta = average_checkpoints([tmp_path / "0", tmp_path / "1"])
    assert averaged.config.fine_features and meta["bodies"] == ["chest", "phantom"]  # down the warm-start chain
    coarse, fine = (m.state_dict() for m in models)
    for name, tensor in averaged.state_dict().items():
        if name in coarse and tensor.is_floating_point() and name != "phrase_table":
            torch.testing.assert_close(tensor, ((coarse[name].double() + fine[name].double()) / 2).float())
        elif name not in coarse:
            assert torch.equal(tensor, fine[name]), name
    save_checkpoint(FluoroSAM(dataclasses.replace(config, decoder_depth=1)), tmp_path / "2", {"vocabulary_sha256": "v"})
    with pytest.raises(ValueError, match="config"):
        average_checkpoints([tmp_path / "0", tmp_path / "2"])
