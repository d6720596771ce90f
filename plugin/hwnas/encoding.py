"""Sub-networks as integer gene vectors, the form pymoo searches over (one encoder per search space)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from .common import HwnasError
from .space import SearchSpace, SubnetConfig


@dataclasses.dataclass(frozen=True)
class GeneEncoder:
    """Sub-network <-> integer genes: per layer a keep bit, an MLP-width index and a head-option index,
    and with `mixed_precision` a fourth gene, 1 keeping the layer's down_proj fp32 (`SubnetConfig.fp32_down`).

    Genes of dropped layers are ignored when decoding. A gene vector keeping fewer layers than the
    space's minimum is repaired by keeping the lowest-index dropped layers.
    """

    space: SearchSpace
    mixed_precision: bool = False

    @property
    def genes_per_layer(self) -> int:
        return 4 if self.mixed_precision else 3

    @property
    def head_options(self) -> tuple[tuple[int, int], ...]:
        """(query heads, KV heads) pairs a layer may take, smallest first."""
        s = self.space
        return tuple(sorted({(kv * q, kv) for kv in s.kv_head_choices for q in s.q_per_kv_choices}))

    @property
    def n_var(self) -> int:
        return self.genes_per_layer * self.space.num_layers

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        L = self.space.num_layers
        upper = [1] * L + [len(self.space.mlp_choices) - 1] * L + [len(self.head_options) - 1] * L
        upper += [1] * L if self.mixed_precision else []
        return np.zeros(self.n_var, dtype=int), np.array(upper, dtype=int)

    def encode(self, cfg: SubnetConfig) -> np.ndarray:
        self.space.validate(cfg)
        if cfg.fp32_down and not self.mixed_precision:
            raise HwnasError("the sub-network keeps some down_proj fp32, but this search has no mixed precision "
                             "(its latency table offers none)")
        L, opts = self.space.num_layers, self.head_options
        keep, down = np.zeros(L, dtype=int), np.zeros(L, dtype=int)
        mlp = np.full(L, len(self.space.mlp_choices) - 1)
        head = np.full(L, len(opts) - 1)
        for layer, w, h, kv, fp32 in zip(cfg.layers, cfg.mlp, cfg.heads, cfg.kv_heads, cfg.fp32_down_mask):
            keep[layer], down[layer] = 1, fp32
            mlp[layer] = self.space.mlp_choices.index(w)
            head[layer] = opts.index((h, kv))
        return np.concatenate([keep, mlp, head] + ([down] if self.mixed_precision else []))

    def decode(self, x: Sequence[float]) -> SubnetConfig:
        L, opts = self.space.num_layers, self.head_options
        x = np.asarray(np.round(x), dtype=int)
        if x.shape != (self.n_var,):
            raise HwnasError(f"gene vector has shape {x.shape}; expected ({self.n_var},)")
        lo, hi = self.bounds
        x = np.clip(x, lo, hi)
        keep = [i for i in range(L) if x[i]]
        for i in range(L):  # repair: keep the lowest-index dropped layers up to the minimum depth
            if len(keep) >= self.space.min_layers:
                break
            if i not in keep:
                keep = sorted(keep + [i])
        mlp = tuple(self.space.mlp_choices[x[L + i]] for i in keep)
        heads = tuple(opts[x[2 * L + i]] for i in keep)
        down = tuple(int(x[3 * L + i]) for i in keep) if self.mixed_precision else ()
        return SubnetConfig(L, tuple(keep), mlp, tuple(h for h, _ in heads), tuple(kv for _, kv in heads), down)


def shrunk_genes(encoder: GeneEncoder, u: np.ndarray, t: float) -> np.ndarray:
    """Every gene moved from the full model's value towards the smallest by its share `u` of intensity `t`."""
    lo, hi = encoder.bounds
    return hi - np.round(t * u * (hi - lo)).astype(int)


def shrunk_to(encoder: GeneEncoder, latency: Callable[[SubnetConfig], float], u: np.ndarray,
              target: float) -> np.ndarray:
    """`shrunk_genes` with the smallest intensity whose predicted latency is at most `target` (bisection)."""
    a, b = 0.0, 1.0
    for _ in range(16):  # latency falls as t grows
        mid = (a + b) / 2
        a, b = (mid, b) if latency(encoder.decode(shrunk_genes(encoder, u, mid))) > target else (a, mid)
    return shrunk_genes(encoder, u, b)


def config_features(encoder: GeneEncoder, cfg: SubnetConfig, lost: np.ndarray | None = None) -> np.ndarray:
    """Per layer: kept, relative MLP width, relative head count and, with mixed precision, fp32 down_proj
    (0 for dropped layers). With `lost` (`Supernet.importance_lost(cfg)`), also its rows and their sums
    and sums of squares: what the sub-network cuts, in importance."""
    L, s, n = encoder.space.num_layers, encoder.space, encoder.genes_per_layer
    f = np.zeros((n, L))
    for layer, w, h, fp32 in zip(cfg.layers, cfg.mlp, cfg.heads, cfg.fp32_down_mask):
        f[:, layer] = (1.0, w / s.mlp_choices[-1], h / encoder.head_options[-1][0], float(fp32))[:n]
    if lost is None:
        return f.ravel()
    return np.concatenate([f.ravel(), lost.ravel(), lost.sum(1), (lost ** 2).sum(1)])
