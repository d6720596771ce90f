import json

import pytest
import torch

from hwnas import HwnasError
from hwnas.loading import read_llama_config
from hwnas.profile import profile
from hwnas.quantize import settings_for
from hwnas.runner import cpu_info
from hwnas.space import SearchSpace
from hwnas.tables import STACK, blocks_for


def test_torch_profile_writes_a_complete_table_and_resumes(tiny_tables, tiny_model, tmp_path):
    table = json.loads(tiny_tables["torch"].read_text())
    h = table["header"]
    assert h["complete"] and h["runtime"] == "torch" and h["precision"] == "fp32" and h["device"]["kind"] == "cpu"
    assert set(table["entries"]) == {b.key for b in blocks_for(SearchSpace.from_hf_config(read_llama_config(tiny_model)), h["phases"])}
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
    assert deployed.count("MatMulInteger") == 5 * 4 + 1 and "Gather" in deployed  # 4 layers x 5 (qkv packed) + head
    # the fp32-down_proj variant: the STACK copies' down_proj stay MatMul, gate and up are quantized
    nodes = onnx.load(str(d / "blocks/mlp.i128.dfp32__decode.c128.onnx")).graph.node
    assert sorted(n.name for n in nodes if n.op_type == "MatMul") == sorted(f"/mlps.{i}/down_proj/MatMul"
                                                                           for i in range(STACK))
    assert sum(n.op_type == "MatMulInteger" for n in nodes) == 2 * STACK
    assert json.loads((d / "manifest.json").read_text())["table_header"]["mixed_precision"] == ["down_proj"]


@pytest.mark.parametrize("precision", ["int8-wo", "int4"])
def test_onnxruntime_weight_only_blocks_are_matmulnbits_like_the_deployed_model(tiny_model, tmp_path, precision):
    import onnx

    d = tmp_path / "blocks"
    profile(model=str(tiny_model), runtime="onnxruntime", precision=precision, calibration=1, export_blocks=d,
            progress=False)
    ops = lambda f: [n.op_type for n in onnx.load(str(d / f)).graph.node]  # noqa: E731
    assert ops("blocks/mlp.i128__decode.c128.onnx").count("MatMulNBits") == 3 * STACK
    head, deployed = ops("blocks/head__decode.c128.onnx"), ops(f"e2e/0/model_{precision}.onnx")
    # the tied LM head gets its own weight and is quantized (int8, also in int4), as by `hwnas quantize`
    assert "MatMulNBits" in head and deployed.count("MatMulNBits") == 5 * 4 + 1
    # fused attention and the int8-block embedding, in the blocks as in the deployed model
    assert ops("blocks/attn.q4.kv2__decode.c128.onnx").count("GroupQueryAttention") == STACK
    assert deployed.count("GroupQueryAttention") == 4 and "Softmax" not in deployed
    assert "GatherBlockQuantized" in ops("blocks/embed__decode.c128.onnx") and "GatherBlockQuantized" in deployed
    header = json.loads((d / "manifest.json").read_text())["table_header"]
    assert header["quantization"] == settings_for("onnxruntime", precision, cpu_info()["isa"])
    assert "mixed_precision" not in header  # fp32 down_proj is a remedy for dynamic int8 only


def test_onnxruntime_int8_table_offers_fp32_down_proj(tiny_int8_table, tiny_model):
    table = json.loads(tiny_int8_table.read_text())
    h = table["header"]
    assert h["mixed_precision"] == ["down_proj"] and h["complete"]
    assert h["quantization"] == settings_for("onnxruntime", "int8", cpu_info()["isa"])  # what check_table compares
    assert set(table["entries"]) == {b.key for b in blocks_for(SearchSpace.from_hf_config(read_llama_config(tiny_model)), h["phases"], ["down_proj"])}
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_torch_profile(tiny_model, tmp_path):
    r = profile(model=str(tiny_model), runtime="torch", precision="fp16", device="cuda", calibration=2, warmup=1,
                repeats=5, out=tmp_path / "cuda.json", progress=False)
    table = json.loads((tmp_path / "cuda.json").read_text())
    assert r["entries"] == 16 and table["header"]["device"]["kind"] == "cuda"
