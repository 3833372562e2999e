"""``fluorosam bench``: latency and the gains of embedding reuse, measured in ONE run on ONE backend.

Figures (p50/p99 over distinct synthetic frames, text cache warm):
* full frame (new frame, 1 prompt) vs decoder-only (prompt change on a held frame) -> ``decoder_only_speedup``
* a stream with each frame repeated 4x, with reuse vs with the embedding dropped before every frame
  -> ``repeat4_throughput_gain``
* K = 1, 4, 8 prompts on a new frame -> ``k8_over_k1_cost``
* on CPU, onnxruntime vs torch full-frame latency.
Ratios are what transfers between machines; absolute numbers depend on the load of the box.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

PROMPTS = ["left lung", "right lung", "heart", "spine", "liver", "trachea", "ribs", "guidewire"]
TARGETS = {"decoder_only_speedup": (">=", 10.0), "repeat4_throughput_gain": (">=", 3.5),
           "k8_over_k1_cost": ("<=", 2.0), "onnxruntime_full_frame_ms_p50": ("<=", 100.0)}


def synthetic_frames(count: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """Distinct smooth uint16 frames (no two byte-identical), shaped like a detector readout."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    frames = []
    for i in range(count):
        fx, fy, phase = rng.uniform(5, 40), rng.uniform(5, 40), rng.uniform(0, 6.28)
        image = np.sin(xx / fx + phase) * np.cos(yy / fy) + 0.2 * rng.standard_normal((h, w)).astype(np.float32)
        image = (image - image.min()) / (image.max() - image.min())
        frames.append((image * 60000 + i).astype(np.uint16))
    return frames


def _percentiles(samples_ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples_ms, 50)), float(np.percentile(samples_ms, 99))


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1e3


