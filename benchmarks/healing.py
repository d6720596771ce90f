"""Healing: how far and how fast distillation (`hwnas heal`) brings a pruned sub-network back.

For one sub-network checkpoint (the demo's pick at latency ratio 0.75, which `make demo` writes to runs/demo/subnet):

- the healing curve: held-out LAMBADA validation perplexity and lm-eval mean accuracy after 0 tokens and after each
  of --marks training tokens, every point on the same passages and task items, evaluated in torch fp32
  (`pipeline.evaluate_quality`). One heal to the largest mark (one cosine schedule) leaves a snapshot at each
  smaller mark (`heal(snapshots=...)`); with --separate each mark is a complete heal of its own. The `quick` budget's
  heal (`hwnas run --budget quick`) is one more complete point, for the quick target;
- the full model's figures as the reference, and the issue's targets, met or not: quick healing (about 10 minutes)
  reaches perplexity <= 90; within 60 training minutes, perplexity <= 70 and at least half of the mean-accuracy
  loss recovered;
- throughput: training tokens/s of full-parameter and LoRA healing of the same sub-network, short heals timed step by
  step (the first steps left out as warm-up), interleaved A B A B, medians;
- each point's greedy continuation of "The capital of France is".

Every finished heal and evaluation stays under --work and is reused: an interrupted run resumes where it stopped.
Writes benchmarks/results/healing.{json,md,png}:

    .venv/bin/python benchmarks/healing.py --subnet runs/demo/subnet     (1 to 2 hours on 2 cores, mostly training)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import math
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import hwnas
from hwnas import defaults as D
from hwnas.common import HwnasError, atomic_write_json, atomic_write_text, home, read_json
from hwnas.heal import REPORT_FILE, checkpoint_dir, heal
from hwnas.lmeval import headline, paired_difference
from hwnas.loading import resolve_model
from hwnas.pipeline import BUDGETS, evaluate_quality, sample_generation
from hwnas.runner import cpu_info

hwnas.point_library_caches()  # library caches stay inside the project

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_PPL, QUICK_MINUTES = 90.0, 10.0  # quick healing (about 10 minutes): perplexity at most 90
HOUR_PPL, HOUR_MINUTES, HOUR_RECOVERY = 70.0, 60.0, 0.5  # within 60 minutes: <= 70 and half the accuracy loss back
ABOUT = 1.1  # "about 10 minutes": up to 10% over
THROUGHPUT_TARGET = 150.0  # training tokens/s of the default (full-parameter) heal
SNAPSHOTS = "snapshots" in inspect.signature(heal).parameters  # heal() can save the student at marks of one run


def heal_once(subnet: Path, teacher: Path, tokens: int, out: Path, settings: dict[str, Any], *,
              snapshots: list[int] | None = None, progress: bool = True) -> dict[str, Any]:
    """The report of `subnet` healed on `tokens` tokens into `out`: reused when complete, resumed when a checkpoint
    of an interrupted heal is there."""
    if (out / REPORT_FILE).is_file() and read_json(out / REPORT_FILE, "heal report")["complete"]:
        return read_json(out / REPORT_FILE, "heal report")
    extra = {"snapshots": snapshots} if snapshots else {}
    print(f"healing {subnet.name} on {tokens:,} tokens into {out}", file=sys.stderr, flush=True)
    return heal(model=subnet, teacher=teacher, tokens=tokens, out=out, resume=checkpoint_dir(out).exists(),
                overwrite=out.exists(), progress=progress, **settings, **extra)


def curve_checkpoints(subnet: Path, teacher: Path, marks: list[int], quick_tokens: int, work: Path,
                      settings: dict[str, Any], *, one_run: bool, progress: bool) -> list[dict[str, Any]]:
    """One row per healed point, {name, tokens asked, schedule tokens, checkpoint}: the marks (one heal to the
    largest with snapshots, or one complete heal each) and the quick budget's complete heal (`quick_tokens` > 0)."""
    from hwnas.heal import snapshot_dir

    rows = []
    if one_run:
        top = max(marks)
        out = work / "heal" / f"run-{top}"
        heal_once(subnet, teacher, top, out, settings, snapshots=[m for m in marks if m < top], progress=progress)
        rows += [{"name": f"tokens-{m}", "asked": m, "schedule": top,
                  "checkpoint": out if m == top else snapshot_dir(out, m)} for m in marks]
    else:
        for m in marks:
            out = work / "heal" / f"tokens-{m}"
            heal_once(subnet, teacher, m, out, settings, progress=progress)
            rows.append({"name": f"tokens-{m}", "asked": m, "schedule": m, "checkpoint": out})
    if quick_tokens:
        out = work / "heal" / f"quick-{quick_tokens}"
        heal_once(subnet, teacher, quick_tokens, out, settings, progress=progress)
        rows.append({"name": f"quick-{quick_tokens}", "asked": quick_tokens, "schedule": quick_tokens,
                     "checkpoint": out})
    for r in rows:
        if not (r["checkpoint"] / REPORT_FILE).is_file():
            raise HwnasError(f"{r['checkpoint']} holds no healed checkpoint (no {REPORT_FILE}); remove "
                             f"{work / 'heal'} and run again")
    return rows


