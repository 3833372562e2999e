"""``fluorosam build-engine --onnx DIR --fp16 --out DIR``: TensorRT engines for this GPU (see
engine/backends/tensorrt_backend.py). Needs TensorRT 10 and pycuda; exits with the reason otherwise."""
from __future__ import annotations

import argparse
import sys
import time

from engine.backends.tensorrt_backend import build_engines, tensorrt_available


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", required=True, help="folder written by `fluorosam export`")
    parser.add_argument("--out", required=True, help="engine cache folder (plans are keyed by GPU, TensorRT, ONNX)")
    parser.add_argument("--fp16", action="store_true", help="FP16 with normalization/softmax/reductions kept FP32")
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached plan matches")


def main(args: argparse.Namespace) -> int:
    ok, reason = tensorrt_available()
    if not ok:
        print(f"fluorosam build-engine: {reason}", file=sys.stderr)
        return 1
    started = time.perf_counter()
    paths = build_engines(args.onnx, args.out, fp16=args.fp16, force=args.force)
    for stem, path in paths.items():
        print(f"{stem}: {path}")
    print(f"built in {time.perf_counter() - started:.1f} s")
    return 0
