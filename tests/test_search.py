import csv
import dataclasses
import json

import numpy as np
import pytest

from hwnas import HwnasError, Supernet
from hwnas.encoding import GeneEncoder, shrunk_genes, shrunk_to
from hwnas.pruning import layer_drop, structured_seeds
from hwnas.quality import KLQuality, calibration_ids
from hwnas.search import Objectives, initial_population, run_search, seed_genes
from hwnas.search_report import hypervolume, pareto_mask
from hwnas.space import SearchSpace
from hwnas.supernet import Calibration


def _space(path, **kw):
    return SearchSpace.from_hf_config(json.loads((path / "config.json").read_text()), **kw)


@pytest.mark.parametrize("variant", ["gqa", "mha"])
def test_gene_encoder_round_trips(variant, tiny_models):
    space = _space(tiny_models[variant])
    enc = GeneEncoder(space)
    lo, hi = enc.bounds
    assert enc.n_var == 3 * space.num_layers and (lo == 0).all()
    for seed in range(50):
        cfg = space.sample(seed)
        x = enc.encode(cfg)
        assert x.shape == (enc.n_var,) and (x >= lo).all() and (x <= hi).all()
        assert enc.decode(x) == cfg
    assert enc.decode(enc.encode(space.max_config())) == space.max_config()
    rng = np.random.default_rng(0)
    for _ in range(50):  # any gene vector in bounds decodes to a valid config
        space.validate(enc.decode(rng.integers(lo, hi + 1)))


def test_gene_encoder_with_mixed_precision_has_a_down_proj_bit_per_layer(tiny_model):
    space = _space(tiny_model)
    enc = GeneEncoder(space, mixed_precision=True)
    lo, hi = enc.bounds
    assert enc.n_var == 4 * space.num_layers and (hi[3 * space.num_layers:] == 1).all()
    for seed in range(30):
        base = space.sample(seed)
        cfg = dataclasses.replace(base, fp32_down=tuple((seed + i) % 2 for i in range(base.depth)))
        assert enc.decode(enc.encode(cfg)) == cfg
    assert enc.decode(enc.encode(space.max_config())) == space.max_config()  # all int8: fp32_down empty
    assert any(enc.decode(x).fp32_down for x in np.random.default_rng(0).integers(lo, hi + 1, size=(20, enc.n_var)))
    with pytest.raises(HwnasError, match="this search has no mixed precision"):
        GeneEncoder(space).encode(dataclasses.replace(space.max_config(), fp32_down=(1, 0, 0, 0)))


def test_search_against_an_int8_table_weighs_int8_loss_and_down_proj_precision(tiny_model, tiny_int8_table, tmp_path):
    _search(tiny_model, tiny_int8_table, tmp_path, latency_ratio=1.0, evaluations=8)
    rows = list(csv.DictReader((tmp_path / "evaluations.csv").open()))
    configs = [json.loads(r["config"]) for r in rows]
    assert any("fp32_down" in c for c in configs)
    full = [float(r["kl"]) for r, c in zip(rows, configs) if c == _space(tiny_model).max_config().to_dict()]
    assert full and full[0] > 1e-4  # the full model, all int8, is scored against the fp32 teacher


def test_decode_repairs_too_shallow_genes(tiny_model):
    space = _space(tiny_model, min_layers=2)
    enc = GeneEncoder(space)
    x = np.zeros(enc.n_var, dtype=int)
    assert enc.decode(x).layers == (0, 1)
    with pytest.raises(HwnasError, match="expected \\(12,\\)"):
        enc.decode(np.zeros(5))


def test_kl_quality_is_zero_for_the_full_model(tiny_model):
    sn = Supernet.from_pretrained(str(tiny_model))
    q = KLQuality(sn, calibration_ids(sn.tokenizer, 2, 32), batch_size=1)
    assert q(sn.search_space.max_config()) == pytest.approx(0.0, abs=1e-6)
    small = q(sn.search_space.min_config())
    assert small > 0.01 and q(sn.search_space.sample(1)) >= 0


