"""hwnas against pruning baselines at the same latency targets: accuracy, measured latency and size, side by side.

For each latency ratio (of the full model's predicted decode latency on the onnxruntime int8 table):
the hwnas search's winner within the ratio (`hwnas search`, the `hwnas run` choice: the best of each depth by
KL, re-scored by the selection metric, by default the answer NLL on held-out multiple-choice questions; see
hwnas.selection) and
each baseline of `hwnas baseline` (layer-drop, width-uniform, random with the search's evaluation
budget), plus hwnas's winner alone at each of --front-ratios (default 0.6 and 0.5), so that its front
reaches down to the fastest baseline point. Every sub-network and the full model are deployed as
onnxruntime int8 (`hwnas quantize --method ort-int8`), evaluated in that runtime with lm-eval on the same
task items (`hwnas evaluate`), and benchmarked together in one interleaved `hwnas benchmark` run. Steps already done under --work
are reused, so an interrupted comparison resumes.

The verdicts compare hwnas with each baseline at each ratio (mean accuracy, with the standard error of the
difference taken item by item, since every model answers the same items), and ask of every baseline point
whether a point of hwnas's front dominates it, in measured and in predicted decode.
Writes benchmarks/results/compare.{json,md,png}:

    .venv/bin/python benchmarks/compare.py                        (about an hour on 2 cores)
    .venv/bin/python benchmarks/compare.py --ratios 0.8 --limit 50    (a quick look)

A gap smaller than the paired standard error (about 1.2 points at 300 items) is undecided. `--confirm A B --ratio
R` takes two rows of a finished compare.json at ratio R, deploys them as above and evaluates both on the first
--items items of each task (a superset of the comparison's), writing benchmarks/results/confirm_A_B_R.{json,md}:

    .venv/bin/python benchmarks/compare.py --confirm hwnas layer-drop --ratio 0.7 --items 1500

`--heal-tokens N` compares at equal healing too: hwnas's networks (its front points included), layer-drop's and
width-uniform's (--heal-methods: random too) are each healed by the same `hwnas heal` call (N tokens of the same
text, the same settings) from the model they were cut from, then deployed and evaluated as above; the report puts
each network's unhealed and healed accuracy side by side, with the paired standard error of healed hwnas minus each
healed baseline. A healed network keeps its unhealed twin's shape, so it keeps its measured latency. `--supernet DIR`
adds a row for the search over a `hwnas train-supernet` folder (`hwnas run --supernet`), healed the same way:

    .venv/bin/python benchmarks/compare.py --heal-tokens 140000 --supernet runs/supernet
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import shlex
import sys
from pathlib import Path

import hwnas
from hwnas.common import HwnasError, atomic_write_json, atomic_write_text, home, read_json
from hwnas.data import CALIBRATION_SOURCES, report_limit
from hwnas.loading import DEFAULT_MODEL, read_llama_config, resolve_model
from hwnas.lmeval import headline, paired_difference
from hwnas.selection import ITEMS as SELECT_ITEMS, METRICS
from hwnas.supernet import Calibration, recorded_calibration

hwnas.point_library_caches()  # library caches stay inside the project

BASELINES = ("layer-drop", "width-uniform", "random")
SUPERNET = "hwnas-supernet"  # the search over a trained supernet folder (--supernet)
HEAL_METHODS = ("hwnas", "layer-drop", "width-uniform")  # what --heal-tokens heals unless --heal-methods says


def this_device_table(model: str) -> Path:
    """The shipped onnxruntime int8 table of `model` for this machine's device id."""
    from hwnas import runner
    from hwnas.tables import find_table, model_label

    cpu = runner.cpu_info()
    device = runner.device_id(cpu, cpu["cores"])
    table = find_table(model_label(model, resolve_model(model)), device, "onnxruntime", "int8")
    if table is None:
        raise SystemExit(f"no shipped onnxruntime int8 table of {model} for {device}; run "
                         f"`hwnas profile --model {model} --runtime onnxruntime --precision int8` or pass --table")
    return table


