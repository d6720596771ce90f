"""Export a Llama checkpoint or an hwnas sub-network as a GGUF file for llama.cpp.

A uniform model becomes arch `llama`; a heterogeneous sub-network (per-layer MLP widths and head counts) becomes
arch `deci`, llama.cpp's DeciLM/Nemotron support, whose head counts and MLP widths are per-layer arrays. Weights
are read only from safetensors. f16 and q8_0 are written with the `gguf` package's own quantizer; q4_0 and q4_1
go through llama.cpp's `llama_model_quantize` (llama-cpp-python) when it is installed, else through `gguf.quants`.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from .common import HwnasError, atomic_file, prepare_output
from .llamacpp import quantize_gguf
from .loading import read_llama_config, resolve_model

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "q8_0", "q4_0", "q4_1")
_BLOCK = 32  # q8_0, q4_0 and q4_1 quantize rows in blocks of 32 values
# HF name -> llama.cpp name: the model's own tensors, then each decoder layer's (as blk.N.<name>)
_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
}


def export_gguf(model: str | Path, out: str | Path, *, gguf_type: str = "q8_0", overwrite: bool = False) -> dict:
    """Write the checkpoint folder `model` (plain `llama` or an `hwnas_llama` sub-network) to the GGUF file `out`.

    Norms and other 1-D tensors stay f32. A 2-D weight whose rows are not a multiple of 32 values cannot hold
    q8_0/q4_0/q4_1 and is written f16, as llama.cpp's converter and quantizer do; the summary lists those under
    `f16_fallback`. The file appears in one rename when complete. Returns a JSON-able summary.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise HwnasError(f"unknown gguf_type {gguf_type!r}; expected one of {list(GGUF_TYPES)}")
    path = resolve_model(model)
    cfg = read_llama_config(path, allow_subnet=True)
    out = Path(out).expanduser().resolve()
    if out.is_dir():
        raise HwnasError(f"out {out} is a folder; expected the path of a .gguf file")
    if not overwrite:
        prepare_output(out, overwrite=False, option="out")
    shapes = layer_shapes(cfg)
    uniform = all(s == shapes[0] for s in shapes)
    arch = "llama" if uniform else "deci"
    llama_cpp = _llama_cpp() if gguf_type in ("q4_0", "q4_1") else None
    quantizer = "llama.cpp" if llama_cpp is not None else "gguf.quants"
    direct = "f16" if llama_cpp is not None else gguf_type

    with atomic_file(out) as tmp:
        mid = tmp.with_name(tmp.name[:-len(".tmp")] + "-f16.tmp")  # the f16 file llama.cpp's quantizer reads
        try:
            writer = gguf.GGUFWriter(mid if llama_cpp is not None else tmp, arch)
            _write_params(writer, cfg, shapes, uniform, _file_type(gguf, direct), name=path.name)
            tokenizer = _write_tokenizer(writer, path, cfg["vocab_size"])
            fallback = _write_tensors(writer, path, cfg, shapes, direct)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            if llama_cpp is not None:
                quantize_gguf(mid, tmp, gguf_type, threads=max(1, min(4, os.cpu_count() or 1)))
            types = Counter(t.tensor_type.name.lower() for t in gguf.GGUFReader(tmp).tensors)
        finally:
            mid.unlink(missing_ok=True)
    return {
        "model": str(model), "out": str(out), "arch": arch, "type": gguf_type, "bytes": out.stat().st_size,
        "layers": len(shapes), "quantizer": quantizer, "tokenizer": tokenizer, "uniform": uniform,
        "layer_shapes": shapes, "tensor_types": dict(sorted(types.items())), "f16_fallback": fallback,
    }


def layer_shapes(cfg: dict) -> list[dict[str, int]]:
    """Each decoder layer's MLP width, query heads and KV heads, from a `llama` or `hwnas_llama` config."""
    keys = ("intermediate_size", "num_attention_heads", "num_key_value_heads")
    if cfg.get("layer_shapes"):
        return [{k: int(s[k]) for k in keys} for s in cfg["layer_shapes"]]
    one = {k: int(cfg.get(k) or cfg["num_attention_heads"]) for k in keys}  # no KV heads given: MHA
    return [dict(one) for _ in range(cfg["num_hidden_layers"])]


def _head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def _file_type(gguf: Any, gguf_type: str) -> int:
    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[gguf_type]


def _write_params(writer: Any, cfg: dict, shapes: list[dict], uniform: bool, file_type: int, *, name: str) -> None:
    if cfg.get("rope_scaling"):
        raise HwnasError(f"rope_scaling {cfg['rope_scaling']} is not supported by the GGUF export; expected a model "
                         "without rope scaling (rope_scaling null)")
    per_layer = (lambda k: shapes[0][k]) if uniform else (lambda k: [s[k] for s in shapes])
    head_dim = _head_dim(cfg)
    writer.add_name(name)
    writer.add_block_count(len(shapes))
    writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_feed_forward_length(per_layer("intermediate_size"))
    writer.add_head_count(per_layer("num_attention_heads"))
    writer.add_head_count_kv(per_layer("num_key_value_heads"))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_file_type(file_type)


