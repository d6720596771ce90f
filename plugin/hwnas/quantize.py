"""Quantization of exported graphs, one setting per runtime and precision.

The latency profiler quantizes its block graphs with exactly these functions, so a latency table
describes the model as it will be deployed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import HwnasError

# The ISA levels with int8 dot-product instructions; without them u8s8 products can saturate.
_VNNI = ("amx", "avx512vnni", "avxvnni")
OV_GROUP_SIZE = 64  # divides every MLP width (multiples of 64) and every Llama hidden size
ORT_INT4 = {"block_size": 32, "is_symmetric": True, "bits": 4}


def ort_int8_settings(isa: str) -> dict[str, Any]:
    """onnxruntime `quantize_dynamic` settings for this CPU.

    Only MatMuls are quantized: quantizing the tied embedding Gather makes every decode step
    dequantize the whole LM head. Without VNNI, signed int8 weights with full range saturate the
    u8s8 kernels (NLL 3.9 -> 16 measured on the default model), so the range is reduced there.
    """
    return {"op_types_to_quantize": ["MatMul"], "per_channel": True, "reduce_range": isa not in _VNNI,
            "weight_type": "QInt8"}


def quantize_onnx(src: str | Path, dst: str | Path, *, precision: str, isa: str) -> dict[str, Any]:
    """Quantize the ONNX graph `src` into `dst` for onnxruntime; returns the settings used."""
    src, dst = Path(src), Path(dst)
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        settings = ort_int8_settings(isa)
        kwargs = {**settings, "weight_type": QuantType[settings["weight_type"]]}
        quantize_dynamic(src, dst, use_external_data_format=_large(src), **kwargs)
        return {"method": "onnxruntime.quantize_dynamic", **settings}
    if precision == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        settings = dict(ORT_INT4)
        q = MatMulNBitsQuantizer(onnx.load(str(src)), **settings)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=_large(src))
        return {"method": "onnxruntime.MatMulNBitsQuantizer", **settings}
    raise HwnasError(f"onnxruntime precision {precision!r} is not supported; expected fp32, int8 or int4")


def _large(path: Path) -> bool:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob("*.onnx_data")) > 1_900_000_000


def ov_compression(precision: str) -> dict[str, Any]:
    """NNCF weight-compression settings for OpenVINO at `precision` (what optimum-intel's bits=8/4 apply)."""
    if precision == "int8":
        return {"mode": "INT8_ASYM"}
    if precision == "int4":
        return {"mode": "INT4_ASYM", "group_size": OV_GROUP_SIZE, "ratio": 1.0}
    raise HwnasError(f"OpenVINO precision {precision!r} is not supported; expected fp32, int8 or int4")


def compress_openvino(model: Any, *, precision: str) -> tuple[Any, dict[str, Any]]:
    """NNCF data-free weight compression of an `openvino.Model`; returns it with the settings used."""
    if precision == "fp32":
        return model, {}
    import nncf

    settings = ov_compression(precision)
    kwargs = {**settings, "mode": nncf.CompressWeightsMode[settings["mode"]]}
    return nncf.compress_weights(model, **kwargs), {"method": "nncf.compress_weights", **settings}


def settings_for(runtime: str, precision: str, isa: str) -> dict[str, Any]:
    """The quantization a deployed model of `runtime`/`precision` gets on a CPU with `isa` (recorded in tables)."""
    if precision in ("fp32", "fp16", "bf16"):
        return {}
    if runtime == "onnxruntime" and precision == "int8":
        return {"method": "onnxruntime.quantize_dynamic", **ort_int8_settings(isa)}
    if runtime == "onnxruntime" and precision == "int4":
        return {"method": "onnxruntime.MatMulNBitsQuantizer", **ORT_INT4}
    if runtime == "openvino":
        return {"method": "nncf.compress_weights", **ov_compression(precision)}
    raise HwnasError(f"{runtime} has no {precision} quantization; expected onnxruntime or openvino with int8 or int4")
