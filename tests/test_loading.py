import json
import shutil

import pytest

from hwnas import HwnasError
from hwnas.loading import load_model, read_llama_config, resolve_model


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_a_llama_folder_with_its_tokenizer(tiny_model):
    model, tok = load_model(tiny_model)
    assert model.config.model_type == "llama" and tok is not None and not model.training


def test_missing_path_and_file_paths(tmp_path):
    with pytest.raises(HwnasError, match="neither 'smollm2-135m' nor an existing folder"):
        resolve_model(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(HwnasError, match="is a file"):
        resolve_model(f)
    with pytest.raises(HwnasError, match="has no config.json"):
        load_model(tmp_path)


def test_not_a_llama(tiny_model, tmp_path):
    d = copy_model(tiny_model, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(HwnasError, match="holds a 'gpt2' model; expected a Llama"):
        load_model(d)
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "sliding_window": 4096}))
    with pytest.raises(HwnasError, match="sliding_window=4096"):
        read_llama_config(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(HwnasError, match="not valid JSON"):
        load_model(d)


def test_mistral_without_sliding_window_loads_as_llama(tiny_model, tmp_path):
    d = copy_model(tiny_model, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "sliding_window": None,
                                               "architectures": ["MistralForCausalLM"]}))
    model, _ = load_model(d)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_weights_only_from_safetensors(tiny_model, tmp_path):
    d = copy_model(tiny_model, tmp_path / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(HwnasError, match=r"no \*.safetensors weights \(\['pytorch_model.bin'\]\)"):
        load_model(d)


def test_corrupted_weights(tiny_model, tmp_path):
    d = copy_model(tiny_model, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HwnasError, match="cannot load the weights"):
        load_model(d)


def test_unknown_dtype(tiny_model):
    with pytest.raises(HwnasError, match="unknown dtype 'float13'"):
        load_model(tiny_model, dtype="float13")