# ------------------------------------------------------------------------------ tokenizer
def tokenizer_kind(tok: dict) -> tuple[str, str]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre) of a tokenizer.json: GPT-2 byte-level BPE ('gpt2' with pre 'gpt-2'
    or, digits split one by one, 'smollm') or a LLaMA2 sentencepiece-style BPE ('llama', 'default')."""
    model, pre, norm = tok.get("model") or {}, tok.get("pre_tokenizer") or {}, tok.get("normalizer") or {}
    decoder = (tok.get("decoder") or {}).get("type")
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    kinds = [p.get("type") for p in pres]
    byte_level = kinds and kinds[-1] == "ByteLevel" and pres[-1].get("use_regex", True) \
        and not pres[-1].get("add_prefix_space")
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel" and not norms:
        if byte_level and kinds == ["ByteLevel"]:
            return "gpt2", "gpt-2"
        if byte_level and kinds == ["Digits", "ByteLevel"] and pres[0].get("individual_digits"):
            return "gpt2", "smollm"
    spm_norm = any(n.get("type") in ("Replace", "Prepend") and "\u2581" in json.dumps(n, ensure_ascii=False)
                   for n in norms)
    if model.get("type") == "BPE" and model.get("byte_fallback") and decoder == "Sequence" and \
            (spm_norm or kinds == ["Metaspace"]) and "ByteLevel" not in kinds:
        return "llama", "default"
    found = (f"model {model.get('type')} (byte_fallback {bool(model.get('byte_fallback'))}), pre-tokenizer "
             f"{kinds or None}, normalizer {[n.get('type') for n in norms] or None}, decoder {decoder}")
    raise HwnasError(f"a model whose tokenizer cannot be converted to GGUF: its tokenizer.json has {found}; expected "
                     "a GPT-2 byte-level BPE (pre-tokenizer ByteLevel, or Digits(individual) + ByteLevel; decoder "
                     "ByteLevel; no byte fallback) or a LLaMA2 sentencepiece-style BPE (byte fallback, Metaspace or "
                     "a '\u2581' Replace normalizer)")


def _write_tokenizer(writer: Any, path: Path, vocab_size: int) -> str:
    import gguf

    file = path / "tokenizer.json"
    if not file.is_file():
        raise HwnasError(f"{path} has no tokenizer.json; the GGUF export needs the model's fast tokenizer")
    tok = json.loads(file.read_text(encoding="utf-8"))
    model, pre = tokenizer_kind(tok)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    if model == "llama":
        vocab = gguf.LlamaHfVocab(path)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        gguf.SpecialVocab(path, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        return f"{model}/{pre}"
    ids = {t: i for t, i in tok["model"]["vocab"].items()}
    kinds = {}
    for added in tok.get("added_tokens") or []:
        ids[added["content"]] = added["id"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(ids.values()) >= vocab_size:
        raise HwnasError(f"{file} has token id {max(ids.values())}; expected ids below the model's vocab_size "
                         f"{vocab_size}")
    by_id = {i: t for t, i in ids.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [kinds.get(i, gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED) for i in range(vocab_size)]
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(path, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return f"{model}/{pre}"


# ------------------------------------------------------------------------------ tensors
def _tensors(path: Path) -> Iterator[tuple[str, Any]]:
    """(name, float32 numpy array) of every tensor in the folder's safetensors files."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HwnasError(f"{path} has no *.safetensors weights; hwnas reads weights only from safetensors")
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name).float().numpy()


def _permute(w: Any, n_head: int) -> Any:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved rope pairs (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tensors(writer: Any, path: Path, cfg: dict, shapes: list[dict], gguf_type: str) -> list[str]:
    import gguf
    import numpy as np

    qtype = getattr(gguf.GGMLQuantizationType, gguf_type.upper())
    fallback, seen = [], set()
    for hf, data in _tensors(path):
        if "rotary_emb" in hf:
            continue
        if hf == "lm_head.weight" and cfg.get("tie_word_embeddings", True):
            continue  # llama.cpp reads the tied head from token_embd, as the converter writes it
        name = _NAMES.get(hf)
        parts = hf.split(".")
        if name is None and hf.startswith("model.layers.") and ".".join(parts[3:]) in _LAYER_NAMES:
            i, shape = int(parts[2]), shapes[int(parts[2])]
            name = f"blk.{i}.{_LAYER_NAMES['.'.join(parts[3:])]}"
            if parts[4] == "q_proj":
                data = _permute(data, shape["num_attention_heads"])
            elif parts[4] == "k_proj":
                data = _permute(data, shape["num_key_value_heads"])
        if name is None:
            raise HwnasError(f"{path}: tensor {hf!r} {tuple(data.shape)} has no GGUF name; expected a Llama "
                             "checkpoint (embed_tokens, norm, lm_head and decoder layers' attention and MLP)")
        seen.add(name)
        data = np.ascontiguousarray(data, dtype=np.float32)
        if data.ndim <= 1 or name.endswith("_norm.weight"):
            writer.add_tensor(name, data)
            continue
        t = qtype
        if t != gguf.GGMLQuantizationType.F16 and data.shape[-1] % _BLOCK:
            fallback.append(name)
            logger.warning("%s %s: rows of %d values are not a multiple of %d, needed by %s; writing f16",
                           name, tuple(data.shape), data.shape[-1], _BLOCK, gguf_type)
            t = gguf.GGMLQuantizationType.F16
        writer.add_tensor(name, gguf.quants.quantize(data, t), raw_dtype=t)
    if "token_embd.weight" not in seen:
        raise HwnasError(f"{path} has no model.embed_tokens.weight; expected a complete Llama checkpoint")
    return fallback
