"""distill: layer-wise repair of a compressed student from the teacher (onnxcompress.transfer.reconstruct).

Three ways: the structure stays (same ops, the sparsity mask, the codebook size, the int8 grid);
the numbers get better (digits accuracy on the fixed test split, output error against the teacher);
and the pass declines when it should (no data, shared weight, no teacher tensor, a grouped conv behind
DequantizeLinear).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
import transfer_models as tm
from onnxcompress.api import compress
from onnxcompress.context import Context
from onnxcompress.datasets import calibration_npz, digits_accuracy
from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
from onnxcompress.prune.channels import PruneChannelsConfig
from onnxcompress.recipe import Recipe, VerifyConfig
from onnxcompress.transfer.reconstruct import DistillConfig, DistillPass, im2col, snap_with_feedback, solve_masked

OFF = VerifyConfig(enabled=False)


def _distill(student: onnx.ModelProto, teacher: onnx.ModelProto, data, cfg: DistillConfig | None = None):
    """Run the pass alone on ``student`` with ``teacher`` as the original; return (model, result)."""
    g = model_to_graph(open_model(student))
    with Context(data=data) as ctx:
        ctx.original = open_model(teacher)
        res = DistillPass(cfg or DistillConfig()).run(g, ctx)
    return graph_to_model(g, student), res


def _ops(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in m.graph.node)


def _weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.fixture(scope="module")
def teacher():
    return tm.digits_mlp((64, 32))


@pytest.fixture(scope="module")
def calib(teacher, tmp_path_factory):
    return str(calibration_npz(tmp_path_factory.mktemp("calib") / "calib.npz", teacher))


# -- the math ----------------------------------------------------------------------------------


@pytest.mark.parametrize("attrs", [dict(pads=[1, 1, 1, 1]), dict(strides=[2, 2], pads=[0, 1, 1, 0]),
                                   dict(dilations=[2, 1], pads=[2, 0, 2, 0])])
def test_im2col_matches_onnxruntime_conv(attrs):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    g = helper.make_graph([node], "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    (ref,) = builders.run(m, {"x": x})
    rows = im2col(x.astype(np.float64), w.shape, attrs) @ w.reshape(4, -1).T.astype(np.float64)
    got = np.moveaxis(rows.reshape(ref.shape[0], ref.shape[2], ref.shape[3], 4), -1, 1)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 + 1e-4 * np.abs(ref).max()


def test_solve_masked_recovers_a_masked_linear_map_and_keeps_zeros():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 12))
    mask = rng.random((5, 12)) < 0.4
    w = np.where(mask, rng.standard_normal((5, 12)), 0.0)
    b = rng.standard_normal(5)
    t = a @ w.T + b
    a1 = np.concatenate([a, np.ones((500, 1))], 1)
    sol = solve_masked(a1.T @ a1, a1.T @ t, mask, ridge=0.0, bias=True)
    assert np.all(sol[:, :-1][~mask] == 0)
    np.testing.assert_allclose(sol[:, :-1], w, atol=1e-8)
    np.testing.assert_allclose(sol[:, -1], b, atol=1e-8)


def test_error_feedback_beats_plain_rounding_on_correlated_inputs():
    """Snapping to a grid one input at a time with error feedback (GPTQ-style) gives a lower output
    error than rounding each weight, and every weight lands on the grid."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((400, 3)) @ rng.standard_normal((3, 10)) + 0.1 * rng.standard_normal((400, 10))
    a1 = np.concatenate([a, np.ones((400, 1))], 1)
    wb = np.concatenate([rng.standard_normal((6, 10)), rng.standard_normal((6, 1))], 1)
    t = a1 @ wb.T
    gram, mask = a1.T @ a1, np.ones((6, 10), bool)

    def grid(v, cols=None):
        return np.round(v * 2) / 2

    def err(x):
        return float(((a1 @ x.T - t) ** 2).sum())

    plain = wb.copy()
    plain[:, :-1] = grid(wb[:, :-1])
    fed = snap_with_feedback(gram, wb, mask, grid, ridge=0.0, bias=True)
    assert np.array_equal(fed[:, :-1], grid(fed[:, :-1]))
    assert err(fed) < 0.5 * err(plain)


# -- numbers and structure on the digits MLP ---------------------------------------------------


