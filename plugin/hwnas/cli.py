"""The `hwnas` command line. Each command is a typed function; `main` only parses and forwards."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import defaults as D
from .common import HwnasError, output_lock, point_library_caches, prepare_output
from .data import CALIBRATION_SOURCES, TRAINING_SOURCES
from .defaults import DEFAULT_MODEL
from .gguf_export import GGUF_TYPES
from .runner import RunnerError
from .selection import ITEMS as SELECT_ITEMS, METRICS


def space(*, model: str = DEFAULT_MODEL, mlp_step: int = 64) -> dict[str, Any]:
    """The search space of `model` (read from its config alone) and its number of sub-networks."""
    from .loading import read_llama_config, resolve_model
    from .space import SearchSpace

    s = SearchSpace.from_hf_config(read_llama_config(resolve_model(model)), mlp_step=mlp_step)
    return {"model": model, "search_space": s.to_dict(), "size": s.size(), "size_log10": round(math.log10(s.size()), 1)}


def sample(*, model: str = DEFAULT_MODEL, seed: int = 0, out: Path, mlp_step: int = 64,
           overwrite: bool = False) -> dict[str, Any]:
    """Write a random valid sub-network config of `model` to `out`."""
    from .loading import read_llama_config, resolve_model
    from .space import SearchSpace

    prepare_output(out, overwrite=overwrite)
    s = SearchSpace.from_hf_config(read_llama_config(resolve_model(model)), mlp_step=mlp_step)
    cfg = s.sample(seed)
    cfg.to_json(out)
    return {"out": str(out), **cfg.to_dict()}


def export(*, model: str = DEFAULT_MODEL, subnet: Path, out: Path, overwrite: bool = False,
           pick: int | None = None) -> dict[str, Any]:
    """Write sub-network `subnet` (a config, or member `pick` of a pareto.json) of `model` as a checkpoint in `out`."""
    from .export import export_checkpoint

    return export_checkpoint(model=model, subnet=subnet, out=out, overwrite=overwrite, pick=pick)


def onnx(*, model: Path, out: Path, opset: int | None = None, overwrite: bool = False,
         fused_attention: bool = False) -> dict[str, Any]:
    """Export a checkpoint (full model or sub-network) to ONNX with Optimum, `text-generation-with-past`."""
    from .export import export_onnx_checkpoint

    return export_onnx_checkpoint(model=model, out=out, opset=opset, overwrite=overwrite,
                                  fused_attention=fused_attention)


def gguf(*, model: str = DEFAULT_MODEL, out: Path, type: str = "q8_0", overwrite: bool = False) -> dict[str, Any]:
    """Write a checkpoint (full model or sub-network) as one GGUF file for llama.cpp."""
    from .gguf_export import export_gguf

    return export_gguf(model, out, gguf_type=type, overwrite=overwrite)


def generate(*, model: str = DEFAULT_MODEL, prompt: str = D.PROMPT, max_new_tokens: int = 20) -> dict[str, Any]:
    """Greedy generation from a full model or a sub-network checkpoint."""
    from .metrics import greedy_generate
    from .loading import load_model

    if max_new_tokens < 1:
        raise HwnasError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}")
    m, tok = load_model(model, allow_subnet=True)
    if tok is None:
        raise HwnasError(f"{model} has no tokenizer; generation needs one")
    return {"model": model, "prompt": prompt, "completion": greedy_generate(m, tok, prompt, max_new_tokens=max_new_tokens)}


def perplexity(*, model: str = DEFAULT_MODEL, split: str = "validation", limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Perplexity of `model` (checkpoint, ONNX or OpenVINO folder) on LAMBADA passages of `split` (held out by default)."""
    from .data import lambada_texts
    from .metrics import perplexity as ppl
    from .loading import load_artifact

    if limit is not None and limit < 1:
        raise HwnasError(f"--limit must be a positive integer, got {limit}")
    if batch_size < 1:
        raise HwnasError(f"--batch-size must be a positive integer, got {batch_size}")
    m, tok, kind = load_artifact(model)
    if tok is None:
        raise HwnasError(f"{model} has no tokenizer; perplexity needs one")
    texts = lambada_texts(split, limit)  # type: ignore[arg-type]
    return {"model": model, "runtime": kind, "data": f"lambada/{split}", **ppl(m, tok, texts, batch_size=batch_size)}


