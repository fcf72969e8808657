"""int8 quantization (quantize_int8): static QDQ, dynamic, the plan, and when it declines.

Three ways: the structure (Q/DQ counts; the kernels onnxruntime fuses them into), the numbers
(quantization-step-aware bounds, cosine / top-1, digits accuracy) and the refusals (Skips with reasons).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
from onnxcompress.api import compress
from onnxcompress.context import Context
from onnxcompress.errors import CalibrationError, RecipeError
from onnxcompress.quantize.config import QuantizeInt8Config
from onnxcompress.recipe import Recipe

RNG_SEED = 0


def _recipe(**kw) -> Recipe:
    return Recipe(steps=(QuantizeInt8Config(**kw),))


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _fused_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    """Op types after onnxruntime's CPU optimizations (what actually runs)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return _ops(onnx.load(str(tmp_path / "optimized.onnx")))


def _plan(result) -> dict:
    step = next(s for s in result.report.to_dict()["steps"] if s["name"] == "quantize_int8")
    return step["details"]["plan"]


def _gemm_relu(seed=0, sizes=(32, 64, 48, 10)) -> onnx.ModelProto:
    """x -> (Gemm + Relu)* -> Gemm -> y, weights [out, in] with transB=1 (the PyTorch Linear export)."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        inits += [numpy_helper.from_array((rng.standard_normal((b, a)) / np.sqrt(a)).astype(np.float32), f"fc{i}.w"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(b)).astype(np.float32), f"fc{i}.b")]
        last = i == len(sizes) - 2
        out = "y" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"fc{i}.w", f"fc{i}.b"], [out], name=f"fc{i}", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            prev = f"r{i}"
    g = helper.make_graph(nodes, "gemm_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _feeds(model, n=64, seed=RNG_SEED):
    rng = np.random.default_rng(seed)
    inp = model.graph.input[0]
    shape = [n if (d.dim_param or not d.dim_value) else d.dim_value for d in inp.type.tensor_type.shape.dim]
    return {inp.name: rng.standard_normal(shape).astype(np.float32)}


def _output_step(model: onnx.ModelProto) -> float:
    """The scale of the QuantizeLinear that writes (through its DQ) the first graph output."""
    out = model.graph.output[0].name
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == out)
    init = {t.name: t for t in model.graph.initializer}
    return float(numpy_helper.to_array(init[dq.input[1]]))


def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------------------- static


def test_static_gemm_relu_structure_fusion_and_numbers(tmp_path):
    m = _gemm_relu()
    calib = _feeds(m, 128, seed=1)
    res = compress(m, _recipe(mode="static"), data=[calib])
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    ops = _ops(out)
    # 3 Gemm -> QDQ layout: input Q/DQ + output Q/DQ per layer (outputs shared with next inputs), weight+bias DQ
    assert ops["Gemm"] == 3 and ops["Relu"] == 0, ops  # both Relus absorbed by the saturating Q
    assert ops["QuantizeLinear"] == 4 and ops["DequantizeLinear"] == 4 + 6, ops
    fused = _fused_ops(out, tmp_path)
    assert fused["QGemm"] == 3 and fused["Gemm"] == 0, fused
    plan = _plan(res)
    assert plan["counts"]["qdq"] == 3 and plan["counts"]["fused"] == 2
    assert all(t["zero_point"] == 0 for t in plan["tensors"] if t["tensor"].startswith("r")), plan["tensors"]
    step = _output_step(out)
    # on the calibration data nothing saturates: the error is rounding only, a few output steps
    ref, fast = builders.run(m, calib)[0], builders.run(out, calib, optimize=True)[0]
    assert np.max(np.abs(fast - ref)) <= 6 * step
    x = _feeds(m, 256, seed=2)
    ref = builders.run(m, x)[0]
    unfused = builders.run(out, x)[0]
    fast = builders.run(out, x, optimize=True)[0]
    # onnxruntime's fused kernels round ties differently: at most one output step from the unfused graph
    assert np.max(np.abs(fast - unfused)) <= 1.0 * step + 1e-6
    # unseen data: direction kept, decisions kept
    assert _cosine(ref, fast) > 0.999
    assert np.mean(ref.argmax(1) == fast.argmax(1)) >= 0.97


def test_matmul_read_by_a_bias_add_keeps_a_float_output(tmp_path):
    """MatMul -> Add(bias) on a rank-3 input: no output Q, so onnxruntime fuses MatMulIntegerToFloat
    with the bias (a rank-2 MatMul + Add becomes a Gemm first, which keeps the classic layout)."""
    m = builders.mlp((32, 64, 10))
    m.graph.input[0].type.tensor_type.shape.dim.insert(1, onnx.TensorShapeProto.Dimension(dim_value=4))
    m.graph.output[0].type.tensor_type.shape.dim.insert(1, onnx.TensorShapeProto.Dimension(dim_value=4))
    calib = [_feeds(m, 64, seed=1)]
    res = compress(m, _recipe(mode="static"), data=calib)
    fused = _fused_ops(res.model, tmp_path)
    assert fused["MatMulIntegerToFloat"] == 2 and fused["MatMul"] == 0 and fused["QLinearMatMul"] == 0, fused
    assert _ops(res.model)["QuantizeLinear"] == 2  # x and relu0 output; no Q after either MatMul
    strict = compress(m, _recipe(mode="static", matmul_float_output=False), data=calib)
    assert _ops(strict.model)["QuantizeLinear"] == 4
    assert _fused_ops(strict.model, tmp_path)["QLinearMatMul"] == 2
    two_d = compress(builders.mlp((32, 64, 10)), _recipe(mode="static"), data=[_feeds(builders.mlp((32, 64, 10)), 64)])
    assert _fused_ops(two_d.model, tmp_path)["QLinearMatMul"] == 2
    x = _feeds(m, 128, seed=2)
    ref = builders.run(m, x)[0]
    e_float = np.abs(builders.run(res.model, x, optimize=True)[0] - ref).mean()
    e_strict = np.abs(builders.run(strict.model, x, optimize=True)[0] - ref).mean()
    assert e_float < e_strict  # one rounding step fewer per layer


def test_static_conv_chain_is_integer(tmp_path):
    """Conv -> Relu -> MaxPool -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm: one integer chain."""
    rng = np.random.default_rng(3)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3, 8, 8] x) => (float[N, 5] y) {
        c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
        c2 = Conv <pads = [1, 1, 1, 1]> (p1, w2, b2)
        r2 = Relu (c2)
        g2 = GlobalAveragePool (r2)
        f = Flatten (g2)
        y = Gemm <transB = 1> (f, wf, bf)
    }"""
    m = onnx.parser.parse_model(text)
    for name, shape in [("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (16, 8, 3, 3)), ("b2", (16,)), ("wf", (5, 16)),
                        ("bf", (5,))]:
        m.graph.initializer.append(numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(np.float32), name))
    onnx.checker.check_model(m)
    res = compress(m, _recipe(mode="static"), data=[_feeds(m, 32, seed=4)])
    fused = _fused_ops(res.model, tmp_path)
    assert fused["QLinearConv"] == 2 and fused["QGemm"] == 1, fused
    assert fused["Conv"] == 0 and fused["Relu"] == 0 and fused["MaxPool"] + fused.get("QLinearGlobalAveragePool", 0) >= 1
    plan = _plan(res)
    kinds = {n["node"]: n for n in plan["nodes"]}
    assert "scale" in kinds[[k for k in kinds if kinds[k]["op"] == "MaxPool"][0]]["reason"]
    x = _feeds(m, 64, seed=5)
    ref, out = builders.run(m, x)[0], builders.run(res.model, x, optimize=True)[0]
    assert _cosine(ref, out) > 0.995


