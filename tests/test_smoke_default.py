"""Slow smoke test on the real embedded default model (SmolLM2-135M): export a sub-network and ask it a fact."""
import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.smoke]


def test_exported_default_subnet_says_paris(run_cli, tmp_path):
    import hwnas
    from hwnas.metrics import greedy_generate
    from hwnas.loading import load_model

    sn = hwnas.Supernet.from_pretrained("smollm2-135m")
    assert sn.search_space.num_layers == 30 and sn.search_space.head_choices == (3, 6, 9)
    # drop the 4 layers of lowest Block Influence, and narrow the MLP of all but the first two kept layers
    drop = sorted(range(30), key=lambda i: sn.layer_importance[i])[:4]
    keep = tuple(i for i in range(30) if i not in drop)
    cfg = hwnas.SubnetConfig(30, keep, (1536, 1536) + (1408,) * (len(keep) - 2), (9,) * len(keep), (3,) * len(keep))
    cfg.to_json(tmp_path / "cfg.json")
    report = json.loads(run_cli("export", "--subnet", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "sub")).stdout)
    assert report["model_type"] == "hwnas_llama" and report["layers"] == 26
    assert 0.8 < report["parameter_ratio"] < 0.95
    model, tok = load_model(tmp_path / "sub", allow_subnet=True)
    assert greedy_generate(model, tok, "The capital of France is", max_new_tokens=4).strip().startswith("Paris")