def test_pareto_mask_and_hypervolume():
    F = np.array([[1, 3, 1], [2, 2, 1], [3, 3, 1], [1, 3, 2]], dtype=float)
    assert pareto_mask(F).tolist() == [True, True, False, False]
    assert hypervolume(np.array([[0.5, 0.5, 0.5]]), np.ones(3)) == pytest.approx(0.125)
    assert hypervolume(np.array([[2.0, 0.5, 0.5]]), np.ones(3)) == 0.0


def _search(tiny_model, table, out, **kw):
    args = dict(model=str(tiny_model), table=str(table), evaluations=12, population=4, sequences=2, seq_len=32,
                out=str(out), progress=False)
    return run_search(**{**args, **kw})


def _dying_after(monkeypatch, n):
    """Make the n+1-th quality evaluation from now raise KeyboardInterrupt, as a kill would."""
    calls, real = {"n": 0}, KLQuality.__call__

    def dying(self, cfg):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real(self, cfg)

    monkeypatch.setattr(KLQuality, "__call__", dying)
    return lambda: monkeypatch.setattr(KLQuality, "__call__", real)


@pytest.mark.parametrize("algorithm", ["nsga2", "linas", "random"])
def test_search_writes_its_outputs_within_budget(algorithm, tiny_model, tiny_tables, tmp_path):
    r = _search(tiny_model, tiny_tables["onnxruntime"], tmp_path, algorithm=algorithm, latency_ratio=0.9, select=0)
    rows = list(csv.DictReader((tmp_path / "evaluations.csv").open()))
    assert r["evaluations"] == len(rows) == 12
    assert len({row["config"] for row in rows}) == 12  # each distinct sub-network evaluated once
    pareto = json.loads((tmp_path / "pareto.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert pareto["front"] and all(p["latency_ratio"] <= 0.9 + 1e-9 for p in pareto["front"])
    assert pareto["calibration"] == Calibration().key()  # the channel order its configs index; export rebuilds it
    pts = np.array([[float(r["kl"]), float(r["latency_ms"]), float(r["size_bytes"])] for r in rows if r["feasible"] == "1"])
    for p in pareto["front"]:  # nothing evaluated and feasible dominates a member of the front
        f = np.array([p["kl"], p["latency_ms"], p["size_bytes"]])
        assert not any((q <= f).all() and (q < f).any() for q in pts)
    assert len(pareto["front"]) == int(pareto_mask(pts).sum())
    assert summary["hypervolume"] > 0 and summary["front_size"] == len(pareto["front"])
    assert r["best"]["kl"] == min(float(row["kl"]) for row in rows if row["feasible"] == "1")
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_search_is_deterministic_and_resumes_to_the_same_front(tiny_model, tiny_tables, tmp_path, monkeypatch):
    whole = _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "a", seed=3)
    again = _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "b", seed=3)
    assert (tmp_path / "a" / "evaluations.csv").read_text() == (tmp_path / "b" / "evaluations.csv").read_text()
    assert whole["hypervolume"] == again["hypervolume"]
    # kill the search in its third generation, then resume it
    restore = _dying_after(monkeypatch, 9)
    with pytest.raises(KeyboardInterrupt):
        _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "c", seed=3)
    restore()
    assert (tmp_path / "c" / "state.json").exists() and not (tmp_path / "c" / "pareto.json").exists()
    with pytest.raises(HwnasError, match="pass --resume"):
        _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "c", seed=3)
    with pytest.raises(HwnasError, match="seed was 3, now 4"):
        _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "c", seed=4, resume=True)
    with pytest.raises(HwnasError, match="calibration was 'lambada\\+coqa-calibration-16x256', now "
                                         "'lambada-calibration-16x256'"):  # another channel order
        _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "c", seed=3, resume=True, calibration_source="lambada")
    _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "c", seed=3, resume=True)
    for name in ("evaluations.csv", "pareto.json"):  # byte for byte
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name


