"""The ``fuse`` pass: each rule changes the structure as claimed, keeps the numbers (1e-5 relative),
and declines when it must (shared weights, several readers, non-constant operands, training BN)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.version_converter
import pytest
from onnx import numpy_helper

import builders as b
from fuse_models import CORPUS, apply, assert_lossless, bundled, header, ops, parse, randn, random_chain
from onnxcompress.fuse.lossless import FuseConfig, FusePass
from onnxcompress.recipes import lossless_steps

RNG = np.random.default_rng(0)


def fuse(model, **cfg):
    out, results = apply(model, FusePass(FuseConfig(**cfg)))
    return out, results[0]


def feed(*shape, name="x", seed=1):
    return {name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def reasons(res) -> str:
    return " | ".join(f"{s.rule}: {s.reason}" for s in res.skipped)


# ---------------------------------------------------------------------------------------------- BN


def bn_inits(c, rng, prefix="bn"):
    return {f"{prefix}_s": rng.uniform(0.5, 1.5, c).astype(np.float32),
            f"{prefix}_b": randn(rng, c, scale=0.1), f"{prefix}_m": randn(rng, c, scale=0.1),
            f"{prefix}_v": rng.uniform(0.5, 1.5, c).astype(np.float32)}


def test_bn_after_conv_folds_and_keeps_names():
    m = b.conv_bn()
    out, res = fuse(m)
    assert ops(out).get("BatchNormalization", 0) == 0 and ops(out)["Conv"] == 1
    assert {"conv.w", "conv.b"} <= {t.name for t in out.graph.initializer}
    assert res.details["applied"]["bn_after_linear"] == 1
    assert_lossless(m, out, feed(2, 3, 8, 8))


@pytest.mark.parametrize("wrap", [b.with_constant_nodes, b.with_if_subgraph])
def test_bn_folds_in_constant_nodes_and_subgraphs(wrap):
    m = wrap(b.conv_bn())
    out, res = fuse(m)
    assert res.modified and "BatchNormalization" not in onnx.printer.to_text(out)
    assert_lossless(m, out, feed(2, 3, 8, 8))


def test_bn_after_gemm_matmul_and_convtranspose():
    rng = np.random.default_rng(1)
    m = parse(f"""{header()}
    g (float[N, 6] x, float[N, 4, 5, 5] z) => (float[N, 8] y1, float[N, 8] y2, float[N, 6, 6, 6] y3) {{
        a = Gemm <transB = 1, alpha = 0.5> (x, wg, bg)
        y1 = BatchNormalization <epsilon = 0.001> (a, g_s, g_b, g_m, g_v)
        c = MatMul (x, wm)
        y2 = BatchNormalization (c, m_s, m_b, m_m, m_v)
        t = ConvTranspose <group = 2> (z, wt)
        y3 = BatchNormalization (t, t_s, t_b, t_m, t_v)
    }}""", wg=randn(rng, 8, 6), bg=randn(rng, 8), wm=randn(rng, 6, 8), wt=randn(rng, 4, 3, 2, 2),
        **bn_inits(8, rng, "g"), **bn_inits(8, rng, "m"), **bn_inits(6, rng, "t"))
    out, res = fuse(m, rules=("bn_after_linear", "matmul_add_to_gemm"))
    assert "BatchNormalization" not in ops(out), reasons(res)
    assert ops(out)["Gemm"] == 2 and ops(out)["ConvTranspose"] == 1
    feeds = {**feed(3, 6), **feed(3, 4, 5, 5, name="z", seed=2)}
    assert_lossless(m, out, feeds)


def test_bn_before_gemm_and_unpadded_conv():
    rng = np.random.default_rng(2)
    m = parse(f"""{header()}
    g (float[N, 6] x, float[N, 4, 7, 7] z) => (float[N, 5] y1, float[N, 8, 5, 5] y2) {{
        a = BatchNormalization (x, a_s, a_b, a_m, a_v)
        y1 = Gemm <transB = 1> (a, wg, bg)
        c = BatchNormalization (z, c_s, c_b, c_m, c_v)
        y2 = Conv (c, wc, bc)
    }}""", wg=randn(rng, 5, 6), bg=randn(rng, 5), wc=randn(rng, 8, 4, 3, 3), bc=randn(rng, 8),
        **bn_inits(6, rng, "a"), **bn_inits(4, rng, "c"))
    out, res = fuse(m)
    assert "BatchNormalization" not in ops(out), reasons(res)
    assert_lossless(m, out, {**feed(3, 6), **feed(3, 4, 7, 7, name="z", seed=2)})


def test_bn_declines_shared_weight_two_readers_graph_output_nonconstant_and_padding():
    rng = np.random.default_rng(3)
    m = parse(f"""{header()}
    g (float[N, 4, 6, 6] x, float[4] mean) => (float[N, 4, 6, 6] y2, float[N, 4, 6, 6] s2, float[N, 4, 6, 6] y3,
            float[N, 4, 6, 6] c4, float[N, 4, 6, 6] c5, float[N, 4, 6, 6] y5, float[N, 4, 6, 6] y6,
            float[N, 4, 6, 6] y7) {{
        c2 = Conv (x, w2)  y2 = BatchNormalization (c2, a_s, a_b, a_m, a_v)  s2 = Add (c2, c2)
        c3 = Conv (x, wsh)  y3 = BatchNormalization (c3, a_s, a_b, a_m, a_v)  c4 = Conv (x, wsh)
        c5 = Conv (x, w5)  y5 = BatchNormalization (c5, a_s, a_b, a_m, a_v)
        c6 = Conv (x, w6)  y6 = BatchNormalization (c6, a_s, a_b, mean, a_v)
        b7 = BatchNormalization (x, a_s, a_b, a_m, a_v)  y7 = Conv <pads = [1, 1, 1, 1]> (b7, w7)
    }}""", **{f"w{i}": randn(rng, 4, 4, 1, 1) for i in (2, 5, 6, 7)}, wsh=randn(rng, 4, 4, 1, 1),
        **bn_inits(4, rng, "a"))
    out, res = fuse(m, rules=("bn_after_linear", "bn_before_linear"))
    assert ops(out)["BatchNormalization"] == 5
    why = reasons(res)
    assert "readers" in why                # c2 is read twice
    assert "shared with 1 other" in why    # wsh
    assert "graph input or output" in why  # c5
    assert "not a constant" in why         # mean is fed at run time
    assert "pads its input" in why         # BN before a padded Conv
    assert_lossless(m, out, {**feed(2, 4, 6, 6), "mean": np.full(4, 0.1, np.float32)})


def test_bn_declines_training_mode():
    rng = np.random.default_rng(4)
    m = parse(f"""{header(15)}
    g (float[N, 4, 6, 6] x) => (float[N, 4, 6, 6] y) {{
        c = Conv (x, w)  y = BatchNormalization <training_mode = 1> (c, a_s, a_b, a_m, a_v)
    }}""", w=randn(rng, 4, 4, 3, 3), **bn_inits(4, rng, "a"))
    out, res = fuse(m)
    assert ops(out)["BatchNormalization"] == 1 and "training mode" in reasons(res)


# ---------------------------------------------------------------------------------------------- MatMul + Add


def test_matmul_add_to_gemm_only_for_2d():
    m2 = b.mlp((16, 32, 8))
    out, res = fuse(m2, rules=("matmul_add_to_gemm",))
    assert ops(out) == {"Gemm": 2, "Relu": 1}
    assert_lossless(m2, out, feed(3, 16))
    rng = np.random.default_rng(4)
    m3 = parse(f"""{header()}
    g (float[N, T, 16] x) => (float[N, T, 8] y) {{ h = MatMul (x, w)  y = Add (h, bias) }}""",
               w=randn(rng, 16, 8), bias=randn(rng, 8))
    out3, res3 = fuse(m3, rules=("matmul_add_to_gemm",))
    assert ops(out3) == {"MatMul": 1, "Add": 1}
    assert "2-D" in reasons(res3)


# ---------------------------------------------------------------------------------------------- chains


def test_consecutive_matmul_add_matmul_add_merges_into_one():
    rng = np.random.default_rng(5)
    m = parse(f"""{header()}
    g (float[N, T, 32] x) => (float[N, T, 4] y) {{
        h = MatMul (x, w1)  hb = Add (h, b1)  z = MatMul (hb, w2)  y = Add (b2, z)
    }}""", w1=randn(rng, 32, 16, scale=0.2), b1=randn(rng, 16), w2=randn(rng, 16, 4, scale=0.3), b2=randn(rng, 4))
    out, res = fuse(m)
    assert ops(out) == {"MatMul": 1, "Add": 1}, reasons(res)
    assert_lossless(m, out, feed(2, 3, 32))


def test_consecutive_gemm_gemm_and_matmul_matmul():
    rng = np.random.default_rng(6)
    m = parse(f"""{header()}
    g (float[N, 20] x) => (float[N, 3] y, float[N, 5] y2) {{
        h = Gemm <transB = 1, beta = 2.0> (x, w1, b1)  y = Gemm (h, w2, b2)
        k = MatMul (x, v1)  y2 = MatMul (k, v2)
    }}""", w1=randn(rng, 30, 20, scale=0.2), b1=randn(rng, 30), w2=randn(rng, 30, 3, scale=0.2),
               b2=randn(rng, 1, 3), v1=randn(rng, 20, 24), v2=randn(rng, 24, 5))
    out, res = fuse(m, rules=("consecutive_linear",))
    assert ops(out) == {"Gemm": 1, "MatMul": 1}, reasons(res)
    assert_lossless(m, out, feed(4, 20))


def test_consecutive_declines_when_no_saving_or_nonlinear_or_shared():
    rng = np.random.default_rng(7)
    m = parse(f"""{header()}
    g (float[N, 8] x) => (float[N, 8] y, float[N, 8] y2, float[N, 8] y3, float[N, 16] t) {{
        h = MatMul (x, w1)  y = MatMul (h, w2)
        r = MatMul (x, w3)  rr = Relu (r)  y2 = MatMul (rr, w4)
        s = MatMul (x, wsh)  y3 = MatMul (s, w5)  t = MatMul (y3, wsh2)
    }}""", w1=randn(rng, 8, 2), w2=randn(rng, 2, 8), w3=randn(rng, 8, 16), w4=randn(rng, 16, 8),
        wsh=randn(rng, 8, 16), w5=randn(rng, 16, 8), wsh2=randn(rng, 8, 16))
    # make s's weight shared: t reads it too
    next(n for n in m.graph.node if n.output[0] == "t").input[1] = "wsh"
    out, res = fuse(m, rules=("consecutive_linear",))
    assert ops(out)["MatMul"] == 7
    why = reasons(res)
    assert "would not reduce parameters" in why and "shared" in why
    assert_lossless(m, out, feed(2, 8))


def test_linear_rules_decline_non_finite_weights_and_gemm_scalars():
    """A weight holding Inf, or a Gemm alpha of NaN, is not folded or merged: inf · 0 would make NaNs the
    original never produces (the case a mutated file once turned into a RuntimeWarning). The same
    chains with finite values merge."""
    import onnx_graphsurgeon as gs

    from onnxcompress.fuse.patterns import as_linear

    def chains(w1_bad: bool, alpha: float) -> onnx.ModelProto:
        rng = np.random.default_rng(9)
        w1 = randn(rng, 8, 16)
        if w1_bad:
            w1[0, 0] = np.inf
        m = parse(f"""{header()}
        g (float[N, 8] x) => (float[N, 4] y, float[N, 4] z) {{
            h = MatMul (x, w1)  y = MatMul (h, w2)
            k = Gemm <alpha = 1.0> (x, w3)  z = MatMul (k, w4)
        }}""", w1=w1, w2=randn(rng, 16, 4), w3=randn(rng, 8, 16), w4=randn(rng, 16, 4))
        next(n for n in m.graph.node if n.op_type == "Gemm").attribute[0].f = alpha
        return m

    good, _ = fuse(chains(False, 1.0), rules=("consecutive_linear",))
    assert sum(ops(good).values()) == 2  # both chains merge (4 layers -> 2) when their values are finite
    bad = chains(True, float("nan"))
    out, _ = fuse(bad, rules=("consecutive_linear",))
    assert ops(out) == ops(bad)  # nothing merged
    g = gs.import_onnx(bad)
    why = {n.op: as_linear(n, g)[1] for n in g.nodes if n.op == "Gemm" or n.inputs[1].name == "w1"}
    assert why == {"MatMul": "the weight 'w1' holds NaN or Inf values", "Gemm": "Gemm alpha=nan / beta=1 is not finite"}


def test_consecutive_conv1x1_merges_and_declines_padding():
    rng = np.random.default_rng(8)
    m = parse(f"""{header()}
    g (float[N, 16, 5, 5] x) => (float[N, 8, 5, 5] y, float[N, 8, 7, 7] y2) {{
        h = Conv (x, w1, b1)  y = Conv (h, w2, b2)
        k = Conv <pads = [1, 1, 1, 1]> (x, v1)  y2 = Conv (k, v2)
    }}""", w1=randn(rng, 32, 16, 1, 1), b1=randn(rng, 32), w2=randn(rng, 8, 32, 1, 1), b2=randn(rng, 8),
        v1=randn(rng, 32, 16, 1, 1), v2=randn(rng, 8, 32, 1, 1))
    out, res = fuse(m, rules=("consecutive_conv1x1",))
    assert ops(out)["Conv"] == 3
    assert "padded" in reasons(res)
    assert_lossless(m, out, feed(2, 16, 5, 5))


# ---------------------------------------------------------------------------------------------- parallel


def qkv_model(shared: bool = False):
    rng = np.random.default_rng(9)
    wv = "wq" if shared else "wv"
    m = parse(f"""{header()}
    g (float[N, T, 16] x) => (float[N, T, 16] q, float[N, T, 16] k, float[N, T, 8] v, float[N, T, 16] q2) {{
        qh = MatMul (x, wq)  q = Add (qh, bq)
        kh = MatMul (x, wk)  k = Add (kh, bk)
        vh = MatMul (x, {wv}v)  v = Add (vh, bv)
        q2 = MatMul (q, wq2)
    }}""".replace(f"{wv}v", "wv" if not shared else "wq"),
        wq=randn(rng, 16, 16), bq=randn(rng, 16), wk=randn(rng, 16, 16), bk=randn(rng, 16),
        **({} if shared else {"wv": randn(rng, 16, 8)}), bv=randn(rng, 16 if shared else 8),
        wq2=randn(rng, 16, 16))
    return m


def test_parallel_qkv_merge_into_one_matmul_and_split():
    m = qkv_model()
    out, res = fuse(m, rules=("parallel_linear",))
    assert ops(out) == {"MatMul": 2, "Add": 1, "Split": 1}, reasons(res)
    assert_lossless(m, out, feed(2, 5, 16))


@pytest.mark.parametrize("opset", [11, 17])
def test_parallel_gemms_merge_with_the_opsets_split(opset):
    rng = np.random.default_rng(12)
    m = parse(f"""{header(opset)}
    g (float[N, 16] x) => (float[N, 8] a, float[N, 4] c) {{
        a = Gemm <transB = 1, alpha = 2.0> (x, wa, ba)
        c = Gemm (x, wc)
    }}""", wa=randn(rng, 8, 16), ba=randn(rng, 8), wc=randn(rng, 16, 4))
    out, res = fuse(m, rules=("parallel_linear",))
    assert ops(out) == {"Gemm": 1, "Split": 1}, reasons(res)
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert (len(split.input) == 2) == (opset >= 13)    # sizes as an input from opset 13, an attribute before
    assert_lossless(m, out, feed(3, 16))


def test_parallel_declines_shared_weight():
    m = qkv_model(shared=True)
    out, res = fuse(m, rules=("parallel_linear",))
    assert ops(out)["MatMul"] == 4 and "Split" not in ops(out)
    assert "fewer than two" in reasons(res)


# ---------------------------------------------------------------------------------------------- weight folds


def test_transpose_and_scales_fold_into_weights():
    rng = np.random.default_rng(10)
    m = parse(f"""{header()}
    g (float[N, 6] x, float[N, 3, 6, 6] z) => (float[N, 4] y, float[N, 5, 6, 6] y2) {{
        wt = Transpose (w)  s = Div (x, d)  h = MatMul (s, wt)  y = Mul (h, c)
        zs = Mul (cz, z)  y2 = Conv <pads = [1, 1, 1, 1]> (zs, wc)
    }}""", w=randn(rng, 4, 6), d=rng.uniform(0.5, 2, 6).astype(np.float32), c=randn(rng, 1, 4),
        cz=rng.uniform(0.5, 2, (3, 1, 1)).astype(np.float32), wc=randn(rng, 5, 3, 3, 3))
    out, res = fuse(m)
    assert ops(out) == {"MatMul": 1, "Conv": 1}, reasons(res)
    assert_lossless(m, out, {**feed(3, 6), **feed(2, 3, 6, 6, name="z", seed=3)})


def test_scale_after_a_bias_add_folds_into_weight_and_bias():
    rng = np.random.default_rng(13)
    m = parse(f"""{header()}
    g (float[N, T, 16] x) => (float[N, T, 8] y, float[N, T, 8] y2, float[N, T, 8] z) {{
        h = MatMul (x, w)  hb = Add (bias, h)  y = Div (hb, d)
        h2 = MatMul (x, w2)  hb2 = Add (h2, bias2)  y2 = Mul (hb2, c2)  z = Relu (hb2)
    }}""", w=randn(rng, 16, 8), bias=randn(rng, 8), d=np.array(2.5, np.float32), w2=randn(rng, 16, 8),
        bias2=randn(rng, 8), c2=randn(rng, 8))
    out, res = fuse(m, rules=("scale_after_linear",))
    assert ops(out) == {"MatMul": 2, "Add": 2, "Mul": 1, "Relu": 1}     # the Div is gone, the Mul stays
    assert "'hb2' has 2 readers" in reasons(res)
    assert_lossless(m, out, feed(2, 3, 16))


def test_scale_declines_nonconstant_zero_divisor_shape_change_and_graph_output():
    rng = np.random.default_rng(11)
    m = parse(f"""{header()}
    g (float[N, 6] x, float[4] c) => (float[N, 4] y1, float[N, 4] y2, float[1, N, 4] y3, float[4, 6] wt,
                                     float[N, 4] h4, float[N, 4] y4) {{
        h1 = MatMul (x, w1)  y1 = Mul (h1, c)
        h2 = MatMul (x, w2)  y2 = Div (h2, zero)
        h3 = MatMul (x, w3)  y3 = Mul (h3, c3)
        h4 = MatMul (x, w4)  y4 = Mul (h4, c4)
        wt = Transpose (w5)
    }}""", w1=randn(rng, 6, 4), w2=randn(rng, 6, 4), w3=randn(rng, 6, 4), w4=randn(rng, 6, 4), w5=randn(rng, 6, 4),
        zero=np.array([1, 0, 1, 1], np.float32), c3=randn(rng, 1, 1, 4), c4=randn(rng, 4))
    out, res = fuse(m, rules=("transpose_constant", "scale_after_linear"))
    why = reasons(res)
    assert ops(out) == {"MatMul": 4, "Mul": 3, "Div": 1, "Transpose": 1}
    assert "zeros" in why and "does not broadcast" in why and "graph input or output" in why
    assert "graph output" in why  # the transposed constant is itself an output
    assert_lossless(m, out, {**feed(2, 6), "c": np.arange(4, dtype=np.float32)})


# ---------------------------------------------------------------------------------------------- pass level


def test_fuse_is_in_every_preset_and_can_be_turned_off():
    assert any(s.name == "fuse" for s in lossless_steps())
    m = b.conv_bn()
    out, res = fuse(m, enabled=False)
    assert ops(out) == ops(m) and not res.modified


def test_cli_no_fuse_flag():
    from onnxcompress.cli import build_parser, recipe_from_args

    p, targets, owners = build_parser()
    recipe = recipe_from_args(p.parse_args(["in.onnx", "--no-fuse"]), targets, owners)
    assert recipe.step("fuse").enabled is False
    recipe = recipe_from_args(p.parse_args(["in.onnx", "--fuse-rules", "bn_after_linear"]), targets, owners)
    assert recipe.step("fuse").rules == ("bn_after_linear",)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_bundled_models_parity(name):
    path = bundled(name)
    if path is None:
        pytest.skip(f"models/{name}.onnx not built yet")
    from onnxcompress.datasets import digits_feeds

    m = onnx.load(str(path))
    out, res = fuse(m)
    feeds = {k: v[:64] for k, v in digits_feeds(m).items()}
    assert_lossless(m, out, feeds)
    assert len(out.graph.node) <= len(m.graph.node)


def test_random_chains_keep_their_outputs():
    """Seeded random chains of every pattern the rules know (and some they must leave alone)."""
    applied = set()
    for seed in range(40):
        m, feeds = random_chain(seed)
        out, res = fuse(m)
        assert_lossless(m, out, feeds)
        applied |= set(res.details["applied"])
    assert len(applied) >= 6, applied   # the sample exercises most rules


# ---------------------------------------------------------------------------------------------- corpus


def _corpus_cases():
    cases = []
    for sub in ("pytorch-converted", "pytorch-operator"):
        root = CORPUS / sub
        if root.is_dir():
            cases += [d for d in sorted(root.iterdir()) if (d / "model.onnx").is_file()]
    return cases


def _corpus_feeds(case, model):
    ds = case / "test_data_set_0"
    feeds = {}
    for i, inp in enumerate(x for x in model.graph.input if x.name not in {t.name for t in model.graph.initializer}):
        p = ds / f"input_{i}.pb"
        t = onnx.TensorProto()
        t.ParseFromString(p.read_bytes())
        feeds[inp.name] = numpy_helper.to_array(t)
    return feeds


FAST_CORPUS = ("test_Linear_no_bias", "test_BatchNorm2d_eval", "test_BatchNorm1d_3d_input_eval", "test_Linear", "test_Conv2d",
               "test_operator_addmm", "test_operator_mm", "test_BatchNorm3d_eval")


@pytest.mark.parametrize("case", [c for c in _corpus_cases() if c.name in FAST_CORPUS], ids=lambda c: c.name)
def test_corpus_sample_parity(case):
    _check_corpus(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", _corpus_cases(), ids=lambda c: c.name)
def test_corpus_parity(case):
    _check_corpus(case)


def _upgraded(m):
    """Opset < 7 corpus models (onnxcompress refuses them) upgraded to opset 13 with onnx's converter."""
    if any(o.domain in ("", "ai.onnx") and o.version < 7 for o in m.opset_import):
        try:
            m = onnx.version_converter.convert_version(m, 13)
            onnx.checker.check_model(m)
        except Exception as e:
            pytest.skip(f"opset < 7 and onnx cannot upgrade it: {type(e).__name__}")
    return m


