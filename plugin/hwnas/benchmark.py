"""End-to-end benchmark of deployed models: `hwnas benchmark --model PATH [--compare A B ...] --out FILE.json`.

A model is a torch checkpoint (full model, sub-network, bitsandbytes-quantized), an Optimum ONNX
folder (`text-generation-with-past`), an optimum-intel OpenVINO IR folder (stateful), a GGUF file for
llama.cpp (`hwnas.llamacpp`) or an ONNX Runtime GenAI folder (`hwnas.genai`); the runtime is read
from the folder unless given. Each model runs in its own worker process, the way deployment
runs it (`hwnas.decoders`).

Each run generates greedily: a prompt of S random tokens (seeded, the same for every model), then
new tokens to T in all. Prefill is the forward pass on the prompt; time to first token adds reading
the first token off its logits; decode is the mean time of the T-1 single-token steps that follow.
Several models are measured in interleaved rounds (A, B, C, A, B, C, ...), each round one untimed
warm-up run and `repeats` timed runs per model, because a machine's speed drifts between passes;
a figure is the median of the round medians, and its spread is (max - min) / median of those.

Peak memory is the worker's VmHWM: `ru_maxrss` would report the parent's peak, which a child
inherits across fork and exec. Beside every decode figure stands its physical floor: the bytes of
weights read per decoded token over the memory read bandwidth numpy measures here.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import runner
from .common import HwnasError, atomic_write_json, atomic_write_text, point_library_caches
from .decoders import LOADERS, SIZED
from .genai import is_genai, onnx_file, versions as genai_versions
from .llamacpp import gguf_file, gguf_sizes, versions as llamacpp_versions
from .loading import DEFAULT_MODEL, resolve_model

RUNTIMES = ("torch", "onnxruntime", "openvino", "llamacpp", "ortgenai")
FORMAT = "hwnas-benchmark/1"
SEED = 0
_WHAT = {"torch": "a torch checkpoint (config.json + *.safetensors)", "onnxruntime": "an ONNX model (*.onnx)",
         "openvino": "an OpenVINO IR (*.xml + *.bin)", "llamacpp": "a llama.cpp model (*.gguf)",
         "ortgenai": "an ONNX Runtime GenAI model (genai_config.json)"}
# Run in the worker instead of `python -m hwnas.benchmark`: importing the package runs hwnas/__init__.py,
# which imports torch, and an onnxruntime or OpenVINO worker's peak memory should be its runtime's alone.
_BOOT = """import sys, types
pkg = types.ModuleType("hwnas")
pkg.__path__ = [sys.argv[2]]
sys.modules["hwnas"] = pkg
from hwnas.benchmark import _worker
sys.exit(_worker(sys.argv[1]))
"""


# ---------------------------------------------------------------------------------- what to run
def locate(model: str | os.PathLike, runtime: str | None = None) -> tuple[str, Path]:
    """(runtime, path to load) of a model name, folder or .onnx/.xml file; the runtime is detected when None."""
    if runtime is not None and runtime not in RUNTIMES:
        raise HwnasError(f"runtime {runtime!r} is not known; expected one of {', '.join(RUNTIMES)}")
    path = resolve_model(model) if str(model) == DEFAULT_MODEL else Path(model).expanduser()
    if not path.exists():
        raise HwnasError(f"model {str(model)!r} does not exist; expected {DEFAULT_MODEL!r}, a model folder "
                         "(torch checkpoint, Optimum ONNX or OpenVINO IR) or a .onnx/.xml file")
    found = _formats(path.resolve())
    if not found:
        raise HwnasError(f"{path} holds no model to benchmark; expected {', '.join(_WHAT.values())}")
    names = " and ".join(f"{_WHAT[r]}: {found[r].name}" for r in found)
    if runtime is not None and runtime not in found:
        raise HwnasError(f"--runtime {runtime} does not fit {path}: it holds {names}")
    if runtime is None and len(found) > 1:
        raise HwnasError(f"{path} holds {names}; pass --runtime to choose")
    runtime = runtime or next(iter(found))
    return runtime, found[runtime]


def _check_positions(path: Path, tokens: int) -> None:
    """Refuse a prompt plus generated tokens past the positions of the model's config.json, where it has one."""
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        positions = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):  # no config (a bare graph, GGUF): the runtime decides
        return
    if type(positions) is int and tokens > positions:
        raise HwnasError(f"--prompt-tokens plus --new-tokens is {tokens}, past the {positions} positions of {config}; "
                         f"expected at most {positions} in all")


