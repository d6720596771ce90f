"""`hwnas profile`: measure a latency table on this device, or export its blocks for another one.

torch tables are measured in-process. onnxruntime and OpenVINO tables are built as a folder of block
graphs and calibration sub-networks with a manifest (`--export-blocks`), timed by `python -m hwnas.runner`
(here or on the target device), and turned into a table by `import_table` (`--import-measurements`).
Every job is measured in ROUNDS interleaved rounds; a table keeps the median of the round medians.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from . import runner
from .blocks import block_inputs, build_block, deployed_inputs, measure_torch_block, measure_torch_model, per_copy
from .common import HwnasError, atomic_write_json, home, read_json
from .defaults import DEFAULT_MODEL
from .deploy import build_deployed
from .loading import read_llama_config, resolve_model
from .quantize import settings_for
from .recalibrate import recalibrate as run_recalibrate
from .space import SearchSpace
from .supernet import Supernet
from .tables import (PRECISIONS, RUNTIMES, TABLE_FORMAT, Block, blocks_for, calibration_configs, default_table_path,
                     e2e_timing, mixed_precision, model_label, model_signature, phase_key, table_name)

log = logging.getLogger(__name__)
MIN_CALIBRATION = 3  # fewest end-to-end sub-networks that fit a correction and leave one out to check it
ROUNDS = 3  # interleaved measurement rounds; a table keeps the median of the round medians


def device_info(device: str, threads: int) -> dict[str, Any]:
    if device == "cpu":
        info = runner.cpu_info()
    elif device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise HwnasError("device 'cuda' asked for, but torch sees no CUDA device")
        info = {"kind": "cuda", "name": torch.cuda.get_device_name(0)}
    else:
        raise HwnasError(f"device {device!r} is not supported; expected cpu or cuda")
    return {**info, "threads": threads, "id": runner.device_id(info, threads)}


def _check_target(runtime: str, precision: str, device: str, threads: int | None) -> int:
    if runtime not in RUNTIMES:
        raise HwnasError(f"runtime {runtime!r} is not supported; expected one of {list(RUNTIMES)}")
    if precision not in PRECISIONS[runtime]:
        raise HwnasError(f"precision {precision!r} is not available for {runtime}; expected one of {list(PRECISIONS[runtime])}")
    if device not in ("cpu", "cuda"):
        raise HwnasError(f"device {device!r} is not supported; expected cpu or cuda")
    if device == "cpu" and precision in ("fp16", "bf16"):
        raise HwnasError(f"precision {precision} is for --device cuda; on cpu use fp32 (torch) or int8/int4 (onnxruntime, openvino)")
    if threads is not None and threads < 1:
        raise HwnasError(f"threads must be at least 1, got {threads}")
    return threads or os.cpu_count() or 1


def _phases(prefill: Iterable[int], decode: Iterable[int]) -> dict[str, list[int]]:
    phases = {"prefill": sorted({int(t) for t in prefill}), "decode": sorted({int(t) for t in decode})}
    for phase, lengths in phases.items():
        if not lengths or min(lengths) < 1:
            raise HwnasError(f"{phase} lengths must be positive token counts, got {lengths}")
    return phases


def _check_lengths(phases: dict[str, list[int]], positions: int, model: str) -> None:
    """Prompt lengths, and cache lengths plus the decoded token, must fit the model's positions."""
    if positions <= 0:
        return
    for phase, extra in (("prefill", 0), ("decode", 1)):
        if max(phases[phase]) + extra > positions:
            raise HwnasError(f"--{phase} {max(phases[phase])} does not fit {model}'s {positions} positions; "
                             f"expected lengths up to {positions - extra}")


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def profile(*, model: str = DEFAULT_MODEL, runtime: str = "onnxruntime", precision: str = "fp32", device: str = "cpu",
            threads: int | None = None, prefill: Iterable[int] = (128,), decode: Iterable[int] = (128,),
            calibration: int = 8, warmup: int = 5, repeats: int = 30, out: str | Path | None = None,
            resume: bool = False, overwrite: bool = False, export_blocks: str | Path | None = None,
            import_measurements: str | Path | None = None, recalibrate: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Measure the latency table of `model` for `runtime`/`precision` on this device; returns a summary.

    With `export_blocks` it only writes the graphs and their manifest, for `python -m hwnas.runner`
    on another device; `import_measurements` turns that folder, once measured, into a table.
    `recalibrate` measures an existing table's calibration sub-networks again (hwnas.recalibrate).
    """
    if recalibrate and (export_blocks is not None or import_measurements is not None or resume or overwrite):
        raise HwnasError("--recalibrate measures an existing table's calibration again; it takes none of "
                         "--export-blocks, --import-measurements, --resume or --overwrite")
    if import_measurements is not None:
        return import_table(Path(import_measurements), out=out, overwrite=overwrite)
    threads = _check_target(runtime, precision, device, threads)
    if recalibrate:
        dev = device_info(device, threads)
        out = Path(out) if out else default_table_path(model_label(model, resolve_model(model)), dev["id"], runtime,
                                                       precision)
        if not out.is_file():
            raise HwnasError(f"no table {out} to recalibrate; profile it first (hwnas profile without --recalibrate)")
        return run_recalibrate(table=out, model=model, progress=progress)
    if warmup < 0 or repeats < 3:
        raise HwnasError(f"need warmup >= 0 and repeats >= 3, got warmup={warmup}, repeats={repeats}")
    if calibration < 0:
        raise HwnasError(f"calibration must be >= 0 sub-networks, got {calibration}")
    if warmup == 0:
        log.warning("--warmup 0: each block's first runs (allocation, caches) are timed too; the table will be noisy")
    phases = _phases(prefill, decode)
    model_dir = resolve_model(model)
    config = read_llama_config(model_dir)
    _check_lengths(phases, int(config.get("max_position_embeddings") or 0), model)
    space = SearchSpace.from_hf_config(config)
    label = model_label(model, model_dir)
    header = {"model": label, "model_signature": model_signature(config),
              "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
              "max_position_embeddings": int(config.get("max_position_embeddings", 0)), "runtime": runtime, "precision": precision,
              "phases": phases, "batch": 1, "warmup": warmup, "repeats": repeats, "trim_percentiles": [5, 95],
              "search_space": space.to_dict(), "versions": runner.versions(runtime)}
    if mixed := mixed_precision(runtime, precision):
        header["mixed_precision"] = mixed
    if runtime == "torch":
        if export_blocks is not None:
            raise HwnasError("--export-blocks writes graphs for onnxruntime or openvino; torch blocks are measured in-process")
        dev = device_info(device, threads)
        header["device"] = dev
        out = Path(out) if out else default_table_path(label, dev["id"], runtime, precision)
        return _profile_torch(model, model_dir, space, header, out, calibration, resume, overwrite, progress)
    if device == "cuda" and runtime == "openvino":
        raise HwnasError("OpenVINO runs on cpu here (its GPU plugin is for Intel GPUs); use --device cpu")
    isa = runner.cpu_info()["isa"]
    if out is not None and Path(out).exists() and not (overwrite or resume) and export_blocks is None:
        raise HwnasError(f"table {out} exists; pass --overwrite to measure again")
    work = Path(export_blocks) if export_blocks is not None else home() / "profile" / Path(
        table_name(label, runner.device_id(runner.cpu_info(), threads) if device == "cpu" else device, runtime, precision)).stem
    manifest = _write_manifest(work, model, space, header, config, calibration, threads, isa, resume,
                               overwrite or export_blocks is None and not resume, progress)
    if export_blocks is not None:
        return {"blocks": str(work), "items": len(manifest["items"]),
                "next": [f"python -m hwnas.runner {work}   (on the target device)",
                         f"hwnas profile --import-measurements {work}"]}
    runner.run(work, threads=threads, device=device, progress=progress)
    return import_table(work, out=out, overwrite=True)


def _start(out: Path, header: dict[str, Any], resume: bool, overwrite: bool) -> dict[str, Any]:
    """The table to continue (`resume`) or a fresh one; refuses to clobber without `overwrite`."""
    if out.exists() and not (resume or overwrite):
        raise HwnasError(f"table {out} exists; pass --resume to continue it or --overwrite to measure again")
    if out.exists() and resume:
        old = read_json(out, "latency table")
        keep = ("model_signature", "runtime", "precision", "phases", "device")
        diff = [k for k in keep if old.get("header", {}).get(k) != header.get(k)]
        if diff:
            raise HwnasError(f"cannot resume {out}: its {', '.join(diff)} differ from this run's")
        return old
    return {"format": TABLE_FORMAT, "header": {**header, "complete": False}, "entries": {}, "calibration": []}


def _profile_torch(model: str, model_dir: Path, space: SearchSpace, header: dict[str, Any], out: Path,
                   calibration: int, resume: bool, overwrite: bool, progress: bool) -> dict[str, Any]:
    import torch
    from .progress import tqdm
    from transformers import LlamaConfig

    table = _start(out, header, resume, overwrite)
    device, threads = header["device"]["kind"], header["device"]["threads"]
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[header["precision"]]
    if device == "cpu":
        torch.set_num_threads(threads)
    config = LlamaConfig(**{k: v for k, v in read_json(model_dir / "config.json").items() if k != "model_type"})
    w, r = header["warmup"], header["repeats"]
    e2e_w, e2e_r = e2e_timing(header)
    blocks = blocks_for(space, header["phases"])
    cal = calibration_configs(space, calibration)
    # One job per block and per (calibration sub-network, phase); every job is measured in ROUNDS
    # interleaved rounds, and `pending` keeps finished rounds so that --resume loses at most one.
    jobs: list[tuple[str, Any]] = [(b.key, b) for b in blocks]
    jobs += [(f"e2e.{k}/{phase_key(ph, t)}", (cfg, ph, t)) for k, cfg in enumerate(cal)
             for ph, ts in header["phases"].items() for t in ts]
    pending = table.setdefault("pending", {})
    done = set(table["entries"]) | {f"e2e.{c['index']}/{c['phase']}" for c in table["calibration"]}
    sn = subs = None
    with tqdm(total=len(jobs) * ROUNDS, desc="profile torch", unit="run", disable=not progress) as bar:
        bar.update(sum(ROUNDS if key in done else len(pending.get(key, [])) for key, _ in jobs))
        for rnd in range(ROUNDS):
            for key, job in jobs:
                if key in done or len(pending.get(key, [])) > rnd:
                    continue
                bar.set_postfix_str(f"{key} round {rnd + 1}")
                if isinstance(job, Block):
                    stats = measure_torch_block(job, config, device=device, dtype=dtype, warmup=w,
                                                repeats=max(3, r // ROUNDS))
                else:
                    if subs is None:  # channel order does not change latency: skip the importance pass
                        sn = Supernet.from_pretrained(model, dtype={"fp32": "float32", "fp16": "float16",
                                                      "bf16": "bfloat16"}[header["precision"]], device=device,
                                                      calibration=None)
                        subs = {c: sn.extract(c) for c in cal}
                    cfg, ph, t = job
                    stats = measure_torch_model(subs[cfg], ph, t, warmup=e2e_w, repeats=e2e_r)
                pending.setdefault(key, []).append({k: v for k, v in stats.items() if k != "samples_ms"})
                if len(pending[key]) == ROUNDS:
                    merged = runner.merge_rounds([{"measured": m} for m in pending.pop(key)])
                    if isinstance(job, Block):
                        table["entries"][key] = {**merged["measured"], "copies": job.copies, "rounds": ROUNDS}
                    else:
                        cfg, ph, t = job
                        table["calibration"].append({"config": cfg.to_dict(), "phase": phase_key(ph, t),
                                                     "index": int(key.split("/")[0][4:]), "measured": merged["measured"],
                                                     "rounds_ms": merged["rounds_ms"]})
                atomic_write_json(out, table)
                bar.update(1)
    del sn, subs
    table.pop("pending", None)
    table["header"].update(complete=True, date=datetime.date.today().isoformat())
    atomic_write_json(out, table)
    return {"table": str(out), "entries": len(table["entries"]), "calibration": len(table["calibration"])}


def _block_file(block: Block, runtime: str) -> str:
    return f"blocks/{block.key.replace('/', '__')}.{'onnx' if runtime == 'onnxruntime' else 'xml'}"


def _write_manifest(work: Path, model: str, space: SearchSpace, header: dict[str, Any], config_dict: dict[str, Any],
                    calibration: int, threads: int, isa: str, resume: bool, fresh: bool,
                    progress: bool) -> dict[str, Any]:
    """Export (and quantize) every block graph and the calibration sub-networks into `work`, with a manifest."""
    from .progress import tqdm
    from transformers import LlamaConfig

    runtime, precision = header["runtime"], header["precision"]
    header["quantization"] = settings_for(runtime, precision, isa)
    config = LlamaConfig(**{k: v for k, v in config_dict.items() if k != "model_type"})
    sig = header["model_signature"]
    builds: list[tuple[str, Any]] = []
    block_items = []
    per_round = max(3, header["repeats"] // ROUNDS)
    fused = header["quantization"].get("fused_attention", False)
    for b in blocks_for(space, header["phases"], header.get("mixed_precision", ())):
        block_items.append({"key": b.key, "kind": "block", "file": _block_file(b, runtime), "copies": b.copies,
                            "repeats": per_round, "inputs": block_inputs(b, config, fused=fused)})
        builds.append((block_items[-1]["file"], b))
    e2e_w, e2e_r = e2e_timing(header)
    cal = calibration_configs(space, calibration)
    files = [f"e2e/{k}/" + ("model" if runtime == "onnxruntime" else "openvino_model") +
             ("" if precision == "fp32" else f"_{precision}") + (".onnx" if runtime == "onnxruntime" else ".xml")
             for k in range(len(cal))]
    e2e_items = [{"key": f"e2e.{k}/{phase_key(phase, t)}", "kind": "e2e", "file": files[k], "phase": phase_key(phase, t),
                  "config": cfg.to_dict(), "warmup": e2e_w, "repeats": e2e_r, **deployed_inputs(cfg, sig, runtime, phase, t)}
                 for k, cfg in enumerate(cal) for phase, lengths in header["phases"].items() for t in lengths]
    builds += list(zip(files, cal))
    # Rounds over everything, blocks and whole sub-networks alike: drift of the machine spreads over all of them.
    items = [{**it, "key": f"{it['key']}/r{r}"} for r in range(ROUNDS) for it in block_items + e2e_items]
    manifest = {"format": runner.FORMAT, "runtime": runtime, "precision": precision, "threads": threads,
                "warmup": header["warmup"], "repeats": header["repeats"], "table_header": header, "items": items}
    manifest["digest"] = _digest({k: manifest[k] for k in ("runtime", "precision", "items")})
    old = work / runner.MANIFEST
    if old.is_file():
        prev = runner.read_manifest(work)
        if resume and prev.get("digest") != manifest["digest"]:
            raise HwnasError(f"cannot resume in {work}: its manifest was written for other blocks or settings "
                             f"({prev.get('runtime')}-{prev.get('precision')}); remove it or drop --resume")
        if not resume and not fresh:
            raise HwnasError(f"{work} already holds a block manifest; pass --resume to continue it or choose another folder")
        if not resume:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / runner.MANIFEST, manifest)
    todo = [(f, what) for f, what in builds if not (work / f).is_file()]
    sn = None
    with tqdm(total=len(builds), initial=len(builds) - len(todo), desc=f"export {runtime}-{precision}", unit="graph",
              disable=not progress) as bar:
        for f, what in todo:
            bar.set_postfix_str(f)
            if isinstance(what, Block):
                build_block(what, config, work / f, runtime, precision, isa, fused=fused)
            else:
                if sn is None:
                    sn = Supernet.from_pretrained(model, calibration=None)
                tmp = (work / f).parent.with_name(f".{(work / f).parent.name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                built = build_deployed(sn.extract(what), runtime, precision, tmp, isa=isa)
                assert built.name == Path(f).name, (built, f)
                shutil.rmtree((work / f).parent, ignore_errors=True)
                os.replace(tmp, (work / f).parent)
            bar.update(1)
    return manifest


def import_table(work: Path, *, out: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Turn a measured block folder (manifest plus the runner's measurements) into a latency table."""
    manifest = runner.read_manifest(work)
    meas_path = work / runner.MEASUREMENTS
    if not meas_path.is_file():
        raise HwnasError(f"{work} has no {runner.MEASUREMENTS}; run `python -m hwnas.runner {work}` on the device first")
    meas = read_json(meas_path, "measurements")
    if meas.get("header", {}).get("manifest_digest") != manifest.get("digest"):
        raise HwnasError(f"{meas_path} was measured for another manifest than {work / runner.MANIFEST}")
    missing = [it["key"] for it in manifest["items"] if it["key"] not in meas.get("items", {})]
    if missing:
        raise HwnasError(f"{len(missing)} items of {work} are not measured yet (first: {missing[:3]}); "
                         f"run `python -m hwnas.runner {work}` again to finish")
    mh = meas["header"]
    header = {**manifest["table_header"], "device": mh["device"], "complete": True,
              "date": datetime.date.today().isoformat(), "cache_flush": mh.get("cache_flush")}
    header["versions"] = {**header.get("versions", {}), mh["runtime"] + "_device": mh["runtime_version"],
                          "python_device": mh["python"]}
    rounds: dict[str, list[dict[str, Any]]] = {}
    for it in manifest["items"]:
        rounds.setdefault(it["key"].rsplit("/r", 1)[0], []).append({**it, "measured": meas["items"][it["key"]]})
    table = {"format": TABLE_FORMAT, "header": header, "entries": {}, "calibration": []}
    for key, rs in rounds.items():
        merged = runner.merge_rounds(rs)
        if rs[0]["kind"] == "block":
            table["entries"][key] = {**per_copy(merged["measured"], rs[0].get("copies", 1)), "rounds": len(rs)}
        else:
            table["calibration"].append(merged)
    out = Path(out) if out else default_table_path(header["model"], header["device"]["id"], header["runtime"], header["precision"])
    if out.exists() and not overwrite:
        raise HwnasError(f"table {out} exists; pass --overwrite to replace it")
    atomic_write_json(out, table)
    return {"table": str(out), "entries": len(table["entries"]), "calibration": len(table["calibration"]),
            "device": header["device"]["id"]}
