"""onnxruntime's fused decoder nodes (hwnas.fused): the exported graph loads in stock ORTModelForCausalLM and computes
what torch computes, with padding on either side, for uniform and per-layer sub-networks, GQA and MHA, in prefill and
in decode steps on its own KV cache."""
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
    _assert_fused_layout(ops, model.config.num_hidden_layers)
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


def _assert_fused_layout(ops: collections.Counter, layers: int) -> None:
    """As onnxruntime-genai's builder writes a decoder: per layer one packed QKV MatMul feeding GroupQueryAttention
    (rotary inside), o, gate, up and down MatMuls, and two SkipSimplifiedLayerNormalization (the final norm's last)."""
    assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 0 and ops["Softmax"] == 0
    assert ops["MatMul"] == 5 * layers + 1  # + the LM head
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert ops["Add"] <= 2  # the first layer's RMSNorm epsilon: every residual add is in a skip norm


def _steps(run, ids: torch.Tensor, mask: torch.Tensor, new: int) -> list[torch.Tensor]:
    """Last-token logits of a prefill of `ids` then `new` greedy decode steps; `run(ids, mask, pos, cache)` returns
    (logits, cache) with cache None at first."""
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits, cache = run(ids, mask, pos, None)
    out = [logits[:, -1]]
    for _ in range(new):
        ids = out[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
        logits, cache = run(ids, mask, pos[:, -1:] + 1, cache)
        pos = pos[:, -1:] + 1
        out.append(logits[:, -1])
    return out


def _torch_run(model):
    def run(ids, mask, pos, cache):
        with torch.no_grad():
            o = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return o.logits, o.past_key_values
    return run


def _onnx_run(path: Path, config):
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    outputs = [o.name for o in sess.get_outputs()]

    def run(ids, mask, pos, cache):
        if cache is None:  # as ORTModelForCausalLM starts: the config's one empty shape for every layer
            cache = [np.zeros((ids.shape[0], config.num_key_value_heads, 0, config.head_dim), np.float32)] * len(pasts)
        feeds = dict(zip([p.name for p in pasts], cache), input_ids=ids.numpy(), attention_mask=mask.numpy(),
                     position_ids=pos.numpy())
        got = sess.run(outputs, {k: v for k, v in feeds.items() if k in names})
        return torch.from_numpy(got[0]), got[1:]
    return run


@pytest.mark.parametrize("which", ["uniform", "per_layer"])
def test_fused_prefill_and_decode_match_torch_and_unpadded_rows(tiny_model, per_layer_kv_subnet, tmp_path, which):
    """A left-padded batch, prefill then decode steps on the graph's own KV cache: the logits are torch's, and each
    padded row's are what the row gives alone, unpadded (rotary positions shifted by the padding change nothing)."""
    import onnx

    from hwnas.export import export_onnx
    from hwnas.loading import load_model

    src = tiny_model if which == "uniform" else per_layer_kv_subnet
    model, tok = load_model(src, allow_subnet=True)
    path = export_onnx(model, tmp_path / "onnx", fused_attention=True)
    _assert_fused_layout(collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node),
                         model.config.num_hidden_layers)
    assert [i.name for i in onnx.load(str(path)).graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    tok.padding_side, tok.pad_token = "left", tok.pad_token or tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()
    got = _steps(_onnx_run(path, model.config), batch["input_ids"], batch["attention_mask"], 3)
    want = _steps(_torch_run(model), batch["input_ids"], batch["attention_mask"], 3)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-3
    for row, prompt in enumerate(PROMPTS):
        alone = tok([prompt], return_tensors="pt")
        for g, a in zip(got, _steps(_onnx_run(path, model.config), alone["input_ids"], alone["attention_mask"], 3)):
            assert (g[row] - a[0]).abs().max() < 1e-3


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
    assert not any("forward" in vars(m) for m in model.model.modules())  # (Optimum itself re-binds the top one)


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
        assert ops["GroupQueryAttention"] == block.copies and ops["RotaryEmbedding"] == 0
        rng = np.random.default_rng(0)
        specs = block_inputs(block, config, fused=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {k: make_input(v, rng) for k, v in specs.items()})
        s, past = (tokens, 0) if phase == "prefill" else (1, tokens)
        assert out[0].shape == (1, s, config.hidden_size) and np.isfinite(out[0]).all()
        assert out[1].shape == (1, 1, past + s, config.head_dim)


@pytest.mark.parametrize("which", ["uniform", "per_layer"])
def test_shared_kv_buffer_decodes_as_the_fed_back_cache(tiny_model, per_layer_kv_subnet, tmp_path, which):
    """The benchmark's decoder with a context binds one KV buffer per layer as past and present (no copy per step):
    prefill and every decode step give the logits of the loop that feeds each present back as the next past."""
    import numpy as np

    from hwnas.common import HwnasError
    from hwnas.decoders import OrtLM
    from hwnas.export import export_onnx
    from hwnas.loading import load_model

    model, _ = load_model(tiny_model if which == "uniform" else per_layer_kv_subnet, allow_subnet=True)
    path = export_onnx(model, tmp_path / "onnx", fused_attention=True)
    shared, fed = OrtLM(path, 1, context=12), OrtLM(path, 1)
    assert "shared" in shared.info["kv_cache"] and fed.info["kv_cache"] == "fed back"
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 8))
    for lm in (shared, fed):
        lm.reset()
    steps = [prompt] + [np.array([[t]]) for t in (5, 17, 3, 9)]
    for ids in steps:
        a, b = shared.run(ids), fed.run(ids)
        assert a.shape == (model.config.vocab_size,) and np.abs(a - b).max() < 1e-4
    assert shared.binding is not None  # the decode steps really ran on the bound buffers
    with pytest.raises(HwnasError, match="do not fit the KV cache of 12 slots"):
        shared.run(np.array([[1]]))
    for lm in (shared, fed):  # a new sequence starts from empty buffers
        lm.reset()
    for ids in steps[:2]:
        assert np.abs(shared.run(ids) - fed.run(ids)).max() < 1e-4
