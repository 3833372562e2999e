"""``fluorosam node --transport dds|zmq --params config/fluorosam.yaml``: the node without a ROS install.

Reads the same ROS-format parameter file as the launch file, builds the Segmenter and the node core,
and spins the chosen transport until SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading

from fluorosam_ros.params import NODE_NAME, NodeParams, load_params

log = logging.getLogger("fluorosam_node")
TRANSPORTS = ("zmq", "dds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transport", choices=TRANSPORTS, default="zmq", help="wire to speak (default zmq)")
    parser.add_argument("--params", default=None, help="ROS-format parameter YAML (default: the packaged one)")
    parser.add_argument("--node-name", default=NODE_NAME, help="section of the YAML to read")
    parser.add_argument("--model-dir", default=None, help="overrides the model_dir parameter")
    parser.add_argument("--backend", default=None, help="overrides the backend parameter")
    parser.add_argument("--prompt", default=None, help="overrides initial_prompt")
    parser.add_argument("--log-level", default="INFO")


def make_segmenter(params: NodeParams):
    """The real Segmenter configured from the node parameters."""
    from engine.segmenter import Segmenter

    return Segmenter(params.model_dir_or_none, backend=params.backend, min_score=params.min_score_or_none,
                     near_duplicate_threshold=params.near_duplicate_or_none,
                     temporal_prompt=params.temporal_prompt, threads=params.threads or None)


def warm_up(segmenter) -> None:
    """Load the text encoder and run each model part once, so the first real frame is not minutes late."""
    import numpy as np

    segmenter.segment(np.zeros((64, 64), np.uint16), ["left lung"])
    segmenter.reset()
    segmenter.counters.update(dict.fromkeys(segmenter.counters, 0))


def make_transport(name: str, params: NodeParams):
    if name == "zmq":
        from fluorosam_ros.transports.zmq_transport import ZmqTransport

        return ZmqTransport(params)
    if name == "dds":
        from fluorosam_ros.transports.dds import DdsTransport

        return DdsTransport(params)
    raise ValueError(f"unknown transport {name!r}; choose one of {TRANSPORTS}")


def main(args: argparse.Namespace) -> int:
    from fluorosam_ros.core import NodeCore

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in (("model_dir", args.model_dir), ("backend", args.backend),
                                   ("initial_prompt", args.prompt)) if v is not None}
    params = load_params(args.params, args.node_name, **overrides)
    try:
        segmenter = make_segmenter(params)
    except FileNotFoundError as error:
        log.error("cannot load the model: %s (set model_dir in %s or pass --model-dir)", error,
                  args.params or "the packaged config/fluorosam.yaml")
        return 2
    warm_up(segmenter)
    transport = make_transport(args.transport, params)
    core = NodeCore(segmenter, params, transport.publish_output, transport.publish_diagnostics).start()
    stop = threading.Event()

    def _shutdown(signum, _frame) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()
        transport.shutdown()

    signal.signal(signal.SIGINT, _shutdown)
    signal.signal(signal.SIGTERM, _shutdown)
    log.info("fluorosam node ready: transport=%s backend=%s image=%s prompt=%s", args.transport,
             segmenter.backend_name, params.image_topic, params.prompt_topic)
    try:
        transport.spin(core)
    finally:
        core.stop()
        transport.close()
    return 0