def evaluate(*, model: str = DEFAULT_MODEL, runtime: str | None = None, tasks: str, limit: int | None = None,
             fewshot: int = 0, batch_size: int | None = None, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Accuracy with lm-evaluation-harness (offline hwnas tasks) of a checkpoint, ONNX export, OpenVINO IR, GGUF file
    (llama.cpp) or ONNX Runtime GenAI folder."""
    from .common import atomic_write_json
    from .lmeval import evaluate_path, markdown_table, resolve_tasks

    if limit is not None and limit < 1:
        raise HwnasError(f"--limit must be a positive integer (items per task), got {limit}")
    names = list(resolve_tasks(tasks))
    prepare_output(out, overwrite=overwrite)
    result = evaluate_path(model, names, runtime=runtime, limit=limit, fewshot=fewshot, batch_size=batch_size)
    atomic_write_json(out, result)
    print(markdown_table(result), file=sys.stderr)
    return {"out": str(out), **result}


def profile(
    *,
    model: str = DEFAULT_MODEL,
    runtime: str = "onnxruntime",
    precision: str = "fp32",
    device: str = "cpu",
    threads: int | None = None,
    prefill: list[int] = (128,),  # type: ignore[assignment]
    decode: list[int] = (128,),  # type: ignore[assignment]
    calibration: int = 8,
    warmup: int = 5,
    repeats: int = 30,
    out: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    export_blocks: Path | None = None,
    import_measurements: Path | None = None,
    recalibrate: bool = False,
) -> dict[str, Any]:
    """Measure the latency table of every block of `model` on this device for `runtime`/`precision`.

    `--recalibrate` measures only the existing table's whole calibration sub-networks again (the device's speed
    today) and refits its correction; the blocks stay."""
    from .profile import MIN_CALIBRATION, profile as run_profile

    if 0 < calibration < MIN_CALIBRATION:  # fewer points fit nothing, yet would be stored as a 0% error
        raise HwnasError(f"--calibration must be 0 (no end-to-end correction) or at least {MIN_CALIBRATION} "
                         f"sub-networks (to fit the correction and measure its leave-one-out error), got {calibration}")
    return run_profile(model=model, runtime=runtime, precision=precision, device=device, threads=threads,
                       prefill=prefill, decode=decode, calibration=calibration, warmup=warmup, repeats=repeats,
                       out=out, resume=resume, overwrite=overwrite, export_blocks=export_blocks,
                       import_measurements=import_measurements, recalibrate=recalibrate)


def predict(*, table: Path, subnet: Path, tokens: int | None = None) -> dict[str, Any]:
    """Predicted prefill/decode latency and weight bytes of a sub-network config from a latency table."""
    from .predictor import predict as run_predict

    return run_predict(table=table, subnet=subnet, tokens=tokens)


def validate_latency(
    *,
    model: str = DEFAULT_MODEL,
    table: list[Path],
    samples: int = 30,
    seed: int = 0,
    passes: int = 5,
    out: Path,
    allow_foreign_table: bool = False,
    keep_artifacts: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Measure N random sub-networks end to end as deployed and compare with each table's predictions."""
    from .validate_latency import validate_latency as run_validation

    prepare_output(out, overwrite=overwrite, own=(Path(out) / "measurements.json").is_file())
    return run_validation(model=model, tables=table, samples=samples, seed=seed, passes=passes, out=out,
                          allow_foreign_table=allow_foreign_table, keep_artifacts=keep_artifacts)


