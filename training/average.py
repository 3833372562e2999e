"""``fluorosam average A B ... --out DIR``: one model from the weight average of fine-tunes of one start.

Runs warm-started from the same checkpoint stay in one basin of the loss (three 500-step warm starts of the
default differ from it by about 5 % of the weights' norm, from each other by 6-7 %), so the mean of their
weights is itself a model, often better than each ("model soups", Wortsman et al., 2022). Measured here
(2026-12-03, training log): the mean of three warm starts gained +0.009 / +0.014 on the renders' 15 largest
with 3 / 5 clicks against the start, more than any of the three, but not on the real films' lungs text-only.
The default since 2026-12-07 is such a mean of a start and its fine-tune with the fine path (training log).

Every floating-point tensor is averaged in float64 and cast back to its dtype. Tensors that training does not
change (the phrase table, integer buffers) must be equal in all inputs, the phrase table up to float16 or int8
rounding (a published input).
The out-of-vocabulary thresholds and ``min_score`` belong to one model's code distances and scores, so the output
takes the strictest of the inputs' until it is calibrated again (``fluorosam evaluate --calibrate`` on a val set).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.model import FluoroSAM, save_checkpoint
from training.model.checkpoint import WEIGHTS_FILE, bodies_seen, checkpoint_provenance, model_from_state, read_meta

MUST_BE_EQUAL = ("phrase_table",)  # set from the vocabulary, never trained


def _same_untrained(tensor: torch.Tensor, first: torch.Tensor) -> bool:
    """Integer buffers must be equal; the phrase table, the frozen sentence encoder's output recomputed by each
    run, may differ by float16 rounding (measured: 1.2e-4 at most, in 0.6 % of the entries, between a run on
    the Xeon and one on the EPYC) and by a compact checkpoint's int8 rows (half a step of the row's scale), which
    is the same table: the first input's is kept."""
    if not first.is_floating_point():
        return torch.equal(tensor, first)
    int8_step = first.float().abs().amax(dim=-1, keepdim=True) / 127 if first.ndim == 2 else 0.0
    return bool(((tensor.float() - first.float()).abs() <= int8_step + 2e-4 + 4e-3 * first.float().abs()).all())


def _common_config(configs: list[dict]) -> dict:
    """The inputs' one config; they may differ only in ``fine_features``, and then the output has the path."""
    plain = [{k: v for k, v in c.items() if k != "fine_features"} for c in configs]
    if any(p != plain[0] for p in plain[1:]):
        raise ValueError("checkpoints differ in config: only fine-tunes of one model can be averaged")
    return dict(configs[0], fine_features=any(c.get("fine_features", False) for c in configs))


def _strictest(values: list, pick) -> float | None:
    known = [v for v in values if v is not None and math.isfinite(v)]
    return pick(known) if known else None


def average_checkpoints(model_dirs: list[str | Path]) -> tuple[FluoroSAM, dict]:
    """The averaged model (eval mode) and its ``model.json`` metadata; raises ValueError on incompatible inputs."""
    if len(model_dirs) < 2:
        raise ValueError("average needs at least two checkpoints")
    metas = [read_meta(d) for d in model_dirs]
    if any(m.get("vocabulary_sha256") != metas[0].get("vocabulary_sha256") for m in metas[1:]):
        raise ValueError("checkpoints differ in vocabulary_sha256: only fine-tunes of one model can be averaged")
    config = _common_config([m["config"] for m in metas])
    # Through the model, so a compact (published) input's int8 phrase table and float16 weights read as trained.
    states = [model_from_state(m, load_file(str(Path(d) / WEIGHTS_FILE))).state_dict()
              for m, d in zip(metas, model_dirs)]
    # Each state loaded strictly into its own config, and the configs differ at most in fine_features: the only
    # tensors some inputs lack are the fine path's. A warm start that adds the path answers exactly as its start, so
    # the two are one basin; the path's tensors are averaged over the inputs that hold them.
    names = list(dict.fromkeys(name for s in states for name in s))
    averaged = {}
    for name in names:
        tensors = [s[name] for s in states if name in s]
        first = tensors[0]
        if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors[1:]):
            raise ValueError(f"tensor {name} differs in shape or dtype between checkpoints")
        if name in MUST_BE_EQUAL or not first.is_floating_point():
            if not all(_same_untrained(t, first) for t in tensors[1:]):
                raise ValueError(f"tensor {name} is not trained, yet differs between checkpoints")
            averaged[name] = first
        else:
            averaged[name] = (sum(t.double() for t in tensors) / len(tensors)).to(first.dtype)
    oovs = [m.get("oov") or {} for m in metas]
    strictest_oov = {"code_distance_max": _strictest([o.get("code_distance_max") for o in oovs], min),
                     "vocab_similarity_min": _strictest([o.get("vocab_similarity_min") for o in oovs], max)}
    model = model_from_state({"config": config, "oov": strictest_oov}, averaged)
    manifests = {m.get("data_manifest_sha256") for m in metas}
    meta = {"vocabulary_sha256": metas[0].get("vocabulary_sha256"),
            "data_manifest_sha256": manifests.pop() if len(manifests) == 1 else None,
            "min_score": _strictest([m.get("min_score") for m in metas], max),
            "metrics": {},
            # Each input as a warm start records it (weights hash, training record or its own ingredients).
            "averaged_from": [checkpoint_provenance(d) for d in model_dirs]}
    meta["bodies"] = bodies_seen(meta)
    return model.eval(), meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", help="checkpoint folders: fine-tunes of one start, same config")
    parser.add_argument("--out", required=True, help="folder for the averaged checkpoint")


def main(args: argparse.Namespace) -> int:
    try:
        model, meta = average_checkpoints(args.models)
    except (ValueError, FileNotFoundError) as error:
        print(f"fluorosam average: {error}", file=sys.stderr)
        return 2
    save_checkpoint(model, args.out, meta)
    print(f"averaged {len(args.models)} checkpoints into {args.out}; OOV thresholds and min_score are the strictest "
          f"of the inputs' until calibrated: fluorosam evaluate --model {args.out} --eval-set VAL --calibrate ...")
    return 0
