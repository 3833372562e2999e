"""``fluorosam replay IN --prompt "..." --out OUT``: a rosbag2 (sqlite3 or MCAP) through the node core.

Image and prompt records go to the same :class:`~fluorosam_ros.core.NodeCore` as on the live node;
outputs (mask, detections, results JSON, diagnostics, overlay if enabled) are written to a new bag
at the input record's time (plus the processing latency with ``--realtime``). Without ``--realtime``
every valid frame is processed; with it, records are fed at their recorded pace and the latest-frame
slot drops frames exactly like the live node would. Corrupt records are reported (diagnostics + log) and skipped.
"""
from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fluorosam_ros.core import Diagnostics, FrameOutput, NodeCore
from fluorosam_ros.params import NODE_NAME, NodeParams, load_params

log = logging.getLogger("fluorosam_node.replay")
STORAGES = ("sqlite3", "mcap")


@dataclass
class ReplaySummary:
    frames_in: int = 0
    prompts_in: int = 0
    corrupt_records: int = 0
    outputs: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    bad_frames: int = 0
    wall_s: float = 0.0


def input_storage(path: Path) -> str:
    """'mcap' or 'sqlite3', from the bag's metadata."""
    import yaml

    metadata = Path(path) / "metadata.yaml"
    if not metadata.exists():
        raise FileNotFoundError(f"{path} is not a rosbag2 folder (no metadata.yaml)")
    plugin = yaml.safe_load(metadata.read_text())["rosbag2_bagfile_information"]["storage_identifier"]
    return "mcap" if plugin == "mcap" else "sqlite3"


class BagOutputs:
    """Writes the node's outputs into a rosbag2; called from the worker thread in realtime mode."""

    def __init__(self, writer, params: NodeParams, add_latency: bool) -> None:
        from fluorosam_ros import ros_types as rt

        self.rt, self.writer, self.params = rt, writer, params
        store = rt.typestore()
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        topics = [(params.mask_topic, rt.IMAGE), (params.detections_topic, rt.DETECTIONS),
                  (params.results_topic, rt.STRING), (params.diagnostics_topic, rt.DIAGNOSTICS)]
        if params.publish_overlay:
            topics.append((params.overlay_topic, rt.IMAGE))
        self.connections = {topic: writer.add_connection(topic, msgtype, typestore=store) for topic, msgtype in topics}
        self.clock_ns = 0  # bag time of the record being processed
        self.add_latency = add_latency  # realtime: outputs appear when they would have live
        self.record_times: dict[int, int] = {}  # input header stamp -> bag time of its record

    def remember(self, header_ns: int, record_ns: int) -> None:
        with self._lock:
            self.record_times[header_ns] = record_ns
            if len(self.record_times) > 1024:  # frames dropped in realtime mode never claim theirs
                self.record_times.pop(next(iter(self.record_times)))

    def _write(self, topic: str, message, typename: str, stamp_ns: int) -> None:
        raw = self.rt.serialize(message, typename)
        with self._lock:
            self.writer.write(self.connections[topic], stamp_ns, raw)
            self.counts[topic] = self.counts.get(topic, 0) + 1

    def output(self, out: FrameOutput) -> None:
        rt, p = self.rt, self.params
        with self._lock:
            recorded = self.record_times.pop(out.header.stamp_ns, self.clock_ns)
        stamp = recorded + (int(out.latency_ms * 1e6) if self.add_latency else 0)
        self._write(p.mask_topic, rt.image_to_ros(out.mask), rt.IMAGE, stamp)
        self._write(p.detections_topic, rt.detections_to_ros(out), rt.DETECTIONS, stamp)
        self._write(p.results_topic, rt.string_to_ros(out.results_json()), rt.STRING, stamp)
        if out.overlay is not None:
            self._write(p.overlay_topic, rt.image_to_ros(out.overlay), rt.IMAGE, stamp)

    def diagnostics(self, diagnostics: Diagnostics) -> None:
        self._write(self.params.diagnostics_topic, self.rt.diagnostics_to_ros(diagnostics, self.clock_ns),
                    self.rt.DIAGNOSTICS, self.clock_ns)