def candidates(model: str, table: Path, ratios: list[float], front_ratios: list[float], evaluations: int,
               population: int, seed: int, work: Path, select_metric: str = "choice-nll",
               calibration_source: str = "mixed") -> list[dict]:
    """Every method's sub-network at every ratio, and hwnas's alone at each of `front_ratios` (more points of its
    front, so that every baseline point, however fast, has hwnas points to be compared with), as checkpoints under
    `work` (built unless there)."""
    from hwnas.baselines import run_baseline
    from hwnas.export import export_checkpoint
    from hwnas.pipeline import choose
    from hwnas.search import run_search

    rows = [{"method": "full", "ratio": 1.0, "kl": 0.0, "predicted_ratio": 1.0, "checkpoint": str(resolve_model(model)),
             "config": None}]
    for r in sorted({*ratios, *front_ratios}, reverse=True):
        d = work / f"ratio-{r:.2f}"
        search = d / "hwnas" / "search"
        if not (search / "summary.json").exists():
            run_search(model=model, table=str(table), algorithm="nsga2", evaluations=evaluations, population=population,
                       latency_ratio=r, seed=seed, resume=(search / "state.json").exists(), out=str(search),
                       select_metric=select_metric, calibration_source=calibration_source)
        chosen = choose(read_json(search / "pareto.json", "search front"), r)
        ckpt = d / "hwnas" / "checkpoint"
        if not ckpt.is_dir():
            export_checkpoint(model=model, subnet=search / "pareto.json", pick=chosen["index"], out=ckpt)
        rows.append({"method": "hwnas", "ratio": r, "kl": chosen["kl"], "predicted_ratio": chosen["latency_ratio"],
                     "checkpoint": str(ckpt), "config": chosen["config"]})
        for m in BASELINES if r in ratios else ():
            path = d / m / "baseline.json"
            b = read_json(path, "baseline") if path.exists() else run_baseline(
                method=m, model=model, table=table, latency_ratio=r, evaluations=evaluations, population=population,
                seed=seed, out=d / m, calibration_source=calibration_source)
            rows.append({"method": m, "ratio": r, "kl": b["kl"], "predicted_ratio": b["latency_ratio"],
                         "checkpoint": b["checkpoint"], "config": b["config"]})
    return rows


def supernet_candidates(supernet: Path, table: Path, ratios: list[float], evaluations: int, population: int,
                        seed: int, work: Path, select_metric: str, calibration_source: str) -> list[dict]:
    """The search's winner over the trained supernet folder `supernet` at every ratio, searched and exported as
    `hwnas run --supernet` does it, as checkpoints under `work` (one folder per supernet, named by its record)."""
    from hwnas.export import export_checkpoint
    from hwnas.pipeline import choose
    from hwnas.search import run_search
    from hwnas.supernet import SUPERNET_FILE

    src = resolve_model(supernet)
    if not (src / SUPERNET_FILE).is_file():
        raise HwnasError(f"--supernet {supernet} has no {SUPERNET_FILE}; expected a `hwnas train-supernet` folder")
    tag = hashlib.sha256(f"{src}\0{(src / SUPERNET_FILE).read_text()}".encode()).hexdigest()[:8]
    rows = []
    for r in sorted(ratios, reverse=True):
        d = work / f"ratio-{r:.2f}" / f"supernet-{tag}"
        search = d / "search"
        if not (search / "summary.json").exists():
            run_search(model=str(src), table=str(table), algorithm="nsga2", evaluations=evaluations,
                       population=population, latency_ratio=r, seed=seed, resume=(search / "state.json").exists(),
                       out=str(search), select_metric=select_metric, calibration_source=calibration_source)
        chosen = choose(read_json(search / "pareto.json", "search front"), r)
        if not (d / "checkpoint").is_dir():
            export_checkpoint(model=str(src), subnet=search / "pareto.json", pick=chosen["index"], out=d / "checkpoint")
        rows.append({"method": SUPERNET, "ratio": r, "kl": chosen["kl"], "predicted_ratio": chosen["latency_ratio"],
                     "checkpoint": str(d / "checkpoint"), "config": chosen["config"], "source": str(src)})
    return rows


def key(row: dict) -> str:
    """Identical sub-networks share their deployed artifact, evaluation and measurement: the same config, cut from the
    same model (a trained supernet's weights differ from the model's), healed the same way."""
    what = [row["config"] or "full", *(row[k] for k in ("source", "heal") if row.get(k))]
    return hashlib.sha256(json.dumps(what if len(what) > 1 else what[0], sort_keys=True).encode()).hexdigest()[:12]


