"""`hwnas run`: the whole chain on this device, from a pretrained Llama to a benchmarked, evaluated deployment.

    latency table (shipped if it matches this device, else profiled) -> search -> best sub-network under
    the latency budget -> checkpoint -> healing (distillation) -> ONNX / OpenVINO -> quantization -> benchmark
    against the full model in the same runtime and precision -> held-out quality before and after healing ->
    report.md + report.json

Every step writes its output atomically into the run folder; `--resume` reuses the finished ones.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import defaults as D
from . import runner
from .benchmark import benchmark
from .common import HwnasError, atomic_write_json, prepare_output, read_json
from .data import lambada_texts
from .deploy import DEPLOY_METHODS, deploy
from .export import export_checkpoint
from .heal import REPORT_FILE as HEAL_REPORT, checkpoint_dir, heal
from .heal_select import pick_after_healing
from .lmeval import evaluate_model
from .loading import DEFAULT_MODEL, load_artifact, load_model, model_key, read_llama_config, resolve_model
from .metrics import greedy_generate, perplexity
from .predictor import check_table
from .profile import profile
from .quantize import settings_for
from .run_report import write_report
from .search import run_search
from .tables import find_table, model_label, model_signature

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    evaluations: int  # real quality evaluations of the search
    population: int
    perplexity_passages: int  # held-out LAMBADA validation passages
    tasks: tuple[str, ...]  # lm-eval tasks of the accuracy sample (hwnas evaluate)
    task_items: int  # items per task
    new_tokens: int  # decoded tokens per benchmark run
    rounds: int  # interleaved benchmark rounds
    heal_tokens: int  # distillation tokens for the chosen sub-network (0: no healing)


BUDGETS = {
    "quick": Budget(evaluations=60, population=12, perplexity_passages=100, tasks=("lambada", "arc_easy", "piqa"),
                    task_items=100, new_tokens=32, rounds=3, heal_tokens=D.HEAL_TOKENS["quick"]),
    "full": Budget(evaluations=200, population=20, perplexity_passages=400,
                   tasks=("lambada", "arc_easy", "piqa", "hellaswag"), task_items=500, new_tokens=64, rounds=5,
                   heal_tokens=D.HEAL_TOKENS["full"]),
}
TARGETS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("openvino", "fp32"), *DEPLOY_METHODS]
# `hwnas run`'s precision when none is given. onnxruntime: weight-only int8 with fused attention, which keeps far
# more quality than dynamic int8 and decodes faster.
DEFAULT_PRECISION = {"onnxruntime": "int8-wo", "openvino": "int8", "torch": "fp32"}


def evaluate_quality(path: Path, budget: Budget, *, progress: bool) -> dict[str, Any]:
    """Held-out perplexity (LAMBADA validation passages) and lm-eval accuracy on a task sample, in the artifact's runtime."""
    model, tok, kind = load_artifact(path)
    if tok is None:
        raise HwnasError(f"{path} has no tokenizer; evaluation needs one")
    ppl = perplexity(model, tok, lambada_texts("validation", budget.perplexity_passages), progress=progress)
    acc = evaluate_model(model, tok, budget.tasks, limit=budget.task_items, progress=progress)
    return {"runtime": kind, "perplexity": ppl, "accuracy": acc}


def sample_generation(checkpoint: Path, prompt: str = D.PROMPT) -> dict[str, str]:
    """What a checkpoint says (greedy, torch) after the report's prompt: the quickest sense of its quality."""
    model, tok = load_model(checkpoint, allow_subnet=True)
    return {"prompt": prompt, "text": greedy_generate(model, tok, prompt)}


