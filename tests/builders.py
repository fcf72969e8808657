"""Tiny models for tests, built from ONNX text or onnx.helper, seeded and deterministic."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def mlp(sizes=(16, 32, 8), *, seed: int = 0, opset: int = 17, batch: str | int = "N") -> onnx.ModelProto:
    """x[N, sizes[0]] -> (MatMul + Add + Relu)* -> MatMul + Add -> y[N, sizes[-1]]."""
    rng = _rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (0.1 * rng.standard_normal(b)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(bias, f"B{i}")]
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"], name=f"MatMul_{i}"))
        last = i == len(sizes) - 2
        out = "y" if last else f"add{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"B{i}"], [out], name=f"Add_{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"Relu_{i}"))
            prev = f"relu{i}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, sizes[-1]])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def conv_bn(*, seed: int = 0, channels: int = 8, opset: int = 17) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = _rng(seed)
    c = channels
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3, "conv.w"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "conv.b"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn.scale"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "bn.bias"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "bn.mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn.var"),
        numpy_helper.from_array(rng.standard_normal((4, c)).astype(np.float32) * 0.3, "fc.w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "fc.b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def with_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer moved into a ``Constant`` node (as Paddle2ONNX does)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    consts = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in m.graph.initializer]
    nodes = consts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.initializer[:]
    onnx.checker.check_model(m)
    return m


def with_if_subgraph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Wrap the whole graph in both branches of an ``If`` on a constant-true condition.

    The weights move inside the branches (as initializers of the then/else subgraphs), so a pass
    that only looks at top-level initializers finds nothing.
    """
    g = model.graph
    outs = [helper.make_tensor_value_info(o.name, o.type.tensor_type.elem_type, None) for o in g.output]

    def branch(name: str) -> onnx.GraphProto:
        b = helper.make_graph(list(g.node), name, [], outs, [onnx.TensorProto().__class__.FromString(t.SerializeToString())
                                                             for t in g.initializer])
        return b

    cond = numpy_helper.from_array(np.array(True), "cond")
    if_node = helper.make_node("If", ["cond"], [o.name for o in g.output], name="if",
                               then_branch=branch("then"), else_branch=branch("else"))
    graph = helper.make_graph([if_node], g.name + "_if", list(g.input), list(g.output), [cond])
    m = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="tests")
    m.ir_version = model.ir_version
    onnx.checker.check_model(m)
    return m


def run(model: onnx.ModelProto | bytes | str, feeds: dict, *, optimize: bool = False) -> list[np.ndarray]:
    """Run with onnxruntime on the CPU (graph optimizations off unless ``optimize``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def lossless_close(ref: np.ndarray, out: np.ndarray, *, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """The project's lossless rule: max|ref - out| <= atol + rtol * max|ref|."""
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    return ref.shape == out.shape and float(np.max(np.abs(ref - out), initial=0)) <= atol + rtol * float(
        np.max(np.abs(ref), initial=0))
