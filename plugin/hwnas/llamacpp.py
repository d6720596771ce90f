"""llama.cpp (through llama-cpp-python) as a runtime hwnas measures: GGUF files beside ORT and OpenVINO models.

`hwnas benchmark --model FILE.gguf` (or a folder holding exactly one .gguf) runs the file in `LlamaCppLM`, the
same reset()/run(ids) -> last logits interface as the other runtimes, so prefill, TTFT, decode, peak RSS and
size come out the same way and interleave with ORT/OpenVINO models in one run. `gguf_nll` scores held-out
token ids with it, in the windows `nll_windows` cuts (shared with `hwnas.genai`, so every runtime is scored on
the same predictions). `quantize_gguf` is llama.cpp's own quantizer (`llama_model_quantize`).

This module imports only numpy and hwnas.common at load time: the benchmark worker imports it without torch.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .common import HwnasError

INSTALL = ("pip install 'hwnas[edge]' (llama-cpp-python==0.3.36, built from source); on a CPU with AMX build it "
           'with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON '
           '-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF" (the default build enables AMX_INT8 and crashes on the first '
           "decode)")
GGUF_TYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # llama_ftype values of llama.h
DEFAULT_CTX = 512
SEED = 0


def require_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise HwnasError(f"llama.cpp is not installed ({e}); run {INSTALL}") from None
    return llama_cpp


def check_gguf(path: str | Path) -> Path:
    """`path` as a Path, once its first bytes are GGUF's magic."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise HwnasError(f"cannot read {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise HwnasError(f"{path} is not a GGUF file (it starts {magic!r}, expected b'GGUF')")
    return path


def gguf_file(folder: Path) -> Path | None:
    """The one .gguf file of `folder`, None when it holds none; several are an error."""
    files = sorted(folder.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise HwnasError(f"{folder} holds several GGUF files ({names}); pass the file itself")
    return files[0] if files else None


def gguf_sizes(path: Path) -> dict[str, int]:
    """`file_bytes` and `weights_read_bytes` (what one decode step reads) of a GGUF file: every tensor whole, but
    the token embedding, of which one row is read, unless it is also the LM head (no `output.weight`)."""
    from gguf import GGUFReader

    check_gguf(path)
    try:
        tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    except Exception as e:  # a truncated file surfaces as many exception types
        raise HwnasError(f"cannot read {path} as a GGUF file: {type(e).__name__}: {e}") from None
    read = 0
    for name, t in tensors.items():
        rows = int(t.n_elements) // int(t.shape[0]) if len(t.shape) > 1 else 1
        tied = name == "token_embd.weight" and "output.weight" not in tensors
        read += int(t.n_bytes) if tied or name != "token_embd.weight" else int(t.n_bytes) // rows
    return {"file_bytes": path.stat().st_size, "weights_read_bytes": read}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for n in ("llama-cpp-python", "gguf", "hwnas"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def open_gguf(path: str | Path, *, threads: int, ctx: int, logits_all: bool) -> Any:
    """A `llama_cpp.Llama` on `path` whose context and batch hold `ctx` tokens (one batch per prompt)."""
    llama_cpp = require_llama_cpp()
    path = check_gguf(path)
    try:
        return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=ctx,
                               n_batch=ctx, n_ubatch=ctx, logits_all=logits_all, verbose=False, seed=SEED)
    except (ValueError, RuntimeError) as e:
        raise HwnasError(f"llama.cpp cannot load {path}: {e}") from None


class LlamaCppLM:
    """A GGUF model in llama.cpp, as the benchmark runs it: the KV cache cleared by reset(), logits of the last
    position of each run()."""

    def __init__(self, path: Path, threads: int, context: int | None = None) -> None:
        self.llama_cpp = require_llama_cpp()
        ctx = max(context or DEFAULT_CTX, 8)
        self.llm = open_gguf(path, threads=threads, ctx=ctx, logits_all=False)
        self.vocab = self.llm.n_vocab()
        self.info = {"n_threads": threads, "n_ctx": ctx, "n_batch": ctx,
                     "file_type": self.llm.metadata.get("general.file_type"),
                     "architecture": self.llm.metadata.get("general.architecture"),
                     "system_info": self.llama_cpp.llama_print_system_info().decode(errors="replace").strip()}

    def reset(self) -> None:
        self.llm.reset()  # the next eval removes the cached positions from 0 on

    def run(self, ids: np.ndarray) -> np.ndarray:
        self.llm.eval(ids[0].tolist())
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.vocab,)).copy()


