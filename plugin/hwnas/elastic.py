"""The supernet's elastic layers: linear and embedding modules that run a prefix (or a chosen set) of their
channels, optionally as onnxruntime's dynamic int8 MatMul would compute them (`OrtInt8`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Selection = slice | torch.Tensor | None


@dataclass(frozen=True)
class OrtInt8:
    """onnxruntime's dynamic int8 MatMul (`quantize.quantize_onnx`), emulated in torch for the search's quality.

    Weights: per output channel, symmetric int8, the levels -64..64 with `reduce_range` (what
    `ort_int8_settings` chooses on CPUs without VNNI), else -127..127. Activations: per tensor,
    asymmetric uint8, the range taken from the current input and always including 0
    (DynamicQuantizeLinear); one range per sequence, as the deployed model runs batch 1. Both round
    half to even, as onnxruntime does. With `int8_embedding`, each embedding row read is stored as
    symmetric int8 with its own scale (-127..127, `onnx_graph.quantize_embeddings`).
    """

    reduce_range: bool = True
    int8_embedding: bool = False

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> "OrtInt8":
        """The emulation of `quantize.ort_int8_settings(isa)` (or a latency table's `quantization` header)."""
        return cls(reduce_range=bool(settings["reduce_range"]),
                   int8_embedding=bool(settings.get("quantize_embedding", False)))

    @staticmethod
    def rows(x: torch.Tensor) -> torch.Tensor:
        """Embedding rows (the last dimension) as int8 with one scale per row stores them."""
        scale = _nonzero(x.abs().amax(dim=-1, keepdim=True) / 127)
        return torch.round(x / scale).clamp(-127, 127) * scale

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        qmax = 64 if self.reduce_range else 127
        scale = _nonzero(w.abs().amax(dim=1, keepdim=True) / qmax)
        return torch.round(w / scale).clamp(-qmax, qmax) * scale

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim())) or (0,)
        lo, hi = x.amin(dim=dims, keepdim=True).clamp(max=0), x.amax(dim=dims, keepdim=True).clamp(min=0)
        scale = _nonzero((hi - lo) / 255)
        zero = torch.round(-lo / scale).clamp(0, 255)
        return ((torch.round(x / scale) + zero).clamp(0, 255) - zero) * scale

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(self.activation(x), self.weight(w), b)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


class ElasticLinear(nn.Linear):
    """An `nn.Linear` that shares another's parameters and uses a slice of them (a view when it can).

    With `quant` set, it computes as that quantized deployment would (`OrtInt8`).
    """

    def __init__(self, base: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.out_sel: Selection = None
        self.in_sel: Selection = None
        self.quant: OrtInt8 | None = None

    def active_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.weight, self.bias
        if self.out_sel is not None:
            w = w[self.out_sel]
            b = b[self.out_sel] if b is not None else None
        if self.in_sel is not None:
            w = w[:, self.in_sel]
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.linear(x, *self.active_weight())
        return F.linear(x, *self.active_weight())


class ElasticEmbedding(nn.Embedding):
    """An `nn.Embedding` that shares another's (possibly tied) table; with `quant` set, the rows it
    returns are those an int8 embedding stores (`OrtInt8.rows`)."""

    def __init__(self, base: nn.Embedding) -> None:
        nn.Module.__init__(self)
        for k in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                  "sparse"):
            setattr(self, k, getattr(base, k))
        self.weight = base.weight
        self.quant: OrtInt8 | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids)
        return out if self.quant is None else self.quant.rows(out)
