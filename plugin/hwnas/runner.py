"""Measure exported graphs on the device they will run on: ``python -m hwnas.runner DIR``.

This file needs only the standard library, numpy and onnxruntime or openvino: no torch, no
transformers, no other hwnas module. Copy it to an edge box on its own if hwnas is not installed
there. ``DIR`` is what ``hwnas profile --export-blocks DIR`` wrote: a ``manifest.json`` and the
graphs it names. Measurements go to ``DIR/measurements.json`` after every item, so a killed run
loses at most the item in progress and the next run resumes where it stopped.

Timing: ``warmup`` untimed runs, then ``repeats`` timed runs; before each timed run the last-level
cache is flushed (batch-1 decode streams its weights from memory, and an isolated block kept hot
in cache would look faster than it runs inside the whole model); samples outside the 5th-95th
percentile are discarded (as DyNAS-T does) before the mean and std are taken.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

MANIFEST = "manifest.json"
MEASUREMENTS = "measurements.json"
FORMAT = "hwnas-blocks/1"


class RunnerError(ValueError):
    """Bad manifest, graph or argument."""


# ----------------------------------------------------------------------------- device description
def cpu_info() -> dict[str, Any]:
    """CPU model, core count, the ISA level that decides int8/int4 kernels, and the part number.

    `part` is the microarchitecture as /proc/cpuinfo numbers it (x86 ``f<cpu family>m<model>``, ARM
    ``<implementer>-<part>``), or None where it does not say. Virtual machines often report only a vendor
    name ("AMD EPYC"): two CPU generations then share a name, but not a part.
    """
    name, flags, part = platform.processor() or platform.machine(), set(), None
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        name = m.group(1).strip() if m else name
        m = re.search(r"^(flags|Features)\s*:\s*(.+)$", text, re.M)
        flags = set(m.group(2).split()) if m else set()
        fam, mod = (re.search(rf"^{k}\s*:\s*(\w+)\s*$", text, re.M) for k in ("cpu family", "model"))
        imp, arm = (re.search(rf"^{k}\s*:\s*(\w+)\s*$", text, re.M) for k in ("CPU implementer", "CPU part"))
        part = (f"f{fam.group(1)}m{mod.group(1)}" if fam and mod
                else f"{imp.group(1)}-{arm.group(1)}".lower() if imp and arm else None)
    except OSError:
        pass
    isa = next(
        (label for label, flag in (("amx", "amx_int8"), ("avx512vnni", "avx512_vnni"), ("avxvnni", "avx_vnni"),
                                   ("avx512", "avx512f"), ("avx2", "avx2"), ("neon", "asimd")) if flag in flags),
        platform.machine().lower(),
    )
    return {"kind": "cpu", "name": name, "part": part, "cores": os.cpu_count(), "isa": isa,
            "machine": platform.machine()}


def device_id(info: dict[str, Any], threads: int | None = None) -> str:
    """A file-name-safe id: ``cpu-amd-epyc-f26m2-avx512vnni-t2`` or ``cuda-nvidia-h200``.

    A CPU name without a model number ("AMD EPYC", or only the architecture) is followed by the part
    (`cpu_info`), so that tables measured on two generations of one vendor's CPUs do not pass for each other.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", str(info["name"]).lower()).strip("-")
    slug = re.sub(r"-?(processor|cpu|with-radeon.*|\d+-core)-?", "-", slug).strip("-")[:32].strip("-")
    if info["kind"] == "cpu":
        part = info.get("part")
        if part and not re.search(r"\d", re.sub(r"aarch64|arm64|x86-64|amd64", "", slug)):  # no model number
            slug = f"{slug}-{re.sub(r'[^a-z0-9]+', '-', str(part).lower())}"
        return f"cpu-{slug}-{info['isa']}-t{threads or info['cores']}"
    return f"{info['kind']}-{slug}"


