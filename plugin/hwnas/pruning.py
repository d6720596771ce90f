"""Structured pruning under a latency budget: the `hwnas baseline` networks and the search's seeds.

- layer-drop (ShortGPT): drop the layers of lowest Block Influence, one at a time, until the predicted
  latency fits; every kept layer stays full width.
- width-uniform (Minitron-style width pruning): every layer kept at one MLP width and head count, channels
  and heads in the supernet's importance order; per head option the widest MLP that fits, the lowest KL wins.
- structured seeds: for k = 0, 1, ..., drop the k least influential layers, then the widest uniform MLP that fits.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .common import HwnasError
from .space import SearchSpace, SubnetConfig

Latency = Callable[[SubnetConfig], float]


def least_influential(importance: Sequence[float] | None) -> list[int]:
    """Layer indices, lowest Block Influence (`Supernet.layer_importance`) first."""
    if importance is None:
        raise HwnasError("layer pruning needs the supernet's Block Influence scores; its calibration computes them")
    return [int(i) for i in np.argsort(np.asarray(importance), kind="stable")]


def uniform_config(num_layers: int, layers: Sequence[int], mlp: int, heads: int, kv: int) -> SubnetConfig:
    """`layers` kept, each with MLP width `mlp` and `heads` query heads over `kv` KV heads."""
    n = len(layers)
    return SubnetConfig(num_layers, tuple(sorted(layers)), (mlp,) * n, (heads,) * n, (kv,) * n)


def kept_layers(space: SearchSpace, order: Sequence[int]) -> Iterator[list[int]]:
    """For k = 0, 1, ... down to the space's minimum depth: the layers left after dropping `order`'s first k."""
    for k in range(space.num_layers - space.min_layers + 1):
        dropped = set(order[:k])
        yield [i for i in range(space.num_layers) if i not in dropped]


def widest_uniform(space: SearchSpace, layers: Sequence[int], heads: int, kv: int, *, latency: Latency,
                   budget: float) -> SubnetConfig | None:
    """`layers` at the widest uniform MLP width whose predicted latency fits `budget` (None: none fits)."""
    for width in sorted(space.mlp_choices, reverse=True):
        cfg = uniform_config(space.num_layers, layers, width, heads, kv)
        if latency(cfg) <= budget:
            return cfg
    return None


def layer_drop(space: SearchSpace, order: Sequence[int], *, latency: Latency, budget: float) -> SubnetConfig:
    """The full-width model with `order`'s first layers (`least_influential`) dropped until it fits `budget`."""
    full = space.max_config()
    for keep in kept_layers(space, order):
        cfg = uniform_config(space.num_layers, keep, full.mlp[0], full.heads[0], full.kv_heads[0])
        if latency(cfg) <= budget:
            return cfg
    raise HwnasError(f"layer-drop cannot reach {budget:.3f} ms: with the minimum of "
                     f"{len(keep)} layers it predicts {latency(cfg):.3f} ms")


def width_candidates(space: SearchSpace, head_options: Sequence[tuple[int, int]], *, latency: Latency,
                     budget: float) -> list[SubnetConfig]:
    """Per (query heads, KV heads) option, all layers kept at the widest uniform MLP width that fits `budget`."""
    layers = list(range(space.num_layers))
    out = [cfg for heads, kv in head_options
           if (cfg := widest_uniform(space, layers, heads, kv, latency=latency, budget=budget)) is not None]
    if not out:
        smallest = uniform_config(space.num_layers, layers, min(space.mlp_choices), *head_options[0])
        raise HwnasError(f"width-uniform cannot reach {budget:.3f} ms with every layer kept: the narrowest "
                         f"uniform model predicts {latency(smallest):.3f} ms")
    return out


def width_uniform(space: SearchSpace, head_options: Sequence[tuple[int, int]], *, latency: Latency, budget: float,
                  quality: Callable[[SubnetConfig], float]) -> tuple[SubnetConfig, float, list[dict[str, Any]]]:
    """The lowest-`quality` of `width_candidates`: (its config, its KL, every candidate with its KL and latency)."""
    scored = [(quality(c), c) for c in width_candidates(space, head_options, latency=latency, budget=budget)]
    kl, cfg = min(scored, key=lambda t: t[0])
    return cfg, kl, [{"config": c.to_dict(), "kl": q, "latency_ms": latency(c)} for q, c in scored]


def structured_seeds(space: SearchSpace, order: Sequence[int], *, latency: Latency,
                     budget: float) -> list[SubnetConfig]:
    """Per depth, what structured pruning picks under `budget`: `order`'s first k layers dropped, then every MLP
    at the widest uniform width that fits, for k = 0, 1, ... until dropping layers alone fits (`layer_drop`'s
    network: more dropped layers only lose quality)."""
    full, seeds = space.max_config(), []
    for keep in kept_layers(space, order):
        cfg = widest_uniform(space, keep, full.heads[0], full.kv_heads[0], latency=latency, budget=budget)
        if cfg is not None:
            seeds.append(cfg)
            if cfg.mlp[0] == full.mlp[0]:
                break
    return seeds
