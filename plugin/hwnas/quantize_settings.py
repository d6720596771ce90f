"""The quantization each runtime and precision gets: one setting each, recorded in latency tables and reports.

Pure data and small functions (no ONNX, no torch): the latency tables, the deployed artifacts and
`hwnas quantize` all read their settings here, so a table describes the model as it will be deployed.
"""
from __future__ import annotations

from typing import Any

from .common import HwnasError

VNNI = ("amx", "avx512vnni", "avxvnni")  # ISA levels with int8 dot products; without them u8s8 products can saturate
OV_GROUP_SIZE = 64  # divides every MLP width (multiples of 64) and every Llama hidden size
# Weight-only int4 (MatMulNBits, `ort-int4`): symmetric blocks of 32 along K (128 with --group-size 128), int8
# compute inside the kernel (accuracy_level 4), fused attention; the LM head (untied) stays int8 (`head_bits`), as
# its error reaches every logit, and the embedding Gathers read its int8 blocks, as for int8-wo.
ORT_INT4 = {"bits": 4, "block_size": 32, "is_symmetric": True, "accuracy_level": 4, "untie_lm_head": True,
            "head_bits": 8, "shared_embedding": True, "fused_attention": True}
ORT_INT4_BLOCKS = (32, 64, 128)  # block sizes MatMulNBits' int4 CPU kernels take
# Weight-only int8 (MatMulNBits, `ort-int8-wo`): symmetric blocks of 64 along K (a narrower input is padded, and the
# size model counts the padding), activations quantized per block inside the kernel (accuracy_level 4; 0 computes
# in fp32, far slower). The LM head gets its own weight (`untie_lm_head`) whose int8 blocks the embedding Gathers
# read (`shared_embedding`), so a tied model stores the matrix once; the graph uses onnxruntime's fused attention.
ORT_INT8_WO = {"bits": 8, "block_size": 64, "is_symmetric": True, "accuracy_level": 4, "untie_lm_head": True,
               "shared_embedding": True, "fused_attention": True}
GRAPH_KEYS = ("untie_lm_head", "quantize_embedding", "shared_embedding", "fused_attention", "head_bits")  # not the quantizer's


def ort_int8_settings(isa: str) -> dict[str, Any]:
    """onnxruntime `quantize_dynamic` settings for this CPU.

    Only MatMuls are quantized: quantizing the tied embedding Gather makes every decode step
    dequantize the whole LM head. A tied LM head reaches the graph as a Transpose of the embedding,
    which the quantizer skips, so it is first given its own (transposed) weight: it is the largest
    matrix a decode step reads. The embedding table that the Gather keeps is then stored in int8 too,
    one symmetric scale per row (`quantize_embedding`): each step dequantizes only the rows it reads.
    Without VNNI, signed int8 weights with full range saturate the u8s8 kernels, so the range is
    reduced there. The graph is exported with onnxruntime's fused attention, as for int8-wo.
    """
    return {"op_types_to_quantize": ["MatMul"], "per_channel": True, "reduce_range": isa not in VNNI,
            "weight_type": "QInt8", "untie_lm_head": True, "quantize_embedding": True, "fused_attention": True}


def ov_compression(precision: str) -> dict[str, Any]:
    """NNCF weight-compression settings for OpenVINO at `precision` (what optimum-intel's bits=8/4 apply)."""
    if precision == "int8":
        return {"mode": "INT8_ASYM"}
    if precision == "int4":
        return {"mode": "INT4_ASYM", "group_size": OV_GROUP_SIZE, "ratio": 1.0}
    raise HwnasError(f"OpenVINO precision {precision!r} is not supported; expected fp32, int8 or int4")


def settings_for(runtime: str, precision: str, isa: str) -> dict[str, Any]:
    """The quantization a deployed model of `runtime`/`precision` gets on a CPU with `isa` (recorded in tables)."""
    if precision in ("fp32", "fp16", "bf16"):
        return {}
    if runtime == "onnxruntime" and precision == "int8":
        return {"method": "onnxruntime.quantize_dynamic", **ort_int8_settings(isa)}
    if runtime == "onnxruntime" and precision == "int4":
        return {"method": "onnxruntime.MatMulNBitsQuantizer", **ORT_INT4}
    if runtime == "onnxruntime" and precision == "int8-wo":
        return {"method": "onnxruntime.MatMulNBitsQuantizer", **ORT_INT8_WO}
    if runtime == "openvino":
        return {"method": "nncf.compress_weights", **ov_compression(precision)}
    raise HwnasError(f"{runtime} has no {precision} quantization; expected onnxruntime (int8, int8-wo, int4) or "
                     "openvino (int8, int4)")
