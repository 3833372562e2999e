"""PyTorch backend: the export wrapper modules run eagerly (CPU), or on CUDA with FP16 autocast and a
CUDA graph for the image encoder (fixed input shape; the decoder's K varies, so it runs eagerly)."""
from __future__ import annotations

import numpy as np
import torch

from engine.export import ImageEncoderExport, PromptDecoderExport


class TorchBackend:
    def __init__(self, model, device: str | torch.device = "cpu", cuda_graphs: bool = True) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.name = "torch-cuda" if self.cuda else "torch"
        self.model = model.to(self.device).eval()
        self.encoder = ImageEncoderExport(self.model).eval()
        self.decoder = PromptDecoderExport(self.model).eval().to(self.device)
        self._graph = None
        self._use_graphs = cuda_graphs and self.cuda
        self._static_in: torch.Tensor | None = None
        self._static_out: tuple[torch.Tensor, ...] | None = None

    def _autocast(self):
        # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture.
        return (torch.autocast("cuda", dtype=torch.float16, cache_enabled=False) if self.cuda
                else torch.autocast("cpu", enabled=False))

    def _capture_encoder(self, image: torch.Tensor) -> None:
        """Record the encoder once into a CUDA graph; later frames copy into its static input and replay."""
        self._static_in = image.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._autocast():
            for _ in range(3):  # warm-up outside the graph, as torch.cuda.graphs requires
                self.encoder(self._static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph), self._autocast():
            self._static_out = self.encoder(self._static_in)

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The embedding and any high-res features (on the device), as the decoder takes them."""
        tensor = torch.from_numpy(image).to(self.device, non_blocking=True)
        if self._use_graphs:
            if self._graph is None:
                self._capture_encoder(tensor)
            self._static_in.copy_(tensor)
            self._graph.replay()
            return tuple(output.clone() for output in self._static_out)
        with self._autocast():
            return self.encoder(tensor)

    @torch.inference_mode()
    def decode(self, embedding, text_tokens, point_coords, point_labels, mask_input, has_mask_input):
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)  # noqa: E731
        with self._autocast():
            masks, scores, ious = self.decoder(*embedding, to(text_tokens), to(point_coords), to(point_labels),
                                               to(mask_input), to(has_mask_input))
        return (masks.float().cpu().numpy(), scores.float().cpu().numpy(), ious.float().cpu().numpy())
