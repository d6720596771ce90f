import json
import shutil

import pytest
import torch


def test_space_prints_the_space_and_its_size(run_cli, tiny_model):
    out = json.loads(run_cli("space", "--model", str(tiny_model)).stdout)
    s = out["search_space"]
    assert s["mlp_choices"] == [64, 128, 192, 256] and s["head_choices"] == [2, 4] and s["num_layers"] == 4
    assert out["size"] == (1 + 4 * 2) ** 4 - 1


def test_sample_export_generate_perplexity(run_cli, tiny_model, tmp_path):
    cfg = tmp_path / "cfg.json"
    sampled = json.loads(run_cli("sample", "--model", str(tiny_model), "--seed", "3", "--out", str(cfg)).stdout)
    assert json.loads(cfg.read_text())["layers"] == sampled["layers"]
    report = json.loads(run_cli("export", "--model", str(tiny_model), "--subnet", str(cfg), "--out",
                                str(tmp_path / "sub")).stdout)
    assert report["parameters"] < report["full_parameters"] and 0 < report["size_ratio"] < 1
    assert {p.name for p in (tmp_path / "sub").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                              "hwnas_subnet.json", "hwnas_export.json"}
    # the checkpoint loads with stock transformers once hwnas is imported, with no remote code
    import hwnas  # noqa: F401
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tmp_path / "sub")
    assert m.config.num_hidden_layers == len(sampled["layers"])
    assert sum(p.numel() for p in m.parameters()) == report["parameters"]
    assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()
    gen = json.loads(run_cli("generate", "--model", str(tmp_path / "sub"), "--max-new-tokens", "3").stdout)
    assert isinstance(gen["completion"], str)
    ppl = json.loads(run_cli("perplexity", "--model", str(tmp_path / "sub"), "--limit", "4").stdout)
    assert ppl["passages"] == 4 and ppl["perplexity"] > 1


