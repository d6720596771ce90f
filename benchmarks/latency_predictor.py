"""How well the latency tables predict deployed sub-networks, measured end to end on this machine.

Runs `hwnas validate-latency` on the given tables together (their measurements interleaved per
sub-network, several passes over the set, every other one reversed, the median kept) and writes
benchmarks/results/latency_predictor.{json,md} plus the scatter plot. Each row puts the predictor's
error beside the measurement's own repeatability (the same sub-network measured in different passes)
and beside the error of the predicted ratio to the full model. The full model is measured just before
every sub-network in every pass; the measured ratio is the median over passes of each pass's ratio, so a
change of the machine's speed between passes cancels out, and its own repeatability is given too.

    .venv/bin/python benchmarks/latency_predictor.py --samples 30 latency_tables/smollm2-135m__*.json
"""
from __future__ import annotations

import argparse
import datetime
import shutil
from pathlib import Path

import hwnas
from hwnas.common import atomic_write_json, atomic_write_text, read_json
from hwnas.validate_latency import validate_latency

hwnas.point_library_caches()  # library caches stay inside the project


def main(tables: list[Path], samples: int, seed: int, passes: int, work: Path, out_dir: Path) -> dict:
    validate_latency(tables=tables, samples=samples, seed=seed, passes=passes, out=work)
    report = read_json(work / "latency_validation.json")
    cmd = (f"python benchmarks/latency_predictor.py --samples {samples} --seed {seed} --passes {passes} "
           + " ".join(str(t) for t in tables))
    rows = []
    for target, t in report["tables"].items():
        for pk, r in t["phases"].items():
            rows.append({"target": target, "phase": pk, "n": r["n"], "within_10pct": r["within_10pct"],
                         "mape": r["mape"], "max_abs_err": r["max_abs_err"], "kendall_tau": r["kendall_tau"],
                         "spearman": r["spearman"], "ratio_within_10pct": r["ratio_to_full"]["within_10pct"],
                         "ratio_mape": r["ratio_to_full"]["mape"], "ratio_kendall_tau": r["ratio_to_full"].get("kendall_tau"),
                         "ratio_repeat_within_10pct": r["ratio_to_full"].get("within_10pct_between_passes"),
                         "repeat_median_diff": r["repeatability"]["median_pass_diff"],
                         "repeat_within_10pct": r["repeatability"]["within_10pct_between_passes"],
                         "size_mape": t["size"]["mape"]})
    result = {"date": datetime.date.today().isoformat(), "command": cmd, "samples": samples, "passes": passes,
              "rows": rows}
    atomic_write_json(out_dir / "latency_predictor.json", result)
    shutil.copyfile(work / "latency_scatter.png", out_dir / "latency_scatter.png")
    md = [f"Latency predictor against end-to-end measurement ({result['date']}, `{cmd}`)", "",
          "| target | phase | n | within ±10% | MAPE | max err | Kendall τ | Spearman | passes within 10% | "
          "ratio to full within ±10% | ratio MAPE | ratio τ | ratio passes within 10% | size MAPE |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['target']} | {r['phase']} | {r['n']} | {r['within_10pct']:.2f} | {r['mape']:.1%} | {r['max_abs_err']:.1%} | "
           f"{r['kendall_tau']:.3f} | {r['spearman']:.3f} | {r['repeat_within_10pct']:.2f} | "
           f"{r['ratio_within_10pct']:.2f} | {r['ratio_mape']:.1%} | {r['ratio_kendall_tau']:.3f} | "
           f"{r['ratio_repeat_within_10pct']:.2f} | {r['size_mape']:.1%} |" for r in rows]
    atomic_write_text(out_dir / "latency_predictor.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tables", type=Path, nargs="+")
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path("runs/latency_validation"))
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    a = p.parse_args()
    main(a.tables, a.samples, a.seed, a.passes, a.work, a.out_dir)
