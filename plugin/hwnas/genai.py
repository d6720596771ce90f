"""ONNX Runtime GenAI as a runtime hwnas measures, scores and builds for.

- `GenAILM`: a GenAI model folder (genai_config.json) run through og.Model / og.Generator, greedy, with the
  same reset()/run(ids) -> last logits interface as the benchmark's other runtimes (`append_tokens` then
  `get_logits`), so `hwnas benchmark` measures it beside ORT, OpenVINO and llama.cpp models in one run.
- `genai_nll`: mean NLL of token ids, in the windows of `hwnas.llamacpp.nll_windows` (every runtime is scored on
  the same predictions), from the generator's full `logits` output of each window.
- `build_genai`: GenAI's model builder (`python -m onnxruntime_genai.models.builder -m HF -o OUT -p int4 -e cpu`)
  on a Hugging Face `llama` folder. The builder of onnxruntime-genai 0.18.0 imports names that transformers 4.57
  lacks (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`) and reads the transformers 5
  `rope_parameters` of a config. `_SHIM` runs it in a subprocess with placeholder classes for the missing names
  (used only by other architectures' builders) and a config whose `rope_scaling` is null gets the default
  `rope_parameters`; tests/test_genai.py checks the fp32 build's logits against torch's.
  A heterogeneous hwnas sub-network (`hwnas_llama`, per-layer widths) is refused: the builder takes one width.

Nothing here imports torch at load time: the benchmark worker imports this module.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .common import HwnasError, atomic_dir, atomic_write_json, home
from .llamacpp import DEFAULT_CTX, check_ids, nll_report, nll_windows, token_nll

INSTALL = "pip install 'hwnas[edge]' (onnxruntime-genai==0.18.0, which runs on the pinned onnxruntime 1.32)"
PRECISIONS = ("int4", "int8", "fp32")
CONFIG = "genai_config.json"
BUILD_RECORD = "hwnas_genai_build.json"
# Run as `python -c _SHIM BUILDER-ARGS...`: the builder under transformers 4.57 (see the module docstring).
_SHIM = """import runpy, sys
import transformers
NAMES = ("Gemma3ForConditionalGeneration", "Lfm2VlForConditionalGeneration", "Mistral3ForConditionalGeneration",
         "Qwen2_5_VLForConditionalGeneration", "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
         "Qwen3VLForConditionalGeneration", "AutoModelForSpeechSeq2Seq", "Qwen2ForCausalLM")
missing = []
for name in NAMES:
    try:
        getattr(sys.modules["transformers"], name)
    except (AttributeError, ImportError, RuntimeError):
        missing.append(name)
t = sys.modules["transformers"]  # resolving a name can replace the lazy module: set the names on the final one
for name in missing:
    setattr(t, name, type(name, (), {"__doc__": "placeholder: not in this transformers"}))
load = t.AutoConfig.from_pretrained.__func__
def from_pretrained(cls, *args, **kwargs):
    cfg = load(cls, *args, **kwargs)
    if getattr(cfg, "rope_scaling", 0) is None:  # transformers 5 names these rope_parameters
        cfg.rope_scaling = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return cfg
