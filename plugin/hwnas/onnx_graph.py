"""ONNX graph surgery around quantization: untie the LM head, store token embeddings in int8, find nodes.

Each function edits or reads an `onnx.ModelProto` (or a graph file) and knows nothing about runtimes or
settings; `quantize_backends` decides which of them a quantization applies.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Collection

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .common import HwnasError

PROTO_LIMIT = 1_900_000_000  # bytes of weights above which an ONNX graph keeps them in external data


def needs_external_data(path: Path) -> bool:
    """Whether the graph `path` (with its external data) must store its weights outside (protobuf's 2 GB)."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob("*.onnx_data")) > PROTO_LIMIT


def opset_version(path: Path) -> int:
    """The default-domain opset of the graph file `path` (its weights are not read)."""
    m = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


def tied_heads(model: Any) -> list[str]:
    """MatMuls whose weight is a Transpose of an initializer: a tied LM head reading the embedding."""
    inits = {i.name for i in model.graph.initializer}
    transposed = {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in transposed]


def untie_lm_head(model: Any) -> list[str]:
    """Give each MatMul that reads a Transpose of an initializer (a tied LM head) its own transposed weight.

    Edits the onnx ModelProto in place; returns the MatMuls changed. The embedding Gather keeps the original.
    """
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


def embedding_gathers(model: Any) -> dict[str, list[Any]]:
    """Float initializers of rank 2 read only as the table (input 0) of Gathers of the graph input `input_ids`:
    token embeddings, by name. (A rotary cos/sin table gathered by position_ids is left alone.)"""
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
    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:  # named after its output
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    graph = model.graph
    found = embedding_gathers(model)
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
            out, ids, base = g.output[0], g.input[1], g.name or g.output[0]
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
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    found = {n: g for n, g in embedding_gathers(model).items() if inits[n].dims[1] % block_size == 0}
    for name, gathers in found.items():
        vocab, hidden = inits[name].dims
        shape = [vocab, hidden // block_size, block_size]
        q4 = f"{name}.untied_T_Q4"  # a 4-bit head (--head-bits 4): the lookup reads its nibbles, as GenAI ties them
        if q4 in inits and list(inits[q4].dims) == [vocab, hidden // block_size, block_size // 2]:
            _gather_nibbles(graph, name, q4, gathers, vocab, hidden, block_size)
            graph.initializer.remove(inits[name])
            continue
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


def _gather_nibbles(graph: Any, name: str, q4: str, gathers: list[Any], vocab: int, hidden: int,
                    block_size: int) -> None:
    """Replace the Gathers of table `name` by GatherBlockQuantized (4 bits) over the packed blocks `q4` and the
    scales of the LM head's MatMulNBits, each reshaped to one row a token (as ONNX Runtime GenAI's builder does)."""
    rows, scales = f"{name}.q4_rows", f"{name}.q4_row_scales"
    graph.initializer.extend([numpy_helper.from_array(np.array([vocab, hidden // 2], np.int64), f"{rows}_shape"),
                              numpy_helper.from_array(np.array([vocab, hidden // block_size], np.int64),
                                                      f"{scales}_shape")])
    graph.node.insert(0, helper.make_node("Reshape", [q4, f"{rows}_shape"], [rows], name=rows))
    graph.node.insert(1, helper.make_node("Reshape", [f"{name}.untied_T_scales", f"{scales}_shape"], [scales],
                                          name=scales))
    for g in gathers:
        i = list(graph.node).index(g)
        graph.node.remove(g)
        graph.node.insert(i, helper.make_node("GatherBlockQuantized", [rows, g.input[1], scales], [g.output[0]],
                                              name=g.name or g.output[0], domain="com.microsoft", gather_axis=0,
                                              quantize_axis=1, block_size=block_size, bits=4))


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
