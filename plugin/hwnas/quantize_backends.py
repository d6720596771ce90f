"""The quantization backends: onnxruntime (`quantize_onnx`), NNCF on ONNX, OpenVINO (`compress_openvino`), bitsandbytes.

`quantize_onnx` and `compress_openvino` quantize one graph with `quantize_settings`' setting (the latency
tables and deployed models use them); `BACKENDS` turns a whole model into a loadable artifact folder for
`hwnas quantize`, one function per method family.
"""
from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import numpy as np
import onnx

from . import modeling  # noqa: F401  (registers hwnas_llama with the Auto classes)
from .common import HwnasError
from .export import export_onnx, export_openvino, runtime_config
from .fused import is_fused
from .onnx_graph import (PROTO_LIMIT, down_proj_nodes, embedding_gathers, needs_external_data, opset_version,
                         quantize_embeddings, share_embeddings, tied_heads, untie_lm_head)
from .quantize_settings import (GRAPH_KEYS, ORT_INT4, ORT_INT4_BLOCKS, ORT_INT8_WO, ort_int8_settings, ov_compression,
                                settings_for)
from .runner import cpu_info
from .space import SubnetConfig
from .supernet import Calibration, calibration_batches

logger = logging.getLogger(__name__)

EVAL_SEQ_LEN = 128  # tokens per calibration sequence, for the quality check and ov-int4's AWQ
AWQ_SEQUENCES = 32  # calibration sequences for ov-int4's AWQ and scale estimation
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".bin")


def quantize_onnx(src: str | Path, dst: str | Path, *, precision: str, isa: str,
                  fp32_down: Collection[int] | str = (), block_size: int | None = None,
                  head_bits: int | None = None) -> dict[str, Any]:
    """Quantize the ONNX graph `src` into `dst` for onnxruntime; returns the settings used.

    int8 is dynamic quantization (`quantize_dynamic`); int8-wo and int4 are weight-only (MatMulNBits).
    int4 only: `block_size` (32, 64 or 128) and `head_bits` (8, or 4 to quantize the LM head as the rest).
    int8 only: `fp32_down` keeps the down_proj MatMuls of those decoder layers (or of all, "all") in
    fp32; the settings then list them as `nodes_to_exclude`.
    """
    src, dst = Path(src), Path(dst)
    if fp32_down and precision != "int8":
        raise HwnasError(f"keeping down_proj fp32 is an option of onnxruntime's dynamic int8, not {precision}")
    if (block_size is not None or head_bits is not None) and precision != "int4":
        raise HwnasError(f"block size and LM-head bits are options of onnxruntime int4, not {precision}")
    if precision == "int8-wo":
        return _quantize_nbits(src, dst, dict(ORT_INT8_WO))
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        settings = ort_int8_settings(isa)
        kwargs = {k: v for k, v in settings.items() if k not in GRAPH_KEYS}
        kwargs["weight_type"] = QuantType[kwargs["weight_type"]]
        graph = onnx.load(str(src), load_external_data=False)  # the structure; the weights only if edited below
        settings["fused_attention"] = is_fused(graph)
        excluded = down_proj_nodes(graph, fp32_down) if fp32_down else []
        if excluded:
            kwargs["nodes_to_exclude"] = settings["nodes_to_exclude"] = excluded
        untied, tables, big = [], [], needs_external_data(src)
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".untied-") as work:
            untie = settings["untie_lm_head"] and tied_heads(graph)
            if untie or settings["quantize_embedding"] and embedding_gathers(graph):
                graph = onnx.load(str(src))
                untied = untie_lm_head(graph) if untie else []
                tables = quantize_embeddings(graph) if settings["quantize_embedding"] else []
                big = sum(i.ByteSize() for i in graph.graph.initializer) > PROTO_LIMIT
                src = Path(work) / "model.onnx"  # a file, not the proto: a large graph exceeds protobuf's 2 GB
                onnx.save(graph, str(src), save_as_external_data=big, location="model.onnx_data")
            del graph
            quantize_dynamic(src, dst, use_external_data_format=big, **kwargs)
        return {"method": "onnxruntime.quantize_dynamic", **settings, "untied_matmuls": untied,
                "int8_embeddings": tables}
    if precision == "int4":
        settings = dict(ORT_INT4)
        if block_size is not None and block_size not in ORT_INT4_BLOCKS:
            raise HwnasError(f"int4 block size {block_size} is not supported; expected one of {ORT_INT4_BLOCKS}")
        if head_bits is not None and head_bits not in (4, 8):
            raise HwnasError(f"LM-head bits {head_bits} are not supported; expected 4 or 8")
        settings.update({k: v for k, v in (("block_size", block_size), ("head_bits", head_bits)) if v is not None})
        return _quantize_nbits(src, dst, settings)
    raise HwnasError(f"onnxruntime precision {precision!r} is not supported; expected fp32, int8, int8-wo or int4")


