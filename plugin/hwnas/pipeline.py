"""`hwnas run`: the whole chain on this device, from a pretrained Llama to a benchmarked, evaluated deployment.

    latency table (shipped if it matches this device, else profiled) -> search -> best sub-network under
    the latency budget -> checkpoint -> ONNX / OpenVINO -> quantization -> benchmark against the full model
    in the same runtime and precision -> held-out quality of both -> report.md + report.json

Every step writes its output atomically into the run folder; `--resume` reuses the finished ones.
"""
from __future__ import annotations

import logging
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .common import HwnasError, atomic_dir, atomic_write_json, atomic_write_text, read_json
from .loading import DEFAULT_MODEL

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    evaluations: int  # real quality evaluations of the search
    population: int
    perplexity_passages: int  # held-out LAMBADA validation passages
    tasks: tuple[str, ...]  # lm-eval tasks of the accuracy sample (hwnas evaluate)
    task_items: int  # items per task
    new_tokens: int  # decoded tokens per benchmark run
    rounds: int  # interleaved benchmark rounds


BUDGETS = {
    "quick": Budget(evaluations=60, population=12, perplexity_passages=100, tasks=("lambada", "arc_easy", "piqa"),
                    task_items=100, new_tokens=32, rounds=3),
    "full": Budget(evaluations=200, population=20, perplexity_passages=400,
                   tasks=("lambada", "arc_easy", "piqa", "hellaswag"), task_items=500, new_tokens=64, rounds=5),
}
# The quantization method that deploys a latency table's runtime/precision (the table was measured with the same settings).
DEPLOY_METHODS = {("onnxruntime", "int8"): "ort-int8", ("onnxruntime", "int8-wo"): "ort-int8-wo",
                  ("openvino", "int8"): "ov-int8", ("openvino", "int4"): "ov-int4"}
TARGETS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), *DEPLOY_METHODS]
# `hwnas run`'s precision when none is given. onnxruntime: weight-only int8 with fused attention, which on the
# default model (2026-11-30) loses KL 0.008 where dynamic int8 loses 0.59, and decodes faster.
DEFAULT_PRECISION = {"onnxruntime": "int8-wo", "openvino": "int8", "torch": "fp32"}


def find_table(model_label: str, device_id: str, runtime: str, precision: str) -> Path | None:
    """The shipped latency table of this model, device, runtime and precision, if there is one."""
    from .latency import shipped_tables_dir, table_name

    path = shipped_tables_dir() / table_name(model_label, device_id, runtime, precision)
    return path if path.is_file() else None


def check_table(table: Path, *, signature: dict[str, int], runtime: str, precision: str, device_id: str,
                isa: str) -> dict[str, Any]:
    """Refuse a table that does not describe this deployment: model shape, runtime, precision, device, quantization."""
    from .predictor import LatencyTable
    from .quantize import settings_for

    t = LatencyTable.load(table)
    t.check_model(signature)
    t.check_target(runtime=runtime, precision=precision, device_id=device_id)
    want = settings_for(runtime, precision, isa) if runtime != "torch" else {}
    have = t.header.get("quantization", {})
    if have != want:
        raise HwnasError(f"{table} was measured with quantization {have}, but this device deploys {want}; "
                         "profile again (hwnas profile) so that the table describes the deployed model")
    return t.header


def deploy(src: Path, runtime: str, precision: str, out: Path, *, progress: bool, fused_attention: bool = False) -> Path:
    """Build the deployed artifact of checkpoint `src` for `runtime`/`precision` in `out` (returned).

    `fused_attention`: an onnxruntime fp32 export gets onnxruntime's fused attention (as the quantized target of
    the same run does, so that the fp32 reference differs from it only by the quantization)."""
    if runtime == "torch":
        if precision != "fp32":
            raise HwnasError(f"torch deployment is fp32 here, got {precision!r}; use onnxruntime or openvino for int8/int4")
        return src
    if precision == "fp32":
        from .export import export_onnx_checkpoint, export_openvino
        from .loading import load_model

        if runtime == "onnxruntime":
            export_onnx_checkpoint(model=src, out=out, fused_attention=fused_attention)
            return out
        model, tok = load_model(src, allow_subnet=True)
        with atomic_dir(out) as tmp:
            export_openvino(model, tmp)
            if tok is not None:
                tok.save_pretrained(tmp)
        return out
    from .quantize import quantize_model

    quantize_model(src, DEPLOY_METHODS[(runtime, precision)], out, progress=progress)
    return out