def heal_all(rows: list[dict], model: str, tokens: int, methods: list[str], text: Path | None,
             work: Path) -> list[dict]:
    """A healed twin of every sub-network of `methods`: each healed by the same `hwnas heal` call (`tokens` tokens of
    `text`, default settings) from the model it was cut from, into work/healed (named by `key`)."""
    from hwnas.data import training_texts
    from hwnas.heal import REPORT_FILE, checkpoint_dir, heal

    corpus = training_texts(text)
    twins = []
    for row in rows:
        if row["config"] is None or row["method"] not in methods:
            continue
        twin = {**row, "heal": {"tokens": tokens, "corpus": corpus.name, "fingerprint": corpus.fingerprint},
                "unhealed": key(row)}
        ckpt = work / "healed" / key(twin)
        if not (ckpt / REPORT_FILE).is_file():
            print(f"healing {row['method']} @ {row['ratio']} on {tokens:,} tokens", file=sys.stderr, flush=True)
            heal(model=row["checkpoint"], teacher=row.get("source") or model, tokens=tokens, out=ckpt, train_text=text,
                 resume=checkpoint_dir(ckpt).exists(), overwrite=ckpt.exists())
        report = read_json(ckpt / REPORT_FILE, "heal report")
        twin.update(checkpoint=str(ckpt), heal_tokens_per_s=report["tokens_per_s"],
                    heal_minutes=report["elapsed_s"] / 60)
        twins.append(twin)
    return twins


def deploy_all(rows: list[dict], work: Path) -> dict[str, Path]:
    from hwnas.deploy import deploy

    paths = {}
    for row in rows:
        k = key(row)
        paths[k] = work / "deployed" / f"{k}-onnxruntime-int8"
        if not paths[k].is_dir():
            print(f"deploying {row['method']}{' healed' if row.get('heal') else ''} @ {row['ratio']} as onnxruntime "
                  "int8", file=sys.stderr, flush=True)
            try:
                deploy(Path(row["checkpoint"]), "onnxruntime", "int8", paths[k], progress=True)
            except HwnasError as e:  # over quantize's KL threshold: the artifact is kept, and compared as it is
                if not (paths[k] / "quantize.json").is_file():
                    raise
                print(f"warning: {e}", file=sys.stderr, flush=True)
    return paths


def evaluate_all(paths: dict[str, Path], tasks: list[str], limit: int | None, work: Path) -> dict[str, dict]:
    from hwnas.lmeval import evaluate_path

    out = {}
    for k, path in paths.items():
        f = work / "evals" / f"{k}.json"
        saved = read_json(f, "evaluation") if f.exists() else None
        if not saved or saved["tasks_requested"] != tasks or saved["limit"] != limit:
            print(f"evaluating {path.name}", file=sys.stderr, flush=True)
            saved = {"tasks_requested": tasks, **evaluate_path(path, tasks, limit=limit)}
            atomic_write_json(f, saved)
        out[k] = saved
    return out


def measure_all(paths: dict[str, Path], new_tokens: int, repeats: int, rounds: int,
                work: Path) -> tuple[dict[str, dict], dict]:
    """Every artifact in one interleaved benchmark run: ({label: entry}, the whole report)."""
    from hwnas.benchmark import benchmark

    f = work / "benchmark.json"
    labels = sorted(paths)
    report = read_json(f, "benchmark") if f.exists() else None
    asked = {"new_tokens": new_tokens, "repeats": repeats, "rounds": rounds}
    if (not report or sorted(e["label"] for e in report["models"]) != labels
            or {k: report["settings"].get(k) for k in asked} != asked):  # measured with other settings: measure again
        report = benchmark([str(paths[k]) for k in labels], labels=labels, runtime="onnxruntime", new_tokens=new_tokens,
                           repeats=repeats, rounds=rounds, out=f)
    return {e["label"]: e for e in report["models"]}, report


def mean_stderr(result: dict) -> float:
    """Standard error of the mean over tasks of their headline figures (acc_norm, else acc)."""
    ses = [headline(t)[1] for t in result["tasks"].values()]
    return math.sqrt(sum(s * s for s in ses)) / len(ses)


