"""Supernet training (InstaTune): does one-shot sandwich training close the sub-networks' gap to the full model?

Trains the supernet of `--model` with `hwnas.instatune.train_supernet` (at most `--minutes` of training; resumable),
then measures the held-out loss (mean next-token cross-entropy on LAMBADA validation passages, never training text)
of `--subnets` fixed random sub-networks (seeded) and of `--pick` in the untrained and in the trained supernet.
The gap of a sub-network is its loss minus its supernet's full model's. The figure to reach: the mean gap falls by
at least 30% while the full model's own loss rises by at most 2%.

Every stage checkpoints under `--work` and resumes. Writes benchmarks/results/supernet_training.{json,md,png}.

    .venv/bin/python benchmarks/supernet_training.py --pick PICK.json --minutes 60
"""
from __future__ import annotations

import argparse
import datetime
import math
import time
from pathlib import Path

import torch

import hwnas
from hwnas.common import atomic_write_json, atomic_write_text, home, read_json
from hwnas.data import lambada_texts, pack_tokens
from hwnas.defaults import CALIBRATION_SOURCE, DEFAULT_MODEL
from hwnas.instatune import SandwichLoss, train_supernet
from hwnas.loading import load_model
from hwnas.space import SubnetConfig
from hwnas.supernet import Calibration, Supernet

hwnas.point_library_caches()  # library caches stay inside the project

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_GAP_DROP, MAX_FULL_RISE = 0.30, 0.02


@torch.no_grad()
def held_out_loss(sn: Supernet, cfg: SubnetConfig, ids: torch.Tensor, micro_batch: int = 4) -> float:
    """Mean next-token cross-entropy (nats) of sub-network `cfg` on token rows `ids`."""
    sn.set_active(cfg)
    total, n = 0.0, 0
    for i in range(0, len(ids), micro_batch):
        mb = ids[i:i + micro_batch]
        logits = sn(mb, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb[:, 1:].reshape(-1),
                                                         reduction="sum"))
        n += mb[:, 1:].numel()
    sn.set_max()
    return total / n


def measure(sn: Supernet, named: dict[str, SubnetConfig], ids: torch.Tensor, path: Path) -> dict[str, float]:
    """Held-out loss of the full model and of every named sub-network, saved to `path` one by one (resumable)."""
    done = read_json(path, "losses") if path.is_file() else {}
    for name, cfg in {"full": sn.search_space.max_config(), **named}.items():
        if name not in done:
            t = time.monotonic()
            done[name] = held_out_loss(sn, cfg, ids)
            atomic_write_json(path, done)
            print(f"{path.stem}: {name} loss {done[name]:.4f} ({time.monotonic() - t:.0f} s)", flush=True)
    return done


