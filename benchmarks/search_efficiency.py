"""Search efficiency on the default model: quality-evaluation cost and ranking, and LINAS vs NSGA-II vs random.

1. `ranking`: cost of one quality evaluation (KL to the full model, int8 emulated as the search does
   against an onnxruntime int8 table) at each calibration size, and whether it ranks sub-networks as
   the downstream tasks do: Kendall tau between KL and mean lm-eval accuracy (ARC-Easy, PIQA,
   HellaSwag, LAMBADA; `--rank-items` each, int8 emulated) over 20 sub-networks in the range a search
   explores (predicted decode 60-95% of the full model's, plus layer-drop and width-uniform ones).
2. `hv`: hypervolume of `nsga2` with `--nsga2-evals` real evaluations against `linas` and `random` with
   `--linas-evals`, averaged over seeds, at one latency budget on one table, the lowest KL each finds under
   the budget, and minutes per run.
3. `predictor`: Kendall tau of LINAS's quality predictor on sub-networks it was not trained on, drawn
   from everything the `hv` runs evaluated, against the predictor LINAS used before.

Each part checkpoints under `--work` and resumes. Writes benchmarks/results/search_efficiency.{json,md}.

    .venv/bin/python benchmarks/search_efficiency.py --table latency_tables/smollm2-135m__*__onnxruntime-int8.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import numpy as np

import hwnas
from hwnas.common import atomic_write_json, atomic_write_text
from hwnas.encoding import GeneEncoder, config_features, shrunk_to
from hwnas.lmeval import evaluate_model, headline
from hwnas.pruning import layer_drop, least_influential, width_candidates
from hwnas.quality import KLQuality, calibration_ids
from hwnas.search import fit_quality_predictor, run_search, setup
from hwnas.space import SubnetConfig

hwnas.point_library_caches()  # library caches stay inside the project

MODEL = "smollm2-135m"
RANK_TASKS = ("arc_easy", "piqa", "hellaswag", "lambada")
USEFUL_KL = 4.0  # above it, sub-networks score near chance on every task (see the ranking rows)


def ranking_configs(sp, n: int, seed: int) -> list[tuple[str, SubnetConfig]]:
    """Layer-drop and full-head width-uniform at 0.9/0.8/0.7 of the full model's predicted latency, and
    `n - 6` sub-networks with every gene shrunk by its own random share to predicted ratios 0.60-0.95."""
    enc, obj = sp.encoder, sp.objectives
    full = obj.latency(sp.supernet.search_space.max_config())
    rng = np.random.default_rng(seed)
    out = []
    for r in np.linspace(0.60, 0.95, n - 6):
        out.append((f"shrunk {r:.2f}", enc.decode(shrunk_to(enc, obj.latency, rng.random(enc.n_var), r * full))))
    space, order = sp.supernet.search_space, least_influential(sp.supernet.layer_importance)
    for r in (0.9, 0.8, 0.7):
        out.append((f"layer-drop {r}", layer_drop(space, order, latency=obj.latency, budget=r * full)))
        out.append((f"width-uniform {r}", max(width_candidates(space, enc.head_options, latency=obj.latency,
                                                                budget=r * full), key=lambda c: c.heads[0])))
    return out


def ranking(table: Path, n: int, items: int, sizes: list[int], seq_len: int, work: Path) -> dict:
    from scipy.stats import kendalltau, spearmanr

    sp = setup(model=MODEL, table=str(table), latency_ratio=0.8, sequences=sizes[0], seq_len=seq_len)
    sn, quant = sp.supernet, sp.objectives.quality.quant
    qualities = {f"{s}x{seq_len}": KLQuality(sn, calibration_ids(sn.tokenizer, s, seq_len), quant=quant) for s in sizes}
    full_lat = sp.objectives.latency(sn.search_space.max_config())
    state_file = work / "ranking.json"
    settings = {"table": str(table), "n": n, "items": items, "sizes": list(sizes), "seq_len": seq_len,
                "tasks": list(RANK_TASKS)}
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    rows = state.get("rows", []) if state.get("settings") == settings else []
    for name, cfg in ranking_configs(sp, n, seed=7)[len(rows):]:
        row = {"name": name, "config": cfg.to_dict(), "layers": len(cfg.layers),
               "predicted_ratio": sp.objectives.latency(cfg) / full_lat, "kl": {}, "kl_seconds": {}}
        for key, q in qualities.items():
            t0 = time.perf_counter()
            row["kl"][key] = q(cfg)
            row["kl_seconds"][key] = time.perf_counter() - t0
        sn.set_active(cfg, quant=quant)  # lm-eval scores the int8-emulated sub-network
        res = evaluate_model(sn.model, sn.tokenizer, RANK_TASKS, limit=items, batch_size=8, progress=False)
        row["mean_acc"] = res["mean_acc_norm_or_acc"]
        row["tasks"] = {k: headline(v)[0] for k, v in res["tasks"].items()}
        rows.append(row)
        atomic_write_json(state_file, {"settings": settings, "rows": rows})
        print(f"{name}: layers {row['layers']}, pred {row['predicted_ratio']:.2f}, KL {row['kl']}, "
              f"acc {row['mean_acc']:.3f}")
    acc = [r["mean_acc"] for r in rows]
    useful = [i for i, r in enumerate(rows) if r["kl"][next(iter(qualities))] < USEFUL_KL]
    per_size = {}
    for key in qualities:
        kl = [r["kl"][key] for r in rows]
        per_size[key] = {"kendall_tau": kendalltau(kl, acc).statistic, "spearman": spearmanr(kl, acc).statistic,
                         "kendall_tau_useful": kendalltau([kl[i] for i in useful], [acc[i] for i in useful]).statistic,
                         "seconds_median": statistics.median(r["kl_seconds"][key] for r in rows)}
    return {"subnets": len(rows), "items_per_task": items, "tasks": list(RANK_TASKS), "batch_size": 8,
            "emulation": "onnxruntime int8 (OrtInt8)", "useful_below_kl": USEFUL_KL, "useful_subnets": len(useful),
            "per_calibration_size": per_size, "rows": rows}


def predictor_study(work: Path, sizes: tuple[int, ...] = (20, 40, 60), splits: int = 20,
                    region: float = USEFUL_KL) -> dict:
    """How well LINAS's quality predictor ranks sub-networks it has not seen, against the one used before
    (gradient boosting of KL on the gene features alone): every sub-network the `hv` runs evaluated,
    `splits` random splits per training size, Kendall tau on the held-out ones with KL below `region`."""
    import csv

    from scipy.stats import kendalltau
    from sklearn.ensemble import GradientBoostingRegressor

    from hwnas.supernet import Supernet

    seen: dict[str, float] = {}
    for f in sorted(work.glob("*/evaluations.csv")):
        with open(f) as fh:
            seen.update({r["config"]: float(r["kl"]) for r in csv.DictReader(fh)})
    cfgs = [SubnetConfig.from_dict(json.loads(k)) for k in seen]
    kl = np.array(list(seen.values()))
    sn = Supernet.from_pretrained(MODEL)
    enc = GeneEncoder(sn.search_space, mixed_precision=any(c.fp32_down for c in cfgs))
    genes = np.stack([config_features(enc, c) for c in cfgs])
    rich = np.stack([config_features(enc, c, sn.importance_lost(c)) for c in cfgs])

    def before(X, y, seed):
        m = GradientBoostingRegressor(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8,
                                      random_state=seed).fit(X, y)
        return m.predict

    variants = {"gene features, gradient boosting (before)": (genes, before),
                "importance features, boosting + ridge (now)": (rich, fit_quality_predictor)}
    rng = np.random.default_rng(0)
    taus: dict[str, dict[int, list[float]]] = {v: {n: [] for n in sizes} for v in variants}
    for n in sizes:
        for split in range(splits):
            idx = rng.permutation(len(kl))
            train, test = idx[:n], idx[n:]
            test = test[kl[test] < region]
            for name, (X, fit) in variants.items():
                predict = fit(X[train], kl[train], split)
                taus[name][n].append(kendalltau(predict(X[test]), kl[test]).statistic)
    return {"subnets": len(kl), "splits": splits, "held_out_below_kl": region,
            "kendall_tau": {v: {str(n): statistics.mean(t) for n, t in d.items()} for v, d in taus.items()}}


def hv_runs(table: Path, seeds: list[int], nsga2_evals: int, linas_evals: int, population: int, ratio: float,
            sequences: int, seq_len: int, work: Path, before: dict) -> dict:
    """Each run resumes from `work` when it finished before; its time is then the one `before` recorded."""
    timed = {(a, x["seed"], x["evaluations"]): x["seconds"] for a, v in before.get("runs", {}).items() for x in v}
    runs = {}
    for algo, n in (("nsga2", nsga2_evals), ("linas", linas_evals), ("random", linas_evals)):
        for seed in seeds:
            t0 = time.perf_counter()
            r = run_search(model=MODEL, table=str(table), algorithm=algo, evaluations=n, population=population,
                           latency_ratio=ratio, seed=seed, out=str(work / f"{algo}-{n}-s{seed}"), sequences=sequences,
                           seq_len=seq_len, resume=True, progress=False, select=0)  # the search alone
            seconds = time.perf_counter() - t0
            if seconds < 30 and (algo, seed, n) in timed:  # resumed a finished run
                seconds = timed[algo, seed, n]
            runs.setdefault(algo, []).append({"seed": seed, "evaluations": n, "hypervolume": r["hypervolume"],
                                              "best_kl": r["best"]["kl"] if r["best"] else None,
                                              "seconds": seconds})
    hv = {a: statistics.mean(x["hypervolume"] for x in v) for a, v in runs.items()}
    best = {a: statistics.mean(x["best_kl"] for x in v if x["best_kl"] is not None) for a, v in runs.items()}
    return {"latency_ratio": ratio, "population": population, "calibration_tokens": f"{sequences}x{seq_len}",
            "runs": runs, "mean_hypervolume": hv, "mean_best_kl": best,
            "linas_over_nsga2": hv["linas"] / hv["nsga2"] if hv["nsga2"] else None}


def markdown(result: dict) -> str:
    md = [f"Search efficiency (table `{Path(result['table']).name}`)", ""]
    rk = result.get("ranking")
    if rk:
        md += [f"Ranking ({rk.get('date', '')}): {rk['subnets']} sub-networks, lm-eval {', '.join(rk['tasks'])}, "
               f"{rk['items_per_task']} items each, {rk['emulation']} emulated; Kendall tau between calibration KL and "
               "mean accuracy (negative = lower KL, higher accuracy), over all and over the "
               f"{rk['useful_subnets']} below KL {rk['useful_below_kl']} (search's calibration size)", "",
               "| calibration tokens | seconds per evaluation (median) | Kendall tau | Spearman | Kendall tau below KL "
               f"{rk['useful_below_kl']} |", "|---|---|---|---|---|"]
        for key, v in rk["per_calibration_size"].items():
            md.append(f"| {key} | {v['seconds_median']:.2f} | {v['kendall_tau']:.3f} | {v['spearman']:.3f} | "
                      f"{v['kendall_tau_useful']:.3f} |")
        keys = list(rk["per_calibration_size"])
        md += ["", "| sub-network | layers | predicted decode ratio | " + " | ".join(f"KL {k}" for k in keys)
               + " | mean acc |", "|---|---|---|" + "---|" * len(keys) + "---|"]
        for r in sorted(rk["rows"], key=lambda r: r["kl"][keys[0]]):
            md.append(f"| {r['name']} | {r['layers']} | {r['predicted_ratio']:.2f} | "
                      + " | ".join(f"{r['kl'][k]:.2f}" for k in keys) + f" | {100 * r['mean_acc']:.1f} |")
    pr = result.get("predictor")
    if pr:
        sizes = list(next(iter(pr["kendall_tau"].values())))
        md += ["", f"LINAS quality predictor ({pr.get('date', '')}): Kendall tau on held-out sub-networks below KL "
               f"{pr['held_out_below_kl']}, mean of {pr['splits']} random splits of the {pr['subnets']} the runs "
               "evaluated", "",
               "| predictor | " + " | ".join(f"trained on {n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for name, t in pr["kendall_tau"].items():
            md.append(f"| {name} | " + " | ".join(f"{t[n]:.3f}" for n in sizes) + " |")
    hv = result.get("hv")
    if hv:
        md += ["", f"Hypervolume ({hv.get('date', '')}), latency ratio {hv['latency_ratio']}, population "
               f"{hv['population']}, {hv['calibration_tokens']} calibration tokens", "",
               "| algorithm | real evaluations | seeds | mean hypervolume (per seed) | lowest KL under the budget, "
               "mean (per seed) | minutes per run |", "|---|---|---|---|---|---|"]
        for a, v in hv["runs"].items():
            per = ", ".join(f"{x['hypervolume']:.3f}" for x in v)
            kls = ", ".join("-" if x.get("best_kl") is None else f"{x['best_kl']:.2f}" for x in v)
            best = hv.get("mean_best_kl", {}).get(a)
            minutes = statistics.mean(x["seconds"] for x in v) / 60
            md.append(f"| {a} | {v[0]['evaluations']} | {len(v)} | {hv['mean_hypervolume'][a]:.3f} ({per}) | "
                      f"{'-' if best is None else f'{best:.2f}'} ({kls}) | {minutes:.1f} |")
        md.append(f"\nlinas / nsga2 hypervolume: {hv['linas_over_nsga2']:.3f}")
    return "\n".join(md) + "\n"


def main(table: Path, parts: list[str], seeds: list[int], nsga2_evals: int, linas_evals: int, population: int,
         ratio: float, rank_nets: int, rank_items: int, rank_sizes: list[int], sequences: int, seq_len: int,
         work: Path, out_dir: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    path = out_dir / "search_efficiency.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    kept = {"ranking": "per_calibration_size", "predictor": "kendall_tau", "hv": "runs"}  # parts, by a key of theirs
    result = {"table": str(table), **{k: old[k] for k, key in kept.items()
                                      if key in old.get(k, {}) and old.get("table") == str(table)}}
    today = datetime.date.today().isoformat()
    if "ranking" in parts:
        result["ranking"] = {"date": today, **ranking(table, rank_nets, rank_items, rank_sizes, seq_len, work)}
    if "hv" in parts:
        result["hv"] = {"date": today, **hv_runs(table, seeds, nsga2_evals, linas_evals, population, ratio,
                                                 sequences, seq_len, work, result.get("hv", {}))}
    if "predictor" in parts:
        result["predictor"] = {"date": today, **predictor_study(work)}
    atomic_write_json(path, result)
    atomic_write_text(out_dir / "search_efficiency.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--parts", nargs="+", choices=["ranking", "hv", "predictor"], default=["ranking", "hv", "predictor"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nsga2-evals", type=int, default=250)
    p.add_argument("--linas-evals", type=int, default=80)
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--latency-ratio", type=float, default=0.8)
    p.add_argument("--rank-nets", type=int, default=20)
    p.add_argument("--rank-items", type=int, default=100, help="lm-eval items per task (default 100)")
    p.add_argument("--rank-sizes", type=int, nargs="+", default=[8, 32],
                   help="calibration sequences compared; the first is the search's (default 8 32)")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--work", type=Path, default=Path("runs/search_efficiency"))
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    a = p.parse_args()
    main(a.table, a.parts, a.seeds, a.nsga2_evals, a.linas_evals, a.population, a.latency_ratio, a.rank_nets,
         a.rank_items, a.rank_sizes, a.sequences, a.seq_len, a.work, a.out_dir)
