"""Size-only integer storage (``--storage int8|int4``): decode subgraphs folded by onnxruntime at load.

Structure: Cast/Mul decode chains in the file, none left after onnxruntime's load-time folding.
Numbers: the stored model computes exactly with the dequantized weights (lossless against a float
model holding those weights), the per-weight error is at most half a step, exact zeros stay zeros,
and the file shrinks. Refusals: weights read outside a weight slot, graph outputs, tiny tensors.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
from onnxcompress.api import compress
from onnxcompress.errors import RecipeError
from onnxcompress.graph.naming import Namer
from onnxcompress.quantize.config import StorageConfig
from onnxcompress.quantize.storage import encode_values, encode_weight
from onnxcompress.recipe import Recipe


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _storage(model, **kw):
    return compress(model, Recipe(steps=(StorageConfig(**kw),)))


def _details(res) -> list[dict]:
    return next(s for s in res.report.to_dict()["steps"] if s["name"] == "storage")["details"]["storage"]


def _decoded_reference(model: onnx.ModelProto, *, bits: str, block: int, axes: dict[str, int]) -> onnx.ModelProto:
    """The float model with each stored weight replaced by its numpy-decoded value."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in axes:
            w = numpy_helper.to_array(t)
            q, s, view = encode_values(w, bits=bits, axis=axes[t.name], block=block)
            t.CopyFrom(numpy_helper.from_array((q.astype(np.float32) * s).reshape(w.shape), t.name))
    return m


@pytest.mark.parametrize("bits,block,max_ratio", [("int8", 0, 0.27), ("int8", 32, 0.30), ("int4", 0, 0.15),
                                                   ("int4", 32, 0.19)])
def test_storage_is_exact_to_the_decoded_weights_and_small(bits, block, max_ratio, tmp_path):
    m = builders.mlp((128, 256, 64))
    res = _storage(m, bits=bits, block=block, min_elements=1024)
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    ops = _ops(out)
    assert ops["Cast"] >= 2 and ops["Mul"] >= 2
    assert not [t.name for t in out.graph.initializer if t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= 4096]
    size = lambda mm: sum(numpy_helper.to_array(t).nbytes for t in mm.graph.initializer)  # noqa: E731
    assert size(out) / size(m) <= max_ratio
    # exact: against the float model holding the numpy-decoded weights
    x = {"x": np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)}
    ref = builders.run(_decoded_reference(m, bits=bits, block=block, axes={"W0": 1, "W1": 1}), x)[0]
    got = builders.run(out, x, optimize=True)[0]
    assert builders.lossless_close(ref, got)
    # onnxruntime folds the decode chains when it loads the model: what runs is the fp32 graph
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    opt = _ops(onnx.load(str(tmp_path / "opt.onnx")))
    assert opt["Cast"] == 0 and opt["Div"] == 0 and opt["Concat"] == 0, opt
    details = {d["weight"]: d for d in _details(res)}
    assert details["W0"]["block"] == block and details["W0"]["bits"] == bits


def test_half_step_error_and_zeros_stay_zero():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0  # pruned weights
    for bits, qmax in (("int8", 127), ("int4", 7)):
        for block in (0, 32):
            q, s, view = encode_values(w, bits=bits, axis=0, block=block)
            dec = (q.astype(np.float32) * s).reshape(w.shape)
            assert np.all(dec[w == 0] == 0)
            step = np.broadcast_to(s, q.shape).reshape(w.shape)
            assert np.all(np.abs(dec - w) <= step / 2 + 1e-7)
            assert np.abs(q).max() <= qmax


def test_encode_weight_is_reusable_and_odd_int4_lengths_work():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((5, 7)).astype(np.float32)  # 35 codes: one padding nibble
    x = gs.Variable("x", dtype=np.float32, shape=["N", 5])
    y = gs.Variable("y", dtype=np.float32, shape=["N", 7])
    g = gs.Graph(inputs=[x], outputs=[y], opset=17)
    enc = encode_weight(g, Namer.for_graph(g), w, base="w", bits="int4", axis=1)
    g.nodes.append(gs.Node("MatMul", inputs=[x, enc.output], outputs=[y]))
    model = gs.export_onnx(g)
    model.ir_version = 8
    onnx.checker.check_model(model)
    xv = rng.standard_normal((3, 5)).astype(np.float32)
    q, s, _ = encode_values(w, bits="int4", axis=1, block=0)
    np.testing.assert_allclose(builders.run(model, {"x": xv})[0], xv @ (q * s), rtol=1e-5, atol=1e-6)
    assert enc.info["stored_bytes"] == 17 + 4 + 7 * 4  # 17 packed bytes, the odd code as int32, 7 scales


def test_block_that_does_not_divide_falls_back_to_per_channel():
    m = builders.mlp((48, 40))  # W0 [48, 40]: blocks of 32 along 48 do not fit
    res = _storage(m, block=32, min_elements=100)
    d = _details(res)[0]
    assert d["stored"] and d["block"] == 0 and "multiple" in d["note"]


