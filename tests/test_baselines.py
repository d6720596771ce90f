import csv
import json

import numpy as np
import pytest

from hwnas import HwnasError
from hwnas.baselines import run_baseline
from hwnas.cli import main
from hwnas.loading import load_model
from hwnas.pruning import layer_drop, least_influential, width_candidates
from hwnas.search import setup
from hwnas.space import SubnetConfig


def _setup(tiny_model, table, budget):
    return setup(model=str(tiny_model), table=str(table), latency_budget=budget)


def test_layer_drop_removes_the_least_influential_layers_until_it_fits(tiny_model, width_table, pruning_budget):
    sp = _setup(tiny_model, width_table, pruning_budget)
    obj, space = sp.objectives, sp.supernet.search_space
    cfg = layer_drop(space, least_influential(sp.supernet.layer_importance), latency=obj.latency,
                     budget=obj.latency_budget)
    full = space.max_config()
    dropped = sorted(set(full.layers) - set(cfg.layers))
    order = list(np.argsort(sp.supernet.layer_importance))
    assert dropped and sorted(order[:len(dropped)]) == dropped  # lowest Block Influence first
    assert set(cfg.mlp) == {full.mlp[0]} and set(cfg.heads) == {full.heads[0]}  # full width
    assert obj.latency(cfg) <= obj.latency_budget
    keep = tuple(sorted(cfg.layers + (int(order[len(dropped) - 1]),)))  # the last layer dropped, put back
    n = len(keep)
    one_less = SubnetConfig(full.num_layers, keep, (full.mlp[0],) * n, (full.heads[0],) * n, (full.kv_heads[0],) * n)
    assert obj.latency(one_less) > obj.latency_budget  # it drops no more layers than it must


def test_width_uniform_keeps_every_layer_at_one_width_that_just_fits(tiny_model, width_table, pruning_budget):
    sp = _setup(tiny_model, width_table, pruning_budget)
    space, obj = sp.supernet.search_space, sp.objectives
    cands = width_candidates(space, sp.encoder.head_options, latency=obj.latency, budget=obj.latency_budget)
    assert cands
    for c in cands:
        assert c.depth == space.num_layers and c.is_uniform and obj.latency(c) <= obj.latency_budget
        wider = [w for w in space.mlp_choices if w > c.mlp[0]]
        if wider:  # the next width up breaks the budget
            n = c.depth
            up = SubnetConfig(c.num_layers, c.layers, (min(wider),) * n, c.heads, c.kv_heads)
            assert obj.latency(up) > obj.latency_budget


@pytest.mark.parametrize("method", ["layer-drop", "width-uniform", "random"])
def test_baseline_writes_a_loadable_checkpoint_under_the_target(method, tiny_model, width_table, pruning_budget,
                                                                 tmp_path):
    r = run_baseline(method=method, model=str(tiny_model), table=width_table, latency_budget=pruning_budget,
                     evaluations=6, population=3, out=tmp_path, progress=False)
    saved = json.loads((tmp_path / "baseline.json").read_text())
    assert saved["method"] == method and saved["latency_ms"] <= saved["latency_budget_ms"] + 1e-9
    assert saved["latency_budget_ms"] == pruning_budget and saved["latency_ratio"] < 1 and saved["kl"] >= 0
    model, _ = load_model(r["checkpoint"], allow_subnet=True)
    assert model.config.num_hidden_layers == len(saved["config"]["layers"])
    if method == "width-uniform":
        assert saved["kl"] == min(c["kl"] for c in saved["candidates"])
    if method == "random":  # the best feasible of exactly `evaluations` random sub-networks
        rows = list(csv.DictReader((tmp_path / "search" / "evaluations.csv").open()))
        assert len(rows) == 6
        feasible = [float(x["kl"]) for x in rows if x["feasible"] == "1"]
        assert saved["kl"] == pytest.approx(min(feasible))
    with pytest.raises(HwnasError, match="already holds a baseline"):
        run_baseline(method=method, model=str(tiny_model), table=width_table, latency_budget=pruning_budget,
                     out=tmp_path, progress=False)


def test_baseline_bad_input_is_named(tiny_model, tiny_tables, tmp_path):
    t = tiny_tables["onnxruntime"]
    with pytest.raises(HwnasError, match="'prune-all' is not known"):
        run_baseline(method="prune-all", model=str(tiny_model), table=t, latency_ratio=0.8, out=tmp_path)
    with pytest.raises(HwnasError, match="exactly one of"):
        run_baseline(method="layer-drop", model=str(tiny_model), table=t, out=tmp_path)
    with pytest.raises(HwnasError, match="below the smallest achievable"):
        run_baseline(method="layer-drop", model=str(tiny_model), table=t, latency_ratio=0.01, out=tmp_path)
    assert not (tmp_path / "baseline.json").exists()


def test_baseline_cli(tiny_model, width_table, pruning_budget, tmp_path, capsys):
    assert main(["baseline", "--method", "layer-drop", "--model", str(tiny_model), "--table",
                 str(width_table), "--latency-budget", str(pruning_budget), "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "layer-drop" and out["latency_ms"] <= pruning_budget
    # on the books alone, Block Influence is measured on other text: the layers dropped follow that order
    from hwnas.supernet import Calibration, Supernet

    BOOKS_CALIBRATION = Calibration(source="lambada")

    assert main(["baseline", "--method", "layer-drop", "--model", str(tiny_model), "--table",
                 str(width_table), "--latency-budget", str(pruning_budget), "--calibration-source", "lambada",
                 "--out", str(tmp_path / "books")]) == 0
    books = json.loads((tmp_path / "books" / "baseline.json").read_text())
    assert books["calibration"] == BOOKS_CALIBRATION.key()
    influence = Supernet.from_pretrained(tiny_model, calibration=BOOKS_CALIBRATION).layer_importance
    dropped = sorted(set(range(len(influence))) - set(books["config"]["layers"]))
    assert dropped == sorted(np.argsort(influence)[:len(dropped)].tolist())
