import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hwnas import HwnasError, SubnetConfig, Supernet
from hwnas.data import pack_tokens
from hwnas.distill import TrainConfig, canonical_names, kl_to_teacher, train
from hwnas.instatune import CHECKPOINT_DIR, SandwichLoss, sandwich, train_supernet
from hwnas.loading import load_model
from hwnas.supernet import SUPERNET_FILE, Calibration

WORDS = ("the capital of france is paris italy rome she looked at him and smiled then walked to door without a word "
         "small model learns shape language from many pages books").split()
ARGS = dict(seq_len=16, batch_size=4, micro_batch=2, lr=1e-2, checkpoint_every=10, progress=False)
STEPS = 30


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls gain nothing from threads, and lose much on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _text(path: Path, seed: int, passages: int = 60) -> Path:
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(passages)))
    return path


@pytest.fixture(scope="module")
def train_text(tmp_path_factory) -> Path:
    return _text(tmp_path_factory.mktemp("text") / "train.txt", seed=0)


@pytest.fixture(scope="module")
def trained(tiny_model, train_text, tmp_path_factory) -> Path:
    """The tiny model's supernet after STEPS sandwich steps."""
    out = tmp_path_factory.mktemp("instatune") / "sn"
    train_supernet(model=str(tiny_model), tokens=STEPS * 4 * 16, out=out, train_text=train_text, **ARGS)
    return out


def test_each_step_trains_the_largest_the_smallest_and_two_random_subnets(tiny_model, tmp_path):
    sn = Supernet.from_pretrained(tiny_model)
    teacher, _ = load_model(tiny_model)
    teacher.requires_grad_(False)
    space = sn.search_space
    active = []
    real = sn.set_active
    sn.set_active = lambda cfg, **kw: (active.append(cfg), real(cfg, **kw))[1]
    loss = SandwichLoss(sn, teacher)
    cfg = TrainConfig(tokens=3 * 4 * 16, seq_len=16, batch_size=4, micro_batch=2, checkpoint_every=5)
    ids = torch.randint(0, 300, (12, 16), generator=torch.Generator().manual_seed(0))
    train(sn, loss, ids, cfg, out=tmp_path, progress=False)
    assert len(loss.steps) == 3
    for step in loss.steps:
        assert step[:2] == [space.max_config(), space.min_config()] and len(step) == 4
    assert len({tuple(step[2:]) for step in loss.steps}) == 3  # random, and new every step
    # each micro-batch (2 per step) runs the step's 4 sub-networks, then the supernet goes back to its largest
    runs = [step + [space.max_config()] for step in loss.steps for _ in range(2)]
    assert active == [c for run in runs for c in run]
    assert sn.active_config == space.max_config()
    assert sandwich(space, 7) == sandwich(space, 7) != sandwich(space, 8)


def test_the_largest_subnets_loss_takes_its_weight(tiny_model, trained, tmp_path):
    from hwnas.distill import kd_loss

    sn = Supernet.from_pretrained(trained)
    teacher, _ = load_model(tiny_model)
    batch = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = {}
    for w in (1.0, 3.0):
        torch.manual_seed(5)  # the step's seed: both losses draw the same random sub-networks
        losses[w] = float(SandwichLoss(sn, teacher, largest_weight=w)(batch))
    with torch.no_grad():
        largest = float(kd_loss(sn(batch).logits, teacher(batch).logits))
    assert largest > 1e-4  # the trained supernet's full model has moved off the teacher
    assert losses[3.0] - losses[1.0] == pytest.approx(2 * largest, rel=1e-4)
    with pytest.raises(HwnasError, match="--largest-weight must be positive, got 0"):
        train_supernet(model=str(tiny_model), tokens=64, out=tmp_path / "w0", largest_weight=0, **ARGS)
    assert not (tmp_path / "w0").exists()  # refused before anything is written