# ----------------------------------------------------------------------------------- timing
def trimmed_stats(samples_ms: list[float]) -> dict[str, float]:
    """Mean, std, median and count of the samples within the 5th-95th percentile."""
    if not samples_ms:
        raise RunnerError("no timing samples")
    xs = np.asarray(samples_ms, dtype=np.float64)
    lo, hi = np.percentile(xs, [5, 95])
    kept = xs[(xs >= lo) & (xs <= hi)] if xs.size > 2 else xs  # two samples would both fall outside
    return {
        "mean_ms": float(kept.mean()),
        "std_ms": float(kept.std(ddof=1)) if kept.size > 1 else 0.0,
        "median_ms": float(np.median(kept)),
        "n": int(kept.size),
    }


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure from its interleaved rounds (each `{"measured": trimmed_stats}`): the median of the round medians."""
    med = [r["measured"]["median_ms"] for r in rounds]
    measured = {"mean_ms": float(np.mean(med)), "std_ms": float(np.median([r["measured"]["std_ms"] for r in rounds])),
                "median_ms": float(np.median(med)), "n": sum(r["measured"]["n"] for r in rounds)}
    return {"config": rounds[0].get("config"), "phase": rounds[0].get("phase"), "measured": measured,
            "rounds_ms": [round(m, 4) for m in med]}


class CacheFlusher:
    """Evicts the last-level cache by touching a buffer larger than it (64 MiB by default)."""

    def __init__(self, nbytes: int = 64 << 20) -> None:
        self.buf = np.ones(nbytes // 8, dtype=np.float64)

    def __call__(self) -> None:
        # A read, not a write: dirty lines would be written back during the timed run.
        self.last = float(self.buf.sum())


def time_call(fn: Callable[[], Any], *, warmup: int, repeats: int, flush: Callable[[], None] | None = None,
              before: Callable[[], None] | None = None) -> list[float]:
    """Run `fn` `warmup` times untimed, then `repeats` timed runs; returns milliseconds."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    samples = []
    for _ in range(repeats):
        if before:
            before()
        if flush:
            flush()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