def _quantize_nbits(src: Path, dst: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Weight-only MatMulNBits quantization of `src` into `dst`; untie the LM head / store the embedding in int8
    first where `settings` say so. Returns the settings used."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph = onnx.load(str(src))
    untied = untie_lm_head(graph) if settings.get("untie_lm_head") else []
    tables = quantize_embeddings(graph) if settings.get("quantize_embedding") else []
    if "fused_attention" in settings:  # what the graph is, not what was asked
        settings["fused_attention"] = is_fused(graph)
    kwargs = {k: v for k, v in settings.items() if k not in GRAPH_KEYS}
    chatty = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")  # logs every node it skips
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    heads = untied if settings.get("head_bits", kwargs["bits"]) != kwargs["bits"] else []
    try:
        if heads:  # the LM head first, at its own bits: the second pass then finds no MatMul left there
            others = [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.name not in heads]
            first = MatMulNBitsQuantizer(graph, **{**kwargs, "bits": settings["head_bits"]}, nodes_to_exclude=others)
            first.process()
            graph = first.model.model
        q = MatMulNBitsQuantizer(graph, **kwargs, nodes_to_exclude=heads)
        q.process()
    finally:
        chatty.setLevel(level)
    if settings.get("shared_embedding"):
        tables = share_embeddings(q.model.model, settings["block_size"])
    q.model.save_model_to_file(str(dst), use_external_data_format=needs_external_data(src))
    return {"method": "onnxruntime.MatMulNBitsQuantizer", **settings, "untied_matmuls": untied,
            "int8_embeddings": tables}


def compress_openvino(model: Any, *, precision: str) -> tuple[Any, dict[str, Any]]:
    """NNCF data-free weight compression of an `openvino.Model`; returns it with the settings used."""
    if precision == "fp32":
        return model, {}
    import nncf

    settings = ov_compression(precision)
    kwargs = {**settings, "mode": nncf.CompressWeightsMode[settings["mode"]]}
    return nncf.compress_weights(model, **kwargs), {"method": "nncf.compress_weights", **settings}


def calibration_ids(tokenizer: Any, sequences: int, *, from_end: bool) -> Any:
    """Token ids (sequences, EVAL_SEQ_LEN) of LAMBADA's calibration split: ov-int4's AWQ reads its start, the
    quality check its end. LAMBADA alone, the text the check's KL limit was set on."""
    return calibration_batches(tokenizer, Calibration(num_sequences=sequences, seq_len=EVAL_SEQ_LEN, source="lambada"),
                               from_end=from_end)


def copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and tokenizer files: everything but weights, graphs and reports.

    A sub-network's config is marked `llama` for the runtimes' loaders, as hwnas's exports do.
    """
    reports = ("quantize.json", "hwnas_onnx.json")
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (*WEIGHT_SUFFIXES, ".xml") and f.name not in reports:
            shutil.copy2(f, dst / f.name)
    runtime_config(dst)


# -- the backends: (src, kind, dst, ...) -> the exact settings used; each leaves a loadable folder in dst
def _ort(src: Path, kind: str, dst: Path, *, method: str, model: Any, keep_fp32: str | None,
         group_size: int | None = None, head_bits: int | None = None, **_: Any) -> dict[str, Any]:
    precision, isa = method.removeprefix("ort-"), cpu_info()["isa"]
    onnx_dir = _as_onnx(src, kind, dst, model,
                        fused_attention=settings_for("onnxruntime", precision, isa).get("fused_attention", False))
    fp32_down = "all" if keep_fp32 == "down_proj" else _subnet_fp32_down(src)
    if precision == "int8-wo" and fp32_down:
        logger.info("ort-int8-wo quantizes every down_proj: the fp32 down_proj that %s marks is a remedy for "
                    "dynamic int8's activation loss, which weight-only int8 does not have", src)
        fp32_down = ()
    if precision == "int4" and fp32_down:
        fp32_down = ()  # as for int8-wo: weight-only quantization has no activation loss to remedy
    settings = quantize_onnx(onnx_dir / "model.onnx", dst / "model.onnx", precision=precision, isa=isa,
                             fp32_down=fp32_down, block_size=group_size, head_bits=head_bits)
    copy_side_files(onnx_dir, dst)
    if onnx_dir != src:
        shutil.rmtree(onnx_dir)
    return settings


def _subnet_fp32_down(src: Path) -> list[int]:
    """Positions (in the checkpoint's renumbered layers) whose down_proj a sub-network keeps fp32."""
    if not (src / "hwnas_subnet.json").is_file():
        return []
    return [i for i, fp32 in enumerate(SubnetConfig.from_json(src / "hwnas_subnet.json").fp32_down_mask) if fp32]


def _nncf(src: Path, kind: str, dst: Path, *, method: str, model: Any, group_size: int | None, fallback: str,
          **_: Any) -> dict[str, Any]:
    int4 = method.endswith("int4")
    if int4 and kind == "onnx" and (opset := opset_version(src / "model.onnx")) < 21:
        raise HwnasError(f"{src / 'model.onnx'} has opset {opset}; NNCF INT4_ASYM runs in onnxruntime only from "
                         "opset 21: give the torch checkpoint (hwnas exports it at opset 21) or re-export at 21")
    onnx_dir = _as_onnx(src, kind, dst, model, opset=21 if int4 else None)
    graph = onnx.load(str(onnx_dir / "model.onnx"))
    settings = _nncf_settings(method, group_size, fallback)
    if tied := tied_heads(graph):
        # NNCF cannot read a weight computed by a Transpose; the head then reads the compressed embedding.
        settings["ignored_scope"] = {"names": tied}
    compressed, settings = _nncf_compress(graph, settings)
    big = needs_external_data(onnx_dir / "model.onnx")
    onnx.save(compressed, str(dst / "model.onnx"), save_as_external_data=big, location="model.onnx_data")
    copy_side_files(onnx_dir, dst)
    if onnx_dir != src:
        shutil.rmtree(onnx_dir)
    return settings


def _ov(src: Path, kind: str, dst: Path, *, method: str, model: Any, tokenizer: Any, group_size: int | None,
        fallback: str, **_: Any) -> dict[str, Any]:
    import openvino as ov

    fp32 = dst / ".fp32"
    xml = export_openvino(model, fp32)
    settings = _nncf_settings(method, group_size, fallback)
    dataset = None
    if method.endswith("int4"):  # data-aware: AWQ and scale estimation on the start of the calibration split
        ids = calibration_ids(tokenizer, AWQ_SEQUENCES, from_end=False).numpy()
        dataset = [{"input_ids": row[None], "attention_mask": np.ones_like(row[None]),
                    "position_ids": np.arange(row.size, dtype=np.int64)[None], "beam_idx": np.zeros(1, np.int32)}
                   for row in ids]
        settings.update(awq=True, scale_estimation=True, subset_size=len(dataset),
                        dataset=f"lambada/calibration, first {len(dataset)} x {ids.shape[1]} tokens")
    compressed, settings = _nncf_compress(ov.Core().read_model(str(xml)), settings, dataset)
    ov.save_model(compressed, str(dst / "openvino_model.xml"), compress_to_fp16=False)
    copy_side_files(fp32, dst)
    shutil.rmtree(fp32)
    return settings


def _bnb(src: Path, kind: str, dst: Path, *, method: str, model: Any, tokenizer: Any, **_: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if method == "bnb-int8":
        kwargs: dict[str, Any] = {"load_in_8bit": True}
    else:
        kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
        # bitsandbytes' CPU 4-bit kernel repacks weights in blocks of 64 inputs and 32 outputs, and fails otherwise
        bad = [f"{name} ({m.in_features} x {m.out_features})" for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head" and (m.in_features % 64 or m.out_features % 32)]
        if bad:
            raise HwnasError(f"bnb-nf4 needs every linear layer's input width to be a multiple of 64 and its "
                             f"output width a multiple of 32 (bitsandbytes' CPU 4-bit kernel); these are not: "
                             f"{', '.join(bad)}")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(**kwargs),
                                                 device_map="cpu", dtype=torch.float32, use_safetensors=True)
    model.save_pretrained(dst, safe_serialization=True)
    tokenizer.save_pretrained(dst)
    return {"method": "transformers.BitsAndBytesConfig", "device_map": "cpu", **kwargs}


# method family -> backend: (src, kind, dst, *, method, model, tokenizer, group_size, fallback, keep_fp32) -> settings
BACKENDS: dict[str, Callable[..., dict[str, Any]]] = {"ort": _ort, "nncf": _nncf, "ov": _ov, "bnb": _bnb}


def _as_onnx(src: Path, kind: str, dst: Path, model: Any, *, opset: int | None = None,
             fused_attention: bool = False) -> Path:
    """The folder holding the fp32 ONNX model: the source itself (as it is), or a fresh export under `dst`."""
    if kind == "onnx":
        return src
    export_onnx(model, dst / ".fp32", opset=opset, fused_attention=fused_attention)
    return dst / ".fp32"


def _nncf_settings(method: str, group_size: int | None, fallback: str) -> dict[str, Any]:
    settings = ov_compression(method.split("-")[1])
    if group_size is not None:
        settings["group_size"] = group_size
    if fallback != "error":
        settings["advanced_parameters"] = {"group_size_fallback_mode": fallback}
    return settings


def _nncf_compress(model: Any, settings: dict[str, Any],
                   dataset: list[Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """`nncf.compress_weights(model, **settings)`: the model, and the settings with what data-aware steps ran."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    kwargs = {k: v for k, v in settings.items() if k not in ("dataset", "advanced_parameters", "ignored_scope")}
    kwargs["mode"] = nncf.CompressWeightsMode[settings["mode"]]
    if "ignored_scope" in settings:
        kwargs["ignored_scope"] = nncf.IgnoredScope(**settings["ignored_scope"])
    if "advanced_parameters" in settings:
        mode = GroupSizeFallbackMode(settings["advanced_parameters"]["group_size_fallback_mode"])
        kwargs["advanced_parameters"] = AdvancedCompressionParameters(group_size_fallback_mode=mode)
    if dataset is not None:
        kwargs["dataset"] = nncf.Dataset(dataset)
    with _nncf_messages() as messages:
        try:
            compressed = nncf.compress_weights(model, **kwargs)
        except nncf.InvalidGroupSizeError as e:
            raise HwnasError(_group_size_message(str(e), settings["group_size"])) from None
    if settings.get("awq"):
        skipped = any("applying AWQ" in m and "skipped" in m for m in messages)
        settings["data_aware"] = {"awq": "skipped: no MLP pattern matched" if skipped else "applied",
                                  "scale_estimation": "applied"}
    return compressed, {"method": "nncf.compress_weights", **settings}


@contextlib.contextmanager
def _nncf_messages() -> Iterator[list[str]]:
    """Collect NNCF's log messages (how it reports, for example, that AWQ found nothing to apply to)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    nncf_log = logging.getLogger("nncf")
    nncf_log.addHandler(handler)
    try:
        yield messages
    finally:
        nncf_log.removeHandler(handler)


def _group_size_message(nncf_message: str, group_size: int) -> str:
    """NNCF's failed-node list, told with module names: `model.layers.0.self_attn.o_proj (width 32)`."""
    failed = re.findall(r'"([^"]+)" \(channel size: (\d+)\)', nncf_message)
    if not failed:
        return f"group size {group_size} does not fit this model: {nncf_message}"
    layers = ", ".join(f"{_module_name(node)} (width {width})" for node, width in failed)
    return (f"group size {group_size} does not divide the input width of {len(failed)} layer(s): {layers}; "
            "choose a group size dividing every width, or pass --group-size-fallback adjust (or ignore)")


def _module_name(node: str) -> str:
    """`/model/layers.3/mlp/down_proj/MatMul` (ONNX) or `__module.model.layers.3.mlp.down_proj/aten::linear/MatMul`
    (OpenVINO) -> `model.layers.3.mlp.down_proj`."""
    name = node.removeprefix("__module.").lstrip("/").split("/aten::")[0]
    return name.rsplit("/", 1)[0].replace("/", ".") if "/" in name else name
