"""ONNX graph surgery: the tied head untied, token embeddings in int8 (rows or shared blocks), down_proj nodes found."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwnas.common import HwnasError
from hwnas.onnx_graph import down_proj_nodes, quantize_embeddings, tied_heads, untie_lm_head
from hwnas.quantize import quantize_onnx


def tied_model(table: np.ndarray) -> onnx.ModelProto:
    """An embedding Gather of `input_ids` and a tied LM head: a MatMul reading a Transpose of the same table."""
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="gather"),
             helper.make_node("Transpose", ["emb"], ["embT"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "embT"], ["logits"], name="lm_head")]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 3])
    return helper.make_model(helper.make_graph(nodes, "g", [ids], [out], [numpy_helper.from_array(table, "emb")]),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_untie_lm_head_gives_the_head_its_own_weight():
    table = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    model = tied_model(table)
    x = {"input_ids": np.array([[1, 7, 19]])}
    before = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    assert tied_heads(model) == ["lm_head"]
    assert untie_lm_head(model) == ["lm_head"]
    assert tied_heads(model) == [] and "Transpose" not in [n.op_type for n in model.graph.node]
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(weights["emb.untied_T"], table.T)
    np.testing.assert_array_equal(ort.InferenceSession(model.SerializeToString()).run(None, x)[0], before)


def test_down_proj_nodes_of_chosen_layers_or_all():
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"/model/layers.{i}/mlp/down_proj/MatMul")
             for i in range(3)]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    assert down_proj_nodes(model, [0, 2]) == ["/model/layers.0/mlp/down_proj/MatMul",
                                              "/model/layers.2/mlp/down_proj/MatMul"]
    assert len(down_proj_nodes(model, "all")) == 3
    with pytest.raises(HwnasError, match=r"no down_proj MatMul for layers \[5\]"):
        down_proj_nodes(model, [1, 5])


def test_int8_wo_embedding_blocks_read_back_the_table(tmp_path: Path):
    """GatherBlockQuantized over the blocks `share_embeddings` writes returns the table to within a block's step,
    when the blocks are the (untied) head's and when they are made for an embedding alone."""
    table = np.random.default_rng(0).standard_normal((96, 128)).astype(np.float32)
    for tied in (True, False):
        model = tied_model(table)
        if not tied:
            del model.graph.node[1:]
            model.graph.node.append(helper.make_node("Identity", ["h"], ["logits"]))
        src, dst = tmp_path / f"m{tied}.onnx", tmp_path / f"q{tied}.onnx"
        onnx.save(model, str(src))
        settings = quantize_onnx(src, dst, precision="int8-wo", isa="avx2")
        assert settings["int8_embeddings"] == ["emb"] and settings["fused_attention"] is False
        q = onnx.load(str(dst))
        assert [n.op_type for n in q.graph.node].count("GatherBlockQuantized") == 1
        assert not [i for i in q.graph.initializer if i.name == "emb"]  # the fp32 table is gone
        # read the gathered rows back (cut the graph at the gather's output)
        q.graph.output[0].name = "h"
        del q.graph.node[[n.op_type for n in q.graph.node].index("Reshape") + 1:]
        got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"input_ids": np.array([[0, 5, 95]])})[0]
        step = np.abs(table).reshape(96, 2, 64).max(-1).repeat(64, -1) / 127
        assert (np.abs(got[0] - table[[0, 5, 95]]) <= step[[0, 5, 95]] / 2 + 1e-6).all()


def test_only_the_token_embedding_is_stored_in_int8():
    """A table gathered by position_ids (a rotary cache) keeps its fp32 values."""
    rng = np.random.default_rng(0)
    emb, rot = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(16, 8)).astype(np.float32)
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, [1, 3]) for n in ("input_ids", "position_ids")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 8]) for n in ("h", "r")]
    tables = [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(rot, "rot")]
    graph = helper.make_graph([helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
                               helper.make_node("Gather", ["rot", "position_ids"], ["r"], name="rotary")],
                              "g", ids, outs, tables)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert quantize_embeddings(model) == ["emb"]
    x = np.array([[3, 0, 49]])
    h, r = ort.InferenceSession(model.SerializeToString()).run(None, {"input_ids": x, "position_ids": x % 16})
    np.testing.assert_array_equal(r, rot[x % 16])
    step = np.abs(emb).max(axis=1) / 127  # the rounding error of a row is at most half its step
    assert np.all(np.abs(h[0] - emb[x[0]]) <= step[x[0], None] / 2 + 1e-7) and not np.array_equal(h[0], emb[x[0]])