def _formats(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {".onnx": {"onnxruntime": path}, ".xml": {"openvino": path},
                ".gguf": {"llamacpp": path}}.get(path.suffix, {})
    if is_genai(path):  # its model.onnx takes GenAI's inputs, not Optimum's
        return {"ortgenai": path}
    found = {"llamacpp": gguf} if (gguf := gguf_file(path)) else {}
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        found["torch"] = path
    irs = [x for x in path.glob("*.xml") if x.with_suffix(".bin").is_file() and "tokenizer" not in x.name]
    for runtime, files, preferred in (("onnxruntime", list(path.glob("*.onnx")), "model.onnx"),
                                      ("openvino", irs, "openvino_model.xml")):
        if len(files) > 1 and not (path / preferred).is_file():
            raise HwnasError(f"{path} holds several {runtime} models ({', '.join(sorted(f.name for f in files))}); "
                             "pass the file itself")
        if files:
            found[runtime] = path / preferred if (path / preferred).is_file() else files[0]
    return found


# ------------------------------------------------------------------------ bytes on disk and read
def sizes(runtime: str, path: Path) -> dict[str, int]:
    """`file_bytes`: the weight files on disk (safetensors, the .onnx with its external data, the IR's .xml and
    .bin); `weights_read_bytes`: what one decode step reads of them (torch's is counted in its worker)."""
    try:
        if runtime == "torch":
            return {"file_bytes": sum(f.stat().st_size for f in (*path.glob("*.safetensors"), *path.glob("*.bin")))}
        if runtime == "llamacpp":
            return gguf_sizes(path)
        path = onnx_file(path) if runtime == "ortgenai" else path
        if runtime == "openvino":
            return {"file_bytes": path.stat().st_size + path.with_suffix(".bin").stat().st_size,
                    "weights_read_bytes": weights_read(*_openvino_graph(path))}
        consts, nodes, data = _onnx_graph(path)
        return {"file_bytes": path.stat().st_size + sum((path.parent / d).stat().st_size for d in data),
                "weights_read_bytes": weights_read(consts, nodes)}
    except HwnasError:
        raise
    except Exception as e:  # a truncated or foreign file surfaces as many exception types
        raise HwnasError(f"cannot read {path} as {_WHAT[runtime]}: {type(e).__name__}: {e}") from None


ROW_LOOKUPS = {("Gather", 0), ("GatherBlockQuantized", 0), ("GatherBlockQuantized", 2), ("GatherBlockQuantized", 3)}


def weights_read(consts: dict[str, tuple[int, int]], nodes: Iterable[tuple[str, list[str], list[str]]]) -> int:
    """Bytes of constants one decode step reads, from a graph in topological order.

    `consts` maps a constant to (bytes, rows); `nodes` are (op type, inputs, outputs). A constant reaches
    the op that uses it through constant-only chains (dequantisation, transposes), followed here. Every
    constant used is read whole, except one whose only uses are row lookups (the table of a Gather, or the
    blocks, scales or zero points of a GatherBlockQuantized: an embedding), which costs one row for the one new
    token. A tied LM head is read whole: it also feeds the head's MatMul.
    """
    roots = {name: {name} for name in consts}
    uses: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for op, ins, outs in nodes:
        ins = [i for i in ins if i]
        if ins and op != "ReadValue" and all(i in roots for i in ins):
            for o in outs:
                roots[o] = set().union(*(roots[i] for i in ins))
            continue
        for k, i in enumerate(ins):
            for c in roots.get(i, ()):
                uses[c].add((op, k))
    return sum(nbytes // rows if uses[c] <= ROW_LOOKUPS else nbytes for c, (nbytes, rows) in consts.items()
               if uses.get(c))


def _onnx_graph(path: Path) -> tuple[dict[str, tuple[int, int]], list[tuple[str, list[str], list[str]]], set[str]]:
    """Constants, nodes (subgraphs first) and external data files of an ONNX model, read without its weights."""
    import onnx

    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
    consts, nodes, data = {}, [], set()

    def walk(graph: Any) -> None:
        for t in graph.initializer:
            size = bits.get(t.data_type) or 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            consts[t.name] = (int(np.prod(t.dims, dtype=np.int64)) * size // 8, int(t.dims[0]) if t.dims else 1)
            data.update(e.value for e in t.external_data if e.key == "location")
        for n in graph.node:
            for a in n.attribute:
                for g in (*([a.g] if a.HasField("g") else []), *a.graphs):
                    walk(g)
            if n.op_type == "Constant" and n.attribute[0].name == "value":
                t = n.attribute[0].t
                consts[n.output[0]] = (len(t.raw_data) or 4 * max(len(t.float_data), len(t.int64_data)),
                                       int(t.dims[0]) if t.dims else 1)
            else:
                nodes.append((n.op_type, list(n.input), list(n.output)))

    walk(onnx.load(str(path), load_external_data=False).graph)
    return consts, nodes, data


def _openvino_graph(path: Path) -> tuple[dict[str, tuple[int, int]], list[tuple[str, list[str], list[str]]]]:
    import openvino as ov

    consts, nodes = {}, []
    for op in ov.Core().read_model(str(path)).get_ordered_ops():
        name = op.get_name()
        if op.get_type_name() == "Constant":
            shape = list(op.get_output_shape(0))
            consts[f"{name}:0"] = (op.get_byte_size(), shape[0] if shape else 1)
            continue
        ins = [f"{i.get_source_output().get_node().get_name()}:{i.get_source_output().get_index()}" for i in op.inputs()]
        nodes.append((op.get_type_name(), ins, [f"{name}:{k}" for k in range(op.get_output_size())]))
    return consts, nodes


# ------------------------------------------------------------------- the models, as deployed
def prompt_ids(vocab: int, tokens: int, seed: int = SEED) -> np.ndarray:
    """The benchmark prompt: `tokens` seeded random ids, the same for every model of one vocabulary."""
    return np.random.default_rng(seed).integers(0, vocab, size=(1, tokens), dtype=np.int64)


EDGE_VERSIONS = {"llamacpp": llamacpp_versions, "ortgenai": genai_versions}


def measure_round(lm: Any, prompt: np.ndarray, new_tokens: int, *, warmup: int, repeats: int) -> dict[str, Any]:
    """`warmup` untimed and `repeats` timed greedy generations of `new_tokens` after `prompt`."""
    marks, tokens = [], []

    def generate() -> None:
        t0 = time.perf_counter()
        logits = lm.run(prompt)
        t1 = time.perf_counter()
        toks = [int(np.argmax(logits))]
        t2 = time.perf_counter()
        while len(toks) < new_tokens:
            toks.append(int(np.argmax(lm.run(np.array([[toks[-1]]], np.int64)))))
        marks.append((t0, t1, t2, time.perf_counter()))
        tokens[:] = toks

    runner.time_call(generate, warmup=warmup, repeats=repeats, before=lm.reset)
    m = np.array(marks[warmup:]) * 1e3
    return {"prefill_ms": (m[:, 1] - m[:, 0]).tolist(), "ttft_ms": (m[:, 2] - m[:, 0]).tolist(),
            "decode_ms_per_token": ((m[:, 3] - m[:, 2]) / (new_tokens - 1)).tolist(), "tokens": tokens}


def _memory(key: str) -> int:
    """VmRSS or VmHWM of this process, in bytes (ru_maxrss where /proc is missing)."""
    try:
        return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _worker(spec_json: str) -> int:
    """Worker process: load one model, then answer `round` and `exit` commands read from stdin, one JSON a line."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to the log, not into the protocol

    def send(msg: dict[str, Any]) -> None:
        proto.write(json.dumps(msg) + "\n")

    try:
        spec = json.loads(spec_json)
        point_library_caches()
        baseline, t0 = _memory("VmRSS"), time.perf_counter()
        sized = {"context": spec["prompt_tokens"] + spec["new_tokens"]} if spec["runtime"] in SIZED else {}
        lm = LOADERS[spec["runtime"]](Path(spec["path"]), spec["threads"], **sized)
        send({"load_s": time.perf_counter() - t0, "baseline_rss_bytes": baseline, "vocab": lm.vocab, "info": lm.info})
        prompt = prompt_ids(lm.vocab, spec["prompt_tokens"])
        while line := sys.stdin.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "exit":
                send({"peak_rss_bytes": _memory("VmHWM")})
                return 0
            send(measure_round(lm, prompt, spec["new_tokens"], warmup=cmd["warmup"], repeats=cmd["repeats"]))
    except HwnasError as e:
        send({"error": str(e)})
        return 1
    except BaseException as e:  # reported to the parent, which raises it with the log's tail
        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


class Worker:
    """One model in its own process, so that its peak memory is its own."""

    def __init__(self, label: str, spec: dict[str, Any]) -> None:
        self.label, self.log = label, tempfile.TemporaryFile("w+")
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        cmd = [sys.executable, "-c", _BOOT, json.dumps(spec), str(Path(__file__).parent)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)

    def ask(self, cmd: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            if cmd is not None:
                self.proc.stdin.write(json.dumps(cmd) + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        msg = json.loads(line) if line.strip() else {"error": f"the worker exited ({self.proc.poll()})"}
        if "error" in msg:
            self.log.seek(0)
            tail = self.log.read()[-1500:].strip()
            raise HwnasError(f"benchmarking {self.label} failed: {msg['error']}" + (f"\n{tail}" if tail else ""))
        return msg

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.log):
            f.close()


# ---------------------------------------------------------------------------------- the machine
def _llc_bytes() -> int:
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)
    except (OSError, ValueError):
        return 0


def memory_bandwidth(threads: int, *, nbytes: int | None = None, repeats: int = 7) -> dict[str, Any]:
    """Memory read bandwidth as numpy sees it: the median time to sum an array far larger than the last-level cache,
    on one thread and on `threads` threads (each summing its share); `gb_per_s` is the higher."""
    from concurrent.futures import ThreadPoolExecutor

    llc = _llc_bytes()
    nbytes = nbytes or max(512 << 20, 8 * llc)
    a = np.ones(nbytes // 8)
    out: dict[str, Any] = {"array_bytes": a.nbytes, "llc_bytes": llc, "repeats": repeats}
    with ThreadPoolExecutor(threads) as pool:
        parts = np.array_split(a, threads)
        for n, fn in {1: a.sum, threads: lambda: list(pool.map(np.sum, parts))}.items():
            ms = float(np.median(runner.time_call(fn, warmup=1, repeats=repeats)))
            out[f"gb_per_s_{n}_threads"] = a.nbytes / ms / 1e6
    out["gb_per_s"] = max(v for k, v in out.items() if k.startswith("gb_per_s_"))
    return out


# ------------------------------------------------------------------------------------ benchmark
def benchmark(models: list[str | os.PathLike], *, runtime: str | None = None, labels: list[str] | None = None,
              prompt_tokens: int = 128, new_tokens: int = 32, threads: int | None = None, repeats: int = 5,
              rounds: int = 3, warmup: int = 1, out: str | os.PathLike | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Benchmark `models` side by side in interleaved rounds; the first is the reference of the ratios.

    Returns the report (also written to `out` as JSON, with its Markdown table beside it as .md).
    """
    from .progress import tqdm

    if not models:
        raise HwnasError("give at least one model to benchmark")
    for name, value, least in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 2),
                               ("repeats", repeats, 1), ("rounds", rounds, 1), ("warmup", warmup, 0)):
        if value < least:
            raise HwnasError(f"{name} must be at least {least}, got {value}")
    if threads is not None and threads < 1:
        raise HwnasError(f"threads must be at least 1, got {threads}")
    if labels is not None and len(labels) != len(models):
        raise HwnasError(f"{len(labels)} labels for {len(models)} models")
    threads = threads or os.cpu_count() or 1
    targets = [locate(m, runtime) for m in models]
    for _, p in targets:
        _check_positions(p, prompt_tokens + new_tokens)
    labels = labels or _labels([Path(m).expanduser().resolve() for m in models])
    entries = [{"label": lb, "model": str(m), "path": str(p), "runtime": rt, **sizes(rt, p)}
               for lb, m, (rt, p) in zip(labels, models, targets)]
    bandwidth = memory_bandwidth(threads)
    workers: list[Worker] = []
    samples: list[list[dict[str, Any]]] = [[] for _ in entries]
    try:
        for e in entries:
            workers.append(Worker(e["label"], {"runtime": e["runtime"], "path": e["path"], "threads": threads,
                                               "prompt_tokens": prompt_tokens, "new_tokens": new_tokens}))
            ready = workers[-1].ask()
            e.update(load_s=round(ready["load_s"], 2), baseline_rss_bytes=ready["baseline_rss_bytes"],
                     runtime_info=ready["info"])
            e.setdefault("weights_read_bytes", ready["info"].pop("weights_read_bytes", None))
        with tqdm(total=rounds * len(workers), desc="benchmark", unit="run", disable=not progress) as bar:
            for r in range(rounds):
                for k, w in enumerate(workers):
                    bar.set_postfix_str(f"round {r + 1}/{rounds}: {w.label}")
                    samples[k].append(w.ask({"cmd": "round", "warmup": warmup, "repeats": repeats}))
                    bar.update(1)
        for e, w in zip(entries, workers):
            e["peak_rss_bytes"] = w.ask({"cmd": "exit"})["peak_rss_bytes"]
    finally:
        for w in workers:
            w.close()
    for e, s in zip(entries, samples):
        _summarize(e, s, bandwidth["gb_per_s"])
    for e in entries:
        e["ratios"] = ratios(e, entries[0])
    cpu = runner.cpu_info()
    report = {"format": FORMAT, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": {**cpu, "threads": threads, "id": runner.device_id(cpu, threads)},
              "versions": {k: v for rt in sorted({e["runtime"] for e in entries}) for k, v in
                           (EDGE_VERSIONS[rt]() if rt in EDGE_VERSIONS else runner.versions(rt)).items()}
              | {"numpy": np.__version__},
              "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": threads,
                           "repeats": repeats, "rounds": rounds, "warmup_per_round": warmup, "seed": SEED,
                           "order": "interleaved rounds", "greedy": True, "batch": 1},
              "memory_bandwidth": bandwidth, "reference": entries[0]["label"], "models": entries}
    report["markdown"] = markdown(report)
    if out is not None:
        atomic_write_json(out, report)
        atomic_write_text(Path(out).with_suffix(".md"), report["markdown"])
    return report