# ----------------------------------------------------------------------------------- inputs
def make_input(spec: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """An input array from its manifest spec: shape, dtype and fill (normal|ones|zeros|arange|randint)."""
    shape, dtype, fill = tuple(int(d) for d in spec["shape"]), np.dtype(spec["dtype"]), spec.get("fill", "normal")
    if fill == "normal":
        return rng.standard_normal(shape).astype(dtype)
    if fill == "ones":
        return np.ones(shape, dtype)
    if fill == "zeros":
        return np.zeros(shape, dtype)
    if fill == "arange":
        return np.broadcast_to(np.arange(spec.get("start", 0), spec.get("start", 0) + shape[-1]), shape).astype(dtype)
    if fill == "randint":
        return rng.integers(0, int(spec["high"]), size=shape).astype(dtype)
    raise RunnerError(f"input fill {fill!r} is not known; expected normal, ones, zeros, arange or randint")


# --------------------------------------------------------------------------------- runtimes
def ort_runner(path: Path, threads: int, device: str = "cpu") -> Callable[[dict[str, np.ndarray]], Any]:
    sess = ort_session(path, threads, device)
    return lambda feeds: sess.run(None, feeds)


def ort_session(path: Path, threads: int, device: str = "cpu"):
    """An onnxruntime session with `threads` intra-op threads and full graph optimisation."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RunnerError("device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider")
    return ort.InferenceSession(str(path), so, providers=providers)


def ov_request(path: Path, threads: int, device: str = "cpu"):
    import openvino as ov

    core = ov.Core()
    # f32 inference precision: OpenVINO's CPU default is bf16 where the CPU has AMX, which changes the numbers
    # measured (and crashed on the tiny test model with SIGFPE on a Xeon with AMX); hwnas's int8 is weight-only
    # (loading.OV_CONFIG, which evaluate and quantize's check load with; this worker does not import hwnas)
    config = ({"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
              if device == "cpu" else {})
    return core.compile_model(str(path), {"cpu": "CPU", "gpu": "GPU"}.get(device, device.upper()), config).create_infer_request()


def measure_item(item: dict[str, Any], root: Path, *, runtime: str, threads: int, device: str = "cpu",
                 warmup: int = 5, repeats: int = 30, flush: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time one manifest item: a stateless graph fed its inputs, or a stateful OpenVINO LLM (decode after a prefill)."""
    path = root / item["file"]
    if not path.is_file():
        raise RunnerError(f"graph {path} named by the manifest does not exist")
    rng = np.random.default_rng(0)
    feeds = {name: make_input(spec, rng) for name, spec in item["inputs"].items()}
    before = None
    if runtime == "onnxruntime":
        run = ort_runner(path, threads, device)
        fn = lambda: run(feeds)  # noqa: E731
    elif runtime == "openvino":
        req = ov_request(path, threads, device)
        if item.get("stateful") and not item.get("stateful_prefill"):  # a stateful LLM's prefill starts empty
            before = req.reset_state
        elif item.get("stateful_prefill"):  # OpenVINO LLMs keep the KV cache as state: fill it, then restore it per step
            pre = {name: make_input(spec, rng) for name, spec in item["stateful_prefill"].items()}
            req.reset_state()
            req.infer(pre)
            saved = [(s, s.state.data.copy()) for s in req.query_state()]

            def before() -> None:
                import openvino as ov

                for s, data in saved:
                    s.state = ov.Tensor(data)

        fn = lambda: req.infer(feeds)  # noqa: E731
    else:
        raise RunnerError(f"runtime {runtime!r} is not supported by the runner; expected onnxruntime or openvino")
    samples = time_call(fn, warmup=warmup, repeats=repeats, flush=flush, before=before)
    return {**trimmed_stats(samples), "samples_ms": [round(s, 4) for s in samples]}


def runtime_version(runtime: str) -> str:
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    import openvino

    return openvino.__version__


def versions(runtime: str) -> dict[str, str]:
    """Python's version and the installed versions of the libraries a `runtime` measurement depends on."""
    import importlib.metadata as md

    names = {"torch": ["torch", "transformers"], "onnxruntime": ["onnxruntime", "onnx", "torch"],
             "openvino": ["openvino", "nncf", "torch"]}[runtime]
    out = {"python": platform.python_version()}
    for n in names + ["hwnas"]:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------ files
def write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise RunnerError(f"{root} has no {MANIFEST}; write one with `hwnas profile --export-blocks {root}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunnerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("items"), list):
        raise RunnerError(f"{path} is not an hwnas block manifest (expected format {FORMAT!r} and a list of items)")
    return manifest


def run(root: str | os.PathLike, *, threads: int | None = None, device: str = "cpu", warmup: int | None = None,
        repeats: int | None = None, flush: bool = True, progress: bool = True) -> dict[str, Any]:
    """Measure every item of the manifest in `root` not yet in its measurements file."""
    root = Path(root)
    manifest = read_manifest(root)
    runtime = manifest["runtime"]
    threads = threads or manifest.get("threads") or os.cpu_count() or 1
    if threads < 1:
        raise RunnerError(f"threads must be at least 1, got {threads}")
    asked = {"warmup": warmup, "repeats": repeats}  # given here, they override the manifest's per-item values
    warmup = manifest.get("warmup", 5) if warmup is None else warmup
    repeats = manifest.get("repeats", 30) if repeats is None else repeats
    out_path = root / MEASUREMENTS
    info = cpu_info() if device == "cpu" else {"kind": device, "name": device}
    header = {"device": {**info, "threads": threads, "id": device_id(info, threads)}, "runtime": runtime,
              "runtime_version": runtime_version(runtime), "python": platform.python_version(),
              "numpy": np.__version__, "warmup": warmup, "repeats": repeats, "cache_flush": flush,
              "manifest_digest": manifest.get("digest")}
    done: dict[str, Any] = {}
    if out_path.is_file():
        old = json.loads(out_path.read_text())
        same = {k: old.get("header", {}).get(k) for k in ("runtime", "manifest_digest")}
        if same != {"runtime": runtime, "manifest_digest": manifest.get("digest")}:
            raise RunnerError(f"{out_path} belongs to another manifest or runtime; move it away to measure again")
        if old["header"]["device"]["id"] != header["device"]["id"]:
            raise RunnerError(f"{out_path} was measured on {old['header']['device']['id']}, this is "
                              f"{header['device']['id']}; move it away to measure again")
        done = old.get("items", {})
    flusher = CacheFlusher() if flush and device == "cpu" else None
    todo = [it for it in manifest["items"] if it["key"] not in done]
    bar = _progress(len(manifest["items"]), len(done), progress)
    for item in todo:
        bar(item["key"])
        done[item["key"]] = measure_item(item, root, runtime=runtime, threads=threads, device=device,
                                         warmup=asked["warmup"] if asked["warmup"] is not None else item.get("warmup", warmup),
                                         repeats=asked["repeats"] if asked["repeats"] is not None else item.get("repeats", repeats),
                                         flush=flusher)
        write_json(out_path, {"header": header, "items": done})
    bar(None)
    if not out_path.is_file():
        write_json(out_path, {"header": header, "items": done})
    return {"measured": len(todo), "total": len(manifest["items"]), "out": str(out_path)}


def _progress(total: int, initial: int, enabled: bool) -> Callable[[str | None], None]:
    try:
        from .progress import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(total=total, initial=initial, desc="blocks", unit="block", disable=not enabled)
        state = {"first": True}

        def step(key: str | None) -> None:
            if not state["first"]:
                bar.update(1)
            state["first"] = False
            if key is None:
                bar.close()
            else:
                bar.set_postfix_str(key)

        return step
    count = [initial]

    def step(key: str | None) -> None:
        if key is not None and enabled:
            count[0] += 1
            print(f"[{count[0]}/{total}] {key}", file=sys.stderr, flush=True)

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hwnas.runner", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="folder written by `hwnas profile --export-blocks`")
    p.add_argument("--threads", type=int, default=None, help="threads to run with (default: the manifest's, else all cores)")
    p.add_argument("--device", default="cpu", help="cpu (default), gpu (OpenVINO) or cuda (onnxruntime)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-flush", action="store_true", help="do not evict the cache between timed runs")
    args = p.parse_args(argv)
    try:
        result = run(args.dir, threads=args.threads, device=args.device, warmup=args.warmup, repeats=args.repeats,
                     flush=not args.no_flush)
    except RunnerError as e:
        print(f"hwnas.runner: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwnas.runner: interrupted; run again to resume", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
