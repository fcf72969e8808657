"""sparsify: magnitude pruning by ratio (per layer or global), keep-top-K, threshold and N:M.

Three ways: the masks are exactly what the rule says (counts, which weights, the pattern along the
reduction axis) and kept weights are bit-identical; the task metric holds (digits accuracy of a
trained MLP); and the pass declines what it must (unknown uses, graph outputs, shared embeddings,
overrides, bad recipes).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders as b
from onnxcompress.errors import RecipeError
from onnxcompress.prune.sparsity import SparsifyConfig, SparsifyPass, nm_mask
from onnxcompress.recipe import Recipe
from test_encode import apply_passes, ops


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _prune(model, **kw):
    out, (res,) = apply_passes(model, SparsifyPass(SparsifyConfig(**kw)))
    onnx.checker.check_model(out, full_check=True)
    return out, res


def _kept_unchanged(before: np.ndarray, after: np.ndarray) -> bool:
    keep = after != 0
    return np.array_equal(after[keep], before[keep]) and np.all((after == 0) | (after == before))


# ------------------------------------------------------------------------------------------------
# rules


def test_ratio_per_layer_zeroes_exactly_the_smallest():
    ref = b.mlp((64, 300, 100, 10), seed=0)
    out, res = _prune(ref, ratio=0.5)
    w0, w1 = _weights(ref), _weights(out)
    for name in ("W0", "W1", "W2"):
        n = w0[name].size
        assert np.count_nonzero(w1[name] == 0) == n // 2
        assert _kept_unchanged(w0[name], w1[name])
        assert np.abs(w0[name][w1[name] == 0]).max() <= np.abs(w0[name][w1[name] != 0]).min()
        assert res.details["tensors"][name]["sparsity"] == pytest.approx(0.5, abs=1 / n)
    for name in ("B0", "B1", "B2"):  # biases left alone by default
        assert np.array_equal(w0[name], w1[name])
    assert res.details["left_alone"] == {"bias": 3}
    assert ops(out) == ops(ref)


def test_global_scope_ranks_across_layers():
    ref = b.mlp((64, 300, 100, 10), seed=1)
    for t in ref.graph.initializer:  # give the layers different scales so global != per layer
        if t.name == "W1":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 10, t.name))
    out, res = _prune(ref, ratio=0.6, scope="global")
    w0, w1 = _weights(ref), _weights(out)
    names = ("W0", "W1", "W2")
    total = sum(w0[n].size for n in names)
    assert sum(np.count_nonzero(w1[n] == 0) for n in names) == int(0.6 * total)
    cut = res.details["global_threshold"]
    for n in names:
        assert np.abs(w0[n][w1[n] == 0]).max() <= cut <= np.abs(w0[n][w1[n] != 0]).min()
    sp = {n: res.details["tensors"][n]["sparsity"] for n in names}
    assert sp["W1"] < 0.4 and sp["W0"] > 0.8  # the large-scale layer keeps more


def test_keep_top_and_thresholds():
    ref = b.mlp((64, 300, 10), seed=2)
    w0 = _weights(ref)
    out, _ = _prune(ref, keep_top=100)
    for n in ("W0", "W1"):
        kept = _weights(out)[n] != 0
        assert kept.sum() == 100
        assert np.abs(w0[n][kept]).min() >= np.abs(w0[n][~kept]).max()
    out, _ = _prune(ref, threshold=0.05)
    for n in ("W0", "W1"):
        w = _weights(out)[n]
        assert np.array_equal(w == 0, np.abs(w0[n]) < 0.05) and _kept_unchanged(w0[n], w)
    out, res = _prune(ref, threshold=0.5, threshold_mode="std")
    for n in ("W0", "W1"):
        t = 0.5 * w0[n].astype(np.float64).std()
        assert np.array_equal(_weights(out)[n] == 0, np.abs(w0[n]) < t)
        assert res.details["tensors"][n]["rule"] == f"threshold {t:.6g}"


def _groups_ok(w: np.ndarray, axis_last: np.ndarray, n: int, m: int) -> bool:
    return bool(np.all((axis_last.reshape(-1, m) != 0).sum(1) <= n))


def test_nm_along_the_reduction_axis_of_matmul_gemm_and_conv():
    # MatMul B[K, N]: groups along K (axis 0)
    ref = b.mlp((64, 32, 8), seed=3)
    out, res = _prune(ref, nm="2:4")
    w = _weights(out)["W0"]
    assert np.all((w.T.reshape(32, 16, 4) != 0).sum(-1) == 2)
    assert not np.all((w.reshape(64, 8, 4) != 0).sum(-1) == 2)  # not along N
    assert res.details["tensors"]["W0"]["rule"].endswith("nm 2:4")
    # Gemm transB=1: fc.w [N, K], groups along axis 1; Conv W[Cout, Cin, kh, kw] flattened
    cb = b.conv_bn(channels=8)
    out, res = _prune(cb, nm="1:4")
    fc = _weights(out)["fc.w"]
    assert np.all((fc.reshape(4, 2, 4) != 0).sum(-1) == 1)
    # conv.w is [8, 3, 3, 3]: 27 is not a multiple of 4
    assert any(s.node == "conv.w" and "not a multiple of M=4" in s.reason for s in res.skipped)
    conv4 = np.random.default_rng(0).standard_normal((6, 4, 3, 3)).astype(np.float32)
    zero = nm_mask(np.abs(conv4), 2, 4, (1, 2, 3))
    assert np.all((~zero).reshape(6, 9, 4).sum(-1) == 2)


def test_nm_combines_with_a_ratio():
    ref = b.mlp((64, 32, 8), seed=4)
    out, _ = _prune(ref, ratio=0.75, nm="2:4")
    w = _weights(out)["W0"]
    assert np.count_nonzero(w == 0) >= int(0.75 * w.size)
    assert np.all((w.T.reshape(32, 16, 4) != 0).sum(-1) <= 2)


def test_overrides_per_layer():
    ref = b.mlp((64, 300, 100, 10), seed=5)
    out, res = _prune(ref, ratio=0.5, overrides=("W0=0.25", "W2=skip", "W1=2:4"))
    w0, w1 = _weights(ref), _weights(out)
    assert np.count_nonzero(w1["W0"] == 0) == int(0.25 * w0["W0"].size)
    assert np.array_equal(w1["W2"], w0["W2"])
    assert any(s.node == "W2" and "override" in s.reason for s in res.skipped)
    assert np.all((w1["W1"].T.reshape(100, 75, 4) != 0).sum(-1) <= 2)
    # matching on the consumer node's name works too
    out, _ = _prune(ref, ratio=0.5, overrides=("MatMul_0=skip",))
    assert np.array_equal(_weights(out)["W0"], w0["W0"])


def test_constant_nodes_and_if_subgraphs_are_pruned():
    base = b.mlp((16, 64, 8), seed=6)
    for ref in (b.with_constant_nodes(base), b.with_if_subgraph(base)):
        out, res = _prune(ref, ratio=0.5)
        assert {"W0", "W1"} <= set(res.details["tensors"])
        assert all(r["sparsity"] >= 0.49 for r in res.details["tensors"].values())


# ------------------------------------------------------------------------------------------------
# refusals and recipe checks


def _model(nodes, inits, out_shape=(2, 8)):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_declines_unknown_uses_outputs_and_shared_embeddings():
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")
    # a weight read by Add (not a bias after a linear op)
    a = numpy_helper.from_array(rng.standard_normal((2, 8)).astype(np.float32), "A")
    m = _model([helper.make_node("Add", ["x", "A"], ["y"], name="add")], [a])
    out, res = _prune(m, ratio=0.5)
    assert not res.modified and "read by Add" in res.skipped[0].reason
    # a weight that is also a graph output
    m = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [w])
    m.graph.output.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [8, 8]))
    out, res = _prune(m, ratio=0.5)
    assert not res.modified and "graph output" in res.skipped[0].reason
    # a table shared by an embedding Gather and a MatMul (tied weights)
    ids = numpy_helper.from_array(np.array([1, 2], np.int64), "ids")
    m = _model([helper.make_node("Gather", ["W", "ids"], ["e"], name="emb"),
                helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                helper.make_node("Add", ["h", "e"], ["y"], name="add")], [w, ids])
    out, res = _prune(m, ratio=0.5)
    assert not res.modified and "embedding" in res.skipped[0].reason
    out, res = _prune(m, ratio=0.5, include=("embedding",))
    assert res.modified and np.count_nonzero(_weights(out)["W"] == 0) == 32


def test_norm_and_bias_left_alone_unless_included():
    cb = b.conv_bn()
    out, res = _prune(cb, ratio=0.5)
    w0, w1 = _weights(cb), _weights(out)
    for n in ("bn.scale", "bn.bias", "bn.mean", "bn.var", "conv.b", "fc.b"):
        assert np.array_equal(w0[n], w1[n])
    assert set(res.details["tensors"]) == {"conv.w", "fc.w"}
    out, res = _prune(cb, ratio=0.5, include=("bias", "norm"))
    assert {"conv.b", "fc.b", "bn.scale"} <= set(res.details["tensors"])


def test_no_rule_is_a_skip_and_bad_recipes_are_errors():
    _, res = _prune(b.mlp((8, 8)), scope="global")
    assert not res.modified and "no rule" in res.skipped[0].reason
    for bad in ({"ratio": 0.5, "keep_top": 3}, {"nm": "4:2"}, {"nm": "2-4"}, {"overrides": ["W0"]},
                {"overrides": ["W0=2:4"], "ratio": 1.5}, {"overrides": ["W0=0.5"]}, {"scope": "net"}):
        with pytest.raises(RecipeError):
            Recipe.from_dict({"steps": [{"pass": "sparsify", **bad}]})
    r = Recipe.from_dict({"steps": [{"pass": "sparsify", "ratio": 0.5, "overrides": ["fc*=skip"]}]})
    assert Recipe.from_dict(r.to_dict()) == r


# ------------------------------------------------------------------------------------------------
# task metric: a trained digits MLP


@pytest.fixture(scope="module")
def digits_mlp() -> onnx.ModelProto:
    """A 64-64-10 ReLU MLP trained on the digits train split with scikit-learn (seeded, < 1 s)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from onnxcompress.datasets import digits_split

    x, y = digits_split("train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=100, random_state=0).fit(x.reshape(len(x), -1), y)
    inits = [numpy_helper.from_array(w.astype(np.float32), n) for w, n in
             zip([clf.coefs_[0], clf.intercepts_[0], clf.coefs_[1], clf.intercepts_[1]], ["W0", "B0", "W1", "B1"])]
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="fc0"), helper.make_node("Add", ["h0", "B0"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "W1"], ["l0"], name="fc1"),
             helper.make_node("Add", ["l0", "B1"], ["logits"])]
    g = helper.make_graph(nodes, "digits_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def test_digits_accuracy_against_sparsity(digits_mlp):
    from onnxcompress.datasets import digits_accuracy

    base = digits_accuracy(digits_mlp)
    assert base > 0.9
    acc50 = digits_accuracy(_prune(digits_mlp, ratio=0.5)[0])
    acc75 = digits_accuracy(_prune(digits_mlp, ratio=0.75, scope="global")[0])
    acc24 = digits_accuracy(_prune(digits_mlp, nm="2:4")[0])
    # measured (seed 0): base 0.969, 50 % 0.953, 2:4 0.922, 75 % global 0.931; budgets leave a margin
    assert acc50 >= base - 0.03 and acc24 >= base - 0.07 and acc75 >= base - 0.10, (base, acc50, acc24, acc75)
    # pruning everything but one weight per layer destroys the model: the metric can fail
    assert digits_accuracy(_prune(digits_mlp, keep_top=1)[0]) < 0.5


def test_compress_with_prune_and_compact_storage(digits_mlp):
    from onnxcompress.api import compress
    from onnxcompress.datasets import digits_accuracy
    from onnxcompress.recipes import default_recipe

    recipe = default_recipe().with_step(SparsifyConfig(ratio=0.9)).replace(verify=Recipe().verify.__class__(enabled=False))
    result = compress(digits_mlp, recipe)
    onnx.checker.check_model(result.model)
    steps = {s.name: s for s in result.report.steps}
    table = steps["compact_storage"].details["tensors"]
    assert table["W0"]["encoded_bytes"] <= 0.35 * table["W0"]["dense_bytes"]
    pruned_only, _ = _prune(digits_mlp, ratio=0.9)
    feeds = {"x": np.random.default_rng(0).random((16, 64), dtype=np.float32)}
    assert np.array_equal(b.run(result.model, feeds)[0], b.run(pruned_only, feeds)[0])
    assert result.model.ByteSize() < 0.45 * digits_mlp.ByteSize()  # W1 (640 weights) stays dense: < 1024
    assert digits_accuracy(result.model) == digits_accuracy(pruned_only)


def test_cli_flags_build_the_steps():
    from onnxcompress.cli import build_parser, recipe_from_args

    parser, targets, owners = build_parser()

    def recipe(*argv):
        return recipe_from_args(parser.parse_args(["in.onnx", *argv]), targets, owners)

    r = recipe("--prune", "0.5", "--prune-scope", "global", "--nm", "2:4", "--prune-override", "fc*=skip,W0=0.25")
    s = r.step("sparsify")
    assert (s.ratio, s.scope, s.nm, s.overrides) == (0.5, "global", "2:4", ("fc*=skip", "W0=0.25"))
    assert r.steps[-1].name == "compact_storage" and r.steps[-1].enabled
    assert recipe("--keep-top", "10").step("sparsify").keep_top == 10
    s = recipe("--sparsify-threshold", "0.5", "--threshold-mode", "std").step("sparsify")
    assert (s.threshold, s.threshold_mode) == (0.5, "std")
    assert not recipe("--prune", "0.5", "--no-compact-storage").step("compact_storage").enabled
    with pytest.raises(RecipeError):
        recipe("--prune", "0.5", "--keep-top", "3")


# ------------------------------------------------------------------------------------------------
# the bundled digits models (built by tools/build_models.py; skipped where they are not built)


def _bundled(name: str):
    from onnxcompress.datasets import bundled_model_path

    try:
        return onnx.load(str(bundled_model_path(name)))
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_bundled_mlp_at_90_percent_meets_the_storage_targets():
    from onnxcompress.datasets import digits_accuracy
    from onnxcompress.encode.compact import CompactStoragePass
    from onnxcompress.fuse.weight_sharing import ShareWeightsConfig, ShareWeightsPass

    mlp = _bundled("mlp")
    pruned, _ = apply_passes(mlp, SparsifyPass(SparsifyConfig(ratio=0.9)))
    compact, (res,) = apply_passes(pruned, CompactStoragePass())
    big = [k for k, v in res.details["tensors"].items() if v["dense_bytes"] >= 4096]
    assert len(big) == 2
    for name in big:  # issue 4: <= 0.35x fp32 with float values
        assert res.details["tensors"][name]["encoded_bytes"] <= 0.35 * res.details["tensors"][name]["dense_bytes"]
    feeds = {mlp.graph.input[0].name: np.random.default_rng(0).random((32, 64), dtype=np.float32)}
    assert np.array_equal(b.run(compact, feeds, optimize=True)[0], b.run(pruned, feeds, optimize=True)[0])
    assert digits_accuracy(compact) == digits_accuracy(pruned)
    shared, _ = apply_passes(pruned, ShareWeightsPass(ShareWeightsConfig(clusters=16)))
    _, (res,) = apply_passes(shared, CompactStoragePass())
    for name in big:  # ... and <= 0.06x with 4-bit codebook values
        row = res.details["tensors"][name]
        assert "codebook4" in row["encoding"] and row["encoded_bytes"] <= 0.06 * row["dense_bytes"], row


def test_bundled_transformer_prunes_matrices_and_leaves_the_rest():
    tr = _bundled("transformer")
    out, res = _prune(tr, ratio=0.3)
    assert res.details["left_alone"]["embedding"] == 1 and res.details["left_alone"]["norm"] >= 4
    assert all(abs(r["sparsity"] - 0.3) < 0.01 for r in res.details["tensors"].values())
    assert [s.node for s in res.skipped] == ["pos"]  # the learned positional table is added, not multiplied
    from onnxcompress.datasets import digits_accuracy

    assert digits_accuracy(out) >= digits_accuracy(tr) - 0.03
