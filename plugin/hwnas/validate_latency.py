"""Proof that a latency predictor is right: predicted against measured, on sub-networks it never saw.

`validate_latency` draws N sub-networks spread over the size range (seeded, disjoint from the
tables' calibration sub-networks), builds each one as it will be deployed for every table given
(extracted, exported with Optimum, quantized), and measures prefill and decode end to end with the
protocol the tables' calibration used (`tables.e2e_timing`), in several passes over the whole set,
every other one in reverse order. Several tables are validated in one run, their measurements
interleaved per sub-network, so machine drift hits them alike. The measured latency is the median of
the passes, as a table keeps the median of its rounds; the passes' disagreement is reported as the
measurement's repeatability, beside the predictor's error, so a reader can tell one from the other.

Each pass also measures the full model just before every sub-network: the drift reference. The report
adds the error of the predicted ratio to the full model (what the search's `--latency-ratio` budgets
use), measured as the median over passes of each pass's ratio to the full model run just before: a
change of the machine's speed between profiling and validation, or between passes, cancels out. Its
repeatability between passes is reported too.

A run saves every measurement as it goes and resumes where it stopped; called again once finished, it
only writes its report.
"""
from __future__ import annotations

import functools
import logging
import random
import shutil
from pathlib import Path
from typing import Any

from . import runner
from .blocks import deployed_inputs, measure_torch_model
from .common import HwnasError, atomic_write_json, read_json
from .defaults import DEFAULT_MODEL
from .deploy import build_deployed
from .loading import read_llama_config, resolve_model
from .predictor import LatencyPredictor, LatencyTable
from .space import SearchSpace, SubnetConfig
from .supernet import Supernet
from .tables import e2e_timing, model_signature, phase_key

log = logging.getLogger(__name__)
VALIDATION_SEED = 1_000_000  # far from the calibration seeds (10_000 + i)


def spread_configs(space: SearchSpace, n: int, seed: int, exclude: list[SubnetConfig] = ()) -> list[SubnetConfig]:
    """`n` seeded samples spread evenly over the parameter range: `n` quantiles of 40*n random draws."""
    rng = random.Random(seed)
    pool, seen = [], {c for c in exclude}
    while len(pool) < 40 * n:
        c = space.sample(VALIDATION_SEED + rng.randrange(1 << 30))
        if c not in seen:
            seen.add(c)
            pool.append(c)
    pool.sort(key=_params)
    return [pool[round(i * (len(pool) - 1) / max(1, n - 1))] for i in range(n)]


def _params(cfg: SubnetConfig) -> int:
    return sum(3 * w + 2 * h + 2 * kv for w, h, kv in zip(cfg.mlp, cfg.heads, cfg.kv_heads))


def _target(t: LatencyTable) -> str:
    return f"{t.runtime}-{t.precision}"


def _artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.suffix in (".onnx", ".onnx_data", ".bin", ".data"))


