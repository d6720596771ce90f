"""hwnas.gguf_export: GGUF files that llama.cpp reads, with torch's logits and the HF tokenizer's ids."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hwnas import HwnasError
from hwnas.gguf_export import GGUF_TYPES, export_gguf, tokenizer_kind

IDS = [5, 17, 42, 100, 7, 250, 3, 64]
TEXT = "The capital of France is Paris. 12345 naïve  café\n"


def read(path: Path) -> tuple[dict, dict]:
    """(metadata without the vocabulary arrays, {tensor name: (ggml shape, type name)}) of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                                    "tokenizer.ggml.token_type")}
    return kv, {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in r.tensors}


def torch_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch

    from hwnas.loading import load_model

    model, _ = load_model(model_dir, allow_subnet=True)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_run(path: Path, ids: list[int] | None = None, text: str | None = None):
    """(logits of `ids`, llama.cpp's ids of `text`) from the GGUF at `path`."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_threads=2, verbose=False, n_ctx=128)
    try:
        logits = None
        if ids is not None:
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids)])
        toks = llm.tokenize(text.encode(), add_bos=False, special=False) if text is not None else None
        return logits, toks
    finally:
        llm.close()


def test_uniform_model_is_arch_llama(tiny_model, tmp_path):
    s = export_gguf(tiny_model, tmp_path / "m.gguf", gguf_type="f16")
    assert (s["arch"], s["type"], s["layers"], s["quantizer"]) == ("llama", "f16", 4, "gguf.quants")
    assert s["bytes"] == (tmp_path / "m.gguf").stat().st_size and json.dumps(s)
    kv, tensors = read(tmp_path / "m.gguf")
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert kv["general.architecture"] == "llama" and kv["llama.block_count"] == 4
    assert (kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]) == (4, 2)
    assert (kv["llama.feed_forward_length"], kv["llama.embedding_length"], kv["llama.attention.key_length"]) == \
        (256, 64, 16)
    assert kv["llama.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
    assert kv["llama.context_length"] == 256 and kv["llama.vocab_size"] == cfg["vocab_size"]
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert kv["tokenizer.ggml.eos_token_id"] == cfg["eos_token_id"]
    assert tensors["token_embd.weight"] == ((64, cfg["vocab_size"]), "F16")
    assert tensors["blk.0.attn_k.weight"] == ((64, 32), "F16") and tensors["blk.3.ffn_down.weight"][0] == (256, 64)
    assert tensors["blk.0.attn_norm.weight"] == ((64,), "F32")
    assert "output.weight" not in tensors  # tied: llama.cpp reads the head from token_embd


def test_heterogeneous_subnet_is_arch_deci_with_per_layer_arrays(per_layer_kv_subnet, tmp_path):
    s = export_gguf(per_layer_kv_subnet, tmp_path / "m.gguf", gguf_type="q8_0")
    assert (s["arch"], s["layers"], s["uniform"]) == ("deci", 3, False)
    kv, tensors = read(tmp_path / "m.gguf")
    assert kv["general.architecture"] == "deci" and kv["deci.block_count"] == 3
    assert kv["deci.attention.head_count"] == [4, 2, 1] and kv["deci.attention.head_count_kv"] == [4, 2, 1]
    assert kv["deci.feed_forward_length"] == [256, 128, 192] and kv["deci.attention.key_length"] == 16
    assert tensors["blk.1.attn_q.weight"] == ((64, 32), "Q8_0")
    assert tensors["blk.2.ffn_up.weight"] == ((64, 192), "Q8_0")
    # o_proj of the one-head layer has rows of 16 values, which q8_0 cannot hold: f16, as llama.cpp does
    assert tensors["blk.2.attn_output.weight"] == ((16, 64), "F16")
    assert s["f16_fallback"] == ["blk.2.attn_output.weight"]


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
@pytest.mark.parametrize("which", ["gqa", "mha", "bias", "subnet"])
def test_llama_cpp_matches_torch(which, gguf_type, tiny_models, per_layer_kv_subnet, tmp_path):
    src = per_layer_kv_subnet if which == "subnet" else tiny_models[which]
    out = tmp_path / "m.gguf"
    export_gguf(src, out, gguf_type=gguf_type)
    ref = torch_logits(src, IDS)
    got, ids = llama_cpp_run(out, IDS, TEXT)
    diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    if gguf_type == "f16":  # the tiny models' logits reach about 7; f16 weights move them by about 0.02
        assert diff < 0.06, diff
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    else:  # q8_0 weights of these random (std 0.2) models alone move the logits by about 0.3 in torch
        assert diff < 0.1 * scale, (diff, scale)
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.99
    from transformers import AutoTokenizer

    assert ids == AutoTokenizer.from_pretrained(src)(TEXT)["input_ids"]  # the tiny tokenizer is GPT-2 byte-level


def test_q4_uses_llama_cpp_when_installed_else_gguf_quants(tiny_model, tmp_path, monkeypatch):
    import hwnas.gguf_export as ge

    monkeypatch.setattr(ge, "_llama_cpp", lambda: None)
    s = export_gguf(tiny_model, tmp_path / "np.gguf", gguf_type="q4_1")
    assert s["quantizer"] == "gguf.quants" and s["tensor_types"] == {"f32": 9, "q4_1": 29}
    monkeypatch.undo()
    pytest.importorskip("llama_cpp")
    s = export_gguf(tiny_model, tmp_path / "cpp.gguf", gguf_type="q4_0")
    assert s["quantizer"] == "llama.cpp" and s["tensor_types"]["q4_0"] >= 28 and s["tensor_types"]["f32"] == 9
    ref = torch_logits(tiny_model, IDS)
    for f in ("np.gguf", "cpp.gguf"):
        got, _ = llama_cpp_run(tmp_path / f, IDS)
        # 4 bits on a random model: loose (about 0.8), but not noise
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.6


def test_bad_type_and_existing_output(tiny_model, tmp_path):
    with pytest.raises(HwnasError, match=r"unknown gguf_type 'q5_k'; expected one of \['f16', 'q8_0'"):
        export_gguf(tiny_model, tmp_path / "m.gguf", gguf_type="q5_k")
    assert set(GGUF_TYPES) == {"f16", "q8_0", "q4_0", "q4_1"}
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(HwnasError, match=r"m.gguf is an existing file; pass --overwrite"):
        export_gguf(tiny_model, tmp_path / "m.gguf")
    assert (tmp_path / "m.gguf").read_bytes() == b"old"
    s = export_gguf(tiny_model, tmp_path / "m.gguf", overwrite=True)
    assert s["type"] == "q8_0" and (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporaries left


def test_tokenizer_that_cannot_be_converted(tiny_model, tmp_path):
    d = shutil.copytree(tiny_model, tmp_path / "m")
    tok = json.loads((d / "tokenizer.json").read_text())
    # what hwnas wrote for the default model before: byte-level pieces with a sentencepiece byte fallback
    old = {**tok, "model": {**tok["model"], "byte_fallback": True},
           "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, tok["decoder"]]}}
    (d / "tokenizer.json").write_text(json.dumps(old))
    with pytest.raises(HwnasError, match=r"tokenizer cannot be converted.*byte_fallback True.*\['ByteLevel'\]"):
        export_gguf(d, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(HwnasError, match=r"model WordPiece"):
        tokenizer_kind({**tok, "model": {"type": "WordPiece"}})
    assert tokenizer_kind(tok) == ("gpt2", "gpt-2")
    digits = {**tok, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, tok["pre_tokenizer"]]}}
    assert tokenizer_kind(digits) == ("gpt2", "smollm")
    spm = {"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": None, "decoder": {"type": "Sequence"},
           "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                              {"type": "Replace", "pattern": {"String": " "},
                                                               "content": "\u2581"}]}}
    assert tokenizer_kind(spm) == ("llama", "default")


# ------------------------------------------------------------------------------ the real default model
@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_default_model_logits_and_token_ids(gguf_type, tmp_path):
    from transformers import AutoTokenizer

    from hwnas.loading import resolve_model

    src = resolve_model("smollm2-135m")
    s = export_gguf("smollm2-135m", tmp_path / "m.gguf", gguf_type=gguf_type)
    kv, _ = read(tmp_path / "m.gguf")
    assert (s["arch"], kv["tokenizer.ggml.pre"], kv["tokenizer.ggml.eos_token_id"]) == ("llama", "smollm", 2)
    ids = AutoTokenizer.from_pretrained(src)(TEXT)["input_ids"]
    got, cpp_ids = llama_cpp_run(tmp_path / "m.gguf", ids, TEXT)
    assert cpp_ids == ids
    ref = torch_logits(src, ids)
    diff, agree = float(np.abs(got - ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"default model {gguf_type}: max logit diff {diff:.3f} (logits up to {np.abs(ref).max():.1f}), "
          f"argmax agreement {agree:.3f}")
    # llama.cpp also rounds the activations (to f16, or q8 blocks for q8_0 weights)
    assert agree >= (0.99 if gguf_type == "f16" else 0.9) and diff < (0.6 if gguf_type == "f16" else 2.5)


@pytest.mark.slow
def test_default_subnet_deci_logits_and_token_ids(tmp_path):
    import hwnas
    from transformers import AutoTokenizer

    from hwnas.export import export_checkpoint
    from hwnas.supernet import Calibration

    sn = hwnas.Supernet.from_pretrained("smollm2-135m", calibration=Calibration(2, 32))
    keep = tuple(range(0, 30, 2))
    cfg = hwnas.SubnetConfig(30, keep, tuple([1536, 1024, 768] * 5), tuple([9, 6, 3] * 5), (3,) * 15)
    cfg.to_json(tmp_path / "cfg.json")
    export_checkpoint(model="smollm2-135m", subnet=tmp_path / "cfg.json", out=tmp_path / "sub", supernet=sn)
    s = export_gguf(tmp_path / "sub", tmp_path / "m.gguf", gguf_type="f16")
    assert s["arch"] == "deci" and s["layers"] == 15
    ids = AutoTokenizer.from_pretrained(tmp_path / "sub")(TEXT)["input_ids"]
    got, cpp_ids = llama_cpp_run(tmp_path / "m.gguf", ids, TEXT)
    assert cpp_ids == ids
    ref = torch_logits(tmp_path / "sub", ids)
    diff, agree = float(np.abs(got - ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"default sub-network f16 (deci): max logit diff {diff:.3f}, argmax agreement {agree:.3f}")
    assert agree >= 0.9 and diff < 0.6  # half the layers gone: flatter logits, so near ties


def test_cli_writes_json_only_and_refuses_to_clobber(run_cli, tiny_model, tmp_path):
    out = tmp_path / "m.gguf"
    proc = run_cli("gguf", "--model", str(tiny_model), "--out", str(out), "--type", "f16")
    summary = json.loads(proc.stdout)  # stdout is the JSON result only
    assert summary["arch"] == "llama" and summary["type"] == "f16" and summary["bytes"] == out.stat().st_size
    before = out.read_bytes()
    proc = run_cli("gguf", "--model", str(tiny_model), "--out", str(out), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("hwnas: error:") and "--overwrite" in proc.stderr
    assert out.read_bytes() == before
    proc = run_cli("gguf", "--model", str(tiny_model), "--out", str(out), "--type", "q3_k", check=False)
    assert proc.returncode == 2 and "invalid choice: 'q3_k'" in proc.stderr
