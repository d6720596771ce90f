"""onnxruntime's fused attention for exported Llama decoders.

Optimum's ONNX export writes each attention layer as about a hundred small nodes, which dominate a decode step.
`gqa_attention` patches a model so that its export writes `RotaryEmbedding` (queries, keys) and
`GroupQueryAttention` (KV cache, grouped heads, causal mask) instead, with Optimum's inputs and outputs, so
`ORTModelForCausalLM` loads it. Only onnxruntime runs these contrib nodes, and it refuses a step of several new
tokens on a non-empty KV cache for a batch of more than one.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Iterator

from .common import HwnasError

DOMAIN = "com.microsoft"


@functools.lru_cache(maxsize=None)
def _functions() -> tuple[Any, Any]:
    """torch autograd Functions that compute onnxruntime's RotaryEmbedding and GroupQueryAttention in torch (for the
    trace) and export as those single nodes."""
    import torch

    class RotaryEmbedding(torch.autograd.Function):
        """Rotate-half rotary embedding of `x` (batch, seq, heads * head_dim) at `position_ids` (batch, seq)."""

        @staticmethod
        def forward(ctx: Any, x: Any, position_ids: Any, cos_cache: Any, sin_cache: Any, heads: int) -> Any:
            with _untraced():
                b, s, _ = x.shape
                cos, sin = (c[position_ids][:, :, None] for c in (cos_cache, sin_cache))
                x1, x2 = x.view(b, s, heads, -1).chunk(2, -1)
                return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(b, s, -1)

        @staticmethod
        def symbolic(g: Any, x: Any, position_ids: Any, cos_cache: Any, sin_cache: Any, heads: int) -> Any:
            out = g.op(f"{DOMAIN}::RotaryEmbedding", x, position_ids, cos_cache, sin_cache, interleaved_i=0,
                       num_heads_i=heads)
            return out.setType(x.type())

    class GroupQueryAttention(torch.autograd.Function):
        """Causal attention of `q` over the KV cache extended by `k`, `v` ((batch, seq, heads * head_dim), already
        rotated), with an additive bias (batch, 1, seq, total) that masks padding on either side."""

        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, past_k: Any, past_v: Any, seqlens_k: Any, total: Any,
                    bias: Any, heads: int, kv_heads: int, head_dim: int, scale: float) -> Any:
            with _untraced():
                return GroupQueryAttention._reference(q, k, v, past_k, past_v, bias, heads, kv_heads, scale)

        @staticmethod
        def _reference(q: Any, k: Any, v: Any, past_k: Any, past_v: Any, bias: Any, heads: int, kv_heads: int,
                       scale: float) -> Any:
            from transformers.models.llama.modeling_llama import repeat_kv

            b, s, _ = q.shape
            hd, past = past_k.shape[3], past_k.shape[2]
            q, k, v = (x.view(b, s, n, hd).transpose(1, 2) for x, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            causal = torch.arange(past + s)[None] <= torch.arange(past, past + s)[:, None]
            mask = bias.masked_fill(~causal, torch.finfo(bias.dtype).min)
            o = torch.nn.functional.scaled_dot_product_attention(
                q, repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads), attn_mask=mask, scale=scale)
            return o.transpose(1, 2).reshape(b, s, heads * hd), k, v

        @staticmethod
        def symbolic(g: Any, q: Any, k: Any, v: Any, past_k: Any, past_v: Any, seqlens_k: Any, total: Any,
                     bias: Any, heads: int, kv_heads: int, head_dim: int, scale: float) -> Any:
            none = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())  # cos, sin, position_ids
            # ORTModelForCausalLM starts from an empty cache sized by the config's (uniform) KV-head count, which
            # GroupQueryAttention checks: reshape the cache to this layer's count (a no-op once it holds tokens).
            shape = g.op("Constant", value_t=torch.tensor([0, kv_heads, -1, head_dim]))
            past_k, past_v = g.op("Reshape", past_k, shape), g.op("Reshape", past_v, shape)
            out, key, value = g.op(f"{DOMAIN}::GroupQueryAttention", q, k, v, past_k, past_v, seqlens_k, total, none,
                                   none, none, bias, num_heads_i=heads, kv_num_heads_i=kv_heads, scale_f=scale,
                                   outputs=3)
            cache = past_k.type().with_sizes([None, None, None, None])  # its length grows
            return out.setType(q.type()), key.setType(cache), value.setType(cache)

    return RotaryEmbedding, GroupQueryAttention


def attend(a: Any, hidden_states: Any, position_ids: Any, past_k: Any, past_v: Any, seqlens_k: Any, total: Any,
           bias: Any, cos_cache: Any, sin_cache: Any) -> tuple[Any, Any, Any]:
    """One Llama attention layer `a` through the fused Functions: (its output after o_proj, present key, value)."""
    rotary, attention = _functions()
    heads, kv_heads = a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim
    q = rotary.apply(a.q_proj(hidden_states), position_ids, cos_cache, sin_cache, heads)
    k = rotary.apply(a.k_proj(hidden_states), position_ids, cos_cache, sin_cache, kv_heads)
    out, key, value = attention.apply(q, k, a.v_proj(hidden_states), past_k, past_v, seqlens_k, total, bias, heads,
                                      kv_heads, a.head_dim, float(a.scaling))
    return a.o_proj(out), key, value


def is_fused(graph: Any) -> bool:
    """Whether an onnx ModelProto holds onnxruntime's fused attention."""
    return any(n.op_type == "GroupQueryAttention" for n in graph.graph.node)


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Compute without recording into a trace: a Function's export is its `symbolic` node alone, and the JIT passes
    that run before it fail on some recorded reference graphs (a single-head layer's, for one)."""
    import torch

    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def rotary_caches(model: Any) -> tuple[Any, Any]:
    """cos and sin of every position up to `max_position_embeddings`, (positions, head_dim / 2), from the model's
    own rotary embedding (so rope scaling and its attention factor are kept)."""
    import torch

    inner = model.model
    n = inner.config.max_position_embeddings
    probe = torch.zeros(1, 1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = inner.rotary_emb(probe, torch.arange(n)[None])
    half = cos.shape[-1] // 2
    if not torch.equal(cos[0, :, :half], cos[0, :, half:]):
        raise HwnasError("the rotary embedding is not rotate-half style (cos halves differ); "
                         "GroupQueryAttention cannot express it")
    return cos[0, :, :half].contiguous(), sin[0, :, :half].contiguous()


@contextlib.contextmanager
def gqa_attention(model: Any) -> Iterator[None]:
    """Within the block, `model` (a Llama causal LM, per-layer shapes allowed) computes every attention layer
    through `attend`, so that an ONNX export writes each layer's rotary embedding and
    attention as onnxruntime's fused nodes. Restores the model on exit."""
    import torch

    cos_cache, sin_cache = rotary_caches(model)
    inner = model.model
    state: dict[str, Any] = {}
    original = inner.forward

    def model_forward(*args: Any, **kwargs: Any) -> Any:
        mask, ids, pos = kwargs.get("attention_mask"), kwargs.get("input_ids"), kwargs.get("position_ids")
        if mask is None or ids is None or pos is None:
            raise HwnasError("the fused attention needs input_ids, attention_mask and position_ids as keywords "
                             "(as Optimum's export passes them)")
        total = torch.onnx.operators.shape_as_tensor(mask)[1].to(torch.int32)
        state.update(total=total, pos=pos, seqlens_k=(torch.zeros_like(mask[:, 0]) + total - 1).to(torch.int32),
                     bias=((1.0 - mask.to(torch.float32)) * torch.finfo(torch.float32).min)[:, None, None, :]
                     .expand(-1, 1, ids.shape[1], -1))
        return original(*args, **kwargs)

    def attention_forward(self: Any, hidden_states: Any, position_embeddings: Any, attention_mask: Any,
                          past_key_values: Any = None, cache_position: Any = None, **kwargs: Any) -> Any:
        layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        if layer is None or not layer.is_initialized:
            raise HwnasError("the fused attention exports a model with its KV cache given as input "
                             "(text-generation-with-past)")
        out, layer.keys, layer.values = attend(self, hidden_states, state["pos"], layer.keys, layer.values,
                                               state["seqlens_k"], state["total"], state["bias"], cos_cache, sin_cache)
        return out, None

    attentions = [layer.self_attn for layer in inner.layers]
    inner.forward = model_forward
    for a in attentions:
        a.forward = types.MethodType(attention_forward, a)
    try:
        yield
    finally:
        del inner.forward
        for a in attentions:
            del a.forward