@pytest.mark.parametrize("algorithm", ["nsga2", "linas", "random"])
def test_search_killed_twice_under_a_budget_resumes_to_the_same_outputs(algorithm, tiny_model, tiny_tables, tmp_path,
                                                                      monkeypatch):
    kw = dict(algorithm=algorithm, seed=5, latency_ratio=0.8, select=0, evaluations=14)
    _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "whole", **kw)
    for kill in (6, 5):  # in its second generation, then in its third (after the resumed second)
        restore = _dying_after(monkeypatch, kill)
        with pytest.raises(KeyboardInterrupt):
            _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "k", resume=True, **kw)
        restore()
    _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "k", resume=True, **kw)
    for name in ("evaluations.csv", "pareto.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "k" / name).read_bytes(), name


def test_search_state_is_strict_json_with_the_population_and_generator(tiny_model, tiny_tables, tmp_path):
    _search(tiny_model, tiny_tables["onnxruntime"], tmp_path, latency_ratio=0.8, select=0, evaluations=8)

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    state = json.loads((tmp_path / "state.json").read_text(), parse_constant=refuse)
    assert (state["kind"], state["format"]) == ("hwnas-search-state", 1)
    assert len(state["evaluations"]) == 8 and state["args"]["evaluations"] == 8
    algo = state["algorithm"]
    assert algo["name"] == "nsga2" and algo["rng"]["bit_generator"] == "PCG64"
    pop = algo["population"]
    assert len(pop["X"]) == 4 and {len(pop[k]) for k in ("F", "G", "rank", "crowding")} == {4}
    assert all(len(f) == 3 for f in pop["F"]) and all(len(g) == 1 for g in pop["G"])  # one budget: latency
    assert not list(tmp_path.glob(".state*"))  # the atomic write's temp file is gone


def test_search_rejects_bad_input(tiny_model, tiny_models, tiny_tables, tmp_path):
    with pytest.raises(HwnasError, match="latency budget 0.001 ms is below the smallest achievable"):
        _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "a", latency_budget=0.001)
    with pytest.raises(HwnasError, match="size budget 0.0 MB is below the smallest achievable"):
        _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "b", size_budget=0.00001)
    with pytest.raises(HwnasError, match="was measured for model"):
        _search(tiny_models["mha"], tiny_tables["onnxruntime"], tmp_path / "c")
    with pytest.raises(HwnasError, match="algorithm 'cmaes'"):
        _search(tiny_model, tiny_tables["onnxruntime"], tmp_path / "d", algorithm="cmaes")


