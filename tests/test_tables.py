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


def test_monotone_ms_pools_out_of_order_sizes_within_a_family():
    from hwnas.tables import monotone_ms

    def e(ms):
        return {"median_ms": ms, "mean_ms": ms, "std_ms": 0.0, "n": 1}

    entries = {"mlp.i128/decode.c128": e(1.0), "mlp.i256/decode.c128": e(3.0), "mlp.i384/decode.c128": e(1.0),
               "mlp.i512/decode.c128": e(4.0), "mlp.i256.dfp32/decode.c128": e(0.5),
               "mlp.i128/prefill.s128": e(9.0), "mlp.i256/prefill.s128": e(8.0),
               "attn.q6.kv3/decode.c128": e(2.0), "attn.q3.kv3/decode.c128": e(2.5), "attn.q2.kv2/decode.c128": e(9.0),
               "head/decode.c128": e(7.0)}
    ms = monotone_ms(entries)
    # widths 256 and 384 measured 3.0 and 1.0: pooled to their mean, the neighbours untouched
    assert ms["mlp.i128/decode.c128"] == 1.0 and ms["mlp.i512/decode.c128"] == 4.0
    assert ms["mlp.i256/decode.c128"] == ms["mlp.i384/decode.c128"] == 2.0
    assert ms["mlp.i128/prefill.s128"] == ms["mlp.i256/prefill.s128"] == 8.5  # each phase is its own family
    assert ms["mlp.i256.dfp32/decode.c128"] == 0.5  # and each down_proj precision
    assert ms["attn.q3.kv3/decode.c128"] == ms["attn.q6.kv3/decode.c128"] == 2.25
    assert ms["attn.q2.kv2/decode.c128"] == 9.0 and ms["head/decode.c128"] == 7.0  # other KV counts, other blocks
