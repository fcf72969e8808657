"""convert_fp16: structure (IO types kept, Casts only at boundaries, weights in half), numbers (within a
bound set by float16's unit roundoff) and the traps: Resize scales, Cast targets, If / Loop bodies,
weights and activations out of range, bfloat16 on the CPU execution provider."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
from lowbit_helpers import apply_pass, cuda_available, op_counts, run1, skip_reasons
from onnxcompress.quantize.fp16 import ConvertFp16Config, ConvertFp16Pass

U16 = 2.0 ** -11  # float16 unit roundoff
UBF = 2.0 ** -8   # bfloat16 unit roundoff


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _io_types(m: onnx.ModelProto) -> list[int]:
    return [v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)]


def _within(ref: np.ndarray, got: np.ndarray, u: float, depth: int) -> bool:
    """Relative error bound of a depth-``depth`` network in a format with unit roundoff ``u``."""
    return float(np.max(np.abs(ref - got))) <= 8 * depth * u * float(np.max(np.abs(ref))) + 1e-6


def _kinds(m: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in m.graph.initializer}


def test_mlp_structure_io_and_numbers():
    m = builders.mlp((32, 64, 16))
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    assert _io_types(out) == [TensorProto.FLOAT, TensorProto.FLOAT]
    assert out.graph.output[0].name == "y"
    ops = op_counts(out)
    assert ops["Cast"] == 2  # one at the input, one at the output
    assert set(_kinds(out).values()) == {TensorProto.FLOAT16}
    assert res.details["half_nodes"] == 5 and not skip_reasons(res)
    x = _x((16, 32))
    ref = builders.run(m, {"x": x})[0]
    got = run1(out, {"x": x})
    assert got.dtype == np.float32 and _within(ref, got, U16, 3)
    assert np.abs(ref - got).max() > 0  # it really computed in float16


def test_conv_bn_model_runs_on_cpu():
    m = builders.conv_bn()
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    x = _x((2, 3, 8, 8))
    ref = builders.run(m, {"x": x})[0]
    for optimize in (False, True):
        assert _within(ref, run1(out, {"x": x}, optimize=optimize), U16, 5)


def test_resize_scales_stay_float32():
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    w = numpy_helper.from_array(_x((4, 3, 1, 1), 1), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Resize", ["c", "", "scales"], ["y"], name="resize", mode="nearest")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [scales, w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    kinds = _kinds(out)
    assert kinds["scales"] == TensorProto.FLOAT
    assert res.details["half_nodes"] == 2
    x = _x((1, 3, 4, 4))
    assert _within(builders.run(m, {"x": x})[0], run1(out, {"x": x}), U16, 2)


def test_cast_targets():
    """Cast(int64 -> float) feeding a MatMul becomes Cast(-> float16); one feeding an output stays float."""
    w = numpy_helper.from_array(_x((8, 8), 2), "W")
    nodes = [helper.make_node("Cast", ["ids"], ["f"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="mm"),
             helper.make_node("Cast", ["ids"], ["z"], name="to_float_out", to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    to = {n.name: n.attribute[0].i for n in out.graph.node if n.op_type == "Cast"}
    assert to["to_float"] == TensorProto.FLOAT16
    assert to["to_float_out"] == TensorProto.FLOAT
    assert res.details["casts_retargeted"] == 1
    ids = np.arange(16, dtype=np.int64).reshape(2, 8) % 5
    ref = builders.run(m, {"ids": ids})
    got = builders.run(out, {"ids": ids}, optimize=True)
    assert _within(ref[0], got[0], U16, 1) and np.array_equal(ref[1], got[1])


def test_constant_nodes_and_if_subgraph():
    base = builders.mlp((16, 32, 8))
    x = _x((4, 16))
    ref = builders.run(base, {"x": x})[0]
    out, res = apply_pass(builders.with_constant_nodes(base), ConvertFp16Pass(ConvertFp16Config()))
    assert res.details["half_nodes"] == 5 and res.details["weights_converted"] == 4
    assert _within(ref, run1(out, {"x": x}), U16, 3)

    m = builders.with_if_subgraph(base)
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    assert _io_types(out) == [TensorProto.FLOAT, TensorProto.FLOAT]
    if_node = out.graph.node[[n.op_type for n in out.graph.node].index("If")]
    for attr in if_node.attribute:  # bodies compute in half, their outputs stay float32
        body = attr.g
        assert body.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
        assert sum(n.op_type == "MatMul" for n in body.node) == 2
        assert all(t.data_type == TensorProto.FLOAT16 for t in body.initializer)
    assert res.details["half_nodes"] == 10
    assert _within(ref, run1(out, {"x": x}), U16, 3)


def test_loop_body_with_outer_scope_weight():
    """A Loop whose body multiplies the carried state by an outer-scope weight, three times."""
    w = numpy_helper.from_array((_x((8, 8), 3) * 0.3), "W")
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "W"], ["mm"], name="body_mm"),
         helper.make_node("Tanh", ["mm"], ["s_out"], name="body_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [2, 8])])
    trip = numpy_helper.from_array(np.array(3, np.int64), "trip")
    cond = numpy_helper.from_array(np.array(True), "cond")
    g = helper.make_graph([helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w, trip, cond])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    assert res.details["half_nodes"] == 2  # MatMul and Tanh inside the body
    body_out = next(a.g for a in out.graph.node[-1].attribute if a.name == "body")
    assert [o.type.tensor_type.elem_type for o in body_out.output] == [TensorProto.BOOL, TensorProto.FLOAT]
    x = _x((2, 8))
    assert _within(builders.run(m, {"x": x})[0], run1(out, {"x": x}), U16, 3)


def _scaled_model(scale: float, *, tiny: bool = False) -> onnx.ModelProto:
    """x -> MatMul(W) -> Mul(k) -> MatMul(W2) -> y, with k out of range (or W tiny)."""
    w = _x((8, 8), 4) * (1e-9 if tiny else 1.0)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(scale, np.float32), "k"),
             numpy_helper.from_array(_x((8, 4), 5), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
             helper.make_node("Mul", ["a", "k"], ["b"], name="scale"),
             helper.make_node("MatMul", ["b", "W2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_out_of_range_weight_keeps_node_and_readers_float():
    m = _scaled_model(1e6)
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    by_node = {s.node: s.reason for s in res.skipped}
    assert "overflows float16" in by_node["scale"]
    assert "out of float16 range" in by_node["mm2"]
    assert res.details["half_nodes"] == 1  # only mm1
    x = _x((4, 8))
    ref = builders.run(m, {"x": x})[0]
    got = run1(out, {"x": x})
    assert np.all(np.isfinite(got)) and _within(ref, got, U16, 3)


def test_tiny_weights_that_would_flush_stay_float():
    m = _scaled_model(1.0, tiny=True)
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    by_node = {s.node: s.reason for s in res.skipped}
    assert "flushed to 0" in by_node["mm1"]
    assert _kinds(out)["W"] == TensorProto.FLOAT
    x = _x((4, 8))
    ref = builders.run(m, {"x": x})[0]
    assert np.abs(ref).max() > 0 and _within(ref, run1(out, {"x": x}), U16, 3)


def test_hot_activation_found_with_data_only():
    """x in ~[-3e3, 3e3] times W: the first MatMul's output passes 65504 / headroom."""
    m = _scaled_model(1.0)
    feeds = [{"x": _x((16, 8), 9) * 3000}]
    out_nodata, res_nodata = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    assert res_nodata.details["half_nodes"] == 3
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()), data=feeds)
    by_node = {s.node: s.reason for s in res.skipped}
    assert "exceeds the float16 range" in by_node["mm1"]
    assert "a" in res.details["activation_max"]
    x = feeds[0]["x"]
    ref = builders.run(m, {"x": x})[0]
    assert _within(ref, run1(out, {"x": x}), U16, 3)


