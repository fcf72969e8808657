"""prune_channels: structure (shapes, op counts), numbers (identity, lossless zero channels, digits
accuracy), declines (blocked groups, exclusions), the plan and its replay, and the onnx model zoo."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, numpy_helper

from builders import lossless_close, mlp, run, with_constant_nodes
from onnxcompress.api import compress
from onnxcompress.graph.io import graph_to_model
from onnxcompress.prune.channels import PruneChannelsConfig, keep_count, model_cost, replay_plan
from onnxcompress.errors import RecipeError
from onnxcompress.recipe import Recipe, VerifyConfig
from test_dependency import Net, branchy, resnet_block

ZOO = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def prune(model, **cfg):
    res = compress(model, Recipe(steps=(PruneChannelsConfig(**cfg),), verify=VerifyConfig(enabled=False)))
    step = res.report.to_dict()["steps"][0]
    return res.model, step


def valid(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


def feeds_for(model, seed=0):
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    return {i.name: rng.standard_normal([d.dim_value or 3 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input if i.name not in inits}


def init_shapes(model) -> dict[str, tuple]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def conv_weights(model) -> dict[str, tuple]:
    shapes = init_shapes(model)
    return {n.name: shapes[n.input[1]] for n in model.graph.node if n.op_type == "Conv"}


def matmul_weights(model) -> list[tuple]:
    shapes = init_shapes(model)
    return [shapes[n.input[1]] for n in model.graph.node if n.op_type == "MatMul"]


def ops(model) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


# -- identity and lossless ---------------------------------------------------------------------


@pytest.mark.parametrize("build", [lambda: mlp((16, 32, 8)), resnet_block, branchy])
def test_ratio_zero_is_the_identity(build):
    m = build()
    out, step = prune(m, ratio=0.0)
    assert not step["modified"] and step["details"]["groups"] == []
    assert init_shapes(out) == init_shapes(m) and ops(out) == ops(m)
    f = feeds_for(m)
    for a, b in zip(run(m, f), run(out, f)):
        assert np.array_equal(a, b)


def _zero_channels(model: onnx.ModelProto, weights: dict[str, tuple[int, list[int]]]) -> onnx.ModelProto:
    """Zero the given rows (axis, indices) of the named initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name in weights:
            axis, idx = weights[t.name]
            v = numpy_helper.to_array(t).copy()
            sl = [slice(None)] * v.ndim
            sl[axis] = idx
            v[tuple(sl)] = 0
            t.CopyFrom(numpy_helper.from_array(v, t.name))
    return m


def test_pruning_all_zero_channels_is_lossless_mlp():
    m = _zero_channels(mlp((16, 32, 8), seed=3), {"W0": (1, [1, 5, 6, 20]), "B0": (0, [1, 5, 6, 20])})
    out, step = prune(m, ratio=4 / 32)
    assert init_shapes(out)["W0_pruned"] == (16, 28) and init_shapes(out)["W1_pruned"] == (28, 8)
    assert step["details"]["groups"][0]["keep"]["relu0"] == [i for i in range(32) if i not in (1, 5, 6, 20)]
    f = feeds_for(m)
    assert lossless_close(run(m, f)[0], run(out, f)[0])


def test_pruning_all_zero_channels_is_lossless_across_a_residual_add():
    n = Net(seed=4)
    a = n.node("Relu", [n.conv("x", 3, 8)])
    b = n.conv(n.node("Relu", [n.conv(a, 8, 8)]), 8, 8)
    r = n.node("Relu", [n.node("Add", [a, b])])
    m = n.model(n.gemm(n.node("Flatten", [n.node("GlobalAveragePool", [r])]), 8, 3), (2, 3))
    zero = [2, 7]  # residual channels 2 and 7: zero in both producers (weights and biases)
    m = _zero_channels(m, {"w1": (0, zero), "w1_b": (0, zero), "w5": (0, zero), "w5_b": (0, zero)})
    out, step = prune(m, ratio=0.25, exclude=("conv3",))  # leave the inner group alone
    kept = {g["group"]: g for g in step["details"]["groups"]}
    assert list(kept) == ["conv1"] and kept["conv1"]["kept"] == 6
    shapes = init_shapes(out)
    assert shapes["w1_pruned"] == (6, 3, 3, 3) and shapes["w5_pruned"] == (6, 8, 3, 3)
    assert shapes["w3_pruned"] == (8, 6, 3, 3), "the inner conv reads the 6 remaining residual channels"
    assert shapes["fc10_pruned"] == (3, 6)
    valid(out)
    f = feeds_for(m)
    assert lossless_close(run(m, f)[0], run(out, f)[0])