def _check_corpus(case):
    m = _upgraded(onnx.load(str(case / "model.onnx")))
    feeds = _corpus_feeds(case, m)
    try:
        b.run(m, feeds)
    except Exception as e:  # a few corpus models do not run in this onnxruntime at all
        pytest.skip(f"reference does not run: {type(e).__name__}")
    out, _ = fuse(m)
    assert_lossless(m, out, feeds)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["light_resnet50", "light_inception_v2", "light_densenet121", "light_shufflenet"])
def test_light_corpus_parity(name):
    path = CORPUS / "light" / f"{name}.onnx"
    m = onnx.load(str(path))
    inits = {t.name for t in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    feeds = {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    out, _ = fuse(m)
    assert_lossless(m, out, feeds)


def test_configs_round_trip_through_recipe_json():
    import json

    from onnxcompress.errors import RecipeError
    from onnxcompress.fuse.low_rank import LowRankConfig
    from onnxcompress.fuse.weight_sharing import ShareWeightsConfig
    from onnxcompress.recipe import Recipe

    recipe = Recipe((FuseConfig(rules=("bn_after_linear", "parallel_linear")), LowRankConfig(energy=0.8),
                     ShareWeightsConfig(codebook_bits=3, channel_groups=2)))
    again = Recipe.from_dict(json.loads(recipe.to_json()))
    assert again == recipe
    with pytest.raises(RecipeError, match="did you mean"):
        Recipe.from_dict({"steps": [{"pass": "fuse", "rule": ["bn_after_linear"]}]})
    with pytest.raises(RecipeError):
        FuseConfig(rules=("bn_folding",))
