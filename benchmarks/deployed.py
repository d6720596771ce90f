"""The full model and one sub-network as deployed, benchmarked side by side on this machine.

Builds, under the project's git-ignored .cache (hwnas home, `deployed/`), one Optimum-style folder per
artifact with `hwnas.deploy`: the full model in fp32 for torch, onnxruntime and OpenVINO; the sub-network in
fp32 for onnxruntime; both in int8 (onnxruntime dynamic int8, OpenVINO NNCF int8) and in OpenVINO int4, as
the latency tables measure them (`build_deployed`). Folders already built are reused. All of
them then run in one `hwnas benchmark` comparison (interleaved rounds), and
benchmarks/results/deployed.{json,md} get each one's figures, its ratios to the full fp32 model of
the same runtime and to the physical floor (weights read per token over memory bandwidth).

    .venv/bin/python benchmarks/deployed.py --subnet runs/search/pareto.json   (builds ~5 min, measures ~10 min)
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shlex
import sys
from pathlib import Path

import hwnas
from hwnas.benchmark import benchmark, ratios
from hwnas.common import atomic_dir, atomic_write_json, atomic_write_text, home
from hwnas.deploy import build_deployed, deploy
from hwnas.export import export_checkpoint
from hwnas.loading import DEFAULT_MODEL, load_model, resolve_model
from hwnas.runner import cpu_info
from hwnas.space import SubnetConfig

hwnas.point_library_caches()  # library caches stay inside the project

# (label, network, runtime, precision). Each runtime's full fp32 model is the reference of its ratios (OpenVINO's
# is there for that alone).
ARTIFACTS = [
    ("full torch fp32", "full", "torch", "fp32"),
    ("full onnxruntime fp32", "full", "onnxruntime", "fp32"),
    ("sub onnxruntime fp32", "sub", "onnxruntime", "fp32"),
    ("full onnxruntime int8", "full", "onnxruntime", "int8"),
    ("sub onnxruntime int8", "sub", "onnxruntime", "int8"),
    ("full openvino fp32", "full", "openvino", "fp32"),
    ("full openvino int8", "full", "openvino", "int8"),
    ("sub openvino int8", "sub", "openvino", "int8"),
    ("full openvino int4", "full", "openvino", "int4"),
    ("sub openvino int4", "sub", "openvino", "int4"),
]


def build(model: str, cfg: SubnetConfig, work: Path) -> dict[str, Path]:
    """Every artifact's folder under `work`, built unless it is there already: onnxruntime fp32 as `hwnas run`
    deploys its reference (`deploy`, fused attention), the rest as the latency tables measure them (`build_deployed`)."""
    isa = cpu_info()["isa"]
    sources = {"full": resolve_model(model), "sub": work / "sub-torch-fp32"}
    if not sources["sub"].is_dir():
        cfg.to_json(work / "subnet.json")
        export_checkpoint(model=model, subnet=work / "subnet.json", out=sources["sub"])
    loaded: dict[str, object] = {}
    paths = {}
    for label, net, runtime, precision in ARTIFACTS:
        folder = work / f"{net}-{runtime}-{precision}"
        paths[label] = sources[net] if runtime == "torch" else folder
        if runtime == "torch" or folder.is_dir():
            continue
        print(f"building {folder.name}", file=sys.stderr, flush=True)
        if (runtime, precision) == ("onnxruntime", "fp32"):
            deploy(sources[net], runtime, precision, folder, progress=True, fused_attention=True)
            continue
        if net not in loaded:
            loaded[net] = load_model(sources[net], allow_subnet=True)[0]
        with atomic_dir(folder) as tmp:
            build_deployed(loaded[net], runtime, precision, tmp, isa=isa)
    return paths


def main(model: str, subnet: Path, pick: int | None, prompt_tokens: int, new_tokens: int, threads: int | None,
         repeats: int, rounds: int, work: Path | None, out_dir: Path) -> dict:
    cfg = SubnetConfig.from_json(subnet, pick)
    key = hashlib.sha256(json.dumps([str(resolve_model(model)), cfg.to_dict()], sort_keys=True).encode()).hexdigest()[:12]
    work = work or home() / "deployed" / f"{Path(model).name}-{key}"
    work.mkdir(parents=True, exist_ok=True)
    paths = build(model, cfg, work)
    report = benchmark(list(paths.values()), labels=list(paths), prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                       threads=threads, repeats=repeats, rounds=rounds, out=work / "benchmark.json")
    meta = {label: (net, runtime, precision) for label, net, runtime, precision in ARTIFACTS}
    refs = {meta[e["label"]][1]: e for e in report["models"] if meta[e["label"]][::2] == ("full", "fp32")}
    rows = []
    for e in report["models"]:
        net, runtime, precision = meta[e["label"]]
        rows.append({"artifact": e["label"], "network": net, "runtime": runtime, "precision": precision,
                     "folder": e["path"], "file_bytes": e["file_bytes"], "peak_rss_bytes": e["peak_rss_bytes"],
                     "prefill_ms": e["prefill_ms"]["median"], "ttft_ms": e["ttft_ms"]["median"],
                     "decode_ms_per_token": e["decode_ms_per_token"]["median"], "tokens_per_s": e["tokens_per_s"],
                     "decode_spread": e["decode_ms_per_token"]["spread"], "weights_read_bytes": e["weights_read_bytes"],
                     "decode_floor_ms": e["decode_floor_ms"], "decode_vs_floor": e["decode_vs_floor"],
                     "vs_full_fp32_same_runtime": ratios(e, refs[runtime])})
    command = "python benchmarks/deployed.py " + shlex.join(sys.argv[1:])
    result = {"date": datetime.date.today().isoformat(), "command": command, "model": model,
              "subnet": cfg.to_dict(), "device": report["device"], "versions": report["versions"],
              "settings": report["settings"], "memory_bandwidth": report["memory_bandwidth"], "rows": rows,
              "benchmark": report}
    atomic_write_json(out_dir / "deployed.json", result)
    md = markdown(result)
    atomic_write_text(out_dir / "deployed.md", md)
    print(md)
    return result


def markdown(result: dict) -> str:
    s, d = result["settings"], result["device"]
    lines = [f"Deployed artifacts of {result['model']} and a {len(result['subnet']['layers'])}-layer sub-network "
             f"({result['date']}, `{result['command']}`)", "",
             f"{d['name']}, {s['threads']} threads ({d['isa']}); prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new "
             f"tokens, greedy, batch 1; {s['rounds']} interleaved rounds of {s['repeats']} runs, medians; memory read "
             f"bandwidth {result['memory_bandwidth']['gb_per_s']:.1f} GB/s. \"vs full fp32\" is against the full fp32 "
             "model of the same runtime; the floor is weights read per token over that bandwidth.", "",
             "| artifact | file MB | peak RSS MB | prefill ms | TTFT ms | decode ms/token | tokens/s | decode / floor "
             "| prefill vs full fp32 | decode vs full fp32 | file vs full fp32 | RSS vs full fp32 | decode spread |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    llc = result["memory_bandwidth"]["llc_bytes"]
    for r in result["rows"]:
        v = r["vs_full_fp32_same_runtime"]
        lines.append(f"| {r['artifact']} | {r['file_bytes'] / 1e6:,.1f} | {r['peak_rss_bytes'] / 1e6:,.1f} | "
                     f"{r['prefill_ms']:.1f} | {r['ttft_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['decode_vs_floor']:.2f}{'*' * (r['weights_read_bytes'] < llc)} | "
                     f"{v['prefill_ms']:.2f} | {v['decode_ms_per_token']:.2f} | "
                     f"{v['file_bytes']:.2f} | {v['peak_rss_bytes']:.2f} | {r['decode_spread']:.0%} |")
    lines += ["", "Peak RSS is each worker process's VmHWM, runtime libraries included (importing torch alone takes "
              "~0.5 GB). torch's prefill computes the last position's logits only (as `generate` does); the ONNX and "
              "OpenVINO graphs compute them for every prompt position. The floor counts weights, not the KV cache; *: the "
              "weights fit in the last-level cache, so memory bandwidth does not bound them."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or folder (default {DEFAULT_MODEL})")
    p.add_argument("--subnet", type=Path, required=True, help="sub-network config JSON, or a search's pareto.json")
    p.add_argument("--pick", type=int, default=None, help="member of pareto.json (default: its selected winner, else its lowest-KL member)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=None, help="artifact folder (default: .cache/hwnas/deployed/<model>-<key>)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    a = p.parse_args()
    main(a.model, a.subnet, a.pick, a.prompt_tokens, a.new_tokens, a.threads, a.repeats, a.rounds, a.work, a.out_dir)