def search(
    *,
    model: str = DEFAULT_MODEL,
    table: Path,
    algorithm: str = "nsga2",
    evaluations: int = D.EVALUATIONS,
    population: int = D.POPULATION,
    latency_budget: float | None = None,
    latency_ratio: float | None = None,
    size_budget: float | None = None,
    phase: str = "decode",
    seed: int = 0,
    workers: int = 1,
    ray_address: str | None = None,
    resume: bool = False,
    select: int = D.SELECT,
    select_metric: str = D.SELECT_METRIC,
    select_items: int = SELECT_ITEMS,
    calibration_source: str = D.CALIBRATION_SOURCE,
    out: Path,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Multi-objective search: KL to the full model against predicted latency and size."""
    from .search import run_search

    return run_search(model=model, table=str(table), algorithm=algorithm, evaluations=evaluations,
                      population=population, latency_budget=latency_budget, latency_ratio=latency_ratio,
                      size_budget=size_budget, phase=phase, seed=seed, workers=workers, ray_address=ray_address,
                      resume=resume, select=select, select_metric=select_metric, select_items=select_items,
                      calibration_source=calibration_source, out=str(out), overwrite=overwrite)


def baseline(*, method: str, model: str = DEFAULT_MODEL, table: Path, latency_ratio: float | None = None,
             latency_budget: float | None = None, phase: str = "decode", evaluations: int = D.BASELINE_EVALUATIONS,
             population: int = D.BASELINE_POPULATION, seed: int = 0, calibration_source: str = D.CALIBRATION_SOURCE,
             out: Path, overwrite: bool = False) -> dict[str, Any]:
    """A pruning baseline's sub-network (layer-drop, width-uniform or random) under the same latency target."""
    from .baselines import run_baseline

    r = run_baseline(method=method, model=model, table=table, latency_ratio=latency_ratio, latency_budget=latency_budget,
                     phase=phase, evaluations=evaluations, population=population, seed=seed, out=out, overwrite=overwrite,
                     calibration_source=calibration_source)
    return {k: r[k] for k in ("method", "layers", "kl", "latency_ms", "latency_ratio", "size_bytes", "checkpoint")}


def run(*, model: str = DEFAULT_MODEL, runtime: str = "onnxruntime", precision: str | None = None,
        latency_ratio: float = D.LATENCY_RATIO, budget: str = D.RUN_BUDGET, phase: str = "decode", table: Path | None = None, seed: int = 0, threads: int | None = None,
        resume: bool = False, calibration_source: str = D.CALIBRATION_SOURCE, heal_tokens: int | None = None,
        supernet: Path | None = None, heal_candidates: int = 0, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """The main job: search, export, heal, quantize, benchmark and evaluate the best sub-network under a latency budget."""
    from .pipeline import run as run_pipeline

    return run_pipeline(model=model, runtime=runtime, precision=precision, latency_ratio=latency_ratio, budget=budget,
                        phase=phase, table=table, seed=seed, threads=threads, resume=resume, out=out,
                        calibration_source=calibration_source, heal_tokens=heal_tokens, supernet=supernet,
                        heal_candidates=heal_candidates, overwrite=overwrite)


def train_supernet(*, model: str = DEFAULT_MODEL, tokens: int, out: Path, resume: bool = False, mlp_step: int = 64,
                   calibration_source: str = D.CALIBRATION_SOURCE, lr: float = 1e-4, seq_len: int = 256,
                   batch_size: int = 8, micro_batch: int = 4, random_subnets: int = 2, largest_weight: float = 1.0,
                   train_text: Path | None = None, seed: int = 0, checkpoint_every: int = 25,
                   minutes: float | None = None, bf16: bool | None = None,
                   overwrite: bool = False) -> dict[str, Any] | None:
    """Train the supernet once with the sandwich rule (InstaTune) and write it as a folder that `--model` takes."""
    from .distill import distributed_state
    from .instatune import train_supernet as run_training

    result = run_training(model=model, tokens=tokens, out=out, resume=resume, mlp_step=mlp_step,
                          calibration_source=calibration_source, lr=lr, seq_len=seq_len, batch_size=batch_size,
                          micro_batch=micro_batch, random_subnets=random_subnets, largest_weight=largest_weight,
                          train_text=train_text, seed=seed, checkpoint_every=checkpoint_every, minutes=minutes,
                          bf16=bf16, overwrite=overwrite)
    return result if distributed_state().is_main_process else None  # one report under `accelerate launch`


def heal(*, model: Path, teacher: str = DEFAULT_MODEL, tokens: int, out: Path, minutes: float | None = None,
         lora_rank: int = 0, resume: bool = False, temperature: float = 1.0, hard_weight: float = 0.0,
         lr: float | None = None, seq_len: int = 256, batch_size: int = 8, micro_batch: int = 4,
         train_text: Path | None = None, train_embeddings: bool = False, checkpoint_every: int = 25,
         bf16: bool | None = None, seed: int = 0, overwrite: bool = False) -> dict[str, Any] | None:
    """Distil a sub-network checkpoint from the model it was cut from (KL on logits) into a checkpoint of the same format."""
    from .distill import distributed_state
    from .heal import heal as run_heal

    result = run_heal(model=model, teacher=teacher, tokens=tokens, out=out, minutes=minutes, lora_rank=lora_rank,
                      resume=resume, temperature=temperature, hard_weight=hard_weight, lr=lr, seq_len=seq_len,
                      batch_size=batch_size, micro_batch=micro_batch, train_text=train_text,
                      train_embeddings=train_embeddings, checkpoint_every=checkpoint_every, bf16=bf16, seed=seed,
                      overwrite=overwrite)
    return result if distributed_state().is_main_process else None  # one report under `accelerate launch`


def benchmark(
    *,
    model: str | None = None,
    compare: list[str] | None = None,
    runtime: str | None = None,
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    threads: int | None = None,
    repeats: int = 5,
    rounds: int = 3,
    out: Path,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prefill, time to first token, decode, peak memory and size of deployed models, side by side (interleaved)."""
    from .benchmark import benchmark as run_benchmark

    for f in (Path(out), Path(out).with_suffix(".md")):
        prepare_output(f, overwrite=overwrite)
    models = ([model] if model else []) + list(compare or []) or [DEFAULT_MODEL]
    report = run_benchmark(models, runtime=runtime, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                           threads=threads, repeats=repeats, rounds=rounds, out=out)
    print(report["markdown"], file=sys.stderr)
    return {"out": str(out), "markdown": str(Path(out).with_suffix(".md")),
            "models": {e["label"]: {"runtime": e["runtime"], "prefill_ms": round(e["prefill_ms"]["median"], 2),
                                    "ttft_ms": round(e["ttft_ms"]["median"], 2),
                                    "decode_ms_per_token": round(e["decode_ms_per_token"]["median"], 3),
                                    "tokens_per_s": round(e["tokens_per_s"], 2), "peak_rss_bytes": e["peak_rss_bytes"],
                                    "decode_vs_floor": round(e["decode_vs_floor"], 2)} for e in report["models"]}}


def quantize(*, model: str = DEFAULT_MODEL, method: str, out: Path, samples: int = 8, max_kl: float | None = None,
             accept_loss: bool = False, overwrite: bool = False, group_size: int | None = None,
             group_size_fallback: str = "error", keep_fp32: str | None = None,
             head_bits: int | None = None) -> dict[str, Any]:
    """Quantize a checkpoint (or an ONNX folder) for its runtime and check the loss against the fp32 model."""
    from .quantize import DEFAULT_MAX_KL, quantize_model

    return quantize_model(model, method, out, samples=samples, max_kl=DEFAULT_MAX_KL if max_kl is None else max_kl,
                          accept_loss=accept_loss, overwrite=overwrite, group_size=group_size,
                          group_size_fallback=group_size_fallback, keep_fp32=keep_fp32, head_bits=head_bits)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hwnas", description="Hardware-aware NAS for LLaMA models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name: str, fn: Callable[..., Any], help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(fn=fn)
        return c

    def model_arg(c: argparse.ArgumentParser) -> None:
        c.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or local folder (default {DEFAULT_MODEL})")

    def calibration_source_arg(c: argparse.ArgumentParser) -> None:
        c.add_argument("--calibration-source", default=D.CALIBRATION_SOURCE, choices=list(CALIBRATION_SOURCES),
                       help="text that orders the channels by importance and that the KL is measured on: "
                            + "; ".join(f"{k}: {v}" for k, v in CALIBRATION_SOURCES.items())
                            + f" (default {D.CALIBRATION_SOURCE})")

    def train_text_arg(c: argparse.ArgumentParser) -> None:
        c.add_argument("--train-text", type=Path, default=None,
                       help="training text: plain text (blank-line paragraphs) or JSONL with a `text` field (default: "
                            + ", ".join(TRAINING_SOURCES.values()) + "; disjoint from every text hwnas calibrates, "
                            "selects or evaluates on)")

    c = cmd("space", space, "print the search space as JSON and its size")
    model_arg(c)
    c.add_argument("--mlp-step", type=int, default=64, help="MLP width step (default 64)")
    c = cmd("sample", sample, "write a random valid sub-network config")
    model_arg(c)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.add_argument("--mlp-step", type=int, default=64)
    c = cmd("export", export, "export a sub-network as a standalone Hugging Face checkpoint")
    model_arg(c)
    c.add_argument("--subnet", type=Path, required=True, help="sub-network config JSON, or a search's pareto.json")
    c.add_argument("--pick", type=int, default=None,
                   help="member of pareto.json (sorted by latency; default: the search's selected winner, else the lowest KL)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    c = cmd("onnx", onnx, "export a checkpoint to ONNX (Optimum, KV cache), loadable with ORTModelForCausalLM")
    c.add_argument("--model", type=Path, required=True, help="checkpoint folder (full model or hwnas export)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--opset", type=int, default=None, help="ONNX opset (default: Optimum's; 21 for NNCF INT4)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    c.add_argument("--fused-attention", action="store_true",
                   help="write each attention layer as onnxruntime's GroupQueryAttention (faster; onnxruntime only)")
    c = cmd("gguf", gguf, "write a checkpoint as a GGUF file for llama.cpp (a sub-network with per-layer shapes as "
            "llama.cpp's DeciLM architecture)")
    model_arg(c)
    c.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    c.add_argument("--type", default="q8_0", choices=list(GGUF_TYPES),
                   help="weight type (default q8_0; q4_0/q4_1 use llama.cpp's quantizer when llama-cpp-python is "
                        "installed)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c = cmd("generate", generate, "greedy generation from a model or sub-network checkpoint")
    model_arg(c)
    c.add_argument("--prompt", default=D.PROMPT)
    c.add_argument("--max-new-tokens", type=int, default=20)
    c = cmd("perplexity", perplexity, "perplexity on held-out LAMBADA passages")
    model_arg(c)
    c.add_argument("--split", default="validation", choices=["calibration", "validation", "test"])
    c.add_argument("--limit", type=int, default=None, help="score only the first N passages")
    c.add_argument("--batch-size", type=int, default=8)
    c = cmd("evaluate", evaluate, "accuracy with lm-evaluation-harness on offline tasks (torch, ONNX, OpenVINO, "
            "a GGUF in llama.cpp or an ONNX Runtime GenAI folder)")
    model_arg(c)
    c.add_argument("--runtime", default=None, choices=["torch", "onnxruntime", "openvino", "llamacpp", "ortgenai"],
                   help="default: read from the model path; if given, it must match the path")
    c.add_argument("--tasks", required=True, help="comma-separated: arc_easy, arc_challenge, piqa, hellaswag, "
                   "winogrande, boolq, lambada, mmlu (or their lm-eval names hwnas_*)")
    c.add_argument("--limit", type=int, default=None, help="score only the first N items of each task "
                   "(of each of the 57 subjects for mmlu)")
    c.add_argument("--fewshot", type=int, default=0, help="few-shot examples per item (default 0)")
    c.add_argument("--batch-size", type=int, default=None, help="default: 8 for torch, 1 (as deployed) for ONNX "
                   "Runtime and OpenVINO, whose dynamic int8 scores depend on the batch")
    c.add_argument("--out", type=Path, required=True, help="result JSON")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c = cmd("profile", profile, "measure a latency lookup table on this device")
    model_arg(c)
    c.add_argument("--runtime", default="onnxruntime", choices=["torch", "onnxruntime", "openvino"])
    c.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8", "int8-wo", "int4"],
                   help="int8: onnxruntime's dynamic int8 or OpenVINO's weight-only; int8-wo: onnxruntime weight-only")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    c.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    c.add_argument("--prefill", type=int, nargs="+", default=[128], help="prompt lengths (default 128)")
    c.add_argument("--decode", type=int, nargs="+", default=[128], help="KV-cache lengths for decode (default 128)")
    c.add_argument("--calibration", type=int, default=8, help="sub-networks measured end to end to fit the correction")
    c.add_argument("--warmup", type=int, default=5)
    c.add_argument("--repeats", type=int, default=30)
    c.add_argument("--out", type=Path, default=None, help="table file (default latency_tables/<model>__<device>__<runtime>-<precision>.json)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted profile")
    c.add_argument("--overwrite", action="store_true", help="replace an existing table")
    c.add_argument("--export-blocks", type=Path, default=None, help="only write the block graphs for `python -m hwnas.runner`")
    c.add_argument("--import-measurements", type=Path, default=None, help="turn a measured block folder into a table")
    c.add_argument("--recalibrate", action="store_true",
                   help="measure the existing table's calibration sub-networks again (the device's speed now)")
    c = cmd("predict", predict, "predict a sub-network's latency and size from a table")
    c.add_argument("--table", type=Path, required=True)
    c.add_argument("--subnet", type=Path, required=True, help="sub-network config JSON")
    c.add_argument("--tokens", type=int, default=None, help="prompt / cache length (default: the table's first)")
    c = cmd("validate-latency", validate_latency, "check tables' predictions against end-to-end measurements")
    model_arg(c)
    c.add_argument("--table", type=Path, nargs="+", required=True, help="one or more tables, measured interleaved")
    c.add_argument("--samples", type=int, default=30)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--passes", type=int, default=5,
                   help="measurement passes; the median is the measured figure and their spread the repeatability")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--allow-foreign-table", action="store_true", help="accept a table measured on another device")
    c.add_argument("--keep-artifacts", action="store_true", help="keep the built sub-networks under OUT/artifacts")
    c.add_argument("--overwrite", action="store_true", help="start again in a non-empty --out (its files are removed)")
    c = cmd("search", search, "genetic multi-objective search for Pareto-optimal sub-networks")
    model_arg(c)
    c.add_argument("--table", type=Path, required=True, help="latency table of the target device/runtime/precision")
    c.add_argument("--algorithm", default="nsga2", choices=["nsga2", "linas", "random"])
    c.add_argument("--evaluations", type=int, default=D.EVALUATIONS,
                   help=f"real quality evaluations (default {D.EVALUATIONS})")
    c.add_argument("--population", type=int, default=D.POPULATION)
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--latency-budget", type=float, default=None, help="predicted latency budget in ms")
    budget.add_argument("--latency-ratio", type=float, default=None, help="budget as a fraction of the full model's")
    c.add_argument("--size-budget", type=float, default=None, help="weight size budget in MB")
    c.add_argument("--phase", default="decode", choices=["prefill", "decode"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=int, default=1, help="Ray workers on this machine (default 1: no Ray)")
    c.add_argument("--ray-address", default=None, help="join an existing Ray cluster")
    c.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    c.add_argument("--select", type=int, default=D.SELECT,
                   help="under a budget, choose the winner among the best sub-networks of this many depths and "
                        f"the layer-drop and width-uniform networks by --select-metric (default {D.SELECT}; 0: the lowest KL)")
    c.add_argument("--select-metric", default=D.SELECT_METRIC, choices=list(METRICS),
                   help="choice-nll (default): answer NLL on held-out SciQ/OpenBookQA/Social IQA questions; "
                        "lastword-nll: LAMBADA last-word NLL on calibration passages (cheaper); "
                        "task-nll: held-out items of ARC-Easy, PIQA, HellaSwag (their last validation "
                        "questions) and LAMBADA (calibration passages)")
    c.add_argument("--select-items", type=int, default=SELECT_ITEMS,
                   help=f"questions (passages for LAMBADA) per task for --select (default {SELECT_ITEMS})")
    calibration_source_arg(c)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--overwrite", action="store_true", help="start again in a non-empty --out (its files are removed)")
    c = cmd("baseline", baseline, "a pruning baseline under the same latency target as the search, as a checkpoint")
    c.add_argument("--method", required=True, choices=["layer-drop", "width-uniform", "random"])
    model_arg(c)
    c.add_argument("--table", type=Path, required=True, help="latency table of the target device/runtime/precision")
    budget = c.add_mutually_exclusive_group(required=True)
    budget.add_argument("--latency-ratio", type=float, default=None, help="budget as a fraction of the full model's")
    budget.add_argument("--latency-budget", type=float, default=None, help="predicted latency budget in ms")
    c.add_argument("--phase", default="decode", choices=["prefill", "decode"])
    c.add_argument("--evaluations", type=int, default=D.BASELINE_EVALUATIONS,
                   help="random: real quality evaluations (the search's budget)")
    c.add_argument("--population", type=int, default=D.BASELINE_POPULATION, help="random: candidates drawn per round")
    c.add_argument("--seed", type=int, default=0)
    calibration_source_arg(c)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--overwrite", action="store_true", help="replace a baseline already in --out")
    c = cmd("run", run, "the main job: search, export, quantize, benchmark and evaluate; writes OUT/report.md")
    model_arg(c)
    c.add_argument("--runtime", default="onnxruntime", choices=["torch", "onnxruntime", "openvino"])
    c.add_argument("--precision", default=None, choices=["fp32", "int8", "int8-wo", "int4"],
                   help="default: int8-wo for onnxruntime (weight-only, fused attention), int8 for openvino, fp32 for torch")
    c.add_argument("--latency-ratio", type=float, default=D.LATENCY_RATIO,
                   help="latency budget as a fraction of the full model's")
    c.add_argument("--budget", default=D.RUN_BUDGET, choices=["quick", "full"], help="search and evaluation effort")
    c.add_argument("--phase", default="decode", choices=["prefill", "decode"], help="latency the budget applies to")
    c.add_argument("--table", type=Path, default=None, help="latency table (default: the shipped one for this device, "
                   "else profile it)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    c.add_argument("--resume", action="store_true", help="continue a run in --out, reusing its finished steps")
    c.add_argument("--heal-tokens", type=int, default=None,
                   help="distillation tokens for the chosen sub-network before it is deployed (default: "
                        + ", ".join(f"{v:,} for --budget {k}" for k, v in D.HEAL_TOKENS.items()) + "; 0: no healing)")
    c.add_argument("--supernet", type=Path, default=None,
                   help="search this `hwnas train-supernet` folder of --model instead of --model itself")
    c.add_argument("--heal-candidates", type=int, default=0,
                   help="K >= 2: heal the selection's K best candidates briefly (together half of --heal-tokens) and "
                        "ship the best after healing (default 0: the selection's winner)")
    calibration_source_arg(c)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--overwrite", action="store_true", help="start again in a non-empty --out (its files are removed)")
    c = cmd("train-supernet", train_supernet, "train the supernet once (sandwich rule, distilled from the model) "
            "into a folder that search, baseline, export and run take as --model; runs under accelerate launch")
    model_arg(c)
    c.add_argument("--tokens", type=int, required=True, help="training tokens (whole batches of batch-size x seq-len)")
    c.add_argument("--out", type=Path, required=True, help="the supernet folder (its checkpoint goes to OUT/checkpoint)")
    c.add_argument("--resume", action="store_true", help="continue the training checkpointed in --out")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c.add_argument("--mlp-step", type=int, default=64, help="MLP width step of the search space (default 64)")
    calibration_source_arg(c)
    c.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate, cosine schedule (default 1e-4)")
    c.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default 256)")
    c.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step, all processes (default 8)")
    c.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass (default 4)")
    c.add_argument("--random-subnets", type=int, default=2,
                   help="random sub-networks per step besides the largest and the smallest (default 2)")
    c.add_argument("--largest-weight", type=float, default=1.0,
                   help="weight of the largest sub-network's loss; above 1 keeps the full model nearer the original "
                        "(default 1)")
    train_text_arg(c)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--checkpoint-every", type=int, default=25, help="optimizer steps between checkpoints (default 25)")
    c.add_argument("--minutes", type=float, default=None,
                   help="stop at a checkpoint after this many minutes; --resume continues")
    c.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where the CPU has AMX or AVX512-BF16, or the GPU bf16)")
    c = cmd("heal", heal, "distil a sub-network checkpoint from the model it was cut from (KL on logits) into a "
            "checkpoint of the same format; runs under accelerate launch")
    c.add_argument("--model", type=Path, required=True, help="the sub-network checkpoint (hwnas export or baseline)")
    c.add_argument("--teacher", default=DEFAULT_MODEL, help=f"the model it was cut from (default {DEFAULT_MODEL})")
    c.add_argument("--tokens", type=int, required=True, help="training tokens (whole batches of batch-size x seq-len)")
    c.add_argument("--out", type=Path, required=True, help="the healed checkpoint folder")
    c.add_argument("--minutes", type=float, default=None,
                   help="stop at a checkpoint after this many minutes and write what is healed; --resume continues")
    c.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank, merged before "
                   "saving (default 0: every weight but the embedding)")
    c.add_argument("--resume", action="store_true", help="continue the heal checkpointed in OUT.heal-checkpoint")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out and any unfinished heal")
    c.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KL (default 1)")
    c.add_argument("--hard-weight", type=float, default=0.0, help="weight of the next-token loss (default 0)")
    c.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate, cosine schedule (default "
                   "6e-4, or 1e-3 with --lora-rank)")
    c.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default 256)")
    c.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step, all processes (default 8)")
    c.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass (default 4)")
    train_text_arg(c)
    c.add_argument("--train-embeddings", action="store_true", help="train the (tied) embedding and LM head too")
    c.add_argument("--checkpoint-every", type=int, default=25, help="optimizer steps between checkpoints (default 25)")
    c.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where the CPU has AMX or AVX512-BF16, or the GPU bf16)")
    c.add_argument("--seed", type=int, default=0)
    c = cmd("benchmark", benchmark, "measure deployed models end to end (prefill, TTFT, decode, memory, size)")
    c.add_argument("--model", default=None,
                   help=f"model name, folder, .onnx/.xml/.gguf file or GenAI folder (default {DEFAULT_MODEL})")
    c.add_argument("--compare", nargs="+", default=None, metavar="MODEL",
                   help="more models, measured in interleaved rounds; ratios are against the first")
    c.add_argument("--runtime", default=None, choices=["torch", "onnxruntime", "openvino", "llamacpp", "ortgenai"],
                   help="default: read from each model folder (llamacpp and ortgenai need pip install 'hwnas[edge]')")
    c.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    c.add_argument("--new-tokens", type=int, default=32, help="tokens generated, the first included (default 32)")
    c.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    c.add_argument("--repeats", type=int, default=5, help="timed runs per model per round (default 5)")
    c.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    c.add_argument("--out", type=Path, required=True, help="report JSON (the Markdown table goes beside it as .md)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing report")
    from .quantize import DEFAULT_MAX_KL, METHODS

    c = cmd("quantize", quantize, "quantize a checkpoint or ONNX folder (ORT, NNCF, OpenVINO, bitsandbytes) and "
            "measure its KL to the fp32 model")
    c.add_argument("--model", default=DEFAULT_MODEL, help="model name, checkpoint folder, or Optimum ONNX folder")
    c.add_argument("--method", required=True, help=", ".join(METHODS))
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--samples", type=int, default=8, help="held-out calibration sequences of 128 tokens (default 8)")
    c.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL,
                   help=f"mean next-token KL (nats) to the fp32 model above which it fails (default {DEFAULT_MAX_KL})")
    c.add_argument("--accept-loss", action="store_true", help="exit 0 even when the KL exceeds --max-kl")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    c.add_argument("--group-size", type=int, default=None,
                   help="group size of nncf-int4 and ov-int4 (default 64), block size of ort-int4 (32, 64, 128; default 32)")
    c.add_argument("--group-size-fallback", default="error", choices=["error", "adjust", "ignore"],
                   help="int4 layers whose width the group size does not divide: error, adjust or ignore (NNCF)")
    c.add_argument("--keep-fp32", default=None, choices=["down_proj"],
                   help="ort-int8: keep every layer's down_proj in fp32 (most of int8's loss; a searched sub-network "
                   "already says which layers in its hwnas_subnet.json)")
    c.add_argument("--head-bits", type=int, default=None, choices=[4, 8],
                   help="ort-int4: bits of the LM head (default 8; 4 quantizes it as the rest)")
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM as an interrupt, so that temporaries are removed on the way out as they are on Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _stdout_to_stderr() -> Any:
    """Send everything written to stdout (libraries' logs, native code included) to stderr while a command runs,
    so that stdout carries only its JSON result."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no stdout file descriptor (embedded use): nothing to redirect
        yield
        return
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # where sys.stdout is not fd 1 (notebooks, captured)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _storage_error(e: Exception) -> bool:
    """safetensors' writer reports a full or read-only disk as a SafetensorError ("I/O error: ..."), not an OSError."""
    return type(e).__name__ == "SafetensorError" and "I/O error" in str(e)


def _os_error(e: OSError) -> str:
    where = f" {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "") if e.filename else ""
    return f"{e.strerror or e}:{where} (expected a location this user can write, with free space)" \
        if e.errno in (errno.EACCES, errno.ENOSPC, errno.EROFS, errno.EPERM) else f"{e.strerror or e}:{where}"


def main(argv: Sequence[str] | None = None) -> int:
    point_library_caches()  # before any command imports datasets, matplotlib or OpenVINO
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="hwnas: %(message)s")
    kwargs = {k: v for k, v in vars(args).items() if k not in ("fn", "command", "verbose")}
    out = kwargs.get("out")
    # one run per output; under `accelerate launch` only the main process holds it
    locked = out is not None and int(os.environ.get("RANK", "0")) == 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        with _stdout_to_stderr(), (output_lock(out) if locked else contextlib.nullcontext()):
            result = args.fn(**kwargs)
    except (HwnasError, RunnerError) as e:  # RunnerError: the torch-free runner's bad manifest or argument
        print(f"hwnas: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"hwnas: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _storage_error(e):
            raise
        print(f"hwnas: error: {' '.join(str(e).split())} (expected a location this user can write, with free space)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("hwnas: interrupted", file=sys.stderr)
        return 128 + (int(e.args[0]) if isinstance(e, _Terminated) else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if result is not None:  # None: a non-main process under `accelerate launch`
        print(json.dumps(result, indent=2))
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
