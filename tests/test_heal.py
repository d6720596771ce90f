import json
import shutil
from pathlib import Path

import pytest
import torch

from hwnas import HwnasError
from hwnas.heal import checkpoint_dir, heal

# the tiny model's sub-networks: a uniform one (plain `llama`) and a heterogeneous one (`hwnas_llama`)
UNIFORM = {"num_layers": 4, "layers": [0, 2, 3], "mlp": [192] * 3, "heads": [4] * 3, "kv_heads": [2] * 3}
MIXED = {"num_layers": 4, "layers": [0, 1, 3], "mlp": [256, 128, 192], "heads": [4, 2, 4], "kv_heads": [2, 2, 2]}
SMALL = dict(seq_len=32, batch_size=4, micro_batch=2, checkpoint_every=2, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def subnets(tiny_model, tmp_path_factory, export_subnets):
    return export_subnets(tiny_model, tmp_path_factory.mktemp("heal_subnets"), {"uniform": UNIFORM, "mixed": MIXED})


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("kind", ["uniform", "mixed"])
def test_heal_lowers_the_kl_and_keeps_the_checkpoint_format(subnets, tiny_model, train_text, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = subnets[kind]
    report = heal(model=src, teacher=tiny_model, tokens=24 * 4 * 32, out=tmp_path / "healed", train_text=train_text,
                  lr=5e-3, **SMALL)
    out = tmp_path / "healed"
    assert report["complete"] and report["tokens"] == 24 * 128 and report["corpus"] == "file:train.txt"
    assert report["held_out_kl"]["after"] < 0.95 * report["held_out_kl"]["before"]
    assert _config(out) == _config(src)
    assert _config(out)["model_type"] == ("llama" if kind == "uniform" else "hwnas_llama")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == ("LlamaForCausalLM" if kind == "uniform" else "HwnasLlamaForCausalLM")
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(src).get_vocab()
    export = json.loads((out / "hwnas_export.json").read_text())
    assert export["layers"] == 3 and export["heal"]["tokens"] == 24 * 128
    assert (out / "hwnas_subnet.json").is_file() and (out / "heal_curve.png").stat().st_size > 1000
    assert json.loads((out / "hwnas_heal.json").read_text())["tokens_per_s"] > 0
    assert not checkpoint_dir(out).exists()  # removed once the heal is complete
    before = AutoModelForCausalLM.from_pretrained(src)
    assert torch.equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)  # frozen by default
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)


def test_lora_is_merged_into_a_plain_checkpoint(subnets, tiny_model, train_text, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = subnets["mixed"]
    report = heal(model=src, teacher=tiny_model, tokens=6 * 128, out=tmp_path / "lora", train_text=train_text,
                  lora_rank=4, **SMALL)
    assert report["mode"] == "lora-4" and report["trainable_parameters"] < 20_000
    keys = set(load_file(str(tmp_path / "lora" / "model.safetensors")))
    assert keys == set(load_file(str(src / "model.safetensors"))) and not any("lora" in k for k in keys)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    before = AutoModelForCausalLM.from_pretrained(src)
    assert not torch.equal(model.model.layers[1].self_attn.q_proj.weight, before.model.layers[1].self_attn.q_proj.weight)
    assert report["held_out_kl"]["after"] < report["held_out_kl"]["before"]


def test_time_limit_resume_and_changed_arguments(subnets, tiny_model, train_text, tmp_path):
    src, out = subnets["uniform"], tmp_path / "healed"
    kw = dict(model=src, teacher=tiny_model, tokens=6 * 128, out=out, train_text=train_text, **SMALL)
    first = heal(minutes=1e-6, **kw)
    assert not first["complete"] and first["tokens"] == 128 and "time limit" in first["stopped"]
    assert (out / "hwnas_heal.json").is_file() and checkpoint_dir(out).is_dir()  # written, and resumable
    with pytest.raises(HwnasError, match=r"lr was [0-9.e-]+, now 0\.0005"):  # the default, then another
        heal(resume=True, **{**kw, "lr": 5e-4})
    with pytest.raises(HwnasError, match="not empty"):
        heal(**kw)
    done = heal(resume=True, **kw)
    assert done["complete"] and done["tokens"] == 6 * 128 and not checkpoint_dir(out).exists()
    assert heal(resume=True, **kw) == json.loads((out / "hwnas_heal.json").read_text())  # nothing left to do
    with pytest.raises(HwnasError, match="finished heal with other arguments: seed was 0, now 1"):
        heal(resume=True, **{**kw, "seed": 1})
    fresh = heal(**{**kw, "out": tmp_path / "fresh"})
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "fresh" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed heal must end where an uninterrupted one does"
    assert fresh["tokens"] == done["tokens"]


def test_bad_input_is_refused_in_one_line(subnets, tiny_models, tiny_model, train_text, tmp_path):
    src = subnets["uniform"]
    kw = dict(model=src, teacher=tiny_model, out=tmp_path / "x", train_text=train_text, **SMALL)
    with pytest.raises(HwnasError, match=r"--tokens 100 is below one batch: expected at least 128"):
        heal(tokens=100, **kw)
    with pytest.raises(HwnasError, match="training text .*nope.txt not found"):
        heal(tokens=1000, **{**kw, "train_text": tmp_path / "nope.txt"})
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HwnasError, match="is empty"):
        heal(tokens=1000, **{**kw, "train_text": tmp_path / "empty.jsonl"})
    with pytest.raises(HwnasError, match=f"was cut from {tiny_model}, not from the teacher {tiny_models['mha']}"):
        heal(tokens=1000, **{**kw, "teacher": tiny_models["mha"]})
    # a student with no recorded source, whose tokenizer differs from the teacher's
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    spec = json.loads((other / "tokenizer.json").read_text())  # two tokens swap ids: same size, other tokenizer
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(HwnasError, match="different tokenizers"):
        heal(tokens=1000, **{**kw, "model": other})
    assert not (tmp_path / "x").exists()


def test_jsonl_training_text(tmp_path):
    from hwnas.data import training_texts

    (tmp_path / "t.jsonl").write_text('{"text": "first passage"}\n\n{"text": "second"}\n{"text": "first passage"}\n')
    text = training_texts(tmp_path / "t.jsonl")
    assert text.texts == ("first passage", "second") and text.name == "file:t.jsonl"
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(HwnasError, match="line 1 has no string `text` field"):
        training_texts(tmp_path / "bad.jsonl")


def test_cli_heal_runs_and_reports(subnets, tiny_model, train_text, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = run_cli("heal", "--model", str(subnets["uniform"]), "--teacher", str(tiny_model), "--tokens", "256",
                   "--out", str(tmp_path / "h"), "--train-text", str(train_text), "--seq-len", "32", "--batch-size", "4")
    report = json.loads(proc.stdout)
    assert report["tokens"] == 256 and report["complete"]
    bad = run_cli("heal", "--model", str(subnets["uniform"]), "--tokens", "10", "--out", str(tmp_path / "b"),
                  check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "below one batch" in bad.stderr