def validate_latency(*, model: str = DEFAULT_MODEL, tables: list[Path], samples: int = 30, seed: int = 0,
                     out: Path, passes: int = 5, allow_foreign_table: bool = False, keep_artifacts: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """Validate each table's predictor against end-to-end measurements; writes `out/latency_validation.json`."""
    import torch
    from .progress import tqdm

    if samples < 3:
        raise HwnasError(f"samples must be at least 3 to rank sub-networks, got {samples}")
    if passes < 1:
        raise HwnasError(f"passes must be at least 1, got {passes}")
    if not tables:
        raise HwnasError("give at least one --table")
    config = read_llama_config(resolve_model(model))
    preds = [LatencyPredictor.load(t) for t in tables]
    threads = {p.table.header["device"].get("threads") for p in preds}
    if len(threads) != 1 or len({p.table.header["phases"].__repr__() for p in preds}) != 1:
        raise HwnasError("tables validated together must share threads and phases; validate them separately")
    threads = threads.pop()
    here = runner.device_id(runner.cpu_info(), threads)
    for p in preds:
        p.table.check_model(model_signature(config))
        p.table.check_target(device_id=here if p.table.header["device"]["kind"] == "cpu" else None,
                             allow_foreign=allow_foreign_table)
        if p.table.header["device"]["kind"] != "cpu":
            raise HwnasError(f"{p.table.path} is a {p.table.header['device']['kind']} table; this validation runs on cpu")
    targets = {_target(p.table): p for p in preds}
    if len(targets) != len(preds):
        raise HwnasError("two tables have the same runtime and precision; validate them separately")
    space = SearchSpace.from_hf_config(config)
    cal = [SubnetConfig.from_dict(c["config"]) for p in preds for c in p.table.calibration]
    cfgs = spread_configs(space, samples, seed, cal)
    phases = [(ph, t) for ph, ts in preds[0].table.header["phases"].items() for t in ts]
    out = Path(out)
    state_path = out / "measurements.json"
    state = read_json(state_path, "validation state") if state_path.is_file() else {}
    key_args = {"model": model, "tables": sorted(targets), "samples": samples, "seed": seed, "passes": passes,
                "reference": "full, before every sub-network"}
    if state and state.get("args") != key_args:
        raise HwnasError(f"{out} holds a validation run with other arguments ({state.get('args')}); use another --out")
    state = state or {"args": key_args, "configs": [c.to_dict() for c in cfgs], "m": {}, "bytes": {}}
    torch.set_num_threads(threads)
    art = out / "artifacts"
    isa = runner.cpu_info()["isa"]
    deployed = sorted((t for t, pred in targets.items() if pred.table.runtime != "torch"),
                      key=lambda t: t != "onnxruntime-fp32")
    nets = {**{str(i): c for i, c in enumerate(cfgs)}, "ref": space.max_config()}
    # the full model (the drift reference) is measured just before every sub-network, in every pass:
    # one measurement per pass is as exposed to a disturbed moment as any other
    order = [str(i) for i in range(len(cfgs))]
    jobs = [(k, j, net, t, ph, tok) for k in range(passes) for i in (order if k % 2 == 0 else order[::-1])
            for j, net in ((f"ref@{i}", "ref"), (i, i)) for t in targets for ph, tok in phases]
    jobs = [(f"{k}/{j}/{t}/{phase_key(ph, tok)}", net, t, ph, tok) for k, j, net, t, ph, tok in jobs]
    # a net is built (and the model loaded) only while it still has something to measure or weigh: a finished
    # run, called again, only writes its report
    todo = {net for key, net, *_ in jobs if key not in state["m"]}
    todo |= {i for i in nets for t in targets if f"{i}/{t}" not in state["bytes"]}
    sn = Supernet.from_pretrained(model, calibration=None) if todo else None
    with tqdm(total=len(todo), desc="build sub-networks", unit="net", disable=not progress) as bar:
        for i, cfg in ((i, c) for i, c in nets.items() if i in todo):
            sub = None  # extracted once per sub-network, only when something is still to build or weigh
            for t in deployed:
                d = art / i / t
                if not (d / "done").is_file():
                    shutil.rmtree(d, ignore_errors=True)
                    runtime, precision = targets[t].table.runtime, targets[t].table.precision
                    fp32 = art / i / "onnxruntime-fp32"  # quantize the fp32 export when it is validated too
                    src = fp32 / "model.onnx" if (fp32 / "done").is_file() and runtime == "onnxruntime" else None
                    sub = sub if sub is not None else sn.extract(cfg)
                    f = build_deployed(sub, runtime, precision, d, isa=isa, onnx_fp32=src)
                    (d / "done").write_text(f.name)
                state["bytes"][f"{i}/{t}"] = _artifact_bytes(d / (d / "done").read_text())
            for t in targets:
                if t.startswith("torch"):
                    sub = sub if sub is not None else sn.extract(cfg)
                    state["bytes"][f"{i}/{t}"] = sum(p.numel() * p.element_size() for p in sub.parameters())
            del sub
            bar.update(1)
    flusher, sig = runner.CacheFlusher(), model_signature(config)
    # torch tables measure extracted models: keep the reference and the sub-network in hand (it alternates
    # between them, one phase after another) instead of extracting one per measurement
    extract = functools.lru_cache(maxsize=2)(sn.extract) if sn is not None else None
    with tqdm(total=len(jobs), desc="measure", unit="run", disable=not progress) as bar:
        for key, net, t, ph, tok in jobs:
            if key not in state["m"]:
                state["m"][key] = _measure(extract, nets[net], targets[t].table.header, art / net / t, ph, tok, threads,
                                           flusher, sig)["median_ms"]
                atomic_write_json(state_path, state)
            bar.update(1)
    report = _report(targets, cfgs, nets["ref"], phases, state, passes)
    atomic_write_json(out / "latency_validation.json", report)
    scatter_plot(report, out / "latency_scatter.png")
    if not keep_artifacts:
        shutil.rmtree(art, ignore_errors=True)
    return {"out": str(out), **{t: {pk: {**{k: r[k] for k in ("within_10pct", "mape", "kendall_tau", "n")},
                                         "ratio_within_10pct": r["ratio_to_full"]["within_10pct"]}
                                     for pk, r in v["phases"].items()} for t, v in report["tables"].items()}}


def _measure(extract: Any, cfg: SubnetConfig, header: dict[str, Any], folder: Path, phase: str, tokens: int,
             threads: int, flusher: Any, sig: dict[str, int]) -> dict[str, Any]:
    runtime = header["runtime"]
    w, r = e2e_timing(header)
    if runtime == "torch":
        return measure_torch_model(extract(cfg), phase, tokens, warmup=w, repeats=r)
    item = {"file": (folder / "done").read_text(), **deployed_inputs(cfg, sig, runtime, phase, tokens)}
    return runner.measure_item(item, folder, runtime=runtime, threads=threads, warmup=w, repeats=r, flush=flusher)


def _report(targets: dict[str, LatencyPredictor], cfgs: list[SubnetConfig], ref: SubnetConfig,
            phases: list[tuple[str, int]], state: dict[str, Any], passes: int) -> dict[str, Any]:
    import numpy as np
    from scipy import stats

    def agreement(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
        err = (pred - meas) / meas
        return {"within_10pct": float(np.mean(np.abs(err) <= 0.10)), "mape": float(np.mean(np.abs(err))),
                "max_abs_err": float(np.max(np.abs(err))), "mean_signed_err": float(np.mean(err))}

    def between_passes(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """Every pair of passes of the same sub-network: how far the measurement repeats itself (relative)."""
        pairs = [(a, b) for a in range(passes) for b in range(a + 1, passes)]
        return np.array([np.abs(x[:, a] - x[:, b]) / centre for a, b in pairs]) if pairs else np.zeros((1, len(x)))

    out: dict[str, Any] = {"samples": len(cfgs), "passes": passes, "configs": [c.to_dict() for c in cfgs], "tables": {}}
    for t, p in targets.items():
        entry: dict[str, Any] = {"table": str(p.table.path), "phases": {}}
        for ph, tok in phases:
            pk = phase_key(ph, tok)
            runs = np.array([[state["m"][f"{k}/{i}/{t}/{pk}"] for k in range(passes)] for i in range(len(cfgs))])
            meas = np.median(runs, 1)
            pred = np.array([p.latency_ms(c, ph, tok) for c in cfgs])
            rep = between_passes(runs, meas)
            ref_runs = np.array([[state["m"][f"{k}/ref@{i}/{t}/{pk}"] for k in range(passes)]
                                 for i in range(len(cfgs))])
            ref_meas, ref_pred = float(np.median(ref_runs)), p.latency_ms(ref, ph, tok)
            # the ratio to the full model measured just before, in the same pass, then its median over passes:
            # a change of the machine's speed between passes (or between sub-networks) cancels out
            ratios = runs / ref_runs
            ratio_meas = np.median(ratios, 1)
            ratio_rep = between_passes(ratios, ratio_meas)
            entry["phases"][pk] = {
                "n": len(cfgs), **agreement(pred, meas),
                "kendall_tau": float(stats.kendalltau(pred, meas).statistic),
                "spearman": float(stats.spearmanr(pred, meas).statistic),
                "repeatability": {"median_pass_diff": float(np.median(rep)), "max_pass_diff": float(np.max(rep)),
                                  "within_10pct_between_passes": float(np.mean(rep <= 0.10))},
                "ratio_to_full": {**agreement(pred / ref_pred, ratio_meas),
                                  "kendall_tau": float(stats.kendalltau(pred, ratio_meas).statistic),
                                  "measured": ratio_meas.round(4).tolist(),
                                  "within_10pct_between_passes": float(np.mean(ratio_rep <= 0.10)),
                                  "full_measured_ms": round(ref_meas, 3),
                                  "full_predicted_ms": round(ref_pred, 3), "full_passes_ms": ref_runs.round(3).tolist(),
                                  "full_repeat_median_diff": float(np.median(np.abs(ref_runs - ref_meas)) / ref_meas)},
                "predicted_ms": pred.round(3).tolist(), "measured_ms": meas.round(3).tolist(),
                "passes_ms": runs.round(3).tolist(),
            }
        size_pred = np.array([p.bytes(c) for c in cfgs])
        size_real = np.array([state["bytes"][f"{i}/{t}"] for i in range(len(cfgs))])
        entry["size"] = {"mape": float(np.mean(np.abs(size_pred - size_real) / size_real)),
                         "predicted_bytes": size_pred.tolist(), "artifact_bytes": size_real.tolist()}
        out["tables"][t] = entry
    return out


def scatter_plot(report: dict[str, Any], path: Path) -> Path:
    """Predicted against measured latency per table and phase, with the +-10% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = [(t, pk, r) for t, v in report["tables"].items() for pk, r in v["phases"].items()]
    cols = len({pk for _, pk, _ in cells})
    rows = len(report["tables"])
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (t, pk, r) in zip(axes.flat, cells):
        m, p = np.array(r["measured_ms"]), np.array(r["predicted_ms"])
        lo, hi = 0.9 * min(m.min(), p.min()), 1.1 * max(m.max(), p.max())
        xs = np.linspace(lo, hi, 50)
        ax.fill_between(xs, 0.9 * xs, 1.1 * xs, color="tab:green", alpha=0.15, label="±10%")
        ax.plot(xs, xs, "k--", lw=0.8)
        ax.scatter(m, p, s=14)
        ax.set(xlabel="measured ms", ylabel="predicted ms", xlim=(lo, hi), ylim=(lo, hi),
               title=f"{t} {pk}\nwithin10%={r['within_10pct']:.2f} (ratio to full "
                     f"{r['ratio_to_full']['within_10pct']:.2f}) tau={r['kendall_tau']:.2f} n={r['n']}")
        ax.title.set_fontsize(9)
    axes.flat[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path