def dominators(point: dict, hw: list[dict], latency: str) -> list[dict]:
    """The hwnas points at least as accurate and at most as slow as `point` (`latency`: a row's key)."""
    return [h for h in hw if h["accuracy"] >= point["accuracy"] and h[latency] <= point[latency]]


def add_figures(row: dict, paths: dict[str, Path], evals: dict[str, dict], bench: dict[str, dict], full: dict,
                full_layers: int) -> None:
    """A row's accuracy, latency and size. A healed network has its unhealed twin's shape, so it takes its latency."""
    k = key(row)
    e = bench[row.get("unhealed") or k]
    row.update(artifact=str(paths[k]), layers=full_layers if row["config"] is None else len(row["config"]["layers"]),
               tasks=evals[k]["tasks"], accuracy=evals[k]["mean_acc_norm_or_acc"], accuracy_stderr=mean_stderr(evals[k]),
               decode_ms=e["decode_ms_per_token"]["median"], prefill_ms=e["prefill_ms"]["median"],
               decode_spread=e["decode_ms_per_token"]["spread"], prefill_spread=e["prefill_ms"]["spread"],
               decode_ratio=e["decode_ms_per_token"]["median"] / full["decode_ms_per_token"]["median"],
               prefill_ratio=e["prefill_ms"]["median"] / full["prefill_ms"]["median"],
               file_bytes=e["file_bytes"], size_ratio=e["file_bytes"] / full["file_bytes"],
               peak_rss_bytes=e["peak_rss_bytes"],
               int8_kl=read_json(paths[k] / "quantize.json", "quantize report")["quality"]["kl"])


def supernet_verdicts(rows: list[dict]) -> list[str]:
    """Per ratio: the search over the trained supernet against the search over the model itself (paired)."""
    out = []
    for s in (r for r in rows if r["method"] == SUPERNET):
        mine = next(x for x in rows if x["method"] == "hwnas" and x["ratio"] == s["ratio"])
        diff, se = paired_difference(s, mine)
        out.append(f"ratio {s['ratio']:.2f}: {SUPERNET} {'>=' if diff >= 0 else '<'} hwnas by {diff * 100:+.1f} points "
                   f"(±{se * 100:.1f} paired stderr), decode ratio {s['decode_ratio']:.2f} against "
                   f"{mine['decode_ratio']:.2f}")
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """Per ratio: does hwnas's accuracy reach every baseline's; is every baseline point dominated by a point of
    hwnas's front (any of its picks), in measured decode and in predicted decode. Then the fronts as a whole."""
    out = []
    hw = [r for r in rows if r["method"] == "hwnas"]
    base = [r for r in rows if r["method"] in BASELINES]
    for r in sorted({b["ratio"] for b in base}, reverse=True):
        mine = next(x for x in hw if x["ratio"] == r)
        for b in (x for x in base if x["ratio"] == r):
            if mine["config"] == b["config"]:
                out.append(f"ratio {r:.2f}: hwnas chose the same sub-network as {b['method']} (equal by construction)")
                continue
            diff, se = paired_difference(mine, b)  # the same items: their difference item by item
            dom = {k: bool(dominators(b, hw, k)) for k in ("decode_ratio", "predicted_ratio")}
            out.append(f"ratio {r:.2f}: hwnas {'>=' if diff >= 0 else '<'} {b['method']} by {diff * 100:+.1f} points "
                       f"(±{se * 100:.1f} paired stderr, {abs(diff) / se if se else math.inf:.1f} sigma); "
                       f"{b['method']}'s point dominated by an hwnas point: "
                       f"in measured decode {'yes' if dom['decode_ratio'] else 'NO'}, "
                       f"in predicted decode {'yes' if dom['predicted_ratio'] else 'NO'}")
    for k, name in (("decode_ratio", "measured"), ("predicted_ratio", "predicted")):
        left = [b for b in base if not dominators(b, hw, k)]
        out.append(f"fronts ({name} decode): hwnas's {len(hw)} points dominate "
                   + ("every baseline point" if not left else
                      f"{len(base) - len(left)} of {len(base)} baseline points; not: "
                      + ", ".join(f"{b['method']} @ {b['ratio']:.2f} ({b['accuracy'] * 100:.1f} at {b[k]:.2f})"
                                  for b in left)))
    return out