def test_channel_shuffle_prunes_whole_shuffle_units_losslessly():
    """Reshape [N,8,H,W] -> [N,2,4,H,W] -> Transpose -> Reshape: channel a of both chunks is one unit."""
    n = Net(shape=(2, 3, 4, 4), seed=7)
    c = n.node("Relu", [n.conv("x", 3, 8)])
    r = n.node("Reshape", [c, n.init("to5d", np.array([2, 2, 4, 4, 4], np.int64))])
    t = n.node("Transpose", [r], perm=[0, 2, 1, 3, 4])
    back = n.node("Reshape", [t, n.init("to4d", np.array([2, 8, 4, 4], np.int64))])
    m = n.model(n.conv(back, 8, 3), (2, 3, 4, 4))
    m = _zero_channels(m, {"w1": (0, [1, 5]), "w1_b": (0, [1, 5])})  # unit a=1: x channels 1 and 4 + 1
    out, step = prune(m, ratio=0.25)
    g = step["details"]["groups"][0]
    assert g["keep"]["conv1"] == [0, 2, 3, 4, 6, 7] and g["keep"]["reshape5"] == [0, 1, 4, 5, 6, 7]
    consts = {t.name: numpy_helper.to_array(t).tolist() for t in out.graph.initializer}
    shapes = [consts[nd.input[1]] for nd in out.graph.node if nd.op_type == "Reshape"]
    assert shapes == [[2, 2, 3, 4, 4], [2, 6, 4, 4]]
    valid(out)
    f = feeds_for(m)
    assert lossless_close(run(m, f)[0], run(out, f)[0])


# -- structure -----------------------------------------------------------------------------------


def test_branchy_model_stays_valid_and_every_coupled_tensor_shrinks():
    m = branchy()
    out, step = prune(m, ratio=0.5)
    valid(out)
    assert ops(out) == ops(m), "structured pruning removes no op"
    shapes = init_shapes(out)
    groups = {g["group"]: g for g in step["details"]["groups"]}
    assert set(groups) == {"conv1", "conv12"}
    big = groups["conv1"]
    # partitions (by tensor and grouped-conv chunk) are pruned alone: conv1's 4 -> 2, each of the
    # 4 chunks of 3 of conv3 -> 2, each of the grouped conv's 4 chunks of 2 outputs -> 1
    assert big["channels"] == 24 and big["kept"] == 2 + 8 + 4
    keep = big["keep"]
    assert len(keep["conv1"]) == 2 and len(keep["conv3"]) == 8 and len(keep["concat5"]) == 10
    assert keep["split6_out1"] == [i - 4 for i in keep["concat5"] if i >= 4]
    # the depthwise conv keeps one filter per kept channel and its group follows
    dw = next(n for n in out.graph.node if n.name == "conv7")
    assert next(a.i for a in dw.attribute if a.name == "group") == 8
    assert shapes[dw.input[1]] == (8, 1, 3, 3)
    # the grouped conv keeps its 4 groups, 2 inputs and 1 output each
    gc = next(n for n in out.graph.node if n.name == "conv9")
    assert next(a.i for a in gc.attribute if a.name == "group") == 4 and shapes[gc.input[1]] == (4, 2, 1, 1)
    assert shapes[next(n for n in out.graph.node if n.name == "mul8").input[1]] == (8, 1, 1)
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == split.input[1])).tolist() \
        == [2, 8]
    assert shapes[next(n for n in out.graph.node if n.name == "conv12").input[1]] == (3, 6, 3, 3)
    # Flatten -> Gemm(transB=0): the Gemm keeps 16 spatial rows per kept channel
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert shapes[gemm.input[1]] == (3 * 16, 5)
    run(out, feeds_for(m))


