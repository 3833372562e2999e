"""TensorRT engines from the exported ONNX, for either TensorRT: one builder, one runtime.

Flavors (one Python API for network, parser, optimization profile, engine and execution context):

* ``tensorrt-rtx`` (``tensorrt_rtx_bindings``, on PyPI): builds ahead of time on any x86-64 machine, no GPU
  needed, for named RTX-class targets (SM 7.5 / 8.0 / 8.6 / 8.9 / 12.0 / 12.1: an OR workstation's RTX
  6000 Ada or RTX PRO); the engine finishes compiling for the actual GPU at first run (JIT), and that
  work is kept in a runtime cache beside the plans.
* ``tensorrt`` (TensorRT 10/11, NVIDIA's index): builds on its target GPU, for Hopper, Jetson Orin and
  datacenter cards, which TensorRT-RTX does not cover.

Precision comes from the graph: both build strongly typed networks, so an FP16 export
(:mod:`engine.fp16`, normalization/softmax/reductions and I/O in FP32) gives an FP16 engine with no
builder flag. Plans are cached under a key of flavor + TensorRT version + target (compute capabilities
or GPU name) + ONNX sha256 + precision; ``engines.json`` records what was built, how, and the network's
layer and precision summary. Device buffers through pycuda rather than cuda-python: it owns the context
(``pycuda.autoinit``), allocations and streams in three calls and frees them by reference counting, where
cuda-python needs the same by hand with error-code checks.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from engine.export_format import DECODER_OUTPUTS, PROMPT_INPUTS, read_export_meta

FLAVORS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
RTX_TARGETS = ("SM75", "SM80", "SM86", "SM89", "SM120")  # the default RTX set (SM121: GB10 / DGX Spark)
MAX_PROMPTS = 16  # optimization profile K = 1..16; the Segmenter decodes more in chunks of 16
MAX_POINTS = 9  # P = 0..9 (up to 8 clicks + SAM's padding point)
OPT_PROMPTS, OPT_POINTS = 4, 2
WORKSPACE_BYTES = 4 << 30
ENGINES_FILE = "engines.json"
RUNTIME_CACHE_FILE = "tensorrt_rtx_runtime.cache"
STEMS = ("image_encoder", "prompt_decoder")


class EngineBuildError(RuntimeError):
    """The ONNX graph could not be parsed or built; the message names the node."""


def import_flavor(flavor: str):
    if flavor not in FLAVORS:
        raise ValueError(f"unknown TensorRT flavor {flavor!r}; choose one of {sorted(FLAVORS)}")
    return importlib.import_module(FLAVORS[flavor])


def installed_flavors() -> list[str]:
    found = []
    for flavor in FLAVORS:
        try:
            import_flavor(flavor)
            found.append(flavor)
        except ImportError:
            pass
    return found


def pick_flavor(requested: str = "auto") -> str:
    """TensorRT proper where installed, TensorRT-RTX otherwise (or the one asked for)."""
    if requested != "auto":
        import_flavor(requested)
        return requested
    found = installed_flavors()
    if not found:
        raise ImportError("neither TensorRT (`tensorrt`) nor TensorRT-RTX (`tensorrt_rtx_bindings`) is installed; "
                          "pip install -r requirements-tensorrt-rtx.txt")
    return found[0]


def gpu_name() -> str:
    import pycuda.autoinit  # noqa: F401  (creates the context on device 0)
    import pycuda.driver as cuda

    return cuda.Device(0).name()


def gpu_compute_capability() -> str:
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as cuda

    major, minor = cuda.Device(0).compute_capability()
    return f"SM{major}{minor}"


def engine_key(onnx_sha256: str, precision: str, flavor: str, version: str, target: str) -> str:
    """Cache key of one plan: flavor + TensorRT version + target + ONNX sha256 + precision."""
    text = "|".join([flavor, version, target, onnx_sha256, precision])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _profile_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """min / opt / max of a decoder input: the first dynamic axis is K prompts, the second P points."""
    def make(k: int, p: int) -> tuple[int, ...]:
        values, dynamic = [], 0
        for dim in shape:
            values.append(dim if dim != -1 else (k if dynamic == 0 else p))
            dynamic += dim == -1
        return tuple(values)

    return make(1, 1), make(OPT_PROMPTS, OPT_POINTS), make(MAX_PROMPTS, MAX_POINTS)


def _tensor_record(tensor) -> dict:
    return {"name": tensor.name, "dtype": str(tensor.dtype).rsplit(".", 1)[-1].lower(), "shape": list(tensor.shape)}


def build_engine(trt, onnx_path: Path, plan_path: Path, targets: tuple[str, ...] | None) -> dict:
    """Parse one ONNX graph into a strongly typed network, build a plan for ``targets`` (TensorRT-RTX) or
    this GPU (TensorRT), write it; returns its record. Raises :class:`EngineBuildError` naming the node."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = []
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            errors.append(f"node {error.node_name() or error.node()} ({error.node_operator()}): {error.desc()}")
        raise EngineBuildError(f"{onnx_path.name}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if targets:
        config.num_compute_capabilities = len(targets)
        for index, target in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, target), index)
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profile_record = {}
    if any(-1 in tuple(t.shape) for t in inputs):  # the decoder: K prompts and P points are dynamic
        profile = builder.create_optimization_profile()
        for tensor in inputs:
            if -1 in tuple(tensor.shape):
                shapes = _profile_shapes(tuple(tensor.shape))
                profile.set_shape(tensor.name, *shapes)
                profile_record[tensor.name] = [list(s) for s in shapes]
        config.add_optimization_profile(profile)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path.name}: TensorRT engine build failed (see the TensorRT log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    precisions = Counter(str(layer.get_output_type(0)).rsplit(".", 1)[-1].lower() for layer in layers
                         if layer.num_outputs)
    return {"plan": plan_path.name, "onnx": onnx_path.name, "build_seconds": round(time.perf_counter() - started, 2),
            "plan_bytes": plan_path.stat().st_size, "layers": network.num_layers,
            "layer_output_types": dict(precisions),
            "layer_types": dict(Counter(str(layer.type).rsplit(".", 1)[-1] for layer in layers).most_common(8)),
            "inputs": [_tensor_record(t) for t in inputs],
            "outputs": [_tensor_record(network.get_output(i)) for i in range(network.num_outputs)],
            "profile": profile_record}


def _engine_target(flavor: str, targets: tuple[str, ...] | None) -> tuple[str, tuple[str, ...] | None]:
    if flavor == "tensorrt-rtx":
        targets = tuple(targets or RTX_TARGETS)
        unknown = [t for t in targets if t not in RTX_TARGETS + ("SM121",)]
        if unknown:
            raise ValueError(f"TensorRT-RTX targets {unknown} unknown; it builds for {RTX_TARGETS + ('SM121',)}")
        return ",".join(targets), targets
    if targets:
        raise ValueError("TensorRT builds for the GPU it runs on; --targets is for TensorRT-RTX")
    return gpu_name(), None


def build_engines(onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike, flavor: str = "auto",
                  targets: tuple[str, ...] | None = None, force: bool = False) -> dict[str, Path]:
    """Build (or reuse from the cache) both plans of an export folder; returns their paths by stem and
    records every plan in ``engines.json``."""
    flavor = pick_flavor(flavor)
    trt = import_flavor(flavor)
    meta = read_export_meta(onnx_dir)
    precision = meta.get("precision", "fp32")
    target, build_targets = _engine_target(flavor, targets)
    engine_dir = Path(engine_dir)
    index_path = engine_dir / ENGINES_FILE
    index = json.loads(index_path.read_text()) if index_path.exists() else {"plans": []}
    paths = {}
    for stem in STEMS:
        onnx_sha = meta["sha256"][f"{stem}.onnx"]
        key = engine_key(onnx_sha, precision, flavor, trt.__version__, target)
        plan = engine_dir / f"{stem}-{flavor}-{precision}-{key}.plan"
        paths[stem] = plan
        if plan.exists() and not force:
            continue
        record = build_engine(trt, Path(onnx_dir) / f"{stem}.onnx", plan, build_targets)
        record.update({"stem": stem, "key": key, "flavor": flavor, "tensorrt_version": trt.__version__,
                       "target": target, "precision": precision, "onnx_sha256": onnx_sha,
                       "checkpoint_sha256": meta.get("checkpoint_sha256"),
                       "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": os.uname().nodename})
        index["plans"] = [p for p in index["plans"] if p["plan"] != plan.name] + [record]
    engine_dir.mkdir(parents=True, exist_ok=True)
    index_path.write_text(json.dumps(index, indent=1) + "\n")
    return paths


def find_engines(onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike) -> tuple[str, dict[str, Path]] | None:
    """Plans in ``engine_dir`` that this machine can run for this export: (flavor, paths) or None."""
    index_path = Path(engine_dir) / ENGINES_FILE
    if not index_path.exists():
        return None
    meta = read_export_meta(onnx_dir)
    plans = json.loads(index_path.read_text())["plans"]
    for flavor in installed_flavors():
        trt = import_flavor(flavor)
        here = gpu_compute_capability() if flavor == "tensorrt-rtx" else gpu_name()
        found = {}
        for record in plans:
            runs_here = here in record["target"].split(",")
            if (record["flavor"] == flavor and record["tensorrt_version"] == trt.__version__ and runs_here
                    and record["onnx_sha256"] == meta["sha256"][f"{record['stem']}.onnx"]
                    and (Path(engine_dir) / record["plan"]).exists()):
                found[record["stem"]] = Path(engine_dir) / record["plan"]
        if set(found) == set(STEMS):
            return flavor, found
    return None


class TensorRTBackend:
    """Runs the two plans of either flavor; the encoder's outputs stay in device buffers between encode
    and decode. Needs an NVIDIA GPU (not run on this project's CPU-only CI; see README)."""

    name = "tensorrt"

    def __init__(self, onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike) -> None:
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda

        found = find_engines(onnx_dir, engine_dir)
        if found is None:
            raise FileNotFoundError(f"no TensorRT plans in {engine_dir} for this export and GPU; "
                                    "run `fluorosam build-engine`")
        self.flavor, paths = found
        trt = import_flavor(self.flavor)
        self._cuda = cuda
        self.meta = read_export_meta(onnx_dir)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines = {stem: self._runtime.deserialize_cuda_engine(p.read_bytes()) for stem, p in paths.items()}
        self._runtime_cache_path = Path(engine_dir) / RUNTIME_CACHE_FILE
        self._contexts = {stem: self._context(trt, engine) for stem, engine in self._engines.items()}
        self._stream = cuda.Stream()
        m, dim, size = self.meta["mask_hw"], self.meta["embed_dim"], self.meta["image_size"]
        f32 = np.dtype(np.float32).itemsize
        self._image = cuda.mem_alloc(size * size * f32)
        # One buffer per encoder output (the embedding and any high-res features), named as in export.json.
        self._embeddings = {name: cuda.mem_alloc(int(np.prod(shape)) * f32)
                            for name, shape in self.meta["embeddings"].items()}
        # Decoder buffers sized for the largest profile; each call binds the shapes it uses.
        input_sizes = {"text_tokens": MAX_PROMPTS * dim, "point_coords": MAX_PROMPTS * MAX_POINTS * 2,
                       "point_labels": MAX_PROMPTS * MAX_POINTS, "mask_input": MAX_PROMPTS * m * m,
                       "has_mask_input": MAX_PROMPTS}
        self._inputs = {name: cuda.mem_alloc(n * f32) for name, n in input_sizes.items()}
        self._outputs = {"masks": cuda.mem_alloc(MAX_PROMPTS * m * m * f32),
                         "scores": cuda.mem_alloc(MAX_PROMPTS * f32),
                         "iou_predictions": cuda.mem_alloc(MAX_PROMPTS * 3 * f32)}
        encoder = self._contexts["image_encoder"]
        encoder.set_tensor_address("image", int(self._image))
        for name, buffer in self._embeddings.items():
            encoder.set_tensor_address(name, int(buffer))

    def _context(self, trt, engine):
        """TensorRT-RTX: a runtime config whose cache keeps the first run's JIT work (loaded, then saved)."""
        if self.flavor != "tensorrt-rtx":
            return engine.create_execution_context()
        config = engine.create_runtime_config()
        cache = config.create_runtime_cache()
        if self._runtime_cache_path.exists():
            cache.deserialize(self._runtime_cache_path.read_bytes())
        config.set_runtime_cache(cache)
        self._runtime_cache = cache
        return engine.create_execution_context(config)

    def save_runtime_cache(self) -> None:
        if self.flavor == "tensorrt-rtx":
            self._runtime_cache_path.write_bytes(bytes(self._runtime_cache.serialize()))

    def encode(self, image: np.ndarray):
        self._cuda.memcpy_htod_async(self._image, np.ascontiguousarray(image, np.float32), self._stream)
        if not self._contexts["image_encoder"].execute_async_v3(self._stream.handle):
            raise RuntimeError("TensorRT image encoder execution failed")
        self._stream.synchronize()
        return self._embeddings  # device buffers by name, valid until the next encode

    def decode(self, embedding, text_tokens, point_coords, point_labels, mask_input, has_mask_input):
        k = text_tokens.shape[0]
        if k > MAX_PROMPTS:
            parts = [self.decode(embedding, text_tokens[i:i + MAX_PROMPTS], point_coords[i:i + MAX_PROMPTS],
                                 point_labels[i:i + MAX_PROMPTS], mask_input[i:i + MAX_PROMPTS],
                                 has_mask_input[i:i + MAX_PROMPTS]) for i in range(0, k, MAX_PROMPTS)]
            return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
        if point_coords.shape[1] > MAX_POINTS:
            raise ValueError(f"at most {MAX_POINTS - 1} points per prompt with the TensorRT engine")
        context = self._contexts["prompt_decoder"]
        for name, buffer in embedding.items():
            context.set_tensor_address(name, int(buffer))
        arrays = dict(zip(PROMPT_INPUTS, (text_tokens, point_coords, point_labels, mask_input, has_mask_input)))
        for name, array in arrays.items():
            array = np.ascontiguousarray(array, np.float32)
            context.set_input_shape(name, array.shape)
            if array.size:
                self._cuda.memcpy_htod_async(self._inputs[name], array, self._stream)
            context.set_tensor_address(name, int(self._inputs[name]))
        m = self.meta["mask_hw"]
        host = {"masks": np.empty((k, m, m), np.float32), "scores": np.empty((k,), np.float32),
                "iou_predictions": np.empty((k, 3), np.float32)}
        for name in DECODER_OUTPUTS:
            context.set_tensor_address(name, int(self._outputs[name]))
        if not context.execute_async_v3(self._stream.handle):
            raise RuntimeError("TensorRT prompt decoder execution failed")
        for name in DECODER_OUTPUTS:
            self._cuda.memcpy_dtoh_async(host[name], self._outputs[name], self._stream)
        self._stream.synchronize()
        return host["masks"], host["scores"], host["iou_predictions"]


def tensorrt_available() -> tuple[bool, str]:
    """(True, "") when a TensorRT flavor and pycuda import and a CUDA device exists, else (False, reason):
    what *running* an engine needs (building with TensorRT-RTX needs neither pycuda nor a GPU)."""
    if not installed_flavors():
        return False, "neither TensorRT nor TensorRT-RTX is installed"
    try:
        gpu_name()
    except Exception as error:  # noqa: BLE001  (pycuda raises its own error types for a missing driver/GPU)
        return False, f"no CUDA device to run TensorRT engines ({type(error).__name__}: {error})"
    return True, ""