def main(model: str, table: Path, ratios: list[float], front_ratios: list[float], tasks: list[str], limit: int | None,
         evaluations: int, population: int, seed: int, new_tokens: int, repeats: int, rounds: int, work: Path,
         out_dir: Path, select_metric: str = "choice-nll", calibration_source: str = "mixed", heal_tokens: int = 0,
         heal_methods: list[str] | None = None, heal_text: Path | None = None, supernet: Path | None = None) -> dict:
    if select_metric == "task-nll" and (limit is None or limit > report_limit(SELECT_ITEMS)):
        sys.exit(f"--select-metric task-nll chooses on the last {SELECT_ITEMS} validation questions of each task: the "
                 f"report must score at most the first {report_limit(SELECT_ITEMS)} of each, got --limit {limit}")
    work.mkdir(parents=True, exist_ok=True)
    # the table's bytes too: a re-profiled table (same path) must not reuse searches made with the old one
    args = {"model": model, "table": str(Path(table).resolve()),
            "table_sha256": hashlib.sha256(Path(table).read_bytes()).hexdigest()[:16], "evaluations": evaluations,
            "population": population, "seed": seed, "select_metric": select_metric,
            "calibration": Calibration(source=calibration_source).key()}  # checkpoints are keyed by config only
    if (work / "args.json").exists() and read_json(work / "args.json", "comparison arguments") != args:
        sys.exit(f"{work} holds a comparison made with {read_json(work / 'args.json')}, not {args}; choose another --work")
    atomic_write_json(work / "args.json", args)
    heal_methods = list(heal_methods or (*HEAL_METHODS, *([SUPERNET] if supernet else [])))
    if heal_tokens < 0 or (heal_tokens and "hwnas" not in heal_methods):
        sys.exit(f"--heal-tokens must be 0 or positive ({heal_tokens}), and --heal-methods must include hwnas "
                 f"({heal_methods}): the healed verdicts compare with it")
    rows = candidates(model, table, ratios, front_ratios, evaluations, population, seed, work, select_metric,
                      calibration_source)
    if supernet is not None:
        rows += supernet_candidates(supernet, table, ratios, evaluations, population, seed, work, select_metric,
                                    calibration_source)
    twins = heal_all(rows, model, heal_tokens, heal_methods, heal_text, work) if heal_tokens else []
    paths = deploy_all(rows + twins, work)
    evals = evaluate_all(paths, tasks, limit, work)
    bench, report = measure_all({key(r): paths[key(r)] for r in rows}, new_tokens, repeats, rounds, work)
    full_key = key(rows[0])
    full_layers = read_llama_config(resolve_model(model))["num_hidden_layers"]
    for row in rows + twins:
        add_figures(row, paths, evals, bench, bench[full_key], full_layers)
    for twin in twins:  # what healing gave each network, item by item
        twin["gain"], twin["gain_stderr"] = paired_difference(twin, next(r for r in rows if key(r) == twin["unhealed"]))
    result = {"date": datetime.date.today().isoformat(),
              "command": "python benchmarks/compare.py " + shlex.join(sys.argv[1:]), "model": model,
              "table": str(table), "deployed_as": "onnxruntime int8 (hwnas quantize --method ort-int8)",
              "tasks": tasks, "limit": limit, "items": {t: v["n"] for t, v in evals[full_key]["tasks"].items()},
              "search_evaluations": evaluations, "select_metric": select_metric, "calibration": args["calibration"],
              "device": report["device"],
              "settings": report["settings"],
              "lm_eval_version": evals[full_key]["lm_eval_version"], "rows": rows}
    result["verdicts"] = verdicts(rows) + supernet_verdicts(rows)
    if twins:
        first = twins[0]["heal"]
        result["heal"] = {"tokens": heal_tokens, "corpus": first["corpus"], "corpus_fingerprint": first["fingerprint"],
                          "methods": heal_methods, "settings": "hwnas heal defaults (full-parameter, KL on logits)",
                          "latency": "each healed network's is its unhealed twin's (the same shape)"}
        result["healed_rows"] = twins
        result["healed_verdicts"] = verdicts(twins) + supernet_verdicts(twins)
    for row in rows + twins:  # the item-by-item scores stay in the work folder's evaluations
        row["tasks"] = {t: {k: v for k, v in r.items() if k != "scores"} for t, r in row["tasks"].items()}
    atomic_write_json(out_dir / "compare.json", result)
    md = markdown(result)
    atomic_write_text(out_dir / "compare.md", md)
    plot(result, out_dir / "compare.png")
    print(md)
    return result


