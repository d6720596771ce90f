"""The quantization settings each runtime and precision gets, and the combinations refused."""
from __future__ import annotations

import pytest

from hwnas.common import HwnasError
from hwnas.quantize_settings import OV_GROUP_SIZE, ort_int8_settings, settings_for


def test_int8_reduces_the_weight_range_only_without_vnni():
    assert not ort_int8_settings("avx512vnni")["reduce_range"] and ort_int8_settings("avx2")["reduce_range"]
    assert settings_for("onnxruntime", "int8", "avx2")["method"] == "onnxruntime.quantize_dynamic"


def test_float_precisions_are_not_quantized_and_unknown_ones_are_refused():
    assert settings_for("onnxruntime", "fp32", "avx2") == {} and settings_for("openvino", "bf16", "amx") == {}
    assert settings_for("openvino", "int4", "avx2")["group_size"] == OV_GROUP_SIZE
    with pytest.raises(HwnasError, match="torch has no int8 quantization; expected onnxruntime"):
        settings_for("torch", "int8", "avx2")
    with pytest.raises(HwnasError, match="OpenVINO precision 'int8-wo' is not supported"):
        settings_for("openvino", "int8-wo", "avx2")
