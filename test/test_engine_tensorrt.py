"""FP16 export and TensorRT plans. The FP16 graphs are checked against FP32 with ONNX Runtime on real and
rendered frames; both plans build with TensorRT-RTX on this CPU-only machine (CI installs it; with
FLUOROSAM_REQUIRE_TENSORRT_RTX=1 its absence fails instead of skipping). Running a plan needs an NVIDIA
GPU: those tests skip with that reason here."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from engine.backends.tensorrt_backend import engine_key, tensorrt_available
from fluorosam_common.paths import default_model_dir

TRT_RUN_OK, TRT_RUN_REASON = tensorrt_available()
REAL_XRAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "realxray-dev" / "images"
PROMPTS = ["left lung", "right lung", "heart", "spine", "left clavicle"]


def require_tensorrt_rtx():
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except ImportError as error:
        if os.environ.get("FLUOROSAM_REQUIRE_TENSORRT_RTX") == "1":
            pytest.fail(f"FLUOROSAM_REQUIRE_TENSORRT_RTX=1 but TensorRT-RTX does not import: {error}")
        pytest.skip(f"TensorRT-RTX is not installed ({error}); pip install -r requirements-tensorrt-rtx.txt")


def test_engine_key_depends_on_flavor_version_target_onnx_and_precision():
    base = ("a" * 64, "fp16", "tensorrt-rtx", "1.7.1.116", "SM89")
    variants = [("b" * 64,) + base[1:], base[:1] + ("fp32",) + base[2:], base[:2] + ("tensorrt",) + base[3:],
                base[:3] + ("1.8.0",) + base[4:], base[:4] + ("SM120",)]
    assert engine_key(*base) == engine_key(*base)
    assert len({engine_key(*base), *(engine_key(*v) for v in variants)}) == 6


@pytest.fixture(scope="module")
def exports(default_export, tmp_path_factory):
    """The default model's FP32 export and its FP16 conversion (what `fluorosam export --precision fp16` writes)."""
    from engine.fp16 import convert_export

    return default_export, convert_export(default_export, tmp_path_factory.mktemp("exports") / "fp16")


def test_fp16_graphs_compute_in_fp16_with_fp32_io_and_normalization(exports):
    _, fp16 = exports
    meta = json.loads((fp16 / "export.json").read_text())
    assert meta["precision"] == "fp16"
    for name in ("image_encoder.onnx", "prompt_decoder.onnx"):
        graph = onnx.load(str(fp16 / name)).graph
        assert all(t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for t in [*graph.input, *graph.output])
        assert meta["fp16_conversion"][name]["fp16_initializers"] > meta["fp16_conversion"][name]["fp32_initializers"]
        outputs = {o: n for n in graph.node for o in n.output}
        for node in graph.node:
            if node.op_type in ("LayerNormalization", "Softmax"):
                # their inputs come through a Cast to FP32 (or an FP32 producer), never straight from FP16
                producer = outputs.get(node.input[0])
                assert producer is None or producer.op_type != "Cast" or producer.attribute[0].i == 1, node.name


def _frames():
    from PIL import Image

    from fluorosam_ros.demo_sequence import load_sequence

    frames = [("render", frame) for frame in load_sequence()[0][::10]]
    real = sorted(REAL_XRAYS.glob("*.png"))[:3] if REAL_XRAYS.is_dir() else []
    frames += [(f"film {p.stem[:20]}", np.asarray(Image.open(p).convert("L"))) for p in real]
    return frames


def test_fp16_agrees_with_fp32_on_real_and_rendered_frames(exports):
    """Masks IoU >= 0.98 and scores within 0.02 (ONNX Runtime on both graphs), per prompt and frame."""
    from engine.segmenter import Segmenter

    fp32, fp16 = exports
    reference = Segmenter(default_model_dir(), backend="onnxruntime", onnx_dir=fp32, min_score=0.0)
    half = Segmenter(default_model_dir(), backend="onnxruntime", onnx_dir=fp16, min_score=0.0)
    worst_iou, worst_score = 1.0, 0.0
    for name, frame in _frames():
        for a, b in zip(reference.segment(frame, PROMPTS).results, half.segment(frame, PROMPTS).results):
            worst_score = max(worst_score, abs(a.score - b.score))
            if a.mask is None or b.mask is None:
                assert a.mask is None and b.mask is None, (name, a.prompt)
                continue
            union = np.logical_or(a.mask, b.mask).sum()
            worst_iou = min(worst_iou, np.logical_and(a.mask, b.mask).sum() / max(union, 1))
    print(f"FP16 vs FP32: worst mask IoU {worst_iou:.4f}, worst score difference {worst_score:.4f}")
    assert worst_iou >= 0.98 and worst_score <= 0.02


def _build(onnx_dir, out, *extra):
    from engine import build

    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    return build.main(parser.parse_args(["--onnx", str(onnx_dir), "--out", str(out), *extra]))


