"""low_rank: the SVD keeps the energy it claims, layers split in two only where parameters drop,
digits accuracy holds, the data-aware variant uses the calibration statistics, and it declines
shared weights, full-rank cases and non-constant weights."""

from __future__ import annotations

import numpy as np
import pytest

import builders as b
from fuse_models import apply, digits_acc, digits_data, digits_mlp, header, ops, parse, randn
from onnxcompress.fuse.low_rank import LowRankConfig, LowRankPass, truncated_factors


def low_rank(model, data=None, **cfg):
    out, results = apply(model, LowRankPass(LowRankConfig(**cfg)), data=data)
    return out, results[0]


def cosine(a, c) -> float:
    a, c = np.ravel(a).astype(np.float64), np.ravel(c).astype(np.float64)
    return float(a @ c / np.linalg.norm(a) / np.linalg.norm(c))


def test_truncated_factors_keep_the_claimed_energy():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    v, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    s = 2.0 ** -np.arange(30)
    w = (u[:, :30] * s) @ v.T
    a, bm, r, kept = truncated_factors(w, 0.99)
    energy = np.cumsum(s ** 2) / np.sum(s ** 2)
    assert r == int(np.searchsorted(energy, 0.99) + 1) and kept >= 0.99
    assert a.shape == (40, r) and bm.shape == (r, 30)
    # ||W - AB||_F^2 / ||W||_F^2 = 1 - kept energy
    assert np.linalg.norm(w - a @ bm) ** 2 / np.linalg.norm(w) ** 2 == pytest.approx(1 - kept, rel=1e-6)


def low_rank_model(rng, k=96, n=80, r=6):
    w = (randn(rng, k, r) @ randn(rng, r, n) + randn(rng, k, n, scale=0.01)).astype(np.float32)
    wg = (randn(rng, n, r) @ randn(rng, r, k) + randn(rng, n, k, scale=0.01)).astype(np.float32)  # [N, K], transB
    return parse(f"""{header()}
    g (float[N, T, {k}] x, float[B, {k}] z) => (float[N, T, {n}] y, float[B, {n}] y2) {{
        y = MatMul (x, w)
        y2 = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (z, wg, bg)
    }}""", w=w, wg=wg, bg=randn(rng, n))


def test_splits_matmul_and_gemm_into_two_thinner_layers():
    rng = np.random.default_rng(1)
    m = low_rank_model(rng)
    out, res = low_rank(m, energy=0.999)
    assert ops(out) == {"MatMul": 3, "Gemm": 1}
    for rec in res.details["tensors"].values():
        assert rec["rank"] <= 8 and rec["params_after"] < rec["params_before"] / 5
    feeds = {"x": randn(rng, 2, 3, 96), "z": randn(rng, 4, 96)}
    for ref, got in zip(b.run(m, feeds), b.run(out, feeds)):
        assert cosine(ref, got) > 0.999
    params = sum(int(np.prod(t.dims)) for t in out.graph.initializer)
    assert params < 0.25 * sum(int(np.prod(t.dims)) for t in m.graph.initializer)


def test_digits_accuracy_and_data_aware_rank():
    m = digits_mlp()
    acc = digits_acc(m)
    x, _ = digits_data("calib")
    out, res = low_rank(m, energy=0.9, min_size=512)
    rank_plain = res.details["tensors"]["fc0.weight"]["rank"]
    assert digits_acc(out) >= acc - 0.04
    out_d, res_d = low_rank(m, data=[{"x": x}], energy=0.9, min_size=512, data_aware=True)
    rec = res_d.details["tensors"]["fc0.weight"]
    assert rec["data_aware"] and rec["rank"] < rank_plain          # quiet pixels give up their directions
    assert digits_acc(out_d) >= acc - 0.04


def test_data_aware_svd_lowers_output_error_at_equal_rank():
    rng = np.random.default_rng(2)
    k, n = 64, 48
    scale = np.exp(rng.uniform(-4, 1, k))
    w = rng.standard_normal((k, n))
    x = rng.standard_normal((512, k)) * scale
    rms = np.sqrt(np.mean(x ** 2, axis=0))
    errs = {}
    for name, sc in (("plain", None), ("aware", rms)):
        a, bm, r, _ = truncated_factors(w, 1.0, sc, rank=12)
        errs[name] = np.linalg.norm(x @ (w - a @ bm)) / np.linalg.norm(x @ w)
    assert errs["aware"] < 0.5 * errs["plain"], errs


def test_declines_shared_full_rank_and_nonconstant():
    rng = np.random.default_rng(3)
    m = parse(f"""{header()}
    g (float[N, 64] x, float[64, 64] wx) => (float[N, 64] y1, float[N, 64] y2, float[N, 64] y3,
                                             float[N, 64] y4) {{
        y1 = MatMul (x, shared)  y2 = MatMul (x, shared)
        y3 = MatMul (x, full)
        y4 = MatMul (x, wx)
    }}""", shared=randn(rng, 64, 64), full=randn(rng, 64, 64))
    out, res = low_rank(m, energy=0.99, min_size=1024)
    assert ops(out) == {"MatMul": 4}
    why = " | ".join(s.reason for s in res.skipped)
    assert "shared" in why and "would not reduce parameters" in why
    assert not res.modified


def test_without_data_the_data_aware_variant_notes_and_falls_back():
    from onnxcompress.context import Context
    from onnxcompress.graph.io import model_to_graph, open_model

    m = digits_mlp()
    graph = model_to_graph(open_model(m))
    with Context() as ctx:
        res = LowRankPass(LowRankConfig(energy=0.9, min_size=512, data_aware=True)).run(graph, ctx)
        assert any("calibration data" in n for n in ctx.notes)
    assert res.modified and not res.details["tensors"]["fc0.weight"]["data_aware"]


def test_cli_flag_adds_the_step():
    from onnxcompress.cli import build_parser, recipe_from_args

    p, targets, owners = build_parser()
    recipe = recipe_from_args(p.parse_args(["in.onnx", "--low-rank", "0.8", "--low-rank-data-aware"]), targets, owners)
    step = recipe.step("low_rank")
    assert step.energy == 0.8 and step.data_aware


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_bundled_models_keep_digits_accuracy_at_energy_09(name):
    from fuse_models import bundled

    path = bundled(name)
    if path is None:
        pytest.skip(f"models/{name}.onnx not built yet")
    import onnx

    from onnxcompress.datasets import digits_accuracy

    m = onnx.load(str(path))
    out, res = low_rank(m, energy=0.9, min_size=1024)
    assert res.details["factorized"] >= 2
    assert all(r["params_after"] < r["params_before"] for r in res.details["tensors"].values())
    assert digits_accuracy(out) >= digits_accuracy(m) - 0.02