def test_declines_weights_read_outside_weight_slots_graph_outputs_and_tiny():
    m = builders.mlp((64, 64, 8))
    # W0 also read by an Add (not a weight slot); W1 is also a graph output
    m.graph.node.append(helper.make_node("Add", ["W0", "W0"], ["w0x2"], name="reads_w0"))
    m.graph.output.extend([helper.make_tensor_value_info("w0x2", TensorProto.FLOAT, [64, 64]),
                           helper.make_tensor_value_info("W1", TensorProto.FLOAT, [64, 8])])
    res = _storage(m, min_elements=256)
    reasons = {s["node"]: s["reason"] for s in res.report.to_dict()["steps"][0]["skipped"]}
    assert "outside a weight slot" in reasons["W0"]
    assert "graph output" in reasons["W1"] or "min_elements" in reasons["W1"]
    assert _ops(res.model)["Cast"] == 0
    res = _storage(builders.mlp((8, 4)), min_elements=1024)
    assert "min_elements" in res.report.to_dict()["steps"][0]["skipped"][0]["reason"]
    with pytest.raises(RecipeError):
        StorageConfig(block=24)


def test_constant_nodes_and_if_subgraphs_are_stored_too():
    base = builders.mlp((64, 64, 8))
    x = {"x": np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)}
    ref = builders.run(_storage(base, min_elements=256).model, x)[0]
    for variant in (builders.with_constant_nodes(base), builders.with_if_subgraph(base)):
        res = _storage(variant, min_elements=256)
        onnx.checker.check_model(res.model, full_check=True)
        stored = [d for d in _details(res) if d["stored"]]
        assert len(stored) == (2 if variant.graph.node[0].op_type != "If" else 4)
        np.testing.assert_array_equal(builders.run(res.model, x)[0], ref)


def test_cli_storage_flag(tmp_path):
    from onnxcompress.cli import main

    src = tmp_path / "in.onnx"
    onnx.save(builders.mlp((128, 128, 16)), str(src))
    out = tmp_path / "out.onnx"
    assert main([str(src), str(out), "--storage", "int4", "--storage-block", "32", "-q"]) == 0
    assert out.stat().st_size < 0.3 * src.stat().st_size


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_an_initializer_read_by_both_if_branches_is_decoded_in_the_main_graph(bits):
    """Both branches of an If read the main graph's weight ``w``: the decode used to land in the branch
    that found it first, so the other branch read a tensor it cannot see (an invalid model). It now
    goes to the main graph, where both branches see it."""
    rng = np.random.default_rng(0)
    w = (0.2 * rng.standard_normal((64, 64))).astype(np.float32)
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t_out"], name="then_mm")], "then", [],
                               [vi("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["e0"], name="else_mm"),
                                helper.make_node("Neg", ["e0"], ["e_out"], name="else_neg")], "else", [],
                               [vi("e_out", TensorProto.FLOAT, None)])
    g = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="rs"),
                           helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
                           helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
                          "g", [vi("x", TensorProto.FLOAT, ["N", 64])], [vi("y", TensorProto.FLOAT, ["N", 64])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = compress(m, Recipe(steps=(StorageConfig(bits=bits),)))
    onnx.checker.check_model(res.model, full_check=True)
    assert not any(t.name == "w" for t in res.model.graph.initializer)  # stored compactly, decoded once
    x = np.abs(rng.standard_normal((4, 64))).astype(np.float32)
    for feed in ({"x": x}, {"x": -x}):  # the two branches
        ref, out = builders.run(m, feed)[0], builders.run(res.model, feed)[0]
        assert float(np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out)) > 0.99


def test_int8_without_data_stores_a_conv_weight_read_by_both_if_branches_in_the_main_graph():
    """int8 without calibration data stores Conv weights as int8 (size only) through the same
    decode placement as --storage: a weight both If branches read is decoded in the main graph."""
    from onnxcompress.quantize.config import QuantizeInt8Config

    rng = np.random.default_rng(1)
    w = (0.3 * rng.standard_normal((4, 3, 3, 3))).astype(np.float32)
    vi = helper.make_tensor_value_info
    branch = [helper.make_graph([helper.make_node("Conv", ["x", "w"], [f"{b}_out"], name=f"{b}_conv", pads=[1] * 4)]
                                + ([helper.make_node("Neg", [f"{b}_out"], ["e_neg"], name="else_neg")] if b == "e" else []),
                                b, [], [vi("e_neg" if b == "e" else f"{b}_out", TensorProto.FLOAT, None)])
              for b in ("t", "e")]
    g = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="rs"),
                           helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
                           helper.make_node("If", ["c"], ["y"], then_branch=branch[0], else_branch=branch[1], name="if")],
                          "g", [vi("x", TensorProto.FLOAT, [1, 3, 8, 8])], [vi("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    res = compress(m, Recipe(steps=(QuantizeInt8Config(mode="dynamic", keep_first_last=False),)))
    onnx.checker.check_model(res.model, full_check=True)
    assert not any(t.name == "w" for t in res.model.graph.initializer)
    x = np.abs(rng.standard_normal((1, 3, 8, 8))).astype(np.float32)
    for feed in ({"x": x}, {"x": -x}):
        ref, out = builders.run(m, feed)[0], builders.run(res.model, feed)[0]
        assert float(np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out)) > 0.99
