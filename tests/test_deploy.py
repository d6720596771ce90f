import numpy as np
import onnxruntime as ort
import pytest
import torch

from hwnas import HwnasError, Supernet
from hwnas.deploy import deploy
from hwnas.export import export_onnx
from hwnas.loading import read_llama_config
from hwnas.space import SearchSpace


def test_deployed_onnx_of_a_heterogeneous_subnet_matches_torch(tiny_model, tmp_path):
    sn = Supernet.from_pretrained(str(tiny_model))
    cfg = SearchSpace.from_hf_config(read_llama_config(tiny_model)).sample(7)
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


@pytest.mark.parametrize("runtime, precision, match", [
    ("torch", "int8", "torch deployment is fp32"),
    ("openvino", "int8-wo", "cannot deploy openvino/int8-wo"),
])
def test_deploy_refuses_a_target_it_has_no_method_for(runtime, precision, match, tiny_model, tmp_path):
    with pytest.raises(HwnasError, match=match):
        deploy(tiny_model, runtime, precision, tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


def test_deploy_openvino_fp32_writes_a_loadable_folder_with_its_tokenizer(tiny_model, tmp_path):
    out = deploy(tiny_model, "openvino", "fp32", tmp_path / "ov", progress=False)
    assert (out / "openvino_model.xml").is_file() and (out / "openvino_model.bin").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
