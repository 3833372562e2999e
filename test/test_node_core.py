"""Node core: messages, parameters, prompt syntax, latest-frame slot, outputs and diagnostics (in-process)."""
import json
import logging
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.segmenter import PromptResult, SegmentResult
from fluorosam_common.frames import FrameError
from fluorosam_common.paths import config_path
from fluorosam_ros.core import ERROR, OK, WARN, NodeCore, PromptError, parse_prompts
from fluorosam_ros.messages import Header, ImageError, ImageMsg, image_to_numpy, numpy_to_image
from fluorosam_ros.params import NodeParams, load_params
from fluorosam_ros.testing import write_params


class SquareSegmenter:
    """Test double with the Segmenter's methods: prompt k gets a fixed square; "nothing" is refused.

    ``delay_s`` makes it a deliberately slow model for the overload test."""

    backend_name = "double"

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.counters = {"frames": 0, "embedding_reuses": 0}
        self.seen_prompts = []

    def segment(self, frame, prompts):
        from fluorosam_common.frames import validate_frame

        frame = validate_frame(frame)
        time.sleep(self.delay_s)
        self.counters["frames"] += 1
        self.seen_prompts.append([p.text for p in prompts])
        results = []
        for k, prompt in enumerate(prompts):
            if prompt.text == "nothing":
                results.append(PromptResult(prompt.text, None, 0.1, True, "low_score"))
                continue
            mask = np.zeros(frame.shape, bool)
            mask[k * 4: k * 4 + 3, 0:3] = True
            results.append(PromptResult(prompt.text, mask, 0.9, False, "", 9, (0, k * 4, 2, k * 4 + 2),
                                        (1.0, k * 4 + 1.0)))
        return SegmentResult(results, False, {}, frame.shape)


class Collector:
    def __init__(self):
        self.outputs, self.diagnostics = [], []
        self.event = threading.Event()

    def output(self, out):
        self.outputs.append(out)
        self.event.set()

    def diag(self, d):
        self.diagnostics.append(d)


def make_core(delay_s=0.0, **params):
    collector = Collector()
    core = NodeCore(SquareSegmenter(delay_s), NodeParams(**params), collector.output, collector.diag)
    return core, collector


def frame_msg(stamp=1, h=16, w=12, dtype=np.uint16):
    pixels = (np.arange(h * w).reshape(h, w) % 200).astype(dtype)
    return numpy_to_image(pixels, header=Header(stamp, 7, "carm"))


# ------------------------------------------------------------------------------------------ messages
@pytest.mark.parametrize("encoding,dtype,channels", [("mono8", np.uint8, 1), ("mono16", np.uint16, 1),
                                                      ("32FC1", np.float32, 1), ("rgb8", np.uint8, 3)])
def test_image_round_trip(encoding, dtype, channels):
    shape = (5, 7) if channels == 1 else (5, 7, 3)
    pixels = (np.random.default_rng(0).random(shape) * 250).astype(dtype)
    msg = numpy_to_image(pixels, encoding)
    assert msg.step == 7 * channels * np.dtype(dtype).itemsize and len(msg.data) == msg.step * 5
    np.testing.assert_array_equal(image_to_numpy(msg), pixels)


def test_big_endian_and_row_padding_are_respected():
    pixels = np.array([[1, 258, 65535], [4, 5, 6]], np.uint16)
    padded = np.zeros((2, 8), np.uint8)  # step 8 = 6 bytes of pixels + 2 bytes padding per row
    padded[:, :6] = pixels.astype(">u2").view(np.uint8).reshape(2, 6)
    msg = ImageMsg(Header(), 2, 3, "mono16", 1, 8, padded.tobytes())
    out = image_to_numpy(msg)
    np.testing.assert_array_equal(out, pixels)
    assert out.dtype.isnative


@pytest.mark.parametrize("change,match", [
    (dict(encoding="bgr16"), "unsupported encoding"), (dict(step=10), "smaller than one row"),
    (dict(height=0), "zero size"), (dict(height=9000), "side limit"), (dict(data=b"\0" * 23), "holds 23 bytes"),
    (dict(is_bigendian=3), "is_bigendian")])
def test_bad_image_messages_are_named(change, match):
    msg = numpy_to_image(np.zeros((4, 6), np.uint16))
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(ImageError, match=match):
        image_to_numpy(msg)


# ---------------------------------------------------------------------------------------- parameters
def test_packaged_params_match_dataclass_defaults():
    assert load_params(config_path("fluorosam.yaml")) == NodeParams()


def test_params_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown parameters.*imgae_topic"):
        load_params(write_params(tmp_path / "a.yaml", imgae_topic="/x"))
    with pytest.raises(ValueError, match="stale_after_s must be float"):
        load_params(write_params(tmp_path / "b.yaml", stale_after_s="soon"))
    (tmp_path / "c.yaml").write_text("other_node:\n  ros__parameters: {}\n")
    with pytest.raises(ValueError, match="no 'fluorosam_node: ros__parameters:'"):
        load_params(tmp_path / "c.yaml")
    assert load_params(write_params(tmp_path / "d.yaml", stale_after_s=3), image_topic="/x").stale_after_s == 3.0


