"""Shared fixtures: tiny random Llamas (GQA, MHA, biased/untied) with a small trained BPE tokenizer."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_REAL_HOME = Path(os.environ.get("HWNAS_HOME") or Path(__file__).resolve().parents[1] / ".cache" / "hwnas")


@pytest.fixture(scope="session", autouse=True)
def hwnas_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh hwnas folder per session; the converted default model is shared so it is built once."""
    home = tmp_path_factory.mktemp("hwnas_home")
    (_REAL_HOME / "models").mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(_REAL_HOME / "models", target_is_directory=True)
    os.environ["HWNAS_HOME"] = str(home)
    return home


def _tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "The capital of France is Paris. The capital of Italy is Rome.",
        "She looked at him and smiled, then walked to the door without a word.",
        "A small model learns the shape of language from many pages of books.",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(path)
    return fast


VARIANTS = {
    # grouped-query attention: 4 query heads in 2 KV groups
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    # multi-head attention (like LLaMA2-7B): heads are pruned as whole KV groups
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    # biases everywhere and an untied LM head
    "bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                 tie_word_embeddings=False),
}


def build_tiny(path: Path, variant: str = "gqa", seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(path)
    kwargs = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                  max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    kwargs.update(VARIANTS[variant])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    with torch.no_grad():  # non-trivial norms so that a reordering bug cannot hide behind all-ones weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {v: build_tiny(tmp_path_factory.mktemp(f"tiny_{v}"), v) for v in VARIANTS}


@pytest.fixture(scope="session")
def tiny_model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["gqa"]


@pytest.fixture(scope="session")
def train_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Training text for heals of the tiny models: 120 paragraphs of random words their tokenizer knows."""
    import random

    words = ("the capital of France is Paris Italy Rome she looked at him and smiled then walked to door without "
             "a word small model learns shape language from many pages books").split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("train_text") / "train.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "."
                                for _ in range(120)))
    return path


# A sub-network of the tiny MHA model whose layers keep 4, 2 and 1 whole KV groups (as on LLaMA2-7B).
PER_LAYER_KV = {"num_layers": 4, "layers": [0, 1, 3], "mlp": [256, 128, 192], "heads": [4, 2, 1], "kv_heads": [4, 2, 1]}


@pytest.fixture(scope="session")
def per_layer_kv_subnet(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    import json

    from hwnas.export import export_checkpoint

    d = tmp_path_factory.mktemp("kvsub")
    (d / "cfg.json").write_text(json.dumps(PER_LAYER_KV))
    export_checkpoint(model=str(tiny_models["mha"]), subnet=d / "cfg.json", out=d / "ckpt")
    return d / "ckpt"


@pytest.fixture(params=list(VARIANTS))
def variant_dir(request: pytest.FixtureRequest, tiny_models: dict[str, Path]) -> Path:
    return tiny_models[request.param]


@pytest.fixture
def run_cli(hwnas_home: Path):
    """Run `hwnas ...` in a subprocess; returns the CompletedProcess."""
    import subprocess

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "HWNAS_HOME": str(hwnas_home)}
        proc = subprocess.run([sys.executable, "-m", "hwnas.cli", *args], capture_output=True, text=True, env=env,
                              timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"hwnas {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session")
def tiny_tables(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Latency tables of the tiny GQA model, measured once: torch fp32 and onnxruntime fp32."""
    from hwnas.profile import profile

    d = tmp_path_factory.mktemp("tables")
    out = {}
    for runtime in ("torch", "onnxruntime"):
        out[runtime] = Path(profile(model=str(tiny_model), runtime=runtime, precision="fp32", calibration=3, warmup=1,
                                    repeats=5, out=d / f"{runtime}.json", progress=False)["table"])
    return out


@pytest.fixture(scope="session")
def width_table(tiny_tables: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's measured onnxruntime table with each attention and MLP entry rescaled to its block's width
    (query heads, MLP channels) against the widest of its phase, and no end-to-end correction.

    The tiny model's blocks are so narrow (MLP 64-256 channels) that their measured costs are within noise of
    each other (a session measured the 256-channel MLP's decode 33% below the 64-channel one's), so budgets
    that need narrowing to pay are not reliably there; tests of the pruning logic take this table instead."""
    import json
    import re

    t = json.loads(tiny_tables["onnxruntime"].read_text())
    for phase in {k.split("/")[1] for k in t["entries"]}:
        for pattern in (r"mlp\.i(\d+)", r"attn\.q(\d+)\.kv\d+"):
            width = {k: int(m.group(1)) for k in t["entries"]
                     if k.endswith("/" + phase) and (m := re.fullmatch(pattern, k.split("/")[0]))}
            widest = max(width, key=width.get)
            ref = dict(t["entries"][widest])
            for k, w in width.items():
                t["entries"][k].update({s: ref[s] * w / width[widest] for s in ("mean_ms", "median_ms")})
    t["calibration"] = []
    out = tmp_path_factory.mktemp("width_table") / "onnxruntime.json"
    out.write_text(json.dumps(t))
    return out


@pytest.fixture(scope="session")
def pruning_budget(tiny_model: Path, width_table: Path) -> float:
    """A decode budget (ms) of `width_table` that both pruning styles reach on the tiny model: halfway between
    the narrowest full-depth uniform model and the full model."""
    from hwnas.predictor import LatencyPredictor
    from hwnas.search import setup
    from hwnas.space import SubnetConfig

    p = LatencyPredictor.load(width_table)
    sp = setup(model=str(tiny_model), table=str(width_table))
    full, (heads, kv) = sp.supernet.search_space.max_config(), sp.encoder.head_options[0]
    n = full.depth
    narrow = SubnetConfig(n, full.layers, (min(sp.supernet.search_space.mlp_choices),) * n, (heads,) * n, (kv,) * n)
    return (p.latency_ms(narrow, "decode") + p.latency_ms(full, "decode")) / 2


@pytest.fixture(scope="session")
def tiny_int8_table(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An onnxruntime int8 table of the tiny GQA model (with its fp32-down_proj MLP variants), measured once."""
    from hwnas.profile import profile

    out = tmp_path_factory.mktemp("int8_table") / "onnxruntime-int8.json"
    return Path(profile(model=str(tiny_model), runtime="onnxruntime", precision="int8", calibration=1, warmup=1,
                        repeats=3, prefill=[16], decode=[16], out=out, progress=False)["table"])


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's matrices are too small to share between threads: one thread runs them fastest."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def export_subnets():
    """A function exporting each named sub-network config of a model as a checkpoint under a folder."""
    return _export_subnets


def _export_subnets(model: Path, folder: Path, configs: dict[str, dict]) -> dict[str, Path]:
    import json

    from hwnas.export import export_checkpoint

    out = {}
    for name, cfg in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        export_checkpoint(model=str(model), subnet=folder / f"{name}.json", out=folder / name)
        out[name] = folder / name
    return out
