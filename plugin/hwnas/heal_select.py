"""Selection that knows about healing: rankings before healing can flip after it, so the best few candidates of a
search's selection are each healed briefly and re-scored, and the best after healing wins (`hwnas run
--heal-candidates K`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import HwnasError, atomic_write_json, read_json
from .export import export_checkpoint
from .heal import REPORT_FILE as HEAL_REPORT, checkpoint_dir, heal
from .loading import load_model
from .selection import METRICS, Standalone, scorer
from .space import SubnetConfig

RESULT = "heal_selection.json"


def pick_after_healing(*, source: str | Path, search_dir: Path, k: int, tokens: int, work: Path,
                       progress: bool = True) -> dict[str, Any]:
    """Heal the `k` best candidates of `search_dir/selection.json` on `tokens` tokens each, score them again by the
    selection's own metric and items, and return the best after healing (a selection candidate with both scores).

    Each candidate's checkpoints stay in `work/candidate-<i>/`, so an interrupted pick resumes."""
    if k < 2:
        raise HwnasError(f"--heal-candidates must be at least 2 to compare candidates, got {k}")
    if not (search_dir / "selection.json").is_file():
        raise HwnasError(f"{search_dir} has no selection.json: healing candidates needs a search under a latency "
                         "budget with --select > 0")
    selection = read_json(search_dir / "selection.json", "selection")
    pareto = read_json(search_dir / "pareto.json", "search front")
    metric = {v: key for key, v in METRICS.items()}[selection["settings"]["metric"]]
    items = selection["settings"]["items"]
    ranked = sorted(selection["candidates"], key=lambda c: c["nll"])[:k]
    settings = {"k": k, "tokens": tokens, "metric": metric, "items": items}
    saved = read_json(work / RESULT, "healing selection") if (work / RESULT).is_file() else {}
    done = {c["key"]: c for c in saved.get("candidates", [])} if saved.get("settings") == settings else {}
    rows = []
    for i, cand in enumerate(ranked):
        if cand["key"] not in done:
            done[cand["key"]] = {**cand, "folder": str(work / f"candidate-{i}"), "nll_before_healing": cand["nll"],
                                 "nll_after_healing": _healed_score(source, pareto, cand, work / f"candidate-{i}",
                                                                    tokens, metric, items, progress)}
        rows.append(done[cand["key"]])
        atomic_write_json(work / RESULT, {"settings": settings, "candidates": rows})
    chosen = min(rows, key=lambda c: c["nll_after_healing"])
    result = {"settings": settings, "candidates": rows, "chosen": chosen,
              "changed_pick": chosen["key"] != min(selection["candidates"], key=lambda c: c["nll"])["key"]}
    atomic_write_json(work / RESULT, result)
    return result


def _healed_score(source: str | Path, pareto: dict[str, Any], cand: dict[str, Any], folder: Path, tokens: int,
                  metric: str, items: int, progress: bool) -> float:
    cfg = SubnetConfig.from_dict(cand["config"])
    subnet, healed = folder / "subnet", folder / "healed"
    if not (subnet / "hwnas_export.json").is_file():
        front = folder / "candidate.json"  # one-member front: its channels follow the search's importance order
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(front, {"calibration": pareto["calibration"], "front": [{"config": cand["config"]}]})
        export_checkpoint(model=str(source), subnet=front, pick=0, out=subnet, overwrite=subnet.exists())
    if not (healed / HEAL_REPORT).is_file():
        heal(model=subnet, teacher=source, tokens=tokens, out=healed, resume=checkpoint_dir(healed).exists(),
             progress=progress)
    model, tok = load_model(healed, allow_subnet=True)
    return float(scorer(metric, Standalone(model, tok, cfg), items)(cfg))