def test_static_per_tensor_and_s8_options_change_the_graph():
    m = _gemm_relu()
    calib = [_feeds(m, 64, seed=1)]
    pc = compress(m, _recipe(mode="static"), data=calib).model
    pt = compress(m, _recipe(mode="static", per_channel=False, activation_type="s8", symmetric=True),
                  data=calib).model
    init = lambda mm: {t.name: numpy_helper.to_array(t) for t in mm.graph.initializer}  # noqa: E731
    pc_scales = [v for k, v in init(pc).items() if k.startswith("fc0.w") and k.endswith("scale")]
    pt_scales = [v for k, v in init(pt).items() if k.startswith("fc0.w") and k.endswith("scale")]
    assert pc_scales[0].shape == (64,) and pt_scales[0].shape == ()
    zps = [v for k, v in init(pt).items() if "zero_point" in k and not k.startswith("fc")]
    assert zps and all(v.dtype == np.int8 and int(v) == 0 for v in zps)
    # symmetric activations keep the Relus (a zero point of 0 in int8 is not qmin)
    assert _ops(pt)["Relu"] == 2


def test_static_needs_data_and_auto_falls_back_with_a_note():
    m = _gemm_relu()
    with pytest.raises(CalibrationError):
        compress(m, _recipe(mode="static"))
    ctx = Context()
    res = compress(m, _recipe(), context=ctx)
    assert _plan(res)["mode"] == "dynamic"
    assert any("--calib-data" in n for n in res.report.notes), res.report.notes