def replay(in_path: str | Path, out_path: str | Path, params: NodeParams, segmenter, prompt: str | None = None,
           realtime: bool = False, storage: str | None = None, progress: bool = True) -> ReplaySummary:
    """Run ``in_path`` through a NodeCore around ``segmenter``; write the output bag to ``out_path``."""
    from rosbags.rosbag2 import Reader, StoragePlugin, Writer

    from fluorosam_ros import ros_types as rt

    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.exists():
        raise FileNotFoundError(f"input bag {in_path} does not exist")
    storage = storage or input_storage(in_path)
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    summary = ReplaySummary()
    started = time.monotonic()
    plugin = StoragePlugin[storage.upper()]
    with Reader(in_path) as reader, Writer(out_path, version=9, storage_plugin=plugin) as writer:
        wanted = {params.image_topic: rt.IMAGE, params.prompt_topic: rt.STRING}
        connections = [c for c in reader.connections if c.topic in wanted]
        for c in connections:
            if c.msgtype != wanted[c.topic]:
                raise ValueError(f"{c.topic} carries {c.msgtype}, expected {wanted[c.topic]}")
        if not any(c.topic == params.image_topic for c in connections):
            raise ValueError(f"{in_path} has no {params.image_topic} topic; topics: "
                             f"{sorted({c.topic for c in reader.connections})} (use --image-topic)")
        outputs = BagOutputs(writer, params, add_latency=realtime)
        core = NodeCore(segmenter, params, outputs.output, outputs.diagnostics)
        if prompt is not None:
            core.set_prompts(prompt)
        if realtime:
            core.start()
        total = sum(c.msgcount for c in connections)
        first_ns, wall0 = None, time.monotonic()
        last_diagnostics_ns = None
        for connection, stamp_ns, raw in tqdm(reader.messages(connections=connections), total=total, unit="msg",
                                              desc="replay", disable=not progress):
            first_ns = stamp_ns if first_ns is None else first_ns
            if realtime:
                delay = (stamp_ns - first_ns) / 1e9 - (time.monotonic() - wall0)
                if delay > 0:
                    time.sleep(delay)
            outputs.clock_ns = stamp_ns
            try:
                message = rt.deserialize(raw, connection.msgtype)
            except Exception as error:  # noqa: BLE001  (rosbags raises several types for bad CDR)
                summary.corrupt_records += 1
                core.report_error(f"corrupt record on {connection.topic} at {stamp_ns} ns skipped: "
                                  f"{type(error).__name__}: {error}")
                continue
            if connection.topic == params.prompt_topic:
                summary.prompts_in += 1
                core.set_prompts(message.data)
                continue
            summary.frames_in += 1
            frame = rt.image_from_ros(message)
            outputs.remember(frame.header.stamp_ns, stamp_ns)
            if realtime:
                core.submit_frame(frame)
            else:
                core.process(frame)
            if last_diagnostics_ns is None or stamp_ns - last_diagnostics_ns >= params.diagnostics_period_s * 1e9:
                last_diagnostics_ns = stamp_ns
                outputs.diagnostics(core.diagnostics())
        if realtime:
            core.wait_idle()
            core.stop()
        outputs.diagnostics(core.diagnostics())  # final totals
        summary.outputs = dict(outputs.counts)
        summary.dropped = core.counts["frames_dropped"]
        summary.bad_frames = core.counts["bad_frames"]
    summary.wall_s = time.monotonic() - started
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="rosbag2 folder (sqlite3 or MCAP)")
    parser.add_argument("--out", required=True, help="output bag folder (must not exist)")
    parser.add_argument("--prompt", default=None,
                        help="prompts before the bag's own prompt records, e.g. 'left lung; heart'")
    parser.add_argument("--realtime", action="store_true", help="honour recorded timing (frames may drop)")
    parser.add_argument("--image-topic", default=None)
    parser.add_argument("--prompt-topic", default=None)
    parser.add_argument("--params", default=None, help="ROS-format parameter YAML (default: packaged)")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--storage", choices=STORAGES, default=None, help="output storage (default: the input's)")


def main(args: argparse.Namespace) -> int:
    from fluorosam_ros.runner import make_segmenter

    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {k: v for k, v in (("image_topic", args.image_topic), ("prompt_topic", args.prompt_topic),
                                   ("model_dir", args.model_dir), ("backend", args.backend)) if v is not None}
    params = load_params(args.params, NODE_NAME, **overrides)
    summary = replay(args.input, args.out, params, make_segmenter(params), args.prompt, args.realtime, args.storage)
    print(f"replayed {summary.frames_in} frames, {summary.prompts_in} prompts in {summary.wall_s:.1f} s; "
          f"dropped {summary.dropped}, bad frames {summary.bad_frames}, corrupt records {summary.corrupt_records}")
    for topic, count in sorted(summary.outputs.items()):
        print(f"  {topic}: {count}")
    print(f"wrote {args.out}")
    return 0