def write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"num_layers": 30, "layers": [0], "mlp": [64], "heads": [2], "kv_heads": [2]},
         "30-layer model, but this model has 4 layers"),
        ({"num_layers": 4, "layers": [0], "mlp": [100], "heads": [2], "kv_heads": [2]},
         "MLP width 100 is not a choice"),
        ({"num_layers": 4, "layers": [0], "mlp": [64], "heads": [3], "kv_heads": [2]},
         "3 query heads do not divide into 2 KV groups"),
        ({"num_layers": 4, "layers": [], "mlp": [], "heads": [], "kv_heads": []}, "all layers dropped"),
        ('{"num_layers": 4, "lay', "not valid JSON"),
    ],
)
def test_export_refuses_bad_configs_with_one_line_and_writes_nothing(run_cli, tiny_model, tmp_path, config, message):
    out = tmp_path / "out"
    proc = run_cli("export", "--model", str(tiny_model), "--subnet", write(tmp_path / "c.json", config),
                   "--out", str(out), check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hwnas: error:") and message in last
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_errors_for_bad_models_and_files(run_cli, tiny_model, tmp_path):
    proc = run_cli("space", "--model", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2 and "nor an existing folder" in proc.stderr
    (tmp_path / "gpt").mkdir()
    write(tmp_path / "gpt" / "config.json", {"model_type": "gpt2"})
    proc = run_cli("sample", "--model", str(tmp_path / "gpt"), "--out", str(tmp_path / "c.json"), check=False)
    assert proc.returncode == 2 and "expected a Llama" in proc.stderr and not (tmp_path / "c.json").exists()
    proc = run_cli("export", "--model", str(tiny_model), "--subnet", str(tmp_path / "nope.json"), "--out",
                   str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "sub-network config not found" in proc.stderr


def test_export_does_not_overwrite_without_asking(run_cli, tiny_model, tmp_path):
    cfg = tmp_path / "cfg.json"
    run_cli("sample", "--model", str(tiny_model), "--seed", "1", "--out", str(cfg))
    out = tmp_path / "sub"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("export", "--model", str(tiny_model), "--subnet", str(cfg), "--out", str(out), check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and (out / "keep.txt").read_text() == "mine"
    run_cli("export", "--model", str(tiny_model), "--subnet", str(cfg), "--out", str(out), "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_what_the_reliability_audit_found_gets_the_one_line_error(tiny_model, tiny_tables, tmp_path, capsys,
                                                                   monkeypatch):
    """benchmarks/reliability.py's findings: each now ends as `hwnas: error: ...`, exit 2, nothing written."""
    from hwnas import cli

    def refused(args: list[str], message: str) -> None:
        assert cli.main(args) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("hwnas: error: ") and message in captured.err
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"num_layers": 4, "layers": [0, 2, 3], "mlp": [192] * 3, "heads": [4] * 3,
                               "kv_heads": [2] * 3}))
    # the edge runner's RunnerError
    refused(["profile", "--model", str(tiny_model), "--import-measurements", str(tmp_path / "none"), "--out",
             str(tmp_path / "t.json")], "has no manifest.json")
    # an opset the exporter cannot write, refused before the model loads
    for opset in ("5", "999"):
        refused(["onnx", "--model", str(tiny_model), "--opset", opset, "--out", str(tmp_path / "o")],
                f"--opset {opset} cannot be exported; expected 14 to")
    # --tokens 0 was taken as "the table's default"
    refused(["predict", "--table", str(tiny_tables["torch"]), "--subnet", str(cfg), "--tokens", "0"],
            "--tokens must be a positive prompt / cache length, got 0")
    # a baseline wrote its files into a folder of someone else's
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused(["baseline", "--method", "layer-drop", "--model", str(tiny_model), "--table", str(tiny_tables["torch"]),
             "--latency-ratio", "0.8", "--out", str(tmp_path / "mine")], "is an existing non-empty folder")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    # numbers taken too late or not at all
    refused(["generate", "--model", str(tiny_model), "--max-new-tokens", "-1"], "--max-new-tokens must be a positive")
    refused(["perplexity", "--model", str(tiny_model), "--batch-size", "0"], "--batch-size must be a positive")
    refused(["train-supernet", "--model", str(tiny_model), "--tokens", "128", "--minutes", "-1", "--out",
             str(tmp_path / "sn")], "--minutes must be positive, got -1.0")
    refused(["benchmark", "--model", str(tiny_model), "--prompt-tokens", "300", "--out", str(tmp_path / "b.json")],
            "--prompt-tokens plus --new-tokens is 332, past the 256 positions")
    refused(["run", "--model", str(tiny_model), "--runtime", "torch", "--table", str(tiny_tables["torch"]),
             "--threads", "0", "--out", str(tmp_path / "run")], "--threads must be at least 1, got 0")
    # a given table that does not fit is refused before the run's folder is made
    refused(["run", "--model", str(tiny_model), "--runtime", "onnxruntime", "--precision", "fp32", "--table",
             str(tiny_tables["torch"]), "--out", str(tmp_path / "run")], "does not match the target")
    # weights that do not fit config.json: the loader's multi-line message on one line
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text(json.dumps({**json.loads((bad / "config.json").read_text()),
                                                 "intermediate_size": 512}))
    refused(["generate", "--model", str(bad), "--max-new-tokens", "2"], "size mismatch for weight")
    # safetensors reports a full disk as its own SafetensorError, not an OSError

    class SafetensorError(Exception):
        pass

    def full_disk(**kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(cli, "space", full_disk)
    refused(["space", "--model", str(tiny_model)], "No space left on device (os error 28) (expected a location")

    def bug(**kwargs):
        raise SafetensorError("Error while deserializing header: invalid")

    monkeypatch.setattr(cli, "space", bug)  # any other exception is a bug, and is not hidden
    with pytest.raises(SafetensorError):
        cli.main(["space", "--model", str(tiny_model)])
    assert not [p for p in tmp_path.iterdir() if p.name not in ("cfg.json", "mine", "bad")]
