"""The Segmenter: one API over the backends, with every cache the stream needs.

* Start-up: from an export folder (``fluorosam export``; export.json) the Segmenter runs on numpy with ONNX
  Runtime or TensorRT and never imports torch, as nanosam's predictor does. From a checkpoint folder it
  uses that checkpoint's export (``<model>/onnx`` or the cache, matched by the weights' sha256) and makes
  one with torch, once, when there is none; the ``torch`` backends load the checkpoint itself.
* Text: normalized prompt -> LRU cache -> the export's vocabulary token table if present, else its text
  graph (sentence encoder + VQ, ONNX Runtime), else the model's text encoder (torch). Out-of-vocabulary
  prompts are refused, never guessed.
* Frames: a frame byte-identical to the one behind the kept embedding reuses it (pulsed fluoroscopy
  and last-image-hold repeat frames); optionally also a near-duplicate (mean absolute difference on a
  small thumbnail, as a fraction of the display window, at most ``near_duplicate_threshold``). A prompt
  change on a held frame therefore runs the decoder only. The kept embedding is dropped before a new
  one is computed, so a failed frame can never leave a stale embedding behind.
* All prompts of a frame are decoded in one batch; optionally each prompt's previous low-resolution
  mask is fed back as the dense prompt (``temporal_prompt``).
Pre/post-processing is fluorosam_common/frames.py for every backend.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.export_format import EXPORT_META_FILE, TEXT_TABLE_FILE, load_text_table, pack_points, read_export_meta
from fluorosam_common.checkpoint_files import WEIGHTS_FILE, read_meta
from fluorosam_common.frames import FrameError, Letterbox, postprocess_masks, preprocess, refusal_reason, validate_frame
from fluorosam_common.hashing import file_sha256
from fluorosam_common.prompts import normalize_prompt
from fluorosam_common.thin import tip_point
from fluorosam_common.vocabulary import Vocabulary

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "FrameError", "Prompt", "PromptResult", "SegmentResult", "Segmenter", "label_mask"]

BACKENDS = ("auto", "torch", "torch-cuda", "onnxruntime", "tensorrt")
TORCH_BACKENDS = ("torch", "torch-cuda")
THUMBNAIL_SIDE = 64
TEXT_CACHE_SIZE = 512
COUNTERS = ("frames", "text_cache_hits", "text_cache_misses", "embedding_reuses", "near_duplicate_reuses",
            "embedding_computes", "decoder_runs", "refused")


@dataclass
class Prompt:
    text: str
    points: tuple[tuple[float, float, int], ...] = ()  # frame pixels (x, y, label 1 positive / 0 negative)


@dataclass
class PromptResult:
    prompt: str
    mask: np.ndarray | None  # bool (H, W), None when refused
    score: float
    refused: bool
    reason: str  # "" | "out_of_vocabulary" | "low_score" | "empty_mask"
    area: int = 0
    bbox: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 inclusive
    centroid: tuple[float, float] | None = None  # x, y
    tip: tuple[float, float] | None = None  # x, y of a device's tip (tool prompts; fluorosam_common.thin)


@dataclass
class SegmentResult:
    results: list[PromptResult]
    embedding_reused: bool
    timings_ms: dict
    frame_shape: tuple[int, int] = (0, 0)  # (H, W) of the frame, so an all-refused result still sizes a label mask


@dataclass
class _KeptFrame:
    frame: np.ndarray  # a private copy: the caller may reuse its buffer for the next frame
    thumbnail: np.ndarray
    window: tuple[float, float]
    geometry: Letterbox
    embedding: object


def cache_root() -> Path:
    """Where exported ONNX and TensorRT engines are cached: $FLUOROSAM_CACHE or ~/.cache/fluorosam."""
    return Path(os.environ.get("FLUOROSAM_CACHE") or Path.home() / ".cache" / "fluorosam")


def _torch_cuda_available() -> bool:
    """A CUDA device for torch, asked of torch only where an NVIDIA driver is present (importing torch costs
    seconds and hundreds of MB that a CPU or TensorRT node does not need)."""
    if not os.path.exists("/dev/nvidiactl"):
        return False
    import torch

    return torch.cuda.is_available()


def same_frame(kept: np.ndarray, frame: np.ndarray) -> bool:
    """Byte-identical frames (dtype, shape and pixels). A direct comparison, not a hash: no collision
    can ever reuse a stale embedding, and it is ~30x faster than blake2b on a 1024x1024 uint16 frame."""
    return kept.dtype == frame.dtype and kept.shape == frame.shape and bool(np.array_equal(kept, frame))


def _thumbnail(frame: np.ndarray) -> np.ndarray:
    stride_y = max(1, frame.shape[0] // THUMBNAIL_SIDE)
    stride_x = max(1, frame.shape[1] // THUMBNAIL_SIDE)
    return frame[::stride_y, ::stride_x].astype(np.float32)


def label_mask(result: SegmentResult) -> np.ndarray:
    """uint8 (H, W): 0 background, k where the k-th prompt (1-based) has its mask; later prompts paint over."""
    masks = [(k, r.mask) for k, r in enumerate(result.results, start=1) if r.mask is not None]
    if len(result.results) > 255:
        raise ValueError(f"{len(result.results)} prompts do not fit a uint8 label mask")
    shape = masks[0][1].shape if masks else tuple(result.frame_shape)
    out = np.zeros(shape, np.uint8)
    for k, mask in masks:
        out[mask] = k
    return out


def _describe(mask: np.ndarray) -> tuple[int, tuple[int, int, int, int], tuple[float, float]]:
    """Area, box (x0, y0, x1, y1) inclusive and centroid (x, y) of a non-empty mask, from its row and
    column projections (a few times faster than ``np.nonzero`` on a full frame)."""
    per_row = np.count_nonzero(mask, axis=1)
    per_col = np.count_nonzero(mask, axis=0)
    rows, cols = np.flatnonzero(per_row), np.flatnonzero(per_col)
    area = int(per_row.sum())
    centroid = (float(per_col @ np.arange(mask.shape[1])) / area, float(per_row @ np.arange(mask.shape[0])) / area)
    return area, (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])), centroid


class Segmenter:
    """Language- and point-promptable segmentation of a frame stream (see the module docstring).

    Not thread-safe: the caches assume one caller at a time (the node's single inference worker).
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, backend: str = "auto",
                 min_score: float | None = None, near_duplicate_threshold: float | None = None,
                 temporal_prompt: bool = False, device: str | None = None, threads: int | None = None,
                 onnx_dir: str | os.PathLike | None = None, engine_dir: str | os.PathLike | None = None,
                 text_cache_size: int = TEXT_CACHE_SIZE) -> None:
        """``model_dir``: a checkpoint folder (default: the bundled model) or an export folder (no torch)."""
        from fluorosam_common.paths import default_model_dir

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        if near_duplicate_threshold is not None and not 0 <= near_duplicate_threshold < 1:
            raise ValueError("near_duplicate_threshold is a fraction of the display window, in [0, 1)")
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self._model = None
        if (self.model_dir / EXPORT_META_FILE).exists():
            if backend in TORCH_BACKENDS:
                raise ValueError(f"{self.model_dir} is an export folder: the {backend!r} backend needs the "
                                 "checkpoint folder it was exported from")
            if onnx_dir is not None:
                raise ValueError("give either an export folder as model_dir or onnx_dir, not both")
            self.onnx_dir: Path | None = self.model_dir
            self.checkpoint_sha256 = read_export_meta(self.model_dir)["checkpoint_sha256"]
            self.meta: dict = {}
        else:
            self.meta = read_meta(self.model_dir)
            self.checkpoint_sha256 = file_sha256(self.model_dir / WEIGHTS_FILE)
            self.onnx_dir = self._find_onnx(onnx_dir)
        self.near_duplicate_threshold = near_duplicate_threshold
        self.temporal_prompt = temporal_prompt
        self.threads = threads
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._text_cache: OrderedDict[str, tuple[np.ndarray, bool]] = OrderedDict()
        self._text_cache_size = text_cache_size
        self._kept: _KeptFrame | None = None
        self._previous_masks: dict[tuple, np.ndarray] = {}
        self._previous_shape: tuple[int, ...] | None = None
        self.backend = self._make_backend(backend, device, engine_dir)
        self.backend_name: str = self.backend.name
        export_meta = read_export_meta(self.onnx_dir) if self.onnx_dir is not None else None
        if export_meta is not None:
            self.image_size, self.mask_hw = int(export_meta["image_size"]), int(export_meta["mask_hw"])
        else:
            self.image_size, self.mask_hw = self.model.config.image_size, self.model.config.mask_hw
        recorded = export_meta.get("min_score") if export_meta is not None else self.meta.get("min_score")
        self.min_score = float(min_score if min_score is not None else recorded or 0.0)
        self._text_table = self._load_text_table()
        self._text_graph = self._load_text_graph(export_meta)
        self._vocabulary = Vocabulary.load()
        self._tool_classes = {c.name for c in self._vocabulary.classes if c.kind == "tool"}

    # ------------------------------------------------------------------------------- construction
    @property
    def model(self):
        """The torch model (loaded on first use: the torch backends and the torch text fallback need it)."""
        if self._model is None:
            import torch

            from training.model import load_checkpoint

            if self.threads:
                torch.set_num_threads(int(self.threads))
            self._model, self.meta = load_checkpoint(self.model_dir)
        return self._model

    @property
    def torch_loaded(self) -> bool:
        return self._model is not None

    def _find_onnx(self, explicit) -> Path | None:
        """An export of THIS checkpoint: the given folder, ``<model>/onnx`` or the cache (by checkpoint hash)."""
        candidates = [Path(explicit)] if explicit is not None else []
        candidates += [self.model_dir / "onnx", self._onnx_cache_dir()]
        for candidate in candidates:
            chosen = explicit is not None and candidate == Path(explicit)
            try:
                if read_export_meta(candidate).get("checkpoint_sha256") == self.checkpoint_sha256:
                    return Path(candidate)
            except FileNotFoundError:
                continue
            except ValueError:  # an export in an older format: re-export, unless the user chose it
                if chosen:
                    raise
                continue
            if chosen:
                raise ValueError(f"{explicit} was exported from a different checkpoint than {self.model_dir}")
        if explicit is not None:
            raise FileNotFoundError(f"no export.json in {explicit}")
        return None

    def _onnx_cache_dir(self) -> Path:
        return cache_root() / "onnx" / self.checkpoint_sha256[:16]

    def _ensure_onnx(self) -> Path:
        if self.onnx_dir is None:
            from engine.export import export_model

            target = self._onnx_cache_dir()
            log.info("exporting %s to ONNX in %s (once per checkpoint)", self.model_dir, target)
            # No text table here: the LRU + text graph cover it and start-up stays short.
            self.onnx_dir = export_model(self.model_dir, target, with_text_table=False)
        return Path(self.onnx_dir)

    def _load_text_table(self) -> dict[str, tuple[np.ndarray, bool]]:
        # Only the table of an export verified to come from this checkpoint (export.json's hash).
        if self.onnx_dir is not None and (self.onnx_dir / TEXT_TABLE_FILE).exists():
            return load_text_table(self.onnx_dir / TEXT_TABLE_FILE)
        return {}

    def _load_text_graph(self, export_meta: dict | None):
        """The export's text graph, unless a torch backend already holds the model's own text encoder."""
        record = (export_meta or {}).get("text_encoder")
        if record is None or self.backend_name in TORCH_BACKENDS:
            return None
        from engine.text_encoder import OnnxTextEncoder

        return OnnxTextEncoder(self.onnx_dir, record)

    def _engine_dirs(self, engine_dir) -> list[Path]:
        if engine_dir is not None:
            return [Path(engine_dir)]
        return [self.model_dir / "tensorrt", cache_root() / "tensorrt"]

    def _tensorrt_engines(self, engine_dir) -> Path | None:
        from engine.backends.tensorrt_backend import find_engines, tensorrt_available

        if self.onnx_dir is None or not tensorrt_available()[0]:
            return None
        for folder in self._engine_dirs(engine_dir):
            fp16 = folder / "onnx-fp16"  # FP16 plans of an FP32 export are keyed to its conversion
            exports = [d for d in (self.onnx_dir, fp16) if (d / EXPORT_META_FILE).exists()]
            if any(find_engines(d, folder) is not None for d in exports):
                return folder
        return None

    def _make_backend(self, backend: str, device: str | None, engine_dir):
        if backend == "auto":
            if self._tensorrt_engines(engine_dir) is not None:
                backend = "tensorrt"
            elif self.onnx_dir != self.model_dir and _torch_cuda_available():
                backend = "torch-cuda"
            else:
                backend = "onnxruntime"
                try:
                    self._ensure_onnx()
                except Exception as error:  # noqa: BLE001  (any export failure: fall back, say why)
                    log.warning("ONNX export failed (%s); using the torch backend", error)
                    backend = "torch"
        if backend == "tensorrt":
            from engine.backends.tensorrt_backend import (
                TensorRTBackend,
                build_engines,
                find_engines,
                tensorrt_available,
            )
            from engine.fp16 import fp16_export_for

            ok, reason = tensorrt_available()
            if not ok:
                raise RuntimeError(f"backend 'tensorrt' unavailable: {reason}")
            onnx_dir = self._ensure_onnx()
            folder = self._tensorrt_engines(engine_dir) or self._engine_dirs(engine_dir)[-1]
            if find_engines(onnx_dir, folder) is None:  # FP16 plans, as `fluorosam build-engine --fp16` makes
                onnx_dir = fp16_export_for(onnx_dir, folder)
                build_engines(onnx_dir, folder)
            return TensorRTBackend(onnx_dir, folder)
        if backend == "onnxruntime":
            from engine.backends.onnxruntime_backend import OnnxRuntimeBackend

            return OnnxRuntimeBackend(self._ensure_onnx(), threads=self.threads)
        from engine.backends.torch_backend import TorchBackend

        if backend == "torch-cuda":
            if not _torch_cuda_available():
                raise RuntimeError("backend 'torch-cuda' needs a CUDA device; none is available")
            return TorchBackend(self.model, device or "cuda")
        return TorchBackend(self.model, device or "cpu")

    # ------------------------------------------------------------------------------------------ text
    def _text_tokens(self, texts: list[str]) -> list[tuple[np.ndarray | None, bool]]:
        """(token (256,), oov) per prompt via the LRU cache, the token table, then the text graph or encoder."""
        keys = [normalize_prompt(t) for t in texts]
        resolved: dict[str, tuple[np.ndarray | None, bool]] = {}
        for key in keys:
            if key in resolved:
                continue
            if key in self._text_cache:
                self.counters["text_cache_hits"] += 1
                self._text_cache.move_to_end(key)
                resolved[key] = self._text_cache[key]
            else:
                self.counters["text_cache_misses"] += 1
                if not key:
                    resolved[key] = (None, True)  # nothing left after normalization: nothing to segment
                elif key in self._text_table:
                    resolved[key] = self._text_table[key]
        to_encode = [k for k in dict.fromkeys(keys) if k not in resolved]
        if to_encode:
            for key, token, oov in zip(to_encode, *self._encode_text(to_encode)):
                resolved[key] = (token, bool(oov))
        for key, value in resolved.items():
            self._remember(key, value)
        return [resolved[key] for key in keys]

    def _encode_text(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._text_graph is not None:
            return self._text_graph.encode(texts)
        import torch

        with torch.no_grad():
            encoding = self.model.encode_text(texts)
        return encoding.tokens.float().cpu().numpy(), encoding.oov.cpu().numpy()

    def _names_a_tool(self, text: str) -> bool:
        """Whether the vocabulary resolves the prompt to a tool class (then its result carries the tip); a
        lookup costs microseconds, so it is not cached."""
        return self._vocabulary.lookup(text) in self._tool_classes

    def _remember(self, key: str, value) -> None:
        self._text_cache[key] = value
        self._text_cache.move_to_end(key)
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)

    # ---------------------------------------------------------------------------------------- frames
    def _embedding_for(self, frame: np.ndarray, timings: dict) -> tuple[object, Letterbox, bool]:
        kept = self._kept
        if kept is not None and same_frame(kept.frame, frame):
            self.counters["embedding_reuses"] += 1
            return kept.embedding, kept.geometry, True
        thumbnail = _thumbnail(frame)
        if (self.near_duplicate_threshold is not None and kept is not None and kept.frame.shape == frame.shape
                and kept.thumbnail.shape == thumbnail.shape):
            lo, hi = kept.window
            change = float(np.abs(thumbnail - kept.thumbnail).mean()) / (hi - lo)
            if change <= self.near_duplicate_threshold:
                self.counters["embedding_reuses"] += 1
                self.counters["near_duplicate_reuses"] += 1
                return kept.embedding, kept.geometry, True
        self._kept = None  # from here on, a failure leaves no embedding to reuse
        started = time.perf_counter()
        image, geometry = preprocess(frame, self.image_size)
        timings["preprocess"] = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        embedding = self.backend.encode(image)
        timings["encode"] = (time.perf_counter() - started) * 1e3
        self.counters["embedding_computes"] += 1
        lo, hi = np.percentile(thumbnail, (0.5, 99.5))
        window = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
        self._kept = _KeptFrame(frame.copy(), thumbnail, window, geometry, embedding)
        return embedding, geometry, False

    # --------------------------------------------------------------------------------------- segment
    def segment(self, frame: np.ndarray, prompts: list[Prompt | str]) -> SegmentResult:
        """Segment every prompt on ``frame``; raises FrameError for a frame that cannot be used."""
        started = time.perf_counter()
        frame = validate_frame(frame)
        prompts = [self._as_prompt(p) for p in prompts]
        self.counters["frames"] += 1
        timings: dict[str, float] = {}
        if self._previous_shape != frame.shape:
            self._previous_masks.clear()  # previous masks belong to another frame geometry
            self._previous_shape = frame.shape
        t = time.perf_counter()
        texts = self._text_tokens([p.text for p in prompts])
        timings["text"] = (time.perf_counter() - t) * 1e3
        results: list[PromptResult | None] = [None] * len(prompts)
        active = []
        for i, (prompt, (_, oov)) in enumerate(zip(prompts, texts)):
            if oov:
                results[i] = PromptResult(prompt.text, None, 0.0, True, "out_of_vocabulary")
            else:
                active.append(i)
        reused = False
        if active:
            embedding, geometry, reused = self._embedding_for(frame, timings)
            results_active = self._decode(embedding, geometry, [prompts[i] for i in active],
                                          np.stack([texts[i][0] for i in active]).astype(np.float32), timings)
            for i, result in zip(active, results_active):
                results[i] = result
        self.counters["refused"] += sum(r.refused for r in results)
        timings["total"] = (time.perf_counter() - started) * 1e3
        return SegmentResult(results, reused, timings, tuple(frame.shape[:2]))

    @staticmethod
    def _as_prompt(prompt) -> Prompt:
        if isinstance(prompt, str):
            return Prompt(prompt)
        if not isinstance(prompt, Prompt):
            raise TypeError(f"prompts must be str or Prompt, got {type(prompt).__name__}")
        for point in prompt.points:
            if len(point) != 3 or not all(math.isfinite(float(v)) for v in point[:2]) or point[2] not in (0, 1):
                raise ValueError(f"point {point!r} of prompt {prompt.text!r} must be (x, y, label 0|1) "
                                 "with finite x, y")
        return prompt

    def _temporal_key(self, prompt: Prompt) -> tuple:
        return normalize_prompt(prompt.text), tuple(prompt.points)

    def _decode(self, embedding, geometry: Letterbox, prompts: list[Prompt], tokens: np.ndarray,
                timings: dict) -> list[PromptResult]:
        k, m = len(prompts), self.mask_hw
        coords, labels = pack_points([list(p.points) for p in prompts], geometry.to_input)
        mask_input = np.zeros((k, 1, m, m), np.float32)
        has_mask = np.zeros((k, 1), np.float32)
        if self.temporal_prompt:
            for i, prompt in enumerate(prompts):
                previous = self._previous_masks.get(self._temporal_key(prompt))
                if previous is not None:
                    mask_input[i, 0], has_mask[i, 0] = previous, 1.0
        t = time.perf_counter()
        low_res, scores, _ = self.backend.decode(embedding, tokens, coords, labels, mask_input, has_mask)
        self.counters["decoder_runs"] += 1
        timings["decode"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        masks = postprocess_masks(low_res, geometry) > 0
        results = []
        for i, prompt in enumerate(prompts):
            score = float(scores[i])
            key = self._temporal_key(prompt)
            reason = refusal_reason(score, self.min_score, not masks[i].any())
            if reason:
                results.append(PromptResult(prompt.text, None, score, True, reason))
                self._previous_masks.pop(key, None)
                continue
            area, bbox, centroid = _describe(masks[i])
            tip = tip_point(masks[i]) if self._names_a_tool(prompt.text) else None
            results.append(PromptResult(prompt.text, masks[i], score, False, "", area, bbox, centroid, tip))
            if self.temporal_prompt:
                self._previous_masks[key] = np.asarray(low_res[i], np.float32)
        timings["postprocess"] = (time.perf_counter() - t) * 1e3
        return results

    label_mask = staticmethod(label_mask)

    def reset(self) -> None:
        """Forget the kept embedding and previous masks (e.g. when the stream changes)."""
        self._kept = None
        self._previous_masks.clear()
