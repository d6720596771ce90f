"""`hwnas run`'s report: report.json (every figure) and report.md (what a user reads first)."""
from __future__ import annotations

import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .common import atomic_write_json, atomic_write_text, read_json
from .deploy import DEPLOY_METHODS
from .lmeval import headline as task_headline


def figures(entry: dict[str, Any]) -> dict[str, Any]:
    """The medians of one benchmarked model (hwnas.benchmark's entry)."""
    keys = ("prefill_ms", "ttft_ms", "decode_ms_per_token")
    return {**{k: entry[k]["median"] for k in keys}, "decode_spread": entry["decode_ms_per_token"]["spread"],
            **{k: entry[k] for k in ("tokens_per_s", "peak_rss_bytes", "file_bytes", "decode_floor_ms", "decode_vs_floor")}}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def write_report(out: Path, args: dict[str, Any], budget: Any, table: Path, header: dict[str, Any],
                 chosen: dict[str, Any], paths: dict[str, Path], bench: dict[str, Any], quality: dict[str, Any],
                 heal: dict[str, Any] | None) -> dict[str, Any]:
    """report.json and report.md of a run; `shipped` is the healed sub-network when there is one."""
    m = {e["label"]: figures(e) for e in bench["models"]}
    shipped = "healed" if heal else "subnet"
    sub, full = m[shipped], m["full"]
    ref = m.get("full_fp32", full)
    export = read_json(out / "subnet" / "hwnas_export.json", "export report")
    mean = {k: q["accuracy"]["mean_acc_norm_or_acc"] for k, q in quality.items()}
    headline = {
        "shipped": shipped,
        "decode_speedup_vs_full": ratio(full["decode_ms_per_token"], sub["decode_ms_per_token"]),
        "predicted_latency_ratio": chosen["latency_ratio"],
        "prefill_speedup_vs_full": ratio(full["prefill_ms"], sub["prefill_ms"]),
        "size_ratio_vs_full": ratio(sub["file_bytes"], full["file_bytes"]),
        "decode_speedup_vs_full_fp32": ratio(ref["decode_ms_per_token"], sub["decode_ms_per_token"]),
        "smaller_than_full_fp32": ratio(ref["file_bytes"], sub["file_bytes"]),
        "kl_to_full": chosen["kl"],
        "fused_attention": bool(header.get("quantization", {}).get("fused_attention", False)),
        "perplexity": {k: q["perplexity"]["perplexity"] for k, q in quality.items()},
        "mean_accuracy": mean,
        "generation": {k: q.get("generation") for k, q in quality.items()},
    }
    if heal:
        headline["healing"] = {k: heal.get(k) for k in ("tokens", "tokens_per_s", "elapsed_s", "corpus", "mode")}
    report = {"args": args, "budget": asdict(budget), "table": str(table), "device": header["device"],
              "chosen": chosen, "parameters": {"subnet": export["parameters"], "full": export["full_parameters"]},
              "artifacts": {k: str(v) for k, v in paths.items()}, "benchmark": m, "quality": quality,
              "healing": heal, "headline": headline}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(out, report, table) + "\n## Benchmark details\n\n" + bench["markdown"])
    return report


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def markdown(out: Path, r: dict[str, Any], table: Path) -> str:
    a, h, c, heal = r["args"], r["headline"], r["chosen"], r["healing"]
    cfg = c["config"]
    fp32 = [i for i, d in zip(cfg["layers"], cfg.get("fp32_down", [])) if d]
    q = r["quality"]
    tasks = list(q["full"]["accuracy"]["tasks"])
    lines = [
        f"# hwnas run: {a['model']} on {r['device'].get('name', r['device']['id'])} ({a['runtime']} {a['precision']})",
        "",
        f"Budget `{a['budget']}`: {r['budget']['evaluations']} real quality evaluations; latency target "
        f"{a['latency_ratio']} x the full model's predicted {a['phase']} latency (table `{table.name}`)"
        + (f"; searched over the trained supernet `{a['supernet']}`" if a.get("supernet") else "") + ".",
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
           f"layer-drop and width-uniform networks by {c.get('selected_by', 'its held-out score')}: {c['nll']:.3f}"]
          if "nll" in c else []),
        *([f"- then the best after healing of the {a['heal_candidates']} best candidates, each healed briefly: "
           f"{c['nll_after_healing']:.3f} after healing (the pick {'changed' if c['changed_pick'] else 'did not change'})"]
          if "nll_after_healing" in c else []),
        "",
    ]
    if heal:
        kl = heal.get("held_out_kl") or {}
        lines += [
            "## Healing",
            f"- distilled from `{heal['teacher']}` ({heal['mode']}) on {heal['tokens']:,} tokens of "
            f"{heal['corpus']}, at {fmt(heal['tokens_per_s'], '.0f')} tokens/s ({fmt(heal['elapsed_s'] / 60, '.1f')} min"
            f"{', bf16 autocast' if heal.get('bf16') else ''})",
            f"- KL to the teacher on held-out training text: {fmt(kl.get('before'), '.3f')} -> "
            f"{fmt(kl.get('after'), '.3f')}",
            "",
            "![Healing curve](healed/heal_curve.png)",
            "",
        ]
    lines += [
        "## Measured on this device",
        "",
        f"| model | prefill ms | decode ms/token | tokens/s | TTFT ms | peak RSS MB | file MB | perplexity | "
        f"{' | '.join(tasks)} | mean acc |",
        "|---|---|---|---|---|---|---|---|" + "---|" * (len(tasks) + 1),
    ]
    for name in [n for n in ("full_fp32", "full", "subnet", "healed") if n in r["benchmark"] or n in q]:
        row, qq = r["benchmark"].get(name), q.get(name)
        speed = ([fmt(row["prefill_ms"], ".1f"), fmt(row["decode_ms_per_token"], ".2f"), fmt(row["tokens_per_s"], ".1f"),
                  fmt(row["ttft_ms"], ".1f"), fmt(row["peak_rss_bytes"] / 1e6, ".0f"), fmt(row["file_bytes"] / 1e6, ".1f")]
                 if row else ["-"] * 6)
        ppl = fmt(qq["perplexity"]["perplexity"], ".1f") if qq else "-"
        accs = [acc(qq["accuracy"]["tasks"][t]) if qq else "-" for t in tasks]
        mean = f"{qq['accuracy']['mean_acc_norm_or_acc']:.3f}" if qq else "-"
        lines.append(f"| {name} ({Path(r['artifacts'][name]).name}) | {' | '.join(speed)} | {ppl} | "
                     f"{' | '.join(accs)} | {mean} |")
    n_ppl = q["full"]["perplexity"]["passages"]
    items = ", ".join(f"{t} {v['n']}" for t, v in q["full"]["accuracy"]["tasks"].items())
    shipped = h["shipped"]
    quality_line = (f"- quality: held-out perplexity {h['perplexity']['full']:.1f} (full) -> "
                    f"{h['perplexity']['subnet']:.1f} (pruned)")
    quality_line += (f" -> {h['perplexity']['healed']:.1f} (healed)" if heal else "")
    quality_line += (f" ({n_ppl} LAMBADA validation passages); mean accuracy {h['mean_accuracy']['full']:.3f} -> "
                     f"{h['mean_accuracy']['subnet']:.3f}" + (f" -> {h['mean_accuracy']['healed']:.3f}" if heal else "")
                     + f" (lm-eval, zero-shot, acc_norm where the task has it, else acc; items: {items})."
                     + ("" if heal else " No fine-tuning after pruning."))
    lines += [
        "",
        f"- decode: **{fmt(h['decode_speedup_vs_full'])}x** faster than the full model in the same runtime and precision "
        f"(predicted {1 / c['latency_ratio']:.2f}x); prefill {fmt(h['prefill_speedup_vs_full'])}x.",
        f"- size: {fmt(h['size_ratio_vs_full'])} of the full model's at the same precision.",
        f"- whole stack against the full fp32 model in {a['runtime']}"
        f"{' (fused attention in both)' if h.get('fused_attention') else ''}: "
        f"{fmt(h['decode_speedup_vs_full_fp32'])}x faster decode, {fmt(h['smaller_than_full_fp32'])}x smaller.",
        quality_line,
    ]
    gens = {k: g for k, g in h["generation"].items() if g}
    if gens:
        lines += ["", f"Greedy generation (torch) from \"{next(iter(gens.values()))['prompt']}\":", ""]
        lines += [f"- {k}: \"{g['text']}\"" for k, g in gens.items()]
    lines += [
        "",
        "## Reproduce",
        "```",
        f"hwnas run {cli_args(a)} --out {shlex.quote(str(out))}",
        "# or step by step:",
        f"hwnas search --model {a.get('supernet') or a['model']} --table {table} --evaluations "
        f"{r['budget']['evaluations']} --population {r['budget']['population']} --latency-ratio {a['latency_ratio']} "
        f"--phase {a['phase']} --seed {a['seed']} --out {out / 'search'}",
        f"hwnas export --model {a.get('supernet') or a['model']} --subnet {out / 'search' / 'pareto.json'}"
        + ("" if c["index"] is None else f" --pick {c['index']}") + f" --out {out / 'subnet'}",
    ]
    if heal:
        lines.append(f"hwnas heal --model {out / 'subnet'} --teacher {heal['teacher']} --tokens {heal['tokens_requested']} "
                     f"--out {out / 'healed'}")
    if a["runtime"] != "torch":
        method = DEPLOY_METHODS.get((a["runtime"], a["precision"]))
        src = out / shipped
        lines.append(f"hwnas quantize --model {src} --method {method} --out {r['artifacts'][shipped]}" if method
                     else f"hwnas onnx --model {src} --out {r['artifacts'][shipped]}")
    lines += [f"hwnas benchmark --compare {' '.join(r['artifacts'][k] for k in r['benchmark'])} "
              f"--out {out / 'benchmark.json'}", "```", ""]
    return "\n".join(lines)


def acc(t: dict[str, Any]) -> str:
    """acc_norm (else acc) ± its standard error."""
    v, se = task_headline(t)
    return f"{v:.3f} ± {se:.3f}" if se is not None else f"{v:.3f}"


def cli_args(a: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in a.items() if v is not None)
