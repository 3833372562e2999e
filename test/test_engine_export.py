"""ONNX export: checker-valid graphs, parity with PyTorch, TensorRT operator coverage, text-token table."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from engine.export import export_model
from engine.export_format import (
    DECODER_FILE,
    ENCODER_FILE,
    TEXT_ENCODER_FILE,
    TEXT_TABLE_FILE,
    TOKENIZER_FILE,
    embedding_shapes,
    load_text_table,
    pack_points,
    read_export_meta,
)
from fluorosam_common.hashing import file_sha256
from training.model import FluoroSAM, get_config, load_checkpoint, save_checkpoint

OPS_FILE = Path(__file__).parent / "data" / "tensorrt_onnx_ops.txt"
TABLE_PHRASES = ["left lung", "right lung", "the heart", "guidewire"]

pytestmark = pytest.mark.slow  # one export of the tiny model per module (~10-20 s on 2 cores)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("model")
    model = FluoroSAM(get_config("tiny")).eval()
    with torch.no_grad():  # the high-res projections start at zero: make the path matter for parity
        for projection in model.image_encoder.high_res:
            projection[1].weight.normal_(0, 0.05)
    save_checkpoint(model, model_dir, {})
    onnx_dir = export_model(model_dir, tmp_path_factory.mktemp("onnx"), text_phrases=TABLE_PHRASES)
    model, _ = load_checkpoint(model_dir)
    return model, onnx_dir


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_graphs_pass_the_checker_and_meta_hashes_match(exported):
    _, onnx_dir = exported
    meta = read_export_meta(onnx_dir)
    for name in (ENCODER_FILE, DECODER_FILE, TEXT_TABLE_FILE, TEXT_ENCODER_FILE, TOKENIZER_FILE):
        assert meta["sha256"][name] == file_sha256(onnx_dir / name)
    onnx.checker.check_model(onnx.load(str(onnx_dir / ENCODER_FILE)), full_check=True)
    decoder = onnx.load(str(onnx_dir / DECODER_FILE))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.graph.input}
    assert dims["text_tokens"] == ["prompts", 256]
    assert dims["point_coords"] == ["prompts", "points", 2]
    assert dims["image_embedding"] == [1, 256, meta["embed_hw"], meta["embed_hw"]]
    hw = meta["embed_hw"]
    assert meta["embeddings"] == {"image_embedding": [1, 256, hw, hw], "high_res_2x": [1, 64, 2 * hw, 2 * hw],
                                  "high_res_4x": [1, 32, 4 * hw, 4 * hw]}
    assert all(dims[name] == shape for name, shape in meta["embeddings"].items())
    assert json.loads((onnx_dir / "export.json").read_text())["opset"] == meta["opset"]


def test_encoder_parity(exported):
    model, onnx_dir = exported
    size = model.config.image_size
    image = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        references = [t.numpy() for t in model.encode_image(image)]
    outputs = _session(onnx_dir / ENCODER_FILE).run(None, {"image": image.numpy()})
    assert len(outputs) == len(references) == 3
    for output, reference in zip(outputs, references):
        assert output.shape == reference.shape
        assert np.abs(output - reference).max() < 1e-3 * max(1.0, np.abs(reference).max())


@pytest.mark.parametrize("k,clicks,with_mask", [(1, 0, False), (4, 0, False), (3, 2, True), (9, 1, False)])
def test_decoder_parity(exported, k, clicks, with_mask):
    model, onnx_dir = exported
    config = model.config
    g = torch.Generator().manual_seed(k * 10 + clicks)
    embeddings = {name: torch.randn(*shape, generator=g) for name, shape in embedding_shapes(config).items()}
    tokens = torch.randn(k, 256, generator=g)
    points = [[(float(x), float(y), int(lbl)) for x, y, lbl in zip(torch.randint(0, 255, (clicks,), generator=g),
                                                                   torch.randint(0, 255, (clicks,), generator=g),
                                                                   torch.randint(0, 2, (clicks,), generator=g))]
              for _ in range(k)]
    coords, labels = pack_points(points, lambda xy: xy)
    mask_input = torch.randn(k, 1, config.mask_hw, config.mask_hw, generator=g)
    has_mask = np.full((k, 1), float(with_mask), np.float32)
    masks, scores, ious = _session(onnx_dir / DECODER_FILE).run(None, {
        **{name: t.numpy() for name, t in embeddings.items()}, "text_tokens": tokens.numpy(), "point_coords": coords,
        "point_labels": labels, "mask_input": mask_input.numpy(), "has_mask_input": has_mask})
    with torch.no_grad():
        # FluoroSAM.decode appends SAM's padding point itself: give it the clicks without pack_points' pad.
        ref_coords = torch.from_numpy(coords[:, :-1]) if clicks else None
        ref_labels = torch.from_numpy(labels[:, :-1]).long() if clicks else None
        logits, iou_pred = model.decode(tuple(embeddings.values()), tokens, ref_coords, ref_labels,
                                        mask_input if with_mask else None)
        best, best_score = model.best_mask(logits, iou_pred)
    assert masks.shape == (k, config.mask_hw, config.mask_hw)
    np.testing.assert_allclose(scores, best_score.numpy(), atol=1e-3)
    np.testing.assert_allclose(ious, iou_pred.numpy(), atol=1e-3)
    for i in range(k):
        assert _iou(masks[i] > 0, best[i].numpy() > 0) >= 0.99


@pytest.fixture(scope="module")
def exported_single_mask(tmp_path_factory):
    """A model whose config answers text-only prompts and prompts with 2+ clicks with SAM's single-mask token."""
    torch.manual_seed(1)
    model_dir = tmp_path_factory.mktemp("single")
    save_checkpoint(FluoroSAM(dataclasses.replace(get_config("tiny"), single_mask_min_points=2,
                                                  single_mask_text_only=True)).eval(), model_dir, {})
    onnx_dir = export_model(model_dir, tmp_path_factory.mktemp("single_onnx"), with_text_table=False)
    model, _ = load_checkpoint(model_dir)
    return model, onnx_dir


