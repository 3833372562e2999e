"""`fluorosam bench` end to end on a random-init tiny model (torch CPU): figures present and consistent."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from engine import bench


@pytest.mark.slow
def test_bench_cli_writes_the_figures(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--random-init", "tiny", "--backend", "torch", "--threads", "1", "--iterations", "2",
                              "--frame-size", "96", "128", "--no-cpu-comparison", "--quiet", "--json", str(out)])
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    for key in ("full_frame_ms_p50", "decoder_only_speedup", "repeat4_throughput_gain", "k8_over_k1_cost", "backend",
                "full_frame_ms_p99", "decoder_only_ms_p50", "k1_ms_p50", "k4_ms_p50", "k8_ms_p50"):
        assert key in result, key
    assert result["backend"] == "torch" and "RANDOM INIT" in result["model_note"]
    for key in ("decoder_only_speedup", "repeat4_throughput_gain", "k8_over_k1_cost"):
        assert math.isfinite(result[key]) and result[key] > 0
    assert result["full_frame_ms_p99"] >= result["full_frame_ms_p50"]
    table = capsys.readouterr().out
    assert "decoder_only_speedup" in table and "RANDOM INIT" in table


def test_synthetic_frames_are_distinct():
    frames = bench.synthetic_frames(5, (32, 48))
    assert all(f.shape == (32, 48) and f.dtype.name == "uint16" for f in frames)
    assert len({f.tobytes() for f in frames}) == 5


def test_table_flags_missed_targets():
    result = {"backend": "x", "full_frame_ms_p50": 50.0, "full_frame_ms_p99": 60.0, "decoder_only_ms_p50": 10.0,
              "decoder_only_ms_p99": 12.0, "decoder_only_breakdown_ms_p50": {"decode": 8.0, "postprocess": 1.0,
                                                                              "text": 0.0},
              "k1_ms_p50": 50.0, "k4_ms_p50": 70.0, "k8_ms_p50": 90.0, "repeat4_fps_with_reuse": 40.0,
              "repeat4_fps_without_reuse": 20.0, "decoder_only_speedup": 5.0, "repeat4_throughput_gain": 2.0,
              "k8_over_k1_cost": 1.8}
    table = bench.format_table(result)
    assert "decoder_only_speedup" in table and "MISSED" in table.split("decoder_only_speedup")[1].splitlines()[0]
    assert "met" in table.split("k8_over_k1_cost")[1].splitlines()[0]
