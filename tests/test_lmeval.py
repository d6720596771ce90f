"""hwnas evaluate: lm-eval on hwnas's offline task definitions, on torch, ONNX Runtime and OpenVINO models."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hwnas  # noqa: F401  (library caches inside the project)
from hwnas.common import HwnasError
from hwnas.loading import load_artifact
from hwnas.lmeval import (TASKS, TASKS_DIR, evaluate_path, headline, lm_eval_model, paired_difference, resolve_tasks,
                          task_manager)

# Standard lm-eval task each hwnas task copies (relative to lm_eval/tasks), and the size of its scored split.
STANDARD = {
    "arc_easy": ("arc/arc_easy.yaml", 570),
    "arc_challenge": ("arc/arc_challenge.yaml", 299),
    "piqa": ("piqa/piqa.yaml", 1838),
    "hellaswag": ("hellaswag/hellaswag.yaml", 10042),
    "winogrande": ("winogrande/default.yaml", 1267),
    "boolq": ("super_glue/boolq/default.yaml", 3270),
    "lambada": ("lambada/lambada_openai.yaml", 2586),
}
MMLU_TEST_ITEMS = 14042
QUICK = ["arc_easy", "winogrande", "lambada"]  # one multiple-choice task with acc_norm, one without, one loglikelihood


@pytest.fixture(scope="module")
def manager():
    return task_manager()


def _builtin(rel: str, data, **more):
    """lm-eval's own task config from its yaml, fed `data` for every split it names (no download)."""
    import datasets
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / rel)
    splits = datasets.DatasetDict({**{s: data for s in ("train", "validation", "test")}, **more})
    cfg["custom_dataset"] = lambda **_: splits
    return ConfigurableTask(config=cfg)


def _requests(task, limit: int, fewshot: int = 0, seed: int = 1234):
    task.set_config(key="num_fewshot", value=fewshot)
    task.set_fewshot_seed(seed)
    task.build_all_requests(limit=limit)
    return [(i.request_type, i.arguments, i.doc_id, i.idx) for i in task.instances]


def _one(manager, name: str):
    tasks = manager.load([name])["tasks"]
    assert len(tasks) == 1
    return next(iter(tasks.values()))


@pytest.mark.parametrize("short", list(STANDARD))
def test_task_loads_offline_and_renders_like_lm_evals_own(manager, short):
    rel, size = STANDARD[short]
    ours = _one(manager, TASKS[short])
    assert len(ours.eval_docs) == size
    assert ours.OUTPUT_TYPE == ("loglikelihood" if short == "lambada" else "multiple_choice")
    std = _builtin(rel, ours.dataset[ours.config.test_split].select(range(20)))  # the first 5 are compared
    assert set(ours._metric_fn_list) == set(std._metric_fn_list)  # acc (+ acc_norm / perplexity) as lm-eval's
    want = _requests(std, limit=5)
    assert want and _requests(ours, limit=5) == want  # same contexts, continuations and choices, in order
    doc = ours.eval_docs[0]
    assert ours.doc_to_text(doc) == std.doc_to_text(doc) and ours.doc_to_target(doc) == std.doc_to_target(doc)


def test_fewshot_examples_are_seeded_and_never_the_scored_item(manager):
    task = _one(manager, "hwnas_arc_easy")
    first = _requests(task, limit=3, fewshot=3)
    assert first == _requests(task, limit=3, fewshot=3)  # same seed, same examples
    assert first != _requests(task, limit=3, fewshot=3, seed=7)
    for doc in list(task.eval_docs)[:3]:
        context = task.fewshot_context(doc, 3)
        assert context.count("Question:") == 4 and context.endswith(task.doc_to_text(doc))
        assert context.count(f"Question: {doc['question']}\n") == 1  # the item itself is not an example


