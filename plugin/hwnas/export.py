"""Export a sub-network as a standalone Hugging Face checkpoint."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from .common import HwnasError, atomic_dir, atomic_write_json, read_json
from .fused import FUSED_KEY
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

    A config's channel indices follow an importance order: a pareto.json's is the calibration its search
    recorded; a plain config's is `supernet`'s,
    or the default calibration's.
    The folder appears in one rename when complete. Returns a report of parameters and size
    against the full model, also saved as `out/hwnas_export.json`.
    """
    from .supernet import Calibration, Supernet

    cfg, calibration = read_subnet(subnet, pick)
    if supernet is not None and calibration is not None and supernet.calibration != calibration:
        raise HwnasError(f"{subnet} indexes channels ordered by {calibration.key()}, the supernet given by "
                         f"{supernet.calibration.key() if supernet.calibration else 'its checkpoint'}")
    sn = supernet or Supernet.from_pretrained(model, calibration=calibration or Calibration())
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
            "channel_order": sn.calibration.key() if sn.calibration else "checkpoint",
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


def read_subnet(subnet: str | Path, pick: int | None = None) -> tuple[SubnetConfig, Any]:
    """The config `export_checkpoint` exports and, for a pareto.json, the `Calibration` its channel indices follow
    (else None); every problem with the file or `pick` is an HwnasError naming it."""
    from .supernet import recorded_calibration

    cfg = SubnetConfig.from_json(subnet, pick)  # checks the file, the front and the pick's range
    data = read_json(subnet, "sub-network config")
    if not (isinstance(data, dict) and "front" in data):
        return cfg, None
    try:
        return cfg, recorded_calibration(data)
    except HwnasError as e:
        raise HwnasError(f"{subnet}: {e}") from None


# ------------------------------------------------------------------------------ Optimum export
# Optimum sizes the dummy KV cache it traces with from the config's single `num_key_value_heads`, and
# onnxruntime checks every fixed input dimension. A heterogeneous sub-network (whole KV groups pruned
# per layer, as on MHA models such as LLaMA2-7B) therefore gets a dummy cache shaped layer by layer and,
# in ONNX, a dynamic KV-head axis: ORTModelForCausalLM starts generation with one empty cache shape for
# every layer, and onnxruntime's Concat skips the empty tensor.
_REGISTERED = False
TASKS = ("feature-extraction", "feature-extraction-with-past", "text-generation", "text-generation-with-past")


def layer_kv_heads(config: Any) -> list[int] | None:
    """Each layer's KV-head count of an `hwnas_llama` config, or None for a uniform model."""
    shapes = getattr(config, "layer_shapes", None)
    return [s["num_key_value_heads"] for s in shapes] if shapes else None


def _optimum_configs() -> tuple[type, type | None]:
    """The ONNX and (with optimum-intel) OpenVINO export configs of `hwnas_llama`."""
    from optimum.exporters.onnx.model_configs import LlamaOnnxConfig
    from optimum.utils.input_generators import DummyTextInputGenerator, MistralDummyPastKeyValuesGenerator

    class HwnasPastKeyValuesGenerator(MistralDummyPastKeyValuesGenerator):
        """Dummy KV cache whose layers have their own KV-head counts."""

        def __init__(self, task: str, normalized_config: Any, **kwargs: Any) -> None:
            super().__init__(task, normalized_config, **kwargs)
            self.kv_heads = layer_kv_heads(normalized_config.config) or [self.num_key_value_heads] * self.num_layers

        def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
            shapes = [(self.batch_size, kv, self.sequence_length, self.head_dim) for kv in self.kv_heads]
            return [tuple(self.random_float_tensor(s, framework=framework, dtype=float_dtype) for _ in "kv") for s in shapes]

    class HwnasLlamaOnnxConfig(LlamaOnnxConfig):
        DUMMY_INPUT_GENERATOR_CLASSES = (DummyTextInputGenerator, HwnasPastKeyValuesGenerator)
        DUMMY_PKV_GENERATOR_CLASS = HwnasPastKeyValuesGenerator

        def add_past_key_values(self, inputs_or_outputs: dict[str, dict[int, str]], direction: str) -> None:
            super().add_past_key_values(inputs_or_outputs, direction)
            kv = layer_kv_heads(self._config)
            if kv and len(set(kv)) > 1:
                for name, axes in inputs_or_outputs.items():
                    if name.startswith(("past_key_values.", "present.")):
                        axes[1] = f"num_key_value_heads.{name.split('.')[1]}"

        def post_process_exported_models(self, path: Path, *args: Any):
            result = super().post_process_exported_models(path, *args)
            runtime_config(Path(path))
            return result

    try:
        from optimum.exporters.openvino.model_configs import LlamaOpenVINOConfig
    except ImportError:  # optimum-intel not installed: ONNX only
        return HwnasLlamaOnnxConfig, None
    # OpenVINO keeps the KV cache as state, sized per layer from these static shapes.
    ov = type("HwnasLlamaOpenVINOConfig", (LlamaOpenVINOConfig,), {
        "DUMMY_INPUT_GENERATOR_CLASSES": HwnasLlamaOnnxConfig.DUMMY_INPUT_GENERATOR_CLASSES,
        "DUMMY_PKV_GENERATOR_CLASS": HwnasPastKeyValuesGenerator,
    })
    return HwnasLlamaOnnxConfig, ov