def training_minutes(checkpoint: Path) -> float:
    """Minutes of training steps behind a healed checkpoint (its heal history: every step's own time)."""
    history = read_json(checkpoint / "heal_history.json", "heal history")
    return sum(h["tokens"] / h["step"] / h["tokens_per_s"] for h in history) / 60


def evaluate(name: str, checkpoint: Path, budget: Any, work: Path, *, progress: bool) -> dict[str, Any]:
    """Perplexity, accuracy (with item scores) and the sample generation of `checkpoint`, cached as `name`."""
    f = work / "evals" / f"{name}.json"
    asked = {"checkpoint": str(checkpoint), "tasks": list(budget.tasks), "items": budget.task_items,
             "passages": budget.perplexity_passages}
    saved = read_json(f, "evaluation") if f.is_file() else None
    if saved is None or {k: saved.get(k) for k in asked} != asked:
        print(f"evaluating {name} ({checkpoint})", file=sys.stderr, flush=True)
        quality = evaluate_quality(checkpoint, budget, progress=progress)
        saved = {**asked, **quality, "generation": sample_generation(checkpoint)}
        atomic_write_json(f, saved)
    return saved


def throughput(subnet: Path, teacher: Path, work: Path, settings: dict[str, Any], *, steps: int, warmup: int,
               rounds: int, lora_rank: int) -> dict[str, Any]:
    """Training tokens/s of full-parameter and LoRA healing of `subnet`: heals of `warmup` + `steps` optimizer steps,
    interleaved (full, LoRA, full, LoRA, ...), each timed over its last `steps` steps; the median per mode."""
    f = work / "throughput.json"
    asked = {"steps": steps, "warmup": warmup, "rounds": rounds, "lora_rank": lora_rank}
    saved = read_json(f, "throughput") if f.is_file() else {}
    if saved.get("settings") != asked:
        saved = {"settings": asked, "runs": []}
    per_step = settings["seq_len"] * settings["batch_size"]
    modes = {"full": 0, f"lora-{lora_rank}": lora_rank}
    timing = {k: v for k, v in settings.items() if k != "lr"}  # each mode's own default learning rate
    for r in range(rounds):
        for mode, rank in modes.items():
            if any(x["mode"] == mode and x["round"] == r for x in saved["runs"]):
                continue
            out = work / "throughput" / f"{mode}-{r}"
            print(f"timing {mode} healing, round {r + 1} of {rounds}", file=sys.stderr, flush=True)
            load_before = os.getloadavg()
            report = heal(model=subnet, teacher=teacher, tokens=(warmup + steps) * per_step, out=out, lora_rank=rank,
                          overwrite=True, checkpoint_every=warmup + steps, progress=False, **timing)
            timed = read_json(out / "heal_history.json", "heal history")[warmup:]
            seconds = sum(per_step / h["tokens_per_s"] for h in timed)
            saved["runs"].append({"mode": mode, "round": r, "tokens_per_s": len(timed) * per_step / seconds,
                                  "step_tokens_per_s": [h["tokens_per_s"] for h in timed],
                                  "trainable_parameters": report["trainable_parameters"], "bf16": report["bf16"],
                                  "load_average_before": load_before, "load_average_after": os.getloadavg()})
            atomic_write_json(f, saved)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    medians = {}
    for mode in modes:
        runs = [x for x in saved["runs"] if x["mode"] == mode]
        medians[mode] = {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
                         "runs": [x["tokens_per_s"] for x in runs],
                         "trainable_parameters": runs[0]["trainable_parameters"], "bf16": runs[0]["bf16"]}
    return {**asked, "tokens_per_step": per_step, "modes": medians, "runs": saved["runs"]}


