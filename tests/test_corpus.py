"""The corpus (issue 2 item 8, issue 7 item 1): the models that ship with the onnx wheel load, pass
through the lossless passes (and the registered presets), save, load in stock onnxruntime and match
the original's outputs within 1e-4 relative, or the pass declines with a reason.

The harness is ``bench/corpus.py`` (one implementation for the benchmark table and the tests). CI
runs a fast subset; ``-m slow`` runs the whole sweep and reports how many pass.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    """Import ``bench/<name>.py`` (bench/ is scripts, not a package) as module ``bench_<name>``."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


corpus = load_bench("corpus")

#: a fast, varied subset: a real architecture (light), convs, BN, RNNs, opset-6 conversions, sequences
FAST = (
    "light_squeezenet", "light_inception_v1",
    "test_Conv2d_depthwise_padded", "test_BatchNorm2d_eval", "test_Embedding", "test_GLU",
    "test_operator_addmm", "test_operator_params", "test_operator_maxpool", "test_operator_repeat",
    "test_operator_convtranspose", "test_Linear", "test_PixelShuffle",
    "test_sequence_model1", "test_expand_shape_model1", "test_shrink", "test_single_relu_model",
    "test_PReLU_2d_multiparam", "test_strnorm_model_monday_empty_output",
)

#: originals that cannot run in onnxruntime here (environment or the converter), so nothing to compare
KNOWN_SKIPS = ("test_strnorm_", "test_gradient_of_", "_multiparam")


@pytest.fixture(scope="module")
def cases():
    found, notes = corpus.discover()
    return {c.name: c for c in found}


def test_the_corpus_is_there(cases):
    suites = {c.suite for c in cases.values()}
    assert {"light", "pytorch-converted", "pytorch-operator", "simple"} <= suites
    assert len(cases) >= 140
    # models with test data get their own inputs and expected outputs
    c = cases["test_Conv2d"]
    assert c.feeds and c.expected and c.converted is not None  # opset 6 -> converted to 7


def _check(results):
    bad = {k: o for k, o in results.items() if o.status == "FAIL"}
    assert not bad, "\n".join(f"{m} x {r}: {o.reason}" for (m, r), o in bad.items())
    for (m, r), o in results.items():
        if o.status == "skip":
            assert any(s in m for s in KNOWN_SKIPS), f"{m} x {r} skipped: {o.reason}"
        if o.status == "declined":
            assert o.reason, f"{m} x {r} declined without a reason"
        if o.matches_pb is not None:
            assert o.matches_pb, f"{m} x {r}: no longer reproduces the .pb test outputs"


#: single passes and lossy presets run on a smaller subset
FAST_SMALL = ("light_squeezenet", "test_Conv2d_depthwise_padded", "test_Linear", "test_operator_convtranspose",
              "test_Embedding", "test_BatchNorm2d_eval")

#: recipes with a known bug the corpus found (reported to their owners); strict: a fix turns them red
KNOWN_FAILURES: dict[str, str] = {}


def _recipe_params():
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name]))
            if name in KNOWN_FAILURES else name for name in corpus.recipes()]


@pytest.mark.parametrize("recipe", _recipe_params())
def test_fast_subset(cases, recipe):
    lossless = corpus.is_lossless(corpus.recipes()[recipe]())
    names = FAST if recipe == "lossless" else FAST_SMALL  # all lossless passes together see every fast model
    chosen = [cases[n] for n in names if n in cases]
    assert len(chosen) == len(names)
    results = corpus.sweep(chosen, [recipe])
    assert len(results) == len(chosen)
    _check(results)
    if lossless:  # a lossless recipe never misses its budget
        assert not [k for k, o in results.items() if o.status == "parity"]
    refused = {m: o.reason.splitlines()[-1] for (m, _), o in results.items() if o.status == "parity"}
    if refused:
        print(f"{recipe}: verification refused {len(refused)} of {len(results)}: {refused}")
    if recipe == "lossless":
        assert sum(o.status == "ok" for o in results.values()) >= 3  # something changed and still matched


def test_the_harness_catches_a_wrong_result(cases, tmp_path, monkeypatch):
    """A "pass" that silently changes a weight must show up as FAIL, not ok."""
    import onnxcompress as oc

    real = oc.compress

    def sabotaged(model, recipe=None, **kw):
        res = real(model, recipe, **kw)
        t = next(t for t in res.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.dims)
        arr = onnx.numpy_helper.to_array(t) * 1.01
        t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), t.name))
        res.report.steps[0].modified = True
        return res

    monkeypatch.setattr(corpus.oc, "compress", sabotaged)
    out = corpus.run_case(cases["test_Linear"], corpus.recipes()["lossless"](), tmp_path)
    assert out.status == "FAIL" and "max abs error" in out.reason


def test_the_harness_reports_crashes(cases, tmp_path, monkeypatch):
    def crash(*a, **k):
        raise IndexError("boom")

    monkeypatch.setattr(corpus.oc, "compress", crash)
    out = corpus.run_case(cases["test_Linear"], corpus.recipes()["lossless"](), tmp_path)
    assert out.status == "FAIL" and "crash IndexError" in out.reason


def test_close_is_strict_about_shape_nan_and_size():
    a = np.array([1.0, 2.0, np.nan], np.float32)
    assert corpus.close(a, a.copy()) is None
    assert "NaN" in corpus.close(a, np.array([1.0, 2.0, 3.0], np.float32))
    assert "shape" in corpus.close(a, a[:2])
    assert "max abs error" in corpus.close(np.array([1000.0]), np.array([1000.2]))  # 2e-4 relative
    assert corpus.close(np.array([1000.0]), np.array([1000.05])) is None             # 5e-5 relative


@pytest.mark.slow
def test_whole_corpus(cases, capsys):
    results = corpus.sweep(list(cases.values()))
    with capsys.disabled():
        counts = {s: sum(o.status == s for o in results.values())
                  for s in ("ok", "n/a", "declined", "parity", "skip", "FAIL")}
        print(f"\ncorpus: {len(cases)} models x {len(corpus.recipes())} recipes: {counts}")
    _check(results)
