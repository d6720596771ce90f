"""Deployed artifacts: a sub-network exported and quantized as it runs on the target runtime.

`build_deployed` turns an in-memory model into the graph the latency tables time (profiling, recalibration,
validation); `deploy` turns a checkpoint into a loadable folder with its tokenizer (`hwnas run`, benchmarks),
through `hwnas quantize` where a quantization is asked for, so that its quality is checked too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import runner
from .common import HwnasError, atomic_dir
from .export import export_onnx, export_onnx_checkpoint, export_openvino
from .loading import load_model
from .quantize import compress_openvino, quantize_model, quantize_onnx, settings_for

# The quantization method that deploys a latency table's runtime/precision (the table was measured with the same settings).
DEPLOY_METHODS = {("onnxruntime", "int8"): "ort-int8", ("onnxruntime", "int8-wo"): "ort-int8-wo",
                  ("onnxruntime", "int4"): "ort-int4",
                  ("openvino", "int8"): "ov-int8", ("openvino", "int4"): "ov-int4"}


def build_deployed(model: Any, runtime: str, precision: str, out: Path, *, isa: str, onnx_fp32: Path | None = None) -> Path:
    """Export an in-memory sub-network as it will be deployed; returns the file the runner loads.

    `onnx_fp32`, an fp32 export of the same sub-network (plain attention), spares a second export when quantizing
    for onnxruntime without fused attention.
    """
    out.mkdir(parents=True, exist_ok=True)
    if runtime == "onnxruntime":
        fused = settings_for(runtime, precision, isa).get("fused_attention", False)
        path = onnx_fp32 if onnx_fp32 is not None and precision != "fp32" and not fused \
            else export_onnx(model, out, fused_attention=fused)
        if precision == "fp32":
            return path
        q = out / f"model_{precision}.onnx"
        quantize_onnx(path, q, precision=precision, isa=isa)
        for f in out.glob("model.onnx*"):
            f.unlink()
        return q
    if runtime == "openvino":
        import openvino as ov

        xml = export_openvino(model, out)
        if precision == "fp32":
            return xml
        compressed, _ = compress_openvino(ov.Core().read_model(str(xml)), precision=precision)
        q = out / f"openvino_model_{precision}.xml"
        ov.save_model(compressed, str(q), compress_to_fp16=False)
        for f in out.glob("openvino_model.*"):
            f.unlink()
        return q
    raise HwnasError(f"runtime {runtime!r} has no deployed file format; expected onnxruntime or openvino")


def deploy(src: Path, runtime: str, precision: str, out: Path, *, progress: bool, fused_attention: bool = False) -> Path:
    """Build the deployed artifact of checkpoint `src` for `runtime`/`precision` in `out` (returned).

    `fused_attention`: an onnxruntime fp32 export gets onnxruntime's fused attention (as the quantized target of
    the same run does, so that the fp32 reference differs from it only by the quantization)."""
    if runtime == "torch":
        if precision != "fp32":
            raise HwnasError(f"torch deployment is fp32 here, got {precision!r}; use onnxruntime or openvino for int8/int4")
        return src
    if precision == "fp32":
        if runtime == "onnxruntime":  # checked against torch's logits before the folder appears
            export_onnx_checkpoint(model=src, out=out, fused_attention=fused_attention)
            return out
        model, tok = load_model(src, allow_subnet=True)
        with atomic_dir(out) as tmp:
            build_deployed(model, runtime, precision, tmp, isa=runner.cpu_info()["isa"])
            if tok is not None:
                tok.save_pretrained(tmp)
        return out
    if (runtime, precision) not in DEPLOY_METHODS:
        raise HwnasError(f"cannot deploy {runtime}/{precision}; expected fp32 or one of "
                         f"{[f'{r}/{p}' for r, p in DEPLOY_METHODS]}")
    quantize_model(src, DEPLOY_METHODS[(runtime, precision)], out, progress=progress)
    return out
