import copy
import dataclasses
import json

import pytest

from hwnas import HwnasError, Supernet
from hwnas.predictor import LatencyPredictor, LatencyTable, check_table, size_bytes
from hwnas.space import SearchSpace
from hwnas.tables import TABLE_FORMAT, blocks_for, blocks_of, phase_key

SIG = {"hidden_size": 64, "head_dim": 16, "vocab_size": 320, "num_hidden_layers": 4, "intermediate_size": 256,
       "num_attention_heads": 4, "num_key_value_heads": 2}


def _space(path):
    return SearchSpace.from_hf_config(json.loads((path / "config.json").read_text()))


def synthetic_table(space, *, n_cal=12, scale=0.8, per_layer=0.3, offset=2.0):
    """Blocks cost 1 ms per 64 MLP channels, 0.5 ms per head, and the whole model follows a known correction."""
    phases = {"prefill": [16], "decode": [8]}
    cost = {"mlp": lambda b: b.width / 64, "attn": lambda b: 0.5 * b.heads, "embed": lambda b: 0.1, "head": lambda b: 3.0}
    entries = {b.key: {"mean_ms": cost[b.kind](b), "std_ms": 0.0, "median_ms": cost[b.kind](b), "n": 10}
               for b in blocks_for(space, phases)}
    cal = []
    for i in range(n_cal):
        cfg = space.sample(100 + i)
        for phase, (t,) in phases.items():
            s = sum(entries[b.key]["median_ms"] for b in blocks_of(cfg, phase, t))
            m = scale * s + per_layer * cfg.depth + offset
            cal.append({"config": cfg.to_dict(), "phase": phase_key(phase, t),
                        "measured": {"mean_ms": m, "std_ms": 0.0, "median_ms": m, "n": 10}})
    header = {"model": "tiny", "model_signature": SIG, "tie_word_embeddings": True, "runtime": "onnxruntime",
              "precision": "fp32", "device": {"kind": "cpu", "id": "cpu-test-avx2-t2", "threads": 2}, "phases": phases,
              "complete": True}
    return {"format": TABLE_FORMAT, "header": header, "entries": entries, "calibration": cal}


def test_correction_is_fitted_from_the_calibration_subnets(tiny_model):
    space = _space(tiny_model)
    p = LatencyPredictor(LatencyTable(synthetic_table(space)))
    c = p.corrections["decode.c8"]
    assert (c.scale, c.per_layer_ms, c.offset_ms) == pytest.approx((0.8, 0.3, 2.0), abs=1e-9)
    cfg = space.sample(7)
    s = p.block_sum(cfg, "decode")
    assert s == pytest.approx(3.1 + sum(w / 64 + 0.5 * h for w, h in zip(cfg.mlp, cfg.heads)))
    assert p.latency_ms(cfg, "decode") == pytest.approx(0.8 * s + 0.3 * cfg.depth + 2.0)
    assert p.latency_ms(cfg, "prefill", 16) == pytest.approx(0.8 * p.block_sum(cfg, "prefill") + 0.3 * cfg.depth + 2.0)
    # with fewer than two calibration points there is nothing to fit: the plain sum
    bare = LatencyPredictor(LatencyTable(synthetic_table(space, n_cal=0)))
    assert bare.latency_ms(cfg, "decode") == pytest.approx(s)


def test_missing_entries_are_listed(tiny_model):
    space = _space(tiny_model)
    t = synthetic_table(space)
    del t["entries"]["mlp.i192/decode.c8"]
    t["calibration"] = []
    p = LatencyPredictor(LatencyTable(t))
    cfg = space.max_config()
    p.latency_ms(cfg, "decode")  # full width: does not need the dropped entry
    narrow = type(cfg)(cfg.num_layers, cfg.layers, (192,) * cfg.depth, cfg.heads, cfg.kv_heads)
    with pytest.raises(HwnasError, match=r"lacks 1 entries.*mlp\.i192/decode\.c8"):
        p.latency_ms(narrow, "decode")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update(format="other"), "not an hwnas latency table"),
    (lambda t: t["entries"]["embed/decode.c8"].update(median_ms="fast"), "median_ms must be a non-negative number"),
    (lambda t: t["entries"].update({"embed/decode.c8": [1, 2]}), "expected an object"),
    (lambda t: t["header"].update(complete=False), "partial table"),
    (lambda t: t["header"].pop("runtime"), "header has no 'runtime'"),
    (lambda t: t["calibration"][0].update(config={"layers": "all"}), "not a sub-network config"),
])
def test_corrupted_tables_are_refused(edit, match, tiny_model, tmp_path):
    t = copy.deepcopy(synthetic_table(_space(tiny_model)))
    edit(t)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(t))
    with pytest.raises(HwnasError, match=match):
        LatencyTable.load(path)
    path.write_text("{broken")
    with pytest.raises(HwnasError, match="not valid JSON"):
        LatencyTable.load(path)