def test_training_narrows_the_gap_of_fixed_subnets(tiny_model, trained, tmp_path):
    teacher, tok = load_model(tiny_model)
    held_out = pack_tokens(tok, _text(tmp_path / "held_out.txt", seed=1).read_text().split("\n\n"), 16, rows=32)
    before, after = Supernet.from_pretrained(tiny_model), Supernet.from_pretrained(trained)
    fixed = [before.search_space.min_config()] + [before.search_space.sample(seed) for seed in range(4)]

    def gap(sn: Supernet) -> float:
        kls = []
        for cfg in fixed:
            sn.set_active(cfg)
            kls.append(kl_to_teacher(sn, teacher, held_out))
        return float(np.mean(kls))

    assert gap(after) < 0.8 * gap(before)  # by a third on this seed


def test_the_folder_reloads_with_the_trained_weights_and_importance(tiny_model, trained):
    record = json.loads((trained / SUPERNET_FILE).read_text())
    assert record["format"] == 1 and record["tokens"] == STEPS * 4 * 16 and record["mlp_step"] == 64
    assert record["source"] == str(tiny_model) and record["calibration"] == Calibration().key()
    assert record["training"]["complete"] and record["training"]["config"]["lr"] == ARGS["lr"]
    assert record["training"]["train_text"] == "file:train.txt"
    # the same weights as the last checkpoint, loaded by name into the calibrated source supernet
    live = Supernet.from_pretrained(tiny_model)
    state = json.loads((trained / CHECKPOINT_DIR / "train_state.json").read_text())
    saved = load_file(trained / CHECKPOINT_DIR / state["weights"])
    with torch.no_grad():
        for p in live.parameters():
            p.copy_(saved[canonical_names(live)[id(p)]])
    folder = Supernet.from_pretrained(trained)
    assert folder.layer_importance == pytest.approx(live.layer_importance)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    for cfg in [live.search_space.min_config()] + [live.search_space.sample(seed) for seed in range(3)]:
        live.set_active(cfg)
        folder.set_active(cfg)
        assert torch.equal(live(ids).logits, folder(ids).logits)
        assert np.allclose(live.importance_lost(cfg), folder.importance_lost(cfg))