def _labels(paths: list[Path]) -> list[str]:
    """Folder (or folder/file) names, lengthened by their parents until they differ."""
    for depth in range(1, 8):
        labels = ["/".join(p.parts[-depth - (1 if p.is_file() else 0):]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _summarize(entry: dict[str, Any], rounds: list[dict[str, Any]], gb_per_s: float) -> None:
    for key in ("prefill_ms", "ttft_ms", "decode_ms_per_token"):
        m = runner.merge_rounds([{"measured": runner.trimmed_stats(r[key])} for r in rounds])
        med = m["measured"]["median_ms"]
        entry[key] = {"median": med, "std": m["measured"]["std_ms"], "round_medians": m["rounds_ms"],
                      "spread": (max(m["rounds_ms"]) - min(m["rounds_ms"])) / med, "n": m["measured"]["n"]}
    decode = entry["decode_ms_per_token"]["median"]
    entry["tokens_per_s"] = 1e3 / decode
    entry["decode_floor_ms"] = entry["weights_read_bytes"] / gb_per_s / 1e6
    entry["decode_vs_floor"] = decode / entry["decode_floor_ms"]
    entry["greedy_tokens"] = rounds[-1]["tokens"]
    entry["greedy_tokens_repeatable"] = all(r["tokens"] == rounds[0]["tokens"] for r in rounds)


def ratios(entry: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """`entry`'s figures over `ref`'s (medians for timings): below 1 is faster or smaller, but for tokens/s."""
    return {k: entry[k]["median"] / ref[k]["median"] if isinstance(entry[k], dict) else entry[k] / ref[k]
            for k in ("prefill_ms", "ttft_ms", "decode_ms_per_token", "tokens_per_s", "peak_rss_bytes", "file_bytes",
                      "weights_read_bytes")}


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table, ratios against the reference (the first model)."""
    s, d, bw = report["settings"], report["device"], report["memory_bandwidth"]
    mb = lambda b: f"{b / 1e6:,.1f}"  # noqa: E731
    rows = [f"Benchmark on {d['name']} ({s['threads']} threads, {d['isa']}), {report['date']}: prompt "
            f"{s['prompt_tokens']} tokens, {s['new_tokens']} new tokens (greedy, batch 1); {s['rounds']} interleaved rounds "
            f"of {s['repeats']} runs after {s['warmup_per_round']} warm-up, medians; memory read bandwidth "
            f"{bw['gb_per_s']:.1f} GB/s (numpy). Ratios (×) are against the reference, {report['reference']}.", "",
            "| model | runtime | file MB | peak RSS MB | prefill ms | TTFT ms | decode ms/token | tokens/s | "
            "floor ms/token | decode / floor | prefill × | decode × | peak RSS × | file × | decode spread |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    small = False
    for e in report["models"]:
        r, fits = e["ratios"], e["weights_read_bytes"] < bw["llc_bytes"]
        small |= fits
        rows.append(f"| {e['label']} | {e['runtime']} | {mb(e['file_bytes'])} | {mb(e['peak_rss_bytes'])} | "
                    f"{e['prefill_ms']['median']:.1f} | {e['ttft_ms']['median']:.1f} | "
                    f"{e['decode_ms_per_token']['median']:.2f} | {e['tokens_per_s']:.1f} | {e['decode_floor_ms']:.3f} | "
                    f"{e['decode_vs_floor']:.2f}{'*' if fits else ''} | "
                    f"{r['prefill_ms']:.2f} | {r['decode_ms_per_token']:.2f} | {r['peak_rss_bytes']:.2f} | "
                    f"{r['file_bytes']:.2f} | {e['decode_ms_per_token']['spread']:.0%} |")
    rows += ["", "Floor: bytes of weights read per decoded token (a tied LM head whole, one embedding row) over the "
             "bandwidth; the KV cache read is not counted. Peak RSS: each worker process's VmHWM, runtime libraries "
             "included. torch's and llama.cpp's prefill compute the last position's logits only (as `generate` does); "
             "the exported ONNX, OpenVINO and GenAI graphs compute them for every prompt position."]
    if small:
        rows.append(f"*: the weights fit in the {bw['llc_bytes'] >> 20} MiB last-level cache, so memory bandwidth "
                    "does not bound them.")
    return "\n".join(rows) + "\n"
