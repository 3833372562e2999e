"""FP16 graphs that TensorRT 10/11 and TensorRT-RTX both take (both build them as strongly typed networks:
the graph's own types decide the precision, no builder flag).

Compute is FP16; normalization, softmax and reductions stay FP32 (the SAM family's known FP16 overflow:
attention logits and LayerNorm variances exceed 65504), and Resize keeps FP32 scales. Inputs and outputs
stay FP32, so every backend and the shared pre/post-processing are unchanged. ONNX Runtime's transformer
converter is used rather than onnxconverter-common's: the latter leaves the graph's own ``Cast(to=FLOAT)``
nodes as they are, which gives Half/Float mixes TensorRT refuses (``/Sub_1: ... Half and Float``).

Before the conversion the graph is folded with onnxslim (constant folding, shape simplification, dead and
duplicate nodes): measured on the default model (2026-12-06), the encoder's ONNX nodes fall from 2,302 to
580 and its TensorRT layers from 4,314 to 2,050 (most of them the Swin windows' INT64 shape arithmetic), the
decoder's from 1,067 to 531 nodes and 1,643 to 1,087 layers; ONNX Runtime's outputs are bit-identical, plan
sizes and build times unchanged (~12 s for both plans). What the fewer layers buy at run time needs a GPU
to measure.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2",
            "ReduceProd", "ReduceSumSquare", "ReduceLogSumExp", "Resize", "Upsample", "TopK", "Range", "CumSum",
            "ArgMax", "ArgMin", "NonMaxSuppression", "RandomUniformLike")


def convert_graph(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Write the FP16 version of the ONNX graph ``src`` to ``dst``; returns what was converted."""
    import logging

    import onnx
    import onnxslim
    from onnxruntime.transformers.onnx_model import OnnxModel

    started = time.perf_counter()
    model = onnx.load(str(src))
    nodes_before = len(model.graph.node)
    logging.getLogger("onnxslim").setLevel(logging.ERROR)  # its shape inference warns of every symbolic Pad
    model = onnxslim.slim(model)
    for index, node in enumerate(model.graph.node):  # unnamed nodes would give the inserted Casts equal names
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    wrapped = OnnxModel(model)
    wrapped.convert_float_to_float16(keep_io_types=True, op_block_list=list(FP32_OPS))
    wrapped.topological_sort()
    onnx.save(wrapped.model, str(dst))
    initializers = wrapped.model.graph.initializer
    fp16 = sum(1 for t in initializers if t.data_type == onnx.TensorProto.FLOAT16)
    return {"nodes_exported": nodes_before, "nodes": len(wrapped.model.graph.node), "fp16_initializers": fp16,
            "fp32_initializers": sum(1 for t in initializers if t.data_type == onnx.TensorProto.FLOAT),
            "fp32_ops": list(FP32_OPS), "seconds": round(time.perf_counter() - started, 1)}


def convert_export(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """An FP16 copy of an FP32 export folder (graphs converted, export.json updated with hashes and
    ``precision: fp16``, the text side copied as it is); returns ``out_dir``."""
    import json
    import shutil

    from engine.export_format import (
        DECODER_FILE,
        ENCODER_FILE,
        EXPORT_META_FILE,
        TEXT_ENCODER_FILE,
        TEXT_TABLE_FILE,
        TOKENIZER_FILE,
        read_export_meta,
    )
    from fluorosam_common.hashing import file_sha256

    meta = read_export_meta(onnx_dir)
    if meta.get("precision", "fp32") != "fp32":
        raise ValueError(f"{onnx_dir} is already a {meta['precision']} export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conversions = {name: convert_graph(Path(onnx_dir) / name, out / name) for name in (ENCODER_FILE, DECODER_FILE)}
    for name in (TEXT_TABLE_FILE, TEXT_ENCODER_FILE, TOKENIZER_FILE):  # the text side runs FP32 on the CPU
        if (Path(onnx_dir) / name).exists():
            shutil.copyfile(Path(onnx_dir) / name, out / name)
    meta = {**meta, "precision": "fp16", "fp16_from": {name: meta["sha256"][name] for name in conversions},
            "fp16_conversion": conversions,
            "sha256": {**meta["sha256"], **{name: file_sha256(out / name) for name in conversions}}}
    (out / EXPORT_META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def fp16_export_for(onnx_dir: str | os.PathLike, engine_dir: str | os.PathLike) -> Path:
    """The FP16 export that FP16 plans of ``onnx_dir`` are built from: the folder itself when it is FP16,
    else its conversion in ``engine_dir/onnx-fp16`` (made, or made again when the FP32 export changed)."""
    import json

    from engine.export_format import EXPORT_META_FILE, read_export_meta

    meta = read_export_meta(onnx_dir)
    if meta.get("precision", "fp32") == "fp16":
        return Path(onnx_dir)
    converted = Path(engine_dir) / "onnx-fp16"
    meta_path = converted / EXPORT_META_FILE
    if meta_path.exists():
        fp16_from = json.loads(meta_path.read_text()).get("fp16_from", {})
        if all(meta["sha256"][name] == digest for name, digest in fp16_from.items()) and fp16_from:
            return converted
    return convert_export(onnx_dir, converted)
