import dataclasses
import json

from hwnas.space import SearchSpace
from hwnas.tables import blocks_for, blocks_of


def _space(path):
    return SearchSpace.from_hf_config(json.loads((path / "config.json").read_text()))


def test_blocks_cover_every_shape_once(tiny_models):
    gqa = blocks_for(_space(tiny_models["gqa"]), {"prefill": [16, 32], "decode": [8]})
    keys = [b.key for b in gqa]
    assert len(keys) == len(set(keys)) == 3 * (2 + 2 + 4)  # embed, head, 2 head counts, 4 widths per phase length
    assert "attn.q2.kv2/prefill.s16" in keys and "mlp.i256/decode.c8" in keys and "head/prefill.s32" in keys
    mha = blocks_for(_space(tiny_models["mha"]), {"prefill": [16], "decode": [8]})
    assert {b.shape_key for b in mha if b.kind == "attn"} == {f"attn.q{k}.kv{k}" for k in _space(tiny_models["mha"]).kv_head_choices}


def test_blocks_of_a_subnet_count_each_use(tiny_model):
    cfg = _space(tiny_model).sample(5)
    used = blocks_of(cfg, "decode", 8)
    assert len(used) == 2 + 2 * cfg.depth
    assert sum(b.kind == "mlp" for b in used) == cfg.depth


def test_mixed_precision_adds_an_fp32_down_proj_variant_per_width(tiny_model):
    space = _space(tiny_model)
    plain = {b.key for b in blocks_for(space, {"decode": [8]})}
    mixed = {b.key for b in blocks_for(space, {"decode": [8]}, ["down_proj"])}
    assert mixed - plain == {f"mlp.i{w}.dfp32/decode.c8" for w in space.mlp_choices}
    cfg = dataclasses.replace(space.max_config(), fp32_down=(0, 1, 0, 1))
    keys = [b.key for b in blocks_of(cfg, "decode", 8) if b.kind == "mlp"]
    assert keys == ["mlp.i256/decode.c8", "mlp.i256.dfp32/decode.c8"] * 2
