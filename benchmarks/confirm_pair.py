"""A closer look at one verdict of benchmarks/compare.py: two of its sub-networks evaluated again on more items.

compare.py evaluates every method on a few hundred items per task, where the paired standard error of a
difference is about 1.2 points; a gap smaller than that is undecided. This script takes two rows of
benchmarks/results/compare.json at one latency ratio (their sub-network configs), builds each as compare.py
deployed it (checkpoint, then `hwnas quantize --method ort-int8`), evaluates both in onnxruntime with lm-eval on
the same tasks with a larger --limit (the first items of each task's scored split, so a superset of compare.py's),
and reports the difference item by item. Deployment and evaluation are compare.py's own functions; steps done
under --work are reused.

    .venv/bin/python benchmarks/confirm_pair.py --ratio 0.7 --methods hwnas,layer-drop --limit 1500
"""
from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
from pathlib import Path

import hwnas  # noqa: F401  (keeps caches inside the project)
from compare import deploy_all, evaluate_all, key  # benchmarks/compare.py, beside this script
from hwnas.common import HwnasError, atomic_write_json, atomic_write_text, home, read_json
from hwnas.lmeval import headline, paired_difference
from hwnas.supernet import Calibration, recorded_calibration


def row_of(compare: dict, method: str, ratio: float) -> dict:
    rows = [r for r in compare["rows"] if r["method"] == method and abs(r["ratio"] - ratio) < 1e-9]
    if not rows or rows[0]["config"] is None:
        have = sorted({(r["method"], r["ratio"]) for r in compare["rows"] if r["config"] is not None})
        raise HwnasError(f"compare.json has no sub-network of {method!r} at ratio {ratio}; it has {have}")
    return rows[0]


def checkpoint(model: str, row: dict, work: Path, calibration: Calibration) -> Path:
    """The standalone checkpoint of `row`'s sub-network (built unless there), named as compare.py names artifacts,
    its channels in `calibration`'s importance order."""
    from hwnas.export import export_checkpoint
    from hwnas.supernet import Supernet

    ckpt = work / "checkpoints" / key(row)
    if not ckpt.is_dir():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(ckpt.with_suffix(".json"), row["config"])
        export_checkpoint(model=model, subnet=ckpt.with_suffix(".json"), out=ckpt,
                          supernet=Supernet.from_pretrained(model, calibration=calibration))
    return ckpt


def main(compare_json: Path, ratio: float, methods: list[str], tasks: list[str], limit: int, work: Path,
         out_dir: Path) -> dict:
    if len(methods) != 2:
        raise HwnasError(f"--methods takes two methods to compare, got {methods}")
    compare = read_json(compare_json, "comparison")
    rows = [row_of(compare, m, ratio) for m in methods]
    calibration = recorded_calibration(compare)
    work = work / calibration.key()  # artifacts are named by config: one folder per channel order
    rows = [{**r, "checkpoint": str(checkpoint(compare["model"], r, work, calibration))} for r in rows]
    evals = evaluate_all(deploy_all(rows, work), tasks, limit, work)  # compare.py's deployment and evaluation
    results = {}
    for row in rows:
        saved = evals[key(row)]
        results[row["method"]] = {
            "config": row["config"], "layers": len(row["config"]["layers"]), "tasks": saved["tasks"],
            "accuracy": sum(headline(t)[0] for t in saved["tasks"].values()) / len(saved["tasks"]),
            "accuracy_at_compare_limit": row["accuracy"]}
    a, b = methods
    diff, se = paired_difference(results[a], results[b])
    at_compare = results[a]["accuracy_at_compare_limit"] - results[b]["accuracy_at_compare_limit"]
    report = {"date": datetime.date.today().isoformat(), "command": "python " + shlex.join(sys.argv),
              "compare": str(compare_json), "compare_limit": compare["limit"], "ratio": ratio, "limit": limit,
              "items": {t: r["n"] for t, r in results[a]["tasks"].items()},
              "results": {m: {k: v for k, v in r.items() if k != "tasks"} | {"tasks": {
                  t: {k: v for k, v in x.items() if k != "scores"} for t, x in r["tasks"].items()}}
                  for m, r in results.items()},
              "difference": diff, "difference_stderr": se, "difference_at_compare_limit": at_compare}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"confirm_{a}_{b}_{ratio:.2f}"
    atomic_write_json(out_dir / f"{stem}.json", report)
    atomic_write_text(out_dir / f"{stem}.md", markdown(report, a, b))
    return report


def markdown(r: dict, a: str, b: str) -> str:
    tasks = list(r["items"])
    lines = [f"{a} against {b} at latency ratio {r['ratio']:.2f}, onnxruntime int8, up to {r['limit']} items per task "
             f"({r['date']}, `{r['command']}`)", "",
             "| method | layers | " + " | ".join(f"{t} (n={r['items'][t]})" for t in tasks) + " | mean |",
             "|---|---|" + "---|" * (len(tasks) + 1)]
    for m in (a, b):
        x = r["results"][m]
        cells = [f"{headline(x['tasks'][t])[0] * 100:.1f} ± {headline(x['tasks'][t])[1] * 100:.1f}" for t in tasks]
        lines.append(f"| {m} | {x['layers']} | " + " | ".join(cells) + f" | {x['accuracy'] * 100:.1f} |")
    d, se = r["difference"], r["difference_stderr"]
    lines += ["", f"{a} - {b}: {d * 100:+.1f} ± {se * 100:.1f} points (paired stderr, "
              f"{abs(d) / se if se else math.inf:.1f} sigma); at compare.py's {r['compare_limit']} items "
              f"per task it was {r['difference_at_compare_limit'] * 100:+.1f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", type=Path, default=Path("benchmarks/results/compare.json"))
    ap.add_argument("--ratio", type=float, required=True)
    ap.add_argument("--methods", default="hwnas,layer-drop", help="two methods of compare.json, comma-separated")
    ap.add_argument("--tasks", default="arc_easy,piqa,hellaswag,lambada")
    ap.add_argument("--limit", type=int, default=1500, help="items per task (the first ones of its scored split)")
    ap.add_argument("--work", type=Path, default=None, help="default: $HWNAS_HOME/confirm")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    try:
        rep = main(args.compare, args.ratio, args.methods.split(","), args.tasks.split(","), args.limit,
                   args.work or home() / "confirm", args.out_dir)
    except HwnasError as e:
        sys.exit(f"error: {e}")
    print(markdown(rep, *args.methods.split(",")))
