"""`hwnas baseline`: a pruning baseline's sub-network under the same latency target, model, metric and latency
table as the search, exported as a checkpoint.

- `layer-drop` and `width-uniform`: `pruning.layer_drop` and `pruning.width_uniform` (channels and heads kept in
  the supernet's importance order, as LLM-Pruner does without its LoRA step);
- `random`: the best (lowest KL) of a uniform random sample of the search space under the budget, with
  the same number of real quality evaluations as the search (`hwnas search --algorithm random`).

Each writes `out/baseline.json` (the config, its KL and predicted latency) and `out/checkpoint/`, a
checkpoint that `hwnas onnx`, `hwnas quantize` and `hwnas evaluate` take like any sub-network's.
Baselines deploy with every MatMul int8 (no per-layer fp32 down_proj): that choice is the search's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import HwnasError, atomic_write_json, prepare_output, read_json
from .defaults import BASELINE_EVALUATIONS, BASELINE_POPULATION, CALIBRATION_SOURCE, DEFAULT_MODEL
from .export import export_checkpoint
from .pruning import layer_drop, least_influential, width_uniform
from .search import run_search, setup
from .space import SubnetConfig

METHODS = ("layer-drop", "width-uniform", "random")


def run_baseline(*, method: str, model: str = DEFAULT_MODEL, table: str | Path, latency_ratio: float | None = None,
                 latency_budget: float | None = None, phase: str = "decode", evaluations: int = BASELINE_EVALUATIONS,
                 population: int = BASELINE_POPULATION, seed: int = 0, out: str | Path, overwrite: bool = False,
                 calibration_source: str = CALIBRATION_SOURCE, progress: bool = True) -> dict[str, Any]:
    """Build baseline `method`'s sub-network of `model` under the latency target and export it to `out/checkpoint`.

    `calibration_source` is the text of the importance order (layer-drop's Block Influence, width-uniform's
    channels) and of the KL, as in the search."""
    if method not in METHODS:
        raise HwnasError(f"baseline method {method!r} is not known; expected one of {list(METHODS)}")
    if (latency_ratio is None) == (latency_budget is None):
        raise HwnasError("give exactly one of --latency-ratio and --latency-budget")
    if latency_ratio is not None and not 0 < latency_ratio <= 1:
        raise HwnasError(f"--latency-ratio must be in (0, 1], got {latency_ratio}")
    out = Path(out)
    if (out / "baseline.json").exists() and not overwrite:
        raise HwnasError(f"{out} already holds a baseline; pass --overwrite or choose another --out")
    if not overwrite:  # a folder of other files is not a baseline's; an unfinished baseline's is resumed
        own = any((out / n).exists() for n in ("search", "checkpoint", "subnet.json"))
        prepare_output(out, overwrite=False, own=own)
    sp = setup(model=model, table=str(table), phase=phase, latency_budget=latency_budget, latency_ratio=latency_ratio,
               calibration_source=calibration_source)
    obj, space = sp.objectives, sp.supernet.search_space
    full = space.max_config()
    evaluated: list[dict[str, Any]] = []  # width-uniform's candidates, for the record
    if method == "layer-drop":
        cfg = layer_drop(space, least_influential(sp.supernet.layer_importance), latency=obj.latency,
                         budget=obj.latency_budget)
        kl = obj.quality(cfg)
    elif method == "width-uniform":
        cfg, kl, evaluated = width_uniform(space, sp.encoder.head_options, latency=obj.latency,
                                           budget=obj.latency_budget, quality=obj.quality)
    else:
        # select=0: the lowest KL of the sample, as documented: no held-out re-scoring
        run_search(model=model, table=str(table), algorithm="random", evaluations=evaluations, population=population,
                   latency_budget=obj.latency_budget, phase=phase, seed=seed,
                   resume=(out / "search" / "state.json").exists(), out=str(out / "search"), progress=progress,
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
