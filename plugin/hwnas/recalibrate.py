"""Re-measure a latency table's calibration sub-networks on this device, now, and refit its correction.

A device's speed drifts between sessions (other tenants, clocks, thermal state), a shift no block sum can
know about. Re-measuring the table's calibration sub-networks end to end, as the profile did, is much
cheaper than re-profiling every block; the predictor then fits its correction to the device as it is now.

    hwnas profile --runtime onnxruntime --precision int8 --recalibrate     (the default table of this target)

Progress is saved after every measurement under `.cache/hwnas/recalibrate/<table>/`; a second call resumes.
The table is rewritten atomically once every point is measured; its header keeps the previous
calibration's date and points (`recalibrated`).
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import shutil
from pathlib import Path
from typing import Any

from . import runner
from .blocks import deployed_inputs, measure_torch_model
from .common import HwnasError, atomic_write_json, home, read_json
from .deploy import build_deployed
from .loading import read_llama_config, resolve_model
from .predictor import LatencyPredictor, LatencyTable, check_table
from .quantize import settings_for
from .space import SubnetConfig
from .supernet import Supernet
from .tables import e2e_timing, model_signature

# More rounds than a profile's 3: a point is cheap here, and the median of 7 survives 3 disturbed rounds
ROUNDS = 7


def recalibrate(*, table: Path, model: str, progress: bool = True) -> dict[str, Any]:
    """Measure `table`'s calibration sub-networks again here and replace its calibration; returns a summary."""
    import torch
    from .progress import tqdm

    table = Path(table)
    t = LatencyTable.load(table)
    h = t.header
    if h["device"]["kind"] != "cpu":
        raise HwnasError(f"{table} is a {h['device']['kind']} table; recalibration measures on cpu here")
    threads = h["device"]["threads"]
    cpu = runner.cpu_info()
    isa = cpu["isa"]
    # the same device, the same model and what this code deploys: otherwise the points would not belong to the blocks
    check_table(table, signature=model_signature(read_llama_config(resolve_model(model))), runtime=t.runtime,
                precision=t.precision, device_id=runner.device_id(cpu, threads),
                quantization=settings_for(t.runtime, t.precision, isa))
    if not t.calibration:
        raise HwnasError(f"{table} has no calibration points to measure again (profiled with --calibration 0)")
    points = [(SubnetConfig.from_dict(c["config"]), c["phase"]) for c in t.calibration]
    digest = hashlib.sha256(repr([ROUNDS] + [(c.to_dict(), p) for c, p in points]).encode()).hexdigest()[:16]
    work = home() / "recalibrate" / table.stem
    state_path = work / "state.json"
    state = read_json(state_path, "recalibration state") if state_path.is_file() else None
    if not state or state.get("digest") != digest:
        shutil.rmtree(work, ignore_errors=True)
        state = {"digest": digest, "rounds": {}}
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)

    @functools.lru_cache(maxsize=1)
    def supernet() -> Supernet:  # loaded only when a network is still to build or (torch) to run
        return Supernet.from_pretrained(model, calibration=None)  # channel order does not change latency

    configs = list(dict.fromkeys(c for c, _ in points))
    files: dict[SubnetConfig, Path] = {}
    if t.runtime != "torch":
        for i, cfg in enumerate(tqdm(configs, desc=f"build {t.runtime}-{t.precision}", unit="net", disable=not progress)):
            d = work / f"net{i}"
            if not (d / "done").is_file():
                shutil.rmtree(d, ignore_errors=True)
                (d / "done").write_text(build_deployed(supernet().extract(cfg), t.runtime, t.precision, d, isa=isa).name)
            files[cfg] = d
        supernet.cache_clear()  # the deployed files are all the runtime needs: free the weights before timing
    # torch: a config's two phases are measured one after the other; extract it once for both
    extract = functools.lru_cache(maxsize=1)(lambda cfg: supernet().extract(cfg))
    w, r = e2e_timing(h)
    flusher, sig = runner.CacheFlusher(), h["model_signature"]
    jobs = [(k, i) for k in range(ROUNDS) for i in range(len(points))]
    with tqdm(total=len(jobs), desc="recalibrate", unit="run", disable=not progress) as bar:
        for k, i in jobs:
            key = f"{i}/r{k}"
            if key not in state["rounds"]:
                cfg, pk = points[i]
                phase, tokens = pk.split(".")[0], int(pk.split(".")[1][1:])
                if t.runtime == "torch":
                    m = measure_torch_model(extract(cfg), phase, tokens, warmup=w, repeats=r)
                else:
                    d = files[cfg]
                    item = {"file": (d / "done").read_text(), **deployed_inputs(cfg, sig, t.runtime, phase, tokens)}
                    m = runner.measure_item(item, d, runtime=t.runtime, threads=threads, warmup=w, repeats=r,
                                            flush=flusher)
                state["rounds"][key] = {k2: v for k2, v in m.items() if k2 != "samples_ms"}
                atomic_write_json(state_path, state)
            bar.update(1)
    data = read_json(table, "latency table")
    old = data["calibration"]
    data["calibration"] = [
        {**runner.merge_rounds([{"config": c["config"], "phase": c["phase"], "measured": state["rounds"][f"{i}/r{k}"]}
                          for k in range(ROUNDS)]), **({"index": c["index"]} if "index" in c else {})}
        for i, c in enumerate(old)]
    data["header"]["recalibrated"] = {
        "date": datetime.date.today().isoformat(), "previous_date": h.get("recalibrated", {}).get("date", h.get("date")),
        "previous_ms": [round(c["measured"]["median_ms"], 4) for c in old]}
    atomic_write_json(table, data)
    shutil.rmtree(work, ignore_errors=True)
    shift = [n["measured"]["median_ms"] / o["measured"]["median_ms"] for n, o in zip(data["calibration"], old)]
    p = LatencyPredictor.load(table)
    return {"table": str(table), "points": len(points), "median_shift": round(sorted(shift)[len(shift) // 2], 3),
            "corrections": {pk: {"form": c.form, "loo_error_pct": round(c.loo_error_pct, 2)}
                            for pk, c in sorted(p.corrections.items())}}