# ------------------------------------------------------------------------------------- quality
def nll_windows(n: int, ctx: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the consecutive windows of at most `ctx` tokens that score `n` ids: each window predicts
    its own tokens 1.. from its own prefix, so a window shorter than 2 tokens is left out."""
    if ctx < 2:
        raise HwnasError(f"the NLL window must hold at least 2 tokens, got {ctx}")
    for start in range(0, n, ctx):
        if min(n, start + ctx) - start >= 2:
            yield start, min(n, start + ctx)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position NLL (nats) of `targets` under `logits` (positions x vocabulary), in float64."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def nll_report(per_token: list[np.ndarray], ctx: int) -> dict[str, Any]:
    nll = np.concatenate(per_token) if per_token else np.zeros(0)
    if not len(nll):
        raise HwnasError("no tokens to score: give at least 2 token ids")
    return {"nll": float(nll.mean()), "tokens": int(len(nll)), "ctx": ctx, "per_token": nll.tolist()}


def check_ids(token_ids: Sequence[int] | np.ndarray, vocab: int) -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
        raise HwnasError(f"token ids must lie in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
    return ids


def gguf_nll(path: str | Path, token_ids: Sequence[int] | np.ndarray, *, threads: int,
             ctx: int = DEFAULT_CTX) -> dict[str, Any]:
    """Mean NLL (nats) of a GGUF model over `token_ids`, evaluated in windows of `ctx` tokens (`nll_windows`).

    Returns {"nll", "tokens" (scored), "ctx", "per_token"}: per_token in the order of the ids it predicts."""
    llm = open_gguf(path, threads=threads, ctx=ctx, logits_all=True)
    try:
        ids = check_ids(token_ids, llm.n_vocab())
        per_token = []
        for start, end in nll_windows(len(ids), ctx):
            llm.reset()
            llm.eval(ids[start:end].tolist())
            per_token.append(token_nll(llm.scores[: end - start - 1], ids[start + 1: end]))
    finally:
        llm.close()
    return nll_report(per_token, ctx)


# ------------------------------------------------------------------------------- quantization
def quantize_gguf(src: str | Path, out: str | Path, gguf_type: str, *, threads: int = 0,
                  allow_requantize: bool = False) -> Path:
    """llama.cpp's quantizer: `src` (a GGUF) as `gguf_type` (one of GGUF_TYPES) at `out`. `allow_requantize`
    lets it quantize tensors already quantized (their dequantized values are the input)."""
    if gguf_type not in GGUF_TYPES:
        raise HwnasError(f"unknown GGUF type {gguf_type!r}; expected one of {list(GGUF_TYPES)}")
    llama_cpp = require_llama_cpp()
    src, out = check_gguf(src), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = GGUF_TYPES[gguf_type], threads, allow_requantize
    tmp = out.with_name(f".{out.name}.tmp")
    log: list[str] = []
    with _native_output(log):  # llama.cpp prints a line a tensor on stdout
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        hint = "" if allow_requantize else " (a quantized source needs allow_requantize=True)"
        raise HwnasError(f"llama.cpp could not quantize {src} to {gguf_type} (code {rc}){hint}\n{log[0][-1500:]}")
    tmp.replace(out)
    return out


@contextlib.contextmanager
def _native_output(log: list[str]) -> Iterator[None]:
    """Send what native code writes to fds 1 and 2 into a temporary file, whose text is appended to `log`."""
    with tempfile.TemporaryFile("w+b") as f:
        sys.stdout.flush(), sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            for fd in (1, 2):
                os.dup2(f.fileno(), fd)
            yield
        finally:
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)
            f.seek(0)
            log.append(f.read().decode(errors="replace"))
