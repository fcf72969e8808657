"""Parity verification: metrics, tolerances, sessions, compare_models and layer mode."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress.errors import CalibrationError, ModelError, RecipeError
from onnxcompress.verify import (
    LOSSLESS,
    LOSSY,
    ParityReport,
    Tolerance,
    compare_models,
    compute_metrics,
    make_session,
    output_steps,
    policy_for,
    quantized,
    resolve_providers,
    run_session,
)
from onnxcompress.verify.report import json_safe
from onnxcompress.verify.session import EXTERNAL_FOLDER_KEY, uses_external_data

def chain_model(weights: list[np.ndarray]) -> onnx.ModelProto:
    """x[N, 8] -> MatMul w1 -> Relu -> MatMul w2 -> Relu -> MatMul w3 -> y[N, 8]."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 8] y) {
          h1 = MatMul(x, w1)
          a1 = Relu(h1)
          h2 = MatMul(a1, w2)
          a2 = Relu(h2)
          y = MatMul(a2, w3)
        }
        """
    )
    model.graph.initializer.extend(numpy_helper.from_array(w, f"w{i + 1}") for i, w in enumerate(weights))
    return model


@pytest.fixture
def weights() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3)]


def perturbed(weights, index: int, delta: float = 0.5) -> list[np.ndarray]:
    out = [w.copy() for w in weights]
    out[index][0, 0] += delta
    return out


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_hand_computed():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    cand = np.array([[1.0, 1.0], [0.0, 2.0]], np.float32)
    m = compute_metrics("y", ref, cand)
    assert m.max_abs_err == 1.0 and m.mean_abs_err == 0.25 and m.ref_max_abs == 2.0
    # cos = r.c / (|r||c|) = 5 / (sqrt(5) sqrt(6))
    assert m.cosine == pytest.approx(5 / math.sqrt(30), abs=1e-12)
    # SNR = 10 log10(sum r^2 / sum d^2) = 10 log10(5 / 1)
    assert m.snr_db == pytest.approx(10 * math.log10(5), abs=1e-12)
    # argmax rows: ref [0, 1], cand [0 (tie -> first), 1]
    assert m.top1 == 1.0 and m.exact == 0.75 and m.rel_err == 0.5
    assert compute_metrics("y", ref, ref).snr_db == math.inf


def test_metrics_top1_and_degenerate_cosine():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]], np.float32)
    cand = np.array([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]], np.float32)
    assert compute_metrics("p", ref, cand).top1 == 0.5
    zeros = np.zeros((2, 3), np.float32)
    assert compute_metrics("z", zeros, zeros).cosine == 1.0
    assert compute_metrics("z", zeros, ref).cosine == 0.0
    assert compute_metrics("z", zeros, ref).snr_db == -math.inf
    assert compute_metrics("v", np.ones(4, np.float32), np.ones(4, np.float32)).top1 is None  # not (N, C)


def test_metrics_stay_finite_for_float64_outputs_near_the_top_of_the_range():
    """r·r of values near 1e300 overflows float64; the sums are kept relative to the largest |value|, so
    cosine and SNR are those of the same values scaled down, and streaming them in batches of
    different magnitude gives what one batch gives."""
    from onnxcompress.verify.metrics import MetricAccumulator

    ref = np.array([[1.0, 2.0, 3.0], [3.0, -1.0, 0.5]])
    cand = ref * np.array([1.01, 0.99, 1.0])
    expect = compute_metrics("y", ref, cand)
    with np.errstate(over="raise", invalid="raise"):
        big = compute_metrics("y", ref * 1e300, cand * 1e300)
        acc = MetricAccumulator("y")
        acc.update(ref[:1] * 1e-300, cand[:1] * 1e-300)  # a tiny batch first, then the huge one
        acc.update(ref[1:] * 1e300, cand[1:] * 1e300)
        streamed = acc.result()
    assert big.cosine == pytest.approx(expect.cosine, abs=1e-12)
    assert big.snr_db == pytest.approx(expect.snr_db, abs=1e-9)
    assert streamed.cosine == pytest.approx(compute_metrics("y", ref[1:], cand[1:]).cosine, abs=1e-12)


def test_metrics_rescaling_is_exact_for_ordinary_outputs():
    """The sums are kept relative to a power of two, so streaming batches of growing magnitude gives the
    numbers of a direct float64 computation, down to 1-ulp differences (SNR ~ 310 dB; dividing by the
    largest value itself once lost a dB there)."""
    from onnxcompress.verify.metrics import MetricAccumulator

    rng = np.random.default_rng(0)
    r = rng.standard_normal((5, 100))
    c = r * (1 + rng.choice([-1.0, 1.0], r.shape) * np.finfo(np.float64).eps)
    acc = MetricAccumulator("y")
    for i in range(5):
        acc.update(r[i:i + 1] * 10.0 ** i, c[i:i + 1] * 10.0 ** i)
    rr = np.concatenate([r[i:i + 1] * 10.0 ** i for i in range(5)]).ravel()
    cc = np.concatenate([c[i:i + 1] * 10.0 ** i for i in range(5)]).ravel()
    d = rr - cc
    got = acc.result()
    assert got.snr_db == pytest.approx(10 * math.log10(float(rr @ rr) / float(d @ d)), abs=1e-6)
    assert got.cosine == pytest.approx(float(rr @ cc) / math.sqrt(float(rr @ rr) * float(cc @ cc)), abs=1e-15)


def test_metrics_mismatches_are_reported_not_raised():
    ref = np.zeros((2, 3), np.float32)
    assert "shape (2, 4) differs" in compute_metrics("y", ref, np.zeros((2, 4), np.float32)).mismatch
    assert "dtype float16 differs" in compute_metrics("y", ref, ref.astype(np.float16)).mismatch
    assert compute_metrics("y", ref, None).mismatch == "missing in the candidate"


def test_metrics_integer_outputs_and_nonfinite():
    m = compute_metrics("label", np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]))
    assert m.exact == 0.75 and m.cosine is None and m.snr_db is None and not m.is_float
    ref = np.array([1.0, np.nan, np.inf, 2.0], np.float32)
    cand = np.array([1.0, np.nan, 5.0, 2.0], np.float32)
    m = compute_metrics("y", ref, cand)
    assert m.nonfinite_mismatch == 1 and m.max_abs_err == 0.0


# ------------------------------------------------------------------------------------------ tolerance


def test_lossless_rule_is_scale_aware():
    ref = np.full((1, 4), 1000.0, np.float32)
    close = compute_metrics("y", ref, ref + 0.05)  # 0.05 <= 1e-5 + 1e-4 * 1000
    assert LOSSLESS.check(close) == []
    far = compute_metrics("y", ref, ref + 0.2)
    assert "max abs error 0.2 > 0.1" in LOSSLESS.check(far)[0]
    tiny = np.full((1, 4), 1e-3, np.float32)
    assert LOSSLESS.check(compute_metrics("y", tiny, tiny + 5e-6)) == []


def test_lossy_quantized_and_integer_rules():
    ref = np.array([[2.0, 1.0], [1.0, 2.0]], np.float32)
    assert LOSSY.check(compute_metrics("y", ref, ref * 1.01)) == []
    swapped = compute_metrics("y", ref, ref[:, ::-1].copy())
    reasons = LOSSY.check(swapped)
    assert any("cosine" in r for r in reasons) and any("top-1 agreement 0.0000 < 0.9" in r for r in reasons)
    # quantized: judged in steps (explicit, or found in the graph), plus the cosine / top-1 budgets
    off = compute_metrics("y", ref, ref + 0.03)
    assert quantized(0.02).check(off) and not quantized(0.04).check(off)
    assert any("1.5 quantization steps" in r for r in quantized(max_steps=1).check(off, step=0.02))
    ints = compute_metrics("q", np.array([3, 4, 5], np.int8), np.array([3, 5, 5], np.int8))
    assert quantized().check(ints) == [] and Tolerance(max_steps=0.5).check(ints)
    assert LOSSLESS.check(ints) and Tolerance(min_cosine=0.9).check(ints) == ["integer output differs: exact match 0.6667 < 1"]


def test_criteria_that_do_not_apply_fail():
    vec = np.ones(5, np.float32)
    assert "no criterion" in Tolerance(min_top1=0.9).check(compute_metrics("y", vec, vec))[0]


def test_tolerance_validation_and_policies():
    assert policy_for("lossless") is LOSSLESS and policy_for("lossy") is LOSSY
    with pytest.raises(RecipeError, match="did you mean 'lossy'"):
        policy_for("lossyy")
    with pytest.raises(RecipeError, match="at least one"):
        Tolerance()
    with pytest.raises(RecipeError):
        Tolerance(atol=-1)
    with pytest.raises(RecipeError):
        Tolerance(min_top1=2)
    with pytest.raises(Exception):
        LOSSLESS.atol = 1  # frozen


# ------------------------------------------------------------------------------------------ sessions


def test_resolve_providers_on_cpu_only_build():
    cpu, cuda = resolve_providers(["cpu", "CUDA"])
    assert cpu == ("cpu", "CPUExecutionProvider", True, "")
    if cuda.available:
        pytest.skip("this onnxruntime has CUDA")
    assert cuda.reason == (
        "CUDAExecutionProvider is not available in this onnxruntime build (CPU only); install onnxruntime-gpu"
    )
    assert [c.short for c in resolve_providers("cpu,cpu,CPUExecutionProvider")] == ["cpu"]
    with pytest.raises(RecipeError, match="did you mean 'cuda'"):
        resolve_providers(["cudaa"])


def test_make_session_from_proto_bytes_and_path(tmp_path, weights):
    model = chain_model(weights)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.ones((2, 8), np.float32)
    expected = np.maximum(np.maximum(x @ weights[0], 0) @ weights[1], 0) @ weights[2]
    for source in (model, model.SerializeToString(), str(path), path):
        out = run_session(make_session(source, optimize=False), {"x": x, "unused": x})
        np.testing.assert_allclose(out["y"], expected, rtol=1e-5)


def test_make_session_wraps_load_failures():
    broken = chain_model([np.zeros((8, 8), np.float32)] * 2)  # w3 missing
    with pytest.raises(ModelError, match="onnxruntime cannot load the model") as err:
        make_session(broken)
    assert err.value.hint and err.value.exit_code == 3
    with pytest.raises(ModelError, match="does not exist"):
        make_session("/nonexistent/model.onnx")


def test_external_data_proto_runs_via_base_dir(tmp_path, weights):
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(chain_model(weights), folder / "m.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    lazy = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    assert uses_external_data(lazy) and EXTERNAL_FOLDER_KEY.startswith("session.")
    with pytest.raises(ModelError, match="base_dir"):
        make_session(lazy)
    session = make_session(lazy, base_dir=folder)
    assert run_session(session, {"x": np.ones((1, 8), np.float32)})["y"].shape == (1, 8)
    report = compare_models(lazy, chain_model(weights), ref_base_dir=folder)
    assert report.passed, report.summary()
    report = compare_models(lazy, lazy, ref_base_dir=folder, cand_base_dir=folder, layers=True)
    assert report.passed and report.first_divergence is None


def test_external_data_falls_back_to_a_temporary_folder(tmp_path, weights, monkeypatch):
    """An onnxruntime without the folder config entry: the model is saved to a temporary folder."""
    import onnxcompress.verify.session as session_module

    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(chain_model(weights), folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    lazy = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    monkeypatch.setattr(session_module, "EXTERNAL_FOLDER_KEY", "session.not_a_real_entry")
    monkeypatch.chdir(tmp_path)
    session = make_session(lazy, base_dir=folder)
    assert run_session(session, {"x": np.ones((1, 8), np.float32)})["y"].shape == (1, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written to the cwd
    assert uses_external_data(lazy)  # the caller's proto is untouched


def test_bfloat16_inputs_and_outputs_are_compared():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (bfloat16[N, 4] x) => (float[N, 4] y, bfloat16[N, 4] z) {
          y = Cast<to=1>(x)
          z = Identity(x)
        }
        """
    )
    report = compare_models(model, model, batch=2)
    assert report.passed, report.summary()
    assert [o.metrics.ref_dtype for o in report.runs[0].outputs] == ["float32", "bfloat16"]