def test_repairs_sparse_shared_mlp_on_digits(teacher, calib):
    """80% magnitude sparsity + 16-value k-means sharing: accuracy recovers, mask and codebook stay."""
    student = tm.edit_weights(teacher, lambda n, w: tm.kmeans_share(tm.magnitude_prune(w, 0.8), 16))
    repaired, res = _distill(student, teacher, calib)
    acc_t, acc_s, acc_r = (digits_accuracy(m) for m in (teacher, student, repaired))
    assert acc_s < acc_t - 0.2  # the compression really hurt
    assert acc_r >= acc_s + 0.2  # the repair measurably recovers (seen: 0.57 -> 0.92, teacher 0.96)
    assert acc_r >= acc_t - 0.1
    assert _ops(repaired) == _ops(student)
    before, after = _weights(student), _weights(repaired)
    for name, w in before.items():
        if w.ndim == 2:
            assert np.all(after[name][w == 0] == 0), f"{name}: a pruned position came back"
            assert len(np.unique(after[name][after[name] != 0])) <= 16, f"{name}: codebook grew"
    rows = res.details["layers"]
    assert [r["node"] for r in rows] == ["fc0", "fc1", "fc2"]
    assert all(r["refit"] and r["error_after"] < r["error_before"] for r in rows)
    assert all(r["grid"].startswith("codebook") for r in rows)


def test_shared_bias_goes_back_on_its_codebook(teacher, calib):
    """A bias that weight sharing put on 4 values keeps at most 4 values after the refit; an unshared
    bias is refitted freely. The repair still lowers every layer's error."""
    student = tm.edit_weights(teacher, lambda n, w: tm.kmeans_share(tm.magnitude_prune(w, 0.8), 16))
    for t in student.graph.initializer:
        if t.dims == [32]:  # the hidden layer's bias
            t.CopyFrom(numpy_helper.from_array(tm.kmeans_share(numpy_helper.to_array(t), 4), t.name))
    before = {n: w for n, w in _weights(student).items() if w.ndim == 1}
    shared = next(n for n, w in before.items() if w.size == 32)
    assert len(np.unique(before[shared])) <= 4
    repaired, res = _distill(student, teacher, calib)
    after = _weights(repaired)
    assert len(np.unique(after[shared])) <= 4 and not np.array_equal(after[shared], before[shared])
    free = [n for n, w in before.items() if w.size != 32]
    assert free and all(len(np.unique(after[n])) == after[n].size for n in free)
    rows = res.details["layers"]
    assert all(r["refit"] and r["error_after"] < r["error_before"] for r in rows)
    assert any("bias codebook K=" in r["grid"] for r in rows)


def test_student_equal_to_teacher_stays_as_it_is(teacher, calib):
    """Nothing to repair: every layer is left alone or refitted to (numerically) the same weights,
    so the outputs stay within the lossless budget."""
    same, res = _distill(teacher, teacher, calib)
    assert all(r["error_after"] <= r["error_before"] + 1e-9 for r in res.details["layers"])
    x = {"x": np.random.default_rng(0).random((16, 64)).astype(np.float32)}
    (a,), (b,) = builders.run(teacher, x), builders.run(same, x)
    assert np.abs(a - b).max() <= 1e-5 + 1e-4 * np.abs(a).max()


def test_a_refit_that_does_not_help_is_declined(teacher, calib):
    """With the ridge pulling toward zero, the refit of an exact student is worse: declined, unchanged."""
    same, res = _distill(teacher, teacher, calib, DistillConfig(ridge=0.1, ridge_toward="zero"))
    assert not res.modified
    assert all("does not lower the layer error" in s.reason for s in res.skipped)
    for name, w in _weights(teacher).items():
        assert np.array_equal(_weights(same)[name], w)


def test_int8_grid_is_respected(teacher, calib):
    """Weights behind DequantizeLinear: q is refitted on the same int8 grid, scale and zero point unchanged."""
    m = onnx.ModelProto()
    m.CopyFrom(teacher)
    inits = {t.name: t for t in m.graph.initializer}
    w = numpy_helper.to_array(inits["fc1.weight"])  # [32, 64], output channels on axis 0
    scale = (np.abs(w).max(axis=1) / 3).astype(np.float32)  # a coarse 3-level-per-side grid
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    inits["fc1.weight"].CopyFrom(numpy_helper.from_array(q, "fc1.q"))
    m.graph.initializer.append(numpy_helper.from_array(scale, "fc1.scale"))
    dq = helper.make_node("DequantizeLinear", ["fc1.q", "fc1.scale"], ["fc1.weight"], axis=0, name="dq1")
    m.graph.node.insert(0, dq)
    repaired, res = _distill(m, teacher, calib, DistillConfig(ops=("Gemm",)))
    rec = {r["node"]: r for r in res.details["layers"]}["fc1"]
    assert rec["refit"] and rec["grid"] == "int8 grid" and rec["error_after"] < rec["error_before"]
    after = _weights(repaired)
    assert after["fc1.q"].dtype == np.int8 and np.array_equal(after["fc1.scale"], scale)
    assert np.abs(after["fc1.q"]).max() <= 127 and not np.array_equal(after["fc1.q"], q)
    assert _ops(repaired)["DequantizeLinear"] == 1
    assert digits_accuracy(repaired) >= digits_accuracy(m)