def accuracy_stderr(acc: dict[str, Any]) -> float:
    """Standard error of the mean over tasks of their headline figures."""
    ses = [headline(t)[1] or 0.0 for t in acc["tasks"].values()]
    return math.sqrt(sum(s * s for s in ses)) / len(ses)


def summarize(name: str, tokens: int, schedule: int, minutes: float, q: dict[str, Any], sub: dict[str, Any] | None,
              full: dict[str, Any]) -> dict[str, Any]:
    """One point of the curve: its figures, its gain over the unhealed sub-network (paired), its recovery."""
    acc = q["accuracy"]
    row = {"name": name, "tokens": tokens, "schedule_tokens": schedule, "training_minutes": minutes,
           "checkpoint": q["checkpoint"], "perplexity": q["perplexity"]["perplexity"],
           "tasks": {t: headline(r)[0] for t, r in acc["tasks"].items()}, "accuracy": acc["mean_acc_norm_or_acc"],
           "accuracy_stderr": accuracy_stderr(acc), "generation": q["generation"]["text"]}
    if sub is not None:
        gain, se = paired_difference(acc, sub["accuracy"])
        lost = full["accuracy"]["mean_acc_norm_or_acc"] - sub["accuracy"]["mean_acc_norm_or_acc"]
        row.update(gain=gain, gain_stderr=se, recovered=gain / lost if lost > 0 else None)
    return row


