"""onnxruntime's fused attention (hwnas.fused): the exported graph loads in stock ORTModelForCausalLM and computes
what torch computes, with padding on either side, for uniform and per-layer sub-networks, GQA and MHA."""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

PROMPTS = ["The capital of France is", "Hello there, my name is Sam and I"]


def _export_and_compare(src: Path, out: Path, side: str) -> None:
    import onnx
    from optimum.onnxruntime import ORTModelForCausalLM

    from hwnas.export import export_onnx_checkpoint, fused_attention
    from hwnas.loading import load_model

    report = export_onnx_checkpoint(model=src, out=out, fused_attention=True)
    assert report["fused_attention"] and report["max_abs_logit_diff"] <= 1e-3 and fused_attention(out)
    model, tok = load_model(src, allow_subnet=True)
    ops = collections.Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    layers = model.config.num_hidden_layers
    assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 2 * layers
    assert ops["Softmax"] == 0  # no attention left spelled out
    ort_model = ORTModelForCausalLM.from_pretrained(out)
    tok.padding_side = side
    tok.pad_token = tok.pad_token or tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()  # the batch really is padded
    with torch.no_grad():
        ref, got = model(**batch).logits, ort_model(**batch).logits
        valid = batch["attention_mask"].bool()
        assert (ref - got).abs()[valid].max() < 1e-3
        if side == "left":  # as generate pads: every step through onnxruntime's own KV cache
            want = model.generate(**batch, max_new_tokens=10, do_sample=False)
            assert torch.equal(ort_model.generate(**batch, max_new_tokens=10, do_sample=False), want)


@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_export_matches_torch_on_a_padded_batch(tiny_model, tmp_path, side):
    _export_and_compare(tiny_model, tmp_path / "onnx", side)


def test_fused_export_of_per_layer_kv_heads(per_layer_kv_subnet, tmp_path):
    """KV heads 4, 2 and 1 by layer (as a LLaMA2-7B sub-network): ORTModelForCausalLM's empty cache has the
    config's single count, which each layer's GroupQueryAttention reshapes to its own."""
    _export_and_compare(per_layer_kv_subnet, tmp_path / "onnx", "left")


def test_fused_export_leaves_the_model_as_it_was(tiny_model, tmp_path):
    from hwnas.export import export_onnx
    from hwnas.loading import load_model

    model, tok = load_model(tiny_model)
    ids = tok(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
        export_onnx(model, tmp_path / "onnx", fused_attention=True)
        after = model(**ids).logits
    assert torch.equal(before, after)
    assert "forward" not in vars(model.model) and "forward" not in vars(model.model.layers[0].self_attn)


def test_fused_attention_block_runs_in_onnxruntime(tiny_model, tmp_path):
    """The latency table's attention blocks export as the deployed graph does: rotary + GroupQueryAttention."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from transformers import LlamaConfig

    from hwnas.blocks import block_inputs, export_block_onnx
    from hwnas.tables import Block
    from hwnas.runner import make_input

    config = LlamaConfig.from_pretrained(tiny_model)
    for phase, tokens in (("prefill", 8), ("decode", 8)):
        block = Block("attn", phase, tokens, heads=2, kv_heads=1)
        path = tmp_path / f"{phase}.onnx"
        export_block_onnx(block, config, path, opset=18, fused=True)
        ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
        assert ops["GroupQueryAttention"] == block.copies and ops["RotaryEmbedding"] == 2 * block.copies
        rng = np.random.default_rng(0)
        specs = block_inputs(block, config, fused=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {k: make_input(v, rng) for k, v in specs.items()})
        s, past = (tokens, 0) if phase == "prefill" else (1, tokens)
        assert out[0].shape == (1, s, config.hidden_size) and np.isfinite(out[0]).all()
        assert out[1].shape == (1, 1, past + s, config.head_dim)