def markdown(result: dict) -> str:
    tasks = result["tasks"]
    items = ", ".join(f"{t} {n}" for t, n in result["items"].items())
    s = result["settings"]
    lines = [f"hwnas against pruning baselines, {result['model']} deployed as {result['deployed_as']} "
             f"({result['date']}, `{result['command']}`)", "",
             f"Accuracy: lm-eval {result['lm_eval_version']}, zero-shot, items per task: {items}; acc_norm for ARC, PIQA "
             "and HellaSwag, acc for LAMBADA; ± is the standard error. Mean: the mean of those. Latency: measured decode "
             f"ms/token and prefill of a {s['prompt_tokens']}-token prompt, medians of {s['rounds']} interleaved rounds "
             f"of {s['repeats']} runs, all models in one run; ratios are to the full int8 model; spread: (max - min) / median "
             "of a model's round medians, how much the machine disturbed its rounds. Target: the ratio of the "
             f"full model's predicted decode latency; search and random get {result['search_evaluations']} real quality "
             "evaluations each; hwnas's winner is chosen by "
             f"{result.get('select_metric', 'lastword-nll')} (hwnas.selection); importance order and KL on "
             f"{recorded_calibration(result).key()}.", "",
             "| target | method | layers | KL | " + " | ".join(tasks) + " | mean | decode ratio (pred.) | decode ms "
             "(spread) | prefill ratio (spread) | size MB |",
             "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|"]
    for r in result["rows"]:
        acc = []
        for t in tasks:
            a, se = headline(r["tasks"][t])
            acc.append(f"{a * 100:.1f} ± {se * 100:.1f}")
        target = "full" if r["method"] == "full" else f"{r['ratio']:.2f}"
        lines.append(f"| {target} | {r['method']} | {r['layers']} | {r['kl']:.2f} | " + " | ".join(acc)
                     + f" | **{r['accuracy'] * 100:.1f}** ± {r['accuracy_stderr'] * 100:.1f} | {r['decode_ratio']:.2f} "
                     f"({r['predicted_ratio']:.2f}) | {r['decode_ms']:.2f} ({r['decode_spread']:.0%}) | "
                     f"{r['prefill_ratio']:.2f} ({r['prefill_spread']:.0%}) | "
                     f"{r['file_bytes'] / 1e6:.0f} |")
    lines += ["", *[f"- {v}" for v in result["verdicts"]]]
    if result.get("healed_rows"):
        lines += ["", *healed_markdown(result)]
    return "\n".join(lines) + "\n"


