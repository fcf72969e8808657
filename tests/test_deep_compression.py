"""--deep-compression: prune -> share (k-means) -> repair from the teacher -> compact storage, and the
stage table (onnxcompress.transfer.stages).

Three ways: the preset's steps and the produced graph (decode ops, no dense float weight left for the
shared layers); the numbers (stage ratios grow stage by stage; the repair recovers digits accuracy; the
LeNet-300-100 target in the slow test); and the declines (no data: the repair is skipped with a note;
no linear weight: the stage table is a Skip).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import builders
import transfer_models as tm
from onnxcompress.api import compress
from onnxcompress.cli import main
from onnxcompress.datasets import calibration_npz, digits_accuracy
from onnxcompress.recipe import OutputConfig, Recipe, VerifyConfig
from onnxcompress.recipes import preset_recipe
from onnxcompress.transfer.stages import STAGES, CompressionStagesConfig, gap_entries, weight_stage_bytes

OFF = VerifyConfig(enabled=False)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("dc")
    m = tm.digits_mlp((64, 32))
    path = d / "mlp.onnx"
    onnx.save(m, path)
    return path, str(calibration_npz(d / "calib.npz", m))


# -- the stage arithmetic -----------------------------------------------------------------------


def test_gap_entries_counts_fillers():
    mask = np.zeros(100, bool)
    mask[[0, 5, 90]] = True
    # gaps 1, 5, 85: with 4-bit gaps (span 16) 85 needs 5 more entries
    assert gap_entries(mask, 4) == 1 + 1 + 6
    assert gap_entries(mask, 8) == 3


def test_stage_bytes_of_a_sparse_shared_weight():
    rng = np.random.default_rng(0)
    w = tm.kmeans_share(tm.magnitude_prune(rng.standard_normal((100, 300)).astype(np.float32), 0.9), 15)
    b = weight_stage_bytes(w)
    z = int((w != 0).sum())
    assert b["fp32"] == 120000 and b["nonzeros"] == z and b["distinct"] <= 16
    assert b["fp32"] > b["pruning"] > b["+ quantization"] > b["+ encoding"]
    assert b["pruning"] >= 5 * z  # 4-byte value + 1-byte position each
    assert b["+ encoding"] <= 1.25 * z  # about 4 + 4 bits per kept weight (gap + index, some fillers)


def test_dense_unshared_weight_gains_nothing():
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    b = weight_stage_bytes(w)
    assert b["pruning"] == b["+ quantization"] == b["+ encoding"] == b["fp32"]


# -- the preset ---------------------------------------------------------------------------------


def test_preset_steps_in_order():
    names = [s.name for s in preset_recipe(["deep_compression"]).steps]
    order = ["sparsify", "drop_dead_channels", "refit_pruned", "share_weights", "distill", "compression_stages",
             "compact_storage"]
    assert [n for n in names if n in order] == order
    cli = Recipe.from_cli(["--deep-compression"])
    assert cli.step("compact_storage").min_elements == 64 and cli.step("share_weights").clusters == 8
    assert not cli.output.embed_plan  # the preset leaves the plan out of the file ...
    assert Recipe.from_cli(["--deep-compression", "--embed-plan"]).output.embed_plan  # ... unless asked


def test_deep_compression_with_and_without_data(mlp):
    path, calib = mlp
    recipe = preset_recipe(["deep_compression"]).replace(verify=OFF)
    no_data = compress(path, recipe)
    with_data = compress(path, recipe, data=calib)
    acc_t = digits_accuracy(str(path))
    acc_n, acc_d = digits_accuracy(no_data.model), digits_accuracy(with_data.model)
    # the repair is what makes 90% sparsity + 8 shared values usable on this small MLP
    assert acc_d >= acc_n + 0.15 and acc_d >= acc_t - 0.2
    assert not no_data.report.step("distill").modified and not no_data.report.step("refit_pruned").modified
    assert any("no calibration data" in n for n in no_data.report.notes)
    assert with_data.report.step("distill").modified and with_data.report.step("refit_pruned").modified
    # structure: every Gemm weight is decoded from packed storage, no dense float weight remains
    m = with_data.model
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["Gemm"] == 3 and ops["Gather"] >= 3
    dense = [t.name for t in m.graph.initializer if "weight" in t.name]
    assert dense == []
    # the stage table: ratios grow, and the summary shows it
    stages = with_data.report.step("compression_stages").details["stages"]
    assert [s["stage"] for s in stages] == list(STAGES)
    ratios = [s["ratio"] for s in stages]
    assert ratios[0] == 1.0 and ratios[1] > 5 and ratios[2] > ratios[1] and ratios[3] > ratios[2]
    assert any(n.startswith("Deep Compression stages") for n in with_data.report.notes)
    # the file really shrank; with the plan embedded it weighs about as much as the weights at this size
    assert with_data.report.ratio > 3 and not any(p.key == "onnxcompress.plan" for p in m.metadata_props)
    planned = compress(path, recipe.replace(output=OutputConfig(embed_plan=True)), data=calib)
    assert planned.report.ratio > 1.5 and any(p.key == "onnxcompress.plan" for p in planned.model.metadata_props)
    onnx.checker.check_model(m)


def test_stage_table_declines_without_linear_weights():
    m = builders.mlp((4, 4))
    r = compress(m, Recipe(steps=(CompressionStagesConfig(min_elements=1000),), verify=OFF))
    step = r.report.step("compression_stages")
    assert not step.modified and step.skipped[0]["reason"].startswith("no float MatMul/Gemm/Conv weight")


def test_cli_deep_compression_summary(mlp, tmp_path, capsys):
    path, calib = mlp
    out = tmp_path / "dc.onnx"
    rc = main([str(path), str(out), "--deep-compression", "--calib-data", calib, "--keep-failed"])
    assert rc in (0, 1)  # 1: the lossy parity budget may fail on this tiny MLP; the file is kept
    text = capsys.readouterr().out
    assert "Deep Compression stages (weights): fp32" in text and "+ encoding" in text
    assert out.stat().st_size < os.path.getsize(path) / 3


# -- the target, on the LeNet-300-100-shaped digits MLP -----------------------------------


def _lenet_300_100(tmp_path):
    from onnxcompress.datasets import bundled_model_path

    try:
        return str(bundled_model_path("mlp"))
    except FileNotFoundError:  # models/ not built: the same shape trained with scikit-learn
        path = tmp_path / "mlp300.onnx"
        onnx.save(tm.digits_mlp((300, 100)), path)
        return str(path)


def test_lenet_300_100_weights_30x_within_one_point(tmp_path):
    path = _lenet_300_100(tmp_path)
    calib = str(calibration_npz(tmp_path / "calib.npz", path))  # the calib split, never the test split
    r = compress(path, preset_recipe(["deep_compression"]).replace(verify=OFF), data=calib)
    out = tmp_path / "dc.onnx"
    r.save(out)
    drop = digits_accuracy(path) - digits_accuracy(str(out))
    stages = {s["stage"]: s["ratio"] for s in r.report.step("compression_stages").details["stages"]}
    assert drop <= 0.01
    assert stages["+ encoding"] >= 30


def test_lenet_300_100_file_30x_within_one_point(tmp_path):
    """The issue's target on the whole file: >= 30x smaller than the fp32 file, <= 1 point lost on the
    test split (seen: 207,833 -> 6,523 bytes, 31.9x; 97.56% -> 96.67%)."""
    path = _lenet_300_100(tmp_path)
    calib = str(calibration_npz(tmp_path / "calib.npz", path))
    r = compress(path, preset_recipe(["deep_compression"]).replace(verify=OFF), data=calib)
    out = tmp_path / "dc.onnx"
    r.save(out)
    assert os.path.getsize(path) / os.path.getsize(out) >= 30
    assert digits_accuracy(path) - digits_accuracy(str(out)) <= 0.01
    onnx.checker.check_model(str(out), full_check=True)