def test_mmlu_group_matches_lm_evals_subjects_and_dev_fewshot(manager):
    import lm_eval.tasks

    loaded = manager.load(["hwnas_mmlu"])
    tasks = loaded["tasks"]
    builtin = sorted(p.stem for p in (Path(lm_eval.tasks.__file__).parent / "mmlu" / "default").glob("mmlu_*.yaml"))
    assert sorted(t.removeprefix("hwnas_") for t in tasks) == builtin and len(tasks) == 57
    assert sum(len(t.eval_docs) for t in tasks.values()) == MMLU_TEST_ITEMS
    for name in ("hwnas_mmlu_anatomy", "hwnas_mmlu_high_school_european_history"):
        ours = tasks[name]
        # lm-eval's MMLU takes its shots from dev, the first n, as ours
        rel = f"mmlu/default/{name.removeprefix('hwnas_')}.yaml"
        std = _builtin(rel, ours.dataset["test"], dev=ours.dataset["dev"])
        for k in (0, 5):
            assert _requests(ours, limit=2, fewshot=k) == _requests(std, limit=2, fewshot=k)
        assert ours.config.description.startswith("The following are multiple choice questions (with answers) about")


def test_shipped_mmlu_files_are_what_the_generator_writes(tmp_path):
    from hwnas.lmeval import write_mmlu_tasks

    written = write_mmlu_tasks(tmp_path)
    assert len(written) == 58
    assert {p.name: p.read_text() for p in written} == {p.name: p.read_text() for p in (TASKS_DIR / "mmlu").iterdir()}


def test_task_names_short_and_full_and_unknown():
    assert resolve_tasks("arc_easy, hwnas_piqa,mmlu") == {"arc_easy": "hwnas_arc_easy", "piqa": "hwnas_piqa",
                                                          "mmlu": "hwnas_mmlu"}
    with pytest.raises(HwnasError, match=r"unknown task 'arc_hard'.*arc_easy, arc_challenge, piqa"):
        resolve_tasks(["arc_easy", "arc_hard"])
    assert set(TASKS) == set(STANDARD) | {"mmlu"}
    assert {p.name for p in TASKS_DIR.glob("*.yaml")} == {f"{v}.yaml" for k, v in TASKS.items() if k != "mmlu"}


@pytest.fixture(scope="module")
def torch_result(tiny_model):
    return evaluate_path(tiny_model, QUICK, limit=4, batch_size=4, progress=False)


def test_evaluate_torch_checkpoint_in_the_contract_format(torch_result, tiny_model):
    r = torch_result
    assert set(r) >= {"tasks", "mean_acc", "mean_acc_norm_or_acc", "fewshot", "limit", "lm_eval_version", "runtime"}
    assert list(r["tasks"]) == QUICK and r["runtime"] == "torch" and r["lm_eval_version"] == "0.4.13"
    assert r["limit"] == 4 and r["fewshot"] == 0 and r["model"] == str(tiny_model)
    for name, t in r["tasks"].items():
        assert t["n"] == 4 and 0 <= t["acc"] <= 1 and isinstance(t["acc_stderr"], float)
        has_norm = name == "arc_easy"
        assert (t["acc_norm"] is not None) == has_norm and (t["acc_norm_stderr"] is not None) == has_norm
    accs = [t["acc"] for t in r["tasks"].values()]
    assert r["mean_acc"] == pytest.approx(sum(accs) / 3)
    assert r["mean_acc_norm_or_acc"] == pytest.approx((r["tasks"]["arc_easy"]["acc_norm"] + sum(accs[1:])) / 3)


def test_item_scores_are_the_headline_metric_item_by_item(torch_result):
    for t in torch_result["tasks"].values():
        assert len(t["scores"]) == t["n"] == 4 and set(t["scores"]) <= {0.0, 1.0}
        assert sum(t["scores"]) / 4 == pytest.approx(headline(t)[0])


def _result(scores, **kw):
    acc = sum(scores) / len(scores)
    return {"tasks": {"t": {"acc": acc, "acc_stderr": kw.get("se", 0.2), "acc_norm": None, "acc_norm_stderr": None,
                            **({"scores": scores} if scores else {})}}}


def test_paired_difference_takes_the_items_difference():
    a, b = _result([1, 1, 1, 0]), _result([1, 1, 0, 0])
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(0.25) and se == pytest.approx(0.25)  # d = [0, 0, 1, 0]: sd 0.5 / sqrt(4)
    assert paired_difference(a, a) == (0.0, 0.0)  # the same answers: no uncertainty about their difference
    # without per-item scores, the two stderrs combined as if independent
    a["tasks"]["t"].pop("scores")
    assert paired_difference(a, b)[1] == pytest.approx(math.hypot(0.2, 0.2))
    with pytest.raises(HwnasError, match="different tasks"):
        paired_difference(a, {"tasks": {"u": b["tasks"]["t"]}})