def test_round_to_and_at_least_one_channel():
    m = mlp((16, 40, 8))
    out, step = prune(m, ratio=0.3, round_to=8)
    assert init_shapes(out)["W0_pruned"] == (16, 32), "28 kept -> rounded up to 32"
    out, step = prune(m, ratio=0.99)
    assert init_shapes(out)["W0_pruned"] == (16, 1)
    run(out, feeds_for(m))
    assert keep_count(10, 0.1, 8) == 10 and keep_count(100, 0.5, 8) == 56 and keep_count(3, 0.99) == 1


def test_gemm_trans_b_both_ways_and_constant_node_weights():
    for trans_b in (0, 1):
        n = Net(shape=(2, 12))
        h = n.node("Relu", [n.gemm("x", 12, 20, trans_b=trans_b)])
        m = n.model(n.gemm(h, 20, 4, trans_b=trans_b), (2, 4))
        out, step = prune(m, ratio=0.5)
        shapes = init_shapes(out)
        assert shapes["fc1_pruned"] == ((10, 12) if trans_b else (12, 10))
        assert shapes["fc3_pruned"] == ((4, 10) if trans_b else (10, 4)) and shapes["fc1_b_pruned"] == (10,)
        run(out, feeds_for(m))
    m = with_constant_nodes(mlp((16, 32, 8)))
    out, step = prune(m, ratio=0.5)
    consts = {n.output[0]: n for n in out.graph.node if n.op_type == "Constant"}
    w0 = next(n for n in out.graph.node if n.op_type == "MatMul").input[1]
    assert w0 in consts, "a weight held in a Constant node stays in a Constant node"
    assert tuple(consts[w0].attribute[0].t.dims) == (16, 16)
    valid(out)


# -- declines --------------------------------------------------------------------------------------


def test_declines_with_reasons_and_leaves_blocked_groups_untouched():
    n = Net()
    c = n.conv("x", 3, 8)
    soft = n.node("Softmax", [c], axis=1)              # mixes channels: blocks conv1's group
    d = n.node("Relu", [n.conv(soft, 8, 6)])          # prunable
    m = n.model(n.node("Flatten", [n.node("GlobalAveragePool", [n.conv(d, 6, 4)])]), (2, 4))
    out, step = prune(m, ratio=0.5)
    reasons = {s["node"]: s["reason"] for s in step["skipped"]}
    assert "Softmax is not understood" in reasons["conv1"]
    assert "graph output" in reasons["conv5"] or any("graph output" in r for r in reasons.values())
    shapes = init_shapes(out)
    assert shapes["w1"] == (8, 3, 3, 3), "the blocked group is not touched"
    assert shapes["w3_pruned"] == (3, 8, 3, 3)
    run(out, feeds_for(m))
    out2, step2 = prune(m, ratio=0.5, exclude=("conv3",))
    assert not step2["modified"] and any("excluded" in s["reason"] for s in step2["skipped"])


def test_override_sets_one_groups_ratio():
    """``w4=0.75`` (conv4's weight) prunes the inner conv's group at 0.75 and the residual group at the
    base ratio: the residual group keeps what a uniform 0.25 run keeps, the inner one the 2 of 8 filters
    of largest L1 norm over the input channels left to them; the model stays valid and runs."""
    m = resnet_block()
    out, step = prune(m, ratio=0.25, overrides=("w4=0.75",))
    groups = {g["group"]: g for g in step["details"]["groups"]}
    assert (groups["conv4"]["kept"], groups["conv1"]["kept"]) == (2, 6)
    assert groups["conv4"]["override"] == "w4" and "override" not in groups["conv1"]
    _, uniform = prune(m, ratio=0.25)
    assert groups["conv1"]["keep"] == next(g for g in uniform["details"]["groups"] if g["group"] == "conv1")["keep"]
    w4 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w4"))
    l1 = np.abs(w4[:, groups["conv1"]["keep"]["conv1"]]).sum(axis=(1, 2, 3))
    assert groups["conv4"]["keep"]["conv4"] == sorted(np.argsort(-l1, kind="stable")[:2].tolist())
    assert conv_weights(out)["conv4"] == (2, 6, 3, 3)
    valid(out)
    assert run(out, feeds_for(m))[0].shape == (2, 4)
    first, _ = prune(m, ratio=0.25, overrides=("conv*=0.5", "conv4=0.75"))  # first match wins
    assert conv_weights(first)["conv4"][0] == 4