def test_compute_float_stores_weights_only():
    m = builders.mlp((32, 64, 16))
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config(compute="float")))
    assert res.details["half_nodes"] == 0 and res.details["weights_converted"] == 4
    assert op_counts(out)["Cast"] == 4
    assert out.ByteSize() < 0.56 * m.ByteSize()
    x = _x((8, 32))
    assert _within(builders.run(m, {"x": x})[0], run1(out, {"x": x}), U16, 3)


def test_bfloat16_on_cpu_keeps_ops_without_kernels_float():
    m = builders.mlp((32, 64, 16))
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config(dtype="bfloat16")))
    reasons = skip_reasons(res)
    assert any("no bfloat16 kernel for MatMul" in r for r in reasons)
    assert TensorProto.BFLOAT16 in set(_kinds(out).values())
    x = _x((8, 32))
    assert _within(builders.run(m, {"x": x})[0], run1(out, {"x": x}), UBF, 3)


def test_keep_ops_and_unknown_ops_pass_through():
    m = builders.mlp((16, 32, 8))
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config(keep_ops=("Relu",))))
    assert "Relu is in keep_ops" in skip_reasons(res)
    assert res.details["half_nodes"] == 4 and op_counts(out)["Cast"] == 4
    x = _x((4, 16))
    assert _within(builders.run(m, {"x": x})[0], run1(out, {"x": x}), U16, 3)


def test_fp16_on_cuda():
    if not cuda_available():
        pytest.skip("onnxruntime-gpu with the CUDA execution provider is not installed on this machine")
    import onnxruntime as ort

    m = builders.mlp((32, 64, 16))
    out, _ = apply_pass(m, ConvertFp16Pass(ConvertFp16Config(target="any")))
    x = _x((8, 32))
    got = ort.InferenceSession(out.SerializeToString(), providers=["CUDAExecutionProvider"]).run(None, {"x": x})[0]
    assert _within(builders.run(m, {"x": x})[0], got, U16, 3)


def test_bfloat16_declines_below_opset_13():
    m = builders.mlp((16, 32, 8), opset=11)
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config(dtype="bfloat16")))
    assert not res.modified and any("opset >= 13" in r for r in skip_reasons(res))
    assert set(_kinds(out).values()) == {TensorProto.FLOAT}