def test_progress_false_prints_nothing(tiny_model, capfd):
    from hwnas.lmeval import evaluate_model

    model, tok, _ = load_artifact(tiny_model)
    capfd.readouterr()
    r = evaluate_model(model, tok, ["lambada"], limit=2, progress=False)
    assert r["tasks"]["lambada"]["n"] == 2
    out, err = capfd.readouterr()
    assert out == "" and "%|" not in err and "Running loglikelihood" not in err, (out, err[-2000:])


@pytest.fixture(scope="module")
def onnx_dir(tiny_model, tmp_path_factory):
    from hwnas.export import export_onnx_checkpoint

    out = tmp_path_factory.mktemp("lmeval_onnx") / "onnx"
    export_onnx_checkpoint(model=tiny_model, out=out)
    return out


def test_onnxruntime_gives_the_same_results_and_loglikelihoods(torch_result, onnx_dir, tiny_model, manager):
    r = evaluate_path(onnx_dir, QUICK, runtime="onnxruntime", limit=4, progress=False)
    assert r["runtime"] == "onnxruntime" and r["batch_size"] == 1  # as deployed: dynamic int8 depends on the batch
    for name, t in torch_result["tasks"].items():
        assert r["tasks"][name]["acc"] == t["acc"] and r["tasks"][name]["n"] == t["n"]
        assert r["tasks"][name]["acc_norm"] == t["acc_norm"] and r["tasks"][name]["scores"] == t["scores"]
    # request by request: HFLM's batched, right-padded calls give the same log-likelihoods on both runtimes
    requests = []
    for name in ("hwnas_arc_easy", "hwnas_lambada"):
        task = _one(manager, name)
        _requests(task, limit=3)
        requests += task.instances
    lls = []
    for folder in (tiny_model, onnx_dir):
        model, tok, _ = load_artifact(folder)
        lls.append(lm_eval_model(model, tok, batch_size=4, progress=False).loglikelihood(requests))
    assert len(lls[0]) == len(requests) == 3 * 4 + 3
    assert [g for _, g in lls[0]] == [g for _, g in lls[1]]
    assert max(abs(a - b) for (a, _), (b, _) in zip(*lls)) < 1e-3


