"""cleanup, dedupe_initializers, fold_constants: structure changed, numbers unchanged, declines."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders as b
from onnxcompress.context import Context
from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
from onnxcompress.passes.base import Pipeline
from onnxcompress.passes.cleanup import (
    CleanupConfig,
    CleanupPass,
    DedupeConfig,
    DedupeInitializersPass,
    FoldConstantsConfig,
    FoldConstantsPass,
)


def _apply(model, *passes):
    graph = model_to_graph(open_model(model))
    with Context() as ctx:
        results = Pipeline(list(passes)).run(graph, ctx)
    out = graph_to_model(graph, model)
    onnx.checker.check_model(out)
    return out, results


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _model(nodes, inits, inputs=("x",), outputs=("y",), shape=(2, 4)):
    g = helper.make_graph(
        nodes, "t",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, list(shape)) for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None, None]) for o in outputs],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


X = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}


# -- cleanup -----------------------------------------------------------------------------------

def test_identity_removed_and_numbers_equal():
    m = _model([
        helper.make_node("Identity", ["x"], ["i1"]),
        helper.make_node("Relu", ["i1"], ["r"]),
        helper.make_node("Identity", ["r"], ["y"]),
    ], [])
    out, (res,) = _apply(m, CleanupPass())
    assert _ops(out) == ["Relu"]
    assert [o.name for o in out.graph.output] == ["y"] and [i.name for i in out.graph.input] == ["x"]
    np.testing.assert_array_equal(b.run(out, X)[0], b.run(m, X)[0])
    assert res.modified


def test_attributes_equal_to_their_defaults_are_dropped():
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32), "w")
    c = numpy_helper.from_array(np.ones(3, np.float32), "c")
    m = _model([
        helper.make_node("Gemm", ["x", "w", "c"], ["g"], alpha=1.0, beta=1.0, transA=0, transB=1),
        helper.make_node("LeakyRelu", ["g"], ["l"], alpha=0.5),          # not its default (0.01): kept
        helper.make_node("Softmax", ["l"], ["y"], axis=-1),              # the default at opset 13+: dropped
    ], [w, c])
    out, (res,) = _apply(m, CleanupPass())
    attrs = {n.op_type: {a.name for a in n.attribute} for n in out.graph.node}
    assert attrs == {"Gemm": {"transB"}, "LeakyRelu": {"alpha"}, "Softmax": set()}
    assert any("4 attributes" in c for c in res.changes)
    np.testing.assert_array_equal(b.run(out, X)[0], b.run(m, X)[0])
    kept, _ = _apply(m, CleanupPass(CleanupConfig(drop_default_attributes=False)))
    assert {a.name for a in kept.graph.node[0].attribute} == {"alpha", "beta", "transA", "transB"}


def test_identity_between_input_and_output_is_kept():
    m = _model([helper.make_node("Identity", ["x"], ["y"])], [])
    out, (res,) = _apply(m, CleanupPass())
    assert _ops(out) == ["Identity"]
    assert res.skipped and "graph output" in res.skipped[0].reason


def test_dead_nodes_and_unused_initializers_removed():
    w = numpy_helper.from_array(np.ones((4,), np.float32), "unused")
    m = _model([
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["dead"]),
    ], [w])
    out, (res,) = _apply(m, CleanupPass())
    assert _ops(out) == ["Relu"] and not out.graph.initializer
    assert res.modified


# -- dedupe ------------------------------------------------------------------------------------

def test_dedupe_merges_identical_initializers():
    a = np.arange(4, dtype=np.float32)
    m = _model([
        helper.make_node("Add", ["x", "a"], ["s"]),
        helper.make_node("Mul", ["s", "b"], ["y"]),
    ], [numpy_helper.from_array(a, "a"), numpy_helper.from_array(a.copy(), "b")])
    out, (res,) = _apply(m, DedupeInitializersPass(DedupeConfig()))
    assert len(out.graph.initializer) == 1
    np.testing.assert_array_equal(b.run(out, X)[0], b.run(m, X)[0])
    assert res.changes == ["b -> a (16 bytes)"]


def test_dedupe_declines_different_values_and_dtypes():
    a = np.arange(4, dtype=np.float32)
    m = _model([
        helper.make_node("Add", ["x", "a"], ["s"]),
        helper.make_node("Mul", ["s", "b"], ["y"]),
    ], [numpy_helper.from_array(a, "a"), numpy_helper.from_array(a + 1, "b")])
    out, (res,) = _apply(m, DedupeInitializersPass(DedupeConfig()))
    assert len(out.graph.initializer) == 2 and not res.modified


# -- fold_constants ----------------------------------------------------------------------------

def test_fold_transpose_of_weight():
    w = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    m = _model([
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ], [numpy_helper.from_array(w, "w")])
    out, (res,) = _apply(m, FoldConstantsPass(FoldConstantsConfig()))
    assert _ops(out) == ["MatMul"]
    (init,) = out.graph.initializer
    np.testing.assert_array_equal(numpy_helper.to_array(init), w.T)
    np.testing.assert_array_equal(b.run(out, X)[0], b.run(m, X)[0])


def test_fold_declines_when_the_file_would_grow():
    """Cast(int8) -> Mul is a compact decode chain: folding it would make the file 4x larger."""
    q = np.random.default_rng(2).integers(-127, 127, (4, 64)).astype(np.int8)
    m = _model([
        helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["qf", "s"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ], [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.float32(0.01), "s")])
    out, (res,) = _apply(m, FoldConstantsPass(FoldConstantsConfig()))
    assert _ops(out) == ["Cast", "Mul", "MatMul"]
    assert any("grow" in s.reason for s in res.skipped)
    # a budget that allows growth folds it
    out2, _ = _apply(m, FoldConstantsPass(FoldConstantsConfig(max_growth=8.0)))
    assert _ops(out2) == ["MatMul"]
    np.testing.assert_array_equal(b.run(out2, X)[0], b.run(m, X)[0])


def test_fold_declines_non_constant_inputs_and_qdq():
    m = _model([
        helper.make_node("QuantizeLinear", ["c", "s"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s"], ["d"]),
        helper.make_node("Add", ["x", "d"], ["y"]),
    ], [numpy_helper.from_array(np.ones(4, np.float32), "c"), numpy_helper.from_array(np.float32(0.1), "s")])
    out, (res,) = _apply(m, FoldConstantsPass(FoldConstantsConfig()))
    assert _ops(out) == ["QuantizeLinear", "DequantizeLinear", "Add"]
    assert not res.modified


def test_lossless_passes_inside_if_subgraph():
    m = b.with_if_subgraph(b.mlp())
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)}
    out, _ = _apply(m, CleanupPass(), DedupeInitializersPass(), FoldConstantsPass())
    assert b.lossless_close(b.run(m, feeds)[0], b.run(out, feeds)[0])


def test_lossless_prefix_folds_bn_even_when_biases_are_identical():
    """Two Conv+BN branches with the same (zero) conv bias: deduplication runs after the merges, so
    both BatchNormalizations still fold."""
    import onnxcompress as oc

    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(np.zeros(4, np.float32), "b1"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")]
    nodes = []
    for i in (1, 2):
        inits += [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), f"w{i}")]
        inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), f"{k}{i}") for k in ("s", "v")]
        inits += [numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"{k}{i}") for k in ("t", "m")]
        nodes += [helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"c{i}"]),
                  helper.make_node("BatchNormalization", [f"c{i}", f"s{i}", f"t{i}", f"m{i}", f"v{i}"], [f"n{i}"])]
    nodes.append(helper.make_node("Add", ["n1", "n2"], ["y"]))
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = oc.compress(m)
    assert res.parity.passed
    assert [n.op_type for n in res.model.graph.node].count("BatchNormalization") == 0
