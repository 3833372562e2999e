"""ONNX export: ``fluorosam export --model DIR --out DIR`` (the folder's format: engine/export_format.py).

Two image-side graphs, as segment-anything's ONNX export does it: export-only wrapper modules with no
data-dependent control flow and fixed shapes except the prompt count K (and the point count P):

* ``image_encoder.onnx``: image (1, 1, S, S) normalized -> image_embedding (1, 256, h, w) and, for
  models with high-resolution features, high_res_2x (1, 64, 2h, 2w) and high_res_4x (1, 32, 4h, 4w), and for
  models with the fine path, fine_stride2 (1, 16, S/2, S/2) and fine_input (1, 8, S, S)
* ``prompt_decoder.onnx``: the encoder's outputs, text_tokens (K, 256), point_coords (K, P, 2)
  model-input pixels, point_labels (K, P) float (1 positive, 0 negative, -1 padding), mask_input
  (K, 1, m, m) logits, has_mask_input (K, 1) -> masks (K, m, m) chosen-mask logits (m = 4w, or S with the
  fine path), scores (K,) its
  predicted IoU, iou_predictions (K, 3) of the multimask output. The mask is chosen inside the graph by
  ``training.model.fluorosam.choose_output``: the single-mask token for prompts with at least the model's
  ``single_mask_min_points`` clicks (or with none, for a model with ``single_mask_text_only``), else the
  best of the 3 masks.

SAM appends one padding point whenever points are given; the graph does not (that would be control
flow), so callers pass P = 0 for text-only prompts and append the padding point themselves
(``engine.export_format.pack_points``). The text side is exported too, so that a runtime needs no torch:
``text_encoder.onnx`` (input_ids, attention_mask (N, L) int64 -> text_tokens (N, 256), code, code_distance,
vocab_similarity, oov: the sentence encoder, projection, VQ and OOV rule in one graph) with the sentence
encoder's ``text_tokenizer.json``, and ``text_tokens.safetensors`` (every training phrase of the vocabulary
-> code, distances, OOV flag, plus the codebook: no text graph run for them). ``export.json`` holds sizes,
opset, the node's ``min_score``, sha256 of every file and of the checkpoint it came from.

The same wrapper modules are the ``torch`` backend's graph, so every backend runs one definition.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.export_format import (
    DECODER_FILE,
    DECODER_OUTPUTS,
    ENCODER_FILE,
    ENCODER_INPUTS,
    EXPORT_FORMAT_VERSION,
    EXPORT_META_FILE,
    OPSET,
    TEXT_ENCODER_FILE,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    TEXT_TABLE_FILE,
    TOKENIZER_FILE,
    decoder_input_names,
    embedding_shapes,
    read_export_meta,
)
from fluorosam_common.hashing import file_sha256


class ChannelLayerNorm(nn.Module):
    """SAM's LayerNorm2d as one ``F.layer_norm`` over channels, so it exports as a single ONNX
    LayerNormalization (TensorRT's normalization layer, kept in FP32) instead of a chain of
    ReduceMean/Pow/Sqrt that FP16 overflows in. Shares the original's parameters."""

    def __init__(self, norm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps
        self.channels = int(norm.weight.shape[0])  # a Python int: the traced graph keeps it constant

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def with_channel_layernorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose LayerNorm2d children are :class:`ChannelLayerNorm` (same numbers)."""
    from segment_anything.modeling.common import LayerNorm2d

    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LayerNorm2d):
                setattr(parent, name, ChannelLayerNorm(child))
    return module


class ImageEncoderExport(nn.Module):
    """(1, 1, S, S) normalized image -> the tensors of :func:`embedding_shapes`, in order."""

    def __init__(self, model) -> None:
        super().__init__()
        self.image_encoder = with_channel_layernorm(model.image_encoder)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return self.image_encoder(image)


class PromptDecoderExport(nn.Module):
    """K prompts on one shared embedding -> best-mask logits, its score and all three scores.

    Point embedding and the dense mask prompt are written with arithmetic masks instead of SAM's
    boolean indexing, so the graph has no data-dependent shapes (as segment-anything's onnx export).
    """

    def __init__(self, model) -> None:
        super().__init__()
        config = model.config
        self.prompt_encoder = with_channel_layernorm(model.prompt_encoder)
        self.mask_decoder = with_channel_layernorm(model.mask_decoder)
        self.input_size = float(config.image_size)
        self.num_embeddings = len(embedding_shapes(config))
        from training.model.fluorosam import choose_output, prompt_mask  # the rules evaluation uses too

        self._choose_output = choose_output
        self._prompt_mask = prompt_mask
        self.config = config
        self.single_mask_min_points = config.single_mask_min_points
        self.single_mask_text_only = config.single_mask_text_only
        # The dense positional encoding depends only on the grid size: a constant of the graph.
        with torch.no_grad():
            self.register_buffer("image_pe", model.prompt_encoder.get_dense_pe().detach().clone(), persistent=False)

    def _embed_points(self, point_coords: Tensor, point_labels: Tensor) -> Tensor:
        pe = self.prompt_encoder.pe_layer
        coords = (point_coords + 0.5) / self.input_size
        embedding = pe._pe_encoding(coords)  # (K, P, 256)
        labels = point_labels.unsqueeze(-1)
        is_pad = (labels == -1).to(embedding.dtype)
        embedding = embedding * (1 - is_pad) + self.prompt_encoder.not_a_point_embed.weight * is_pad
        for value in (0, 1):
            embedding = embedding + self.prompt_encoder.point_embeddings[value].weight * (labels == value).to(
                embedding.dtype)
        return embedding

    def forward(self, *inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs in the order of :func:`decoder_input_names`: the encoder's outputs, then the prompts."""
        image_embedding, *high_res = inputs[:self.num_embeddings]
        text_tokens, point_coords, point_labels, mask_input, has_mask_input = inputs[self.num_embeddings:]
        sparse = torch.cat([text_tokens[:, None, :], self._embed_points(point_coords, point_labels)], dim=1)
        has_mask = has_mask_input[:, :, None, None]
        dense = (self.prompt_encoder.mask_downscaling(self._prompt_mask(mask_input, self.config)) * has_mask
                 + self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1) * (1 - has_mask))
        masks, iou_predictions = self.mask_decoder.predict_masks(
            image_embeddings=image_embedding, image_pe=self.image_pe,
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, high_res_features=tuple(high_res))
        chosen, scores, _ = self._choose_output(masks, iou_predictions, point_labels, self.single_mask_min_points,
                                                self.single_mask_text_only)
        return chosen, scores, iou_predictions[:, 1:]  # the multimask output's predicted IoUs


class TextEncoderExport(nn.Module):
    """Token ids of N normalized prompts -> the quantized prompt tokens and OOV scores of
    :meth:`FluoroSAM.encode_text_embeddings`, from MiniLM with sentence-transformers' mean pooling."""

    def __init__(self, model, transformer: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.transformer = transformer

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
        encoding = self.model.encode_text_embeddings(F.normalize(pooled, dim=-1))
        return (encoding.tokens, encoding.code, encoding.code_distance, encoding.vocab_similarity, encoding.oov)


def export_text_encoder(model, out: Path) -> dict | None:
    """Write the text graph and its tokenizer to ``out``; returns their record for export.json (None
    for a CLIP text encoder, whose runtime then needs torch for prompts outside the token table)."""
    import shutil

    from engine.text_encoder import load_tokenizer, tokenize

    encoder = model.sentence_encoder
    if encoder.transformer is None:
        return None
    tokenizer = load_tokenizer(encoder.tokenizer_file, encoder.max_length, encoder.pad_id)
    ids, mask = (torch.from_numpy(a) for a in tokenize(tokenizer, ["left lung", "tip of the guidewire"]))
    _export_graph(TextEncoderExport(model, encoder.transformer), (ids, mask), out / TEXT_ENCODER_FILE,
                  TEXT_INPUTS, TEXT_OUTPUTS, {**{name: {0: "prompts", 1: "length"} for name in TEXT_INPUTS},
                                              **{name: {0: "prompts"} for name in TEXT_OUTPUTS}})
    shutil.copyfile(encoder.tokenizer_file, out / TOKENIZER_FILE)
    return {"graph": TEXT_ENCODER_FILE, "tokenizer": TOKENIZER_FILE, "max_length": encoder.max_length,
            "pad_id": encoder.pad_id, "kind": model.config.text_encoder}


def example_decoder_inputs(config, k: int = 2, points: int = 2) -> tuple[Tensor, ...]:
    """Inputs the decoder graph is traced with (K and P are dynamic axes)."""
    m = config.mask_hw
    generator = torch.Generator().manual_seed(0)
    embeddings = tuple(torch.randn(*shape, generator=generator) for shape in embedding_shapes(config).values())
    return (*embeddings,
            torch.randn(k, config.embed_dim, generator=generator),
            torch.rand(k, points, 2, generator=generator) * config.image_size,
            torch.tensor([[1.0] * (points - 1) + [-1.0]] * k),
            torch.randn(k, 1, m, m, generator=generator),
            torch.ones(k, 1))


def _export_graph(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                  dynamic_axes: dict | None) -> None:
    # The wrapper must be in eval mode itself: the exporter restores the wrapper's mode afterwards,
    # which would otherwise switch the shared model into training mode (drop-path on).
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived Python ints are expected here
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def build_text_table(model, vocabulary=None, phrases: list[str] | None = None, batch: int = 512) -> dict:
    """Every training phrase of the vocabulary (or the given phrases), normalized -> token and OOV scores."""
    from tqdm import tqdm

    from fluorosam_common.prompts import normalize_prompt
    from fluorosam_common.vocabulary import Vocabulary

    vocabulary = vocabulary or Vocabulary.load()
    if phrases is None:
        phrases = [p for name in vocabulary.names for p in vocabulary.training_phrases(name)]
    phrases = list(dict.fromkeys(normalize_prompt(p) for p in phrases))
    parts = []
    with torch.no_grad():
        for start in tqdm(range(0, len(phrases), batch), desc="text table", unit="batch"):
            parts.append(model.encode_text(phrases[start:start + batch]))
    encoding = type(parts[0])(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                ("tokens", "code", "code_distance", "vocab_similarity", "oov")))
    return {"phrases": phrases, "vocabulary_sha256": vocabulary.sha256,
            # A quantized token IS its codebook row: store the codebook once and a code per phrase.
            "tensors": {"codebook": model.quantizer.codebook.detach().float().cpu().contiguous(),
                        "code": encoding.code.cpu().contiguous(),
                        "code_distance": encoding.code_distance.float().cpu().contiguous(),
                        "vocab_similarity": encoding.vocab_similarity.float().cpu().contiguous(),
                        "oov": encoding.oov.to(torch.uint8).cpu().contiguous()}}


def save_text_table(table: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(table["tensors"], str(path), metadata={"phrases": json.dumps(table["phrases"]),
                                                      "vocabulary_sha256": table["vocabulary_sha256"]})


def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, with_text_table: bool = True,
                 text_phrases: list[str] | None = None) -> Path:
    """Export the checkpoint in ``model_dir`` to ``out_dir``; returns ``out_dir``.

    The text table holds every training phrase of the vocabulary unless ``text_phrases`` narrows it.
    """
    from training.model import load_checkpoint
    from training.model.checkpoint import WEIGHTS_FILE

    model, checkpoint_meta = load_checkpoint(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    started = time.perf_counter()
    size = config.image_size
    embeddings = embedding_shapes(config)
    _export_graph(ImageEncoderExport(model), (torch.zeros(1, 1, size, size),), out / ENCODER_FILE,
                  ENCODER_INPUTS, list(embeddings), None)
    prompts, points = {0: "prompts"}, {0: "prompts", 1: "points"}
    _export_graph(PromptDecoderExport(model), example_decoder_inputs(config), out / DECODER_FILE,
                  decoder_input_names(config), DECODER_OUTPUTS,
                  {"text_tokens": prompts, "point_coords": points, "point_labels": points, "mask_input": prompts,
                   "has_mask_input": prompts, "masks": prompts, "scores": prompts, "iou_predictions": prompts})
    files = [ENCODER_FILE, DECODER_FILE]
    text_encoder = export_text_encoder(model, out)
    if text_encoder is not None:
        files += [TEXT_ENCODER_FILE, TOKENIZER_FILE]
    vocabulary_sha = None
    if with_text_table:
        table = build_text_table(model, phrases=text_phrases)
        save_text_table(table, out / TEXT_TABLE_FILE)
        files.append(TEXT_TABLE_FILE)
        vocabulary_sha = table["vocabulary_sha256"]
    meta = {"format_version": EXPORT_FORMAT_VERSION, "opset": OPSET, "torch": torch.__version__,
            "config": config.to_dict(), "image_size": size, "embed_dim": config.embed_dim,
            "embed_hw": config.embed_hw, "mask_hw": config.mask_hw,
            "embeddings": {name: list(shape) for name, shape in embeddings.items()},
            "encoder": {"inputs": ENCODER_INPUTS, "outputs": list(embeddings)},
            "decoder": {"inputs": decoder_input_names(config), "outputs": DECODER_OUTPUTS,
                        "dynamic": ["prompts", "points"]},
            "text_encoder": text_encoder, "min_score": float(checkpoint_meta.get("min_score") or 0.0),
            "checkpoint_sha256": file_sha256(Path(model_dir) / WEIGHTS_FILE),
            "vocabulary_sha256": vocabulary_sha,
            "sha256": {name: file_sha256(out / name) for name in files},
            "export_seconds": round(time.perf_counter() - started, 2)}
    (out / EXPORT_META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled default model)")
    parser.add_argument("--out", required=True, help="output folder for the ONNX graphs and text table")
    parser.add_argument("--no-text-table", action="store_true",
                        help="skip the vocabulary token table (the runtime then runs the text graph for every prompt)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="fp16: FP16 compute with normalization/softmax/reductions and I/O in FP32 "
                             "(engine/fp16.py), the graphs both TensorRTs build")


def main(args: argparse.Namespace) -> int:
    from fluorosam_common.paths import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    if args.precision == "fp16":
        import tempfile

        from engine.fp16 import convert_export

        with tempfile.TemporaryDirectory() as fp32_dir:
            export_model(model_dir, fp32_dir, with_text_table=not args.no_text_table)
            out = convert_export(fp32_dir, args.out)
    else:
        out = export_model(model_dir, args.out, with_text_table=not args.no_text_table)
    meta = read_export_meta(out)
    for name, digest in meta["sha256"].items():
        print(f"{out / name}  {os.path.getsize(out / name) / 1e6:.1f} MB  sha256 {digest[:16]}")
    print(f"{meta.get('precision', 'fp32')}, opset {meta['opset']}, input {meta['image_size']} px, "
          f"embedding {meta['embed_hw']}x{meta['embed_hw']}, masks {meta['mask_hw']}x{meta['mask_hw']}, "
          f"{meta['export_seconds']} s")
    return 0