def test_exported_decoder_follows_the_single_mask_rule(exported_single_mask):
    """Rows with 0 (padding only), 1 and 2 clicks in one batch: the graph answers the text-only and 2-click
    rows with token 0, the 1-click row with the best multimask mask, exactly as evaluation's
    ``choose_output`` does in torch; a batch with no points at all (P = 0) takes token 0 too."""
    model, onnx_dir = exported_single_mask
    config = model.config
    g = torch.Generator().manual_seed(3)
    embeddings = {name: torch.randn(*shape, generator=g) for name, shape in embedding_shapes(config).items()}
    feeds = {name: t.numpy() for name, t in embeddings.items()}
    tokens = torch.randn(3, 256, generator=g)
    coords, labels = pack_points([[], [(40.0, 60.0, 1)], [(40.0, 60.0, 1), (200.0, 100.0, 0)]], lambda xy: xy)
    mask_input = np.zeros((3, 1, config.mask_hw, config.mask_hw), np.float32)
    session = _session(onnx_dir / DECODER_FILE)
    masks, scores, ious = session.run(None, {
        **feeds, "text_tokens": tokens.numpy(), "point_coords": coords, "point_labels": labels,
        "mask_input": mask_input, "has_mask_input": np.zeros((3, 1), np.float32)})
    with torch.no_grad():
        ref_labels = torch.from_numpy(labels[:, :-1]).long()
        logits, iou_pred = model.decode_all_tokens(tuple(embeddings.values()), tokens,
                                                   torch.from_numpy(coords[:, :-1]), ref_labels)
        chosen, score, index = model.choose_output(logits, iou_pred, ref_labels)
    assert (index == 0).tolist() == [True, False, True]
    np.testing.assert_allclose(scores, score.numpy(), atol=1e-3)
    np.testing.assert_allclose(ious, iou_pred[:, 1:].numpy(), atol=1e-3)
    for i in range(3):
        assert _iou(masks[i] > 0, chosen[i].numpy() > 0) >= 0.99
    assert _iou(masks[2] > 0, logits[2, 0].numpy() > 0) >= 0.99

    text_coords, text_labels = pack_points([[]], lambda xy: xy)
    assert text_labels.shape == (1, 0)
    text_masks, text_scores, _ = session.run(None, {
        **feeds, "text_tokens": tokens[:1].numpy(), "point_coords": text_coords, "point_labels": text_labels,
        "mask_input": mask_input[:1], "has_mask_input": np.zeros((1, 1), np.float32)})
    with torch.no_grad():
        text_logits, text_iou = model.decode_all_tokens(tuple(embeddings.values()), tokens[:1])
    np.testing.assert_allclose(text_scores, text_iou[:, 0].numpy(), atol=1e-3)
    assert _iou(text_masks[0] > 0, text_logits[0, 0].numpy() > 0) >= 0.99


def test_every_exported_operator_is_supported_by_tensorrt(exported, exported_single_mask):
    lines = [line.strip() for line in OPS_FILE.read_text().splitlines()]
    assert any("onnx-tensorrt" in line and "operators.md" in line for line in lines if line.startswith("#"))
    supported = {line for line in lines if line and not line.startswith("#")}
    for onnx_dir in (exported[1], exported_single_mask[1]):
        for name in (ENCODER_FILE, DECODER_FILE):
            used = {node.op_type for node in onnx.load(str(onnx_dir / name)).graph.node}
            assert used, name
            assert used <= supported, f"{name} uses operators TensorRT 10 does not list: {sorted(used - supported)}"


