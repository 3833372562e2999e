"""``fluorosam build-engine --onnx DIR [--fp16] --out DIR [--flavor auto|tensorrt|tensorrt-rtx] [--targets ...]``

TensorRT plans for both graphs of an export (engine/backends/tensorrt_backend.py): TensorRT where it is
installed, TensorRT-RTX otherwise (it builds on a CPU-only machine for named RTX GPUs). ``--fp16`` with an
FP32 export converts it first (engine/fp16.py, written to ``OUT/onnx-fp16``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine.backends.tensorrt_backend import ENGINES_FILE, FLAVORS, RTX_TARGETS, EngineBuildError, build_engines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", required=True, help="folder written by `fluorosam export`")
    parser.add_argument("--out", required=True, help="engine folder (plans keyed by flavor, version, target, ONNX)")
    parser.add_argument("--fp16", action="store_true",
                        help="FP16 plans: an FP32 export is converted first (normalization/softmax/reductions FP32)")
    parser.add_argument("--flavor", default="auto", choices=["auto", *FLAVORS],
                        help="auto: TensorRT where installed, else TensorRT-RTX")
    parser.add_argument("--targets", default=None,
                        help=f"TensorRT-RTX compute capabilities, comma-separated (default {','.join(RTX_TARGETS)})")
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached plan matches")


def main(args: argparse.Namespace) -> int:
    from engine.export_format import read_export_meta

    onnx_dir = Path(args.onnx)
    try:
        meta = read_export_meta(onnx_dir)
        if args.fp16:
            from engine.fp16 import fp16_export_for

            onnx_dir = fp16_export_for(onnx_dir, args.out)
            print(f"FP16 export: {onnx_dir}")
        elif not args.fp16 and meta.get("precision") == "fp16":
            print(f"fluorosam build-engine: {onnx_dir} is an FP16 export; pass --fp16", file=sys.stderr)
            return 2
        started = time.perf_counter()
        targets = tuple(t.strip().upper() for t in args.targets.split(",")) if args.targets else None
        paths = build_engines(onnx_dir, args.out, flavor=args.flavor, targets=targets, force=args.force)
    except (ImportError, FileNotFoundError, ValueError, EngineBuildError) as error:
        print(f"fluorosam build-engine: {error}", file=sys.stderr)
        return 1
    records = {r["plan"]: r for r in json.loads((Path(args.out) / ENGINES_FILE).read_text())["plans"]}
    for stem, path in paths.items():
        record = records[path.name]
        print(f"{stem}: {path}  {record['flavor']} {record['tensorrt_version']} {record['precision']} "
              f"targets {record['target']}  {record['layers']} layers  {record['plan_bytes'] / 1e6:.1f} MB")
    print(f"done in {time.perf_counter() - started:.1f} s (cached plans are reused; --force rebuilds)")
    return 0