def test_recipe_rejects_bad_combinations():
    with pytest.raises(RecipeError):
        QuantizeInt8Config(mode="dynamic", activation_type="s8")
    with pytest.raises(RecipeError):
        QuantizeInt8Config(calib_method="kl")
    with pytest.raises(RecipeError):
        QuantizeInt8Config(smoothquant=1.5)


# ---------------------------------------------------------------------------------------------- declines


def test_declines_with_reasons():
    m = _gemm_relu()
    # fc1's weight is also a graph output: must stay as it is
    m.graph.output.append(helper.make_tensor_value_info("fc1.w", TensorProto.FLOAT, [48, 64]))
    calib = [_feeds(m, 32, seed=1)]
    res = compress(m, _recipe(mode="static", exclude_nodes=("fc2",)), data=calib)
    skipped = {s["node"]: s["reason"] for s in res.report.to_dict()["steps"][0]["skipped"]}
    assert "graph input or output" in skipped["fc1"]
    assert "excluded" in skipped["fc2"]
    assert _ops(res.model)["QuantizeLinear"] >= 1  # fc0 still quantized
    res = compress(_gemm_relu(), _recipe(mode="static", keep_first_last=True, exclude_ops=()), data=calib)
    plan = {n["node"]: n for n in _plan(res)["nodes"]}
    assert plan["fc0"]["form"] == "float" and plan["fc2"]["form"] == "float" and plan["fc1"]["form"] == "qdq"
    res = compress(_gemm_relu(), _recipe(mode="static", exclude_ops=("Gemm",)), data=calib)
    assert _ops(res.model)["QuantizeLinear"] == 0


