"""Shard jobs: planning, running them in local processes or as Ray tasks, and the manifest bookkeeping.

Every shard is an independent job (CT, output file, list of view seeds), so the same plan runs on a
laptop (a process pool) or a cluster (Ray tasks; ``ray.init(address=...)``) and produces the same
files. The coordinator adds each finished shard to the manifest as it arrives, so training can start
on a partial render. A rerun with the same settings skips shards that are already complete.
"""
from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .shards import MANIFEST, add_shard, new_manifest, read_manifest, write_manifest, write_shard

SEEDS_PER_CT = 1_000_000  # view seeds of CT k start at seed + k * SEEDS_PER_CT


@dataclass(frozen=True)
class CTSpec:
    """Where a CT comes from: the bundled example (volume None) or NIfTI files."""

    ct_id: str
    volume: str | None = None
    labels: str | None = None
    voxel_mm: float | None = 2.5


@dataclass(frozen=True)
class ShardJob:
    ct: CTSpec
    out: str
    file: str
    seeds: tuple[int, ...]
    size: int
    tool_probability: float
    vocabulary: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def safe_ct_id(ct_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ct_id)


def plan_jobs(cts: list[CTSpec], out: Path, views: int, size: int, seed: int, shard_size: int,
              tool_probability: float, vocabulary: str | None = None) -> list[ShardJob]:
    if views < 1 or shard_size < 1:
        raise ValueError(f"views ({views}) and shard size ({shard_size}) must be positive")
    if size < 16 or size % 8:
        raise ValueError(f"image size must be a multiple of 8 and at least 16, got {size}")
    if len({c.ct_id for c in cts}) != len(cts):
        raise ValueError("CT ids must be unique")
    jobs = []
    for k, ct in enumerate(cts):
        base = seed + k * SEEDS_PER_CT
        for n, start in enumerate(range(0, views, shard_size)):
            seeds = tuple(range(base + start, base + min(views, start + shard_size)))
            jobs.append(ShardJob(ct, str(out), f"shard-{safe_ct_id(ct.ct_id)}-{n:05d}.npz", seeds, size,
                                 tool_probability, vocabulary))
    return jobs


_WORKER_STATE: dict = {}


def _worker_context(job: ShardJob):
    """CT and class masker for this process, loaded once and reused by later jobs on the same CT."""
    import torch

    from fluorosam_common.vocabulary import Vocabulary

    from .ct import load_ct
    from .render import ClassMasker

    torch.set_num_threads(1)
    key = (job.ct, job.vocabulary)
    if _WORKER_STATE.get("key") != key:
        _WORKER_STATE.clear()
        ct = load_ct(job.ct.volume, job.ct.labels, ct_id=job.ct.ct_id, voxel_mm=job.ct.voxel_mm)
        _WORKER_STATE.update(key=key, ct=ct, masker=ClassMasker(Vocabulary.load(job.vocabulary)))
    return _WORKER_STATE["ct"], _WORKER_STATE["masker"]


def run_shard_job(job: ShardJob) -> dict:
    """Render the job's views, write its shard atomically, return its manifest entries."""
    from .render import render_random_view

    ct, masker = _worker_context(job)
    started = time.perf_counter()
    images, masks, items = [], [], []
    for seed in job.seeds:
        view = render_random_view(ct, seed, job.size, masker, job.tool_probability)
        images.append(view.image)
        masks.append(view.masks)
        items.append({"seed": seed, "pose": view.pose.to_dict(), "tools": view.tools})
    present = write_shard(Path(job.out) / job.file, np.stack(images), np.stack(masks))
    for item, flags in zip(items, present):
        item["present"] = [name for name, flag in zip(masker.names, flags) if flag]
    return {"file": job.file, "ct_id": job.ct.ct_id, "items": items, "seconds": time.perf_counter() - started}


def _init_process_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _run_local(jobs: list[ShardJob], workers: int):
    if workers <= 1:
        _init_process_worker()
        for job in jobs:
            yield run_shard_job(job)
        return
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_process_worker) as pool:
        futures = [pool.submit(run_shard_job, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def _run_ray(jobs: list[ShardJob], workers: int, address: str | None):
    """Each shard job as one Ray task (1 CPU); joins ``address`` or starts a local Ray instance."""
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=1)(run_shard_job)
    pending = [remote.remote(job) for job in jobs]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def render_dataset(cts: list[CTSpec], out: str | Path, views: int, size: int, seed: int = 0, workers: int = 1,
                   shard_size: int = 16, tool_probability: float = 0.5, backend: str = "local",
                   ray_address: str | None = None, vocabulary: str | None = None, overwrite: bool = False,
                   progress: bool = True, known_classes: list[str] | None = None) -> dict:
    """Render ``views`` views of each CT into shards under ``out``; returns the final manifest.

    ``known_classes``: the only classes the bodies' labels can judge (see ``shards.known_class_flags``)."""
    from tqdm import tqdm

    from fluorosam_common.vocabulary import Vocabulary

    if backend not in ("local", "ray"):
        raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary.load(vocabulary)
    settings = {"views": views, "seed": seed, "shard_size": shard_size, "tool_probability": tool_probability,
                "cts": [asdict(c) for c in cts]}
    jobs = plan_jobs(cts, out, views, size, seed, shard_size, tool_probability, vocabulary)
    manifest = new_manifest(size, vocab.names, vocab.sha256, settings, vocab.hiding_rules, known_classes)
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        same = (old.get("render") == settings and old["image_size"] == size and old["classes"] == vocab.names
                and old["vocabulary_sha256"] == vocab.sha256
                and old.get("known_classes") == manifest.get("known_classes"))
        if same:
            manifest = old
        elif not overwrite:
            raise FileExistsError(f"{out} holds a render with other settings; use another folder or --overwrite")
    done = {s["file"] for s in manifest["shards"] if (out / s["file"]).exists()}
    todo = [j for j in jobs if j.file not in done]
    write_manifest(out, manifest)
    total = sum(len(j.seeds) for j in jobs)
    bar = tqdm(total=total, initial=total - sum(len(j.seeds) for j in todo), unit="view", desc="render",
               disable=not progress, smoothing=0.1)
    runner = _run_ray(todo, workers, ray_address) if backend == "ray" else _run_local(todo, workers)
    for result in runner:
        add_shard(manifest, result["file"], result["ct_id"], result["items"])
        write_manifest(out, manifest)
        bar.update(len(result["items"]))
    bar.close()
    return manifest
