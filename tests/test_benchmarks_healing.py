"""The healing benchmarks on the tiny model: heal's snapshots, benchmarks/healing.py end to end, and
benchmarks/compare.py's healed comparison (its heal step in-process; the whole script as a slow test)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwnas.heal import heal, snapshot_dir

ROOT = Path(__file__).resolve().parents[1]
UNIFORM = {"num_layers": 4, "layers": [0, 2, 3], "mlp": [192] * 3, "heads": [4] * 3, "kv_heads": [2] * 3}
NARROW = {"num_layers": 4, "layers": [0, 1, 2, 3], "mlp": [128] * 4, "heads": [2] * 4, "kv_heads": [2] * 4}
SMALL = dict(seq_len=32, batch_size=4, micro_batch=2, lr=5e-3, progress=False)


@pytest.fixture(scope="module")
def subnets(tiny_model, tmp_path_factory, export_subnets) -> dict[str, Path]:
    return export_subnets(tiny_model, tmp_path_factory.mktemp("bench_subnets"), {"uniform": UNIFORM, "narrow": NARROW})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_heal_snapshots_see_one_run_and_leave_it_unchanged(subnets, tiny_model, train_text, tmp_path, lora_rank):
    from transformers import AutoModelForCausalLM

    common = dict(model=subnets["uniform"], teacher=tiny_model, tokens=6 * 128, train_text=train_text,
                  lora_rank=lora_rank, **SMALL)
    heal(out=tmp_path / "plain", **common)
    report = heal(out=tmp_path / "snap", snapshots=[256, 500], **common)
    final = _weights(tmp_path / "snap")
    assert all(torch.equal(final[k], v) for k, v in _weights(tmp_path / "plain").items())  # no effect on the run
    for asked, trained in ((256, 256), (500, 384)):  # whole batches of 128 tokens
        snap = snapshot_dir(tmp_path / "snap", asked)
        rec = json.loads((snap / "hwnas_heal.json").read_text())
        assert rec["tokens"] == trained and not rec["complete"] and rec["snapshot_of"] == str(tmp_path / "snap")
        assert len(json.loads((snap / "heal_history.json").read_text())) == trained // 128
        assert json.loads((snap / "config.json").read_text()) == json.loads((subnets["uniform"] / "config.json").read_text())
        AutoModelForCausalLM.from_pretrained(snap)  # loads as the input did (LoRA merged)
        w = _weights(snap)
        assert set(w) == set(final) and any(not torch.equal(w[k], final[k]) for k in w)
    assert report["complete"] and report["tokens"] == 6 * 128


def test_heal_refuses_snapshots_outside_the_run(subnets, tiny_model, train_text, tmp_path):
    from hwnas import HwnasError

    with pytest.raises(HwnasError, match=r"snapshots \[768\] are outside the run"):
        heal(model=subnets["uniform"], teacher=tiny_model, tokens=6 * 128, out=tmp_path / "x", train_text=train_text,
             snapshots=[256, 768], **SMALL)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "plugin")}


@pytest.mark.slow
def test_healing_benchmark_end_to_end_and_resumes(subnets, tiny_model, train_text, tmp_path):
    work, out = tmp_path / "work", tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "healing.py"), "--subnet", str(subnets["uniform"]),
           "--teacher", str(tiny_model), "--marks", "256", "512", "--quick-tokens", "384",
           "--tasks", "lambada", "arc_easy", "--items", "2", "--passages", "2", "--seq-len", "32", "--batch-size", "4",
           "--micro-batch", "2", "--lr", "5e-3", "--train-text", str(train_text), "--throughput-steps", "1",
           "--throughput-rounds", "1", "--lora-rank", "2", "--work", str(work), "--out-dir", str(out), "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    r = json.loads((out / "healing.json").read_text())
    assert [p["name"] for p in r["points"]] == ["tokens-0", "tokens-256", "tokens-512", "quick-384"]
    assert [p["tokens"] for p in r["points"]] == [0, 256, 512, 384]
    assert [p["schedule_tokens"] for p in r["points"][1:]] == [512, 512, 384]  # one schedule to 512, snapshots
    assert "snapshots" in r["schedule"] and r["evaluation"]["runtime"] == "torch fp32"
    for p in r["points"][1:]:
        assert p["perplexity"] > 1 and p["training_minutes"] > 0 and "gain_stderr" in p and "generation" in p
    assert r["points"][2]["perplexity"] < r["points"][0]["perplexity"]  # healing helps even the tiny model
    assert set(r["throughput"]["modes"]) == {"full", "lora-2"}
    assert all(m["tokens_per_s"] > 0 for m in r["throughput"]["modes"].values())
    assert len(r["device"]["load_average_start"]) == 3 and r["device"]["cpu"]
    assert [t["met"] for t in r["targets"]][:2] == [False, False]  # a tiny random model is far from the targets
    assert "throughput" in r["targets"][2]["target"]
    md = (out / "healing.md").read_text()
    assert "## Targets" in md and "NOT met" in md and "| quick-384 | 384 | 384 |" in md
    assert (out / "healing.png").stat().st_size > 10_000
    again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not re.search(r"^(healing|evaluating|timing) ", again.stderr, re.M)  # every step reused
    other = subprocess.run(cmd[:6] + ["--marks", "256"] + cmd[9:], capture_output=True, text=True, env=_env(),
                           timeout=600)
    assert other.returncode != 0 and "choose another --work" in other.stderr


def _compare_module():
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "benchmarks" / "compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_heals_each_network_once_and_keys_it_apart(subnets, tiny_model, train_text, tmp_path, monkeypatch):
    import hashlib

    import hwnas.heal

    compare = _compare_module()
    rows = [{"method": "full", "ratio": 1.0, "config": None, "checkpoint": str(tiny_model)},
            {"method": "hwnas", "ratio": 0.8, "config": UNIFORM, "checkpoint": str(subnets["uniform"])},
            {"method": "layer-drop", "ratio": 0.8, "config": UNIFORM, "checkpoint": str(subnets["uniform"])},
            {"method": "width-uniform", "ratio": 0.8, "config": NARROW, "checkpoint": str(subnets["narrow"])},
            {"method": "random", "ratio": 0.8, "config": NARROW, "checkpoint": str(subnets["narrow"])}]
    # an unhealed network keeps the key (and so the cached artifacts) it had before healing existed
    assert compare.key(rows[1]) == hashlib.sha256(json.dumps(UNIFORM, sort_keys=True).encode()).hexdigest()[:12]
    calls = []
    real = hwnas.heal.heal
    monkeypatch.setattr(hwnas.heal, "heal", lambda **kw: calls.append(kw) or real(**kw, seq_len=32, batch_size=4,
                                                                                     micro_batch=2, progress=False))
    twins = compare.heal_all(rows, str(tiny_model), 512, list(compare.HEAL_METHODS), train_text, tmp_path)
    assert [t["method"] for t in twins] == ["hwnas", "layer-drop", "width-uniform"]  # random not by default
    assert len(calls) == 2 and all(c["tokens"] == 512 and c["train_text"] == train_text for c in calls)
    assert twins[0]["checkpoint"] == twins[1]["checkpoint"] != twins[2]["checkpoint"]  # same network, same heal
    assert compare.key(twins[0]) != compare.key(rows[1]) and twins[0]["unhealed"] == compare.key(rows[1])
    assert json.loads((Path(twins[0]["checkpoint"]) / "hwnas_heal.json").read_text())["tokens"] == 512
    assert compare.key({**rows[1], "source": "/some/supernet"}) != compare.key(rows[1])
    calls.clear()
    assert compare.heal_all(rows, str(tiny_model), 512, ["hwnas"], train_text, tmp_path)[0]["checkpoint"] == \
        twins[0]["checkpoint"] and not calls  # reused


@pytest.mark.slow
def test_compare_with_healing_and_a_supernet_end_to_end(tiny_model, tiny_int8_table, train_text, tmp_path):
    """The whole comparison on the tiny model: searches, baselines, a trained supernet's search, heals, deployments,
    evaluations and one benchmark run (the int8 table's widths rescaled so that every baseline reaches the target)."""
    from hwnas.instatune import train_supernet

    t = json.loads(tiny_int8_table.read_text())
    for phase in {k.split("/")[1] for k in t["entries"]}:
        for pattern in (r"mlp\.i(\d+)", r"attn\.q(\d+)\.kv\d+"):
            width = {k: int(m.group(1)) for k in t["entries"]
                     if k.endswith("/" + phase) and (m := re.fullmatch(pattern, k.split("/")[0]))}
            widest = max(width, key=width.get)
            for k, w in width.items():
                t["entries"][k].update({s: t["entries"][widest][s] * w / width[widest] for s in ("mean_ms", "median_ms")})
    t["calibration"] = []
    table = tmp_path / "int8.json"
    table.write_text(json.dumps(t))
    train_supernet(model=str(tiny_model), tokens=256, out=tmp_path / "supernet", seq_len=32, batch_size=4,
                   micro_batch=2, train_text=train_text, progress=False)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--model", str(tiny_model), "--table", str(table),
           "--ratios", "0.8", "--front-ratios", "--tasks", "lambada,arc_easy", "--limit", "2", "--evaluations", "6",
           "--population", "4", "--new-tokens", "4", "--repeats", "1", "--rounds", "1", "--select-metric",
           "lastword-nll", "--work", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), "--heal-tokens",
           "2048", "--heal-text", str(train_text), "--supernet", str(tmp_path / "supernet")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [x["method"] for x in r["rows"]] == ["full", "hwnas", "layer-drop", "width-uniform", "random",
                                                "hwnas-supernet"]
    assert [x["method"] for x in r["healed_rows"]] == ["hwnas", "layer-drop", "width-uniform", "hwnas-supernet"]
    assert r["heal"]["tokens"] == 2048 and r["heal"]["corpus"] == "file:train.txt"
    for twin in r["healed_rows"]:
        same = next(x for x in r["rows"] if x["method"] == twin["method"])
        assert twin["decode_ms"] == same["decode_ms"] and twin["artifact"] != same["artifact"] and "gain_stderr" in twin
    assert any(v.startswith("ratio 0.80: hwnas >= layer-drop") or v.startswith("ratio 0.80: hwnas < layer-drop")
               or "same sub-network as layer-drop" in v for v in r["healed_verdicts"])
    assert "## At equal healing: 2,048 tokens" in (tmp_path / "out" / "compare.md").read_text()