t.AutoConfig.from_pretrained = classmethod(from_pretrained)
print("hwnas shim: placeholders for", missing, file=sys.stderr)
sys.argv = ["onnxruntime_genai.models.builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""


def require_genai() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise HwnasError(f"ONNX Runtime GenAI is not installed ({e}); run {INSTALL}") from None
    return og


def is_genai(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def genai_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        cfg["model"]["decoder"]["filename"], cfg["model"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HwnasError(f"{folder / CONFIG} is not a GenAI config ({type(e).__name__}: {e}); expected "
                         "model.decoder.filename and model.vocab_size") from None
    return cfg


def onnx_file(folder: Path) -> Path:
    """The decoder graph of a GenAI folder (its weights beside it)."""
    return folder / genai_config(folder)["model"]["decoder"]["filename"]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for n in ("onnxruntime-genai", "onnxruntime", "onnx", "hwnas"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def open_model(folder: str | Path, threads: int) -> Any:
    """og.Model of `folder` on the CPU with `threads` intra-op threads (a config overlay; the folder is not changed)."""
    og, folder = require_genai(), Path(folder)
    genai_config(folder)
    try:
        cfg = og.Config(str(folder))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        return og.Model(cfg)
    except Exception as e:  # og raises RuntimeError / OrtException with the reason
        raise HwnasError(f"ONNX Runtime GenAI cannot load {folder}: {type(e).__name__}: {e}") from None


class GenAILM:
    """A GenAI model as the benchmark runs it: a fresh greedy generator per reset(), tokens appended per run()."""

    def __init__(self, path: Path, threads: int, context: int | None = None) -> None:
        self.og = require_genai()
        self.model = open_model(path, threads)
        self.max_length = max(context or DEFAULT_CTX, 8)
        self.vocab = int(genai_config(path)["model"]["vocab_size"])
        self.info = {"intra_op_threads": threads, "max_length": self.max_length}

    def reset(self) -> None:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_length, do_sample=False)
        self.gen = self.og.Generator(self.model, params)

    def run(self, ids: np.ndarray) -> np.ndarray:
        self.gen.append_tokens(ids.astype(np.int32))
        return np.array(self.gen.get_logits()[0, -1], dtype=np.float32)


def genai_nll(folder: str | Path, token_ids: Sequence[int] | np.ndarray, *, threads: int = 2,
              ctx: int = DEFAULT_CTX) -> dict[str, Any]:
    """Mean NLL (nats) of a GenAI model over `token_ids` in windows of `ctx` tokens (`hwnas.llamacpp.nll_windows`).

    Returns {"nll", "tokens" (scored), "ctx", "per_token"}, as `hwnas.llamacpp.gguf_nll` does."""
    og, folder = require_genai(), Path(folder)
    model = open_model(folder, threads)
    ids = check_ids(token_ids, int(genai_config(folder)["model"]["vocab_size"]))
    per_token = []
    for start, end in nll_windows(len(ids), ctx):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ctx, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids[start:end].astype(np.int32)[None])
        logits = np.asarray(gen.get_output("logits"))[0]
        per_token.append(token_nll(logits[: end - start - 1], ids[start + 1: end]))
    return nll_report(per_token, ctx)


def build_genai(hf_dir: str | Path, out: str | Path, precision: str = "int4", *, overwrite: bool = False,
                timeout_s: float = 3600) -> dict[str, Any]:
    """GenAI's model builder on a Hugging Face `llama` folder, for the CPU at `precision` (int4, int8 or fp32).

    Runs the builder of the installed onnxruntime-genai in a subprocess through `_SHIM` (this environment's
    transformers 4.57); its log is kept as OUT/builder.log and what was run as OUT/hwnas_genai_build.json."""
    if precision not in PRECISIONS:
        raise HwnasError(f"unknown GenAI precision {precision!r}; expected one of {list(PRECISIONS)}")
    hf_dir = Path(hf_dir).expanduser().resolve()
    if not (hf_dir / "config.json").is_file():
        raise HwnasError(f"{hf_dir} has no config.json; expected a Hugging Face llama checkpoint folder")
    model_type = json.loads((hf_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type == "hwnas_llama":
        raise HwnasError(f"{hf_dir} is a heterogeneous hwnas sub-network (per-layer widths); the GenAI builder "
                         "takes one width for every layer: build GenAI models of uniform (`llama`) sub-networks only, "
                         "and deploy this one with `hwnas quantize` (ONNX Runtime or OpenVINO)")
    if model_type != "llama":
        raise HwnasError(f"{hf_dir} holds a {model_type!r} model; expected a `llama` checkpoint")
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise HwnasError(f"ONNX Runtime GenAI is not installed; run {INSTALL}")
    cmd_args = ["-m", str(hf_dir), "-i", str(hf_dir), "-p", precision, "-e", "cpu"]
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        log = tmp / "builder.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [sys.executable, "-c", _SHIM, *cmd_args, "-o", str(tmp), "-c", str(home() / "genai-cache")]
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0 or not is_genai(tmp):
            tail = log.read_text(errors="replace")[-2000:].strip()
            raise HwnasError(f"the GenAI builder failed on {hf_dir} ({precision}, exit {rc}):\n{tail}")
        record = {"source": str(hf_dir), "precision": precision, "execution_provider": "cpu",
                  "command": "python -c hwnas.genai._SHIM " + " ".join(cmd_args) + " -o OUT",
                  "shim": "placeholders for transformers names the builder imports but llama does not use; "
                          "rope_scaling null -> rope_parameters default",
                  "seconds": round(time.perf_counter() - t0, 1), "versions": versions()}
        atomic_write_json(tmp / BUILD_RECORD, record)
    return {**record, "out": str(Path(out).resolve())}