# -- structured pruning: the channel map --------------------------------------------------------


def test_pruned_conv_is_repaired_through_the_channel_map():
    m = builders.conv_bn(channels=8)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((32, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    test = {"x": rng.standard_normal((64, 3, 8, 8)).astype(np.float32)}
    (ref,) = builders.run(m, test)
    pruned = compress(m, Recipe(steps=(PruneChannelsConfig(ratio=0.5),), verify=OFF), data=calib)
    both = compress(m, Recipe(steps=(PruneChannelsConfig(ratio=0.5), DistillConfig()), verify=OFF), data=calib)
    assert _ops(both.model) == _ops(pruned.model)
    step = both.report.step("distill")
    rows = {r["node"]: r for r in step.details["layers"]}
    kept = pruned.report.step("prune_channels").details["groups"][0]["keep"]
    # the map found from activations is the one prune_channels recorded
    assert rows["conv"]["channel_map"] == sorted(kept["c"])
    assert rows["fc"]["refit"]
    (out_p,) = builders.run(pruned.model, test)
    (out_d,) = builders.run(both.model, test)
    err_p, err_d = np.abs(out_p - ref).max(), np.abs(out_d - ref).max()
    assert err_d < 0.5 * err_p


# -- declines -----------------------------------------------------------------------------------


def test_declines_without_data(teacher):
    student = tm.edit_weights(teacher, lambda n, w: tm.magnitude_prune(w, 0.8))
    out, res = _distill(student, teacher, None)
    assert not res.modified and "no calibration data" in res.skipped[0].reason
    assert all(np.array_equal(_weights(out)[k], v) for k, v in _weights(student).items())


def test_declines_shared_weight(calib):
    m = builders.mlp((64, 64, 64, 10), seed=2)  # MatMul + Add layers
    shared = onnx.ModelProto()
    shared.CopyFrom(m)
    for n in shared.graph.node:  # the second MatMul reads the first one's weight too
        if n.name == "MatMul_1":
            n.input[1] = "W0"
    shared.graph.initializer.remove(next(t for t in shared.graph.initializer if t.name == "W1"))
    student = tm.edit_weights(shared, lambda n, w: tm.magnitude_prune(w, 0.5))
    out, res = _distill(student, shared, calib)
    reasons = {s.node: s.reason for s in res.skipped}
    assert "shared" in reasons["MatMul_0"] and "shared" in reasons["MatMul_1"]
    assert np.array_equal(_weights(out)["W0"], _weights(student)["W0"])
    assert [r["node"] for r in res.details["layers"]] == ["MatMul_2"]


def test_declines_layer_without_teacher_tensor(calib):
    m = builders.mlp((64, 64, 10), seed=2)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(m)
    for n in renamed.graph.node:  # the teacher calls the first layer's output differently
        n.output[:] = ["sum0" if o == "add0" else o for o in n.output]
        n.input[:] = ["sum0" if i == "add0" else i for i in n.input]
    student = tm.edit_weights(m, lambda n, w: tm.magnitude_prune(w, 0.5))
    _, res = _distill(student, renamed, calib)
    reasons = {s.node: s.reason for s in res.skipped}
    assert reasons["MatMul_0"] == "the teacher has no tensor named 'add0'"
    assert [r["node"] for r in res.details["layers"]] == ["MatMul_1"]
    assert res.details["layers"][0]["target"] == "y"  # MatMul + Add(bias): the Add's output is the target


def _grouped_net(w1: np.ndarray, w2: np.ndarray, *, dq: bool = False) -> onnx.ModelProto:
    """x[N,4,6,6] -> Conv(group=2, 4->8) -> Relu -> depthwise Conv(group=8) -> y (weights given)."""
    inits = [numpy_helper.from_array(w1, "w1")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], group=2, pads=[1, 1, 1, 1], name="grouped"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu")]
    if dq:
        scale = np.float32(np.abs(w2).max() / 127)
        inits += [numpy_helper.from_array(np.round(w2 / scale).astype(np.int8), "w2_q"),
                  numpy_helper.from_array(np.array(scale, np.float32), "w2_s")]
        nodes.append(helper.make_node("DequantizeLinear", ["w2_q", "w2_s"], ["w2"], name="dq"))
    else:
        inits.append(numpy_helper.from_array(w2, "w2"))
    nodes.append(helper.make_node("Conv", ["r1", "w2"], ["y"], group=8, pads=[1, 1, 1, 1], name="depthwise"))
    g = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 6, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_grouped_and_depthwise_convs_are_repaired_within_their_groups():
    """A perturbed dense student is refitted back to the teacher's weights exactly (so the block-diagonal
    mapping of groups to im2col columns is right); a pruned one keeps its zeros and gets closer."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    teacher = _grouped_net(w1, w2)
    feeds = [{"x": rng.standard_normal((16, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    noisy = _grouped_net(w1 + 0.3 * rng.standard_normal(w1.shape).astype(np.float32),
                         w2 + 0.3 * rng.standard_normal(w2.shape).astype(np.float32))
    exact, res = _distill(noisy, teacher, feeds, DistillConfig(ridge=0.0))
    assert {r["node"] for r in res.details["layers"] if r["refit"]} == {"grouped", "depthwise"}
    np.testing.assert_allclose(_weights(exact)["w1"], w1, atol=1e-4)
    np.testing.assert_allclose(_weights(exact)["w2"], w2, atol=1e-4)

    def smooth(n):  # neighbouring pixels correlate, so kept weights can stand in for pruned ones
        return np.kron(rng.standard_normal((n, 4, 3, 3)), np.ones((1, 1, 2, 2))).astype(np.float32)

    student = _grouped_net(tm.magnitude_prune(w1, 0.5), tm.magnitude_prune(w2, 0.5))
    repaired, res = _distill(student, teacher, [{"x": smooth(16)} for _ in range(4)])
    rows = {r["node"]: r for r in res.details["layers"]}
    assert all(r["refit"] and r["error_after"] < 0.85 * r["error_before"] for r in rows.values())
    before, after = _weights(student), _weights(repaired)
    for name in ("w1", "w2"):
        assert after[name].shape == before[name].shape
        assert np.all(after[name][before[name] == 0] == 0), f"{name}: a pruned position came back"
    x = {"x": smooth(8)}
    (t,), (s,), (r,) = (builders.run(m, x) for m in (teacher, student, repaired))
    assert np.abs(r - t).mean() < 0.9 * np.abs(s - t).mean()


def test_declines_grouped_conv_behind_dequantize_linear():
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((8, 2, 3, 3)).astype(np.float32), rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    m = _grouped_net(w1, w2, dq=True)
    _, res = _distill(m, m, [{"x": np.ones((2, 4, 6, 6), np.float32)}])
    assert {s.node: s.reason for s in res.skipped}["depthwise"] == "grouped convolution behind DequantizeLinear"


# -- through the CLI ----------------------------------------------------------------------------


def test_cli_distill_flag(teacher, calib, tmp_path):
    from onnxcompress.cli import main

    src = tmp_path / "t.onnx"
    onnx.save(teacher, src)
    out, report = tmp_path / "s.onnx", tmp_path / "r.json"
    rc = main([str(src), str(out), "--prune", "0.8", "--distill", "--calib-data", calib, "--no-verify",
               "--report", str(report), "-q"])
    assert rc == 0
    import json

    steps = [s["name"] for s in json.loads(report.read_text())["steps"]]
    assert steps.index("sparsify") < steps.index("distill")
    pruned_only = tm.edit_weights(teacher, lambda n, w: tm.magnitude_prune(w, 0.8))
    assert digits_accuracy(str(out)) > digits_accuracy(pruned_only)


def test_static_int8_model_is_repaired_on_its_grids(teacher, calib):
    """quantize_int8 (static QDQ: int8 weights, int32 biases, Relu fused into the activation Q, layer
    outputs renamed) then distill: every Gemm is refitted, targets map back to the teacher's tensors
    (the pre-Relu output where the Relu was fused), the biases stay int32 behind their DequantizeLinear."""
    from onnxcompress.quantize.config import QuantizeInt8Config

    int8 = compress(teacher, Recipe(steps=(QuantizeInt8Config(),), verify=OFF), data=calib)
    both = compress(teacher, Recipe(steps=(QuantizeInt8Config(), DistillConfig()), verify=OFF), data=calib)
    rows = both.report.step("distill").details["layers"]
    assert [r["target"] for r in rows] == ["fc0_out", "fc1_out", "logits"]
    assert all(r["refit"] and r["grid"] == "int8 grid" for r in rows)
    assert _ops(both.model) == _ops(int8.model)
    w = _weights(both.model)
    assert {k: v.dtype for k, v in w.items() if k.endswith("bias_quantized")} == \
        {f"fc{i}.bias_quantized": np.dtype(np.int32) for i in range(3)}
    from onnxcompress.datasets import digits_feeds

    feed = digits_feeds(teacher, "test")
    (ref,), (a,), (b,) = (builders.run(m, feed) for m in (teacher, int8.model, both.model))

    def cos(x, y):
        return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))

    assert cos(ref, b) >= cos(ref, a) - 1e-4  # never worse than int8 alone on held-out data
