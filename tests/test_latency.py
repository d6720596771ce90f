import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoConfig

from hwnas import HwnasError, Supernet
from hwnas.latency import STACK, Block, block_inputs, block_module, blocks_for, blocks_of, export_block_onnx, profile
from hwnas.runner import make_input
from hwnas.space import SearchSpace


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


@pytest.mark.parametrize("block", [Block("attn", "decode", 8, heads=2, kv_heads=2), Block("attn", "prefill", 12, heads=4, kv_heads=2),
                                   Block("mlp", "prefill", 12, width=128), Block("head", "decode", 8), Block("embed", "prefill", 12)])
def test_block_graph_in_onnxruntime_matches_torch(block, tiny_model, tmp_path):
    config = AutoConfig.from_pretrained(tiny_model)
    torch.manual_seed(0)
    module = block_module(block, config)
    export_block_onnx(block, config, tmp_path / "b.onnx", opset=18, module=module)
    rng = np.random.default_rng(1)
    feeds = {k: make_input(v, rng) for k, v in block_inputs(block, config).items()}
    got = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        want = module(*(torch.from_numpy(v) for v in feeds.values()))
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want) == (1 + 2 * STACK if block.kind == "attn" else 1)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        assert np.abs(g - w.numpy()).max() < 1e-4


def test_torch_profile_writes_a_complete_table_and_resumes(tiny_tables, tiny_model, tmp_path):
    table = json.loads(tiny_tables["torch"].read_text())
    h = table["header"]
    assert h["complete"] and h["runtime"] == "torch" and h["precision"] == "fp32" and h["device"]["kind"] == "cpu"
    assert set(table["entries"]) == {b.key for b in blocks_for(_space(tiny_model), h["phases"])}
    assert all(e["n"] >= 3 and e["median_ms"] > 0 for e in table["entries"].values())
    assert len(table["calibration"]) == 3 * 2
    # an interrupted run: two entries and the end missing; --resume measures only those
    part = dict(table, header={**h, "complete": False}, entries=dict(table["entries"]))
    gone = sorted(part["entries"])[:2]
    for k in gone:
        del part["entries"][k]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(part))
    with pytest.raises(HwnasError, match="--resume"):
        profile(model=str(tiny_model), runtime="torch", calibration=3, warmup=1, repeats=5, out=path, progress=False)
    profile(model=str(tiny_model), runtime="torch", calibration=3, warmup=1, repeats=5, out=path, resume=True, progress=False)
    done = json.loads(path.read_text())
    assert done["header"]["complete"] and set(done["entries"]) == set(table["entries"])
    assert all(done["entries"][k] == table["entries"][k] for k in table["entries"] if k not in gone)
    with pytest.raises(HwnasError, match="phases differ"):
        profile(model=str(tiny_model), runtime="torch", prefill=[64], calibration=3, out=path, resume=True, progress=False)


def test_onnxruntime_int8_blocks_are_quantized_like_the_deployed_model(tiny_model, tmp_path):
    import onnx

    d = tmp_path / "blocks"
    profile(model=str(tiny_model), runtime="onnxruntime", precision="int8", calibration=1, export_blocks=d, progress=False)
    ops = lambda f: [n.op_type for n in onnx.load(str(d / f)).graph.node]  # noqa: E731
    assert "MatMulInteger" in ops("blocks/mlp.i128__decode.c128.onnx")
    # the tied LM head is given its own weight and quantized, in the block graph as in the deployed model
    assert "MatMulInteger" in ops("blocks/head__decode.c128.onnx")
    deployed = ops("e2e/0/model_int8.onnx")
    assert deployed.count("MatMulInteger") == 7 * 4 + 1 and "Gather" in deployed  # 4 layers x 7 linears + head
    # the fp32-down_proj variant: the STACK copies' down_proj stay MatMul, gate and up are quantized
    nodes = onnx.load(str(d / "blocks/mlp.i128.dfp32__decode.c128.onnx")).graph.node
    assert sorted(n.name for n in nodes if n.op_type == "MatMul") == sorted(f"/mlps.{i}/down_proj/MatMul"
                                                                           for i in range(STACK))
    assert sum(n.op_type == "MatMulInteger" for n in nodes) == 2 * STACK
    assert json.loads((d / "manifest.json").read_text())["table_header"]["mixed_precision"] == ["down_proj"]