def test_override_skip_and_bad_overrides_decline():
    m = resnet_block()
    out, step = prune(m, ratio=0.5, overrides=("conv4=skip",))
    assert conv_weights(out)["conv4"] == (8, 4, 3, 3), "the skipped group keeps its 8 output channels"
    assert any(s["reason"] == "override 'conv4' says skip" for s in step["skipped"])
    assert [g["group"] for g in step["details"]["groups"]] == ["conv1"]
    # a pattern that matches no layer writing a group
    res = compress(m, Recipe(steps=(PruneChannelsConfig(ratio=0.5, overrides=("nothing*=0.1",)),),
                             verify=VerifyConfig(enabled=False)))
    assert any("'nothing*' matches no layer" in n for n in res.report.notes)
    for bad in ("conv4=2:4", "conv4=1.5", "conv4", "conv4=-0.1", "=0.5"):
        with pytest.raises(RecipeError, match="prune_channels, overrides"):
            PruneChannelsConfig(ratio=0.5, overrides=(bad,))


def test_note_when_pruning_breaks_the_nchwc_channel_alignment():
    """16 -> 8 output channels: onnxruntime pads such convs back to its NCHWc block, the summary says so;
    not with round_to=16, and not for a net whose convs never had a multiple of 16 channels."""
    def notes(model, **cfg):
        res = compress(model, Recipe(steps=(PruneChannelsConfig(**cfg),), verify=VerifyConfig(enabled=False)))
        return [n for n in res.report.notes if "NCHWc" in n]

    wide = resnet_block(c=32)
    (note,) = notes(wide, ratio=0.25)
    assert "3 Conv(s) (conv1, conv7, conv4)" in note and "--round-to 16" in note
    assert notes(wide, ratio=0.5, round_to=16) == []
    assert notes(resnet_block(c=8), ratio=0.5) == []


def test_shared_weight_is_copied_not_corrupted():
    """Two layers read one weight; pruning one layer's group must not change the other."""
    n = Net(shape=(2, 8))
    w = n.weight("shared", (8, 8))
    h = n.node("Relu", [n.node("MatMul", ["x", w])])        # prunable group (h)
    y = n.node("Add", [n.node("MatMul", [h, n.weight("w2", (8, 8))]), n.node("MatMul", ["x", w])])
    m = n.model(y, (2, 8))
    out, step = prune(m, ratio=0.5)
    shapes = init_shapes(out)
    assert shapes["shared"] == (8, 8) and shapes["shared_pruned"] == (8, 4)
    f = feeds_for(m)
    run(out, f)


# -- numbers: accuracy on digits, importance methods, and the plan ---------------------------------


@pytest.fixture(scope="module")
def digits_mlp():
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 100 iterations are enough for > 90% here; convergence is not the point
        clf = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=100, random_state=0).fit(x[:1200], y[:1200])
    n = Net(shape=("N", 64))
    h = "x"
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        h = n.node("Add", [n.node("MatMul", [h, n.init(f"W{i}", w.astype(np.float32))]),
                           n.init(f"B{i}", b.astype(np.float32))])
        if i < len(clf.coefs_) - 1:
            h = n.node("Relu", [h])
    return n.model(h, ("N", 10)), x[1200:], y[1200:], x[:256]


def accuracy(model, x, y) -> float:
    return float((run(model, {"x": x})[0].argmax(1) == y).mean())


def _random_plan_accuracy(model, plan, x, y, seed) -> float:
    """Accuracy with the plan's channel counts but channels chosen at random (replayed)."""
    from onnxcompress.passes.base import cleanup_graph

    rng = np.random.default_rng(seed)
    groups = []
    for g in plan["groups"]:
        first = next(iter(g["keep"]))
        keep = sorted(rng.choice(g["channels"], g["kept"], replace=False).tolist())
        groups.append({"group": g["group"], "keep": {first: keep}})
    graph = gs.import_onnx(model)
    replay_plan(graph, {"groups": groups})
    return accuracy(graph_to_model(cleanup_graph(graph), model), x, y)


