"""`hwnas quantize` (`quantize_model`): one model, one quantized artifact, and what it costs in quality.

`quantize_model` turns a checkpoint (or an Optimum ONNX folder) into a deployable artifact with one of
`METHODS` (`quantize_backends`), and measures its quality against the fp32 source in the artifact's own
runtime. This module is also the documented home of the per-runtime settings and graph quantizers that
the latency tables and deployed models use; they are defined in `quantize_settings` and `quantize_backends`.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import logging
import platform
import time
from pathlib import Path
from typing import Any

from . import modeling  # noqa: F401  (registers hwnas_llama with the Auto classes)
from .common import HwnasError, atomic_dir, atomic_write_json, read_json
from .loading import load_model, read_llama_config, require_kind, resolve_model, runtime_model
from .quantize_backends import BACKENDS, WEIGHT_SUFFIXES, calibration_ids, compress_openvino, quantize_onnx
from .quantize_settings import OV_GROUP_SIZE, ort_int8_settings, ov_compression, settings_for
from .runner import cpu_info

__all__ = [
    "DEFAULT_MAX_KL",
    "METHODS",
    "OV_GROUP_SIZE",
    "compress_openvino",
    "load_quantized",
    "measure_quality",
    "ort_int8_settings",
    "ov_compression",
    "quantize_model",
    "quantize_onnx",
    "settings_for",
    "weight_bytes",
]

logger = logging.getLogger(__name__)

# method -> the input kinds it takes (a torch checkpoint is exported first where the method needs ONNX)
METHODS: dict[str, tuple[str, ...]] = {
    "ort-int8": ("torch", "onnx"),
    "ort-int8-wo": ("torch", "onnx"),
    "ort-int4": ("torch", "onnx"),
    "nncf-int8": ("torch", "onnx"),
    "nncf-int4": ("torch", "onnx"),
    "ov-int8": ("torch",),
    "ov-int4": ("torch",),
    "bnb-int8": ("torch",),
    "bnb-nf4": ("torch",),
}
# Mean next-token KL (nats) to the fp32 source above which a quantization counts as failed: above what the
# working methods lose on the default model, below what a broken one (full-range int8 without VNNI) loses.
DEFAULT_MAX_KL = 1.0
FALLBACKS = ("error", "adjust", "ignore")  # NNCF's GroupSizeFallbackMode
GROUPED = ("ort-int4", "nncf-int4", "ov-int4")  # the methods whose group size is a choice
RUNTIMES = {"ort": "onnxruntime", "nncf": "onnxruntime", "ov": "openvino, INFERENCE_PRECISION_HINT f32",
            "bnb": "torch + bitsandbytes"}
_LIBRARIES = {"ort": ("onnxruntime", "onnx", "optimum-onnx"), "nncf": ("nncf", "onnx", "onnxruntime", "optimum-onnx"),
              "ov": ("openvino", "nncf", "optimum-intel"), "bnb": ("bitsandbytes", "accelerate")}


def quantize_model(model: str | Path, method: str, out: str | Path, *, samples: int = 8, max_kl: float = DEFAULT_MAX_KL,
                   accept_loss: bool = False, overwrite: bool = False, group_size: int | None = None,
                   group_size_fallback: str = "error", keep_fp32: str | None = None, head_bits: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Quantize `model` (a checkpoint folder, `smollm2-135m`, or an Optimum ONNX folder) with `method` into `out`.

    The artifact loads in its runtime (`load_quantized`). Its quality is measured against the fp32
    source on `samples` held-out calibration sequences; above `max_kl` the report says `passed: false`
    and, unless `accept_loss`, an HwnasError follows once the artifact is written. Returns the
    report, also saved as `out/quantize.json`.

    ort-int8 keeps in fp32 the down_proj of the layers a sub-network's `hwnas_subnet.json` marks in
    `fp32_down`, or of every layer with `keep_fp32="down_proj"`.
    """
    from .progress import tqdm

    _check_args(method, samples, max_kl, group_size, group_size_fallback, keep_fp32)
    if head_bits is not None and method != "ort-int4":
        raise HwnasError(f"--head-bits applies to ort-int4 only, not {method}")
    src, kind = _source(model, method)
    if src == Path(out).resolve() or src in Path(out).resolve().parents:
        raise HwnasError(f"output {out} would replace the source {src}; choose another folder")
    family = method.split("-")[0]
    with atomic_dir(out, overwrite=overwrite) as tmp, \
            tqdm(total=3, desc=f"quantize {method}", unit="step", disable=not progress) as steps:
        steps.set_postfix_str("load")
        ref, tokenizer = _reference(src, kind)
        steps.update()
        steps.set_postfix_str("quantize")
        started = time.perf_counter()
        settings = BACKENDS[family](src, kind, tmp, method=method, model=ref, tokenizer=tokenizer,
                                    group_size=group_size, fallback=group_size_fallback, keep_fp32=keep_fp32,
                                    head_bits=head_bits)
        seconds = time.perf_counter() - started
        steps.update()
        steps.set_postfix_str("quality")
        quality = measure_quality(ref, load_quantized(tmp, method), tokenizer, samples=samples, progress=progress)
        quality.update(runtime=RUNTIMES[family], max_kl=max_kl, passed=quality["kl"] <= max_kl)
        steps.update()
        before, after = weight_bytes(src), weight_bytes(tmp)
        report = {"method": method, "source": str(src), "source_kind": kind, "out": str(Path(out).resolve()),
                  "settings": settings, "quantize_seconds": round(seconds, 2), "source_bytes": before,
                  "quantized_bytes": after, "size_ratio": after / before, "quality": quality,
                  "cpu": cpu_info(), "versions": _versions(_LIBRARIES[family])}
        atomic_write_json(tmp / "quantize.json", report)
    if not quality["passed"]:
        msg = (f"{method} loses too much quality: mean KL {quality['kl']:.4f} > max_kl {max_kl} (NLL "
               f"{quality['nll_fp32']:.3f} -> {quality['nll_quantized']:.3f}); the artifact stays in {report['out']} "
               "for inspection (quantize.json: passed false)")
        logger.warning("QUALITY CHECK FAILED: %s", msg)
        if not accept_loss:
            raise HwnasError(f"{msg}; pass --accept-loss to keep it anyway, or raise --max-kl")
    return report