def register_optimum() -> None:
    """Teach Optimum's TasksManager (ONNX and OpenVINO backends) the `hwnas_llama` model type.

    Also lets Optimum infer the `transformers` library from hwnas's model class, which subclasses
    transformers' Llama (Optimum infers the library from the class's module).
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from optimum.exporters.onnx import utils as onnx_utils
    from optimum.exporters.tasks import TasksManager

    onnx_config, ov_config = _optimum_configs()
    TasksManager.create_register("onnx", overwrite_existing=True)("hwnas_llama", *TASKS)(onnx_config)
    if ov_config is not None:
        TasksManager.create_register("openvino", overwrite_existing=True)("hwnas_llama", *TASKS,
                                                                           library_name="transformers")(ov_config)
    onnx_utils.MODEL_TYPES_REQUIRING_POSITION_IDS.add("hwnas_llama")
    infer = TasksManager._infer_library_from_model_or_model_class.__func__

    def infer_library(cls: Any, model: Any = None, model_class: Any = None) -> str:
        target = model.__class__ if model is not None else model_class
        if target is not None and target.__module__.startswith("hwnas."):
            return "transformers"
        return infer(cls, model=model, model_class=model_class)

    TasksManager._infer_library_from_model_or_model_class = classmethod(infer_library)
    _REGISTERED = True




def runtime_config(folder: Path, *, fused_attention: bool = False) -> None:
    """Mark an exported folder's `hwnas_llama` config as `llama` for the runtimes' loaders.

    ORTModelForCausalLM and OVModelForCausalLM read only the cache layout from config.json (the graph
    holds the shapes), so the exported folder then loads without importing hwnas. The per-layer
    shapes stay in `layer_shapes`, and `hwnas_model_type` records the source type.

    Optimum's ORTModelForCausalLM sizes a llama's empty KV cache with head size `hidden_size //
    num_attention_heads`, ignoring `head_dim`: with query heads pruned that is wrong (576 // 3 = 192, not
    64), so `num_attention_heads` becomes `hidden_size // head_dim` there and the kept count is recorded
    as `hwnas_num_attention_heads` (the graph holds the real shapes).
    """
    path = folder / "config.json"
    if not path.is_file():
        return
    data = read_json(path, "exported config")
    changed = dict(data)
    if data.get("model_type") == "hwnas_llama":
        changed.update(model_type="llama", hwnas_model_type="hwnas_llama", architectures=["LlamaForCausalLM"])
    heads, head_dim, hidden = data.get("num_attention_heads"), data.get("head_dim"), data.get("hidden_size")
    if heads and head_dim and hidden and hidden // heads != head_dim and hidden % head_dim == 0:
        changed.update(num_attention_heads=hidden // head_dim, hwnas_num_attention_heads=heads)
    if fused_attention:
        changed[FUSED_KEY] = True
    if changed != data:
        atomic_write_json(path, changed)


def export_onnx(model: Any, out: str | Path, *, opset: int | None = None, fused_attention: bool = False) -> Path:
    """Export an in-memory (sub-network) model as Optimum's `text-generation-with-past` ONNX model in `out`.

    `fused_attention` writes each attention layer as onnxruntime's GroupQueryAttention (`hwnas.fused`); the
    folder's config.json then says `hwnas_fused_attention: true`.
    """
    from optimum.exporters.onnx import onnx_export_from_model

    from .fused import finish_export, gqa_attention

    register_optimum()
    out = Path(out)
    with torch_quiet(), gqa_attention(model) if fused_attention else contextlib.nullcontext():
        onnx_export_from_model(model, output=out, task="text-generation-with-past", opset=opset, do_validation=False,
                               library_name="transformers")
    if fused_attention:
        finish_export(out / "model.onnx")
    runtime_config(out, fused_attention=fused_attention)
    return out / "model.onnx"


def fused_attention(folder: Path) -> bool:
    """Whether the ONNX folder's graph was exported with onnxruntime's fused attention."""
    path = Path(folder) / "config.json"
    return path.is_file() and bool(read_json(path, "exported config").get(FUSED_KEY, False))


def export_openvino(model: Any, out: str | Path) -> Path:
    """Export an in-memory model as optimum-intel's stateful OpenVINO IR (KV cache kept as state) in `out`."""
    from optimum.exporters.openvino import export_from_model

    register_optimum()
    out = Path(out)
    with torch_quiet():
        export_from_model(model, output=out, task="text-generation-with-past", stateful=True)
    runtime_config(out)
    return out / "openvino_model.xml"