# ------------------------------------------------------------------------------------------ compare


def test_identical_models_pass(weights):
    report = compare_models(chain_model(weights), chain_model(weights), batch=3)
    assert isinstance(report, ParityReport) and report.passed
    (run,) = report.runs
    (output,) = run.outputs
    assert output.name == "y" and output.metrics.ref_shape == (3, 8)
    assert output.metrics.max_abs_err <= 1e-5 and output.metrics.cosine == pytest.approx(1.0)
    assert report.layers is None and report.feeds == 1


def test_perturbed_weight_fails_with_the_reason(weights):
    report = compare_models(chain_model(weights), chain_model(perturbed(weights, 1)), batch=4)
    assert not report.passed
    (output,) = report.runs[0].outputs
    assert output.failures and output.failures[0].startswith("max abs error")
    assert any(f.startswith("cpu/y: max abs error") for f in report.failures())
    assert "FAIL" in report.summary() and "parity FAILED" in report.summary()
    # a looser, lossy tolerance accepts the same small perturbation
    assert compare_models(chain_model(weights), chain_model(perturbed(weights, 1, 0.01)), tolerance=LOSSY).passed


def test_cuda_on_cpu_only_is_skipped_and_still_passes(weights):
    if resolve_providers(["cuda"])[0].available:
        pytest.skip("this onnxruntime has CUDA")
    report = compare_models(chain_model(weights), chain_model(weights), providers=("cpu", "cuda"))
    assert report.passed
    assert [r.provider for r in report.runs] == ["cpu"]
    assert report.skipped == (
        ("cuda", "CUDAExecutionProvider is not available in this onnxruntime build (CPU only); install onnxruntime-gpu"),
    )
    assert "skipped cuda" in report.summary()
    only_cuda = compare_models(chain_model(weights), chain_model(weights), providers="cuda")
    assert not only_cuda.passed and "no requested provider" in only_cuda.problems[0]