def test_non_default_gemm_and_activation_matmul_decline():
    rng = np.random.default_rng(0)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 8] x, float[8, 8] b) => (float[N, 8] y, float[N, 8] z) {
        y = Gemm <alpha = 2.0> (x, w)
        z = MatMul (x, b)
    }"""
    m = onnx.parser.parse_model(text)
    m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"))
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32), "b": rng.standard_normal((8, 8)).astype(np.float32)}]
    res = compress(m, _recipe(mode="static", quantize_act_matmul=False), data=feeds)
    reasons = " | ".join(s["reason"] for s in res.report.to_dict()["steps"][0]["skipped"])
    assert "alpha" in reasons and "activations" in reasons
    assert _ops(res.model)["QuantizeLinear"] == 0


# ---------------------------------------------------------------------------------------------- dynamic


def test_dynamic_matmul_and_conv_storage(tmp_path):
    m = builders.conv_bn(channels=16)
    res = compress(m, _recipe(mode="dynamic", min_elements=1))
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    ops = _ops(out)
    assert ops["DynamicQuantizeLinear"] == 1 and ops["MatMulInteger"] == 1 and ops["Gemm"] == 0
    assert ops["Cast"] >= 1 and ops.get("ConvInteger", 0) == 0  # Conv weight: int8 storage, decoded at load
    fused = _fused_ops(out, tmp_path)
    assert fused["DynamicQuantizeMatMul"] == 1 and fused["MatMulInteger"] == 0, fused
    x = _feeds(m, 64, seed=6)
    ref, got = builders.run(m, x)[0], builders.run(out, x, optimize=True)[0]
    assert _cosine(ref, got) > 0.999
    plan = {n["node"]: n for n in _plan(res)["nodes"]}
    assert plan["conv"]["form"] == "storage" and plan["fc"]["form"] == "dynamic"


def test_dynamic_error_within_rounding_bound():
    """|y - y_float| <= sum_k (|x_k| s_w / 2 + |W_kn| s_x / 2 + s_x s_w / 4) per element."""
    m = builders.mlp((64, 32))  # one MatMul + Add
    res = compress(m, _recipe(mode="dynamic", per_channel=False))
    x = _feeds(m, 16, seed=7)["x"]
    w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "W0"))
    s_w = np.abs(w).max() / 127
    s_x = (max(x.max(), 0) - min(x.min(), 0)) / 255
    bound = (np.abs(x) @ np.ones_like(w) * s_w / 2 + np.ones_like(x) @ np.abs(w) * s_x / 2 + w.shape[0] * s_x * s_w / 4)
    ref = builders.run(m, {"x": x})[0]
    got = builders.run(res.model, {"x": x})[0]
    assert np.all(np.abs(got - ref) <= bound * 1.01 + 1e-6)
    assert np.max(np.abs(got - ref)) > 0  # it really is quantized


# ---------------------------------------------------------------------------------------------- exporters' shapes


def test_constant_node_weights_are_quantized_like_initializers():
    base = _gemm_relu()
    m = builders.with_constant_nodes(base)
    calib = [_feeds(base, 64, seed=1)]
    a = compress(base, _recipe(mode="static"), data=calib).model
    b = compress(m, _recipe(mode="static"), data=calib).model
    assert _ops(b)["QuantizeLinear"] == _ops(a)["QuantizeLinear"] == 4
    assert sum(t.data_type == TensorProto.INT8 and t.name.endswith("w_quantized") for t in b.graph.initializer) == 3
    x = _feeds(base, 32, seed=2)
    np.testing.assert_array_equal(builders.run(a, x)[0], builders.run(b, x)[0])


def test_if_subgraph_weights_are_quantized():
    base = _gemm_relu()
    m = builders.with_if_subgraph(base)
    res = compress(m, _recipe(mode="static"), data=[_feeds(base, 32, seed=1)])
    out = res.model
    onnx.checker.check_model(out, full_check=True)
    then = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert collections.Counter(n.op_type for n in then.node)["MatMulInteger"] == 3
    plan = _plan(res)
    assert plan["counts"]["dynamic"] == 6 and all("If/Loop" in n["reason"] for n in plan["nodes"] if n["form"] == "dynamic")
    x = _feeds(base, 32, seed=2)
    assert _cosine(builders.run(base, x)[0], builders.run(out, x)[0]) > 0.999


def test_static_with_layers_both_outside_and_inside_an_if():
    """A MatMul in the main graph (calibrated, QDQ) feeding an If whose branches hold MatMuls (dynamic):
    the replaced branch nodes used to stay listed, emptied, in the body, so the model exported for
    calibration failed to load ('has zero input and zero output') and the valid input was blamed."""
    rng = np.random.default_rng(0)
    w = {k: numpy_helper.from_array((0.3 * rng.standard_normal((16, 16))).astype(np.float32), k)
         for k in ("w_pre", "w_t", "w_e")}
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "w_t"], ["t1"], name="then_mm"),
                                helper.make_node("Relu", ["t1"], ["t_out"], name="then_relu")], "then", [],
                               [vi("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("MatMul", ["h", "w_e"], ["e_out"], name="else_mm")], "else", [],
                               [vi("e_out", TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_pre"], ["h"], name="pre"),
         helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0, name="rs"),
         helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
         helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
        "g", [vi("x", TensorProto.FLOAT, ["N", 16])], [vi("y", TensorProto.FLOAT, ["N", 16])],
        [*w.values(), numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": rng.standard_normal((64, 16)).astype(np.float32)}
    res = compress(m, _recipe(mode="static", keep_first_last=False), data=[x])
    onnx.checker.check_model(res.model, full_check=True)
    forms = {n["node"]: n["form"] for n in _plan(res)["nodes"]}
    assert forms["then_mm"] == forms["else_mm"] == "dynamic" and forms["pre"] == "qdq"
    for sign in (1, -1):  # sum(h) is linear in x: x and -x take the two branches
        feed = {"x": x["x"][:1] * sign}
        assert _cosine(builders.run(m, feed)[0], builders.run(res.model, feed)[0]) > 0.995


# ---------------------------------------------------------------------------------------------- transformers


def _tiny_encoder(seed=0, d=16) -> onnx.ModelProto:
    """x -> LN -> MatMul+Add -> Softmax -> MatMul(W2) -> + x (residual) -> LN -> MatMul -> y, with an outlier channel."""
    rng = np.random.default_rng(seed)
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, {d}] x) => (float[N, 4, 10] y) {{
        n1 = LayerNormalization <axis = -1> (x, g1, be1)
        h = MatMul (n1, w1)
        hb = Add (h, b1)
        s = Softmax <axis = -1> (hb)
        o = MatMul (s, w2)
        r = Add (o, x)
        n2 = LayerNormalization <axis = -1> (r, g2, be2)
        y = MatMul (n2, w3)
    }}"""
    m = onnx.parser.parse_model(text)
    for n in m.graph.node:
        n.name = n.output[0]
    g1 = np.ones(d, np.float32)
    g1[3] = 20.0  # an outlier channel, as in real transformers
    vals = {"g1": g1, "be1": np.zeros(d, np.float32), "w1": rng.standard_normal((d, d)) / 4,
            "b1": rng.standard_normal(d) * 0.1, "w2": rng.standard_normal((d, d)) / 4,
            "g2": np.ones(d, np.float32), "be2": np.zeros(d, np.float32), "w3": rng.standard_normal((d, 10)) / 4}
    for k, v in vals.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v, np.float32), k))
    onnx.checker.check_model(m)
    return m