@pytest.mark.parametrize("importance", ["l1", "l2", "activation"])
def test_digits_accuracy_after_25_percent(digits_mlp, importance):
    """One-shot structured pruning of 25% of the hidden neurons, no fine-tuning: the digits MLP
    (0.93) keeps >= 0.78 (measured 0.82-0.84), and the chosen channels beat random ones."""
    m, x, y, calib = digits_mlp
    base = accuracy(m, x, y)
    recipe = Recipe(steps=(PruneChannelsConfig(ratio=0.25, importance=importance),), verify=VerifyConfig(enabled=False))
    res = compress(m, recipe, data=[{"x": calib[i:i + 64]} for i in range(0, 256, 64)])
    step = res.report.to_dict()["steps"][0]
    assert all(g["importance"] == importance for g in step["details"]["groups"])
    assert matmul_weights(res.model) == [(64, 48), (48, 24), (24, 10)]
    acc = accuracy(res.model, x, y)
    rand = np.mean([_random_plan_accuracy(m, step["details"], x, y, seed) for seed in range(3)])
    assert base > 0.9 and acc >= 0.78 and acc > rand, (base, acc, rand)


def test_importance_orders_differ_as_defined():
    """l1 and l2 rank a spread-out row and a peaked row differently; bn ranks by |gamma|."""
    from onnxcompress.prune.dependency import build_dependency_graph
    from onnxcompress.prune.importance import unit_scores

    n = Net(shape=(2, 4))
    w = np.array([[1, 0, 0.6], [1, 0, 0.6], [1, 0, 0.6], [1, 3, 0.6]], np.float32)  # columns: l1 4/3/2.4, l2 2/3/1.2
    h = n.node("Relu", [n.node("MatMul", ["x", n.init("w", w)])])
    m = n.model(n.node("MatMul", [h, n.weight("w2", (3, 2))]), (2, 2))
    grp = next(g for g in build_dependency_graph(gs.import_onnx(m), m).groups if g.prunable and not g.blocked)
    assert np.allclose(unit_scores(grp, "l1"), [4, 3, 2.4]) and np.allclose(unit_scores(grp, "l2"), [2, 3, 1.2])
    assert unit_scores(grp, "bn") is None, "no BatchNormalization: the pass falls back to l1"
    _, g = prune(m, ratio=0.34, importance="l1")
    assert g["details"]["groups"][0]["keep"]["relu2"] == [0, 1]
    _, g = prune(m, ratio=0.34, importance="l2")
    assert g["details"]["groups"][0]["keep"]["relu2"] == [0, 1]
    _, g = prune(m, ratio=0.67, importance="l2")
    assert g["details"]["groups"][0]["keep"]["relu2"] == [1]
    _, g = prune(m, ratio=0.67, importance="l1")
    assert g["details"]["groups"][0]["keep"]["relu2"] == [0]
    bn_model = resnet_block(seed=1)
    _, g = prune(bn_model, ratio=0.5, importance="bn")
    graph = gs.import_onnx(bn_model)
    gamma = next(t for t in graph.tensors().values() if t.name == "bn5_s").values  # the inner block's BN
    inner = next(x for x in g["details"]["groups"] if x["group"] == "conv4")
    assert inner["keep"]["conv4"] == sorted(np.argsort(-np.abs(gamma), kind="stable")[:4].tolist())


def test_plan_replays_on_another_model_with_the_same_names():
    a, b = resnet_block(seed=0), resnet_block(seed=5)
    out_a, step = prune(a, ratio=0.5)
    graph = gs.import_onnx(b)
    res = replay_plan(graph, step["details"])
    assert len(res.changes) == len(step["details"]["groups"])
    from onnxcompress.passes.base import cleanup_graph

    out_b = graph_to_model(cleanup_graph(graph), b)
    valid(out_b)
    assert sorted(init_shapes(out_b).values()) == sorted(init_shapes(out_a).values())
    w_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}["w1"]
    kept = step["details"]["groups"][0]["keep"]["conv1"]
    pruned = {t.name: numpy_helper.to_array(t) for t in out_b.graph.initializer}["w1_pruned"]
    assert np.array_equal(pruned, w_b[kept]), "replay keeps the plan's indices, not its own choice"
    run(out_b, feeds_for(b))