def sized_tokens(sn: Supernet, teacher: torch.nn.Module, *, minutes: float, batch_size: int, seq_len: int,
                 micro_batch: int = 4, share: float = 0.9) -> tuple[int, float]:
    """Training tokens (whole batches) that fit `share` of `minutes` at the sandwich rate measured here on three
    micro-batches (each with its own random sub-networks, after one warm-up), and that rate in tokens/s."""
    from hwnas.distill import bf16_native

    loss = SandwichLoss(sn, teacher)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sn.base_config.vocab_size, (micro_batch, seq_len), generator=gen)
    times = []
    for rep in range(4):
        torch.manual_seed(rep)  # a new step: new random sub-networks
        t = time.monotonic()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_native("cpu")):
            value = loss(ids)
        value.backward()
        sn.zero_grad(set_to_none=True)
        times.append(time.monotonic() - t)
    rate = ids.numel() / (sum(times[1:]) / len(times[1:]))
    steps = max(1, int(rate * minutes * 60 * share) // (batch_size * seq_len))
    return steps * batch_size * seq_len, rate


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    before, after = [r["gap_before"] for r in rows], [r["gap_after"] for r in rows]
    random_rows = [r for r in rows if r["name"] != "pick"]
    ax.scatter([r["gap_before"] for r in random_rows], [r["gap_after"] for r in random_rows], s=18,
               label="random sub-networks")
    for r in rows:
        if r["name"] == "pick":
            ax.scatter([r["gap_before"]], [r["gap_after"]], s=60, marker="*", color="C3", label="pick")
    top = max(before + after) * 1.05
    ax.plot([0, top], [0, top], "k--", lw=0.8, label="no change")
    ax.plot([0, top], [0, top * (1 - TARGET_GAP_DROP)], ":", color="gray", lw=0.8, label="30% smaller")
    ax.set(xlabel="loss gap before training (nats)", ylabel="loss gap after training (nats)",
           title="Held-out loss gap to the full model (LAMBADA validation)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default: what fits 90%% of --minutes at "
                   "the sandwich rate measured here first; --minutes stops the training in any case)")
    p.add_argument("--minutes", type=float, default=60.0, help="training time limit, summed over resumes")
    p.add_argument("--pick", type=Path, default=None, help="a sub-network config (or a search's pareto.json) to add")
    p.add_argument("--subnets", type=int, default=20, help="fixed random sub-networks (default 20)")
    p.add_argument("--subnet-seed", type=int, default=0)
    p.add_argument("--eval-rows", type=int, default=32, help="held-out sequences (default 32)")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--largest-weight", type=float, default=1.0, help="weight of the largest sub-network's loss")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calibration-source", default=CALIBRATION_SOURCE)
    p.add_argument("--work", type=Path, default=None, help="training and checkpoint folder (default: under the hwnas "
                   "cache)")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()

    work = args.work or home() / "benchmarks" / "supernet_training"
    work.mkdir(parents=True, exist_ok=True)
    untrained = Supernet.from_pretrained(args.model, calibration=Calibration(source=args.calibration_source))
    space = untrained.search_space
    named = {f"random {i}": space.sample(args.subnet_seed * 1000 + i) for i in range(args.subnets)}
    if args.pick is not None:
        named["pick"] = space.validate(SubnetConfig.from_json(args.pick))
    ids = pack_tokens(untrained.tokenizer, lambada_texts("validation"), args.eval_seq_len, rows=args.eval_rows)
    setup = {"model": args.model, "configs": {k: c.to_dict() for k, c in named.items()}, "eval_rows": args.eval_rows,
             "eval_seq_len": args.eval_seq_len, "calibration": untrained.calibration.key()}
    saved = work / "benchmark_setup.json"
    previous = read_json(saved, "benchmark setup") if saved.is_file() else None
    if previous is not None and {k: previous.get(k) for k in setup} != setup:
        raise SystemExit(f"{work} holds a run with other sub-networks or held-out text; choose another --work")
    tokens, rate = args.tokens, None
    if tokens is None and previous is not None:
        tokens, rate = previous["tokens"], previous["measured_tokens_per_s"]  # a resume keeps its plan
    elif tokens is None:
        teacher, _ = load_model(args.model)
        teacher.requires_grad_(False)
        tokens, rate = sized_tokens(untrained, teacher, minutes=args.minutes, batch_size=args.batch_size,
                                    seq_len=args.seq_len)
        del teacher
        print(f"sandwich rate {rate:.1f} tokens/s: planning {tokens} tokens for {args.minutes} min", flush=True)
    atomic_write_json(saved, {**setup, "tokens": tokens, "measured_tokens_per_s": rate})

    before = measure(untrained, named, ids, work / "before.json")
    del untrained
    # the time limit covers all sessions: each resume gets what earlier ones left
    state = work / "supernet" / "checkpoint" / "train_state.json"
    spent = read_json(state, "training state").get("elapsed_s", 0.0) / 60 if state.is_file() else 0.0
    trained = read_json(work / "supernet" / "hwnas_supernet.json", "record")["training"] if (
        work / "supernet" / "hwnas_supernet.json").is_file() else None
    if trained is None or (not trained["complete"] and spent < args.minutes):
        train_supernet(model=args.model, tokens=tokens, out=work / "supernet", resume=True, lr=args.lr,
                       largest_weight=args.largest_weight,
                       batch_size=args.batch_size, seq_len=args.seq_len, calibration_source=args.calibration_source,
                       minutes=max(args.minutes - spent, 0.01))
        (work / "after.json").unlink(missing_ok=True)  # the weights changed
    record = read_json(work / "supernet" / "hwnas_supernet.json", "supernet record")
    after = measure(Supernet.from_pretrained(work / "supernet"), named, ids, work / "after.json")

    rows = []
    for name, cfg in named.items():
        rows.append({"name": name, "layers": cfg.depth, "config": cfg.to_dict(),
                     "loss_before": before[name], "loss_after": after[name],
                     "gap_before": before[name] - before["full"], "gap_after": after[name] - after["full"],
                     "gap_after_vs_source": after[name] - before["full"]})
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    training = record["training"]
    hours = training["elapsed_s"] / 3600
    result = {
        "date": datetime.date.today().isoformat(), "model": args.model, "supernet": str(work / "supernet"),
        "train_text": training["train_text"], "tokens": training["tokens"], "minutes": training["elapsed_s"] / 60,
        "tokens_per_s": training["tokens"] / (hours * 3600) if hours else None, "planned_tokens": tokens,
        "measured_sandwich_tokens_per_s": rate, "processes": training["processes"],
        "bf16": training["bf16"], "config": training["config"], "held_out": f"LAMBADA validation, {args.eval_rows} x "
        f"{args.eval_seq_len} tokens", "full_loss_before": before["full"], "full_loss_after": after["full"],
        "full_loss_change": after["full"] / before["full"] - 1, "mean_gap_before": mean("gap_before"),
        "mean_gap_after": mean("gap_after"), "mean_gap_after_vs_source": mean("gap_after_vs_source"), "rows": rows,
    }
    result["mean_gap_change"] = result["mean_gap_after"] / result["mean_gap_before"] - 1
    result["target_met"] = bool(result["mean_gap_change"] <= -TARGET_GAP_DROP
                                and result["full_loss_change"] <= MAX_FULL_RISE and result["minutes"] <= 60.0 + 1e-9)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "supernet_training.json", result)
    lines = [
        f"# Supernet training (InstaTune, sandwich rule) on {args.model}", "",
        f"{result['tokens']:,} training tokens ({result['train_text']}) in {result['minutes']:.1f} min "
        f"({result['tokens_per_s'] or math.nan:.0f} tokens/s, {result['processes']} process(es), bf16 "
        f"{result['bf16']}); learning rate {result['config']['lr']:g}, the largest sub-network's loss weighted "
        f"{training.get('largest_weight', 1.0):g}; held-out: {result['held_out']}.", "",
        "| | before | after | change | target |", "|---|---|---|---|---|",
        f"| mean loss gap, {len(rows)} sub-networks (nats) | {result['mean_gap_before']:.4f} | "
        f"{result['mean_gap_after']:.4f} | {result['mean_gap_change']:+.1%} | <= -30% |",
        f"| full model loss (nats) | {before['full']:.4f} | {after['full']:.4f} | {result['full_loss_change']:+.2%} | "
        "<= +2% |", "",
        f"Target met: **{'yes' if result['target_met'] else 'no'}**. The gap against the source model's loss "
        f"(not the trained full model's) is {result['mean_gap_after_vs_source']:.4f} after training.", "",
        "| sub-network | layers | loss before | loss after | gap before | gap after |", "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['layers']} | {r['loss_before']:.4f} | {r['loss_after']:.4f} | "
              f"{r['gap_before']:.4f} | {r['gap_after']:.4f} |" for r in rows]
    atomic_write_text(args.results / "supernet_training.md", "\n".join(lines) + "\n")
    plot(rows, args.results / "supernet_training.png")
    print("\n".join(lines[:9]))


if __name__ == "__main__":
    main()
