"""tools/compare.py as a user runs it: a subprocess from a checkout, exit codes, --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "compare.py"


def linear(bias: float) -> onnx.ModelProto:
    """x[N, 4] -> Gemm -> y[N, 3] (classifier-shaped)."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 3] y) { y = Gemm(x, w, b) }
        """
    )
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    model.graph.initializer.extend(
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(3, bias, np.float32), "b")]
    )
    return model


@pytest.fixture
def models(tmp_path):
    paths = {}
    for name, bias in (("ref", 0.0), ("same", 0.0), ("off", 0.5)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(linear(bias), paths[name])
    return paths


def run_tool(*args, cwd) -> subprocess.CompletedProcess:
    # No PYTHONPATH: the tool must find the package from the checkout on its own.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=60
    )


def test_pass_exit_0_and_json(models, tmp_path):
    out = tmp_path / "report.json"
    result = run_tool(models["ref"], models["same"], "--batch", "2", "--json", out, "--providers", "cpu,cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "parity PASSED" in result.stdout and "cpu" in result.stdout
    data = json.loads(out.read_text())
    metrics = data["runs"][0]["outputs"][0]["metrics"]
    assert data["passed"] is True and metrics["ref_shape"] == [2, 3]
    assert set(metrics) >= {"max_abs_err", "mean_abs_err", "cosine", "snr_db", "top1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["off.onnx", "ref.onnx", "report.json", "same.onnx"]


def test_parity_failure_exit_1_and_loose_tolerance_flags(models, tmp_path):
    result = run_tool(models["ref"], models["off"], cwd=tmp_path)
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "max abs error" in result.stdout
    # a failure under the lossless default on random inputs says what else to try
    assert "hint: the budget was lossless" in result.stderr and "--min-cosine 0.98 --min-top1 0.9" in result.stderr
    assert "hint: the inputs were seeded random values" in result.stderr
    result = run_tool(models["ref"], models["off"], "--inputs", _npz(tmp_path), "--min-cosine", "0.99999", cwd=tmp_path)
    assert result.returncode == 1 and "hint:" not in result.stderr  # the user chose both: nothing to suggest
    # task-metric flags replace LOSSLESS's bound: a bias shift keeps the argmax and most of the direction
    result = run_tool(models["ref"], models["off"], "--min-top1", "0.5", "--inputs", _npz(tmp_path), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().startswith("parity PASSED")


def _npz(folder: Path) -> Path:
    path = folder / "inputs.npz"
    np.savez(path, x=np.tile(np.array([[1.0, 2.0, 3.0, 4.0]], np.float32), (5, 1)))
    return path


def test_usage_errors_exit_2(models, tmp_path):
    result = run_tool(models["ref"], tmp_path / "missing.onnx", cwd=tmp_path)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert run_tool(models["ref"], models["same"], "--atol", "abc", cwd=tmp_path).returncode == 2
    assert run_tool(models["ref"], models["same"], "--shape", "bad", cwd=tmp_path).returncode == 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, xx=np.ones((2, 4), np.float32))
    result = run_tool(models["ref"], models["same"], "--inputs", bad, cwd=tmp_path)
    assert result.returncode == 2 and "did you mean 'x'" in result.stderr and "Traceback" not in result.stderr


def test_unloadable_model_exit_3(models, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model")
    result = run_tool(models["ref"], garbage, cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.stderr


def test_layers_flag(models, tmp_path):
    result = run_tool(models["ref"], models["same"], "--layers", cwd=tmp_path)
    assert result.returncode == 0 and "first divergence: none" in result.stdout