def verdicts(points: list[dict[str, Any]], throughput_result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets, each with the point it was judged on and whether it is met."""
    healed = [p for p in points if p["tokens"] > 0]
    out = []
    quick = next((p for p in healed if p["name"].startswith("quick-")), None)
    how = "the quick budget's complete heal"
    if quick is None:  # no quick heal of its own: the longest curve point trained within about 10 minutes
        within = [p for p in healed if p["training_minutes"] <= QUICK_MINUTES * ABOUT]
        quick = max(within, key=lambda p: p["tokens"]) if within else None
        how = "the longest curve point within about 10 minutes (a snapshot of a longer schedule)"
    if quick is not None:
        fast = quick["training_minutes"] <= QUICK_MINUTES * ABOUT
        out.append({"target": f"quick healing (about {QUICK_MINUTES:.0f} min): perplexity <= {QUICK_PPL:.0f}",
                    "point": quick["name"], "met": bool(quick["perplexity"] <= QUICK_PPL and fast),
                    "detail": f"{how}: {quick['tokens']:,} tokens in {quick['training_minutes']:.1f} training minutes "
                              f"({'within' if fast else 'more than'} about {QUICK_MINUTES:.0f}), perplexity "
                              f"{quick['perplexity']:.1f}"})
    hour = [p for p in healed if p["training_minutes"] <= HOUR_MINUTES]
    good = [p for p in hour if p["perplexity"] <= HOUR_PPL and (p.get("recovered") or 0) >= HOUR_RECOVERY]
    best = good[0] if good else min(hour, key=lambda p: p["perplexity"], default=None)
    if best is not None:
        rec = best.get("recovered")
        out.append({"target": f"within {HOUR_MINUTES:.0f} min: perplexity <= {HOUR_PPL:.0f} and >= "
                              f"{HOUR_RECOVERY:.0%} of the mean-accuracy loss recovered",
                    "point": best["name"], "met": bool(good),
                    "detail": f"{best['name']} ({best['training_minutes']:.1f} training minutes): perplexity "
                              f"{best['perplexity']:.1f}, recovered "
                              + (f"{rec:.0%}" if rec is not None else "n/a (the sub-network lost no accuracy)")
                              + f" ({best['gain'] * 100:+.1f} ± {best['gain_stderr'] * 100:.1f} points, paired)"})
    else:
        out.append({"target": f"within {HOUR_MINUTES:.0f} min", "point": None, "met": False,
                    "detail": "no healed point trained within 60 minutes"})
    if throughput_result is not None:
        tps = throughput_result["modes"]["full"]["tokens_per_s"]
        out.append({"target": f"throughput >= {THROUGHPUT_TARGET:.0f} training tokens/s (full-parameter)",
                    "point": "full", "met": bool(tps >= THROUGHPUT_TARGET), "detail": f"{tps:.0f} tokens/s (median)"})
    return out


def markdown(r: dict[str, Any]) -> str:
    tasks, s, dev, ev = r["evaluation"]["tasks"], r["heal_settings"], r["device"], r["evaluation"]
    lines = [f"# Healing {Path(r['subnet']).name} (from {Path(r['teacher']).name})", "",
             f"{r['date']}, `{r['command']}`; {dev['cpu']} ({dev['cores']} cores, torch threads "
             f"{dev['torch_threads']}, load average {dev['load_average_start'][0]:.1f} at the start and "
             f"{dev['load_average_end'][0]:.1f} at the end: the machine is shared).", "",
             f"Healing: `hwnas heal` (KL on logits) on {r['corpus']}, batch {s['batch_size']} x {s['seq_len']} "
             f"tokens, seed {s['seed']}, learning rate {r['learning_rate']}; schedule: {r['schedule']}. "
             f"Evaluation: {ev['runtime']}, perplexity on the first {ev['passages']} LAMBADA validation passages, "
             f"accuracy with lm-eval (zero-shot, the first {ev['items']} items of {', '.join(tasks)}; acc_norm for "
             "ARC and PIQA, acc for LAMBADA; the same items for every point). Gain: against the unhealed "
             "sub-network, ± the paired standard error; recovered: the gain over what pruning lost. Minutes: the sum "
             "of the training steps' times.", "",
             "| point | tokens | schedule | minutes | perplexity | " + " | ".join(tasks)
             + " | mean acc | gain | recovered | after \"" + r["prompt"] + "\" |",
             "|---|---|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    for p in [r["full"], *r["points"]]:
        healed = p["tokens"] > 0
        cells = [p["name"], "" if p["name"] == "full" else f"{p['tokens']:,}",
                 f"{p['schedule_tokens']:,}" if healed else "", f"{p['training_minutes']:.1f}" if healed else "",
                 f"{p['perplexity']:.1f}", *(f"{p['tasks'][t] * 100:.1f}" for t in tasks),
                 f"**{p['accuracy'] * 100:.1f}** ± {p['accuracy_stderr'] * 100:.1f}",
                 f"{p['gain'] * 100:+.1f} ± {p['gain_stderr'] * 100:.1f}" if "gain" in p else "",
                 f"{p['recovered']:.0%}" if p.get("recovered") is not None else "",
                 p["generation"].replace("\n", " ").replace("|", "/").strip()]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    lines += [f"- {v['target']}: **{'met' if v['met'] else 'NOT met'}** ({v['detail']})" for v in r["targets"]]
    t = r.get("throughput")
    if t is not None:
        lines += ["", "## Throughput", "",
                  f"Training tokens/s of heals of {t['warmup']} + {t['steps']} optimizer steps "
                  f"({t['tokens_per_step']:,} tokens each), timed over the last {t['steps']}; {t['rounds']} rounds "
                  "interleaved (full, LoRA, full, LoRA, ...); median.", "",
                  "| mode | trainable parameters | bf16 | tokens/s (median) | runs |", "|---|---|---|---|---|"]
        for mode, m in t["modes"].items():
            lines.append(f"| {mode} | {m['trainable_parameters'] / 1e6:.1f} M | {m['bf16']} | "
                         f"**{m['tokens_per_s']:.0f}** | " + ", ".join(f"{x:.0f}" for x in m["runs"]) + " |")
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [p for p in r["points"] if not p["name"].startswith("quick-")]
    quick = [p for p in r["points"] if p["name"].startswith("quick-")]
    sub, full = r["points"][0], r["full"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    acc_label = "mean accuracy, % (" + ", ".join(r["evaluation"]["tasks"]) + ")"
    for ax, key, scale, label in ((axes[0], "perplexity", 1, "LAMBADA validation perplexity"),
                                  (axes[1], "accuracy", 100, acc_label)):
        x = [p["tokens"] for p in curve]
        y = [p[key] * scale for p in curve]
        err = [p["accuracy_stderr"] * 100 for p in curve] if key == "accuracy" else None
        ax.errorbar(x, y, yerr=err, marker="o", color="C3", capsize=3, label=f"healed ({r['schedule_short']})")
        for p in quick:
            ax.plot([p["tokens"]], [p[key] * scale], "*", color="C1", markersize=12,
                    label=f"quick budget ({p['tokens']:,} tokens, own schedule)")
        ax.axhline(full[key] * scale, color="k", ls="--", lw=1, label="full model")
        if key == "perplexity":
            ax.axhline(QUICK_PPL, color="gray", ls=":", lw=1,
                       label=f"targets: {QUICK_PPL:.0f} (quick), {HOUR_PPL:.0f} (60 min)")
            ax.axhline(HOUR_PPL, color="gray", ls=":", lw=1)
            ax.set_yscale("log")
        else:
            half = (sub["accuracy"] + HOUR_RECOVERY * (full["accuracy"] - sub["accuracy"])) * 100
            ax.axhline(half, color="gray", ls=":", lw=1, label="half of the loss recovered")
        ax.set_xscale("symlog", linthresh=max(1, min((p["tokens"] for p in curve if p["tokens"]), default=1)))
        ax.set_xlim(0, max(p["tokens"] for p in r["points"]) * 1.3)  # matplotlib's symlog margin goes below 0
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Healing {Path(r['subnet']).name} from {Path(r['teacher']).name} ({r['date']})", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(*, subnet: Path, teacher: str = D.DEFAULT_MODEL, marks: list[int], quick_tokens: int, tasks: list[str],
         items: int, passages: int, work: Path, out_dir: Path, separate: bool = False, seq_len: int = 256,
         batch_size: int = 8, micro_batch: int = 4, lr: float | None = None, seed: int = 0,
         train_text: Path | None = None, throughput_steps: int = 6, throughput_warmup: int = 1,
         throughput_rounds: int = 2, lora_rank: int = 16, progress: bool = True) -> dict[str, Any]:
    import torch

    subnet, teacher_dir = resolve_model(subnet), resolve_model(teacher)
    marks = sorted(set(marks))
    if not marks or marks[0] <= 0:
        raise HwnasError(f"--marks must be positive token counts, got {marks}")
    one_run = SNAPSHOTS and not separate
    settings = {"seq_len": seq_len, "batch_size": batch_size, "micro_batch": micro_batch, "lr": lr, "seed": seed,
                "train_text": None if train_text is None else str(Path(train_text).resolve())}
    setup = {"subnet": str(subnet), "teacher": str(teacher_dir), "marks": marks, "quick_tokens": quick_tokens,
             "one_run": one_run, "heal": settings}
    work.mkdir(parents=True, exist_ok=True)
    if (work / "setup.json").is_file() and read_json(work / "setup.json", "benchmark setup") != setup:
        raise SystemExit(f"{work} holds a healing benchmark of {read_json(work / 'setup.json')}, not {setup}; "
                         "choose another --work")
    atomic_write_json(work / "setup.json", setup)
    load_start = os.getloadavg()
    budget = dataclasses.replace(BUDGETS["quick"], tasks=tuple(tasks), task_items=items, perplexity_passages=passages)

    rows = curve_checkpoints(subnet, teacher_dir, marks, quick_tokens, work, settings, one_run=one_run,
                             progress=progress)
    full_q = evaluate("full", teacher_dir, budget, work, progress=progress)
    sub_q = evaluate("tokens-0", subnet, budget, work, progress=progress)
    full = summarize("full", 0, 0, 0.0, full_q, None, full_q)
    points = [summarize("tokens-0", 0, 0, 0.0, sub_q, None, full_q)]
    for row in rows:
        q = evaluate(row["name"], row["checkpoint"], budget, work, progress=progress)
        report = read_json(row["checkpoint"] / REPORT_FILE, "heal report")
        points.append(summarize(row["name"], report["tokens"], row["schedule"], training_minutes(row["checkpoint"]),
                                q, sub_q, full_q))
    speed = None
    if throughput_rounds:
        speed = throughput(subnet, teacher_dir, work, settings, steps=throughput_steps, warmup=throughput_warmup,
                           rounds=throughput_rounds, lora_rank=lora_rank)
    top = read_json(rows[0]["checkpoint"] / REPORT_FILE, "heal report")
    cpu = cpu_info()
    schedule = (f"one heal to {max(marks):,} tokens (one cosine schedule), snapshots at the smaller marks" if one_run
                else "a complete heal (its own cosine schedule) to each mark")
    if quick_tokens:
        schedule += f"; the quick budget ({quick_tokens:,} tokens) its own complete heal"
    result = {"date": datetime.date.today().isoformat(),
              "command": "python benchmarks/healing.py " + shlex.join(sys.argv[1:]),
              "subnet": str(subnet), "teacher": str(teacher_dir), "prompt": D.PROMPT,
              "device": {"cpu": cpu["name"], "part": cpu["part"], "cores": cpu["cores"], "isa": cpu["isa"],
                         "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
                         "load_average_end": os.getloadavg()},
              "corpus": top["corpus"], "corpus_fingerprint": top["corpus_fingerprint"],
              "learning_rate": top["config"]["lr"], "bf16": top["bf16"], "heal_settings": settings,
              "schedule": schedule, "schedule_short": "one schedule, snapshots" if one_run else "a schedule per mark",
              "evaluation": {"runtime": "torch fp32", "tasks": list(tasks), "items": items, "passages": passages,
                             "lm_eval_version": full_q["accuracy"]["lm_eval_version"]},
              "full": full, "points": points, "throughput": speed}
    result["targets"] = verdicts(points, speed)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "healing.json", result)
    md = markdown(result)
    atomic_write_text(out_dir / "healing.md", md)
    plot(result, out_dir / "healing.png")
    print(md)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subnet", type=Path, default=Path("runs/demo/subnet"),
                   help="the sub-network checkpoint to heal (default runs/demo/subnet, from `make demo`)")
    p.add_argument("--teacher", default=D.DEFAULT_MODEL, help="the model it was cut from")
    p.add_argument("--marks", type=int, nargs="+", default=[10_000, 30_000, 100_000, 300_000],
                   help="training token counts of the curve's points (whole batches)")
    p.add_argument("--quick-tokens", type=int, default=D.HEAL_TOKENS["quick"],
                   help="the quick budget's heal, a complete point of its own (0: none; default %(default)s)")
    p.add_argument("--separate", action="store_true",
                   help="heal to each mark separately (its own schedule) instead of one heal with snapshots")
    p.add_argument("--tasks", nargs="+", default=["lambada", "arc_easy", "piqa"])
    p.add_argument("--items", type=int, default=100, help="items per task (default 100)")
    p.add_argument("--passages", type=int, default=100, help="LAMBADA validation passages (default 100)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: heal's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-text", type=Path, default=None, help="training text (default: heal's corpus)")
    p.add_argument("--throughput-steps", type=int, default=6, help="timed optimizer steps per throughput heal")
    p.add_argument("--throughput-warmup", type=int, default=1, help="untimed first steps per throughput heal")
    p.add_argument("--throughput-rounds", type=int, default=2, help="interleaved rounds (0: no throughput)")
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the LoRA throughput heal")
    p.add_argument("--work", type=Path, default=None, help="working folder (default .cache/hwnas/healing)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args()
    try:
        main(subnet=a.subnet, teacher=a.teacher, marks=a.marks, quick_tokens=a.quick_tokens, tasks=a.tasks,
             items=a.items, passages=a.passages, work=a.work or home() / "healing", out_dir=a.out_dir,
             separate=a.separate, seq_len=a.seq_len, batch_size=a.batch_size, micro_batch=a.micro_batch, lr=a.lr,
             seed=a.seed, train_text=a.train_text, throughput_steps=a.throughput_steps,
             throughput_warmup=a.throughput_warmup, throughput_rounds=a.throughput_rounds, lora_rank=a.lora_rank,
             progress=not a.quiet)
    except HwnasError as e:
        sys.exit(f"error: {e}")
