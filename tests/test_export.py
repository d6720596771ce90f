"""Deployment export: `hwnas onnx`, Optimum's own CLI on hwnas checkpoints, and the optimum-cli hook."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

PROMPT = "The capital of France is"


def torch_greedy(folder: Path, n: int = 12) -> list[int]:
    from hwnas.loading import load_model

    model, tok = load_model(folder, allow_subnet=True)
    with torch.no_grad():
        return model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=n, do_sample=False)[0].tolist()


def runtime_greedy(folder: Path, loader: str, *, import_hwnas: bool, n: int = 12) -> list[int]:
    """Greedy tokens from an exported folder in a fresh interpreter (so that nothing of hwnas is loaded unless asked)."""
    module, cls = loader.rsplit(".", 1)
    # OpenVINO runs bf16 by default on CPUs with AMX: ask for f32, to compare with torch's fp32 tokens
    extra = ", ov_config={'INFERENCE_PRECISION_HINT': 'f32'}" if cls.startswith("OV") else ""
    code = (("import hwnas\n" if import_hwnas else "")
            + f"from {module} import {cls}\nfrom transformers import AutoTokenizer\nimport json\n"
            f"m = {cls}.from_pretrained({str(folder)!r}{extra}); t = AutoTokenizer.from_pretrained({str(folder)!r})\n"
            f"print(json.dumps(m.generate(**t({PROMPT!r}, return_tensors='pt'), max_new_tokens={n}, do_sample=False)[0].tolist()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hwnas_onnx_of_per_layer_kv_heads_loads_in_stock_ortmodel(run_cli, per_layer_kv_subnet, tmp_path):
    out = tmp_path / "onnx"
    report = json.loads(run_cli("onnx", "--model", str(per_layer_kv_subnet), "--out", str(out)).stdout)
    assert report["kv_heads_per_layer"] == [4, 2, 1]
    assert report["max_abs_logit_diff"] <= 1e-3
    # the loader needs no hwnas import: the folder's config is a llama config plus layer_shapes
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    want = torch_greedy(per_layer_kv_subnet)
    assert runtime_greedy(out, "optimum.onnxruntime.ORTModelForCausalLM", import_hwnas=False) == want


def test_onnx_logits_match_torch_with_kv_cache(per_layer_kv_subnet, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    from hwnas.export import export_onnx_checkpoint
    from hwnas.loading import load_model

    export_onnx_checkpoint(model=per_layer_kv_subnet, out=tmp_path / "onnx")
    ort_model = ORTModelForCausalLM.from_pretrained(tmp_path / "onnx")
    model, tok = load_model(per_layer_kv_subnet, allow_subnet=True)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        got = ort_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        assert (got.logits - ref.logits).abs().max() < 1e-3
        nxt = ref.logits[:, -1:].argmax(-1)  # one decode step through each runtime's own cache
        ref2 = model(nxt, past_key_values=ref.past_key_values, use_cache=True)
        got2 = ort_model(input_ids=nxt, attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long),
                         past_key_values=got.past_key_values, use_cache=True)
    assert (got2.logits - ref2.logits).abs().max() < 1e-3


def _optimum_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).with_name("optimum-cli")
    env = {**os.environ, "HWNAS_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=600, env=env)


def test_optimum_cli_exports_hwnas_checkpoints(per_layer_kv_subnet, tmp_path, hwnas_home):
    want = torch_greedy(per_layer_kv_subnet)
    onnx_dir, ov_dir = tmp_path / "onnx", tmp_path / "ov"
    proc = _optimum_cli("export", "onnx", "--model", str(per_layer_kv_subnet), "--task", "text-generation-with-past",
                        str(onnx_dir), home=hwnas_home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert runtime_greedy(onnx_dir, "optimum.onnxruntime.ORTModelForCausalLM", import_hwnas=False) == want
    proc = _optimum_cli("export", "openvino", "--model", str(per_layer_kv_subnet), "--task", "text-generation-with-past",
                        str(ov_dir), home=hwnas_home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # optimum-intel writes the checkpoint's own config (hwnas_llama): loading it needs `import hwnas`
    assert runtime_greedy(ov_dir, "optimum.intel.OVModelForCausalLM", import_hwnas=True) == want


def test_optimum_cli_runs_hwnas_commands(tiny_model, hwnas_home):
    proc = _optimum_cli("hwnas", "space", "--model", str(tiny_model), home=hwnas_home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["search_space"]["num_layers"] == 4
    proc = _optimum_cli("hwnas", "onnx", "--model", str(tiny_model / "missing"), "--out", "x", home=hwnas_home)
    assert proc.returncode == 2 and "neither" in proc.stderr


def test_wheel_ships_the_optimum_cli_hook_in_the_namespace(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(root),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    names = zipfile.ZipFile(next(tmp_path.glob("hwnas-*.whl"))).namelist()
    assert "optimum/commands/register/register_hwnas.py" in names
    assert not [n for n in names if n.startswith("optimum/") and n.endswith("__init__.py")]  # PEP 420: never


def test_onnx_refuses_an_onnx_folder_and_writes_nothing(run_cli, per_layer_kv_subnet, tmp_path):
    from hwnas.export import export_onnx_checkpoint

    export_onnx_checkpoint(model=per_layer_kv_subnet, out=tmp_path / "onnx")
    proc = run_cli("onnx", "--model", str(tmp_path / "onnx"), "--out", str(tmp_path / "again"), check=False)
    assert proc.returncode == 2 and "is an ONNX export (model.onnx)" in proc.stderr and "needs a torch checkpoint" in proc.stderr
    assert not (tmp_path / "again").exists()


def test_onnx_of_a_uniform_head_pruned_subnet_loads_in_stock_ortmodel(tiny_model, tmp_path):
    """A plain llama with fewer query heads: Optimum sizes its empty cache from hidden_size // heads."""
    from hwnas.export import export_checkpoint, export_onnx_checkpoint

    (tmp_path / "cfg.json").write_text(json.dumps({"num_layers": 4, "layers": [0, 1, 2, 3], "mlp": [128] * 4,
                                                   "heads": [2] * 4, "kv_heads": [2] * 4}))
    export_checkpoint(model=str(tiny_model), subnet=tmp_path / "cfg.json", out=tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["num_attention_heads"] == 2
    export_onnx_checkpoint(model=tmp_path / "ckpt", out=tmp_path / "onnx")
    cfg = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert cfg["hwnas_num_attention_heads"] == 2 and cfg["hidden_size"] // cfg["num_attention_heads"] == cfg["head_dim"]
    want = torch_greedy(tmp_path / "ckpt")
    assert runtime_greedy(tmp_path / "onnx", "optimum.onnxruntime.ORTModelForCausalLM", import_hwnas=False) == want
