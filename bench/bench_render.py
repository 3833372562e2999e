"""Render throughput with every class mask: images/s at 256 and 512 px, native vs downsampled CT.

All configurations render the same seeds (same poses and tools) in one run, one thread, so the
ratios compare like with like. Usage: ``python bench/bench_render.py [--views 3] [--sizes 256 512]``.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=3, help="views per configuration")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--voxels", type=float, nargs="+", default=[0.0, 2.5], help="0 = native CT grid")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from fluorosam_common.vocabulary import Vocabulary
    from training.data.ct import load_ct
    from training.data.render import ClassMasker, render_random_view

    masker = ClassMasker(Vocabulary.load())
    rows = []
    for voxel in args.voxels:
        started = time.perf_counter()
        ct = load_ct(voxel_mm=voxel or None)
        load_s = time.perf_counter() - started
        for size in args.sizes:
            render_random_view(ct, 0, size, masker)  # warm-up
            started = time.perf_counter()
            for seed in range(1, args.views + 1):
                render_random_view(ct, seed, size, masker)
            per_view = (time.perf_counter() - started) / args.views
            rows.append((size, voxel, ct.labels.shape, load_s, per_view))
            print(f"  {size} px, voxel {voxel or 'native'}: {per_view:.2f} s/view", flush=True)
    native = {size: s for size, voxel, _, _, s in rows if voxel == 0}
    print(f"\n{'size':>5} {'voxel mm':>9} {'grid':>15} {'load s':>7} {'s/view':>7} {'images/s':>9} {'speed-up':>9}")
    for size, voxel, grid, load_s, per_view in rows:
        speedup = f"{native[size] / per_view:.1f}x" if size in native else "-"
        print(f"{size:>5} {voxel or 'native':>9} {'x'.join(map(str, grid)):>15} {load_s:>7.1f} {per_view:>7.2f} "
              f"{1 / per_view:>9.2f} {speedup:>9}")
    print(f"({args.views} views each, all {len(masker.names)} class masks, {args.threads} thread(s), "
          "tools in about half the views)")


if __name__ == "__main__":
    main()
