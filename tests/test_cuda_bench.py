"""bench/cuda.py (issue 3 item 10) runs end to end where no GPU is: every output form is built, loads
on the CPU provider, computes there what it computes on itself, keeps the MLP's accuracy and passes
tools/compare.py under the lossy policy; a requested CUDA provider that onnxruntime lacks is recorded
with the reason instead of being measured on the CPU. On a machine with onnxruntime-gpu the same test
measures CUDA rows and asserts the same of them."""

from __future__ import annotations

import json

import onnxruntime as ort

from test_corpus import load_bench

bench_cuda = load_bench("cuda")


def test_cuda_bench_builds_measures_and_renders(tmp_path, capsys):
    out = tmp_path / "work"
    assert bench_cuda.main(["all", "--out", str(out), "--models", "mlp", "--providers", "cpu,cuda",
                            "--rounds", "1", "--reps", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert bool(results["providers"]["cuda"]) is not has_cuda  # a reason exactly when CUDA is missing
    if not has_cuda:
        assert "not CUDAExecutionProvider" in results["providers"]["cuda"]
    measured = {"cpu", "cuda"} if has_cuda else {"cpu"}
    rows = results["rows"]
    assert {(r["provider"], r["form"]) for r in rows} == {(p, f) for p in measured
                                                          for f in ["fp32", *bench_cuda.FORMS]}
    for r in rows:
        assert "error" not in r, r
        assert r["same_ok"], r                      # the same numbers as on the CPU provider
        assert r["accuracy"] >= 0.97, r             # fp32: 0.9756 on the test split
        assert r["top1"] >= 0.99 and r["cosine"] >= 0.999, r
        assert sum(n for ops in r["nodes"].values() for n in ops.values()) >= 3, r  # the profile saw the layers
        if r["provider"] == "cpu":
            assert set(r["nodes"]) == {"CPU"}, r
        if r["form"] != "fp32":
            assert r["compare"].startswith("rc 0: parity PASSED"), r
    text = capsys.readouterr().out
    assert "| mlp | cpu | int4 MatMulNBits |" in text
    assert ("Not measured on cuda" in text) is not has_cuda
