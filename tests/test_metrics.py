import math

import pytest
import torch

from hwnas.metrics import greedy_generate, perplexity
from hwnas.loading import load_model


def test_perplexity_is_consistent_with_the_loss(tiny_model):
    model, tok = load_model(tiny_model)
    texts = ["The capital of France is Paris.", "She smiled and walked to the door."]
    r = perplexity(model, tok, texts, batch_size=2, progress=False)
    # the same figure from the model's own loss, one text at a time
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids
        with torch.no_grad():
            nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert r["tokens"] == n and math.isclose(r["nll"], nll / n, rel_tol=1e-4)
    assert math.isclose(r["perplexity"], math.exp(nll / n), rel_tol=1e-4)
    with pytest.raises(ValueError, match="shorter than two tokens"):
        perplexity(model, tok, ["a"], progress=False)


def test_greedy_generate_returns_new_text(tiny_model):
    model, tok = load_model(tiny_model)
    out = greedy_generate(model, tok, "The capital", max_new_tokens=4)
    assert isinstance(out, str) and not out.startswith("The capital")


def test_perplexity_command_runs_in_the_artifacts_runtime(tiny_model, tmp_path):
    from hwnas.cli import perplexity as ppl_command
    from hwnas.export import export_onnx_checkpoint

    export_onnx_checkpoint(model=tiny_model, out=tmp_path / "onnx")
    torch_r = ppl_command(model=str(tiny_model), split="validation", limit=6, batch_size=3)
    onnx_r = ppl_command(model=str(tmp_path / "onnx"), split="validation", limit=6, batch_size=3)
    assert torch_r["runtime"] == "torch" and onnx_r["runtime"] == "onnx"
    assert onnx_r["tokens"] == torch_r["tokens"] and math.isclose(onnx_r["perplexity"], torch_r["perplexity"], rel_tol=1e-4)
