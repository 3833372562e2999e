"""``fluorosam`` console script: one entry point, one subcommand per module.

Subcommand modules are imported only when chosen, so ``fluorosam node`` does not pay for the
renderer's imports and ``fluorosam data`` does not pay for the transports'. Each module exposes
``add_arguments(parser)`` and ``main(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("training.data.cli", "render synthetic X-rays, export eval sets"),
    "train": ("training.train", "train a FluoroSAM model"),
    "fit-iou-head": ("training.iou_head", "fit the mask-aware IoU head alone on a frozen model"),
    "average": ("training.average", "average the weights of fine-tunes of one model (a model soup)"),
    "evaluate": ("training.evaluate", "evaluate a model on an eval-set folder"),
    "publish": ("training.publish", "store a checkpoint compactly (float16), as a default is committed"),
    "compare": ("training.compare", "paired per-item differences between two evaluations of one eval set"),
    "export": ("engine.export", "export a checkpoint to ONNX"),
    "build-engine": ("engine.build", "build TensorRT FP16 engines from the ONNX (GPU machines)"),
    "bench": ("engine.bench", "benchmark the Segmenter (ratios measured in one run)"),
    "node": ("fluorosam_ros.runner", "run the streaming node over dds or zmq (no ROS install needed)"),
    "replay": ("fluorosam_ros.replay", "replay a rosbag2 through the node, write a masks bag"),
    "demo": ("fluorosam_ros.demo", "stream a rendered fluoroscopy sequence through the node"),
}


def _usage() -> str:
    lines = ["usage: fluorosam <command> [options]", "", "commands:"]
    lines += [f"  {name:<13} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fluorosam: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"fluorosam {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