def test_transformer_sensitive_ops_stay_float():
    m = _tiny_encoder()
    calib = [_feeds(m, 32, seed=1)]
    res = compress(m, _recipe(mode="static"), data=calib)
    plan = {n["node"]: n for n in _plan(res)["nodes"]}
    ops = {n.name: n.op_type for n in m.graph.node}
    forms = collections.Counter((ops.get(k), v["form"]) for k, v in plan.items())
    assert forms[("LayerNormalization", "float")] == 2 and forms[("Softmax", "float")] == 1
    residual = [v for k, v in plan.items() if ops.get(k) == "Add" and "residual" in v.get("reason", "")]
    assert len(residual) == 1
    assert forms[("MatMul", "qdq")] == 3
    # the residual Add reads float x directly, never a DequantizeLinear
    out = res.model
    add = next(n for n in out.graph.node if n.op_type == "Add" and "x" in n.input)
    assert add is not None
    res_all = compress(m, _recipe(mode="static", keep_sensitive_float=False), data=calib)
    plan_all = {n["node"]: n for n in _plan(res_all)["nodes"]}
    assert not any("residual" in v.get("reason", "") for v in plan_all.values())


def test_smoothquant_is_exact_before_rounding_and_helps_outliers():
    from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
    from onnxcompress.graph.naming import Namer
    from onnxcompress.quantize.smoothquant import apply_smoothing, smooth_candidates, smooth_check

    m = _tiny_encoder()
    g = model_to_graph(open_model(m))
    ln, ln2 = smooth_candidates(g)
    assert smooth_check(ln, g) is None
    assert smooth_check(ln2, g) is None
    chan = np.linspace(0.5, 30.0, 16)
    apply_smoothing(ln, g, Namer.for_graph(g), chan, 0.5)
    x = _feeds(m, 16, seed=3)
    ref, got = builders.run(m, x)[0], builders.run(graph_to_model(g, m), x)[0]
    assert builders.lossless_close(ref, got)
    calib = [_feeds(m, 64, seed=1)]
    plain = compress(m, _recipe(mode="static", per_channel=True), data=calib).model
    smooth = compress(m, _recipe(mode="static", smoothquant=0.5), data=calib).model
    e_plain = np.abs(builders.run(plain, x)[0] - ref).mean()
    e_smooth = np.abs(builders.run(smooth, x)[0] - ref).mean()
    assert e_smooth < e_plain, (e_smooth, e_plain)