def test_reported_cost_matches_the_model():
    m = resnet_block()
    out, step = prune(m, ratio=0.5)
    d = step["details"]
    assert model_cost(m) == {"params": d["params_before"], "flops": d["flops_before"]}
    assert model_cost(out) == {"params": d["params_after"], "flops": d["flops_after"]}
    # conv1 by hand: 2 * (2*8*8*8 outputs) * (3*3*3) MACs
    n = Net()
    small = n.model(n.conv("x", 3, 8), (2, 8, 8, 8))
    assert model_cost(small) == {"params": 8 * 27 + 8, "flops": 2 * (2 * 8 * 8 * 8) * 27}


# -- the onnx wheel's model zoo ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["light_bvlc_alexnet", "light_zfnet512", "light_resnet50", "light_inception_v2",
                                  "light_shufflenet"])
def test_zoo_models_pruned_at_30_percent_stay_valid_and_run(name):
    path = os.path.join(ZOO, name + ".onnx")
    if not os.path.exists(path):
        pytest.skip("the onnx wheel ships no backend test data")
    m = onnx.load(path)
    out, step = prune(m, ratio=0.3)
    d = step["details"]
    valid(out)
    after = model_cost(out)
    assert after == {"params": d["params_after"], "flops": d["flops_after"]}
    assert d["params_after"] < 0.85 * d["params_before"] and d["flops_after"] < 0.9 * d["flops_before"]
    dense = sum(int(np.prod(t.dims)) for t in out.graph.initializer if t.data_type == TensorProto.FLOAT)
    assert dense < 0.01 * d["params_after"], "ConstantOfShape weights stay ConstantOfShape (shape edited)"
    y = run(out, feeds_for(out), optimize=True)[0]
    assert y.shape == (1, 1000) and np.isfinite(y).all()


# -- bias correction ---------------------------------------------------------------------------------


def _mean_shift(model, out, x) -> float:
    """Largest change of an output channel's mean (over the batch and any spatial axes)."""
    a, b = run(model, {"x": x})[0], run(out, {"x": x})[0]
    axes = tuple(i for i in range(a.ndim) if i != 1)
    return float(np.abs(a.mean(axes) - b.mean(axes)).max())


