"""The demo end to end (node in a separate process over ZeroMQ) on a short sequence with a random-init model."""
import argparse
from pathlib import Path

import numpy as np
import pytest

from fluorosam_ros.demo import add_arguments, main, schedule
from fluorosam_ros.demo_sequence import DEFAULT_OUT, load_sequence
from fluorosam_ros.replay import input_storage
from fluorosam_ros.testing import save_random_model


def test_bundled_sequence_is_small_and_complete():
    assert DEFAULT_OUT.stat().st_size < 5e6
    frames, truth, meta = load_sequence()
    assert frames.dtype == np.uint16 and frames.shape[0] >= 20 and frames.shape[1:] == (256, 256)
    assert set(truth) == {"left lung", "right lung", "heart", "spine", "guidewire"}
    wire = truth["guidewire"].sum(axis=(1, 2))
    assert wire[-1] > wire[0] > 0  # the guidewire advances
    assert schedule(30) == [(0, "left lung; right lung"), (10, "heart; spine"), (20, "guidewire")]


@pytest.mark.slow
def test_demo_writes_gif_bag_and_table(tmp_path):
    from rosbags.rosbag2 import Reader

    model = save_random_model(tmp_path / "model")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--frames", "6", "--fps", "8", "--hold", "2",
                              "--model-dir", str(model), "--backend", "torch"])
    assert main(args) == 0
    out = Path(tmp_path / "out")
    assert (out / "overlay.gif").stat().st_size > 0
    table = (out / "report.md").read_text()
    for prompt in ("left lung; right lung", "heart; spine", "guidewire"):
        assert f"| {prompt} | 4 |" in table
    assert input_storage(out / "demo_bag") == "mcap"
    with Reader(out / "demo_bag") as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert counts["/carm/image"] == 12 and counts["/fluorosam/prompt"] == 3
    assert 1 <= counts["/fluorosam/mask"] <= 12 and counts["/fluorosam/detections"] == counts["/fluorosam/mask"]
    assert counts["/diagnostics"] >= 1
