"""TensorRT 10 backend: build FP16 engines from the exported ONNX and run them with pycuda buffers.

Kept thin on purpose: TensorRT and pycuda are imported only here and only when used (neither can be
installed on the CPU-only CI machines; their tests skip with that reason). pycuda rather than
cuda-python: it owns the context (``pycuda.autoinit``), allocations and streams with three calls and
frees them by reference counting; cuda-python would need the same in manual error-code checking.

FP16 with the known SAM-family overflow handled: every normalization (LayerNormalization -> TensorRT
normalization layer; the export turns SAM's LayerNorm2d into that op too), softmax and reduction layer
is pinned to FP32 with OBEY_PRECISION_CONSTRAINTS. Engines are cached under a key of GPU name +
TensorRT version + ONNX sha256 + precision, so a driver/TensorRT upgrade or a new export rebuilds.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from engine.export import DECODER_OUTPUTS, PROMPT_INPUTS, read_export_meta

MAX_PROMPTS = 16  # optimization profile K = 1..16; the Segmenter decodes more in chunks of 16
MAX_POINTS = 9  # P = 0..9 (up to 8 clicks + SAM's padding point)
WORKSPACE_BYTES = 4 << 30
ENGINES_FILE = "engines.json"


def gpu_name() -> str:
    import pycuda.autoinit  # noqa: F401  (creates the context on device 0)
    import pycuda.driver as cuda

    return cuda.Device(0).name()


def engine_key(onnx_sha256: str, fp16: bool, device_name: str | None = None, trt_version: str | None = None) -> str:
    """Cache key of one engine: GPU name + TensorRT version + ONNX sha256 + precision."""
    if trt_version is None:
        import tensorrt as trt

        trt_version = trt.__version__
    device_name = device_name if device_name is not None else gpu_name()
    text = "|".join([device_name, trt_version, onnx_sha256, "fp16" if fp16 else "fp32"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def engine_paths(onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike, fp16: bool = True) -> dict[str, Path]:
    """Where the encoder/decoder plans for this GPU, TensorRT version and export live (they may not exist)."""
    meta = read_export_meta(onnx_dir)
    return {stem: Path(engine_dir) / f"{stem}-{engine_key(meta['sha256'][f'{stem}.onnx'], fp16)}.plan"
            for stem in ("image_encoder", "prompt_decoder")}


def _pin_fp32(network) -> int:
    """Pin normalization, softmax and reduction layers (and their outputs) to FP32; returns how many."""
    import tensorrt as trt

    keep = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in keep:
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
            pinned += 1
    return pinned


def build_engine(onnx_path: Path, plan_path: Path, fp16: bool, embed: dict | None = None) -> dict:
    """Parse one ONNX graph, build a serialized engine, write it; returns a build report."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    pinned = 0
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32(network)
    if embed is not None:  # the decoder: K prompts and P points are dynamic (the encoder's outputs are not)
        profile = builder.create_optimization_profile()
        m, dim = embed["mask_hw"], embed["embed_dim"]
        shapes = {"text_tokens": lambda k, p: (k, dim),
                  "point_coords": lambda k, p: (k, p, 2), "point_labels": lambda k, p: (k, p),
                  "mask_input": lambda k, p: (k, 1, m, m), "has_mask_input": lambda k, p: (k, 1)}
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            if -1 in tuple(tensor.shape):  # only the dynamic inputs take a profile
                make = shapes[tensor.name]
                profile.set_shape(tensor.name, make(1, 0), make(4, 0), make(MAX_PROMPTS, MAX_POINTS))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT engine build failed for {onnx_path} (see the TensorRT log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)
    return {"onnx": str(onnx_path), "plan": str(plan_path), "fp16": fp16, "fp32_pinned_layers": pinned,
            "layers": network.num_layers, "tensorrt": trt.__version__}


def build_engines(onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike, fp16: bool = True,
                  force: bool = False) -> dict[str, Path]:
    """Build (or reuse from the cache) both engines for this GPU; returns their paths."""
    import tensorrt as trt

    meta = read_export_meta(onnx_dir)
    paths = engine_paths(onnx_dir, engine_dir, fp16)
    reports = []
    for stem, plan in paths.items():
        if plan.exists() and not force:
            continue
        reports.append(build_engine(Path(onnx_dir) / f"{stem}.onnx", plan, fp16, embed=meta if stem == "prompt_decoder"
                                    else None))
    index = Path(engine_dir) / ENGINES_FILE
    entries = json.loads(index.read_text()) if index.exists() else []
    entries += [{**r, "gpu": gpu_name(), "tensorrt": trt.__version__} for r in reports]
    index.write_text(json.dumps(entries, indent=1) + "\n")
    return paths


class TensorRTBackend:
    """Runs the two engines; the encoder's outputs stay in device buffers between encode and decode."""

    name = "tensorrt"

    def __init__(self, onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike, fp16: bool = True) -> None:
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda
        import tensorrt as trt

        self._cuda = cuda
        self.meta = read_export_meta(onnx_dir)
        paths = engine_paths(onnx_dir, engine_dir, fp16)
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise FileNotFoundError(f"no TensorRT engines for this GPU/TensorRT/export: {missing}; "
                                    "run `fluorosam build-engine`")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines = {stem: self._runtime.deserialize_cuda_engine(p.read_bytes()) for stem, p in paths.items()}
        self._contexts = {stem: e.create_execution_context() for stem, e in self._engines.items()}
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
    """(True, "") when TensorRT and pycuda import and a CUDA device exists, else (False, reason)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as error:
        return False, f"TensorRT is not installed ({error})"
    try:
        gpu_name()
    except Exception as error:  # noqa: BLE001  (pycuda raises its own error types for a missing driver/GPU)
        return False, f"no CUDA device for TensorRT ({type(error).__name__}: {error})"
    return True, ""