@pytest.mark.parametrize("precision", ["int8-wo", "int4"])
def test_onnxruntime_weight_only_blocks_are_matmulnbits_like_the_deployed_model(tiny_model, tmp_path, precision):
    import onnx

    from hwnas.quantize import settings_for
    from hwnas.runner import cpu_info

    d = tmp_path / "blocks"
    profile(model=str(tiny_model), runtime="onnxruntime", precision=precision, calibration=1, export_blocks=d,
            progress=False)
    ops = lambda f: [n.op_type for n in onnx.load(str(d / f)).graph.node]  # noqa: E731
    assert ops("blocks/mlp.i128__decode.c128.onnx").count("MatMulNBits") == 3 * STACK
    head, deployed = ops("blocks/head__decode.c128.onnx"), ops(f"e2e/0/model_{precision}.onnx")
    if precision == "int8-wo":  # the tied LM head gets its own weight and is quantized, as by `ort-int8-wo`
        assert "MatMulNBits" in head and deployed.count("MatMulNBits") == 7 * 4 + 1
        # fused attention and the int8-block embedding, in the blocks as in the deployed model
        assert ops("blocks/attn.q4.kv2__decode.c128.onnx").count("GroupQueryAttention") == STACK
        assert deployed.count("GroupQueryAttention") == 4 and "Softmax" not in deployed
        assert "GatherBlockQuantized" in ops("blocks/embed__decode.c128.onnx") and "GatherBlockQuantized" in deployed
    else:  # int4 keeps the tied LM head fp32
        assert "MatMulNBits" not in head and deployed.count("MatMulNBits") == 7 * 4 and "MatMul" in deployed
    header = json.loads((d / "manifest.json").read_text())["table_header"]
    assert header["quantization"] == settings_for("onnxruntime", precision, cpu_info()["isa"])
    assert "mixed_precision" not in header  # fp32 down_proj is a remedy for dynamic int8 only


def test_onnxruntime_int8_table_offers_fp32_down_proj(tiny_int8_table, tiny_model):
    from hwnas.quantize import settings_for
    from hwnas.runner import cpu_info

    table = json.loads(tiny_int8_table.read_text())
    h = table["header"]
    assert h["mixed_precision"] == ["down_proj"] and h["complete"]
    assert h["quantization"] == settings_for("onnxruntime", "int8", cpu_info()["isa"])  # what check_table compares
    assert set(table["entries"]) == {b.key for b in blocks_for(_space(tiny_model), h["phases"], ["down_proj"])}
    assert "mlp.i256.dfp32/decode.c16" in table["entries"]


def test_openvino_int8_profile(tiny_model, tmp_path):
    r = profile(model=str(tiny_model), runtime="openvino", precision="int8", calibration=2, warmup=1, repeats=3,
                prefill=[16], decode=[16], out=tmp_path / "ov.json", progress=False)
    table = json.loads((tmp_path / "ov.json").read_text())
    assert r["entries"] == 8 + 8 and len(table["calibration"]) == 4
    assert table["header"]["quantization"]["mode"] == "INT8_ASYM" and "openvino" in table["header"]["versions"]


@pytest.mark.parametrize("kwargs, match", [
    ({"runtime": "tensorrt"}, "runtime 'tensorrt' is not supported"),
    ({"runtime": "torch", "precision": "int8"}, "precision 'int8' is not available for torch"),
    ({"runtime": "torch", "precision": "fp16"}, "for --device cuda"),
    ({"threads": 0}, "threads must be at least 1"),
    ({"prefill": [0]}, "prefill lengths must be positive"),
    ({"repeats": 1}, "repeats >= 3"),
    ({"runtime": "torch", "export_blocks": "x"}, "torch blocks are measured in-process"),
])
def test_profile_rejects_bad_input(kwargs, match, tiny_model, tmp_path):
    with pytest.raises(HwnasError, match=match):
        profile(**{"model": str(tiny_model), "out": tmp_path / "t.json", "progress": False, **kwargs})


