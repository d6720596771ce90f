"""Quantization: one setting per runtime and precision, and `hwnas quantize` (`quantize_model`).

The latency profiler quantizes its block graphs with exactly these functions, so a latency table
describes the model as it will be deployed. `quantize_model` turns a checkpoint (or an Optimum
ONNX folder) into a deployable artifact with one of `METHODS`, and measures what it costs in
quality against the fp32 source, in the artifact's own runtime.
"""
from __future__ import annotations

import contextlib
import logging
import platform
import re
import shutil
import time
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from .common import HwnasError, atomic_dir, atomic_write_json, read_json
from .fused import is_fused

logger = logging.getLogger(__name__)

# The ISA levels with int8 dot-product instructions; without them u8s8 products can saturate.
_VNNI = ("amx", "avx512vnni", "avxvnni")
_PROTO_LIMIT = 1_900_000_000  # bytes of weights above which an ONNX graph keeps them in external data
OV_GROUP_SIZE = 64  # divides every MLP width (multiples of 64) and every Llama hidden size
ORT_INT4 = {"block_size": 32, "is_symmetric": True, "bits": 4}
# Weight-only int8 (MatMulNBits, `ort-int8-wo`): symmetric blocks of 64 along K (the default model's widths are
# multiples of 64; a narrower input is padded, and the size model counts the padding), activations quantized per
# block inside the kernel (accuracy_level 4; 0, fp32 compute, decoded 7x slower than fp32). On the default model
# it loses KL 0.005-0.014 where dynamic int8 (whole-tensor activation scales) loses 0.59.
# The LM head gets its own weight (`untie_lm_head`); the embedding Gathers then read the head's int8 blocks through
# GatherBlockQuantized (`shared_embedding`), so a tied model stores the matrix once. The graph is exported with
# onnxruntime's fused attention (`fused_attention`, hwnas.fused): together 1.57x faster decode than the plain graph.
# Measured on AVX-512 VNNI only; on other CPUs the KL check of `hwnas quantize` is the guard.
ORT_INT8_WO = {"bits": 8, "block_size": 64, "is_symmetric": True, "accuracy_level": 4, "untie_lm_head": True,
               "shared_embedding": True, "fused_attention": True}
_GRAPH_KEYS = ("untie_lm_head", "quantize_embedding", "shared_embedding", "fused_attention")  # not the quantizer's


def ort_int8_settings(isa: str) -> dict[str, Any]:
    """onnxruntime `quantize_dynamic` settings for this CPU.

    Only MatMuls are quantized: quantizing the tied embedding Gather makes every decode step
    dequantize the whole LM head. A tied LM head reaches the graph as a Transpose of the embedding,
    which the quantizer skips, so it is first given its own (transposed) weight: it is the largest
    matrix a decode step reads. The embedding table that the Gather keeps is then stored in int8 too,
    one symmetric scale per row (`quantize_embedding`): each step dequantizes only the rows it reads.
    Without VNNI, signed int8 weights with full range saturate the u8s8 kernels (NLL 3.9 -> 16
    measured on the default model), so the range is reduced there. The graph is exported with
    onnxruntime's fused attention (`fused_attention`, hwnas.fused), as for int8-wo.
    """
    return {"op_types_to_quantize": ["MatMul"], "per_channel": True, "reduce_range": isa not in _VNNI,
            "weight_type": "QInt8", "untie_lm_head": True, "quantize_embedding": True, "fused_attention": True}