def test_layernorm2d_exports_as_single_layernormalization(exported):
    """SAM's LayerNorm2d must not decompose into ReduceMean/Pow/Sqrt (FP16 overflow in TensorRT)."""
    _, onnx_dir = exported
    for name in (ENCODER_FILE, DECODER_FILE):
        ops = [node.op_type for node in onnx.load(str(onnx_dir / name)).graph.node]
        assert "LayerNormalization" in ops
        assert "ReduceMean" not in ops and "Sqrt" not in ops, name


def test_text_table_matches_the_text_encoder(exported):
    model, onnx_dir = exported
    table = load_text_table(onnx_dir / TEXT_TABLE_FILE)
    assert sorted(table) == sorted(["left lung", "right lung", "heart", "guidewire"])  # normalized
    with torch.no_grad():
        reference = model.encode_text(["heart"]).tokens[0].numpy()
    np.testing.assert_allclose(table["heart"][0], reference, atol=1e-6)


def test_text_graph_matches_the_text_encoder_on_free_text(exported):
    """The exported text side (tokenizer + sentence encoder + VQ + OOV rule) gives the model's tokens and flags."""
    from engine.text_encoder import OnnxTextEncoder

    model, onnx_dir = exported
    graph = OnnxTextEncoder(onnx_dir, read_export_meta(onnx_dir)["text_encoder"])
    prompts = ["left lung", "tip of the guidewire", "pizza with pineapple and a very long tail of words " * 3]
    tokens, oov = graph.encode(prompts)
    with torch.no_grad():
        reference = model.encode_text(prompts)
    np.testing.assert_allclose(tokens, reference.tokens.numpy(), atol=1e-5)
    assert oov.tolist() == reference.oov.tolist()


def test_pack_points_pads_like_sam():
    coords, labels = pack_points([[(10.0, 20.0, 1)], []], lambda xy: xy * 2)
    assert coords.shape == (2, 2, 2) and labels.tolist() == [[1, -1], [-1, -1]]
    assert coords[0, 0].tolist() == [20.0, 40.0]
    coords, labels = pack_points([[], []], lambda xy: xy)
    assert coords.shape == (2, 0, 2) and labels.shape == (2, 0)
    with pytest.raises(ValueError, match="label"):
        pack_points([[(1.0, 2.0, 3)]], lambda xy: xy)


def test_an_export_in_an_older_format_is_refused_with_the_fix(tmp_path):
    (tmp_path / "export.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ValueError, match="run `fluorosam export` again"):
        read_export_meta(tmp_path)


def test_fine_path_exports_with_parity(tmp_path):
    """A model with the fine path: the encoder hands the decoder its two fine maps too, the decoder answers at
    input resolution and takes a previous mask there, and both graphs match PyTorch."""
    torch.manual_seed(2)
    model = FluoroSAM(dataclasses.replace(get_config("tiny"), fine_features=True)).eval()
    with torch.no_grad():  # the fine hypernetworks start at zero: make the path matter for parity
        for mlp in model.mask_decoder.fine_hypernetworks_mlps:
            mlp.layers[-1].weight.normal_(0, 0.05)
    save_checkpoint(model, tmp_path / "model", {})
    onnx_dir = export_model(tmp_path / "model", tmp_path / "onnx", with_text_table=False)
    meta = read_export_meta(onnx_dir)
    assert meta["mask_hw"] == 256 and meta["embeddings"]["fine_input"] == [1, 8, 256, 256]
    image = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = model.encode_image(image)
    outputs = _session(onnx_dir / ENCODER_FILE).run(None, {"image": image.numpy()})
    assert [o.shape for o in outputs] == [tuple(t.shape) for t in features]
    for output, reference in zip(outputs, features):
        assert np.abs(output - reference.numpy()).max() < 1e-3 * max(1.0, float(reference.abs().max()))
    tokens = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    previous = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(5))
    coords, labels = pack_points([[], [], []], lambda xy: xy)
    masks, scores, _ = _session(onnx_dir / DECODER_FILE).run(None, {
        **{name: t.numpy() for name, t in zip(embedding_shapes(model.config), features)},
        "text_tokens": tokens.numpy(), "point_coords": coords, "point_labels": labels,
        "mask_input": previous.numpy(), "has_mask_input": np.ones((3, 1), np.float32)})
    with torch.no_grad():
        best, best_score = model.best_mask(*model.decode(features, tokens, mask_input=previous))
    assert masks.shape == (3, 256, 256)
    np.testing.assert_allclose(scores, best_score.numpy(), atol=1e-3)
    for i in range(3):
        assert _iou(masks[i] > 0, best[i].numpy() > 0) >= 0.99