def test_tensorrt_rtx_builds_both_fp16_plans_matching_the_onnx(exports, tmp_path, capsys):
    """`fluorosam build-engine --fp16` on the FP32 export: converts, builds both plans for the RTX set, and
    records them; the networks' I/O names, dtypes and shapes are the ONNX's, the profile spans K 1..16."""
    require_tensorrt_rtx()
    from engine.backends.tensorrt_backend import MAX_POINTS, MAX_PROMPTS, RTX_TARGETS

    fp32, _ = exports
    assert _build(fp32, tmp_path, "--fp16", "--flavor", "tensorrt-rtx") == 0, capsys.readouterr().err
    plans = json.loads((tmp_path / "engines.json").read_text())["plans"]
    assert sorted(p["stem"] for p in plans) == ["image_encoder", "prompt_decoder"]
    for record in plans:
        assert (tmp_path / record["plan"]).stat().st_size > 1_000_000
        assert record["precision"] == "fp16" and record["target"] == ",".join(RTX_TARGETS)
        assert record["layer_output_types"].get("half", 0) > record["layer_output_types"].get("float", 0)
        graph = onnx.load(str(fp32 / record["onnx"])).graph  # the FP16 graphs keep the FP32 I/O
        for side, tensors in (("inputs", graph.input), ("outputs", graph.output)):
            expected = [(t.name, "float", [d.dim_value or -1 for d in t.type.tensor_type.shape.dim]) for t in tensors]
            built = [(t["name"], t["dtype"], t["shape"]) for t in record[side]]
            assert [b[:2] for b in built] == [e[:2] for e in expected], (record["stem"], side)
            for (_, _, shape), (name, _, onnx_shape) in zip(built, expected):  # ONNX -1: TensorRT may fix it
                assert len(shape) == len(onnx_shape) and all(o in (-1, d) for d, o in zip(shape, onnx_shape)), name
    decoder = next(p for p in plans if p["stem"] == "prompt_decoder")
    assert decoder["profile"]["text_tokens"][0][0] == 1 and decoder["profile"]["text_tokens"][2][0] == MAX_PROMPTS
    assert decoder["profile"]["point_coords"][2][:2] == [MAX_PROMPTS, MAX_POINTS]


def test_plan_cache_reuses_and_rebuilds_when_onnx_or_target_changes(exports, tmp_path):
    require_tensorrt_rtx()
    from engine.backends.tensorrt_backend import build_engines

    _, fp16 = exports
    first = build_engines(fp16, tmp_path, flavor="tensorrt-rtx", targets=("SM89",))
    stamps = {stem: path.stat().st_mtime_ns for stem, path in first.items()}
    again = build_engines(fp16, tmp_path, flavor="tensorrt-rtx", targets=("SM89",))
    assert again == first and {s: p.stat().st_mtime_ns for s, p in again.items()} == stamps  # reused
    other_target = build_engines(fp16, tmp_path, flavor="tensorrt-rtx", targets=("SM120",))
    assert set(other_target.values()).isdisjoint(first.values())
    original = (fp16 / "export.json").read_text()
    meta = json.loads(original)
    meta["sha256"]["prompt_decoder.onnx"] = "0" * 64  # as after a new export of the decoder
    (fp16 / "export.json").write_text(json.dumps(meta))
    try:
        changed = build_engines(fp16, tmp_path, flavor="tensorrt-rtx", targets=("SM89",))
    finally:
        (fp16 / "export.json").write_text(original)
    assert changed["image_encoder"] == first["image_encoder"] and changed["prompt_decoder"] != first["prompt_decoder"]
    records = json.loads((tmp_path / "engines.json").read_text())["plans"]
    assert len(records) == 5 and all((tmp_path / r["plan"]).exists() for r in records)


def test_broken_graph_names_the_node(tmp_path):
    require_tensorrt_rtx()
    import tensorrt_rtx_bindings as trt
    from onnx import TensorProto, helper

    from engine.backends.tensorrt_backend import EngineBuildError, build_engine

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    bad = helper.make_node("Add", ["x", "missing_weights"], ["y"], name="broken_add")
    graph = helper.make_graph([bad], "broken", [x], [y])
    path = tmp_path / "broken.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(EngineBuildError, match="broken_add"):
        build_engine(trt, path, tmp_path / "broken.plan", ("SM89",))


def test_build_engine_cli_reports_a_missing_export(tmp_path, capsys):
    assert _build(tmp_path / "nothing", tmp_path / "out", "--fp16") == 1
    assert "export.json" in capsys.readouterr().err


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_RUN_OK, reason=f"running a TensorRT plan needs an NVIDIA GPU: {TRT_RUN_REASON}")
def test_tensorrt_fp16_matches_onnxruntime(exports, tmp_path):
    from engine.backends.tensorrt_backend import build_engines
    from engine.segmenter import Segmenter

    fp32, fp16 = exports
    build_engines(fp16, tmp_path / "engines")
    reference = Segmenter(default_model_dir(), backend="onnxruntime", onnx_dir=fp32, min_score=0.0)
    engine = Segmenter(default_model_dir(), backend="tensorrt", onnx_dir=fp16, engine_dir=tmp_path / "engines",
                       min_score=0.0)
    assert engine.backend_name == "tensorrt"
    for _, frame in _frames():
        for a, b in zip(reference.segment(frame, PROMPTS).results, engine.segment(frame, PROMPTS).results):
            assert abs(a.score - b.score) < 2e-2
            if a.mask is not None and b.mask is not None:
                union = np.logical_or(a.mask, b.mask).sum()
                assert np.logical_and(a.mask, b.mask).sum() / max(union, 1) >= 0.97
