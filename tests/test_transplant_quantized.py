"""transplant into a quantized (int8 QDQ) destination: matched by base name or position, re-quantized
on the destination's grid (onnxcompress.transfer.transplant, rule 4)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

import builders as b
from onnxcompress.api import compress
from onnxcompress.quantize.config import QuantizeInt8Config
from onnxcompress.recipe import Recipe, VerifyConfig
from onnxcompress.transfer.transplant import transplant

RNG = np.random.default_rng(3)
CALIB = [{"x": RNG.standard_normal((32, 16)).astype(np.float32)}]
X = {"x": RNG.standard_normal((64, 16)).astype(np.float32)}


def _int8(model: onnx.ModelProto) -> onnx.ModelProto:
    return compress(model, Recipe(steps=(QuantizeInt8Config(),), verify=VerifyConfig(enabled=False)), data=CALIB).model


def _inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _cos(a: np.ndarray, c: np.ndarray) -> float:
    return float((a * c).sum() / np.sqrt((a * a).sum() * (c * c).sum()))


def _renamed(model: onnx.ModelProto) -> onnx.ModelProto:
    from test_transplant import _renamed as renamed

    return renamed(model, "onnx")


def test_requantized_by_name_on_the_destination_grid():
    src, dst = b.mlp(seed=0), _int8(b.mlp(seed=1))
    out, rep = transplant(src, dst)
    assert sorted(r["dst"] for r in rep.requantized) == ["W0_quantized", "W1_quantized"]
    assert all(r["how"] == "name" for r in rep.requantized)
    assert sorted(rep.by_name) == ["B0", "B1"] and not rep.unmatched_dst and not rep.mismatched
    # the graph and the types stay; per-channel symmetric scales recomputed from the source weights
    assert Counter(n.op_type for n in out.graph.node) == Counter(n.op_type for n in dst.graph.node)
    o, d, s = _inits(out), _inits(dst), _inits(src)
    for name in ("W0", "W1"):
        assert o[f"{name}_scale"].shape == d[f"{name}_scale"].shape and o[f"{name}_quantized"].dtype == np.int8
        np.testing.assert_allclose(o[f"{name}_scale"], np.abs(s[name]).max(axis=0) / 127, rtol=1e-6)
        want = np.clip(np.round(s[name] / o[f"{name}_scale"]), -128, 127)
        assert np.array_equal(o[f"{name}_quantized"], want.astype(np.int8))
        assert not np.any(o[f"{name}_zero_point"])
    # numbers: the transplanted int8 model computes what the source does, up to the destination's
    # activation ranges (calibrated for other weights); recalibrated with data, as well as the source's
    # own int8 model does
    (ref,), (got,), (before,) = b.run(src, X), b.run(out, X), b.run(dst, X)
    (own,) = b.run(_int8(src), X)
    assert _cos(ref, got) > 0.98 > 0.5 > _cos(ref, before)
    recal, rep2 = transplant(src, dst, data=CALIB)
    assert sorted(rep2.recalibrated) == ["mm0_float", "mm1_float", "relu0", "x"]
    (fixed,) = b.run(recal, X)
    assert _cos(ref, fixed) >= _cos(ref, own) - 0.001 and _cos(ref, fixed) > _cos(ref, got)
    onnx.checker.check_model(out)
    onnx.checker.check_model(recal)


def test_recalibration_keeps_int32_bias_scale_consistent():
    """Gemm layers: the int32 bias is re-quantized with s_b = s_x * s_w after the ranges change."""
    import transfer_models as tm

    src, other = tm.digits_mlp((64, 32)), tm.edit_weights(tm.digits_mlp((64, 32)), lambda n, w: 0.5 * w[::-1])
    from onnxcompress.datasets import digits_feeds

    calib = [{"x": digits_feeds(src, "calib")["x"][:64]}]
    dst = compress(other, Recipe(steps=(QuantizeInt8Config(),), verify=VerifyConfig(enabled=False)), data=calib).model
    out, rep = transplant(src, dst, data=calib)
    assert rep.requantized and rep.recalibrated
    inits = _inits(out)
    dq = {n.output[0]: n for n in out.graph.node if n.op_type == "DequantizeLinear"}
    checked = 0
    for n in out.graph.node:
        if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] in dq:
            sb = inits[dq[n.input[2]].input[1]]
            sx, sw = inits[dq[n.input[0]].input[1]], inits[dq[n.input[1]].input[1]]
            np.testing.assert_allclose(sb, sx * sw, rtol=1e-6)
            checked += 1
    assert checked == 3
    from onnxcompress.datasets import digits_accuracy

    assert digits_accuracy(out) >= digits_accuracy(src) - 0.02


def test_requantized_by_position_when_names_differ():
    src, dst = b.mlp(seed=0), _int8(_renamed(b.mlp(seed=1)))
    out, rep = transplant(src, dst)
    assert len(rep.requantized) == 2 and all(r["how"] == "position" for r in rep.requantized)
    assert {r["src"] for r in rep.requantized} == {"W0", "W1"}
    (ref,), (got,) = b.run(src, X), b.run(out, X)
    assert _cos(ref, got) > 0.99


def test_clipping_is_reported_and_shape_mismatch_declines():
    big = onnx.ModelProto()
    big.CopyFrom(b.mlp(seed=0))
    for t in big.graph.initializer:  # a source 10x larger: the recomputed grid covers it, nothing clipped
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 10, t.name))
    dst = _int8(b.mlp(seed=1))
    _, rep = transplant(big, dst)
    assert len(rep.requantized) == 2 and all(r["clipped"] == 0 for r in rep.requantized)
    other = _int8(b.mlp((16, 24, 8), seed=1))  # different hidden width: nothing may be copied
    _, rep2 = transplant(b.mlp(seed=0), other)
    assert not rep2.requantized and rep2.by_name == ["B1"]  # only the output bias has the same shape
    assert {"W0_quantized", "W1_quantized"} <= set(rep2.unmatched_dst)


def test_cli_checks_a_transfer_into_a_quantized_destination_within_the_lossy_budget(tmp_path, capsys):
    """A re-quantized OUT cannot reproduce SRC within float rounding; the command checks it within
    the lossy budget instead (it used to fail at the lossless tolerance), says so, and with
    --calib-data recalibrates the destination's ranges and checks on that data."""
    import json

    from onnxcompress.cli import main

    src, dst, data = tmp_path / "src.onnx", tmp_path / "dst.onnx", tmp_path / "data.npz"
    onnx.save(b.mlp(seed=0), src)
    onnx.save(_int8(b.mlp(seed=1)), dst)
    np.savez(data, **X)
    report = tmp_path / "r.json"
    assert main(["transfer", str(src), str(dst), str(tmp_path / "o.onnx"), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "checked within the lossy budget: 2 weight(s) re-quantized on DST's grid" in out and "PASSED" in out
    parity = json.loads(report.read_text())["parity"]
    assert parity["tolerance"]["min_cosine"] == 0.98 and parity["tolerance"]["atol"] is None
    assert main(["transfer", str(src), str(dst), str(tmp_path / "o2.onnx"), "--calib-data", str(data),
                 "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert sorted(rep["recalibrated"]) == ["mm0_float", "mm1_float", "relu0", "x"]
    assert rep["parity"]["tolerance"]["min_top1"] == 0.9 and rep["parity"]["feeds"] == 1
    (ref,), (got,) = b.run(b.mlp(seed=0), X), b.run(onnx.load(tmp_path / "o2.onnx"), X)
    assert _cos(ref, got) > 0.99


def test_cli_a_lossy_transfer_beyond_the_budget_fails_and_writes_nothing(tmp_path, capsys):
    """A destination whose activation ranges are 20x too narrow for any weights (its input clips): the
    lossy check fails with exit 1 and no output file."""
    from onnxcompress.cli import main

    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    onnx.save(b.mlp(seed=0), src)
    q = _int8(b.mlp(seed=1))
    for t in q.graph.initializer:
        if t.name == "x_scale":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) / 20, t.name))
    onnx.save(q, dst)
    assert main(["transfer", str(src), str(dst), str(tmp_path / "o.onnx")]) == 1
    err = capsys.readouterr().err
    assert "further from SRC's outputs than the lossy budget allows (2 weight(s) re-quantized" in err
    assert not (tmp_path / "o.onnx").exists()
