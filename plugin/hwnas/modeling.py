"""Standalone sub-network models.

A uniform sub-network is a plain `llama` checkpoint. A heterogeneous one is `hwnas_llama`: a
`LlamaConfig` with a `layer_shapes` list and a `LlamaForCausalLM` subclass that builds each
decoder layer at its own shape. Both classes are registered with transformers' Auto classes when
`hwnas` is imported, so `AutoModelForCausalLM.from_pretrained(dir)` loads them without remote code.
"""
from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .common import HwnasError
from .space import SubnetConfig

_SHAPE_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads")


class HwnasLlamaConfig(LlamaConfig):
    """A Llama config whose decoder layers have their own MLP width and head counts."""

    model_type = "hwnas_llama"

    def __init__(self, layer_shapes: list[dict[str, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer_shapes = [dict(s) for s in layer_shapes] if layer_shapes is not None else None
        if self.layer_shapes is not None:
            if len(self.layer_shapes) != self.num_hidden_layers:
                raise HwnasError(
                    f"hwnas_llama config has {len(self.layer_shapes)} layer_shapes for {self.num_hidden_layers} layers"
                )
            for i, shape in enumerate(self.layer_shapes):
                if sorted(shape) != sorted(_SHAPE_KEYS) or not all(isinstance(v, int) and v > 0 for v in shape.values()):
                    raise HwnasError(f"hwnas_llama layer_shapes[{i}] = {shape}; expected positive ints for {_SHAPE_KEYS}")
                if shape["num_attention_heads"] % shape["num_key_value_heads"]:
                    raise HwnasError(f"hwnas_llama layer_shapes[{i}]: heads do not divide into KV heads: {shape}")

    def layer_config(self, i: int) -> LlamaConfig:
        """A config carrying layer `i`'s own shapes (everything else shared)."""
        cfg = copy.copy(self)
        if self.layer_shapes is not None:
            for key, value in self.layer_shapes[i].items():
                setattr(cfg, key, value)
        return cfg


class HwnasLlamaForCausalLM(LlamaForCausalLM):
    config_class = HwnasLlamaConfig

    def __init__(self, config: HwnasLlamaConfig) -> None:
        super().__init__(config)
        if config.layer_shapes is not None:
            for i in range(config.num_hidden_layers):
                layer = LlamaDecoderLayer(config.layer_config(i), i)
                # The attention reads the attention implementation from its config at call time:
                # share the model's config so that switching it (export, sdpa/eager) reaches every layer.
                layer.self_attn.config = config
                layer.mlp.config = config
                self.model.layers[i] = layer
            self.post_init()


AutoConfig.register(HwnasLlamaConfig.model_type, HwnasLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(HwnasLlamaConfig, HwnasLlamaForCausalLM, exist_ok=True)


def subnet_model_config(base: LlamaConfig, cfg: SubnetConfig, *, source: str | None = None) -> LlamaConfig:
    """The standalone config of sub-network `cfg` of a model with config `base`."""
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
    d = base.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "layer_shapes", "hwnas_subnet", "sliding_window"):
        d.pop(key, None)
    d.update(num_hidden_layers=cfg.depth, head_dim=head_dim)
    d["hwnas_subnet"] = {"source": source, **cfg.to_dict()}
    shapes = [dict(zip(_SHAPE_KEYS, s)) for s in zip(cfg.mlp, cfg.heads, cfg.kv_heads)]
    if cfg.is_uniform:
        d.update(shapes[0])
        out: LlamaConfig = LlamaConfig(**d)
        out.architectures = ["LlamaForCausalLM"]
    else:
        # The top-level sizes hold the largest layer so that tools reading them over-estimate, never under.
        d.update({k: max(s[k] for s in shapes) for k in _SHAPE_KEYS})
        out = HwnasLlamaConfig(layer_shapes=shapes, **d)
        out.architectures = ["HwnasLlamaForCausalLM"]
    return out


def model_class(config: LlamaConfig) -> type[LlamaForCausalLM]:
    return HwnasLlamaForCausalLM if isinstance(config, HwnasLlamaConfig) else LlamaForCausalLM
