"""Pruning baselines under the same latency target, model, metric and latency table as the search.

- `layer-drop` (ShortGPT): drop the layers of lowest Block Influence, one at a time, until the
  predicted latency fits; every kept layer stays full width.
- `width-uniform` (Minitron-style width pruning, LLM-Pruner-like without its LoRA step): the same MLP
  width and head count in every layer, channels and heads kept in the supernet's importance order. For
  each uniform head option the widest uniform MLP that fits is a candidate; the lowest-KL one wins.
- `random`: the best (lowest KL) of a uniform random sample of the search space under the budget, with
  the same number of real quality evaluations as the search (`hwnas search --algorithm random`).

Each writes `out/baseline.json` (the config, its KL and predicted latency) and `out/checkpoint/`, a
checkpoint that `hwnas onnx`, `hwnas quantize` and `hwnas evaluate` take like any sub-network's.
Baselines deploy with every MatMul int8 (no per-layer fp32 down_proj): that choice is the search's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import HwnasError, atomic_write_json, read_json
from .space import SubnetConfig

METHODS = ("layer-drop", "width-uniform", "random")


def layer_drop(sp: Any) -> SubnetConfig:
    """The full-width model with its lowest-Block-Influence layers dropped until it fits the budget."""
    sn, obj = sp.supernet, sp.objectives
    if sn.layer_importance is None:
        raise HwnasError("layer-drop needs the supernet's Block Influence scores; they are computed by its calibration")
    full = sn.search_space.max_config()
    keep = list(full.layers)
    least_influential = sorted(keep, key=lambda i: sn.layer_importance[i])
    while True:
        cfg = _uniform(full.num_layers, keep, full.mlp[0], full.heads[0], full.kv_heads[0])
        if obj.latency(cfg) <= obj.latency_budget:
            return cfg
        if len(keep) <= sn.search_space.min_layers:
            raise HwnasError(f"layer-drop cannot reach {obj.latency_budget:.3f} ms: with the minimum of "
                             f"{len(keep)} layers it predicts {obj.latency(cfg):.3f} ms")
        keep.remove(least_influential.pop(0))


def width_candidates(sp: Any) -> list[SubnetConfig]:
    """Per uniform head option, all layers kept at the widest uniform MLP width that fits the budget."""
    space, obj = sp.supernet.search_space, sp.objectives
    layers = list(range(space.num_layers))
    out = []
    for heads, kv in sp.encoder.head_options:
        for width in sorted(space.mlp_choices, reverse=True):
            cfg = _uniform(space.num_layers, layers, width, heads, kv)
            if obj.latency(cfg) <= obj.latency_budget:
                out.append(cfg)
                break
    if not out:
        smallest = _uniform(space.num_layers, layers, min(space.mlp_choices), *sp.encoder.head_options[0])
        raise HwnasError(f"width-uniform cannot reach {obj.latency_budget:.3f} ms with every layer kept: the narrowest "
                         f"uniform model predicts {obj.latency(smallest):.3f} ms")
    return out


def width_uniform(sp: Any) -> tuple[SubnetConfig, float, list[dict[str, Any]]]:
    """The lowest-KL of `width_candidates`: (its config, its KL, every candidate with its KL and predicted latency)."""
    obj = sp.objectives
    scored = [(obj.quality(c), c) for c in width_candidates(sp)]
    kl, cfg = min(scored, key=lambda t: t[0])
    return cfg, kl, [{"config": c.to_dict(), "kl": q, "latency_ms": obj.latency(c)} for q, c in scored]


def _uniform(num_layers: int, layers: list[int], mlp: int, heads: int, kv: int) -> SubnetConfig:
    n = len(layers)
    return SubnetConfig(num_layers, tuple(sorted(layers)), (mlp,) * n, (heads,) * n, (kv,) * n)


def run_baseline(*, method: str, model: str, table: str | Path, latency_ratio: float | None = None,
                 latency_budget: float | None = None, phase: str = "decode", evaluations: int = 60,
                 population: int = 12, seed: int = 0, out: str | Path, overwrite: bool = False,
                 calibration_source: str = "mixed", progress: bool = True) -> dict[str, Any]:
    """Build baseline `method`'s sub-network of `model` under the latency target and export it to `out/checkpoint`.

    `calibration_source` is the text of the importance order (layer-drop's Block Influence, width-uniform's
    channels) and of the KL, as in the search."""
    from .export import export_checkpoint
    from .search import run_search, setup

    if method not in METHODS:
        raise HwnasError(f"baseline method {method!r} is not known; expected one of {list(METHODS)}")
    if (latency_ratio is None) == (latency_budget is None):
        raise HwnasError("give exactly one of --latency-ratio and --latency-budget")
    if latency_ratio is not None and not 0 < latency_ratio <= 1:
        raise HwnasError(f"--latency-ratio must be in (0, 1], got {latency_ratio}")
    out = Path(out)
    if (out / "baseline.json").exists() and not overwrite:
        raise HwnasError(f"{out} already holds a baseline; pass --overwrite or choose another --out")
    sp = setup(model=model, table=str(table), phase=phase, latency_budget=latency_budget, latency_ratio=latency_ratio,
               calibration_source=calibration_source)
    obj, full = sp.objectives, sp.supernet.search_space.max_config()
    evaluated: list[dict[str, Any]] = []  # width-uniform's candidates, for the record
    if method == "layer-drop":
        cfg = layer_drop(sp)
        kl = obj.quality(cfg)
    elif method == "width-uniform":
        cfg, kl, evaluated = width_uniform(sp)
    else:
        # select=0: the lowest KL of the sample, as documented: no held-out re-scoring
        run_search(model=model, table=str(table), algorithm="random", evaluations=evaluations, population=population,
                   latency_budget=obj.latency_budget, phase=phase, seed=seed,
                   resume=(out / "search" / "state.pkl").exists(), out=str(out / "search"), progress=progress,
                   calibration_source=calibration_source, select=0)
        front = read_json(out / "search" / "pareto.json", "search front")["front"]  # feasible members only
        if not front:
            raise HwnasError(f"no random sub-network out of {evaluations} met {obj.latency_budget:.3f} ms")
        best = min(front, key=lambda m: m["kl"])
        cfg, kl = SubnetConfig.from_dict(best["config"]), best["kl"]
    export_checkpoint(model=model, subnet=_write_config(out, cfg), out=out / "checkpoint", overwrite=overwrite,
                      supernet=sp.supernet)
    result = {"method": method, "model": str(model), "table": str(Path(table).resolve()), "phase": phase,
              "latency_budget_ms": obj.latency_budget, "latency_ratio": obj.latency(cfg) / obj.latency(full),
              "latency_ms": obj.latency(cfg), "full_latency_ms": obj.latency(full), "size_bytes": obj.size(cfg),
              "kl": kl, "layers": cfg.depth, "config": cfg.to_dict(), "calibration": sp.supernet.calibration.key(),
              "candidates": evaluated,
              "checkpoint": str((out / "checkpoint").resolve())}
    atomic_write_json(out / "baseline.json", result)
    return result


def _write_config(out: Path, cfg: SubnetConfig) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return cfg.to_json(out / "subnet.json")
