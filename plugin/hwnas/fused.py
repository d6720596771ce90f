"""onnxruntime's fused decoder nodes for exported Llama decoders.

Optimum's ONNX export writes each decoder layer as about a hundred small nodes, which dominate a decode step.
`gqa_attention` patches a model so that its export writes each layer as onnxruntime-genai's builder does: one packed
QKV projection feeding `GroupQueryAttention` (rotary embedding, KV cache, grouped heads, causal and padding mask in
one node), and `SkipSimplifiedLayerNormalization` for every residual add and the RMSNorm after it. The graph keeps
Optimum's inputs and outputs, so `ORTModelForCausalLM` loads it. Only onnxruntime runs these contrib nodes; it needs
a head size that is a multiple of 16, and it refuses a step of several new tokens on a non-empty KV cache for a batch
of more than one.

Rotary positions are the tokens' slots in the KV cache, not the `position_ids` input (onnxruntime's kernel reads
that only when decoding, so prefill and decode would disagree on a padded row). A left-padded row is then shifted by
its padding in queries and keys alike, which attention does not see: rotary scores depend on position differences.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any, Iterator

from .common import HwnasError

DOMAIN = "com.microsoft"
HEAD_MULTIPLE = 16  # onnxruntime's GroupQueryAttention refuses other head sizes
FUSED_KEY = "hwnas_fused_attention"  # config.json of an ONNX folder whose attention is onnxruntime's fused op


@functools.lru_cache(maxsize=None)
def _functions() -> tuple[Any, Any]:
    """torch autograd Functions that compute onnxruntime's GroupQueryAttention and SkipSimplifiedLayerNormalization
    in torch (for the trace) and export as those single nodes."""
    import torch

    class GroupQueryAttention(torch.autograd.Function):
        """Causal attention of the packed projection `qkv` (batch, seq, (heads + 2 kv_heads) * head_dim) over the KV
        cache, rotary at cache positions, with an additive bias (batch, 1, seq, total) that masks padding."""

        @staticmethod
        def forward(ctx: Any, qkv: Any, past_k: Any, past_v: Any, seqlens_k: Any, total: Any, bias: Any,
                    cos_cache: Any, sin_cache: Any, heads: int, kv_heads: int, head_dim: int, scale: float,
                    cache_heads: int) -> Any:
            with _untraced():
                return _reference(qkv, past_k, past_v, bias, cos_cache, sin_cache, heads, kv_heads, scale)

        @staticmethod
        def symbolic(g: Any, qkv: Any, past_k: Any, past_v: Any, seqlens_k: Any, total: Any, bias: Any,
                     cos_cache: Any, sin_cache: Any, heads: int, kv_heads: int, head_dim: int, scale: float,
                     cache_heads: int) -> Any:
            none = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())  # key, value, position_ids
            if kv_heads != cache_heads:
                # ORTModelForCausalLM starts from an empty cache sized by the config's KV-head count, which
                # GroupQueryAttention checks: reshape it to this layer's count (a no-op once it holds tokens).
                shape = g.op("Constant", value_t=torch.tensor([0, kv_heads, -1, head_dim]))
                past_k, past_v = g.op("Reshape", past_k, shape), g.op("Reshape", past_v, shape)
            out, key, value = g.op(f"{DOMAIN}::GroupQueryAttention", qkv, none, none, past_k, past_v, seqlens_k, total,
                                   cos_cache, sin_cache, none, bias, num_heads_i=heads, kv_num_heads_i=kv_heads,
                                   scale_f=scale, do_rotary_i=1, rotary_interleaved_i=0, outputs=3)
            cache = past_k.type().with_sizes([None, None, None, None])  # its length grows
            return out.setType(qkv.type().with_sizes([None, None, heads * head_dim])), key.setType(cache), \
                value.setType(cache)

    class SkipRMSNorm(torch.autograd.Function):
        """RMSNorm of `x + skip` scaled by `weight`: (normed, x + skip)."""

        @staticmethod
        def forward(ctx: Any, x: Any, skip: Any, weight: Any, eps: float) -> Any:
            with _untraced():
                total = x + skip
                return weight * (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)), total

        @staticmethod
        def symbolic(g: Any, x: Any, skip: Any, weight: Any, eps: float) -> Any:
            out, _, _, total = g.op(f"{DOMAIN}::SkipSimplifiedLayerNormalization", x, skip, weight, epsilon_f=eps,
                                    outputs=4)
            return out.setType(x.type()), total.setType(x.type())

    return GroupQueryAttention, SkipRMSNorm


def _reference(qkv: Any, past_k: Any, past_v: Any, bias: Any, cos_cache: Any, sin_cache: Any, heads: int,
               kv_heads: int, scale: float) -> tuple[Any, Any, Any]:
    """GroupQueryAttention in torch: (output, present key, present value)."""
    import torch
    from transformers.models.llama.modeling_llama import repeat_kv

    b, s, _ = qkv.shape
    hd, past = past_k.shape[3], past_k.shape[2]
    q, k, v = (x.reshape(b, s, n, hd).transpose(1, 2)
               for x, n in zip(qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], -1), (heads, kv_heads, kv_heads)))
    cos, sin = cos_cache[past:past + s], sin_cache[past:past + s]

    def rotate(x: Any) -> Any:
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    k, v = torch.cat([past_k, rotate(k)], 2), torch.cat([past_v, v], 2)
    causal = torch.arange(past + s)[None] <= torch.arange(past, past + s)[:, None]
    mask = bias.masked_fill(~causal, torch.finfo(bias.dtype).min)
    o = torch.nn.functional.scaled_dot_product_attention(
        rotate(q), repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads), attn_mask=mask, scale=scale)
    return o.transpose(1, 2).reshape(b, s, heads * hd), k, v


def _packed_qkv(a: Any, hidden_states: Any) -> Any:
    """q, k and v projections of `hidden_states` as one MatMul of the concatenated weights (the export folds the
    concatenation into one initializer). A projection with its own forward (an adapter) is computed as it is."""
    import torch

    projections = (a.q_proj, a.k_proj, a.v_proj)
    if not all(type(p) is torch.nn.Linear and "forward" not in vars(p) for p in projections):
        return torch.cat([p(hidden_states) for p in projections], -1)
    bias = None
    if any(p.bias is not None for p in projections):
        bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projections])
    return torch.nn.functional.linear(hidden_states, torch.cat([p.weight for p in projections]), bias)


def attend(a: Any, hidden_states: Any, past_k: Any, past_v: Any, seqlens_k: Any, total: Any, bias: Any,
           cos_cache: Any, sin_cache: Any, *, cache_heads: int | None = None) -> tuple[Any, Any, Any]:
    """One Llama attention layer `a` through the fused Function: (its output after o_proj, present key, value).

    Rotary positions are cache slots (see the module's note). `cache_heads`: the KV-head count of the empty cache a
    runtime feeds (default: the layer's own).
    """
    attention = _functions()[0]
    heads, kv_heads = a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim
    if a.head_dim % HEAD_MULTIPLE:
        raise HwnasError(f"head size {a.head_dim} cannot use onnxruntime's GroupQueryAttention; expected a multiple "
                         f"of {HEAD_MULTIPLE}")
    out, key, value = attention.apply(_packed_qkv(a, hidden_states), past_k, past_v, seqlens_k, total, bias, cos_cache,
                                      sin_cache, heads, kv_heads, a.head_dim, float(a.scaling),
                                      kv_heads if cache_heads is None else cache_heads)
    return a.o_proj(out), key, value


def finish_export(path: Any) -> None:
    """Tidy the exported graph file `path` in place: give it back the `position_ids` input, unread (rotary positions
    are cache slots) but fed by Optimum's runtimes, and drop the norm statistics outputs no node reads."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)  # the weights stay where they are
    graph = model.graph
    if "position_ids" not in {i.name for i in graph.input}:
        names = [i.name for i in graph.input]
        dims = [d.dim_param or d.dim_value for d in graph.input[names.index("input_ids")].type.tensor_type.shape.dim]
        graph.input.insert(names.index("attention_mask") + 1,
                           helper.make_tensor_value_info("position_ids", TensorProto.INT64, dims))
    read = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for n in graph.node:
        if n.op_type == "SkipSimplifiedLayerNormalization":
            for k in range(1, len(n.output)):
                if n.output[k] not in read:
                    n.output[k] = ""
    onnx.save(model, str(path))


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
    """Within the block, `model` (a Llama causal LM, per-layer shapes allowed) computes every decoder layer through
    `attend` and `SkipRMSNorm`, so that an ONNX export writes onnxruntime's fused nodes. Restores the model on exit.

    The residual sum that ends a layer is handed to the next RMSNorm (the next layer's, or the final one) to add,
    so that each add and norm export as one node; the layer's own sum is then unused and leaves the graph.
    """
    import torch

    _, skip_norm = _functions()
    cos_cache, sin_cache = rotary_caches(model)
    inner = model.model
    cache_heads = inner.config.num_key_value_heads  # what ORTModelForCausalLM sizes an empty cache with
    state: dict[str, Any] = {}
    original = inner.forward

    def model_forward(*args: Any, **kwargs: Any) -> Any:
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids")
        if mask is None or ids is None:
            raise HwnasError("the fused attention needs input_ids and attention_mask as keywords "
                             "(as Optimum's export passes them)")
        total = torch.onnx.operators.shape_as_tensor(mask)[1].to(torch.int32)
        state.clear()
        state.update(total=total, seqlens_k=(torch.zeros_like(mask[:, 0]) + total - 1).to(torch.int32),
                     bias=((1.0 - mask.to(torch.float32)) * torch.finfo(torch.float32).min)[:, None, None, :]
                     .expand(-1, 1, ids.shape[1], -1))
        return original(*args, **kwargs)

    def norm(module: Any, x: Any) -> tuple[Any, Any]:
        """(RMSNorm of the residual stream `x`, the stream), adding the previous layer's pending sum here."""
        pending = state.pop("pending", None)
        if pending is not None and pending[0] is x:
            return skip_norm.apply(pending[1], pending[2], module.weight, float(module.variance_epsilon))
        return type(module).forward(module, x), x

    def attention_forward(self: Any, hidden_states: Any, *args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        layer = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        if layer is None or not layer.is_initialized:
            raise HwnasError("the fused attention exports a model with its KV cache given as input "
                             "(text-generation-with-past)")
        out, layer.keys, layer.values = attend(self, hidden_states, layer.keys, layer.values, state["seqlens_k"],
                                               state["total"], state["bias"], cos_cache, sin_cache,
                                               cache_heads=cache_heads)
        return out, None

    def layer_forward(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        h, residual = norm(self.input_layernorm, hidden_states)
        h, residual = skip_norm.apply(residual, self.self_attn(h, *args, **kwargs)[0],
                                      self.post_attention_layernorm.weight,
                                      float(self.post_attention_layernorm.variance_epsilon))
        mlp = self.mlp(h)
        stream = residual + mlp
        state["pending"] = (stream, residual, mlp)
        return stream

    def final_norm(self: Any, hidden_states: Any) -> Any:
        return norm(self, hidden_states)[0]

    layers = list(inner.layers)
    for m in [inner.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
        if not hasattr(m, "variance_epsilon") or getattr(m, "weight", None) is None:
            raise HwnasError(f"{type(m).__name__} is not an RMSNorm with a weight and variance_epsilon; "
                             "SkipSimplifiedLayerNormalization expects Llama's LlamaRMSNorm")
    inner.forward = model_forward
    inner.norm.forward = types.MethodType(final_norm, inner.norm)
    for layer in layers:
        layer.forward = types.MethodType(layer_forward, layer)
        layer.self_attn.forward = types.MethodType(attention_forward, layer.self_attn)
    try:
        yield
    finally:
        del inner.forward, inner.norm.forward
        for layer in layers:
            del layer.forward, layer.self_attn.forward