ONNX_ATOL = 1e-3  # the largest logit difference from torch that `hwnas onnx` accepts
MIN_OPSET = 14  # the Llama graph's operators (Trilu, ...); Optimum recommends 18, its default


def check_opset(opset: int | None) -> None:
    """An --opset the exporter can write: MIN_OPSET up to the newest that both torch's exporter and onnx know."""
    if opset is None:
        return
    import onnx

    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as newest
    except ImportError:  # a torch that moved it: the installed onnx's newest
        newest = onnx.defs.onnx_opset_version()
    newest = min(newest, onnx.defs.onnx_opset_version())
    if not MIN_OPSET <= opset <= newest:
        raise HwnasError(f"--opset {opset} cannot be exported; expected {MIN_OPSET} to {newest} "
                         "(default: Optimum's, 18 for Llama)")


def export_onnx_checkpoint(*, model: str | Path, out: str | Path, opset: int | None = None, overwrite: bool = False,
                           prompt: str = "The capital of France is", fused_attention: bool = False) -> dict[str, Any]:
    """`hwnas onnx`: export a checkpoint (full model or sub-network) to an Optimum ONNX folder with KV cache.

    The folder loads with `ORTModelForCausalLM.from_pretrained(out)` without importing hwnas. Before
    the folder appears, onnxruntime's logits on `prompt` are checked against torch's (≤ ONNX_ATOL).
    `fused_attention`: onnxruntime's GroupQueryAttention per layer (faster decode; onnxruntime only).
    """
    import numpy as np
    import onnxruntime as ort

    from .loading import load_model, require_kind, resolve_model

    check_opset(opset)
    src = resolve_model(model)
    require_kind(src, "torch", command="`hwnas onnx`")
    torch_model, tokenizer = load_model(src, allow_subnet=True)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        onnx_path = export_onnx(torch_model, tmp, opset=opset, fused_attention=fused_attention)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        diff = _onnx_logit_diff(torch_model, onnx_path, tokenizer, prompt, np, ort)
        if diff > ONNX_ATOL:
            raise HwnasError(f"onnxruntime's logits differ from torch's by {diff:.2e} (> {ONNX_ATOL}); nothing written")
        graph_bytes = sum(f.stat().st_size for f in tmp.glob("model.onnx*"))
        report = {"model": str(src), "out": str(Path(out).resolve()), "opset": opset, "model_type": torch_model.config.model_type,
                  "layers": torch_model.config.num_hidden_layers, "kv_heads_per_layer": layer_kv_heads(torch_model.config),
                  "max_abs_logit_diff": diff, "onnx_bytes": graph_bytes, "fused_attention": fused_attention}
        atomic_write_json(tmp / "hwnas_onnx.json", report)
    return report


def _onnx_logit_diff(model: Any, onnx_path: Path, tokenizer: Any, prompt: str, np: Any, ort: Any) -> float:
    """Max |logit difference| between torch and the exported graph on `prompt` (empty KV cache)."""
    import torch

    ids = tokenizer(prompt, return_tensors="np")["input_ids"] if tokenizer is not None else np.arange(1, 9)[None]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    n = ids.shape[1]
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64),
             "position_ids": np.arange(n, dtype=np.int64)[None]}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            layer = int(inp.name.split(".")[1])
            kv = (layer_kv_heads(model.config) or [model.config.num_key_value_heads] * model.config.num_hidden_layers)[layer]
            feeds[inp.name] = np.zeros((1, kv, 0, model.config.head_dim), np.float32)
    got = sess.run(["logits"], {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    return float(np.abs(got - ref).max())


@contextlib.contextmanager
def torch_quiet():
    """Silence the exporters' tracer warnings, which say nothing actionable about a Llama."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