def _decomposed_ln_encoder(d=16) -> onnx.ModelProto:
    """_tiny_encoder's first LayerNorm as exporters below opset 17 write it (ReduceMean ... Div, Mul, Add)."""
    m = _tiny_encoder(d=d)
    ln = next(n for n in m.graph.node if n.op_type == "LayerNormalization")
    x, g1, b1 = ln.input
    y = ln.output[0]
    parts = onnx.parser.parse_graph(f"""
    dec (float[N, 4, {d}] {x}, float[{d}] {g1}, float[{d}] {b1}) => (float[N, 4, {d}] {y}) {{
        mu = ReduceMean <axes = [-1]> ({x})
        c = Sub ({x}, mu)
        two = Constant <value = float {{2.0}}> ()
        sq = Pow (c, two)
        var = ReduceMean <axes = [-1]> (sq)
        eps = Constant <value = float {{1e-5}}> ()
        ve = Add (var, eps)
        sd = Sqrt (ve)
        nrm = Div (c, sd)
        sc = Mul (nrm, {g1})
        {y} = Add (sc, {b1})
    }}""")
    i = list(m.graph.node).index(ln)
    nodes = list(m.graph.node[:i]) + list(parts.node) + list(m.graph.node[i + 1:])
    for n in parts.node:
        n.name = n.output[0]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.opset_import[0].version = 17
    onnx.checker.check_model(m)
    return m


def test_smoothquant_folds_into_a_decomposed_layernorm():
    """Exporters below opset 17 write LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add: --smoothquant
    used to change nothing there, without a word. It now folds 1/s into the Mul's scale and the Add's
    bias, exact before rounding, with the same scales as on the LayerNormalization op."""
    from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
    from onnxcompress.graph.naming import Namer
    from onnxcompress.quantize.smoothquant import apply_smoothing, smooth_candidates, smooth_check

    m = _decomposed_ln_encoder()
    g = model_to_graph(open_model(m))
    norms = smooth_candidates(g)
    assert [n.node.op for n in norms] == ["Div", "LayerNormalization"] and smooth_check(norms[0], g) is None
    info = apply_smoothing(norms[0], g, Namer.for_graph(g), np.linspace(0.5, 30.0, 16), 0.5)
    assert info["form"] == "folded"
    x = _feeds(m, 16, seed=3)
    assert builders.lossless_close(builders.run(m, x)[0], builders.run(graph_to_model(g, m), x)[0])
    # the scaled value before the bias also read elsewhere (here: an output): the scale stays, a Mul smooths
    m2 = _decomposed_ln_encoder()
    m2.graph.output.append(helper.make_tensor_value_info("sc", TensorProto.FLOAT, None))
    g2 = model_to_graph(open_model(m2))
    norm = smooth_candidates(g2)[0]
    assert smooth_check(norm, g2) is None
    assert apply_smoothing(norm, g2, Namer.for_graph(g2), np.linspace(0.5, 30.0, 16), 0.5)["form"] == "mul"
    for a, c in zip(builders.run(m2, x), builders.run(graph_to_model(g2, m2), x)):
        assert builders.lossless_close(a, c)
    calib = [_feeds(m, 64, seed=1)]
    smooth = compress(m, _recipe(mode="static", smoothquant=0.5), data=calib)
    op_form = compress(_tiny_encoder(), _recipe(mode="static", smoothquant=0.5), data=calib)
    notes = [n for n in _plan(smooth)["notes"] if n.startswith("smoothquant ")]
    assert len(notes) == 2 and notes[0].split(": ")[1] == [n for n in _plan(op_form)["notes"]
                                                            if n.startswith("smoothquant ")][0].split(": ")[1]


def test_smoothquant_that_changes_nothing_says_so():
    res = compress(_gemm_relu(), _recipe(mode="static", smoothquant=0.5), data=[_feeds(_gemm_relu(), 32)])
    assert any("--smoothquant changed nothing: no normalization" in n for n in res.report.notes)


