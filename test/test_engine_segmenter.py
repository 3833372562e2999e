"""Segmenter: backend agreement, caches and their invalidation, refusals, non-square alignment, bad frames."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.export import export_model
from engine.segmenter import Prompt, Segmenter, SegmentResult, label_mask
from fluorosam_common.frames import FrameError
from training.model import FluoroSAM, get_config, save_checkpoint

pytestmark = pytest.mark.slow  # one export of the tiny model per module (~10-20 s on 2 cores)
TABLE_PHRASES = ["left lung", "right lung", "heart", "spine"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("model")
    save_checkpoint(FluoroSAM(get_config("tiny")).eval(), model_dir, {"min_score": None})
    onnx_dir = export_model(model_dir, model_dir / "onnx", text_phrases=TABLE_PHRASES)
    return model_dir, onnx_dir


@pytest.fixture(scope="module")
def onnx_segmenter(model_dirs):
    return Segmenter(model_dirs[0], backend="onnxruntime", threads=1)


@pytest.fixture
def segmenter(model_dirs):
    """A fresh segmenter per test (own caches and counters), on the ONNX export next to the model."""
    return Segmenter(model_dirs[0], backend="onnxruntime", threads=1)


def _frame(seed: int, shape=(96, 128), dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.sin(xx / (7 + seed)) + np.cos(yy / 5) + 0.3 * rng.random(shape)
    image = (image - image.min()) / (image.max() - image.min())
    return (image * (np.iinfo(dtype).max if dtype != np.float32 else 1.0)).astype(dtype)


def _iou(a, b) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_auto_finds_the_export_next_to_the_model(model_dirs):
    segmenter = Segmenter(model_dirs[0], backend="auto", threads=1)
    if torch.cuda.is_available():
        pytest.skip("auto picks torch-cuda on a CUDA machine")
    assert segmenter.backend_name == "onnxruntime"
    assert segmenter.onnx_dir == model_dirs[1]


def test_torch_and_onnxruntime_agree(model_dirs, onnx_segmenter):
    torch_segmenter = Segmenter(model_dirs[0], backend="torch", threads=1)
    assert torch_segmenter.backend_name == "torch"
    prompts = ["left lung", Prompt("heart", ((40.0, 30.0, 1), (100.0, 80.0, 0))), "spine"]
    for seed, shape in [(1, (96, 128)), (2, (128, 80)), (3, (64, 64))]:
        frame = _frame(seed, shape)
        a, b = onnx_segmenter.segment(frame, prompts), torch_segmenter.segment(frame, prompts)
        for ra, rb in zip(a.results, b.results):
            assert ra.reason == rb.reason and abs(ra.score - rb.score) < 1e-3
            if ra.mask is not None:
                assert ra.mask.shape == shape
                assert _iou(ra.mask, rb.mask) >= 0.99


def test_identical_frames_reuse_and_changed_frames_recompute(segmenter):
    frame = _frame(1)
    first = segmenter.segment(frame, ["left lung"])
    assert not first.embedding_reused
    assert segmenter.segment(frame.copy(), ["left lung"]).embedding_reused  # same bytes, other buffer
    changed = frame.copy()
    changed[10, 10] ^= 1  # one bit in one pixel
    assert not segmenter.segment(changed, ["left lung"]).embedding_reused
    frame_in_place = changed  # the caller reuses its buffer for the next frame
    frame_in_place[:] = _frame(5)
    assert not segmenter.segment(frame_in_place, ["left lung"]).embedding_reused
    assert segmenter.counters["embedding_computes"] == 3 and segmenter.counters["embedding_reuses"] == 1
    # Same bytes viewed with another shape is another frame.
    reshaped = np.ascontiguousarray(frame_in_place).reshape(128, 96)
    assert not segmenter.segment(reshaped, ["left lung"]).embedding_reused


def test_prompt_change_on_held_frame_runs_decoder_only_in_one_batch(segmenter):
    frame = _frame(2)
    segmenter.segment(frame, ["left lung"])
    result = segmenter.segment(frame, ["right lung", "heart", "spine"])
    assert result.embedding_reused and "encode" not in result.timings_ms
    assert segmenter.counters["embedding_computes"] == 1
    assert segmenter.counters["decoder_runs"] == 2  # the three prompts went through ONE decoder call
    assert [r.prompt for r in result.results] == ["right lung", "heart", "spine"]


def test_text_cache_hits_normalized_prompts(segmenter):
    frame = _frame(3)
    segmenter.segment(frame, ["left lung", "heart"])
    segmenter.segment(frame, ["The Left Lung!", "heart"])
    assert segmenter.counters["text_cache_misses"] == 2
    assert segmenter.counters["text_cache_hits"] == 2


def test_small_text_cache_evicts_without_refusing(model_dirs):
    segmenter = Segmenter(model_dirs[0], backend="onnxruntime", threads=1, text_cache_size=2)
    result = segmenter.segment(_frame(3), ["left lung", "right lung", "heart"])
    assert [r.reason for r in result.results if r.reason == "out_of_vocabulary"] == []
    segmenter.segment(_frame(3), ["left lung"])  # evicted by the two later prompts
    assert segmenter.counters["text_cache_misses"] == 4 and segmenter.counters["text_cache_hits"] == 0


def test_failed_encode_never_leaves_a_stale_embedding(segmenter):
    frame_a, frame_b = _frame(1), _frame(4)
    segmenter.segment(frame_a, ["left lung"])
    real_encode = segmenter.backend.encode

    def failing_encode(image):
        raise RuntimeError("device lost")

    segmenter.backend.encode = failing_encode
    with pytest.raises(RuntimeError, match="device lost"):
        segmenter.segment(frame_b, ["left lung"])
    segmenter.backend.encode = real_encode
    # Neither frame may now reuse anything: A's embedding was dropped before B was attempted.
    assert not segmenter.segment(frame_a, ["left lung"]).embedding_reused
    assert not segmenter.segment(frame_b, ["left lung"]).embedding_reused


@pytest.mark.parametrize("bad,message", [
    (np.zeros((0, 0), np.uint16), "smaller"),
    (np.full((32, 32), np.nan, np.float32), "NaN"),
    (np.zeros((32, 32), np.int64), "dtype"),
    (np.zeros((32, 32), bool), "dtype"),
    (np.zeros((9000, 16), np.uint8), "exceeds"),
    (np.zeros((32, 32, 3), np.uint8), "2-D"),
    (np.zeros(32, np.uint8), "2-D"),
    ([[1, 2], [3, 4]], "numpy array"),
])
def test_bad_frames_raise_clear_errors_and_the_stream_recovers(segmenter, bad, message):
    good = _frame(6)
    segmenter.segment(good, ["left lung"])
    with pytest.raises(FrameError, match=message):
        segmenter.segment(bad, ["left lung"])
    again = segmenter.segment(good, ["left lung"])
    assert again.embedding_reused  # the bad frame changed nothing
    other = segmenter.segment(_frame(7), ["left lung"])
    assert not other.embedding_reused and other.frame_shape == (96, 128) and "encode" in other.timings_ms


def test_near_duplicate_threshold(model_dirs):
    segmenter = Segmenter(model_dirs[0], backend="onnxruntime", threads=1, near_duplicate_threshold=0.01)
    frame = _frame(1)
    segmenter.segment(frame, ["heart"])
    noisy = (frame.astype(np.int64) + np.random.default_rng(0).integers(-30, 30, frame.shape)).clip(0, 65535)
    assert segmenter.segment(noisy.astype(np.uint16), ["heart"]).embedding_reused
    assert segmenter.counters["near_duplicate_reuses"] == 1
    assert not segmenter.segment(_frame(8), ["heart"]).embedding_reused
    with pytest.raises(ValueError, match="fraction"):
        Segmenter(model_dirs[0], backend="onnxruntime", near_duplicate_threshold=2.0)


def test_out_of_vocabulary_and_low_score_refusals(model_dirs, tmp_path):
    # Calibrated thresholds that refuse every prompt: the exported text graph carries them (no torch at run time).
    model = FluoroSAM(get_config("tiny")).eval()
    model.load_state_dict(Segmenter(model_dirs[0], backend="torch").model.state_dict())
    model.set_oov_thresholds(code_distance_max=-1.0, vocab_similarity_min=2.0)
    save_checkpoint(model, tmp_path, {"min_score": None})
    export_model(tmp_path, tmp_path / "onnx", with_text_table=False)
    segmenter = Segmenter(tmp_path / "onnx", backend="onnxruntime", threads=1)
    result = segmenter.segment(_frame(1), ["left lung", "pizza with pineapple", "", "heart"])
    assert [r.reason for r in result.results] == ["out_of_vocabulary"] * 4
    assert result.results[1].mask is None and result.results[1].refused
    assert not segmenter.torch_loaded
    lax = Segmenter(model_dirs[0], backend="onnxruntime", threads=1)
    reasons = [r.reason for r in lax.segment(_frame(1), ["left lung", "pizza with pineapple", "", "heart"]).results]
    assert reasons[2] == "out_of_vocabulary" and "out_of_vocabulary" not in (reasons[0], reasons[3])
    strict = Segmenter(model_dirs[0], backend="onnxruntime", threads=1, min_score=1e9)
    low = strict.segment(_frame(1), ["left lung", "heart"])
    assert [r.reason for r in low.results] == ["low_score", "low_score"]
    assert all(r.mask is None and r.refused for r in low.results)
    assert label_mask(low).shape == (96, 128) and not label_mask(low).any()


class _GeometryBackend:
    """Stand-in backend whose 'mask' is the bright part of the model input: isolates the geometry path."""

    name = "geometry"

    def __init__(self, mask_hw: int, empty: bool = False) -> None:
        self.mask_hw, self.empty = mask_hw, empty
        self.seen_has_mask: list[np.ndarray] = []

    def encode(self, image):
        return image

    def decode(self, embedding, text_tokens, point_coords, point_labels, mask_input, has_mask_input):
        self.seen_has_mask.append(has_mask_input.copy())
        k = text_tokens.shape[0]
        low = torch.nn.functional.interpolate(torch.from_numpy(embedding), size=(self.mask_hw, self.mask_hw),
                                              mode="area")[0, 0].numpy()
        logits = np.full_like(low, -5.0) if self.empty else low - 0.5  # normalized input > 0.5 <=> bright
        return np.repeat(logits[None], k, 0), np.full(k, 0.9, np.float32), np.full((k, 3), 0.9, np.float32)


@pytest.mark.parametrize("shape", [(120, 300), (300, 120), (97, 211)])
def test_non_square_frames_come_back_aligned(segmenter, shape):
    h, w = shape
    frame = np.zeros(shape, np.uint8)
    y0, y1, x0, x1 = h // 4, h // 2, w // 3, (4 * w) // 5
    frame[y0:y1, x0:x1] = 255
    segmenter.backend = _GeometryBackend(segmenter.mask_hw)
    result = segmenter.segment(frame, ["heart"]).results[0]
    assert result.mask.shape == shape
    assert _iou(result.mask, frame > 0) >= 0.9
    bx0, by0, bx1, by1 = result.bbox
    assert abs(bx0 - x0) <= 2 and abs(by0 - y0) <= 2 and abs(bx1 - (x1 - 1)) <= 2 and abs(by1 - (y1 - 1)) <= 2
    cx, cy = result.centroid
    assert abs(cx - (x0 + x1 - 1) / 2) < 2 and abs(cy - (y0 + y1 - 1) / 2) < 2
    assert result.area == int(result.mask.sum())


def test_tool_prompts_carry_the_tip_and_anatomy_does_not(segmenter):
    frame = np.zeros((128, 128), np.uint8)
    frame[60:68, 0:92] = 255  # a wire entering from the left border, turning down at x ~ 88
    frame[60:112, 84:92] = 255
    segmenter.backend = _GeometryBackend(segmenter.mask_hw)
    wire, heart = segmenter.segment(frame, ["the guidewire", "heart"]).results
    assert heart.tip is None and not heart.refused
    x, y = wire.tip
    assert 82 <= x <= 93 and y >= 100, wire.tip  # the inner end, not the entry at x = 0


def test_empty_mask_is_refused(segmenter):
    segmenter.backend = _GeometryBackend(segmenter.mask_hw, empty=True)
    result = segmenter.segment(_frame(1), ["heart"]).results[0]
    assert result.refused and result.reason == "empty_mask" and result.mask is None


def test_temporal_prompt_feeds_previous_mask_back(model_dirs):
    segmenter = Segmenter(model_dirs[0], backend="onnxruntime", threads=1, temporal_prompt=True)
    backend = _GeometryBackend(segmenter.mask_hw)
    segmenter.backend = backend
    frame = np.zeros((64, 80), np.uint8)
    frame[10:30, 20:50] = 200
    segmenter.segment(frame, ["heart"])
    segmenter.segment(np.roll(frame, 3, axis=1), ["heart", "left lung"])
    assert backend.seen_has_mask[0].ravel().tolist() == [0.0]
    assert backend.seen_has_mask[1].ravel().tolist() == [1.0, 0.0]
    segmenter.segment(np.zeros((50, 50), np.uint8) + np.eye(50, dtype=np.uint8), ["heart"])  # new geometry
    assert backend.seen_has_mask[2].ravel().tolist() == [0.0]


def test_label_mask_paints_prompts_in_order():
    a = np.zeros((4, 5), bool)
    a[0, :3] = True
    b = np.zeros((4, 5), bool)
    b[0, 2:] = True
    from engine.segmenter import PromptResult

    result = SegmentResult([PromptResult("a", a, 0.9, False, ""), PromptResult("x", None, 0.0, True, "low_score"),
                            PromptResult("b", b, 0.9, False, "")], False, {}, (4, 5))
    labels = Segmenter.label_mask(result)
    assert labels.dtype == np.uint8 and labels[0].tolist() == [1, 1, 3, 3, 3] and not labels[1:].any()


def test_bad_arguments(model_dirs, segmenter):
    with pytest.raises(ValueError, match="backend"):
        Segmenter(model_dirs[0], backend="cuda-magic")
    with pytest.raises(TypeError, match="Prompt"):
        segmenter.segment(_frame(1), [42])
    with pytest.raises(ValueError, match="label"):
        segmenter.segment(_frame(1), [Prompt("heart", ((1.0, 2.0, 5),))])


def test_stale_export_is_never_used_and_auto_exports_once_to_the_cache(tmp_path, monkeypatch, model_dirs):
    import shutil

    if torch.cuda.is_available():
        pytest.skip("auto picks torch-cuda on a CUDA machine")
    monkeypatch.setenv("FLUOROSAM_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    shutil.copytree(model_dirs[0], model_dir)  # carries onnx/ exported from the fixture's weights
    torch.manual_seed(1)
    save_checkpoint(FluoroSAM(get_config("tiny")).eval(), model_dir, {})  # new weights, same folder
    first = Segmenter(model_dir, backend="auto", threads=1)
    assert first.backend_name == "onnxruntime"
    assert first.onnx_dir != model_dir / "onnx" and str(first.onnx_dir).startswith(str(tmp_path / "cache"))
    second = Segmenter(model_dir, backend="auto", threads=1)
    assert second.onnx_dir == first.onnx_dir  # found in the cache, not exported again
    frame = _frame(2)
    reference = Segmenter(model_dir, backend="torch", threads=1).segment(frame, ["heart"]).results[0]
    assert abs(second.segment(frame, ["heart"]).results[0].score - reference.score) < 1e-3
    with pytest.raises(ValueError, match="different checkpoint"):
        Segmenter(model_dir, backend="onnxruntime", onnx_dir=model_dir / "onnx")


def test_describe_matches_pixel_coordinates():
    from engine.segmenter import _describe

    rng = np.random.default_rng(3)
    mask = np.zeros((57, 83), bool)
    mask[5:40, 11:70] = rng.random((35, 59)) > 0.6
    ys, xs = np.nonzero(mask)
    area, bbox, centroid = _describe(mask)
    assert area == xs.size and bbox == (xs.min(), ys.min(), xs.max(), ys.max())
    assert np.allclose(centroid, (xs.mean(), ys.mean()))
