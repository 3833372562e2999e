"""The FluoroSAM network: Swin image encoder, frozen text encoder + MLP + VQ, SAM prompt encoder/decoder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segment_anything.modeling.prompt_encoder import PromptEncoder
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import Tensor, nn

from .config import FINE_CHANNELS, FluoroSAMConfig
from .decoder import BatchedMaskDecoder
from .image_encoder import SwinImageEncoder
from .text import SentenceEncoder, TextEncoding, VectorQuantizer, get_sentence_encoder


class FluoroSAM(nn.Module):
    """Language- and point-promptable X-ray segmenter (see docs/interfaces.md for the contract)."""

    def __init__(self, config: FluoroSAMConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.image_encoder = SwinImageEncoder(config)
        self.text_projection = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.quantizer = VectorQuantizer(config.codebook_size, dim, commitment=config.vq_commitment)
        self.prompt_encoder = PromptEncoder(
            embed_dim=dim, image_embedding_size=(config.embed_hw, config.embed_hw),
            input_image_size=(config.image_size, config.image_size), mask_in_chans=config.mask_in_chans)
        self.mask_decoder = BatchedMaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=config.decoder_depth, embedding_dim=dim,
                                          num_heads=config.decoder_heads, mlp_dim=config.decoder_mlp_dim),
            num_multimask_outputs=config.num_multimask_outputs, iou_head_depth=3,
            iou_head_hidden_dim=config.iou_head_hidden_dim, mask_aware_iou=config.mask_aware_iou_head,
            fine_channels=FINE_CHANNELS if config.fine_features else None)
        # Sentence embeddings of every training phrase (float16), for the vocabulary-similarity OOV score.
        self.register_buffer("phrase_table", torch.zeros(0, config.text_dim, dtype=torch.float16))
        # Calibrated OOV thresholds (from model.json); the defaults refuse nothing.
        self.oov_code_distance_max = math.inf
        self.oov_vocab_similarity_min = -math.inf

    # ----------------------------------------------------------------------------------------- image
    def encode_image(self, images: Tensor) -> tuple[Tensor, ...]:
        """(B, 1, S, S) normalized images -> (embeddings (B, 256, h, w), *high-res features).

        The high-res features ((B, 64, 2h, 2w), (B, 32, 4h, 4w)) exist only with
        ``config.high_res_features``, the fine ones ((B, 16, S/2, S/2), (B, 8, S, S)) only with
        ``config.fine_features``; the tuple is what :meth:`decode` takes.
        """
        return self.image_encoder(images)

    # ------------------------------------------------------------------------------------------ text
    @property
    def sentence_encoder(self) -> SentenceEncoder:
        """The frozen encoder, loaded on first use and shared per process (never part of the state dict)."""
        return get_sentence_encoder(self.config.text_encoder, self.config.clip_path)

    def sentence_embeddings(self, prompts: list[str]) -> Tensor:
        """Normalized prompt strings -> (N, text_dim) L2-normalized sentence embeddings on the model's device."""
        from fluorosam_common.prompts import normalize_prompt

        return self.sentence_encoder([normalize_prompt(p) for p in prompts]).to(self.phrase_table.device)

    def project_text(self, sentence_embeddings: Tensor) -> Tensor:
        """Sentence embeddings -> pre-quantization prompt vectors (N, 256) on a sphere of radius sqrt(256).

        The fixed norm matches the scale of SAM's point and output tokens (~16); without it a freshly
        initialised projection gives tokens ~100x smaller, which the decoder learns to ignore.
        """
        z = self.text_projection(sentence_embeddings.float())
        return F.normalize(z, dim=-1) * math.sqrt(self.config.embed_dim)

    def vocab_similarity(self, sentence_embeddings: Tensor) -> Tensor:
        """Max cosine of each embedding to the training phrases; 1.0 when no phrase table is stored."""
        if self.phrase_table.shape[0] == 0:
            return sentence_embeddings.new_ones(sentence_embeddings.shape[0])
        return (sentence_embeddings.float() @ self.phrase_table.float().t()).max(dim=1).values

    def set_phrase_table(self, sentence_embeddings: Tensor) -> None:
        """Store the training phrases' embeddings (kept in the checkpoint as float16)."""
        self.phrase_table = sentence_embeddings.detach().to(self.phrase_table.device, torch.float16).contiguous()

    def set_oov_thresholds(self, code_distance_max: float, vocab_similarity_min: float) -> None:
        self.oov_code_distance_max = float(code_distance_max)
        self.oov_vocab_similarity_min = float(vocab_similarity_min)

    def encode_text_embeddings(self, sentence_embeddings: Tensor) -> TextEncoding:
        """Like :meth:`encode_text` but from precomputed sentence embeddings (N, text_dim)."""
        tokens, code, distance, _ = self.quantizer(self.project_text(sentence_embeddings))
        similarity = self.vocab_similarity(sentence_embeddings)
        oov = (distance > self.oov_code_distance_max) | (similarity < self.oov_vocab_similarity_min)
        return TextEncoding(tokens=tokens, code=code, code_distance=distance.float(),
                            vocab_similarity=similarity.float(), oov=oov)

    def encode_text(self, prompts: list[str]) -> TextEncoding:
        """Prompt strings -> quantized tokens (N, 256), code, code_distance, vocab_similarity, oov flags."""
        if isinstance(prompts, str):
            raise TypeError("encode_text takes a list of prompt strings, not a single string")
        return self.encode_text_embeddings(self.sentence_embeddings(list(prompts)))

    # --------------------------------------------------------------------------------------- decoder
    def decode(self, image_embeddings: tuple[Tensor, ...], text_tokens: Tensor, point_coords: Tensor | None = None,
               point_labels: Tensor | None = None, mask_input: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decode N prompts -> SAM's multimask output: mask logits (N, 3, m, m) and predicted IoU (N, 3).

        Arguments as :meth:`decode_all_tokens`, which also returns the single-mask token's output.
        """
        masks, iou_pred = self.decode_all_tokens(image_embeddings, text_tokens, point_coords, point_labels, mask_input)
        return masks[:, 1:], iou_pred[:, 1:]

    def decode_all_tokens(self, image_embeddings: tuple[Tensor, ...], text_tokens: Tensor,
                          point_coords: Tensor | None = None, point_labels: Tensor | None = None,
                          mask_input: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Decode N prompts -> mask logits (N, 4, m, m) (m = ``config.mask_hw``: 4x the embedding, or the input
        with the fine path) and predicted IoU (N, 4) of all of SAM's output tokens: index 0 the single-mask
        token, 1..3 the three ambiguity-aware masks.

        ``image_embeddings`` is what :meth:`encode_image` returns, each tensor with batch N (one image
        per prompt) or 1 (shared by all prompts); ``point_coords``
        (N, P, 2) in model-input pixels with ``point_labels`` (N, P) 1 positive / 0 negative / -1 padding;
        ``mask_input`` (N, 1, m, m) previous mask logits (what this method returned) used as the dense prompt.
        """
        n = text_tokens.shape[0]
        expected = self.config.encoder_output_shapes
        got = [tuple(t.shape) for t in image_embeddings] if isinstance(image_embeddings, (tuple, list)) else None
        if got is None or len(got) != len(expected) or any(
                len(g) != 4 or g[0] not in (1, n) or g[1:] != (c, s, s) for g, (c, s) in zip(got, expected)):
            raise ValueError(f"image_embeddings must be encode_image's tuple of (N or 1, C, s, s) tensors with "
                             f"(C, s) = {expected}, got {got if got is not None else type(image_embeddings)}")
        embedding, *high_res = image_embeddings
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_coords is not None and (point_coords.shape[0] != n or point_labels.shape != point_coords.shape[:2]):
            raise ValueError(f"points {tuple(point_coords.shape)} / labels {tuple(point_labels.shape)} "
                             f"do not match {n} prompts")
        m = self.config.mask_hw
        if mask_input is not None and mask_input.shape != (n, 1, m, m):
            raise ValueError(f"mask_input must be ({n}, 1, {m}, {m}), got {tuple(mask_input.shape)}")
        points = None if point_coords is None else (point_coords.float(), point_labels)
        point_tokens, dense = self.prompt_encoder(points=points, boxes=None,
                                                  masks=None if mask_input is None else self.prompt_mask(mask_input))
        sparse = text_tokens[:, None, :]
        if points is not None:
            sparse = torch.cat([sparse, point_tokens], dim=1)
        masks, iou_pred = self.mask_decoder.predict_masks(
            image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, high_res_features=tuple(high_res))
        return masks, iou_pred

    def prompt_mask(self, mask_logits: Tensor) -> Tensor:
        """(N, 1, m, m) returned logits -> the dense prompt's input (see :func:`prompt_mask`)."""
        return prompt_mask(mask_logits, self.config)

    def choose_output(self, mask_logits: Tensor, iou_pred: Tensor,
                      point_labels: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The mask each prompt answers with, from :meth:`decode_all_tokens`' output (see :func:`choose_output`)."""
        return choose_output(mask_logits, iou_pred, point_labels, self.config.single_mask_min_points,
                             self.config.single_mask_text_only)

    @staticmethod
    def best_mask(mask_logits: Tensor, iou_pred: Tensor) -> tuple[Tensor, Tensor]:
        """Pick, per prompt, the mask with the highest predicted IoU (as the paper's inference code)."""
        best = iou_pred.argmax(dim=1)
        rows = torch.arange(mask_logits.shape[0], device=mask_logits.device)
        return mask_logits[rows, best], iou_pred[rows, best]

    def upsample_to_input(self, mask_logits: Tensor) -> Tensor:
        """(N, K, m, m) logits -> (N, K, S, S) over the square model input (already there with the fine path)."""
        size = self.config.image_size
        if mask_logits.shape[-1] == size:
            return mask_logits
        return F.interpolate(mask_logits, size=(size, size), mode="bilinear", align_corners=False)


def prompt_mask(mask_logits: Tensor, config: FluoroSAMConfig) -> Tensor:
    """(N, 1, m, m) logits as the decoder returns them -> (N, 1, 4h, 4w), the side SAM's mask prompt reads (area
    mean; identity without the fine path). One definition for training, evaluation and the exported decoder."""
    factor = config.mask_hw // config.prompt_mask_hw
    return mask_logits if factor == 1 else F.avg_pool2d(mask_logits, factor)


def choose_output(mask_logits: Tensor, iou_pred: Tensor, point_labels: Tensor | None,
                  single_mask_min_points: int, single_mask_text_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """SAM's output rule, shared by evaluation and the exported decoder (so every backend answers alike).

    ``mask_logits`` (N, 4, H, W) and ``iou_pred`` (N, 4) of all output tokens; ``point_labels`` (N, P) with
    -1 for padding (None: no clicks). A prompt with at least ``single_mask_min_points`` clicks (0: never), or
    with no click at all when ``single_mask_text_only``, takes the single-mask token; any other takes the
    multimask output with the highest predicted IoU. Returns the chosen logits (N, H, W), its predicted IoU
    (N,) and the chosen token's index (N,) (0: the single-mask token answered), with which a caller takes the
    same choice from other per-token tensors (e.g. upsampled masks).
    """
    best = iou_pred[:, 1:].argmax(dim=1, keepdim=True) + 1  # (N, 1)
    clicks = torch.zeros_like(best) if point_labels is None else (point_labels >= 0).sum(dim=1, keepdim=True)
    single = answers_with_single_mask(clicks, single_mask_min_points, single_mask_text_only)
    index = torch.where(single, torch.zeros_like(best), best)
    h, w = mask_logits.shape[-2:]
    chosen = torch.gather(mask_logits, 1, index[:, :, None, None].expand(-1, 1, h, w))[:, 0]
    return chosen, torch.gather(iou_pred, 1, index)[:, 0], index[:, 0]


def answers_with_single_mask(clicks: Tensor | int, single_mask_min_points: int,
                             single_mask_text_only: bool) -> Tensor | bool:
    """Whether a prompt with ``clicks`` clicks (an int, or a tensor of counts) is answered by the single-mask
    token: at least ``single_mask_min_points`` of them (0: never), or none when ``single_mask_text_only``. The
    one statement of the rule, for :func:`choose_output` and training's rounds."""
    single = clicks < 0  # False, of the same kind as ``clicks``
    if single_mask_min_points:
        single = single | (clicks >= single_mask_min_points)
    if single_mask_text_only:
        single = single | (clicks == 0)
    return single
