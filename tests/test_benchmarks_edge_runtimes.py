"""benchmarks/edge_runtimes.py: argument checks (in a subprocess, before anything is built), the dominance verdicts
and the report on made-up rows, and the whole script on the tiny model (slow)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hwnas.common import HwnasError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "edge_runtimes.py"


@pytest.fixture(scope="module")
def edge():
    spec = importlib.util.spec_from_file_location("bench_edge_runtimes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "plugin")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _args(tmp_path: Path) -> dict:
    return dict(full="smollm2-135m", subnet=None, rounds=1, repeats=1, threads=1, nll_tokens=10, ctx=16,
                out=tmp_path / "o")


def test_bad_arguments_are_refused_before_any_build(edge, tmp_path):
    args = _args(tmp_path)
    for change, message in (
        ({"subnet": tmp_path / "missing"}, "is not a checkpoint folder (no config.json)"),
        ({"rounds": 0}, "--rounds must be at least 1, got 0"),
        ({"repeats": 0}, "--repeats must be at least 1, got 0"),
        ({"threads": 0}, "--threads must be at least 1, got 0"),
        ({"ctx": 8}, "--ctx must be at least 16, got 8"),
        ({"nll_tokens": 1}, "--nll-tokens must be at least 2, got 1"),
        ({"full": str(tmp_path)}, "is neither 'smollm2-135m' nor a checkpoint folder"),
        ({"out": tmp_path / "x.json"}, "takes a path without suffix"),
        ({"tasks": ["arc_easy", "nope"]}, "nope"),
        ({"limit": 0}, "--limit must be a positive number of items per task, got 0"),
    ):
        with pytest.raises(HwnasError) as e:
            edge.check_args(**{**args, **change})
        assert message in str(e.value)
    # the script itself: exit 2 with the message, nothing on stdout, nothing built; --quick keeps an explicit --rounds
    work = tmp_path / "work"
    proc = _run("--rounds", "0", "--quick", "--work", str(work))
    assert proc.returncode == 2 and "edge_runtimes: error: --rounds must be at least 1, got 0" in proc.stderr
    assert proc.stdout == "" and not work.exists()


def test_missing_runtimes_are_named(edge, monkeypatch, tmp_path):
    args = _args(tmp_path)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(HwnasError, match=r"llama_cpp is not installed; run pip install 'hwnas\[edge\]'.*AMX_INT8=OFF"):
        edge.check_args(**args)
    monkeypatch.setitem(sys.modules, "llama_cpp", sys.modules.get("os"))  # anything importable
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(HwnasError, match=r"onnxruntime_genai is not installed; run pip install 'hwnas\[edge\]'"):
        edge.check_args(**args)


def _row(label, network, decode, nll, spread=0.05):
    return {"label": label, "network": network, "runtime": "x", "precision": "y", "decode_ms": decode, "nll": nll,
            "decode_spread": spread, "prefill_ms": 100.0, "peak_rss_bytes": 2e8, "file_bytes": 1e8,
            "delta_nll": 0.0, "delta_se": 0.01, "via": "made up"}


def test_verdicts_say_what_the_pick_dominates_and_what_it_does_not(edge):
    rows = [_row("full fp32", "full", None, 3.0), _row("full ort-int8-wo", "full", 20.0, 3.1),
            _row("full gguf-q4_0", "full", 10.0, 3.5), _row("full gguf-q8_0", "full", 12.0, 3.05),
            _row("pick ort-int8-wo", "hwnas pick", 15.0, 3.3), _row("pick gguf-q4_0", "hwnas pick", 9.0, 3.6)]
    per_token = {r["label"]: [r["nll"] + 0.01 * (k % 3) for k in range(30)] for r in rows}
    lines = edge.verdicts(rows, per_token)
    text = "\n".join(lines)
    assert "**full ort-int8-wo** is NOT dominated" in text  # pick ort-int8-wo is faster but worse
    assert "**full gguf-q4_0** is NOT dominated" in text and "**full gguf-q8_0** is NOT dominated" in text
    assert "The hwnas row **pick ort-int8-wo** is itself dominated by full gguf-q8_0" in text
    rows.append(_row("pick gguf-q8_0", "hwnas pick", 8.0, 3.2, spread=0.3))
    per_token["pick gguf-q8_0"] = [3.2] * 30
    text = "\n".join(edge.verdicts(rows, per_token))
    assert "**full gguf-q4_0** is dominated by pick gguf-q8_0 (decode 8.00 vs 10.00 ms/token (+20% faster, within " \
           "the rounds' 30% spread); NLL 3.200 vs 3.500" in text
    assert "**full ort-int8-wo** is NOT dominated" in text and "**full gguf-q8_0** is NOT dominated" in text
    # with lm-eval measured, a pick that is faster at lower NLL but less accurate dominates nothing
    items = lambda acc: {"tasks": {"t": {"acc": acc, "acc_stderr": 0.1, "acc_norm": None,  # noqa: E731
                                         "scores": [1.0] * int(acc * 10) + [0.0] * (10 - int(acc * 10))}}}
    for r in rows:
        r.update(accuracy=0.4 if r["label"] == "pick gguf-q8_0" else 0.5,
                 lm_eval=items(0.4 if r["label"] == "pick gguf-q8_0" else 0.5))
    text = "\n".join(edge.verdicts(rows, per_token))
    assert "**full gguf-q4_0** is NOT dominated" in text and "mean accuracy 0.400 vs 0.500 (-0.100 ± " in text
    assert edge.verdicts(rows[:4], per_token) == [
        "No --subnet was given: there is no hwnas pick to set against the full-model rows."]
    report = {"date": "today", "device": {"name": "cpu"}, "rows": rows, "verdicts": lines, "versions": {"a": "1"},
              "full_is_default": True,
              "command": "python x", "settings": {"threads": 2, "prompt_tokens": 128, "new_tokens": 32, "rounds": 1,
                                                 "repeats": 2, "nll_scored": 30, "ctx": 512}}
    md = edge.markdown(report)
    assert md.count("\n| ") == 2 + len(rows) - 1 and "| full gguf-q4_0 | full | x y | 100.0 | 10.00 | 0.50 |" in md
    assert "| full fp32 | full | x y | – | – | – | – | – | 3.000 |" in md
    assert "Caveat: the default model's weights are the dequantized" in md


@pytest.mark.slow
def test_whole_script_on_the_tiny_model(tiny_model, tmp_path, export_subnets):
    """--full tiny model and a uniform tiny sub-network: every artifact builds, runs in one benchmark and is scored."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime_genai")
    sub = export_subnets(tiny_model, tmp_path, {"uniform": {"num_layers": 4, "layers": [0, 2, 3], "mlp": [192] * 3,
                                                            "heads": [4] * 3, "kv_heads": [2] * 3}})["uniform"]
    out = tmp_path / "res" / "edge"
    proc = _run("--full", str(tiny_model), "--subnet", str(sub), "--quick", "--threads", "1", "--nll-tokens", "200",
                "--ctx", "64", "--tasks", "arc_easy", "--limit", "3", "--work", str(tmp_path / "work"), "--out",
                str(out), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    labels = {r["label"]: r for r in report["rows"]}
    assert {"full fp32", "pick fp32", "full ort-int8-wo", "full gguf-q8_0", "full genai-int4", "pick gguf-q4_0",
            "pick genai-int8"} <= set(labels)
    assert all(r["nll"] > 0 for r in report["rows"] if not r.get("skipped"))
    assert labels["full fp32"]["delta_nll"] == 0 and labels["full ort-int8-wo"]["decode_ms"] > 0
    assert all(r["lm_eval"]["tasks"]["arc_easy"]["n"] == 3 for r in report["rows"] if not r.get("skipped"))
    assert labels["full gguf-q8_0"]["lm_eval"]["runtime"] == "llamacpp" and labels["full fp32"]["delta_acc"] == 0
    assert out.with_suffix(".png").stat().st_size > 0 and "dominated" in out.with_suffix(".md").read_text()