def test_bias_correction_keeps_the_mean_output_on_the_calibration_data():
    """The next layer is linear in the pruned channels, so its mean over the calibration data is
    restored exactly (MatMul + Add bias; Gemm C; 1x1 Conv bias; the running mean of the BatchNormalization
    after a Conv without bias), and not without correction."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    calib = [{"x": x[i:i + 64]} for i in range(0, 256, 64)]
    n = Net(shape=("N", 16))
    h = n.node("Relu", [n.gemm("x", 16, 24)])
    linear_gemm = n.model(n.gemm(h, 24, 6), ("N", 6))
    n = Net(shape=("N", 4, 5, 5))
    c = n.node("Relu", [n.conv("x", 4, 12, k=1)])
    conv = n.model(n.conv(c, 12, 3, k=1), ("N", 3, 5, 5))
    n = Net(shape=("N", 4, 5, 5))
    c = n.node("Relu", [n.conv("x", 4, 12, k=1)])
    conv_bn = n.model(n.bn(n.conv(c, 12, 3, k=1, bias=False), 3), ("N", 3, 5, 5))  # correction goes to BN's mean
    xc = rng.standard_normal((256, 4, 5, 5)).astype(np.float32)
    calib_c = [{"x": xc[i:i + 64]} for i in range(0, 256, 64)]
    cases = [(mlp((16, 32, 8), seed=1), x, calib), (linear_gemm, x, calib), (conv, xc, calib_c), (conv_bn, xc, calib_c)]
    for model, data, feeds in cases:
        shifts = []
        for bc in (False, True):
            step = PruneChannelsConfig(ratio=0.5, bias_correction=bc)
            recipe = Recipe(steps=(step,), verify=VerifyConfig(enabled=False))
            res = compress(model, recipe, data=feeds)
            shifts.append(_mean_shift(model, res.model, data))
        ref = float(np.abs(run(model, {"x": data})[0]).max())
        assert shifts[1] <= 1e-5 + 1e-5 * ref and shifts[0] > 100 * shifts[1], (model.graph.node[0].op_type, shifts)
        g = res.report.to_dict()["steps"][0]["details"]["groups"][0]
        assert set(g["bias_corrected"].values()) == {"ok"}


def test_bias_correction_declines_without_a_bias_and_without_data():
    n = Net(shape=("N", 16))
    h = n.node("Relu", [n.node("MatMul", ["x", n.weight("w1", (16, 12))])])
    m = n.model(n.node("MatMul", [h, n.weight("w2", (12, 4))]), ("N", 4))
    x = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    recipe = Recipe(steps=(PruneChannelsConfig(ratio=0.5, bias_correction=True),), verify=VerifyConfig(enabled=False))
    res = compress(m, recipe, data=[{"x": x}])
    g = res.report.to_dict()["steps"][0]["details"]["groups"][0]
    assert g["bias_corrected"] == {"matmul3": "no bias Add after the MatMul"}
    run(res.model, {"x": x})
    res = compress(m, recipe)  # no data: nothing to correct with, nothing recorded
    assert "bias_corrected" not in res.report.to_dict()["steps"][0]["details"]["groups"][0]


# -- property: any MLP, any ratio and round-to ---------------------------------------------------------


def test_property_widths_follow_keep_count_and_the_model_runs():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(st.lists(st.integers(1, 24), min_size=1, max_size=3), st.floats(0.0, 0.95), st.integers(1, 8))
    def check(hidden, ratio, round_to):
        sizes = (6, *hidden, 3)
        m = mlp(sizes, seed=len(hidden))
        out, _ = prune(m, ratio=ratio, round_to=round_to)
        widths = [shape[1] for shape in matmul_weights(out)][:-1]
        assert widths == [keep_count(h, ratio, round_to) for h in hidden]
        y = run(out, feeds_for(m))[0]
        assert y.shape == (3, 3) and np.isfinite(y).all()

    check()


# -- the bundled digits CNN (exported by PyTorch): pruning a channel == silencing it ----------------


def test_bundled_cnn_pruning_equals_silencing_the_removed_channels():
    """On the exported digits CNN, the pruned model computes exactly what the original computes
    when the removed channels' BatchNormalization scale and shift are zeroed (so they are 0 after
    ReLU and contribute nothing downstream)."""
    from onnxcompress.datasets import bundled_model_path, digits_feeds

    try:
        path = bundled_model_path("cnn")
    except FileNotFoundError:
        pytest.skip("models/cnn.onnx is not built")
    m = onnx.load(path)
    out, step = prune(m, ratio=0.25)
    groups = step["details"]["groups"]
    # stem + residual, the block's inner conv, and the strided conv read through ReduceMean -> Reshape -> Gemm
    assert len(groups) == 3 and [g["kept"] for g in groups] == [12, 12, 24]
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert init_shapes(out)[gemm.input[1]] == (10, 24)
    silenced = onnx.ModelProto()
    silenced.CopyFrom(m)
    inits = {t.name: t for t in silenced.graph.initializer}
    for node in silenced.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        keep = next((g["keep"][node.output[0]] for g in groups if node.output[0] in g["keep"]), None)
        if keep is None:
            continue
        for name in node.input[1:3]:  # gamma, beta
            v = numpy_helper.to_array(inits[name]).copy()
            v[[i for i in range(len(v)) if i not in keep]] = 0
            inits[name].CopyFrom(numpy_helper.from_array(v, name))
    valid(out)
    f = digits_feeds(m, "test")
    assert lossless_close(run(silenced, f)[0], run(out, f)[0])
    assert not lossless_close(run(m, f)[0], run(out, f)[0])