def untie_lm_head(model: Any) -> list[str]:
    """Give each MatMul that reads a Transpose of an initializer (a tied LM head) its own transposed weight.

    Edits the onnx ModelProto in place; returns the MatMuls changed. The embedding Gather keeps the original.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    transposes = {n.output[0]: n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    changed = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in transposes:
            t = transposes[node.input[1]]
            perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
            data = np.ascontiguousarray(np.transpose(numpy_helper.to_array(inits[t.input[0]]), perm))
            name = f"{t.input[0]}.untied_T"
            if name not in inits:
                graph.initializer.append(numpy_helper.from_array(data, name))
                inits[name] = graph.initializer[-1]
            node.input[1] = name
            changed.append(node.name)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in transposes.values():
        if t.output[0] not in used:
            graph.node.remove(t)
    return changed


def _embedding_gathers(model: Any) -> dict[str, list[Any]]:
    """Float initializers of rank 2 read only as the table (input 0) of Gathers of the graph input `input_ids`:
    token embeddings, by name. (A rotary cos/sin table gathered by position_ids is left alone.)"""
    from onnx import TensorProto

    graph = model.graph
    floats = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2}
    uses: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in floats:
                uses.setdefault(name, []).append((node, k))
    return {name: [n for n, _ in u] for name, u in uses.items()
            if all(n.op_type == "Gather" and k == 0 and n.input[1] == "input_ids" for n, k in u)
            and all(a.i == 0 for n, _ in u for a in n.attribute if a.name == "axis")}


def quantize_embeddings(model: Any) -> list[str]:
    """Store each token embedding table (a float initializer read only by Gathers of `input_ids` along axis 0)
    in int8 with one symmetric fp32 scale per row; each Gather then reads int8 rows and their scales and multiplies.

    Edits the onnx ModelProto in place; returns the tables changed. Uses only standard ONNX ops
    (Gather, Cast, Mul), so every runtime runs the result.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:  # named after its output
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    graph = model.graph
    found = _embedding_gathers(model)
    inits = {i.name: i for i in graph.initializer}
    for name, gathers in found.items():
        table = numpy_helper.to_array(inits[name]).astype(np.float32)
        scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
        graph.initializer.remove(inits[name])
        graph.initializer.extend([numpy_helper.from_array(q, f"{name}.int8"),
                                  numpy_helper.from_array(scale.astype(np.float32), f"{name}.row_scale")])
        for g in gathers:
            out, ids, base = g.output[0], g.input[1], g.name or out
            i = list(graph.node).index(g)
            graph.node.remove(g)
            new = [node("Gather", [f"{name}.int8", ids], f"{base}/int8", axis=0),
                   node("Gather", [f"{name}.row_scale", ids], f"{base}/scale", axis=0),
                   node("Cast", [f"{base}/int8"], f"{base}/float", to=TensorProto.FLOAT),
                   node("Mul", [f"{base}/float", f"{base}/scale"], out)]
            for k, n in enumerate(new):
                graph.node.insert(i + k, n)
    return sorted(found)