def test_deployed_onnx_of_a_heterogeneous_subnet_matches_torch(tiny_model, tmp_path):
    from hwnas.export import export_onnx

    sn = Supernet.from_pretrained(str(tiny_model))
    cfg = _space(tiny_model).sample(7)
    assert not cfg.is_uniform
    sub = sn.extract(cfg)
    path = export_onnx(sub, tmp_path / "onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([[5, 9, 17, 33, 2, 8]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None]}
    for i, kv in enumerate(cfg.kv_heads):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = np.zeros((1, kv, 0, 16), np.float32)
    got = sess.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = sub(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_torch_profile(tiny_model, tmp_path):
    r = profile(model=str(tiny_model), runtime="torch", precision="fp16", device="cuda", calibration=2, warmup=1,
                repeats=5, out=tmp_path / "cuda.json", progress=False)
    table = json.loads((tmp_path / "cuda.json").read_text())
    assert r["entries"] == 16 and table["header"]["device"]["kind"] == "cuda"


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_recalibrate_measures_the_calibration_again_and_keeps_the_blocks(runtime, tiny_tables, tiny_model, tmp_path):
    """A table whose calibration was measured on a (simulated) 1000x slower day: recalibration measures the same
    sub-networks again here, now; the blocks are untouched. (At 10x, a CI run beside other jobs once measured the
    tiny torch sub-networks 20x slower than when the table was made: the margin must outlast a loaded machine.)"""
    from hwnas.predictor import LatencyPredictor

    table = json.loads(tiny_tables[runtime].read_text())
    slow = [dict(c, measured={**c["measured"], "median_ms": 1000 * c["measured"]["median_ms"]})
            for c in table["calibration"]]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(dict(table, calibration=slow)))
    before = LatencyPredictor.load(path)
    out = profile(model=str(tiny_model), runtime=runtime, out=path, recalibrate=True, progress=False)
    done = json.loads(path.read_text())
    assert done["entries"] == table["entries"]
    assert [(c["config"], c["phase"]) for c in done["calibration"]] == [(c["config"], c["phase"]) for c in slow]
    assert done["header"]["recalibrated"]["previous_ms"] == [round(c["measured"]["median_ms"], 4) for c in slow]
    assert out["points"] == len(slow) and out["median_shift"] < 0.1  # back from the inflated figures (1.0 if kept)
    assert out["corrections"].keys() == before.corrections.keys()  # refitted on the new points, loadable


def test_recalibrate_resumes_where_it_was_interrupted(tiny_tables, tiny_model, tmp_path, monkeypatch):
    import hwnas.runner
    from hwnas.recalibrate import ROUNDS

    path = tmp_path / "t.json"
    path.write_bytes(tiny_tables["onnxruntime"].read_bytes())
    points = len(json.loads(path.read_text())["calibration"])
    real, calls, interrupt = hwnas.runner.measure_item, [], [5]

    def measure(*a, **k):  # Ctrl-C during the 5th measurement of the first call
        calls.append(1)
        if len(calls) == interrupt[0]:
            interrupt[0] = None
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(hwnas.runner, "measure_item", measure)
    with pytest.raises(KeyboardInterrupt):
        profile(model=str(tiny_model), runtime="onnxruntime", out=path, recalibrate=True, progress=False)
    assert "recalibrated" not in json.loads(path.read_text())["header"]  # the table is untouched until the end
    calls.clear()
    profile(model=str(tiny_model), runtime="onnxruntime", out=path, recalibrate=True, progress=False)
    assert len(calls) == ROUNDS * points - 4  # the 4 measured before the interruption are kept
    assert "recalibrated" in json.loads(path.read_text())["header"]


def test_recalibrate_refuses_what_it_cannot_measure(tiny_tables, tiny_model, tmp_path):
    with pytest.raises(HwnasError, match="no table .* to recalibrate"):
        profile(model=str(tiny_model), runtime="onnxruntime", out=tmp_path / "none.json", recalibrate=True)
    for flag in ({"overwrite": True}, {"import_measurements": tmp_path}):
        with pytest.raises(HwnasError, match="--recalibrate"):
            profile(model=str(tiny_model), runtime="onnxruntime", out=tiny_tables["onnxruntime"], recalibrate=True, **flag)
    table = json.loads(tiny_tables["onnxruntime"].read_text())
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(dict(table, header={**table["header"], "device": {**table["header"]["device"],
                                                                                   "id": "cpu-some-arm-board-t2"}})))
    with pytest.raises(HwnasError, match="cpu-some-arm-board-t2"):
        profile(model=str(tiny_model), runtime="onnxruntime", out=foreign, recalibrate=True)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(dict(table, calibration=[])))
    with pytest.raises(HwnasError, match="no calibration points"):
        profile(model=str(tiny_model), runtime="onnxruntime", out=empty, recalibrate=True)
