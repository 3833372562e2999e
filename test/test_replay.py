"""Replay: sqlite3 and MCAP bags made here with rosbags' Writer, through the real Segmenter (random-init)."""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from fluorosam_ros import ros_types as rt
from fluorosam_ros.messages import Header, numpy_to_image
from fluorosam_ros.params import NodeParams
from fluorosam_ros.replay import add_arguments, input_storage, main, replay
from fluorosam_ros.testing import save_random_model

N_FRAMES = 6
PERIOD_NS = 50_000_000  # 20 fps


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    from engine.segmenter import Segmenter

    return Segmenter(save_random_model(tmp_path_factory.mktemp("model")), backend="torch", threads=1)


def make_bag(path, storage, corrupt_at=(), image_topic="/carm/image", prompt_topic="/fluorosam/prompt"):
    """N_FRAMES frames at 20 fps, a prompt change before frame 3, and garbage records where asked."""
    store = rt.typestore()
    with Writer(path, version=9, storage_plugin=StoragePlugin[storage.upper()]) as writer:
        images = writer.add_connection(image_topic, rt.IMAGE, typestore=store)
        prompts = writer.add_connection(prompt_topic, rt.STRING, typestore=store)
        writer.write(prompts, 0, rt.serialize(rt.string_to_ros("left lung; heart"), rt.STRING))
        for i in range(N_FRAMES):
            t = (i + 1) * PERIOD_NS
            if i == 3:
                writer.write(prompts, t - 1, rt.serialize(rt.string_to_ros("spine"), rt.STRING))
            if i in corrupt_at:
                writer.write(images, t, b"\x00\x01\x00\x00garbage")
                continue
            pixels = (np.add.outer(np.arange(40), np.arange(32)) * (i + 3) % 4000).astype(np.uint16)
            writer.write(images, t, rt.serialize(rt.image_to_ros(numpy_to_image(pixels, header=Header(10, i, "c"))),
                                                 rt.IMAGE))
    return path


def read_bag(path):
    with Reader(path) as reader:
        by_topic = {}
        for connection, _, raw in reader.messages():
            by_topic.setdefault(connection.topic, []).append(rt.deserialize(raw, connection.msgtype))
    return by_topic, input_storage(path)


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_replay_writes_expected_topics_and_counts(tmp_path, segmenter, storage):
    bag = make_bag(tmp_path / "in", storage)
    summary = replay(bag, tmp_path / "out", NodeParams(publish_overlay=True), segmenter, progress=False)
    assert summary.frames_in == N_FRAMES and summary.prompts_in == 2 and summary.corrupt_records == 0
    topics, plugin = read_bag(tmp_path / "out")
    assert plugin == storage
    for topic in ("/fluorosam/mask", "/fluorosam/detections", "/fluorosam/results", "/fluorosam/overlay"):
        assert len(topics[topic]) == N_FRAMES, topic
    assert len(topics["/diagnostics"]) >= 1
    masks = topics["/fluorosam/mask"]
    assert [m.header.stamp.nanosec for m in masks] == list(range(N_FRAMES))  # input stamps, in order
    assert all(m.encoding == "mono8" and (m.height, m.width) == (40, 32) for m in masks)
    labels = [[d.results[0].hypothesis.class_id for d in a.detections] for a in topics["/fluorosam/detections"]]
    assert labels[:3] == [["left lung", "heart"]] * 3 and labels[3:] == [["spine"]] * 3  # prompt change on next frame
    final = {kv.key: kv.value for kv in topics["/diagnostics"][-1].status[0].values}
    assert final["frames_processed"] == str(N_FRAMES) and final["frames_dropped"] == "0"


def test_corrupt_records_are_reported_and_skipped(tmp_path, segmenter):
    bag = make_bag(tmp_path / "in", "sqlite3", corrupt_at=(1, 4))
    summary = replay(bag, tmp_path / "out", NodeParams(publish_overlay=False), segmenter, progress=False)
    assert summary.corrupt_records == 2 and summary.frames_in == N_FRAMES - 2
    topics, _ = read_bag(tmp_path / "out")
    assert [m.header.stamp.nanosec for m in topics["/fluorosam/mask"]] == [0, 2, 3, 5]
    assert "/fluorosam/overlay" not in topics
    messages = [s.status[0].message for s in topics["/diagnostics"]]
    assert any("corrupt record on /carm/image" in m for m in messages)


def test_realtime_honours_timing_and_may_drop(tmp_path, segmenter):
    bag = make_bag(tmp_path / "in", "mcap")
    summary = replay(bag, tmp_path / "out", NodeParams(publish_overlay=False), segmenter, realtime=True,
                     progress=False)
    assert summary.wall_s >= (N_FRAMES * PERIOD_NS) / 1e9 * 0.9  # recorded pace, not as fast as possible
    processed = summary.outputs["/fluorosam/mask"]
    assert processed + summary.dropped == N_FRAMES and processed >= 1


def test_cli_with_custom_topics(tmp_path, segmenter, capsys):
    bag = make_bag(tmp_path / "in", "mcap", image_topic="/xray", prompt_topic="/ask")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(bag), "--out", str(tmp_path / "out"), "--image-topic", "/xray",
                              "--prompt-topic", "/ask", "--prompt", "trachea", "--model-dir",
                              str(segmenter.model_dir), "--backend", "torch", "--storage", "sqlite3"])
    assert main(args) == 0
    assert "replayed 6 frames" in capsys.readouterr().out
    topics, plugin = read_bag(tmp_path / "out")
    assert plugin == "sqlite3" and len(topics["/fluorosam/mask"]) == N_FRAMES
    with pytest.raises(ValueError, match="no /carm/image topic"):
        replay(bag, tmp_path / "out2", NodeParams(), segmenter, progress=False)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.binary(max_size=80), min_size=1, max_size=3), position=st.integers(0, N_FRAMES))
def test_random_corrupt_records_never_stop_replay(tmp_path, segmenter, garbage, position):
    store = rt.typestore()
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    with Writer(folder / "in", version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        images = writer.add_connection("/carm/image", rt.IMAGE, typestore=store)
        records = [rt.serialize(rt.image_to_ros(numpy_to_image(np.full((16, 16), i * 50 + 1, np.uint16),
                                                               header=Header(1, i))), rt.IMAGE)
                   for i in range(N_FRAMES)]
        records[position:position] = garbage
        for t, raw in enumerate(records):
            writer.write(images, t + 1, raw)
    summary = replay(folder / "in", folder / "out", NodeParams(publish_overlay=False), segmenter, prompt="heart",
                     progress=False)
    assert summary.frames_in + summary.corrupt_records == N_FRAMES + len(garbage)
    topics, _ = read_bag(folder / "out")
    stamps = {(m.header.stamp.sec, m.header.stamp.nanosec) for m in topics["/fluorosam/mask"]}
    assert {(1, i) for i in range(N_FRAMES)} <= stamps  # every good frame processed