def measure(segmenter, frames: list[np.ndarray], iterations: int, progress: bool = True) -> dict:
    """All figures for one Segmenter; ``frames`` must hold at least ``iterations`` distinct frames."""
    from engine.segmenter import Prompt

    stream_frames = frames[: max(4, iterations // 2)]  # enough new frames that one slow call cannot decide the ratio
    bar = tqdm(total=iterations * 5 + 4 * 2 * len(stream_frames), desc=f"bench {segmenter.backend_name}",
               unit="call", disable=not progress)

    def run(frame, prompts):
        elapsed = _timed(lambda: segmenter.segment(frame, prompts))
        bar.update()
        return elapsed

    segmenter.segment(frames[0], PROMPTS)  # warm-up: text cache, lazy allocations, thread pools
    segmenter.segment(frames[1], PROMPTS[:1])
    full = [run(frames[i % len(frames)], [PROMPTS[0]]) for i in range(iterations)]
    held = frames[0]
    segmenter.segment(held, [PROMPTS[0]])
    decoder_only, breakdown = [], {"decode": [], "postprocess": [], "text": []}
    for i in range(iterations):
        prompt = PROMPTS[1 + i % (len(PROMPTS) - 1)]  # a different prompt each call, the frame held
        started = time.perf_counter()
        result = segmenter.segment(held, [Prompt(prompt)])
        decoder_only.append((time.perf_counter() - started) * 1e3)
        bar.update()
        for key in breakdown:
            breakdown[key].append(result.timings_ms.get(key, 0.0))
    by_k = {}
    for k in (1, 4, 8):
        by_k[k] = [run(frames[(i + 3) % len(frames)], PROMPTS[:k]) for i in range(iterations)]

    def stream(reuse: bool) -> float:
        started = time.perf_counter()
        for frame in stream_frames:
            for _ in range(4):
                if not reuse:
                    segmenter.reset()
                segmenter.segment(frame, [PROMPTS[0]])
                bar.update()
        return 4 * len(stream_frames) / (time.perf_counter() - started)

    segmenter.reset()
    with_reuse = stream(True)
    without_reuse = stream(False)
    bar.close()
    full_p50, full_p99 = _percentiles(full)
    dec_p50, dec_p99 = _percentiles(decoder_only)
    out = {"backend": segmenter.backend_name, "full_frame_ms_p50": full_p50, "full_frame_ms_p99": full_p99,
           "decoder_only_ms_p50": dec_p50, "decoder_only_ms_p99": dec_p99,
           "decoder_only_speedup": full_p50 / dec_p50,
           "decoder_only_breakdown_ms_p50": {k: float(np.median(v)) for k, v in breakdown.items()},
           "repeat4_fps_with_reuse": with_reuse, "repeat4_fps_without_reuse": without_reuse,
           "repeat4_throughput_gain": with_reuse / without_reuse}
    for k, samples in by_k.items():
        out[f"k{k}_ms_p50"], out[f"k{k}_ms_p99"] = _percentiles(samples)
    out["k8_over_k1_cost"] = out["k8_ms_p50"] / out["k1_ms_p50"]
    return out


def cpu_backend_comparison(model_dir, frames, iterations: int, threads: int | None, progress: bool) -> dict:
    """Full-frame p50 of onnxruntime and torch on the CPU, same frames."""
    from engine.segmenter import Segmenter

    out = {}
    for backend in ("onnxruntime", "torch"):
        segmenter = Segmenter(model_dir, backend=backend, device="cpu", threads=threads)
        segmenter.segment(frames[0], [PROMPTS[0]])
        samples = [_timed(lambda f=f, s=segmenter: s.segment(f, [PROMPTS[0]]))
                   for f in tqdm(frames[1: iterations + 1], desc=f"cpu {backend}", unit="frame", disable=not progress)]
        out[f"{backend}_full_frame_ms_p50"], out[f"{backend}_full_frame_ms_p99"] = _percentiles(samples)
    return out


def format_table(result: dict) -> str:
    rows = [("backend", result["backend"], "")]
    if result.get("model_note"):
        rows.append(("model", result["model_note"], ""))
    rows += [
        ("full frame (1 prompt)", f"{result['full_frame_ms_p50']:.1f} / {result['full_frame_ms_p99']:.1f} ms",
         "p50 / p99"),
        ("decoder only (held frame)", f"{result['decoder_only_ms_p50']:.1f} / {result['decoder_only_ms_p99']:.1f} ms",
         "p50 / p99"),
        ("  of which decode / post / text", " / ".join(f"{result['decoder_only_breakdown_ms_p50'][k]:.1f}"
                                                    for k in ("decode", "postprocess", "text")) + " ms", "p50"),
        ("K = 1 / 4 / 8 prompts", " / ".join(f"{result[f'k{k}_ms_p50']:.1f}" for k in (1, 4, 8)) + " ms", "p50"),
        ("4x-repeat stream", f"{result['repeat4_fps_with_reuse']:.1f} vs {result['repeat4_fps_without_reuse']:.1f} fps",
         "reuse vs none"),
    ]
    for backend in ("onnxruntime", "torch"):
        if f"{backend}_full_frame_ms_p50" in result:
            rows.append((f"cpu {backend} full frame", f"{result[f'{backend}_full_frame_ms_p50']:.1f} / "
                         f"{result[f'{backend}_full_frame_ms_p99']:.1f} ms", "p50 / p99"))
    for key, (op, target) in TARGETS.items():
        if key in result:
            ok = result[key] >= target if op == ">=" else result[key] <= target
            rows.append((key, f"{result[key]:.2f}", f"target {op} {target:g}: {'met' if ok else 'MISSED'}"))
    width = max(len(r[0]) for r in rows) + 2
    value_width = max(len(r[1]) for r in rows) + 2
    return "\n".join(f"{name:<{width}}{value:<{value_width}}{note}" for name, value, note in rows)


def random_init_checkpoint(config_name: str, folder: Path) -> Path:
    """A randomly initialised checkpoint of a registered config (latency depends on the architecture only)."""
    import torch

    from training.model import FluoroSAM, get_config, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(FluoroSAM(get_config(config_name)).eval(), folder, {"note": "random init for benchmarks"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled default model)")
    parser.add_argument("--random-init", default=None, metavar="CONFIG",
                        help="benchmark a randomly initialised model of this config (tiny/base/large) instead")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "torch-cuda", "onnxruntime", "tensorrt"])
    parser.add_argument("--device", default=None, help="torch device (e.g. cuda:0)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime")
    parser.add_argument("--iterations", type=int, default=20, help="samples per figure")
    parser.add_argument("--frame-size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--no-cpu-comparison", action="store_true", help="skip the onnxruntime vs torch CPU run")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from engine.segmenter import Segmenter
    from fluorosam_common.paths import default_model_dir
    from training.model import read_meta

    with tempfile.TemporaryDirectory(prefix="fluorosam-bench-") as scratch:
        if args.random_init:
            model_dir = random_init_checkpoint(args.random_init, Path(scratch) / args.random_init)
            note = f"RANDOM INIT '{args.random_init}' (latency only; masks meaningless)"
        else:
            model_dir = Path(args.model) if args.model else default_model_dir()
            meta = read_meta(model_dir)
            note = f"{model_dir} ({meta['config']['name']}, {'trained' if meta.get('metrics') else 'untrained'})"
        progress = not args.quiet
        segmenter = Segmenter(model_dir, backend=args.backend, device=args.device, threads=args.threads)
        frames = synthetic_frames(max(args.iterations + 4, 8), tuple(args.frame_size))
        result = measure(segmenter, frames, args.iterations, progress)
        result.update({"model_note": note, "image_size": segmenter.image_size,
                       "frame_size": list(args.frame_size), "iterations": args.iterations,
                       "threads": args.threads, "cpu_count": os.cpu_count()})
        if not args.no_cpu_comparison and segmenter.backend_name in ("onnxruntime", "torch"):
            result.update(cpu_backend_comparison(model_dir, frames, args.iterations, args.threads, progress))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