def healed_markdown(result: dict) -> list[str]:
    """Each healed network beside its unhealed twin, and the verdicts at equal healing."""
    h, tasks = result["heal"], result["tasks"]
    unhealed = {(r["method"], r["ratio"]): r for r in result["rows"]}
    lines = [f"## At equal healing: {h['tokens']:,} tokens of {h['corpus']} each", "",
             f"Every network of {', '.join(h['methods'])} healed by the same `hwnas heal` call ({h['settings']}, "
             "from the model it was cut from), then deployed and evaluated as above; its latency is its unhealed "
             "twin's (the same shape). Gain: healed minus unhealed, ± the paired standard error.", "",
             "| target | method | layers | unhealed mean | healed: " + " | ".join(tasks) + " | healed mean | gain | "
             "decode ratio | int8 KL | heal min |", "|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|"]
    for r in result["healed_rows"]:
        before = unhealed[(r["method"], r["ratio"])]["accuracy"]
        acc = [f"{headline(r['tasks'][t])[0] * 100:.1f}" for t in tasks]
        lines.append(f"| {r['ratio']:.2f} | {r['method']} | {r['layers']} | {before * 100:.1f} | " + " | ".join(acc)
                     + f" | **{r['accuracy'] * 100:.1f}** ± {r['accuracy_stderr'] * 100:.1f} | "
                     f"{r['gain'] * 100:+.1f} ± {r['gain_stderr'] * 100:.1f} | {r['decode_ratio']:.2f} | "
                     f"{r['int8_kl']:.3f} | {r['heal_minutes']:.1f} |")
    return lines + ["", *[f"- healed: {v}" for v in result["healed_verdicts"]]]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"hwnas": ("o", "C3"), "layer-drop": ("s", "C0"), "width-uniform": ("^", "C2"), "random": ("x", "C7"),
              SUPERNET: ("D", "C1"), "full": ("*", "k")}
    healed = result.get("healed_rows", [])
    for m, (marker, color) in styles.items():
        for rows, label in ((result["rows"], m), (healed, f"{m} healed")):
            pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["decode_ms"])
            if not pts:
                continue
            x, y = [r["decode_ms"] for r in pts], [r["accuracy"] * 100 for r in pts]
            ax.errorbar(x, y, yerr=[r["accuracy_stderr"] * 100 for r in pts], marker=marker, color=color, label=label,
                        linestyle="none" if m == "full" else "--" if rows is healed else "-",
                        markersize=12 if m == "full" else 7, capsize=3, mfc="none" if rows is healed else color,
                        zorder=3 if m == "hwnas" else 2)  # on top where hwnas chose a baseline's network: both show
    ax.set_xlabel("measured decode latency, ms/token (onnxruntime int8)")
    ax.set_ylabel("mean accuracy, % (" + ", ".join(result["tasks"]) + ")")
    healing = f", healed: {result['heal']['tokens']:,} tokens each" if healed else ""
    ax.set_title(f"{result['model']}: accuracy against measured latency ({result['date']}{healing})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8 if healed else None)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def row_of(compare: dict, method: str, ratio: float) -> dict:
    """The row of compare.json that holds `method`'s sub-network at `ratio`."""
    rows = [r for r in compare["rows"] if r["method"] == method and abs(r["ratio"] - ratio) < 1e-9]
    if not rows or rows[0]["config"] is None:
        have = sorted({(r["method"], r["ratio"]) for r in compare["rows"] if r["config"] is not None})
        raise HwnasError(f"compare.json has no sub-network of {method!r} at ratio {ratio}; it has {have}")
    return rows[0]


def confirm_checkpoint(model: str, row: dict, work: Path, calibration: Calibration) -> Path:
    """The standalone checkpoint of `row`'s sub-network (built unless there), named by `key`, its channels in
    `calibration`'s importance order."""
    from hwnas.export import export_checkpoint
    from hwnas.supernet import Supernet

    ckpt = work / "checkpoints" / key(row)
    if not ckpt.is_dir():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(ckpt.with_suffix(".json"), row["config"])
        export_checkpoint(model=model, subnet=ckpt.with_suffix(".json"), out=ckpt,
                          supernet=Supernet.from_pretrained(model, calibration=calibration))
    return ckpt


def confirm(compare_json: Path, ratio: float, methods: list[str], tasks: list[str], items: int, work: Path,
            out_dir: Path) -> dict:
    """A closer look at one verdict: two sub-networks of a finished comparison at one ratio, deployed as the
    comparison deployed them and evaluated on the first `items` items of each task (a superset of its items),
    their difference taken item by item. Writes confirm_<a>_<b>_<ratio>.{json,md} into `out_dir`."""
    if len(methods) != 2:
        raise HwnasError(f"--confirm takes two methods to compare, got {methods}")
    if SUPERNET in methods:
        raise HwnasError(f"--confirm re-exports sub-networks of the comparison's model; {SUPERNET}'s come from a "
                         "supernet folder: compare two of hwnas, " + ", ".join(BASELINES))
    compare = read_json(compare_json, "comparison")
    rows = [row_of(compare, m, ratio) for m in methods]
    calibration = recorded_calibration(compare)
    work = work / calibration.key()  # artifacts are named by config: one folder per channel order
    rows = [{**r, "checkpoint": str(confirm_checkpoint(compare["model"], r, work, calibration))} for r in rows]
    evals = evaluate_all(deploy_all(rows, work), tasks, items, work)
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
              "compare": str(compare_json), "compare_limit": compare["limit"], "ratio": ratio, "limit": items,
              "items": {t: r["n"] for t, r in results[a]["tasks"].items()},
              "results": {m: {k: v for k, v in r.items() if k != "tasks"} | {"tasks": {
                  t: {k: v for k, v in x.items() if k != "scores"} for t, x in r["tasks"].items()}}
                  for m, r in results.items()},
              "difference": diff, "difference_stderr": se, "difference_at_compare_limit": at_compare}
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"confirm_{a}_{b}_{ratio:.2f}"
    atomic_write_json(out_dir / f"{stem}.json", report)
    atomic_write_text(out_dir / f"{stem}.md", confirm_markdown(report, a, b))
    return report


