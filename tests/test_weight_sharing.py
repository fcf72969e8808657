"""share_weights: the 1-D k-means is right (matches scikit-learn), the snapped weights have at most K
values with zeros kept, digits accuracy holds, the file shrinks with compact storage, and it declines
where it should (small, already shared, non-finite weights)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import builders as b
from fuse_models import apply, digits_acc, digits_data, digits_mlp, header, parse, randn
from onnxcompress.errors import RecipeError
from onnxcompress.fuse.weight_sharing import ShareWeightsConfig, ShareWeightsPass, kmeans_1d, share_values


def share(model, data=None, **cfg):
    out, results = apply(model, ShareWeightsPass(ShareWeightsConfig(**cfg)), data=data)
    return out, results[0]


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def inertia(x, centres, w=None):
    idx = np.searchsorted((centres[:-1] + centres[1:]) / 2, x, side="right")
    d = (x - centres[idx]) ** 2
    return float(np.sum(d if w is None else w * d))


@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_1d_matches_sklearn_lloyd(weighted):
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(1500), 4 + 0.3 * rng.standard_normal(300)])
    w = rng.uniform(0.1, 3, x.size) if weighted else None
    init = np.linspace(x.min(), x.max(), 8)[:, None]
    km = KMeans(8, init=init, n_init=1, max_iter=300, tol=0).fit(x[:, None], sample_weight=w)
    mine = kmeans_1d(x, 8, weights=w, max_iterations=300)
    assert inertia(x, mine, w) == pytest.approx(inertia(x, np.sort(km.cluster_centers_.ravel()), w), rel=1e-9)


def test_share_values_keeps_zeros_and_at_most_k_values():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0
    errs = []
    for k in (4, 16, 64):
        s, book, pinned = share_values(w, k)
        assert pinned and np.array_equal(s == 0, w == 0)      # sparsity survives exactly
        assert np.unique(s).size <= k and set(np.unique(s)) <= set(book)
        errs.append(np.linalg.norm(s - w) / np.linalg.norm(w))
    assert errs[0] > errs[1] > errs[2] and errs[1] < 0.15


def test_digits_accuracy_and_plan_per_layer():
    m = digits_mlp()
    acc = digits_acc(m)
    out, res = share(m, clusters=16, min_size=512)
    assert digits_acc(out) >= acc - 0.01
    w = weights(out)
    for name in ("fc0.weight", "fc1.weight"):
        assert np.unique(w[name]).size <= 16
        rec = res.details["tensors"][name]
        assert rec["bits"] == 4 and 0 < rec["rel_error"] < 0.15 and len(rec["codebooks"][0]) <= 16
    # biases are below min_size: untouched
    np.testing.assert_array_equal(w["fc0.bias"], weights(m)["fc0.bias"])


def test_codebook_bits_and_channel_groups():
    m = digits_mlp()
    out2, res2 = share(m, codebook_bits=2, min_size=512)
    assert all(np.unique(v).size <= 4 for k, v in weights(out2).items() if k.endswith("weight"))
    assert res2.details["mean_bits"] == 2
    out_g, res_g = share(m, codebook_bits=2, channel_groups=8, min_size=512)
    rec1, rec8 = res2.details["tensors"]["fc0.weight"], res_g.details["tensors"]["fc0.weight"]
    assert rec8["groups"] == 8 and rec8["axis"] == 1 and rec8["rel_error"] < rec1["rel_error"]
    assert rec8["bits_per_group"] == 2 and rec8["bits"] == 5     # one tensor-wide codebook: 32 values
    w = weights(out_g)["fc0.weight"]
    for cols in np.array_split(np.arange(w.shape[1]), 8):
        assert np.unique(w[:, cols]).size <= 4


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_file_is_about_bits_over_32_with_compact_storage(tmp_path, bits):
    from onnxcompress.api import compress
    from onnxcompress.recipe import Recipe, VerifyConfig

    try:
        from onnxcompress.encode.compact import CompactStorageConfig
    except ImportError:
        pytest.skip("compact storage is not available")
    m = b.mlp((256, 512, 256), seed=3)
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(m, fp32)
    recipe = Recipe((ShareWeightsConfig(codebook_bits=bits), CompactStorageConfig()), verify=VerifyConfig(enabled=False))
    out = compress(m, recipe).save(tmp_path / "shared.onnx")
    ratio = out.stat().st_size / fp32.stat().st_size
    assert bits / 32 < ratio < bits / 32 + 0.02, ratio    # packed indices + codebooks + fp32 biases
    if bits >= 4:
        x = {"x": np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)}
        ref, got = b.run(m, x)[0], b.run(str(out), x)[0]
        assert float(np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99


def test_activation_aware_lowers_output_error_on_the_data():
    rng = np.random.default_rng(4)
    k, n = 64, 32
    scale = np.exp(rng.uniform(-3, 2, k)).astype(np.float32)   # a few busy input features, many quiet ones
    w = randn(rng, k, n) / scale[:, None]                        # busy features meet small weights
    m = parse(f"""{header()}
    g (float[N, {k}] x) => (float[N, {n}] y) {{ y = MatMul (x, w) }}""", w=w)
    calib = [{"x": (rng.standard_normal((64, k)) * scale).astype(np.float32)} for _ in range(2)]
    test = {"x": (rng.standard_normal((256, k)) * scale).astype(np.float32)}
    ref = b.run(m, test)[0]
    errs = {}
    for aware in (False, True):
        out, res = share(m, data=calib, clusters=4, min_size=16, activation_aware=aware)
        assert res.details["activation_aware"] is aware
        errs[aware] = float(np.linalg.norm(b.run(out, test)[0] - ref) / np.linalg.norm(ref))
    assert errs[True] < 0.8 * errs[False], errs


def test_shares_embedding_tables_constant_nodes_and_subgraphs():
    m = b.with_if_subgraph(b.with_constant_nodes(b.mlp((32, 64, 8), seed=5)))
    out, res = share(m, clusters=8, min_size=256)
    assert res.details["weights_shared"] == 4    # two per If branch
    rng = np.random.default_rng(5)
    emb = parse(f"""{header()}
    g (int64[N, T] ids) => (float[N, T, 32] y) {{ y = Gather (table, ids) }}""", table=randn(rng, 100, 32))
    out_e, res_e = share(emb, clusters=8)
    assert np.unique(weights(out_e)["table"]).size <= 8
    assert res_e.details["tensors"]["table"]["axis"] == 0


def test_declines_already_shared_small_and_nonfinite():
    rng = np.random.default_rng(6)
    few = rng.choice(np.array([-1, 0.5, 2], np.float32), (64, 32))
    bad = randn(rng, 64, 32)
    bad[0, 0] = np.inf
    m = parse(f"""{header()}
    g (float[N, 64] x) => (float[N, 32] y1, float[N, 32] y2, float[N, 8] y3, float[64, 32] out) {{
        y1 = MatMul (x, few)  y2 = MatMul (x, bad)  y3 = MatMul (x, small)  y4 = MatMul (x, out)
    }}""", few=few, bad=bad, small=randn(rng, 64, 8), out=randn(rng, 64, 32))
    out, res = share(m, clusters=4, min_size=1024)
    why = {s.node: s.reason for s in res.skipped}
    assert "already has 3" in why["few"] and "inf" in why["bad"] and "small" not in why
    assert "graph output" in why["out"]
    assert not res.modified
    for name, v in weights(out).items():
        np.testing.assert_array_equal(v, weights(m)[name])


def test_declines_encoding_parameters_and_shares_biases_and_norms():
    """MatMulNBits scales, a DequantizeLinear scale and a storage decode's scale keep their values (a
    kernel reads them as an encoding); a MatMul's Add bias and a LayerNormalization scale are shared."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(7)
    big = lambda *shape: numpy_helper.to_array(numpy_helper.from_array(randn(rng, *shape)))  # noqa: E731
    inits = {"codes": np.zeros((64, 2, 16), np.uint8), "nb_scales": np.abs(big(64, 2)) + 0.1,
             "q": np.ones((32, 64), np.int8), "dq_scale": np.abs(big(64)) + 0.1,
             "s8": np.ones((32, 64), np.int8), "st_scale": np.abs(big(1, 64)) + 0.1,
             "bias": big(64), "gamma": big(64), "W": big(32, 64)}
    nodes = [helper.make_node("MatMulNBits", ["x", "codes", "nb_scales"], ["a"], domain="com.microsoft", K=32, N=64,
                              bits=4, block_size=16, name="nbits"),
             helper.make_node("DequantizeLinear", ["q", "dq_scale"], ["wq"], axis=1, name="dq"),
             helper.make_node("MatMul", ["x", "wq"], ["b"], name="mm_q"),
             helper.make_node("Cast", ["s8"], ["s8f"], to=onnx.TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["s8f", "st_scale"], ["ws"], name="decode"),
             helper.make_node("MatMul", ["x", "ws"], ["c"], name="mm_s"),
             helper.make_node("MatMul", ["x", "W"], ["d0"], name="mm"),
             helper.make_node("Add", ["d0", "bias"], ["d"], name="add_bias"),
             helper.make_node("LayerNormalization", ["d", "gamma"], ["e"], axis=-1, name="ln"),
             helper.make_node("Sum", ["a", "b", "c", "e"], ["y"], name="sum")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    out, res = share(m, clusters=4, min_size=64)
    why = {s.node: s.reason for s in res.skipped}
    assert "MatMulNBits 'nbits'" in why["nb_scales"] and "DequantizeLinear 'dq'" in why["dq_scale"]
    assert "Mul 'decode'" in why["st_scale"]
    after = weights(out)
    for name in ("nb_scales", "dq_scale", "st_scale"):
        np.testing.assert_array_equal(after[name], inits[name])
    for name in ("bias", "gamma", "W"):
        assert len(np.unique(after[name])) <= 4 < len(np.unique(inits[name]))


def test_config_validation_and_cli():
    assert ShareWeightsConfig().k == 16 and ShareWeightsConfig(codebook_bits=3).k == 8
    with pytest.raises(RecipeError):
        ShareWeightsConfig(clusters=32, codebook_bits=4)
    with pytest.raises(RecipeError):
        ShareWeightsConfig(clusters=1)
    from onnxcompress.cli import build_parser, recipe_from_args

    p, targets, owners = build_parser()
    recipe = recipe_from_args(p.parse_args(["in.onnx", "--cluster", "8", "--cluster-groups", "4"]), targets, owners)
    step = recipe.step("share_weights")
    assert step.k == 8 and step.channel_groups == 4
    x, _ = digits_data("calib")
    assert x.shape[1] == 64


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_bundled_models_keep_digits_accuracy_at_k16(name):
    from fuse_models import bundled

    path = bundled(name)
    if path is None:
        pytest.skip(f"models/{name}.onnx not built yet")
    from onnxcompress.datasets import digits_accuracy

    m = onnx.load(str(path))
    out, res = share(m, clusters=16)
    assert res.details["weights_shared"] >= 2
    for rec in res.details["tensors"].values():
        assert rec["distinct"] <= 16
    if name == "transformer":   # the token embedding table is shared too
        assert any(len(r["shape"]) == 2 and r["axis"] == 0 for r in res.details["tensors"].values())
    assert digits_accuracy(out) >= digits_accuracy(m) - 0.01