def test_resume_after_a_kill_ends_with_the_same_weights(tiny_model, trained, train_text, tmp_path, monkeypatch):
    out = tmp_path / "sn"
    real = SandwichLoss.__call__
    calls = {"n": 0}

    def dying(self, batch):
        calls["n"] += 1
        if calls["n"] > 49:  # 2 micro-batches a step: killed inside step 25, after step 20's checkpoint
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(SandwichLoss, "__call__", dying)
    tokens = STEPS * 4 * 16
    with pytest.raises(KeyboardInterrupt):
        train_supernet(model=str(tiny_model), tokens=tokens, out=out, train_text=train_text, **ARGS)
    monkeypatch.setattr(SandwichLoss, "__call__", real)
    assert json.loads((out / CHECKPOINT_DIR / "train_state.json").read_text())["step"] == 20
    assert not (out / SUPERNET_FILE).exists()
    with pytest.raises(HwnasError, match="holds a training checkpoint; pass --resume"):
        train_supernet(model=str(tiny_model), tokens=tokens, out=out, train_text=train_text, **ARGS)
    with pytest.raises(HwnasError, match="mlp_step was 64, now 128"):
        train_supernet(model=str(tiny_model), tokens=tokens, out=out, train_text=train_text, resume=True,
                       mlp_step=128, **ARGS)
    with pytest.raises(HwnasError, match="lr was 0.01, now 0.001"):
        train_supernet(model=str(tiny_model), tokens=tokens, out=out, train_text=train_text, resume=True,
                       **{**ARGS, "lr": 1e-3})
    r = train_supernet(model=str(tiny_model), tokens=tokens, out=out, train_text=train_text, resume=True, **ARGS)
    assert r["complete"] and r["tokens"] == tokens
    a, b = load_file(trained / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_refused(tiny_model, trained, train_text, tmp_path):
    with pytest.raises(HwnasError, match="--tokens 10 is below one batch"):
        train_supernet(model=str(tiny_model), tokens=10, out=tmp_path / "a", train_text=train_text, **ARGS)
    with pytest.raises(HwnasError, match="is already a trained supernet"):
        train_supernet(model=str(trained), tokens=64, out=tmp_path / "b", train_text=train_text, **ARGS)
    with pytest.raises(HwnasError, match="training text .* not found"):
        train_supernet(model=str(tiny_model), tokens=64, out=tmp_path / "c", train_text=tmp_path / "none.txt", **ARGS)
    with pytest.raises(HwnasError, match=r"asked for mlp_step 128"):
        Supernet.from_pretrained(trained, mlp_step=128)


@pytest.fixture(scope="module")
def torch_table(tiny_model, tmp_path_factory) -> Path:
    """A torch table of the tiny model whose costs are set by block width (the measured ones are within noise of
    each other), with no end-to-end correction: budgets below the full model's are always reachable."""
    import re

    from hwnas.profile import profile

    out = tmp_path_factory.mktemp("table") / "torch.json"
    profile(model=str(tiny_model), runtime="torch", precision="fp32", calibration=1, warmup=1, repeats=3,
            prefill=[16], decode=[16], out=out, progress=False)
    table = json.loads(out.read_text())
    for key, entry in table["entries"].items():
        block = key.split("/")[0]
        mlp, attn = re.fullmatch(r"mlp\.i(\d+)", block), re.fullmatch(r"attn\.q(\d+)\.kv\d+", block)
        ms = int(mlp[1]) / 256 if mlp else int(attn[1]) / 4 if attn else 0.1
        entry.update(mean_ms=ms, median_ms=ms)
    table["calibration"] = []
    out.write_text(json.dumps(table))
    return out


def test_search_baseline_and_export_take_the_folder(trained, torch_table, tmp_path):
    from hwnas.baselines import run_baseline
    from hwnas.export import export_checkpoint
    from hwnas.search import run_search

    r = run_search(model=str(trained), table=str(torch_table), evaluations=8, population=4, sequences=2, seq_len=16,
                   latency_ratio=0.9, select=0, out=str(tmp_path / "search"), progress=False)
    assert r["evaluations"] == 8
    pareto = json.loads((tmp_path / "search" / "pareto.json").read_text())
    assert pareto["calibration"] == Calibration().key()
    report = export_checkpoint(model=str(trained), subnet=tmp_path / "search" / "pareto.json", out=tmp_path / "sub")
    cfg = SubnetConfig.from_dict(min(pareto["front"], key=lambda m: m["kl"])["config"])  # what export picks
    want = Supernet.from_pretrained(trained).extract(cfg).state_dict()
    got = load_file(tmp_path / "sub" / "model.safetensors")
    assert report["channel_order"] == Calibration().key() and all(torch.equal(got[k], want[k]) for k in got)
    # layer-drop reads the folder's recorded Block Influence
    b = run_baseline(method="layer-drop", model=str(trained), table=torch_table, latency_ratio=0.9,
                     out=tmp_path / "layer-drop", progress=False)
    assert b["calibration"] == Calibration().key() and (tmp_path / "layer-drop" / "checkpoint").is_dir()


def test_two_processes_under_accelerate_launch_match_one(tiny_model, train_text, tmp_path, hwnas_home):
    args = dict(tokens=4 * 4 * 16, seq_len=16, batch_size=4, micro_batch=2, checkpoint_every=2, lr=1e-3, bf16=False)
    train_supernet(model=str(tiny_model), train_text=train_text, out=tmp_path / "one", progress=False, **args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `--cpu` alone starts one process (accelerate spreads CPU processes only through MPI): launch as for GPUs, on
    # the CPU (gloo)
    env = {**os.environ, "HWNAS_HOME": str(hwnas_home), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "hwnas.cli", "train-supernet", "--model", str(tiny_model), "--train-text", str(train_text),
           "--out", str(tmp_path / "two"), "--no-bf16"]
    cmd += [a for k, v in args.items() if k != "bf16" for a in (f"--{k.replace('_', '-')}", str(v))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # one report: the other process prints nothing
    assert out["processes"] == 2 and out["complete"] and out["tokens"] == args["tokens"]
    assert json.loads((tmp_path / "two" / SUPERNET_FILE).read_text())["training"]["processes"] == 2
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # the same batches, sub-networks and averaged gradients; only the order of float sums differs
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
    source = load_file(tiny_model / "model.safetensors")
    assert not torch.equal(a["model.norm.weight"], source["model.norm.weight"])  # the weights did move
