"""A search's outputs: evaluations.csv, pareto.json, summary.json (with the front's hypervolume) and pareto.png."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .common import atomic_write_json, atomic_write_text

HV_REFERENCE = "(KL = ln(vocab), latency = full model's, size = full model's), on (KL, latency, size)"


def pareto_mask(F: np.ndarray) -> np.ndarray:
    """True for the rows of F (minimised) that no other row dominates."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    mask = np.zeros(len(F), dtype=bool)
    if len(F):
        mask[NonDominatedSorting().do(F, only_non_dominated_front=True)] = True
    return mask


def hypervolume(F: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of the points of F (minimised) dominating `ref`."""
    from pymoo.indicators.hv import HV

    F = F[np.all(F <= ref, axis=1)]
    return float(HV(ref_point=ref)(F)) if len(F) else 0.0


def write_outputs(out: Path, ev: Any, *, full_latency: float, full_size: float, vocab: int,
                  args: dict[str, Any], predictor: Any, selected: dict[str, Any] | None = None) -> dict[str, Any]:
    """evaluations.csv, pareto.json, pareto.png and summary.json of `ev` (a `search.Evaluator`) in `out`.

    `selected` (a `hwnas.selection` candidate) is recorded in pareto.json as the winner; without it the
    winner is the front's lowest-KL member (the slowest member may not be: size counts too).
    """
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "generation", "kl", "latency_ms", "size_bytes", "feasible", "layers", "config"])
    feasible = {id(e) for e in ev.feasible()}
    for i, e in enumerate(ev.order):
        w.writerow([i, e.generation, repr(e.quality), repr(e.latency_ms), int(e.size_bytes),
                    int(id(e) in feasible), e.config.depth, json.dumps(e.config.to_dict(), separators=(",", ":"))])
    atomic_write_text(out / "evaluations.csv", buf.getvalue())
    cands = ev.feasible()
    F = np.array([e.objectives() for e in cands]).reshape(-1, 3)
    front = sorted((e for e, m in zip(cands, pareto_mask(F)) if m), key=lambda e: e.latency_ms)
    norm = np.array([1.0, 1.0 / full_latency, 1.0 / full_size])
    ref = np.array([math.log(vocab), 1.0, 1.0])
    hv = hypervolume(np.array([e.objectives() for e in front]).reshape(-1, 3) * norm, ref)
    pareto = [{"kl": e.quality, "latency_ms": e.latency_ms, "latency_ratio": e.latency_ms / full_latency,
               "size_bytes": int(e.size_bytes), "size_ratio": e.size_bytes / full_size, "layers": e.config.depth,
               "config": e.config.to_dict()} for e in front]
    best = min(pareto, key=lambda m: m["kl"], default=None)
    if selected is not None:
        best = {k: v for k, v in selected.items() if k != "key"}
    # the configs index channels in the importance order of this calibration: export rebuilds it
    atomic_write_json(out / "pareto.json", {"objectives": ["kl", "latency_ms", "size_bytes"], "phase": args["phase"],
                                            "table": args["table"], "calibration": args["calibration"], "front": pareto,
                                            **({"selected": best} if selected is not None else {})})
    summary = {"args": args, "evaluations": ev.used, "feasible": len(cands), "front_size": len(front),
               "hypervolume": hv, "hypervolume_reference": HV_REFERENCE, "normalised_by":
               {"kl": 1.0, "latency_ms": full_latency, "size_bytes": full_size},
               "full_model": {"kl": 0.0, "latency_ms": full_latency, "size_bytes": full_size},
               "latency_budget_ms": ev.obj.latency_budget, "size_budget_bytes": ev.obj.size_budget,
               "target": {"runtime": predictor.table.runtime, "precision": predictor.table.precision,
                          "device": predictor.table.device_id}}
    atomic_write_json(out / "summary.json", summary)
    pareto_plot(ev.order, front, full_latency, out / "pareto.png", budget=ev.obj.latency_budget)
    return {"out": str(out), "evaluations": ev.used, "front_size": len(front), "hypervolume": hv, "best": best}


def pareto_plot(evaluated: list[Any], front: list[Any], full_latency: float, path: Path, *,
                budget: float | None) -> None:
    """Every evaluated sub-network's KL against its predicted latency, the front, the full model and the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.scatter([e.latency_ms for e in evaluated], [e.quality for e in evaluated], s=10, c="0.7", label="evaluated")
    ax.plot([e.latency_ms for e in front], [e.quality for e in front], "o-", c="tab:red", ms=4, label="Pareto front")
    ax.scatter([full_latency], [0.0], marker="*", s=160, c="k", label="full model", zorder=5)
    if budget is not None:
        ax.axvline(budget, ls="--", c="tab:blue", lw=1, label="latency budget")
    ax.set(xlabel="predicted latency (ms)", ylabel="KL to the full model (nats/token)", title="hwnas search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