def confirm_markdown(r: dict, a: str, b: str) -> str:
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--table", type=Path, default=None,
                   help="onnxruntime int8 latency table (default: the one shipped for this device)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    p.add_argument("--front-ratios", type=float, nargs="*", default=[0.6, 0.5],
                   help="more hwnas points, without baselines, for the fronts' comparison")
    p.add_argument("--tasks", default="arc_easy,piqa,hellaswag,lambada")
    p.add_argument("--limit", type=int, default=300, help="items per task (default 300)")
    p.add_argument("--evaluations", type=int, default=60, help="real quality evaluations of the search and of random")
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--select-metric", default="choice-nll", choices=list(METRICS),
                   help="how the search chooses its winner (hwnas.selection)")
    p.add_argument("--calibration-source", default="mixed", choices=list(CALIBRATION_SOURCES),
                   help="text of the importance order (search, layer-drop, width-uniform) and of the KL")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median rejects up to 3 disturbed ones")
    p.add_argument("--work", type=Path, default=None, help="working folder (default .cache/hwnas/compare, "
                   "with --confirm .cache/hwnas/confirm)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--heal-tokens", type=int, default=0,
                   help="heal every network of --heal-methods on this many tokens (the same heal) and compare them "
                        "healed too (default 0: no healing)")
    p.add_argument("--heal-methods", nargs="+", default=None, choices=["hwnas", *BASELINES, SUPERNET],
                   help="the methods whose networks are healed (default: hwnas layer-drop width-uniform, and "
                        f"{SUPERNET} with --supernet)")
    p.add_argument("--heal-text", type=Path, default=None, help="training text of the heal (default: heal's corpus)")
    p.add_argument("--supernet", type=Path, default=None,
                   help=f"a `hwnas train-supernet` folder of --model: adds the search over it as the {SUPERNET} row")
    g = p.add_argument_group("a closer look at one verdict (instead of the comparison)")
    g.add_argument("--confirm", nargs=2, metavar=("A", "B"), default=None,
                   help="two methods of --compare-json: evaluate their sub-networks at --ratio again on --items items "
                        "per task and report their paired difference (confirm_A_B_RATIO.{json,md})")
    g.add_argument("--ratio", type=float, default=None, help="latency ratio of the two sub-networks (with --confirm)")
    g.add_argument("--items", type=int, default=1500, help="items per task with --confirm, the first ones of each "
                   "task's scored split (default 1500)")
    g.add_argument("--compare-json", type=Path, default=Path("benchmarks/results/compare.json"),
                   help="the comparison whose sub-networks --confirm takes (default benchmarks/results/compare.json)")
    a = p.parse_args()
    if a.confirm is not None or a.ratio is not None:
        if a.confirm is None or a.ratio is None:
            p.error("--confirm A B and --ratio R go together")
        try:
            rep = confirm(a.compare_json, a.ratio, a.confirm, a.tasks.split(","), a.items, a.work or home() / "confirm",
                          a.out_dir)
        except HwnasError as e:
            sys.exit(f"error: {e}")
        print(confirm_markdown(rep, *a.confirm))
    else:
        main(a.model, a.table or this_device_table(a.model), a.ratios, a.front_ratios, a.tasks.split(","), a.limit,
             a.evaluations, a.population, a.seed, a.new_tokens, a.repeats, a.rounds, a.work or home() / "compare",
             a.out_dir, a.select_metric, a.calibration_source, a.heal_tokens, a.heal_methods, a.heal_text, a.supernet)