def test_feed_forms_and_validation(tmp_path, weights):
    ref, cand = chain_model(weights), chain_model(weights)
    feeds = [{"x": np.full((n, 8), 0.5, np.float32)} for n in (1, 2, 3)]
    assert compare_models(ref, cand, feeds=feeds[0]).feeds == 1
    assert compare_models(ref, cand, feeds=feeds).feeds == 3
    assert compare_models(ref, cand, feeds=iter(feeds)).feeds == 3  # one-shot: read once

    class Reader:  # onnxruntime's CalibrationDataReader protocol
        def __init__(self):
            self.left = list(feeds)

        def get_next(self):
            return self.left.pop(0) if self.left else None

    assert compare_models(ref, cand, feeds=Reader()).feeds == 3
    np.savez(tmp_path / "d.npz", x=np.ones((70, 8), np.float32))
    report = compare_models(ref, cand, inputs=tmp_path / "d.npz")
    assert report.feeds == 3 and report.runs[0].outputs[0].metrics.count == 70 * 8
    with pytest.raises(CalibrationError, match="did you mean 'x'"):
        compare_models(ref, cand, feeds={"xx": feeds[0]["x"]})
    with pytest.raises(CalibrationError, match="no feeds"):
        compare_models(ref, cand, feeds=[])
    with pytest.raises(RecipeError):
        compare_models(ref, cand, feeds=feeds, inputs=tmp_path / "d.npz")