def test_search_cli(run_cli, tiny_model, tiny_tables, tmp_path):
    out = json.loads(run_cli("search", "--model", str(tiny_model), "--table", str(tiny_tables["torch"]),
                             "--algorithm", "random", "--evaluations", "6", "--population", "3",
                             "--calibration-source", "lambada", "--out", str(tmp_path / "s")).stdout)
    assert out["evaluations"] == 6 and out["front_size"] >= 1
    # the front feeds `hwnas export` directly: by default its lowest-KL member
    front = json.loads((tmp_path / "s" / "pareto.json").read_text())["front"]
    rep = json.loads(run_cli("export", "--model", str(tiny_model), "--subnet", str(tmp_path / "s" / "pareto.json"),
                             "--out", str(tmp_path / "best")).stdout)
    best = min(front, key=lambda p: p["kl"])
    assert json.loads((tmp_path / "best" / "hwnas_subnet.json").read_text()) == best["config"]
    assert rep["layers"] == best["layers"] and rep["channel_order"] == "lambada-calibration-16x256"
    proc = run_cli("export", "--model", str(tiny_model), "--subnet", str(tmp_path / "s" / "pareto.json"),
                   "--pick", str(len(front)), "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and f"the front has {len(front)} members" in proc.stderr
    proc = run_cli("search", "--model", str(tiny_model), "--table", str(tiny_tables["torch"]), "--latency-ratio", "1.5",
                   "--out", str(tmp_path / "t"), check=False)
    assert proc.returncode == 2 and "--latency-ratio must be in (0, 1]" in proc.stderr
    proc = run_cli("search", "--model", str(tiny_model), "--table", str(tiny_tables["torch"]), "--calibration-source",
                   "wikitext", "--out", str(tmp_path / "t"), check=False)
    assert proc.returncode == 2 and "invalid choice: 'wikitext'" in proc.stderr


def test_ray_workers_match_serial_quality(tiny_model):
    pytest.importorskip("ray")
    from hwnas.parallel import RayQuality

    sn = Supernet.from_pretrained(str(tiny_model))
    q = KLQuality(sn, calibration_ids(sn.tokenizer, 2, 32), batch_size=1)
    cfgs = [sn.search_space.sample(s) for s in range(4)]
    serial = [q(c) for c in cfgs]
    rq = RayQuality(sn, q, workers=2)
    try:
        assert rq(cfgs) == pytest.approx(serial, abs=1e-5)
    finally:
        rq.ray.shutdown()


def test_initial_population_is_seeded_with_structured_pruning_under_the_budget(tiny_model):
    space = _space(tiny_model)  # 4 layers, MLP 256
    enc = GeneEncoder(space)
    # a stand-in latency: 10 per kept layer plus its MLP width / 64
    obj = Objectives(quality=None, latency=lambda c: sum(10 + w / 64 for w in c.mlp), size=lambda c: 0.0,
                     latency_budget=50.0)
    order = [2, 0, 3, 1]  # layer 2 has the lowest Block Influence
    seeds = [enc.decode(x) for x in seed_genes(enc, obj, order)]
    assert seeds == structured_seeds(space, order, latency=obj.latency, budget=50.0)
    assert all(obj.latency(c) <= 50.0 for c in seeds)
    assert seeds[0].layers == (0, 1, 2, 3) and len(set(seeds[0].mlp)) == 1  # uniform width, all layers
    assert seeds[-1].layers == (0, 1, 3) and set(seeds[-1].mlp) == {256}  # the ShortGPT pick: drop layer 2
    assert seeds[-1] == layer_drop(space, order, latency=obj.latency, budget=50.0)  # `hwnas baseline`'s network
    X = initial_population(enc, obj, 8, np.random.default_rng(0), order)
    assert X.shape == (8, enc.n_var)
    cfgs = [enc.decode(x) for x in X]
    assert seeds[0] in cfgs and seeds[-1] in cfgs
    # the other six: three bisected to fit the budget, three anywhere from the full model down
    assert sum(obj.latency(c) <= 50.0 for c in cfgs) >= 5
    assert seed_genes(enc, Objectives(None, obj.latency, obj.size), order) == []  # no budget: no seeds


def test_shrunk_to_is_the_least_shrinking_that_fits_the_target(tiny_model):
    enc = GeneEncoder(_space(tiny_model))
    latency = lambda c: sum(10 + w / 64 for w in c.mlp)  # noqa: E731
    lo, hi = enc.bounds
    u = np.random.default_rng(3).random(enc.n_var)
    assert (shrunk_genes(enc, u, 0.0) == hi).all() and (shrunk_genes(enc, np.ones(enc.n_var), 1.0) == lo).all()
    full = latency(enc.decode(hi))
    assert (shrunk_to(enc, latency, u, full) == hi).all()  # nothing to shrink when the full model fits
    x9, x6 = shrunk_to(enc, latency, u, 0.9 * full), shrunk_to(enc, latency, u, 0.6 * full)
    assert latency(enc.decode(x9)) <= 0.9 * full and latency(enc.decode(x6)) <= 0.6 * full
    assert (x6 <= x9).all() and (x9 <= hi).all() and (x6 != x9).any()