def test_smoothquant_with_other_readers_inserts_a_mul_and_declines_shared_weights():
    from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
    from onnxcompress.graph.naming import Namer
    from onnxcompress.quantize.smoothquant import apply_smoothing, smooth_candidates, smooth_check

    m = _tiny_encoder()
    # n1 also read by an Add (a residual stream): gamma must stay, a Mul feeds the MatMul branch
    m.graph.node.append(helper.make_node("Add", ["n1", "n1"], ["extra"], name="extra"))
    m.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    g = model_to_graph(open_model(m))
    ln = smooth_candidates(g)[0]
    assert smooth_check(ln, g) is None
    info = apply_smoothing(ln, g, Namer.for_graph(g), np.linspace(0.5, 30.0, 16), 0.5)
    assert info["form"] == "mul"
    out = graph_to_model(g, m)
    x = _feeds(m, 8, seed=4)
    for a, b in zip(builders.run(m, x), builders.run(out, x)):
        assert builders.lossless_close(a, b)
    # w1 also read by another MatMul: scaling its rows would change that one too
    m2 = _tiny_encoder()
    m2.graph.node.append(helper.make_node("MatMul", ["x", "w1"], ["other"], name="other"))
    m2.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, None))
    g2 = model_to_graph(open_model(m2))
    ln2 = smooth_candidates(g2)[0]
    assert "read only by it" in smooth_check(ln2, g2)


# ---------------------------------------------------------------------------------------------- bundled models


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_bundled_digits_models_keep_accuracy(name, tmp_path):
    datasets = pytest.importorskip("onnxcompress.datasets")
    try:
        path = datasets.bundled_model_path(name)
    except Exception as e:  # the models are built by another step
        pytest.skip(f"bundled model {name} not available: {e}")
    if not path.exists():
        pytest.skip(f"bundled model {name} not built yet")
    calib = datasets.calibration_npz(tmp_path / "calib.npz", name, n=256)
    base = datasets.digits_accuracy(str(path))
    res = compress(str(path), Recipe(steps=(QuantizeInt8Config(),)), data=str(calib))
    onnx.checker.check_model(res.model)
    acc = datasets.digits_accuracy(res.model)
    budget = 0.005 if name in ("mlp", "cnn") else 0.01
    assert acc >= base - budget, (name, base, acc)
    assert _ops(res.model)["QuantizeLinear"] > 0


def test_cli_int8_static(tmp_path):
    from onnxcompress.cli import main

    m = _gemm_relu()
    src = tmp_path / "in.onnx"
    onnx.save(m, str(src))
    np.savez(tmp_path / "calib.npz", **_feeds(m, 48, seed=1))
    cache = tmp_path / "ranges.json"
    args = [str(src), str(tmp_path / "out.onnx"), "--int8", "--calib-data", str(tmp_path / "calib.npz"),
            "--calib-cache", str(cache), "--calib-method", "percentile", "-q"]
    assert main(args) == 0
    assert cache.is_file() and (tmp_path / "out.onnx").is_file()
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert _ops(out)["QuantizeLinear"] == 4


@pytest.mark.parametrize("name,variant", [("mlp", "constant_nodes"), ("cnn", "if_subgraph"), ("cnn", "constant_nodes")])
def test_bundled_variants_are_quantized_like_the_originals(name, variant, tmp_path):
    """Exporters keep weights in Constant nodes or inside If bodies: they are quantized all the same."""
    datasets = pytest.importorskip("onnxcompress.datasets")
    try:
        path = datasets.bundled_model_path(name)
    except Exception as e:
        pytest.skip(f"bundled model {name} not available: {e}")
    if not path.exists():
        pytest.skip(f"bundled model {name} not built yet")
    base = onnx.load(str(path))
    m = builders.with_constant_nodes(base) if variant == "constant_nodes" else builders.with_if_subgraph(base)
    calib = datasets.calibration_npz(tmp_path / "calib.npz", name, n=128)
    res = compress(m, Recipe(steps=(QuantizeInt8Config(),)), data=str(calib))
    onnx.checker.check_model(res.model)
    plan = _plan(res)
    quantized = plan["counts"].get("qdq", 0) + plan["counts"].get("dynamic", 0) + plan["counts"].get("storage", 0)
    weighted = sum(1 for n in base.graph.node if n.op_type in ("Gemm", "MatMul", "Conv"))
    if variant == "if_subgraph":
        weighted *= 2  # both branches
    assert quantized == weighted, plan["counts"]
    assert datasets.digits_accuracy(res.model) >= datasets.digits_accuracy(str(path)) - 0.005


