"""merge_neurons: exact for identical (and, through ReLU, positively scaled) neurons, closer than
pruning for near-duplicates, and declines where the merge rule does not hold."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builders import lossless_close, run
from onnxcompress.api import compress
from onnxcompress.fuse.neuron_merge import MergeNeuronsConfig, cluster_neurons
from onnxcompress.prune.channels import PruneChannelsConfig
from onnxcompress.recipe import Recipe, VerifyConfig
from test_dependency import Net, resnet_block
from test_prune_channels import feeds_for, init_shapes, ops, valid


def compress_with(model, step):
    res = compress(model, Recipe(steps=(step,), verify=VerifyConfig(enabled=False)))
    return res.model, res.report.to_dict()["steps"][0]


def redundant_mlp(*, act="Relu", scale=1.0, noise=0.0, seed=0, distinct=24, copies=8):
    """x[4,16] -> MatMul+Add -> act -> MatMul -> y; ``copies`` hidden neurons repeat earlier ones
    (times ``scale``, plus ``noise``)."""
    n = Net(shape=(4, 16), seed=seed)
    rng = np.random.default_rng(seed + 1)
    w = rng.standard_normal((16, distinct)).astype(np.float32) / 4
    b = (rng.standard_normal(distinct) * 0.1).astype(np.float32)
    src = rng.choice(distinct, copies, replace=False)
    w = np.concatenate([w, w[:, src] * scale + noise * rng.standard_normal((16, copies))], axis=1).astype(np.float32)
    b = np.concatenate([b, b[src] * scale + noise * rng.standard_normal(copies)]).astype(np.float32)
    perm = rng.permutation(distinct + copies)  # interleave the copies
    h = n.node(act, [n.node("Add", [n.node("MatMul", ["x", n.init("w1", w[:, perm])]), n.init("b1", b[perm])])])
    y = n.node("MatMul", [h, n.weight("w2", (distinct + copies, 5))])
    return n.model(y, (4, 5))


def test_identical_neurons_merge_exactly():
    m = redundant_mlp()
    out, step = compress_with(m, MergeNeuronsConfig(ratio=8 / 32))
    assert init_shapes(out)["w1_pruned"] == (16, 24) and init_shapes(out)["w2_pruned"] == (24, 5)
    assert ops(out) == ops(m)
    valid(out)
    g = step["details"]["groups"][0]
    assert g["neurons"] == 32 and g["kept"] == 24 and g["max_distance"] < 1e-6
    assert sum(len(c["merged"]) for c in g["clusters"]) == 8
    f = feeds_for(m)
    assert lossless_close(run(m, f)[0], run(out, f)[0])


def test_positively_scaled_neurons_merge_exactly_through_relu_only():
    m = redundant_mlp(scale=2.5)
    out, step = compress_with(m, MergeNeuronsConfig(ratio=8 / 32))
    g = step["details"]["groups"][0]
    assert g["scaled"] and all(abs(a - 2.5) < 1e-4 or abs(a - 0.4) < 1e-4 for c in g["clusters"] for a in c["alpha"])
    f = feeds_for(m)
    assert lossless_close(run(m, f)[0], run(out, f)[0])
    # Sigmoid is not positively homogeneous: the scaled copies are not recognised as the same neuron
    m = redundant_mlp(scale=2.5, act="Sigmoid")
    out, step = compress_with(m, MergeNeuronsConfig(ratio=8 / 32))
    assert not step["details"]["groups"][0]["scaled"]
    assert not lossless_close(run(m, f)[0], run(out, f)[0])


def test_identical_conv_filters_merge_exactly_through_batchnorm():
    n = Net(seed=2)
    c = n.conv("x", 3, 8)
    m = n.model(n.conv(n.node("Relu", [n.bn(c, 8)]), 8, 4), (2, 4, 8, 8))
    # make filters 5, 6, 7 copies of 0, 1, 2 (weights, bias and BatchNormalization parameters)
    for t in m.graph.initializer:
        if t.name in ("w1", "w1_b", "bn2_s", "bn2_b", "bn2_m", "bn2_v"):
            v = onnx.numpy_helper.to_array(t).copy()
            v[5:8] = v[0:3]
            t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))
    out, step = compress_with(m, MergeNeuronsConfig(ratio=3 / 8))
    g = step["details"]["groups"][0]
    assert not g["scaled"], "BatchNormalization is affine, not homogeneous"
    assert sorted((c["keep"], c["merged"]) for c in g["clusters"]) == [(0, [5]), (1, [6]), (2, [7])]
    assert init_shapes(out)[out.graph.node[-1].input[1]] == (4, 5, 3, 3)
    f = feeds_for(m)
    assert lossless_close(run(m, f)[0], run(out, f)[0])


def test_near_duplicates_merge_closer_than_pruning():
    m = redundant_mlp(noise=0.003, seed=3)
    f = feeds_for(m, seed=1)
    ref = run(m, f)[0]
    merged, _ = compress_with(m, MergeNeuronsConfig(ratio=8 / 32))
    pruned, _ = compress_with(m, PruneChannelsConfig(ratio=8 / 32))
    err_merge = float(np.abs(run(merged, f)[0] - ref).max())
    err_prune = float(np.abs(run(pruned, f)[0] - ref).max())
    assert err_merge < 0.1 * err_prune, (err_merge, err_prune)
    assert err_merge < 0.05 * float(np.abs(ref).max())


def test_declines_residual_groups_and_exclusions_with_reasons():
    m = resnet_block()
    out, step = compress_with(m, MergeNeuronsConfig(ratio=0.5))
    reasons = {s["node"]: s["reason"] for s in step["skipped"]}
    assert any("several layers write" in r for r in reasons.values()), reasons
    merged = [g["layer"] for g in step["details"]["groups"]]
    assert merged == ["conv4"], "only the block's inner conv has one writer"
    valid(out)
    out, step = compress_with(m, MergeNeuronsConfig(ratio=0.5, exclude=("conv4",)))
    assert not step["modified"] and any("excluded" in s["reason"] for s in step["skipped"])


def test_clustering_is_seeded_and_collapses_duplicates_first():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 5))
    x[6:] = x[:6]
    assert cluster_neurons(x, 6, seed=0, by_direction=False) == [(i, [i, i + 6]) for i in range(6)]
    a = cluster_neurons(rng.standard_normal((30, 4)), 7, seed=1, by_direction=False)
    assert len(a) == 7 and sorted(j for _, m in a for j in m) == list(range(30))


@pytest.mark.parametrize("ratio", [0.0])
def test_ratio_zero_changes_nothing(ratio):
    m = redundant_mlp()
    out, step = compress_with(m, MergeNeuronsConfig(ratio=ratio))
    assert not step["modified"] and init_shapes(out) == init_shapes(m)


def test_identical_filters_merge_exactly_through_flatten_into_a_linear_layer():
    """Each merged channel owns a block of H*W columns of the Gemm; blocks are added position by position."""
    n = Net(shape=(2, 3, 4, 4), seed=6)
    c = n.node("Relu", [n.conv("x", 3, 6)])
    m = n.model(n.gemm(n.node("Flatten", [c], axis=1), 6 * 16, 5), (2, 5))
    for t in m.graph.initializer:
        if t.name in ("w1", "w1_b"):
            v = onnx.numpy_helper.to_array(t).copy()
            v[4:6] = v[0:2]
            t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))
    out, step = compress_with(m, MergeNeuronsConfig(ratio=2 / 6))
    g = step["details"]["groups"][0]
    assert g["scaled"] and sorted((c["keep"], c["merged"]) for c in g["clusters"]) == [(0, [4]), (1, [5])]
    assert init_shapes(out)[out.graph.node[-1].input[1]] == (5, 4 * 16)
    f = feeds_for(m)
    assert lossless_close(run(m, f)[0], run(out, f)[0])


def test_wide_neurons_cluster_on_a_projection_and_still_pair_near_copies():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 600))  # wider than the 256-dimension projection
    x[30:] = x[:10] + 1e-3 * rng.standard_normal((10, 600))
    clusters = cluster_neurons(x, 30, seed=0, by_direction=False)
    pairs = sorted(m for _, m in clusters if len(m) > 1)
    assert pairs == [[i, i + 30] for i in range(10)]