def share_embeddings(model: Any, block_size: int) -> list[str]:
    """Store each token embedding table (see `quantize_embeddings`) as int8 blocks read by onnxruntime's
    GatherBlockQuantized: the blocks of the MatMulNBits weight that `untie_lm_head` and the quantizer made of the
    same matrix (a tied LM head: the model then stores it once), else blocks quantized here the same way
    (symmetric, zero point 128, an fp32 scale per block of `block_size` along the hidden size).

    Edits the onnx ModelProto in place; returns the tables changed. A table whose width `block_size` does not divide
    gets one int8 scale per row instead (`quantize_embeddings`).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    found = {n: g for n, g in _embedding_gathers(model).items() if inits[n].dims[1] % block_size == 0}
    for name, gathers in found.items():
        vocab, hidden = inits[name].dims
        shape = [vocab, hidden // block_size, block_size]
        blocks = f"{name}.untied_T_Q8"  # MatMulNBitsQuantizer's name for the quantized head weight
        if blocks in inits and list(inits[blocks].dims) == shape:
            scales = numpy_helper.to_array(inits[f"{name}.untied_T_scales"]).reshape(vocab, -1, 1)
        else:
            table = numpy_helper.to_array(inits[name]).astype(np.float32).reshape(shape)
            scales = np.abs(table).max(axis=2, keepdims=True) / 127.0
            scales[scales == 0] = 1.0
            q = (np.clip(np.rint(table / scales), -128, 127) + 128).astype(np.uint8)
            blocks = f"{name}.blocks_Q8"
            graph.initializer.append(numpy_helper.from_array(q, blocks))
        graph.initializer.remove(inits[name])
        graph.initializer.extend([numpy_helper.from_array(scales.astype(np.float32), f"{name}.block_scales"),
                                  numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{name}.row_shape")])
        for g in gathers:
            out, ids, base = g.output[0], g.input[1], g.name or g.output[0]
            i = list(graph.node).index(g)
            graph.node.remove(g)
            graph.node.insert(i, helper.make_node("GatherBlockQuantized", [blocks, ids, f"{name}.block_scales"],
                                                  [f"{base}/blocks"], name=f"{base}/blocks", domain="com.microsoft",
                                                  gather_axis=0, quantize_axis=2, block_size=block_size, bits=8))
            graph.node.insert(i + 1, helper.make_node("Reshape", [f"{base}/blocks", f"{name}.row_shape"], [out],
                                                      name=out))
    if found and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sorted(found) + quantize_embeddings(model)


def down_proj_nodes(graph: Any, layers: Collection[int] | str) -> list[str]:
    """The down_proj MatMul nodes of `graph` (an onnx ModelProto): all of them (`layers="all"`), or those of
    the given decoder layers, named `/model/layers.{i}/mlp/down_proj/MatMul` in an Optimum export."""
    found = [n.name for n in graph.graph.node if n.op_type == "MatMul" and "/down_proj/" in n.name]
    if layers == "all":
        if not found:
            raise HwnasError("the graph has no down_proj MatMul to keep in fp32")
        return sorted(found)
    index = {name: int(m.group(1)) for name in found if (m := re.search(r"\.(\d+)/(?:mlp/)?down_proj/", name))}
    names = [name for name, i in index.items() if i in layers]
    missing = sorted(set(layers) - {index[n] for n in names})
    if missing:
        raise HwnasError(f"the graph has no down_proj MatMul for layers {missing} (expected nodes named "
                         f"/model/layers.{{i}}/mlp/down_proj/MatMul); cannot keep them fp32")
    return sorted(names)


def quantize_onnx(src: str | Path, dst: str | Path, *, precision: str, isa: str,
                  fp32_down: Collection[int] | str = ()) -> dict[str, Any]:
    """Quantize the ONNX graph `src` into `dst` for onnxruntime; returns the settings used.

    int8 is dynamic quantization (`quantize_dynamic`); int8-wo and int4 are weight-only (MatMulNBits).
    int8 only: `fp32_down` keeps the down_proj MatMuls of those decoder layers (or of all, "all") in
    fp32; the settings then list them as `nodes_to_exclude`.
    """
    src, dst = Path(src), Path(dst)
    if fp32_down and precision != "int8":
        raise HwnasError(f"keeping down_proj fp32 is an option of onnxruntime's dynamic int8, not {precision}")
    if precision == "int8-wo":
        return _quantize_nbits(src, dst, dict(ORT_INT8_WO))
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        import onnx

        settings = ort_int8_settings(isa)
        kwargs = {k: v for k, v in settings.items() if k not in _GRAPH_KEYS}
        kwargs["weight_type"] = QuantType[kwargs["weight_type"]]
        graph = onnx.load(str(src), load_external_data=False)  # the structure; the weights only if edited below
        settings["fused_attention"] = is_fused(graph)
        excluded = down_proj_nodes(graph, fp32_down) if fp32_down else []
        if excluded:
            kwargs["nodes_to_exclude"] = settings["nodes_to_exclude"] = excluded
        untied, tables, big = [], [], _large(src)
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".untied-") as work:
            untie = settings["untie_lm_head"] and _tied_heads(graph)
            if untie or settings["quantize_embedding"] and _embedding_gathers(graph):
                graph = onnx.load(str(src))
                untied = untie_lm_head(graph) if untie else []
                tables = quantize_embeddings(graph) if settings["quantize_embedding"] else []
                big = sum(i.ByteSize() for i in graph.graph.initializer) > _PROTO_LIMIT
                src = Path(work) / "model.onnx"  # a file, not the proto: a large graph exceeds protobuf's 2 GB
                onnx.save(graph, str(src), save_as_external_data=big, location="model.onnx_data")
            del graph
            quantize_dynamic(src, dst, use_external_data_format=big, **kwargs)
        return {"method": "onnxruntime.quantize_dynamic", **settings, "untied_matmuls": untied,
                "int8_embeddings": tables}
    if precision == "int4":
        return _quantize_nbits(src, dst, dict(ORT_INT4))
    raise HwnasError(f"onnxruntime precision {precision!r} is not supported; expected fp32, int8, int8-wo or int4")


def _quantize_nbits(src: Path, dst: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Weight-only MatMulNBits quantization of `src` into `dst`; untie the LM head / store the embedding in int8
    first where `settings` say so. Returns the settings used."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph = onnx.load(str(src))
    untied = untie_lm_head(graph) if settings.get("untie_lm_head") else []
    tables = quantize_embeddings(graph) if settings.get("quantize_embedding") else []
    if "fused_attention" in settings:  # what the graph is, not what was asked
        settings["fused_attention"] = is_fused(graph)
    kwargs = {k: v for k, v in settings.items() if k not in _GRAPH_KEYS}
    chatty = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")  # logs every node it skips
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        q = MatMulNBitsQuantizer(graph, **kwargs)
        q.process()
    finally:
        chatty.setLevel(level)
    if settings.get("shared_embedding"):
        tables = share_embeddings(q.model.model, settings["block_size"])
    q.model.save_model_to_file(str(dst), use_external_data_format=_large(src))
    return {"method": "onnxruntime.MatMulNBitsQuantizer", **settings, "untied_matmuls": untied,
            "int8_embeddings": tables}


def _large(path: Path) -> bool:
    """Whether the graph `path` (with its external data) must store its weights outside (protobuf's 2 GB)."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob("*.onnx_data")) > _PROTO_LIMIT


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
    if runtime == "onnxruntime" and precision == "int8-wo":
        return {"method": "onnxruntime.MatMulNBitsQuantizer", **ORT_INT8_WO}
    if runtime == "openvino":
        return {"method": "nncf.compress_weights", **ov_compression(precision)}
    raise HwnasError(f"{runtime} has no {precision} quantization; expected onnxruntime (int8, int8-wo, int4) or "
                     "openvino (int8, int4)")


# ------------------------------------------------------------------ `hwnas quantize`: one model, one artifact
# method -> the input kinds it takes (a torch checkpoint is exported first where the method needs ONNX)
METHODS: dict[str, tuple[str, ...]] = {
    "ort-int8": ("torch", "onnx"),
    "ort-int8-wo": ("torch", "onnx"),
    "nncf-int8": ("torch", "onnx"),
    "nncf-int4": ("torch", "onnx"),
    "ov-int8": ("torch",),
    "ov-int4": ("torch",),
    "bnb-int8": ("torch",),
    "bnb-nf4": ("torch",),
}
# Mean next-token KL (nats) to the fp32 source above which a quantization counts as failed. On the default
# model (8 x 128 held-out tokens) the worst working method, ort-int8, measures 0.59 on an AVX-512 VNNI CPU
# (0.62 without VNNI with the embedding in fp32, STACK.md); ov-int4 0.19, the int8 weight-only methods
# under 0.01. Full-range int8 without VNNI (NLL 3.9 -> 16) is far above. 1.0 is also what dropping 6 of
# its 30 layers costs.
DEFAULT_MAX_KL = 1.0
EVAL_SEQ_LEN = 128
AWQ_SEQUENCES = 32  # calibration sequences (of EVAL_SEQ_LEN tokens) for ov-int4's AWQ and scale estimation
FALLBACKS = ("error", "adjust", "ignore")  # NNCF's GroupSizeFallbackMode
GROUPED = ("nncf-int4", "ov-int4")  # the methods whose group size is a choice
RUNTIMES = {"ort": "onnxruntime", "nncf": "onnxruntime", "ov": "openvino, INFERENCE_PRECISION_HINT f32",
            "bnb": "torch + bitsandbytes"}
_WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".bin")
_LIBRARIES = {"ort": ("onnxruntime", "onnx", "optimum-onnx"), "nncf": ("nncf", "onnx", "onnxruntime", "optimum-onnx"),
              "ov": ("openvino", "nncf", "optimum-intel"), "bnb": ("bitsandbytes", "accelerate")}