def test_foreign_tables_are_refused_unless_allowed(tiny_model):
    table = LatencyTable(synthetic_table(_space(tiny_model)))
    with pytest.raises(HwnasError, match="device: table 'cpu-test-avx2-t2', asked 'cpu-other-avx512-t2'"):
        table.check_target(device_id="cpu-other-avx512-t2")
    with pytest.raises(HwnasError, match="runtime: table 'onnxruntime', asked 'openvino'"):
        table.check_target(runtime="openvino", precision="fp32")
    table.check_target(device_id="cpu-other-avx512-t2", allow_foreign=True)
    with pytest.raises(HwnasError, match="hidden_size 64 in the table vs 576"):
        table.check_model({**SIG, "hidden_size": 576})


def test_check_table_refuses_a_table_measured_with_other_quantization(tiny_model, tmp_path):
    data = synthetic_table(_space(tiny_model))
    data["header"]["quantization"] = {"method": "onnxruntime.quantize_dynamic", "reduce_range": False}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    target = dict(signature=SIG, runtime="onnxruntime", precision="fp32", device_id="cpu-test-avx2-t2")
    assert check_table(path, **target, quantization=data["header"]["quantization"])["model"] == "tiny"
    with pytest.raises(HwnasError, match="this device deploys {'method'"):
        check_table(path, **target, quantization={"method": "onnxruntime.quantize_dynamic", "reduce_range": True})
    with pytest.raises(HwnasError, match="does not match the target"):
        check_table(path, **{**target, "device_id": "cpu-other-avx512-t2"}, quantization={})


def test_size_model_matches_the_extracted_weights(tiny_model):
    sn = Supernet.from_pretrained(str(tiny_model), calibration=None)
    for seed in range(3):
        cfg = sn.search_space.sample(seed)
        real = sum(p.numel() * 4 for p in sn.extract(cfg).parameters())
        assert size_bytes(cfg, SIG, runtime="torch", precision="fp32", tied=True) == real
        int8 = size_bytes(cfg, SIG, runtime="onnxruntime", precision="int8", tied=True)
        int4 = size_bytes(cfg, SIG, runtime="openvino", precision="int4", tied=True)
        assert int4 < int8 < real


def test_fp32_down_proj_uses_its_own_entries_and_counts_fp32_bytes(tiny_int8_table, tiny_model):
    space = _space(tiny_model)
    p = LatencyPredictor.load(tiny_int8_table)
    int8 = space.max_config()
    mixed = dataclasses.replace(int8, fp32_down=(1, 0, 0, 1))
    ms = p.ms  # the entries' times, non-decreasing in width within each family (tables.monotone_ms)
    extra = 2 * (ms["mlp.i256.dfp32/decode.c16"] - ms["mlp.i256/decode.c16"])
    assert p.block_sum(mixed, "decode") == pytest.approx(p.block_sum(int8, "decode") + extra)
    assert p.latency_ms(mixed, "prefill") > 0
    # a down_proj matrix (64 x 256) kept fp32: 4 bytes a weight instead of 1, and no scale and zero point
    assert p.bytes(mixed) - p.bytes(int8) == 2 * (4 * 64 * 256 - (64 * 256 + 64 * 5))
    assert size_bytes(mixed, SIG, runtime="openvino", precision="int8", tied=True) == \
        size_bytes(int8, SIG, runtime="openvino", precision="int8", tied=True)  # only ORT int8 honours it
    old = synthetic_table(space)  # a table without the variant names what it lacks
    with pytest.raises(HwnasError, match=r"lacks 1 entries.*'mlp\.i256\.dfp32/decode\.c8'"):
        LatencyPredictor(LatencyTable(old)).latency_ms(mixed, "decode")


def test_predict_cli(run_cli, tiny_tables, tiny_model, tmp_path):
    cfg = tmp_path / "cfg.json"
    _space(tiny_model).sample(2).to_json(cfg)
    out = json.loads(run_cli("predict", "--table", str(tiny_tables["onnxruntime"]), "--subnet", str(cfg)).stdout)
    assert out["runtime"] == "onnxruntime" and out["prefill.s128_ms"] > 0 and out["decode.c128_ms"] > 0
    assert out["bytes"] > 0 and set(out["corrections"]) == {"prefill.s128", "decode.c128"}
    proc = run_cli("predict", "--table", str(tmp_path / "nope.json"), "--subnet", str(cfg), check=False)
    assert proc.returncode == 2 and "latency table not found" in proc.stderr
