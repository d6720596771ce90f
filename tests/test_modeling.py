import pytest
import torch

from hwnas import HwnasError, HwnasLlamaConfig, HwnasLlamaForCausalLM, SubnetConfig
from hwnas.modeling import subnet_model_config
from transformers import LlamaConfig

BASE = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2)


def test_heterogeneous_config_builds_each_layer_at_its_shape():
    cfg = SubnetConfig(3, (0, 2), (64, 128), (2, 4), (2, 2))
    config = subnet_model_config(BASE, cfg, source="base")
    assert isinstance(config, HwnasLlamaConfig) and config.num_hidden_layers == 2 and config.head_dim == 8
    assert config.intermediate_size == 128  # the top level holds the largest layer
    model = HwnasLlamaForCausalLM(config)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (64, 32)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)
    assert model.model.layers[1].self_attn.num_key_value_groups == 2
    assert model.model.layers[0].self_attn.config is config  # attention implementation switches reach every layer
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert config.hwnas_subnet["source"] == "base" and config.hwnas_subnet["layers"] == [0, 2]


def test_uniform_config_is_plain_llama():
    config = subnet_model_config(BASE, SubnetConfig(3, (1,), (64,), (2,), (2,)))
    assert type(config) is LlamaConfig and config.model_type == "llama"
    assert (config.intermediate_size, config.num_attention_heads, config.head_dim) == (64, 2, 8)


@pytest.mark.parametrize(
    "shapes, message",
    [
        ([{"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}], "1 layer_shapes for 2 layers"),
        ([{"intermediate_size": 64, "num_attention_heads": 3, "num_key_value_heads": 2}] * 2, "do not divide"),
        ([{"intermediate_size": "64", "num_attention_heads": 2, "num_key_value_heads": 2}] * 2, "positive ints"),
    ],
)
def test_bad_layer_shapes_are_refused(shapes, message):
    with pytest.raises(HwnasError, match=message):
        HwnasLlamaConfig(layer_shapes=shapes, num_hidden_layers=2)