def test_conv_transpose_gets_int8_storage_not_slow_qdq(tmp_path):
    """onnxruntime's CPU EP has no fused int8 ConvTranspose: its weight is stored as int8 instead."""
    rng = np.random.default_rng(8)
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 6, 6] x) => (float[N, 8, 13, 13] y) {
        y = ConvTranspose <strides = [2, 2]> (x, w, b)
    }""")
    m.graph.node[0].name = "deconv"
    m.graph.initializer.extend([numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w"),
                                numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")])
    res = compress(m, _recipe(mode="static"), data=[_feeds(m, 4, seed=1)])
    plan = {n["node"]: n for n in _plan(res)["nodes"]}
    assert plan["deconv"]["form"] == "storage" and "ConvTranspose" in plan["deconv"]["reason"]
    assert _ops(res.model)["QuantizeLinear"] == 0 and _ops(res.model)["Cast"] == 1
    assert _fused_ops(res.model, tmp_path) == collections.Counter({"ConvTranspose": 1})
    x = _feeds(m, 2, seed=2)
    ref, got = builders.run(m, x)[0], builders.run(res.model, x, optimize=True)[0]
    assert _cosine(ref, got) > 0.9999


def test_a_weight_shared_with_a_float_reader_keeps_its_float_copy():
    m = _gemm_relu()
    # fc1.w is also read by a float Mul whose result is a graph output
    m.graph.node.append(helper.make_node("Mul", ["fc1.w", "fc1.w"], ["w_sq"], name="square"))
    m.graph.output.append(helper.make_tensor_value_info("w_sq", TensorProto.FLOAT, [48, 64]))
    res = compress(m, _recipe(mode="static"), data=[_feeds(m, 32, seed=1)])
    out = res.model
    plan = {n["node"]: n for n in _plan(res)["nodes"]}
    assert plan["fc1"]["form"] == "qdq" and "shared" in plan["fc1"]["weight"]
    assert any(t.name == "fc1.w" and t.data_type == TensorProto.FLOAT for t in out.graph.initializer)
    # stored twice, and the summary says so (a tied LM head grew a file 1.23x without a word)
    assert any("keep their float copy beside the int8 one (the int8 copies add about 3,072 bytes): 'fc1.w'" in n
               for n in res.report.notes), res.report.notes
    x = _feeds(m, 4, seed=2)
    np.testing.assert_array_equal(builders.run(m, x)[1], builders.run(out, x)[1])  # the float reader is exact


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_a_dead_channel_keeps_its_bias(per_channel):
    """A Gemm neuron whose weights are all zero (pruned, dead) but whose bias is 0.7: its weight scale
    used to be the 1e-12 floor, so the int32 bias round(0.7 / (s_x · 1e-12)) saturated and the neuron
    output ~0 instead of 0.7 — while the whole-output cosine still passed. The weight scale is now
    raised until the bias fits (|b| / (s_x s_w) <= 2^30), and the neuron keeps its bias."""
    m = _gemm_relu(seed=3, sizes=(32, 16, 10))
    init = {t.name: t for t in m.graph.initializer}
    w = numpy_helper.to_array(init["fc1.w"]).copy()
    b = numpy_helper.to_array(init["fc1.b"]).copy()
    w[5], b[5] = 0.0, 0.7
    init["fc1.w"].CopyFrom(numpy_helper.from_array(w, "fc1.w"))
    init["fc1.b"].CopyFrom(numpy_helper.from_array(b, "fc1.b"))
    feeds = _feeds(m, n=128)
    res = compress(m, _recipe(mode="static", per_channel=per_channel), data=[feeds])
    (ref,), (out,) = builders.run(m, feeds), builders.run(res.model, feeds)
    step = _output_step(res.model)
    assert np.abs(out[:, 5] - 0.7).max() <= step  # within one output step of the bias it must show
    assert np.abs(out - ref).max() <= 3 * step
    fc1 = next(n for n in _plan(res)["nodes"] if n["node"] == "fc1")
    # per tensor, the scale comes from the live channels and already holds the bias
    assert fc1["weight"].get("bias_safe_scales") == (1 if per_channel else None)


def test_a_run_that_quantizes_nothing_says_why():
    """A model already in float16 (weights float16): int8 quantizes no layer; the summary says so and why
    instead of only counting skips in the report."""
    half = compress(_gemm_relu(), ["fp16"]).model
    for data in (None, [_feeds(half, 32)]):
        res = compress(half, _recipe(mode="auto"), data=data)
        assert any(n.startswith("int8: no layer was quantized (") and "float16" in n for n in res.report.notes)