# ------------------------------------------------------------------------------------------- prompts
def test_prompt_syntax():
    prompts = parse_prompts(" left  lung ; heart @ 120,88,+1 130.5,90,-1 ;; ")
    assert [p.text for p in prompts] == ["left lung", "heart"]
    assert prompts[0].points == () and prompts[1].points == ((120.0, 88.0, 1), (130.5, 90.0, 0))
    assert parse_prompts("") == [] and parse_prompts("  ;  ") == []
    for bad, match in [("heart @", "no points"), ("@ 1,2,1", "no text"), ("a @ 1,2", "x,y,label"),
                       ("a @ 1,nan,1", "finite"), ("a @ 1,2,5", "label"), ("x\x00y", "control"),
                       (";".join(["a"] * 256), "at most 255")]:
        with pytest.raises(PromptError, match=match):
            parse_prompts(bad)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_garbage_prompts_never_raise_anything_but_prompt_error(text):
    try:
        prompts = parse_prompts(text)
    except PromptError:
        return
    assert all(p.text and ";" not in p.text for p in prompts)


# ---------------------------------------------------------------------------------------------- core
def test_one_label_mask_per_frame_with_input_stamp():
    core, got = make_core(publish_overlay=True)
    out = core.process(frame_msg(stamp=42))  # no prompt: still one all-zero mask
    assert out.header == Header(42, 7, "carm") and out.mask.encoding == "mono8"
    assert not image_to_numpy(out.mask).any() and out.detections == []
    core.set_prompts("left lung; nothing; heart")
    out = core.process(frame_msg(stamp=43))
    labels = image_to_numpy(out.mask)
    assert set(np.unique(labels)) == {0, 1, 3}  # prompt 2 refused: no pixels
    assert [(d.label, d.prompt, d.refused, d.reason) for d in out.detections] == [
        (1, "left lung", False, ""), (2, "nothing", True, "low_score"), (3, "heart", False, "")]
    assert out.overlay.encoding == "rgb8" and out.overlay.header.stamp_sec == 43
    core.set_prompts("nothing")
    out = core.process(frame_msg(stamp=44))
    assert not image_to_numpy(out.mask).any() and out.detections[0].refused
    assert len(got.outputs) == 3


def test_bad_prompt_keeps_previous_prompts_and_reports():
    core, got = make_core()
    core.set_prompts("heart")
    assert not core.set_prompts("heart @ 1,2")
    assert [p.text for p in core.prompts] == ["heart"]
    assert got.diagnostics[-1].level == WARN and "prompt rejected" in got.diagnostics[-1].message
    assert core.counts["bad_prompts"] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoding=st.sampled_from(["mono8", "mono16", "32FC1", "rgb8", "bgr8", "", "64FC1"]),
       height=st.integers(-2, 9000), width=st.integers(-2, 40), step_delta=st.integers(-3, 3),
       size_delta=st.integers(-2, 2), nan=st.booleans(), bigendian=st.integers(0, 2))
def test_malformed_frames_are_reported_and_next_good_frame_processed(encoding, height, width, step_delta,
                                                                     size_delta, nan, bigendian):
    core, got = make_core(publish_overlay=False)
    core.set_prompts("heart")
    itemsize = {"mono16": 2, "32FC1": 4, "rgb8": 3}.get(encoding, 1)
    step = max(0, width) * itemsize + step_delta
    n_bytes = max(0, step * max(0, min(height, 64)) + size_delta)
    data = bytearray(n_bytes)
    if nan and encoding == "32FC1" and n_bytes >= 4:
        data[:4] = np.float32(np.nan).tobytes()
    bad = ImageMsg(Header(1, 0), height, width, encoding, bigendian, step, bytes(data))
    out = core.process(bad)
    if out is None:
        assert core.counts["bad_frames"] == 1 and core.last_error
        assert got.diagnostics[-1].values["last_error"] == core.last_error
    good = core.process(frame_msg(stamp=2))
    assert good is not None and good.header.stamp_sec == 2


def test_nan_and_tiny_frames_name_the_problem():
    core, got = make_core()
    core.set_prompts("heart")
    pixels = np.ones((16, 16), np.float32)
    pixels[3, 3] = np.nan
    assert core.process(numpy_to_image(pixels)) is None and "NaN" in core.last_error
    assert core.process(numpy_to_image(np.ones((3, 3), np.uint8))) is None and "smaller" in core.last_error
    assert core.process(numpy_to_image(np.ones((8, 8, 3), np.uint8))) is None and "colour" in core.last_error


