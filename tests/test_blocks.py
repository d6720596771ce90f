import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoConfig

from hwnas.blocks import block_inputs, block_module, export_block_onnx
from hwnas.runner import make_input
from hwnas.tables import STACK, Block


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