def test_openvino_model_evaluates(tiny_model, tmp_path, torch_result):
    pytest.importorskip("optimum.intel")
    from optimum.intel import OVModelForCausalLM
    from transformers import AutoTokenizer

    ov_dir = tmp_path / "ov"
    OVModelForCausalLM.from_pretrained(tiny_model, export=True, compile=False).save_pretrained(ov_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(ov_dir)
    # evaluated at f32, as benchmark times it (OpenVINO's CPU default is bf16 on AMX CPUs)
    model, _, _ = load_artifact(ov_dir)
    assert model.request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    r = evaluate_path(ov_dir, ["arc_easy"], limit=4, batch_size=4, progress=False)
    assert r["runtime"] == "openvino" and r["tasks"]["arc_easy"]["n"] == 4
    assert r["tasks"]["arc_easy"]["acc"] == torch_result["tasks"]["arc_easy"]["acc"]


def test_cli_evaluate_writes_json_and_prints_a_table(tiny_model, tmp_path, capsys):
    from hwnas.cli import main

    out = tmp_path / "res" / "eval.json"
    rc = main(["evaluate", "--model", str(tiny_model), "--tasks", "boolq,mmlu", "--limit", "2", "--batch-size", "8",
               "--out", str(out)])
    assert rc == 0
    saved = json.loads(out.read_text())
    assert list(saved["tasks"]) == ["boolq", "mmlu"] and saved["limit"] == 2
    assert saved["tasks"]["boolq"]["n"] == 2 and saved["tasks"]["mmlu"]["n"] == 114  # --limit is per MMLU subject
    assert isinstance(saved["tasks"]["mmlu"]["acc_stderr"], float)
    assert len(saved["tasks"]["mmlu"]["scores"]) == 114  # every subject's items, for paired comparisons
    captured = capsys.readouterr()
    assert "| task | n | acc ± stderr | acc_norm ± stderr |" in captured.err and "| mmlu | 114 |" in captured.err
    assert json.loads(captured.out)["out"] == str(out)  # stdout carries the JSON only


def test_cli_evaluate_errors_name_the_problem(tiny_model, onnx_dir, tmp_path, capsys):
    from hwnas.cli import main

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tiny_model), "--tasks", "piqa,arc_hard", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'arc_hard'" in err and "arc_easy" in err and "mmlu" in err
    assert main(["evaluate", "--model", str(tiny_model), "--runtime", "onnxruntime", "--tasks", "piqa",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--runtime onnxruntime" in err and "a torch checkpoint" in err and "--runtime torch" in err
    assert main(["evaluate", "--model", str(onnx_dir), "--runtime", "openvino", "--tasks", "piqa",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--runtime openvino" in err and "an ONNX Runtime model" in err
    assert main(["evaluate", "--model", str(tiny_model), "--tasks", "piqa", "--limit", "0", "--out", str(out)]) == 2
    assert "--limit must be a positive integer" in capsys.readouterr().err
    assert not out.exists()


def test_wheel_ships_the_tasks_and_they_load_from_it(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(root),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("hwnas-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(TASKS_DIR.parent.parent)) for p in TASKS_DIR.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert len(shipped) == 7 + 58 + 2 and shipped <= names  # 7 tasks, 57 subjects + group, template, loaders.py
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import hwnas.lmeval as m; tm = m.task_manager(); "
            "t = tm.load(['hwnas_piqa', 'hwnas_mmlu_anatomy'])['tasks']; "
            "print(m.TASKS_DIR, {k: len(v.eval_docs) for k, v in t.items()})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(str(site / "hwnas" / "tasks"))
    assert "'hwnas_piqa': 1838" in proc.stdout and "'hwnas_mmlu_anatomy': 135" in proc.stdout


@pytest.fixture(scope="module")
def edge_models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model as an f16 GGUF (llama.cpp) and an fp32 GenAI folder, where those runtimes are installed."""
    out, d = {}, tmp_path_factory.mktemp("lmeval_edge")
    try:
        import llama_cpp  # noqa: F401

        from hwnas.gguf_export import export_gguf

        export_gguf(tiny_model, d / "tiny.gguf", gguf_type="f16")
        out["llamacpp"] = d / "tiny.gguf"
    except ImportError:
        pass
    try:
        import onnxruntime_genai  # noqa: F401

        from hwnas.genai import build_genai

        out["ortgenai"] = Path(build_genai(tiny_model, d / "genai", "fp32")["out"])
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("runtime", ["llamacpp", "ortgenai"])
def test_edge_runtimes_score_requests_as_torch_does(edge_models, runtime, tiny_model, manager):
    """lm-eval in llama.cpp and GenAI: request by request the log-likelihoods of torch (llama.cpp's KV-cache reuse
    across the choices of a question included), and `hwnas evaluate` runs end to end on the file or folder."""
    if runtime not in edge_models:
        pytest.skip(f"{runtime} is not installed (pip install 'hwnas[edge]')")
    from hwnas.lmeval_edge import edge_lm, open_scorer

    requests = []
    for name in ("hwnas_arc_easy", "hwnas_lambada"):
        task = _one(manager, name)
        _requests(task, limit=3)
        requests += task.instances
    model, tok, _ = load_artifact(tiny_model)
    want = lm_eval_model(model, tok, batch_size=1, progress=False).loglikelihood(requests)
    scorer = open_scorer(edge_models[runtime], runtime, threads=1)
    try:
        got = edge_lm(scorer, progress=False).loglikelihood(requests)
    finally:
        scorer.close()
    tol = 0.05 if runtime == "llamacpp" else 1e-3  # f16 weights in the GGUF
    assert len(got) == len(want) == 3 * 4 + 3
    assert max(abs(a - b) / max(1.0, abs(b)) for (a, _), (b, _) in zip(got, want)) < tol
    r = evaluate_path(edge_models[runtime], ["arc_easy", "lambada"], limit=3, progress=False)
    assert r["runtime"] == runtime and r["batch_size"] == 1 and r["tasks"]["arc_easy"]["n"] == 3
    assert r["model"] == str(edge_models[runtime])
    with pytest.raises(HwnasError, match="--batch-size 4 is not supported"):
        evaluate_path(edge_models[runtime], ["arc_easy"], limit=1, batch_size=4, progress=False)
