"""Overload: frames at 30 fps over ZeroMQ into a deliberately slow model (the real Segmenter plus a delay).
Latency must stay bounded (latest-frame slot, no queue) and the drops must be counted and reported."""
import threading
import time

import numpy as np
import pytest
import zmq

from fluorosam_ros.core import NodeCore
from fluorosam_ros.messages import Header, numpy_to_image
from fluorosam_ros.params import NodeParams
from fluorosam_ros.testing import save_random_model
from fluorosam_ros.transports.zmq_transport import ZmqClient, ZmqTransport

DELAY_S = 0.15
FPS = 30
SECONDS = 2.0


class SlowSegmenter:
    """The real Segmenter, slowed down: a stand-in for a large model on a small GPU."""

    def __init__(self, inner):
        self.inner = inner
        self.backend_name = inner.backend_name
        self.counters = inner.counters

    def segment(self, frame, prompts):
        time.sleep(DELAY_S)
        return self.inner.segment(frame, prompts)


def free_endpoint():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
def test_thirty_fps_into_a_slow_model_drops_instead_of_queueing(tmp_path):
    from engine.segmenter import Segmenter

    segmenter = SlowSegmenter(Segmenter(save_random_model(tmp_path / "model"), backend="torch", threads=1))
    segmenter.inner.segment(np.zeros((64, 64), np.uint16), ["left lung"])  # load the text encoder first
    params = NodeParams(zmq_input_endpoint=free_endpoint(), zmq_output_endpoint=free_endpoint(),
                        publish_overlay=False, diagnostics_period_s=0.2, initial_prompt="left lung; heart")
    context = zmq.Context()
    transport = ZmqTransport(params, context)
    core = NodeCore(segmenter, params, transport.publish_output, transport.publish_diagnostics).start()
    spinner = threading.Thread(target=transport.spin, args=(core,), daemon=True)
    spinner.start()
    client = ZmqClient(params, context)
    masks, diagnostics = {}, []
    try:
        time.sleep(0.5)
        rng = np.random.default_rng(0)
        n_frames = int(FPS * SECONDS)
        start = time.monotonic()
        for i in range(n_frames):
            pixels = (rng.random((64, 64)) * 4000).astype(np.uint16)  # new content: no embedding reuse
            client.send_frame(numpy_to_image(pixels, header=Header(i, 0, "carm")))
            while time.monotonic() < start + (i + 1) / FPS:
                got = client.receive(0.005)
                if got and got[0] == params.mask_topic:
                    masks[got[1]["stamp"][0]] = time.monotonic()
                elif got and got[0] == params.diagnostics_topic:
                    diagnostics.append(got[1]["values"])
        deadline = time.monotonic() + 5
        def settled():
            last = diagnostics[-1] if diagnostics else {}
            return (n_frames - 1 in masks and last
                    and int(last["frames_processed"]) + int(last["frames_dropped"]) == n_frames)

        while time.monotonic() < deadline and not settled():
            got = client.receive(0.1)
            if got and got[0] == params.mask_topic:
                masks[got[1]["stamp"][0]] = time.monotonic()
            elif got and got[0] == params.diagnostics_topic:
                diagnostics.append(got[1]["values"])
    finally:
        client.close()
        transport.shutdown()
        spinner.join()
        core.stop()
        transport.close()
        context.term()
    processed, dropped = core.counts["frames_processed"], core.counts["frames_dropped"]
    assert core.counts["frames_received"] == n_frames
    assert processed + dropped == n_frames and dropped >= n_frames // 2  # the model manages < 7 fps
    assert n_frames - 1 in masks  # the newest frame is always processed
    final = diagnostics[-1]
    assert final["frames_dropped"] == str(dropped) and final["frames_processed"] == str(processed)
    # Bounded: each processed frame waited at most for one inference in progress plus its own. A queue
    # would have made the last frames wait for every frame before them (seconds).
    assert float(final["latency_p99_ms"]) < 8 * DELAY_S * 1e3
    backlog_s = masks[n_frames - 1] - (start + (n_frames - 1) / FPS)
    assert backlog_s < 8 * DELAY_S
    print(f"\n{n_frames} frames at {FPS} fps into a {DELAY_S * 1e3:.0f} ms+ model: processed {processed}, "
          f"dropped {dropped}, latency p50 {final['latency_p50_ms']} ms, p99 {final['latency_p99_ms']} ms, "
          f"last frame out {backlog_s * 1e3:.0f} ms after it was sent")