def _check_args(method: str, samples: int, max_kl: float, group_size: int | None, fallback: str,
                keep_fp32: str | None) -> None:
    if method not in METHODS:
        raise HwnasError(f"unknown quantization method {method!r}; expected one of {list(METHODS)}")
    if samples < 1:
        raise HwnasError(f"samples must be at least 1, got {samples}")
    if not max_kl >= 0:
        raise HwnasError(f"max_kl must be a non-negative number, got {max_kl}")
    if fallback not in FALLBACKS:
        raise HwnasError(f"unknown group-size fallback {fallback!r}; expected one of {list(FALLBACKS)}")
    if (group_size is not None or fallback != "error") and method not in GROUPED:
        raise HwnasError(f"group size options apply to {', '.join(GROUPED)} only, not {method}")
    if fallback != "error" and method == "ort-int4":
        raise HwnasError("--group-size-fallback is NNCF's option; ort-int4 needs a block size dividing every width")
    if group_size is not None and group_size < 1:
        raise HwnasError(f"group size must be a positive integer, got {group_size}")
    if keep_fp32 is not None and (method, keep_fp32) != ("ort-int8", "down_proj"):
        raise HwnasError(f"--keep-fp32 takes down_proj, with --method ort-int8 only; got {keep_fp32!r} with {method}")