def run(*, model: str = DEFAULT_MODEL, runtime: str = "onnxruntime", precision: str | None = None,
        latency_ratio: float = D.LATENCY_RATIO, budget: str = D.RUN_BUDGET, phase: str = "decode",
        table: str | Path | None = None, seed: int = 0, threads: int | None = None, resume: bool = False,
        out: str | Path, calibration_source: str = D.CALIBRATION_SOURCE, heal_tokens: int | None = None,
        supernet: str | Path | None = None, heal_candidates: int = 0, progress: bool = True,
        overwrite: bool = False) -> dict[str, Any]:
    """Search, heal, deploy, benchmark and evaluate the best sub-network of `model` under `latency_ratio` of the full
    model's latency.

    `precision` defaults to the runtime's best target here (DEFAULT_PRECISION). `calibration_source` goes to the
    search, which records it (a resumed search refuses another) as its pareto.json does for the export.
    `heal_tokens` (default: the budget's; 0: none) distils the chosen sub-network from the model it was cut from
    before it is deployed. `heal_candidates` K >= 2 first heals the selection's K best candidates briefly (together
    half the healing tokens) and keeps the best after healing. `supernet` (a `hwnas train-supernet` folder of
    `model`) is searched instead of `model`.
    """
    precision = precision or DEFAULT_PRECISION.get(runtime, "fp32")
    if (runtime, precision) not in TARGETS:
        raise HwnasError(f"cannot deploy {runtime}/{precision}; expected one of {[f'{r}/{p}' for r, p in TARGETS]}")
    if budget not in BUDGETS:
        raise HwnasError(f"unknown budget {budget!r}; expected one of {list(BUDGETS)}")
    if not 0 < latency_ratio <= 1:
        raise HwnasError(f"--latency-ratio must be in (0, 1], got {latency_ratio}")
    b = BUDGETS[budget]
    heal_tokens = b.heal_tokens if heal_tokens is None else heal_tokens
    if heal_tokens < 0:
        raise HwnasError(f"--heal-tokens must be 0 (no healing) or positive, got {heal_tokens}")
    if threads is not None and threads < 1:
        raise HwnasError(f"--threads must be at least 1, got {threads}")
    if heal_candidates and (heal_candidates < 2 or not heal_tokens):
        raise HwnasError(f"--heal-candidates must be 0 or at least 2, with healing on; got {heal_candidates} "
                         f"with --heal-tokens {heal_tokens}")
    out = Path(out)
    if overwrite:
        prepare_output(out, overwrite=True)
    if out.exists() and any(out.iterdir()) and not resume:
        raise HwnasError(f"{out} is not empty; pass --resume to continue that run, --overwrite to start again, "
                         "or choose another --out")
    model_dir = resolve_model(model)
    config = read_llama_config(model_dir)
    source = model  # what the search runs on and the sub-network is cut from
    if supernet is not None:
        source = str(resolve_model(supernet))
        if model_signature(read_llama_config(Path(source))) != model_signature(config):
            raise HwnasError(f"--supernet {supernet} does not have {model}'s shape; expected a `hwnas train-supernet` "
                             f"folder of {model}")
    cpu = runner.cpu_info()
    device_id = runner.device_id(cpu, threads or cpu["cores"])
    if table is not None:  # a given table is checked before anything is written
        check_table(Path(table), signature=model_signature(config), runtime=runtime, precision=precision,
                    device_id=device_id, quantization=settings_for(runtime, precision, cpu["isa"]))
    out.mkdir(parents=True, exist_ok=True)
    label = model_label(model, model_dir)
    args = {"model": model_key(model), "runtime": runtime, "precision": precision, "latency_ratio": latency_ratio, "budget": budget,
            "phase": phase, "seed": seed, "threads": threads, "table": None if table is None else str(Path(table).resolve()),
            "heal_tokens": heal_tokens, "heal_candidates": heal_candidates or None,
            "supernet": None if supernet is None else source}
    saved = out / "run_args.json"
    before = read_json(saved, "run arguments") if saved.exists() else args
    diff = {k: (before.get(k), args.get(k)) for k in {**before, **args} if before.get(k) != args.get(k)}
    if diff:
        raise HwnasError(f"cannot resume {out}: arguments differ from the saved run (saved, now): {diff}")
    atomic_write_json(saved, args)
    step = _stepper(out, progress)

    # 1. latency table: this device's, for this runtime and precision
    if table is None:
        table = find_table(label, device_id, runtime, precision)
        if table is None:
            table = out / "latency_table.json"
            if not (table.exists() and read_json(table, "latency table")["header"].get("complete")):
                logger.warning("no shipped table for %s on %s (%s/%s): profiling this device", label, device_id, runtime,
                               precision)
                profile(model=model, runtime=runtime, precision=precision, threads=threads, out=table, resume=table.exists(),
                        progress=progress)
    table = Path(table)
    header = check_table(table, signature=model_signature(config), runtime=runtime, precision=precision,
                         device_id=device_id, quantization=settings_for(runtime, precision, cpu["isa"]))

    # 2. search, 3. the most accurate front member under the budget, as a checkpoint
    search_dir, subnet_dir, healed_dir = out / "search", out / "subnet", out / "healed"
    step("search", search_dir / "summary.json",
         lambda: run_search(model=source, table=str(table), evaluations=b.evaluations, population=b.population,
                            latency_ratio=latency_ratio, phase=phase, seed=seed,
                            resume=(search_dir / "state.json").exists(), out=str(search_dir),
                            calibration_source=calibration_source, progress=progress))
    chosen = choose(read_json(search_dir / "pareto.json", "search front"), latency_ratio)
    front, pick = search_dir / "pareto.json", chosen["index"]
    if heal_candidates:  # the candidate that scores best after a brief healing
        picked = pick_after_healing(source=source, search_dir=search_dir, k=heal_candidates,
                                    tokens=heal_tokens // (2 * heal_candidates), work=out / "heal_candidates",
                                    progress=progress)
        chosen = dict(picked["chosen"], index=None, changed_pick=picked["changed_pick"])
        front, pick = Path(chosen["folder"]) / "candidate.json", 0
    step("export", subnet_dir / "hwnas_export.json",
         lambda: export_checkpoint(model=source, subnet=front, pick=pick, out=subnet_dir))

    # 4. healing: distil the sub-network from the model it was cut from
    if heal_tokens:
        step("heal", healed_dir / HEAL_REPORT,
             lambda: heal(model=subnet_dir, teacher=source, tokens=heal_tokens, out=healed_dir,
                          resume=checkpoint_dir(healed_dir).exists(), progress=progress))
    heal_report = read_json(healed_dir / HEAL_REPORT, "heal report") if heal_tokens else None
    shipped = "healed" if heal_tokens else "subnet"

    # 5. deployed artifacts at the target precision (the pruned sub-network too, for its quality before healing),
    # and the full model in fp32 as reference
    deployed = out / "deployed"
    arts = {"full_fp32": (model_dir, "fp32"), "full": (model_dir, precision), "subnet": (subnet_dir, precision)}
    if heal_tokens:
        arts["healed"] = (healed_dir, precision)
    fused = bool(header.get("quantization", {}).get("fused_attention", False))  # what the table was measured with
    if precision == "fp32":
        del arts["full_fp32"]
    paths: dict[str, Path] = {}
    for name, (src, prec) in arts.items():
        target = deployed / f"{name}-{runtime}-{prec}" if runtime != "torch" else src
        paths[name] = target
        if runtime != "torch":
            step(f"deploy {name}", target, lambda s=src, p=prec, t=target: deploy(s, runtime, p, t, progress=progress,
                                                                                 fused_attention=fused))

    # 6. benchmark what ships against the full model, side by side; 7. quality before and after healing
    timed = [k for k in ("full_fp32", "full", shipped) if k in paths]
    step("benchmark", out / "benchmark.json",
         lambda: benchmark([str(paths[k]) for k in timed], labels=timed, runtime=runtime, threads=threads,
                           new_tokens=b.new_tokens, rounds=b.rounds, out=out / "benchmark.json", progress=progress))
    quality_path = out / "quality.json"
    quality = read_json(quality_path, "quality") if quality_path.exists() else {}
    for name in ("full", "subnet", "healed")[:3 if heal_tokens else 2]:
        if "accuracy" not in quality.get(name, {}):
            logger.warning("evaluating %s", name)
            quality[name] = evaluate_quality(paths[name], b, progress=progress)
        if name != "full" and "generation" not in quality[name]:
            quality[name]["generation"] = sample_generation(healed_dir if name == "healed" else subnet_dir)
        atomic_write_json(quality_path, quality)

    report = write_report(out, args, b, table, header, chosen, paths, read_json(out / "benchmark.json", "benchmark"),
                          quality, heal_report)
    return {"out": str(out), "report": str(out / "report.md"), **report["headline"]}


def _stepper(out: Path, progress: bool) -> Callable[[str, Path, Callable[[], Any]], None]:
    def step(name: str, done: Path, fn: Callable[[], Any]) -> None:
        if done.exists():
            logger.warning("%s: reusing %s", name, done.relative_to(out))
            return
        if progress:
            print(f"hwnas run: {name}", flush=True)
        fn()

    return step


def choose(pareto: dict[str, Any], latency_ratio: float) -> dict[str, Any]:
    """The search's selected winner (`hwnas.selection`), else the lowest-KL member of the front, within the
    latency ratio (the search's constraint, checked again); `index` is None for the selected one."""
    sel = pareto.get("selected")
    if sel is not None and sel["latency_ratio"] <= latency_ratio + 1e-9:
        return dict(sel, index=None)
    members = [dict(m, index=i) for i, m in enumerate(pareto["front"]) if m["latency_ratio"] <= latency_ratio + 1e-9]
    if not members:
        raise HwnasError(f"the search found no sub-network within {latency_ratio} of the full model's latency")
    return min(members, key=lambda m: m["kl"])


