"""ONNX Runtime GenAI: folder detection, missing package, refusals of the builder; the builder (through its shim),
the reset/run interface and genai_nll against torch on the tiny model (slow)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hwnas.benchmark import locate
from hwnas.common import HwnasError
from hwnas.genai import build_genai

CONFIG = {"model": {"decoder": {"filename": "model.onnx"}, "vocab_size": 320}}


def test_a_genai_folder_is_its_own_runtime(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "model.onnx").write_bytes(b"")  # its graph takes GenAI's inputs: never offered to onnxruntime
    assert locate(tmp_path) == ("ortgenai", tmp_path)
    with pytest.raises(HwnasError, match="--runtime onnxruntime does not fit .*ONNX Runtime GenAI model"):
        locate(tmp_path, "onnxruntime")
    (tmp_path / "genai_config.json").write_text("{}")
    from hwnas.genai import onnx_file

    with pytest.raises(HwnasError, match="is not a GenAI config .*expected model.decoder.filename"):
        onnx_file(tmp_path)


def test_missing_genai_names_the_install(monkeypatch, tmp_path, tiny_model):
    from hwnas import genai

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if not installed
    (tmp_path / "genai_config.json").write_text(json.dumps(CONFIG))
    for call in (genai.require_genai, lambda: genai.genai_nll(tmp_path, [1, 2]), lambda: genai.GenAILM(tmp_path, 1),
                 lambda: build_genai(tiny_model, tmp_path / "out", "int4")):
        with pytest.raises(HwnasError, match=r"pip install 'hwnas\[edge\]' \(onnxruntime-genai==0\.18\.0"):
            call()
    assert not (tmp_path / "out").exists()


def test_builder_refuses_what_it_cannot_build(per_layer_kv_subnet, tiny_model, tmp_path):
    with pytest.raises(HwnasError, match="heterogeneous hwnas sub-network .*takes one width for every layer"):
        build_genai(per_layer_kv_subnet, tmp_path / "out")
    with pytest.raises(HwnasError, match=r"unknown GenAI precision 'int2'; expected one of \['int4', 'int8', 'fp32'\]"):
        build_genai(tiny_model, tmp_path / "out", "int2")
    with pytest.raises(HwnasError, match="has no config.json"):
        build_genai(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_genai(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny model built by GenAI's builder in fp32 and int8."""
    pytest.importorskip("onnxruntime_genai")
    d = tmp_path_factory.mktemp("genai")
    return {p: Path(build_genai(tiny_model, d / p, p)["out"]) for p in ("fp32", "int8")}


def test_builder_output_matches_torch(tiny_model, tiny_genai, tmp_path):
    """fp32 through the shim gives torch's logits, step by step with the KV cache and after a reset; genai_nll equals
    torch's NLL on the same windows; an existing output is refused without overwrite."""
    import torch

    from hwnas.genai import GenAILM, genai_nll
    from hwnas.llamacpp import nll_windows, token_nll
    from hwnas.loading import load_model

    record = json.loads((tiny_genai["fp32"] / "hwnas_genai_build.json").read_text())
    assert record["precision"] == "fp32" and "-p fp32 -e cpu" in record["command"]
    assert (tiny_genai["fp32"] / "builder.log").read_text().count("placeholders for") == 1
    model = load_model(tiny_model)[0]
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 20))
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids)).logits[0].numpy()
    lm = GenAILM(tiny_genai["fp32"], 1, context=24)
    lm.reset()
    out = np.stack([lm.run(ids[:, :10])] + [lm.run(ids[:, t:t + 1]) for t in range(10, 20)])
    assert np.abs(out - ref[9:20]).max() < 1e-3 and lm.vocab == model.config.vocab_size
    lm.reset()
    assert np.abs(lm.run(ids[:, :10]) - out[0]).max() < 1e-5

    text = ids[0].tolist()
    nll = genai_nll(tiny_genai["fp32"], text, threads=1, ctx=8)
    with torch.inference_mode():
        want = np.concatenate([token_nll(model(torch.tensor([text[s:e]])).logits[0].numpy()[: e - s - 1],
                                         np.array(text[s + 1:e])) for s, e in nll_windows(20, 8)])
    assert nll["tokens"] == len(want) == 17 and np.allclose(nll["per_token"], want, atol=1e-3)
    with pytest.raises(HwnasError, match="is not empty; pass --overwrite"):
        build_genai(tiny_model, tiny_genai["fp32"], "fp32")


@pytest.mark.slow
def test_genai_interleaves_with_onnxruntime_in_one_benchmark(tiny_model, tiny_genai, tmp_path):
    from hwnas.benchmark import benchmark
    from hwnas.export import export_onnx
    from hwnas.loading import load_model

    export_onnx(load_model(tiny_model)[0], tmp_path / "onnx")
    report = benchmark([tmp_path / "onnx", tiny_genai["fp32"], tiny_genai["int8"]], prompt_tokens=12, new_tokens=5,
                       threads=1, repeats=1, rounds=2, warmup=0, progress=False)
    ort, fp32, int8 = report["models"]
    assert [m["runtime"] for m in report["models"]] == ["onnxruntime", "ortgenai", "ortgenai"]
    assert fp32["greedy_tokens"] == ort["greedy_tokens"] and fp32["greedy_tokens_repeatable"]
    assert fp32["runtime_info"]["max_length"] == 17 and report["versions"]["onnxruntime-genai"] == "0.18.0"
    assert int8["weights_read_bytes"] < fp32["weights_read_bytes"] and int8["file_bytes"] < fp32["file_bytes"]
    assert all(m[k]["median"] > 0 for m in report["models"] for k in ("prefill_ms", "decode_ms_per_token"))


TEXT = "The capital of France is Paris. 12345 naïve  café\n"


def genai_ids(folder: Path, text: str) -> list[int]:
    import onnxruntime_genai as og

    return [int(i) for i in og.Tokenizer(og.Model(str(folder))).encode(text)]


def test_genai_tokenizes_as_the_checkpoint_does(tiny_model, tiny_genai):
    from transformers import AutoTokenizer

    assert genai_ids(tiny_genai["fp32"], TEXT) == AutoTokenizer.from_pretrained(tiny_model)(TEXT)["input_ids"]


@pytest.mark.slow
def test_default_model_tokenizer_round_trips_through_genai(tmp_path):
    """The default model's tokenizer (rebuilt as GPT-2 BPE with the smollm pre-tokenizer) gives GenAI's tokenizer
    the same ids; the byte-fallback one transformers makes from the GGUF gave -1 ids there."""
    from transformers import AutoTokenizer

    from hwnas.loading import resolve_model

    src = resolve_model("smollm2-135m")
    out = Path(build_genai(src, tmp_path / "genai", "int4")["out"])
    assert genai_ids(out, TEXT) == AutoTokenizer.from_pretrained(src)(TEXT)["input_ids"]