def test_worker_keeps_only_the_newest_frame_and_counts_drops():
    core, got = make_core(delay_s=0.2, publish_overlay=False)
    core.set_prompts("heart")
    core.start()
    try:
        for stamp in range(1, 11):  # 10 frames at ~100 fps into a 5 fps model
            core.submit_frame(frame_msg(stamp=stamp))
            time.sleep(0.01)
        assert core.wait_idle(timeout=5)
    finally:
        core.stop()
    stamps = [o.header.stamp_sec for o in got.outputs]
    assert stamps[-1] == 10 and stamps == sorted(stamps)  # the newest frame is never lost
    assert len(stamps) < 10 and core.counts["frames_dropped"] == 10 - len(stamps)
    diag = core.diagnostics()
    assert diag.values["frames_dropped"] == str(10 - len(stamps))
    assert float(diag.values["latency_p99_ms"]) < 1000  # one inference plus one wait, never a queue


def test_watchdog_reports_stale_input():
    now = [100.0]
    collector = Collector()
    core = NodeCore(SquareSegmenter(), NodeParams(stale_after_s=2.0), collector.output, collector.diag,
                    clock=lambda: now[0])
    core.submit_frame(frame_msg())
    now[0] += 1.0
    assert core.diagnostics().level == OK
    now[0] += 1.5
    diag = core.diagnostics()
    assert diag.level == WARN and diag.message.startswith("stale input") and diag.values["stale"] == "true"
    core.submit_frame(frame_msg())
    core.set_prompts("a @ 1")
    assert core.diagnostics().level == WARN and "prompt rejected" in core.diagnostics().message
    now[0] += 1.0
    core.submit_frame(frame_msg())
    now[0] += 5.0
    core.submit_frame(frame_msg())
    diag = core.diagnostics()  # the error is old: back to OK, but still named
    assert diag.level == OK and "prompt rejected" in diag.values["last_error"]


def test_inference_crash_is_reported_not_raised():
    class Broken(SquareSegmenter):
        def segment(self, frame, prompts):
            raise RuntimeError("device lost")

    collector = Collector()
    core = NodeCore(Broken(), NodeParams(), collector.output, collector.diag)
    core.set_prompts("heart")
    assert core.process(frame_msg()) is None
    assert "device lost" in core.last_error and core.counts["processing_errors"] == 1
    assert ERROR > WARN  # levels follow diagnostic_msgs


def test_frame_error_from_segmenter_is_a_bad_frame():
    class Picky(SquareSegmenter):
        def segment(self, frame, prompts):
            raise FrameError("frame contains NaN or infinite values")

    collector = Collector()
    core = NodeCore(Picky(), NodeParams(), collector.output, collector.diag)
    core.set_prompts("heart")
    assert core.process(frame_msg()) is None and core.counts["bad_frames"] == 1


def test_worker_survives_a_failing_publisher():
    calls = []

    def flaky_output(out):
        calls.append(out.header.stamp_sec)
        if len(calls) == 1:
            raise OSError("socket closed")

    diagnostics = []
    core = NodeCore(SquareSegmenter(), NodeParams(publish_overlay=False), flaky_output, diagnostics.append)
    core.start()
    try:
        core.submit_frame(frame_msg(stamp=1))
        assert core.wait_idle(timeout=5)
        core.submit_frame(frame_msg(stamp=2))
        assert core.wait_idle(timeout=5)
    finally:
        core.stop()
    assert calls == [1, 2] and "socket closed" in core.last_error and core.counts["processing_errors"] == 1


def test_error_log_is_throttled_per_kind_with_the_number_held_back(caplog):
    """3,000 bad prompts in 'one second' log one line; the next second's first line tells how many were held."""
    now = [0.0]
    sent = []
    core = NodeCore(SquareSegmenter(), NodeParams(), lambda out: None, sent.append, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="fluorosam_node"):
        for i in range(3000):
            core.set_prompts(f"heart @ {i},2")
            now[0] += 0.9 / 3000
        now[0] = 1.5
        core.set_prompts("heart @ 1,2")
        core.report_error("malformed zmq message: short", kind="")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "2999 more 'prompt rejected' suppressed" in lines[1] and lines[2].startswith("malformed zmq")
    assert core.counts["bad_prompts"] == 3001 and len(sent) == 3002  # every one still reaches diagnostics


def test_a_device_tip_reaches_the_results_json():
    from fluorosam_ros.core import Detection, FrameOutput

    mask = np.zeros((8, 8), bool)
    mask[2, :6] = True
    tool = Detection.from_result(1, PromptResult("guidewire", mask, 0.8, False, "", 6, (0, 2, 5, 2), (2.5, 2.0),
                                                 (5.0, 2.0)))
    organ = Detection.from_result(2, PromptResult("heart", mask, 0.8, False, "", 6, (0, 2, 5, 2), (2.5, 2.0)))
    out = FrameOutput(Header(1, 2, "c"), numpy_to_image(mask.astype(np.uint8)), [tool, organ], None, 1.0, False)
    detections = json.loads(out.results_json())["detections"]
    assert detections[0]["tip"] == [5.0, 2.0] and detections[1]["tip"] is None