def quantize_model(model: str | Path, method: str, out: str | Path, *, samples: int = 8, max_kl: float = DEFAULT_MAX_KL,
                   accept_loss: bool = False, overwrite: bool = False, group_size: int | None = None,
                   group_size_fallback: str = "error", keep_fp32: str | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Quantize `model` (a checkpoint folder, `smollm2-135m`, or an Optimum ONNX folder) with `method` into `out`.

    The artifact loads in its runtime (`load_quantized`). Its quality is measured against the fp32
    source on `samples` held-out calibration sequences; above `max_kl` the report says `passed: false`
    and, unless `accept_loss`, an HwnasError follows once the artifact is written. Returns the
    report, also saved as `out/quantize.json`.

    ort-int8 keeps in fp32 the down_proj of the layers a sub-network's `hwnas_subnet.json` marks in
    `fp32_down`, or of every layer with `keep_fp32="down_proj"`.
    """
    from tqdm.auto import tqdm

    _check_args(method, samples, max_kl, group_size, group_size_fallback, keep_fp32)
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
        settings = _QUANTIZERS[family](src, kind, tmp, method=method, model=ref, tokenizer=tokenizer,
                                       group_size=group_size, fallback=group_size_fallback, keep_fp32=keep_fp32)
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
                  "cpu": _cpu(), "versions": _versions(_LIBRARIES[family])}
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
        raise HwnasError(f"group size options apply to {' and '.join(GROUPED)} only, not {method}")
    if group_size is not None and group_size < 1:
        raise HwnasError(f"group size must be a positive integer, got {group_size}")
    if keep_fp32 is not None and (method, keep_fp32) != ("ort-int8", "down_proj"):
        raise HwnasError(f"--keep-fp32 takes down_proj, with --method ort-int8 only; got {keep_fp32!r} with {method}")


def _source(model: str | Path, method: str) -> tuple[Path, str]:
    """The source folder and its kind (`torch` or `onnx`), refusing what `method` cannot take and quantized models."""
    from .loading import read_llama_config, require_kind, resolve_model

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
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file())


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and tokenizer files: everything but weights, graphs and reports.

    A sub-network's config is marked `llama` for the runtimes' loaders, as hwnas's exports do.
    """
    from .export import runtime_config

    reports = ("quantize.json", "hwnas_onnx.json")
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (*_WEIGHT_SUFFIXES, ".xml") and f.name not in reports:
            shutil.copy2(f, dst / f.name)
    runtime_config(dst)


def _reference(src: Path, kind: str) -> tuple[Any, Any]:
    """The fp32 source (a torch model, or an ORT model for ONNX input) and its tokenizer."""
    if kind == "torch":
        from .loading import load_model

        model, tokenizer = load_model(src, allow_subnet=True)
    else:
        from optimum.onnxruntime import ORTModelForCausalLM
        from transformers import AutoTokenizer

        from . import modeling  # noqa: F401  (hwnas_llama configs)

        model = ORTModelForCausalLM.from_pretrained(src)
        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except Exception:  # a folder without tokenizer files surfaces as many exception types
            tokenizer = None
    if tokenizer is None:
        raise HwnasError(f"{src} has no tokenizer; quality is measured on calibration text, which needs one")
    return model, tokenizer


# -- the quantizers: (src, kind, dst, ...) -> the exact settings used; each leaves a loadable folder in dst
def _ort(src: Path, kind: str, dst: Path, *, method: str, model: Any, keep_fp32: str | None,
         **_: Any) -> dict[str, Any]:
    precision, isa = method.removeprefix("ort-"), _cpu()["isa"]
    onnx_dir = _as_onnx(src, kind, dst, model,
                        fused_attention=settings_for("onnxruntime", precision, isa).get("fused_attention", False))
    fp32_down = "all" if keep_fp32 == "down_proj" else _subnet_fp32_down(src)
    if precision == "int8-wo" and fp32_down:
        logger.info("ort-int8-wo quantizes every down_proj: the fp32 down_proj that %s marks is a remedy for "
                    "dynamic int8's activation loss, which weight-only int8 does not have", src)
        fp32_down = ()
    settings = quantize_onnx(onnx_dir / "model.onnx", dst / "model.onnx", precision=precision, isa=isa,
                             fp32_down=fp32_down)
    _copy_side_files(onnx_dir, dst)
    if onnx_dir != src:
        shutil.rmtree(onnx_dir)
    return settings


def _subnet_fp32_down(src: Path) -> list[int]:
    """Positions (in the checkpoint's renumbered layers) whose down_proj a sub-network keeps fp32."""
    if not (src / "hwnas_subnet.json").is_file():
        return []
    from .space import SubnetConfig

    return [i for i, fp32 in enumerate(SubnetConfig.from_json(src / "hwnas_subnet.json").fp32_down_mask) if fp32]


def _nncf(src: Path, kind: str, dst: Path, *, method: str, model: Any, group_size: int | None, fallback: str,
          **_: Any) -> dict[str, Any]:
    import onnx

    int4 = method.endswith("int4")
    if int4 and kind == "onnx" and (opset := _opset(src / "model.onnx")) < 21:
        raise HwnasError(f"{src / 'model.onnx'} has opset {opset}; NNCF INT4_ASYM runs in onnxruntime only from "
                         "opset 21: give the torch checkpoint (hwnas exports it at opset 21) or re-export at 21")
    onnx_dir = _as_onnx(src, kind, dst, model, opset=21 if int4 else None)
    graph = onnx.load(str(onnx_dir / "model.onnx"))
    settings = _settings(method, group_size, fallback)
    if tied := _tied_heads(graph):
        # NNCF cannot read a weight computed by a Transpose; the head then reads the compressed embedding.
        settings["ignored_scope"] = {"names": tied}
    compressed, settings = _nncf_compress(graph, settings)
    onnx.save(compressed, str(dst / "model.onnx"), save_as_external_data=_large(onnx_dir / "model.onnx"),
              location="model.onnx_data")
    _copy_side_files(onnx_dir, dst)
    if onnx_dir != src:
        shutil.rmtree(onnx_dir)
    return settings


def _ov(src: Path, kind: str, dst: Path, *, method: str, model: Any, tokenizer: Any, group_size: int | None,
        fallback: str, **_: Any) -> dict[str, Any]:
    import numpy as np
    import openvino as ov

    from .export import export_openvino

    fp32 = dst / ".fp32"
    xml = export_openvino(model, fp32)
    settings = _settings(method, group_size, fallback)
    dataset = None
    if method.endswith("int4"):  # data-aware: AWQ and scale estimation on the start of the calibration split
        ids = _calibration_ids(tokenizer, AWQ_SEQUENCES, from_end=False).numpy()
        dataset = [{"input_ids": row[None], "attention_mask": np.ones_like(row[None]),
                    "position_ids": np.arange(row.size, dtype=np.int64)[None], "beam_idx": np.zeros(1, np.int32)}
                   for row in ids]
        settings.update(awq=True, scale_estimation=True, subset_size=len(dataset),
                        dataset=f"lambada/calibration, first {len(dataset)} x {ids.shape[1]} tokens")
    compressed, settings = _nncf_compress(ov.Core().read_model(str(xml)), settings, dataset)
    ov.save_model(compressed, str(dst / "openvino_model.xml"), compress_to_fp16=False)
    _copy_side_files(fp32, dst)
    shutil.rmtree(fp32)
    return settings


def _bnb(src: Path, kind: str, dst: Path, *, method: str, model: Any, tokenizer: Any, **_: Any) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from . import modeling  # noqa: F401  (hwnas_llama checkpoints)

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


_QUANTIZERS: dict[str, Callable[..., dict[str, Any]]] = {"ort": _ort, "nncf": _nncf, "ov": _ov, "bnb": _bnb}


def _as_onnx(src: Path, kind: str, dst: Path, model: Any, *, opset: int | None = None,
             fused_attention: bool = False) -> Path:
    """The folder holding the fp32 ONNX model: the source itself (as it is), or a fresh export under `dst`."""
    if kind == "onnx":
        return src
    from .export import export_onnx

    export_onnx(model, dst / ".fp32", opset=opset, fused_attention=fused_attention)
    return dst / ".fp32"


def _opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _tied_heads(graph: Any) -> list[str]:
    """MatMuls whose weight is a Transpose of an initializer: a tied LM head reading the embedding."""
    inits = {i.name for i in graph.graph.initializer}
    transposed = {n.output[0] for n in graph.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    return [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in transposed]


def _settings(method: str, group_size: int | None, fallback: str) -> dict[str, Any]:
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


def _calibration_ids(tokenizer: Any, sequences: int, *, from_end: bool) -> Any:
    from .supernet import Calibration, calibration_batches

    # LAMBADA alone, as when the check's KL limit was set
    return calibration_batches(tokenizer, Calibration(num_sequences=sequences, seq_len=EVAL_SEQ_LEN, source="lambada"),
                               from_end=from_end)


# -- loading and quality
def load_quantized(path: str | Path, method: str | None = None) -> Any:
    """A quantized artifact in its own runtime: ORTModelForCausalLM, OVModelForCausalLM or a bitsandbytes torch model.

    `method` defaults to the one in `path/quantize.json`. OpenVINO runs at fp32 inference precision
    (its CPU default may be bf16), so that what is measured is the weight quantization alone.
    """
    from . import modeling  # noqa: F401  (hwnas_llama configs and models)
    from .loading import runtime_model

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
    from tqdm.auto import tqdm

    ids = _calibration_ids(tokenizer, samples, from_end=True)
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


def _cpu() -> dict[str, Any]:
    from .runner import cpu_info

    return cpu_info()


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "optimum", *names, "hwnas"):
        with contextlib.suppress(md.PackageNotFoundError):
            found[name] = md.version(name)
    return found
