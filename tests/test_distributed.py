"""`hwnas heal` under `accelerate launch` with 2 CPU processes (gloo): the same result as one process.

accelerate's `--cpu` launcher starts one process unless mpirun is installed; `--multi_gpu` starts them with
torchrun, and without CUDA hwnas joins them into a CPU group (`distill.distributed_state`)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

UNIFORM = {"num_layers": 4, "layers": [0, 2, 3], "mlp": [192] * 3, "heads": [4] * 3, "kv_heads": [2] * 3}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_heal_on_two_cpu_processes_matches_one_process(tiny_model, hwnas_home, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hwnas.export import export_checkpoint
    from hwnas.heal import heal

    (tmp_path / "sub.json").write_text(json.dumps(UNIFORM))
    export_checkpoint(model=str(tiny_model), subnet=tmp_path / "sub.json", out=tmp_path / "sub")
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(f"The capital of France is Paris, said page {i} of the small books." * 3
                                for i in range(80)))
    args = dict(model=tmp_path / "sub", teacher=tiny_model, tokens=4 * 4 * 32, train_text=text, seq_len=32,
                batch_size=4, micro_batch=2, checkpoint_every=2, bf16=False, lr=1e-3)
    one = heal(out=tmp_path / "one", progress=False, **args)

    env = {**os.environ, "HWNAS_HOME": str(hwnas_home), "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "hwnas.cli", "heal", "--model", str(tmp_path / "sub"), "--teacher", str(tiny_model),
           "--tokens", str(args["tokens"]), "--train-text", str(text), "--seq-len", "32", "--batch-size", "4",
           "--micro-batch", "2", "--checkpoint-every", "2", "--no-bf16", "--lr", "1e-3", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "hwnas_heal.json").read_text())
    assert report["processes"] == 2 and report["complete"] and report["tokens"] == one["tokens"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert model.config.num_hidden_layers == 3
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # the same batches and averaged gradients; only the order of float sums differs
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
    changed = max(float((a[k] - v).abs().max()) for k, v in load_file(str(tmp_path / "sub" / "model.safetensors")).items())
    assert changed > 1e-3  # the weights did move
