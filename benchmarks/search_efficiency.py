"""Search efficiency on the default model: quality-evaluation cost and ranking, and LINAS vs NSGA-II vs random.

1. Cost of one quality evaluation (KL to the full model on the search's calibration tokens).
2. Does calibration KL rank sub-networks as a downstream task does? Kendall tau between KL and
   LAMBADA last-word accuracy (test split, never seen by the search) for 20 sub-networks spread over
   the size range.
3. Hypervolume of `nsga2` with `--nsga2-evals` real evaluations against `linas` and `random` with
   `--linas-evals`, averaged over seeds, at one latency budget on one table.

Writes benchmarks/results/search_efficiency.{json,md}.

    .venv/bin/python benchmarks/search_efficiency.py --table latency_tables/smollm2-135m__*__onnxruntime-int8.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import hwnas  # noqa: F401  (keeps caches inside the project)
from hwnas.common import atomic_write_json, atomic_write_text
from hwnas.data import lambada_items
from hwnas.evaluate import lambada_accuracy
from hwnas.search import quality_context, run_search
from hwnas.validation import spread_configs


def main(table: Path, seeds: list[int], nsga2_evals: int, linas_evals: int, population: int, ratio: float,
         rank_nets: int, rank_items: int, sequences: int, seq_len: int, work: Path, out_dir: Path) -> dict:
    from scipy.stats import kendalltau

    sn, quality = quality_context("smollm2-135m", sequences, seq_len)
    cfgs = spread_configs(sn.search_space, rank_nets, seed=123)
    items = lambada_items("test")[:rank_items]
    previous = out_dir / "search_efficiency.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    same = old.get("ranking", {}).get("subnets") == len(cfgs) and old["ranking"].get("lambada_items") == len(items) \
        and old.get("calibration_tokens") == f"{sequences}x{seq_len}"
    if same:  # the ranking study takes ~10 min: reuse it when its settings are unchanged
        kls, accs = old["ranking"]["kl"], old["ranking"]["acc"]
        times = old.get("quality_eval_seconds", [old["quality_eval_seconds_median"]])
    else:
        times, kls, accs = [], [], []
        for cfg in cfgs:
            t0 = time.perf_counter()
            kls.append(quality(cfg))
            times.append(time.perf_counter() - t0)
            sn.set_active(cfg)
            accs.append(lambada_accuracy(sn, sn.tokenizer, items, progress=False)["acc"])
    tau = kendalltau(kls, accs).statistic
    runs = {}
    for algo, n in (("nsga2", nsga2_evals), ("linas", linas_evals), ("random", linas_evals)):
        for seed in seeds:
            t0 = time.perf_counter()
            r = run_search(model="smollm2-135m", table=str(table), algorithm=algo, evaluations=n, population=population,
                           latency_ratio=ratio, seed=seed, out=str(work / f"{algo}-{n}-s{seed}"), sequences=sequences,
                           seq_len=seq_len, resume=True)
            runs.setdefault(algo, []).append({"seed": seed, "evaluations": n, "hypervolume": r["hypervolume"],
                                              "seconds": time.perf_counter() - t0})
    hv = {a: statistics.mean(x["hypervolume"] for x in v) for a, v in runs.items()}
    result = {
        "date": datetime.date.today().isoformat(), "table": str(table), "latency_ratio": ratio, "population": population,
        "calibration_tokens": f"{sequences}x{seq_len}",
        "quality_eval_seconds_median": statistics.median(times), "quality_eval_seconds": times,
        "ranking": {"subnets": len(cfgs), "lambada_items": len(items), "kendall_tau_kl_vs_acc": tau,
                    "kl": kls, "acc": accs},
        "runs": runs, "mean_hypervolume": hv,
        "linas_over_nsga2": hv["linas"] / hv["nsga2"] if hv["nsga2"] else None,
    }
    atomic_write_json(out_dir / "search_efficiency.json", result)
    md = [f"Search efficiency ({result['date']}, table `{Path(table).name}`, latency ratio {ratio})", "",
          f"- one quality evaluation ({sequences}x{seq_len} tokens): {result['quality_eval_seconds_median']:.2f} s (median)",
          f"- Kendall tau, calibration KL vs LAMBADA accuracy ({len(items)} test items), {len(cfgs)} sub-networks: "
          f"{tau:.3f} (negative = lower KL, higher accuracy)", "",
          "| algorithm | real evaluations | seeds | mean hypervolume | minutes per run (runs not resumed) |", "|---|---|---|---|---|"]
    for a, v in runs.items():
        fresh = [x["seconds"] for x in v if x["seconds"] > 5] or [float("nan")]  # resumed runs take no time
        md.append(f"| {a} | {v[0]['evaluations']} | {len(v)} | {hv[a]:.4f} | {statistics.mean(fresh) / 60:.1f} |")
    md.append(f"\nlinas / nsga2 hypervolume: {result['linas_over_nsga2']:.3f}")
    atomic_write_text(out_dir / "search_efficiency.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nsga2-evals", type=int, default=250)
    p.add_argument("--linas-evals", type=int, default=80)
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--latency-ratio", type=float, default=0.8)
    p.add_argument("--rank-nets", type=int, default=20)
    p.add_argument("--rank-items", type=int, default=200)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--work", type=Path, default=Path("runs/search_efficiency"))
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    a = p.parse_args()
    main(a.table, a.seeds, a.nsga2_evals, a.linas_evals, a.population, a.latency_ratio, a.rank_nets, a.rank_items,
         a.sequences, a.seq_len, a.work, a.out_dir)
