"""The blocks of a latency table as torch modules and as graphs, and how torch timings are taken.

torch blocks are timed in-process. onnxruntime and OpenVINO blocks are exported as small graphs,
quantized as the deployed model will be (`quantize.py`), and timed by `runner.py`, the same code an
edge device runs with `python -m hwnas.runner DIR`.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from . import runner
from .export import torch_quiet
from .fused import attend
from .quantize import compress_openvino, quantize_onnx, settings_for
from .space import SubnetConfig
from .tables import Block


# ------------------------------------------------------------------------------- torch blocks
def _shaped_config(config: Any, **sizes: int):
    c = copy.deepcopy(config)
    for k, v in sizes.items():
        setattr(c, k, v)
    return c


def block_module(block: Block, config: Any, *, fused: bool = False):
    """A torch module computing `block` (random weights: latency does not depend on their values); with `fused`, an
    attention block exports as onnxruntime's fused attention, as `export_onnx(fused_attention=True)` writes it."""
    import torch
    from torch import nn
    from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaMLP, LlamaRMSNorm,
                                                          apply_rotary_pos_emb, repeat_kv)

    hidden, eps = config.hidden_size, config.rms_norm_eps
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(config.vocab_size, hidden)

        def forward(self, input_ids):
            return self.embed(input_ids)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.lm_head = LlamaRMSNorm(hidden, eps), nn.Linear(hidden, config.vocab_size, bias=False)

        def forward(self, hidden_states):
            return self.lm_head(self.norm(hidden_states))

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = _shaped_config(config, intermediate_size=block.width)
            self.norms = nn.ModuleList(LlamaRMSNorm(hidden, eps) for _ in range(block.copies))
            self.mlps = nn.ModuleList(LlamaMLP(c) for _ in range(block.copies))

        def forward(self, hidden_states):
            for norm, mlp in zip(self.norms, self.mlps):
                hidden_states = hidden_states + mlp(norm(hidden_states))
            return hidden_states

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            c = _shaped_config(config, num_attention_heads=block.heads, num_key_value_heads=block.kv_heads, head_dim=head_dim)
            self.norms = nn.ModuleList(LlamaRMSNorm(hidden, eps) for _ in range(block.copies))
            self.attns = nn.ModuleList(LlamaAttention(c, layer_idx=i) for i in range(block.copies))
            self.groups, self.causal = block.heads // block.kv_heads, block.phase == "prefill"

        def forward(self, hidden_states, cos, sin, *past):
            b, s, _ = hidden_states.shape
            presents = []
            for i, (norm, a) in enumerate(zip(self.norms, self.attns)):
                h = norm(hidden_states)
                q = a.q_proj(h).view(b, s, -1, head_dim).transpose(1, 2)
                k = a.k_proj(h).view(b, s, -1, head_dim).transpose(1, 2)
                v = a.v_proj(h).view(b, s, -1, head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k, v = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, repeat_kv(k, self.groups), repeat_kv(v, self.groups), is_causal=self.causal)
                hidden_states = hidden_states + a.o_proj(o.transpose(1, 2).reshape(b, s, -1))
                presents += [k, v]
            return (hidden_states, *presents)

    class FusedAttn(Attn):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cos_cache", torch.rand(config.max_position_embeddings, head_dim // 2))
            self.register_buffer("sin_cache", torch.rand(config.max_position_embeddings, head_dim // 2))

        def forward(self, hidden_states, *past):  # static shapes: the mask inputs are constants
            s, total = hidden_states.shape[1], past[0].shape[2] + hidden_states.shape[1]
            seqlens_k, total_t = torch.tensor([total - 1], dtype=torch.int32), torch.tensor(total, dtype=torch.int32)
            bias, presents = torch.zeros(1, 1, s, total), []
            for i, (norm, a) in enumerate(zip(self.norms, self.attns)):
                o, k, v = attend(a, norm(hidden_states), past[2 * i], past[2 * i + 1], seqlens_k, total_t,
                                 bias, self.cos_cache, self.sin_cache)
                hidden_states = hidden_states + o
                presents += [k, v]
            return (hidden_states, *presents)

    attn = FusedAttn if fused else Attn
    return {"embed": Embed, "head": Head, "mlp": Mlp, "attn": attn}[block.kind]().eval()


def block_inputs(block: Block, config: Any, *, fused: bool = False) -> dict[str, dict[str, Any]]:
    """Input specs (shape, dtype, fill) for `block`, in the runner's manifest format (`fused`: see `block_module`)."""
    s = block.tokens if block.phase == "prefill" else 1
    past = 0 if block.phase == "prefill" else block.tokens
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = {"shape": [1, s, config.hidden_size], "dtype": "float32"}
    if block.kind == "embed":
        return {"input_ids": {"shape": [1, s], "dtype": "int64", "fill": "randint", "high": config.vocab_size}}
    if block.kind in ("head", "mlp"):
        return {"hidden_states": hidden}
    kv = {"shape": [1, block.kv_heads, past, head_dim], "dtype": "float32"}
    rot = {"shape": [1, s, head_dim], "dtype": "float32"}
    pasts = {f"past_{kind}_{i}": kv for i in range(block.copies) for kind in ("key", "value")}
    if fused:  # rotary positions are the cache slots (hwnas.fused)
        return {"hidden_states": hidden, **pasts}
    return {"hidden_states": hidden, "cos": rot, "sin": rot, **pasts}


# ------------------------------------------------------------------------------- block graphs
def export_block_onnx(block: Block, config: Any, path: Path, *, opset: int, module: Any = None,
                      fused: bool = False) -> None:
    """Export `block` (or the given module computing it) as a static-shape ONNX graph at `path`."""
    import numpy as np
    import torch

    module = module if module is not None else block_module(block, config, fused=fused)
    specs = block_inputs(block, config, fused=fused)
    rng = np.random.default_rng(0)
    args = tuple(torch.from_numpy(runner.make_input(spec, rng).copy()) for spec in specs.values())
    outputs = ["out"] + ([f"present_{kind}_{i}" for i in range(block.copies) for kind in ("key", "value")]
                         if block.kind == "attn" else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), torch_quiet():
        torch.onnx.export(module, args, str(tmp), input_names=list(specs), output_names=outputs, opset_version=opset,
                          dynamo=False, do_constant_folding=True)
    os.replace(tmp, path)


def build_block(block: Block, config: Any, path: Path, runtime: str, precision: str, isa: str, *,
                fused: bool = False) -> None:
    """Export `block` and quantize it as the deployed model of `runtime`/`precision` is, into `path`."""
    opset = 21 if runtime == "onnxruntime" and precision == "int4" else 18
    raw = path.with_name(f".{path.stem}.raw.onnx")
    export_block_onnx(block, config, raw, opset=opset, fused=fused)
    try:
        if runtime == "onnxruntime" and (precision == "fp32" or block.kind == "head" and config.tie_word_embeddings
                                         and not settings_for(runtime, precision, isa).get("untie_lm_head")):
            # A tied LM head reaches onnxruntime as a Transpose of the embedding, which the quantizer skips
            # unless it is untied first (every int8 and int4 setting does that today).
            os.replace(raw, path)
        elif runtime == "onnxruntime":
            tmp = path.with_name(f".{path.name}.tmp.onnx")
            with torch_quiet():
                quantize_onnx(raw, tmp, precision=precision, isa=isa, fp32_down="all" if block.fp32_down else ())
            os.replace(tmp, path)
        else:
            import openvino as ov

            with torch_quiet():
                m, _ = compress_openvino(ov.convert_model(str(raw)), precision=precision)
            tmp = path.with_name(f".{path.stem}.tmp.xml")
            ov.save_model(m, str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
            os.replace(tmp, path)
    finally:
        raw.unlink(missing_ok=True)


def deployed_inputs(cfg: SubnetConfig, signature: dict[str, int], runtime: str, phase: str, tokens: int) -> dict[str, Any]:
    """A runner item's inputs (and OpenVINO state set-up) for one phase of a deployed causal LM."""
    s, past = (tokens, 0) if phase == "prefill" else (1, tokens)

    def step(n: int, start: int) -> dict[str, Any]:
        d = {"input_ids": {"shape": [1, n], "dtype": "int64", "fill": "randint", "high": signature["vocab_size"]},
             "attention_mask": {"shape": [1, start + n], "dtype": "int64", "fill": "ones"},
             "position_ids": {"shape": [1, n], "dtype": "int64", "fill": "arange", "start": start}}
        if runtime == "openvino":
            d["beam_idx"] = {"shape": [1], "dtype": "int32", "fill": "zeros"}
        return d

    if runtime == "openvino":
        return {"inputs": step(s, past), "stateful": True, **({"stateful_prefill": step(past, 0)} if past else {})}
    inputs = step(s, past)
    for i, kv in enumerate(cfg.kv_heads):
        spec = {"shape": [1, kv, past, signature["head_dim"]], "dtype": "float32", "fill": "normal" if past else "zeros"}
        inputs[f"past_key_values.{i}.key"] = inputs[f"past_key_values.{i}.value"] = spec
    return {"inputs": inputs}


# ------------------------------------------------------------------------------- torch timing
def _torch_feeds(specs: dict[str, dict[str, Any]], device: str, dtype: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    feeds = {}
    for name, spec in specs.items():
        t = torch.from_numpy(runner.make_input(spec, rng).copy()).to(device)
        feeds[name] = t.to(dtype) if t.is_floating_point() else t
    return feeds


def time_torch(fn: Any, *, device: str, warmup: int, repeats: int, before: Any = None) -> dict[str, Any]:
    """Time a torch callable with the runner's method (cache flush on CPU, synchronisation on CUDA)."""
    import torch

    if device == "cuda":
        call = lambda: (fn(), torch.cuda.synchronize())  # noqa: E731
        flush = None
    else:
        call, flush = fn, runner.CacheFlusher()
    with torch.inference_mode():
        samples = runner.time_call(call, warmup=warmup, repeats=repeats, flush=flush, before=before)
    return {**runner.trimmed_stats(samples), "samples_ms": [round(s, 4) for s in samples]}


def per_copy(stats: dict[str, Any], copies: int) -> dict[str, Any]:
    """Timing of a chain of `copies` blocks, as the timing of one."""
    out = {k: (v / copies if k.endswith("_ms") else v) for k, v in stats.items() if k != "samples_ms"}
    return {**out, "copies": copies}


def measure_torch_block(block: Block, config: Any, *, device: str, dtype: Any, warmup: int, repeats: int) -> dict[str, Any]:
    module = block_module(block, config).to(device=device, dtype=dtype)
    feeds = list(_torch_feeds(block_inputs(block, config), device, dtype).values())
    return per_copy(time_torch(lambda: module(*feeds), device=device, warmup=warmup, repeats=repeats), block.copies)


def measure_torch_model(model: Any, phase: str, tokens: int, *, warmup: int, repeats: int) -> dict[str, Any]:
    """End-to-end latency of a torch causal LM: a prompt of `tokens`, or one token after `tokens` cached."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device.type
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens + 1), generator=gen).to(device)
    if phase == "prefill":
        return time_torch(lambda: model(ids[:, :tokens], use_cache=True), device=device, warmup=warmup, repeats=repeats)
    cache = DynamicCache()
    with torch.inference_mode():
        model(ids[:, :tokens], past_key_values=cache, use_cache=True)
    return time_torch(lambda: model(ids[:, tokens:], past_key_values=cache, use_cache=True), device=device,
                      warmup=warmup, repeats=repeats, before=lambda: cache.crop(tokens))
