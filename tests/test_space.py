import itertools
import json
import re

import pytest

from hwnas import HwnasError, SearchSpace, SubnetConfig


def cfg(**kw):
    base = dict(num_layers=4, layers=(0, 2), mlp=(64, 128), heads=(4, 2), kv_heads=(2, 2))
    return SubnetConfig(**{**base, **kw})


def test_json_round_trip(tmp_path):
    c = cfg()
    path = c.to_json(tmp_path / "c.json")
    assert SubnetConfig.from_json(path) == c
    assert json.loads(path.read_text())["layers"] == [0, 2]
    assert isinstance(SubnetConfig.from_dict(json.loads(path.read_text())).mlp, tuple)


def test_fp32_down_round_trips_and_is_omitted_when_all_int8(tmp_path):
    mixed = cfg(fp32_down=[0, 1])
    assert mixed.fp32_down == (0, 1) and mixed.fp32_down_mask == (False, True) and mixed.is_uniform == cfg().is_uniform
    assert SubnetConfig.from_json(mixed.to_json(tmp_path / "m.json")) == mixed
    assert json.loads((tmp_path / "m.json").read_text())["fp32_down"] == [0, 1]
    # all zeros is the default: the same config, and files without the key stay as they were
    assert cfg(fp32_down=(0, 0)) == cfg() and "fp32_down" not in cfg(fp32_down=(0, 0)).to_dict()
    assert cfg().fp32_down_mask == (False, False) and mixed != cfg()
    front = {"front": [{"kl": 0.1, "config": mixed.to_dict()}]}
    (tmp_path / "pareto.json").write_text(json.dumps(front))
    assert SubnetConfig.from_json(tmp_path / "pareto.json") == mixed


def test_frozen_and_hashable():
    c = cfg()
    with pytest.raises(AttributeError):
        c.num_layers = 3
    assert len({c, cfg()}) == 1


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(layers=(), mlp=(), heads=(), kv_heads=()), "all layers dropped"),
        (dict(heads=(3, 2)), "3 query heads do not divide into 2 KV groups"),
        (dict(layers=(2, 0)), "strictly increasing"),
        (dict(layers=(0, 4)), "index 4"),
        (dict(mlp=(64,)), "SubnetConfig.mlp has 1 entries"),
        (dict(mlp=(64, "128")), "SubnetConfig.mlp[1] must be an integer"),
        (dict(mlp=(64, True)), "must be an integer"),
        (dict(kv_heads=(2, 0)), "kv_heads must be at least 1"),
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(fp32_down=(1,)), "fp32_down has 1 entries, expected none or one per kept layer (2)"),
        (dict(fp32_down=(0, 2)), "layer 2: fp32_down must be 0 (int8 down_proj) or 1 (fp32), got 2"),
        (dict(fp32_down=(0, True)), "SubnetConfig.fp32_down[1] must be an integer"),
    ],
)
def test_invalid_configs_name_the_problem(kw, message):
    with pytest.raises(HwnasError, match=re.escape(message)):
        cfg(**kw)


def test_from_json_errors(tmp_path):
    with pytest.raises(HwnasError, match="not found"):
        SubnetConfig.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"num_layers": 4, "layers": [0')
    with pytest.raises(HwnasError, match="not valid JSON"):
        SubnetConfig.from_json(bad)
    bad.write_text(json.dumps({"num_layers": 4, "layers": [0]}))
    with pytest.raises(HwnasError, match=r"missing keys \['mlp', 'heads', 'kv_heads'\]"):
        SubnetConfig.from_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(HwnasError, match="must be a JSON object"):
        SubnetConfig.from_json(bad)


def gqa_space(**kw):
    return SearchSpace.for_model(num_layers=3, intermediate_size=128, num_heads=4, num_kv_heads=2, **kw)


def test_default_choices_gqa_and_mha():
    s = gqa_space()
    assert s.mlp_choices == (64, 128) and s.kv_head_choices == (2,) and s.q_per_kv_choices == (1, 2)
    assert s.head_choices == (2, 4)
    # LLaMA2-7B: no GQA, so whole KV groups are pruned; widths are multiples of 64 up to 11008
    s7 = SearchSpace.for_model(num_layers=32, intermediate_size=11008, num_heads=32, num_kv_heads=32)
    assert s7.q_per_kv_choices == (1,) and s7.kv_head_choices == tuple(range(4, 33, 4))
    assert s7.mlp_choices[0] == 64 and s7.mlp_choices[-1] == 11008 and all(m % 64 == 0 for m in s7.mlp_choices)
    # a width that is not a multiple of the step is still offered in full
    assert SearchSpace.for_model(num_layers=2, intermediate_size=100, num_heads=2, num_kv_heads=1).mlp_choices == (64, 100)


def test_size_matches_brute_force():
    s = gqa_space()
    per_layer = list(itertools.product(s.mlp_choices, s.kv_head_choices, s.q_per_kv_choices))
    count = 0
    for keep in itertools.product([False, True], repeat=s.num_layers):
        k = sum(keep)
        if k >= s.min_layers:
            count += len(per_layer) ** k
    assert s.size() == count == (1 + len(per_layer)) ** 3 - 1


def test_sample_is_valid_deterministic_and_spread():
    s = SearchSpace.for_model(num_layers=30, intermediate_size=1536, num_heads=9, num_kv_heads=3)
    samples = [s.sample(seed) for seed in range(200)]
    for c in samples:
        s.validate(c)
    assert s.sample(7) == s.sample(7)
    assert len(set(samples)) == 200
    depths = [c.depth for c in samples]
    assert min(depths) <= 5 and max(depths) >= 26  # spread across the size range


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(num_layers=5), "5-layer model, but this model has 3 layers"),
        (dict(mlp=(96, 64)), "MLP width 96 is not a choice; expected one of \\[64, 128\\]"),
        (dict(kv_heads=(1, 2), heads=(2, 2)), "1 KV heads is not a choice"),
        (dict(heads=(6, 2)), "6 query heads with 2 KV heads is not a choice"),
    ],
)
def test_validate_against_space(kw, message):
    base = dict(num_layers=3, layers=(0, 2), mlp=(64, 128), heads=(4, 2), kv_heads=(2, 2))
    with pytest.raises(HwnasError, match=message):
        gqa_space().validate(SubnetConfig(**{**base, **kw}))


def test_max_and_min_configs():
    s = gqa_space(min_layers=2)
    assert s.max_config().layers == (0, 1, 2) and s.max_config().mlp == (128,) * 3
    assert s.min_config().depth == 2 and s.min_config().heads == (2, 2)
    assert s.validate(s.min_config()) and s.max_config().is_uniform
    with pytest.raises(HwnasError, match="at least 2"):
        s.validate(SubnetConfig(3, (0,), (64,), (2,), (2,)))