def test_token_model_with_random_feeds_runs():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[batch, seq] input_ids, int64[batch, seq] attention_mask) => (float[batch, seq, 4] y) {
          e = Gather(table, input_ids)
          m = Cast<to=1>(attention_mask)
          mu = Unsqueeze(m, axes)
          y = Mul(e, mu)
        }
        """
    )
    model.graph.initializer.extend([
        numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "table"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
    ])
    report = compare_models(model, model, shapes={"input_ids": (2, 5)})
    assert report.passed and report.runs[0].outputs[0].metrics.ref_shape == (2, 5, 4)


def test_output_structure_mismatches(weights):
    ref = chain_model(weights)
    renamed = chain_model(weights)
    renamed.graph.node[-1].output[0] = "z"
    renamed.graph.output[0].name = "z"
    report = compare_models(ref, renamed)
    assert not report.passed and report.runs[0].outputs[0].failures == ("missing in the candidate",)
    json.dumps(report.to_dict())


def test_quantized_output_step_is_read_from_the_graph():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) {
          q = QuantizeLinear(x, s, z)
          d = DequantizeLinear(q, s, z)
          y = Reshape(d, shape)
        }
        """
    )
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        numpy_helper.from_array(np.array([1, 4], np.int64), "shape"),
    ])
    identity = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { y = Identity(x) }
        """
    )
    assert output_steps(model) == {"y": pytest.approx(0.05)}
    report = compare_models(identity, model, tolerance=quantized(min_cosine=0.9, min_top1=None))
    assert report.passed, report.summary()
    assert report.runs[0].outputs[0].step == pytest.approx(0.05)
    assert report.runs[0].outputs[0].metrics.max_abs_err <= 0.025 + 1e-6


def test_report_to_dict_is_json_safe(weights):
    assert json_safe({"a": math.inf, "b": (1.0, -math.inf, math.nan)}) == {"a": "inf", "b": [1.0, "-inf", "nan"]}
    report = compare_models(chain_model(weights), chain_model(perturbed(weights, 1)), layers=True)
    data = report.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["passed"] is False and data["first_divergence"] == "h2"
    assert data["layers"][0]["metrics"]["snr_db"] == "inf"  # h1 is bit-exact: SNR inf -> "inf"
    assert data["tolerance"]["text"] == "atol=1e-05 rtol=0.0001"


# ------------------------------------------------------------------------------------------ layers


def test_layers_find_the_first_divergent_layer(weights):
    report = compare_models(chain_model(weights), chain_model(perturbed(weights, 1)), layers=True, batch=4)
    assert not report.passed
    names = [layer.name for layer in report.layers]
    assert names == ["h1", "a1", "h2", "a2", "y"]
    assert report.first_divergence == "h2"
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["h1"].metrics.max_abs_err <= 1e-5 and by_name["h1"].diverged is None
    assert by_name["h2"].diverged and by_name["h2"].upstream_rel_err <= 1e-6
    assert "first divergence: h2" in report.summary()


def test_layers_compare_only_shared_names(weights):
    other = chain_model(weights)
    for node in other.graph.node[:-1]:
        node.output[0] = "cand_" + node.output[0]
    for node in other.graph.node[1:]:
        node.input[0] = "cand_" + node.input[0] if node.input[0] != "x" else "x"
    report = compare_models(chain_model(weights), other, layers=True)
    assert report.passed
    assert [layer.name for layer in report.layers] == ["y"]


def test_string_outputs_are_compared_exactly():
    from onnxcompress.verify.metrics import compute_metrics

    ref = np.array(["a", "b", "c"], dtype=object)
    same = compute_metrics("s", ref, ref.copy())
    diff = compute_metrics("s", ref, np.array(["a", "x", "c"], dtype=object))
    assert same.exact == 1.0 and abs(diff.exact - 2 / 3) < 1e-9


def test_a_tolerance_flag_replaces_its_own_criterion_and_keeps_its_family():
    """--min-top1 0 used to replace the whole budget, leaving no criterion that applies to an output
    that is not a classifier (a bit-identical result then failed); --min-cosine 0.5 silently dropped
    the top-1 check."""
    from onnxcompress.verify.tolerance import LOSSLESS, LOSSY, overridden

    assert overridden(LOSSY, min_top1=0.0) == Tolerance(min_cosine=0.98, min_top1=0.0)
    assert overridden(LOSSY, min_cosine=0.5) == Tolerance(min_cosine=0.5, min_top1=0.9)
    assert overridden(LOSSY, atol=1e-3) == Tolerance(atol=1e-3)  # the bound alone
    assert overridden(LOSSLESS, atol=1e-3) == Tolerance(atol=1e-3, rtol=LOSSLESS.rtol)
    assert overridden(LOSSLESS, min_cosine=0.99) == Tolerance(min_cosine=0.99)
    assert overridden(LOSSLESS, max_steps=2.0) == Tolerance(max_steps=2.0)  # the step bound alone
    assert overridden(LOSSY) is LOSSY


def test_min_top1_on_a_model_that_is_no_classifier_still_checks_the_cosine(tmp_path, capsys):
    """A lossy run (fp16) of a model whose output is a feature map [N, C, H, W], where top-1 does not
    apply: --min-top1 0 keeps the policy's cosine, so the output is still checked (and passes)."""
    from onnx import TensorProto, helper

    from onnxcompress.cli import main

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    assert main([str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--fp16", "--min-top1", "0"]) == 0
    out = capsys.readouterr().out
    assert "min_cosine=0.98 min_top1=0" in out and "PASSED" in out