def test_encoder_with_attention_mask_bias():
    """The exported-mask trap: −3.4e38 · (1 − mask) must not reach a float16 tensor that is summed."""
    from lowbit_helpers import encoder_feeds, tiny_encoder

    m = tiny_encoder()
    feeds = encoder_feeds(32)
    ref = builders.run(m, feeds)[0]
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    by_node = {s.node: s.reason for s in res.skipped}
    assert "overflows float16" in by_node["mask_bias"]
    got = run1(out, feeds)
    assert np.all(np.isfinite(got)) and _within(ref, got, U16, 12)
    # with data the range check also keeps the masked scores and the Softmax in float32
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()), data=[encoder_feeds(16, seed=1)])
    by_node = {s.node: s.reason for s in res.skipped}
    assert "exceeds the float16 range" in by_node["softmax"]
    assert res.details["half_nodes"] == 21
    assert _within(ref, run1(out, feeds), U16, 12)


@pytest.mark.parametrize("flags,expect", [
    (["--int4"], [("quantize_int4", {}), ("quantize_embedding", {})]),
    (["--int4", "--int4-block-size", "64", "--int4-format", "qdq"],
     [("quantize_int4", {"block_size": 64, "format": "qdq"}), ("quantize_embedding", {})]),
    (["--fp16"], [("convert_fp16", {"dtype": "float16"})]),
    (["--bf16"], [("convert_fp16", {"dtype": "bfloat16"})]),
    (["--fp16", "--half-compute", "float"], [("convert_fp16", {"compute": "float"})]),
])
def test_presets_and_flags(flags, expect, capsys):
    import json

    from onnxcompress.cli import main

    assert main(["in.onnx", *flags, "--print-recipe"]) == 0
    steps = {s["pass"]: s for s in json.loads(capsys.readouterr().out)["steps"]}
    for name, fields in expect:
        assert name in steps
        assert all(steps[name][k] == v for k, v in fields.items())


@pytest.mark.parametrize("variant", ["constant_nodes", "if_subgraph"])
def test_bundled_cnn_variants_keep_accuracy(variant):
    from lowbit_helpers import bundled

    from onnxcompress import datasets

    fp32 = bundled("cnn")
    m = builders.with_constant_nodes(fp32) if variant == "constant_nodes" else builders.with_if_subgraph(fp32)
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    assert res.details["half_nodes"] >= 16
    assert _io_types(out) == _io_types(m)
    assert abs(datasets.digits_accuracy(out) - datasets.digits_accuracy(fp32)) <= 0.005


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_after_int4_the_matmulnbits_inputs_stay_float32_constants(half):
    """--int4 --fp16: the half pass used to store MatMulNBits' scales in half with a Cast back, and
    MatMulNBits (accuracy level 4) computes wrong numbers from a Cast-produced scale unless
    onnxruntime's optimizer folds the Cast (cosine 0.34 on the digits MLP with optimizations off).
    A custom-domain op now keeps its constant inputs as they are."""
    import onnxcompress as oc
    from onnxcompress.datasets import bundled_model_path, digits_feeds

    path = bundled_model_path("mlp")
    res = oc.compress(path, ["int4", half])
    inits = {t.name for t in res.model.graph.initializer}
    nbits = [n for n in res.model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(i in inits for n in nbits for i in n.input[1:] if i)
    x = digits_feeds(onnx.load(path), "test")
    ref = builders.run(onnx.load(path), x)[0]
    for optimize in (False, True):
        out = builders.run(res.model, x, optimize=optimize)[0]
        cos = float(np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out))
        assert cos > 0.999 and np.mean(ref.argmax(1) == out.argmax(1)) > 0.99, (optimize, cos)


def test_data_movement_between_float32_ends_stays_float32():
    """x -> Identity -> x2 (an output) beside x -> MatMul -> y: the Identity used to run in half with
    Casts on both sides, so x2 != x (max error 9e-4) although nothing is computed. An op that only
    moves data stays float32 when no half node feeds it or reads it; the MatMul still goes half."""
    w = numpy_helper.from_array(_x((16, 8), seed=1), "W")
    w2 = numpy_helper.from_array(_x((4, 3), seed=3), "W2")  # xt is an output and a half MatMul's input
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["x2"], name="copy"),
                           helper.make_node("Transpose", ["x2"], ["xt"], name="flip", perm=[1, 0]),
                           helper.make_node("MatMul", ["xt", "W2"], ["z"], name="mm2"),
                           helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                           for n, s in (("x2", [4, 16]), ("xt", [16, 4]), ("y", [4, 8]), ("z", [16, 3]))],
                          [w, w2])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    out, res = apply_pass(m, ConvertFp16Pass(ConvertFp16Config()))
    x = _x((4, 16), seed=2)
    got = builders.run(out, {"x": x})
    assert np.array_equal(got[0], x) and np.array_equal(got[1], x.T)
    assert op_counts(out)["Cast"] == 4  # x and xt -> half for the MatMuls; y and z -> float32
    assert all(n.input[0] not in ("x", "xt") for n in out.graph.node if n.op_type == "MatMul")  # both in half
    assert sum("only moves data" in r for r in skip_reasons(res)) == 2
