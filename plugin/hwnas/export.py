"""Export a sub-network as a standalone Hugging Face checkpoint."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from .common import HwnasError, atomic_dir, atomic_write_json
from .space import SubnetConfig


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def export_checkpoint(
    *,
    model: str = "smollm2-135m",
    subnet: str | Path,
    out: str | Path,
    overwrite: bool = False,
    supernet: Any = None,
    pick: int | None = None,
) -> dict[str, Any]:
    """Write sub-network `subnet` (a config JSON, or member `pick` of a pareto.json) of `model` to `out`, with its tokenizer.

    The folder appears in one rename when complete. Returns a report of parameters and size
    against the full model, also saved as `out/hwnas_export.json`.
    """
    from .supernet import Supernet

    cfg = SubnetConfig.from_json(subnet, pick)
    sn = supernet or Supernet.from_pretrained(model)
    sn.search_space.validate(cfg)
    sub = sn.extract(cfg)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        sub.save_pretrained(tmp, safe_serialization=True)
        if sn.tokenizer is not None:
            sn.tokenizer.save_pretrained(tmp)
        cfg.to_json(tmp / "hwnas_subnet.json")
        full_params = sn.num_parameters_of(sn.search_space.max_config())
        params = sum(p.numel() for p in sub.parameters())
        bytes_per = sub.dtype.itemsize
        report = {
            "model": str(model),
            "out": str(Path(out).resolve()),
            "model_type": sub.config.model_type,
            "uniform": cfg.is_uniform,
            "layers": cfg.depth,
            "full_layers": cfg.num_layers,
            "parameters": params,
            "full_parameters": full_params,
            "parameter_ratio": params / full_params,
            "weights_bytes": _dir_bytes(tmp),
            "full_weights_bytes": full_params * bytes_per,
        }
        report["size_ratio"] = report["weights_bytes"] / report["full_weights_bytes"]
        atomic_write_json(tmp / "hwnas_export.json", report)
    return report


# ------------------------------------------------------------------------------ Optimum export
_REGISTERED = False


def register_optimum() -> None:
    """Teach Optimum's TasksManager (ONNX and OpenVINO backends) the `hwnas_llama` model type."""
    global _REGISTERED
    if _REGISTERED:
        return
    from optimum.exporters.onnx import utils as onnx_utils
    from optimum.exporters.onnx.model_configs import LlamaOnnxConfig
    from optimum.exporters.tasks import TasksManager

    tasks = ("feature-extraction", "feature-extraction-with-past", "text-generation", "text-generation-with-past")
    TasksManager.create_register("onnx", overwrite_existing=True)("hwnas_llama", *tasks)(
        type("HwnasLlamaOnnxConfig", (LlamaOnnxConfig,), {})
    )
    onnx_utils.MODEL_TYPES_REQUIRING_POSITION_IDS.add("hwnas_llama")
    try:
        from optimum.exporters.openvino.model_configs import LlamaOpenVINOConfig
    except ImportError:  # optimum-intel not installed: ONNX only
        pass
    else:
        TasksManager.create_register("openvino", overwrite_existing=True)("hwnas_llama", *tasks, library_name="transformers")(
            type("HwnasLlamaOpenVINOConfig", (LlamaOpenVINOConfig,), {})
        )
    _REGISTERED = True


@contextlib.contextmanager
def _as_transformers_class(model: Any):
    """Optimum infers the library from the class's module: show it the plain Llama class while exporting."""
    from transformers import LlamaForCausalLM

    cls = model.__class__
    model.__class__ = LlamaForCausalLM
    try:
        yield model
    finally:
        model.__class__ = cls


def _check_exportable(model: Any) -> None:
    shapes = getattr(model.config, "layer_shapes", None) or []
    if len({s["num_key_value_heads"] for s in shapes}) > 1:
        raise HwnasError("per-layer KV-head counts are not exportable yet (the dummy KV cache is sized from the config); "
                         "export sub-networks that keep KV heads uniform")


def export_onnx(model: Any, out: str | Path, *, opset: int | None = None) -> Path:
    """Export an in-memory (sub-network) model as Optimum's `text-generation-with-past` ONNX model in `out`."""
    from optimum.exporters.onnx import onnx_export_from_model

    register_optimum()
    _check_exportable(model)
    out = Path(out)
    with _as_transformers_class(model), torch_quiet():
        onnx_export_from_model(model, output=out, task="text-generation-with-past", opset=opset, do_validation=False,
                               library_name="transformers")
    return out / "model.onnx"


def export_openvino(model: Any, out: str | Path) -> Path:
    """Export an in-memory model as optimum-intel's stateful OpenVINO IR (KV cache kept as state) in `out`."""
    from optimum.exporters.openvino import export_from_model

    register_optimum()
    _check_exportable(model)
    out = Path(out)
    with _as_transformers_class(model), torch_quiet():
        export_from_model(model, output=out, task="text-generation-with-past", stateful=True)
    return out / "openvino_model.xml"


@contextlib.contextmanager
def torch_quiet():
    """Silence the exporters' tracer warnings, which say nothing actionable about a Llama."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