def _source(model: str | Path, method: str) -> tuple[Path, str]:
    """The source folder and its kind (`torch` or `onnx`), refusing what `method` cannot take and quantized models."""
    src = resolve_model(model)
    if (src / "quantize.json").is_file():
        done = read_json(src / "quantize.json", "quantization report").get("method")
        raise HwnasError(f"{src} is already quantized ({done}); give its fp32 source instead")
    kind = require_kind(src, *METHODS[method], command=f"`hwnas quantize --method {method}`")
    if kind == "torch" and "quantization_config" in read_llama_config(src, allow_subnet=True):
        raise HwnasError(f"{src} is already quantized (its config.json has a quantization_config); "
                         "give the fp32 checkpoint")
    return src, kind


def weight_bytes(path: Path) -> int:
    """Bytes of a model folder's weight files (safetensors, ONNX with external data, OpenVINO .bin)."""
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())


def _reference(src: Path, kind: str) -> tuple[Any, Any]:
    """The fp32 source (a torch model, or an ORT model for ONNX input) and its tokenizer."""
    if kind == "torch":
        model, tokenizer = load_model(src, allow_subnet=True)
    else:
        from optimum.onnxruntime import ORTModelForCausalLM
        from transformers import AutoTokenizer

        model = ORTModelForCausalLM.from_pretrained(src)
        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except Exception:  # a folder without tokenizer files surfaces as many exception types
            tokenizer = None
    if tokenizer is None:
        raise HwnasError(f"{src} has no tokenizer; quality is measured on calibration text, which needs one")
    return model, tokenizer


def load_quantized(path: str | Path, method: str | None = None) -> Any:
    """A quantized artifact in its own runtime: ORTModelForCausalLM, OVModelForCausalLM or a bitsandbytes torch model.

    `method` defaults to the one in `path/quantize.json`. OpenVINO runs at fp32 inference precision
    (its CPU default may be bf16), so that what is measured is the weight quantization alone.
    """
    path = Path(path)
    method = method or read_json(path / "quantize.json", "quantization report")["method"]
    family = method.split("-")[0]
    if family in ("ort", "nncf"):
        return runtime_model(path, "onnx")
    if family == "ov":
        return runtime_model(path, "openvino")  # f32 inference precision (loading.OV_CONFIG)
    if family == "bnb":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, device_map="cpu").eval()
    raise HwnasError(f"unknown quantization method {method!r}; expected one of {list(METHODS)}")


def measure_quality(reference: Any, quantized: Any, tokenizer: Any, *, samples: int = 8,
                    progress: bool = True) -> dict[str, Any]:
    """Mean next-token KL(fp32 || quantized) and both NLLs on `samples` held-out calibration sequences.

    The sequences come from the end of the calibration split (ov-int4's AWQ data comes from its start).
    """
    import torch
    import torch.nn.functional as F
    from .progress import tqdm

    ids = calibration_ids(tokenizer, samples, from_end=True)
    kl = nll_ref = nll_q = 0.0
    with torch.no_grad():
        for row in tqdm(ids, desc="quality", unit="seq", disable=not progress):
            x = row[None]
            mask = torch.ones_like(x)
            lp = F.log_softmax(reference(input_ids=x, attention_mask=mask).logits[0].float(), -1)
            lq = F.log_softmax(torch.as_tensor(quantized(input_ids=x, attention_mask=mask).logits[0]).float(), -1)
            kl += (lp.exp() * (lp - lq)).sum().item()
            target = x[0, 1:, None]
            nll_ref -= lp[:-1].gather(1, target).sum().item()
            nll_q -= lq[:-1].gather(1, target).sum().item()
    n, t = ids.numel(), ids.numel() - len(ids)
    return {"data": f"lambada/calibration, last {len(ids)} x {ids.shape[1]} tokens", "kl": kl / n,
            "nll_fp32": nll_ref / t, "nll_quantized": nll_q / t, "tokens": n}


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "optimum", *names, "hwnas"):
        with contextlib.suppress(md.PackageNotFoundError):
            found[name] = md.version(name)
    return found
