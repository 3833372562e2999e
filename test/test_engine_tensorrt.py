"""TensorRT: engine cache keys everywhere; the build and the runtime only where TensorRT and a GPU exist."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

from engine.backends.tensorrt_backend import engine_key, tensorrt_available

TRT_OK, TRT_REASON = tensorrt_available()


def test_engine_key_depends_on_gpu_tensorrt_onnx_and_precision():
    base = engine_key("a" * 64, True, device_name="NVIDIA H100", trt_version="10.3.0")
    assert base == engine_key("a" * 64, True, device_name="NVIDIA H100", trt_version="10.3.0")
    assert len({base,
                engine_key("b" * 64, True, device_name="NVIDIA H100", trt_version="10.3.0"),
                engine_key("a" * 64, False, device_name="NVIDIA H100", trt_version="10.3.0"),
                engine_key("a" * 64, True, device_name="NVIDIA L4", trt_version="10.3.0"),
                engine_key("a" * 64, True, device_name="NVIDIA H100", trt_version="10.4.0")}) == 5


@pytest.mark.skipif(TRT_OK, reason="TensorRT is present: the refusal path does not apply")
def test_build_engine_cli_says_why_without_tensorrt(tmp_path, capsys):
    from engine import build

    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    assert build.main(parser.parse_args(["--onnx", str(tmp_path), "--out", str(tmp_path / "e"), "--fp16"])) == 1
    assert TRT_REASON in capsys.readouterr().err


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT 10 + pycuda + a CUDA GPU: {TRT_REASON}")
def test_tensorrt_fp16_matches_onnxruntime(tmp_path):
    import torch

    from engine.export import export_model
    from engine.segmenter import Segmenter
    from training.model import FluoroSAM, get_config, save_checkpoint

    torch.manual_seed(0)
    model_dir = save_checkpoint(FluoroSAM(get_config("tiny")).eval(), tmp_path / "model", {})
    export_model(model_dir, model_dir / "onnx", with_text_table=False)
    reference = Segmenter(model_dir, backend="onnxruntime")
    engine = Segmenter(model_dir, backend="tensorrt", engine_dir=tmp_path / "engines")
    assert engine.backend_name == "tensorrt"
    rng = np.random.default_rng(0)
    prompts = ["left lung", "heart", "spine"]
    for shape in [(256, 256), (300, 420)]:
        frame = (rng.random(shape) * 4000).astype(np.uint16)
        for a, b in zip(reference.segment(frame, prompts).results, engine.segment(frame, prompts).results):
            assert abs(a.score - b.score) < 2e-2
            if a.mask is not None and b.mask is not None:
                union = np.logical_or(a.mask, b.mask).sum()
                assert np.logical_and(a.mask, b.mask).sum() / max(union, 1) >= 0.97