def evaluate_quality(path: Path, budget: Budget, *, progress: bool) -> dict[str, Any]:
    """Held-out perplexity (LAMBADA validation passages) and lm-eval accuracy on a task sample, in the artifact's runtime."""
    from .data import lambada_texts
    from .metrics import perplexity
    from .loading import load_artifact
    from .lmeval import evaluate_model

    model, tok, kind = load_artifact(path)
    if tok is None:
        raise HwnasError(f"{path} has no tokenizer; evaluation needs one")
    ppl = perplexity(model, tok, lambada_texts("validation", budget.perplexity_passages), progress=progress)
    acc = evaluate_model(model, tok, budget.tasks, limit=budget.task_items, progress=progress)
    return {"runtime": kind, "perplexity": ppl, "accuracy": acc}


def run(*, model: str = DEFAULT_MODEL, runtime: str = "onnxruntime", precision: str | None = None,
        latency_ratio: float = 0.75, budget: str = "quick", phase: str = "decode", table: str | Path | None = None,
        seed: int = 0, threads: int | None = None, resume: bool = False, out: str | Path,
        calibration_source: str = "mixed", progress: bool = True) -> dict[str, Any]:
    """Search, deploy, benchmark and evaluate the best sub-network of `model` under `latency_ratio` of the full model.

    `precision` defaults to the runtime's best target here (DEFAULT_PRECISION). `calibration_source` goes to the
    search, which records it (a resumed search refuses another) as its pareto.json does for the export."""
    from . import runner
    from .loading import read_llama_config, resolve_model
    from .latency import model_label, model_signature

    precision = precision or DEFAULT_PRECISION.get(runtime, "fp32")
    if (runtime, precision) not in TARGETS:
        raise HwnasError(f"cannot deploy {runtime}/{precision}; expected one of {[f'{r}/{p}' for r, p in TARGETS]}")
    if budget not in BUDGETS:
        raise HwnasError(f"unknown budget {budget!r}; expected one of {list(BUDGETS)}")
    if not 0 < latency_ratio <= 1:
        raise HwnasError(f"--latency-ratio must be in (0, 1], got {latency_ratio}")
    b = BUDGETS[budget]
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise HwnasError(f"{out} is not empty; pass --resume to continue that run, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(model)
    config = read_llama_config(model_dir)
    cpu = runner.cpu_info()
    device_id = runner.device_id(cpu, threads or cpu["cores"])
    label = model_label(model, model_dir)
    args = {"model": model, "runtime": runtime, "precision": precision, "latency_ratio": latency_ratio, "budget": budget,
            "phase": phase, "seed": seed, "threads": threads, "table": None if table is None else str(Path(table).resolve())}
    saved = out / "run_args.json"
    before = read_json(saved, "run arguments") if saved.exists() else args
    diff = {k: (before.get(k), args.get(k)) for k in {**before, **args} if before.get(k) != args.get(k)}
    if diff:  # (an argument a run from an older hwnas did not record reads as its default, None)
        raise HwnasError(f"cannot resume {out}: arguments differ from the saved run (saved, now): {diff}")
    atomic_write_json(saved, args)
    step = _stepper(out, progress)

    # 1. latency table: this device's, for this runtime and precision
    if table is None:
        table = find_table(label, device_id, runtime, precision)
        if table is None:
            from .latency import profile

            table = out / "latency_table.json"
            if not (table.exists() and read_json(table, "latency table")["header"].get("complete")):
                logger.warning("no shipped table for %s on %s (%s/%s): profiling this device", label, device_id, runtime,
                               precision)
                profile(model=model, runtime=runtime, precision=precision, threads=threads, out=table, resume=table.exists(),
                        progress=progress)
    table = Path(table)
    header = check_table(table, signature=model_signature(config), runtime=runtime, precision=precision,
                         device_id=device_id, isa=cpu["isa"])

    # 2. search, 3. the most accurate front member under the budget, as a checkpoint
    search_dir = out / "search"

    def search() -> None:
        from .search import run_search

        run_search(model=model, table=str(table), evaluations=b.evaluations, population=b.population,
                   latency_ratio=latency_ratio, phase=phase, seed=seed, resume=(search_dir / "state.pkl").exists(),
                   out=str(search_dir), calibration_source=calibration_source, progress=progress)

    step("search", search_dir / "summary.json", search)
    chosen = _choose(read_json(search_dir / "pareto.json", "search front"), latency_ratio)
    subnet_dir = out / "subnet"

    def export() -> None:
        from .export import export_checkpoint

        export_checkpoint(model=model, subnet=search_dir / "pareto.json", pick=chosen["index"], out=subnet_dir)

    step("export", subnet_dir / "hwnas_export.json", export)

    # 4. deployed artifacts: full and sub-network at the target precision, and the full model in fp32 as reference
    deployed = out / "deployed"
    arts = {"full_fp32": (model_dir, "fp32"), "full": (model_dir, precision), "subnet": (subnet_dir, precision)}
    fused = bool(header.get("quantization", {}).get("fused_attention", False))  # what the table was measured with
    if precision == "fp32":
        del arts["full_fp32"]
    paths: dict[str, Path] = {}
    for name, (src, prec) in arts.items():
        target = deployed / f"{name}-{runtime}-{prec}" if runtime != "torch" else src
        paths[name] = target
        if runtime != "torch":
            step(f"deploy {name}", target, lambda s=src, p=prec, t=target: deploy(s, runtime, p, t, progress=progress,
                                                                                 fused_attention=fused))

    # 5. benchmark side by side, 6. quality of what ships
    def bench() -> None:
        from .benchmark import benchmark

        benchmark([str(p) for p in paths.values()], labels=list(paths), runtime=runtime, threads=threads,
                  new_tokens=b.new_tokens, rounds=b.rounds, out=out / "benchmark.json", progress=progress)

    step("benchmark", out / "benchmark.json", bench)
    quality_path = out / "quality.json"
    quality = read_json(quality_path, "quality") if quality_path.exists() else {}
    for name in ("full", "subnet"):
        if "accuracy" not in quality.get(name, {}):  # (a run from before lm-eval has perplexity and LAMBADA only)
            logger.warning("evaluating %s", name)
            quality[name] = evaluate_quality(paths[name], b, progress=progress)
            atomic_write_json(quality_path, quality)

    report = _report(out, args, b, table, header, chosen, paths, read_json(out / "benchmark.json", "benchmark"), quality)
    return {"out": str(out), "report": str(out / "report.md"), **report["headline"]}


def _stepper(out: Path, progress: bool) -> Callable[[str, Path, Callable[[], Any]], None]:
    def step(name: str, done: Path, fn: Callable[[], Any]) -> None:
        if done.exists():
            logger.warning("%s: reusing %s", name, done.relative_to(out))
            return
        if progress:
            print(f"hwnas run: {name}", flush=True)
        fn()

    return step


def _choose(pareto: dict[str, Any], latency_ratio: float) -> dict[str, Any]:
    """The search's selected winner (`hwnas.selection`), else the lowest-KL member of the front, within the
    latency ratio (the search's constraint, checked again); `index` is None for the selected one."""
    sel = pareto.get("selected")
    if sel is not None and sel["latency_ratio"] <= latency_ratio + 1e-9:
        return dict(sel, index=None)
    members = [dict(m, index=i) for i, m in enumerate(pareto["front"]) if m["latency_ratio"] <= latency_ratio + 1e-9]
    if not members:
        raise HwnasError(f"the search found no sub-network within {latency_ratio} of the full model's latency")
    return min(members, key=lambda m: m["kl"])


def _figures(entry: dict[str, Any]) -> dict[str, Any]:
    """The medians of one benchmarked model (hwnas.benchmark's entry)."""
    keys = ("prefill_ms", "ttft_ms", "decode_ms_per_token")
    return {**{k: entry[k]["median"] for k in keys}, "decode_spread": entry["decode_ms_per_token"]["spread"],
            **{k: entry[k] for k in ("tokens_per_s", "peak_rss_bytes", "file_bytes", "decode_floor_ms", "decode_vs_floor")}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _report(out: Path, args: dict[str, Any], budget: Budget, table: Path, header: dict[str, Any], chosen: dict[str, Any],
            paths: dict[str, Path], bench: dict[str, Any], quality: dict[str, Any]) -> dict[str, Any]:
    m = {e["label"]: _figures(e) for e in bench["models"]}
    sub, full = m["subnet"], m["full"]
    ref = m.get("full_fp32", full)
    export = read_json(out / "subnet" / "hwnas_export.json", "export report")
    q_full, q_sub = quality["full"], quality["subnet"]
    headline = {
        "decode_speedup_vs_full": _ratio(full["decode_ms_per_token"], sub["decode_ms_per_token"]),
        "predicted_latency_ratio": chosen["latency_ratio"],
        "prefill_speedup_vs_full": _ratio(full["prefill_ms"], sub["prefill_ms"]),
        "size_ratio_vs_full": _ratio(sub["file_bytes"], full["file_bytes"]),
        "decode_speedup_vs_full_fp32": _ratio(ref["decode_ms_per_token"], sub["decode_ms_per_token"]),
        "smaller_than_full_fp32": _ratio(ref["file_bytes"], sub["file_bytes"]),
        "kl_to_full": chosen["kl"],
        "fused_attention": bool(header.get("quantization", {}).get("fused_attention", False)),
        "perplexity": {"full": q_full["perplexity"]["perplexity"], "subnet": q_sub["perplexity"]["perplexity"]},
        "mean_accuracy": {"full": q_full["accuracy"]["mean_acc_norm_or_acc"],
                          "subnet": q_sub["accuracy"]["mean_acc_norm_or_acc"]},
    }
    report = {"args": args, "budget": asdict(budget), "table": str(table), "device": header["device"],
              "chosen": chosen, "parameters": {"subnet": export["parameters"], "full": export["full_parameters"]},
              "artifacts": {k: str(v) for k, v in paths.items()}, "benchmark": m, "quality": quality, "headline": headline}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", _markdown(out, report, table) + "\n## Benchmark details\n\n" + bench["markdown"])
    return report


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _markdown(out: Path, r: dict[str, Any], table: Path) -> str:
    a, h, c = r["args"], r["headline"], r["chosen"]
    cfg = c["config"]
    fp32 = [i for i, d in zip(cfg["layers"], cfg.get("fp32_down", [])) if d]
    q = r["quality"]
    tasks = list(q["full"]["accuracy"]["tasks"])
    lines = [
        f"# hwnas run: {a['model']} on {r['device'].get('name', r['device']['id'])} ({a['runtime']} {a['precision']})",
        "",
        f"Budget `{a['budget']}`: {r['budget']['evaluations']} real quality evaluations; latency target "
        f"{a['latency_ratio']} x the full model's predicted {a['phase']} latency (table `{table.name}`).",
        "",
        "![Pareto front](search/pareto.png)",
        "",
        "## Chosen sub-network",
        f"- {len(cfg['layers'])} of {cfg['num_layers']} layers (kept: {cfg['layers']})",
        f"- MLP widths: {cfg['mlp']}",
        f"- query heads: {cfg['heads']}; KV heads: {cfg['kv_heads']}",
        *([f"- down_proj kept fp32 (the rest int8) in layers {fp32}"] if fp32 else []),
        f"- parameters: {r['parameters']['subnet']:,} of {r['parameters']['full']:,} "
        f"({r['parameters']['subnet'] / r['parameters']['full']:.1%})",
        f"- calibration KL to the full model: {c['kl']:.3f}; predicted latency ratio: {c['latency_ratio']:.3f}",
        *([f"- chosen ({c.get('candidate', 'lowest KL of its depth')}) among the best of each depth and the "
           f"layer-drop and width-uniform networks by {c['selected_by']}: {c['nll']:.3f}"] if "nll" in c else []),
        "",
        "## Measured on this device",
        "",
        f"| model | prefill ms | decode ms/token | tokens/s | TTFT ms | peak RSS MB | file MB | perplexity | "
        f"{' | '.join(tasks)} | mean acc |",
        "|---|---|---|---|---|---|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for name, row in r["benchmark"].items():
        qq = q.get(name)
        ppl = _fmt(qq["perplexity"]["perplexity"], ".1f") if qq else "-"
        accs = [_acc(qq["accuracy"]["tasks"][t]) if qq else "-" for t in tasks]
        mean = f"{qq['accuracy']['mean_acc_norm_or_acc']:.3f}" if qq else "-"
        lines.append(f"| {name} ({Path(r['artifacts'][name]).name}) | {_fmt(row['prefill_ms'], '.1f')} | "
                     f"{_fmt(row['decode_ms_per_token'], '.2f')} | {_fmt(row['tokens_per_s'], '.1f')} | "
                     f"{_fmt(row['ttft_ms'], '.1f')} | {_fmt(row['peak_rss_bytes'] / 1e6, '.0f')} | "
                     f"{_fmt(row['file_bytes'] / 1e6, '.1f')} | {ppl} | {' | '.join(accs)} | {mean} |")
    n_ppl = q["full"]["perplexity"]["passages"]
    items = ", ".join(f"{t} {v['n']}" for t, v in q["full"]["accuracy"]["tasks"].items())
    lines += [
        "",
        f"- decode: **{_fmt(h['decode_speedup_vs_full'])}x** faster than the full model in the same runtime and precision "
        f"(predicted {1 / c['latency_ratio']:.2f}x); prefill {_fmt(h['prefill_speedup_vs_full'])}x.",
        f"- size: {_fmt(h['size_ratio_vs_full'])} of the full model's at the same precision.",
        f"- whole stack against the full fp32 model in {a['runtime']}"
        f"{' (fused attention in both)' if h.get('fused_attention') else ''}: "
        f"{_fmt(h['decode_speedup_vs_full_fp32'])}x faster decode, {_fmt(h['smaller_than_full_fp32'])}x smaller.",
        f"- quality: held-out perplexity {h['perplexity']['full']:.1f} -> {h['perplexity']['subnet']:.1f} "
        f"({n_ppl} LAMBADA validation passages); mean accuracy {h['mean_accuracy']['full']:.3f} -> "
        f"{h['mean_accuracy']['subnet']:.3f} (lm-eval, zero-shot, acc_norm where the task has it, else acc; items: "
        f"{items}). No fine-tuning after pruning.",
        "",
        "## Reproduce",
        "```",
        f"hwnas run {_cli_args(a)} --out {shlex.quote(str(out))}",
        f"# or step by step:",
        f"hwnas search --model {a['model']} --table {table} --evaluations {r['budget']['evaluations']} "
        f"--population {r['budget']['population']} --latency-ratio {a['latency_ratio']} --phase {a['phase']} "
        f"--seed {a['seed']} --out {out / 'search'}",
        f"hwnas export --model {a['model']} --subnet {out / 'search' / 'pareto.json'}"
        + ("" if c["index"] is None else f" --pick {c['index']}") + f" --out {out / 'subnet'}",
    ]
    if a["runtime"] != "torch":
        method = DEPLOY_METHODS.get((a["runtime"], a["precision"]))
        lines.append(f"hwnas quantize --model {out / 'subnet'} --method {method} --out {r['artifacts']['subnet']}" if method
                     else f"hwnas onnx --model {out / 'subnet'} --out {r['artifacts']['subnet']}")
    lines += [f"hwnas benchmark --compare {' '.join(r['artifacts'].values())} --out {out / 'benchmark.json'}", "```", ""]
    return "\n".join(lines)


def _acc(t: dict[str, Any]) -> str:
    """acc_norm (else acc) ± its standard error."""
    from .lmeval import headline

    v, se = headline(t)
    return f"{v:.3f} ± {se:.3f}" if se is not None else f"{v:.3f}"


def _cli_args(a: dict[str, Any]) -> str:
    parts = [f"--{k.replace('_', '-')} {v}" for k, v in a.items() if v is not None]
    return " ".join(parts)
