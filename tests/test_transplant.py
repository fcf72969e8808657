"""Parameter transfer: by name, by graph position, through a pruning plan; declines ambiguous cases."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import builders as b
from onnxcompress.cli import main
from onnxcompress.transfer.transplant import PLAN_KEY, transplant

X = {"x": np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)}


def _renamed(model: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """The same architecture with other tensor names (as a second export would have)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = {t.name: f"{prefix}::{i}" for i, t in enumerate(m.graph.initializer)}
    for t in m.graph.initializer:
        t.name = names[t.name]
    for n in m.graph.node:
        for i, x in enumerate(n.input):
            n.input[i] = names.get(x, x)
    return m


def test_by_name_restores_outputs_exactly():
    src, dst = b.mlp(seed=0), b.mlp(seed=1)
    out, rep = transplant(src, dst)
    assert len(rep.by_name) == 4 and not rep.unmatched_dst and not rep.mismatched
    np.testing.assert_array_equal(b.run(out, X)[0], b.run(src, X)[0])


def test_by_position_when_names_differ():
    src, dst = b.mlp(seed=0), _renamed(b.mlp(seed=1), "onnx")
    out, rep = transplant(src, dst)
    assert len(rep.by_position) == 4 and not rep.by_name and not rep.unmatched_dst
    np.testing.assert_array_equal(b.run(out, X)[0], b.run(src, X)[0])


def test_constant_node_weights_take_part():
    src, dst = b.mlp(seed=0), b.with_constant_nodes(_renamed(b.mlp(seed=1), "p"))
    out, rep = transplant(src, dst)
    assert rep.matched == 4
    np.testing.assert_array_equal(b.run(out, X)[0], b.run(src, X)[0])


def test_no_guessing_when_position_is_ambiguous_or_shapes_differ():
    src = b.mlp(sizes=(16, 32, 8), seed=0)
    dst = _renamed(b.mlp(sizes=(16, 24, 8), seed=1), "q")  # a different hidden width
    out, rep = transplant(src, dst)
    # only the last bias has the same position and shape in both; nothing else is guessed
    assert rep.by_position == [("q::3", "B1")]
    assert sorted(rep.unmatched_dst) == ["q::0", "q::1", "q::2"]
    same_name = b.mlp(sizes=(16, 24, 8), seed=1)
    _, rep2 = transplant(src, same_name)
    assert {m["tensor"] for m in rep2.mismatched} == {"W0", "B0", "W1"} and rep2.by_name == ["B1"]


def test_through_a_pruning_plan():
    src = b.mlp(sizes=(16, 32, 8), seed=0)
    keep = list(range(0, 32, 2))
    dst = b.mlp(sizes=(16, 16, 8), seed=1)
    plan = {"tensors": {"W0": {"keep": {"1": keep}}, "B0": {"keep": {"0": keep}}, "W1": {"keep": {"0": keep}}}}
    onnx.helper.set_model_props(dst, {PLAN_KEY: json.dumps(plan)})
    out, rep = transplant(src, dst)
    assert len(rep.by_plan) == 3 and rep.by_name == ["B1"]
    w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    ws = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    np.testing.assert_array_equal(w["W0"], ws["W0"][:, keep])
    np.testing.assert_array_equal(w["W1"], ws["W1"][keep, :])


def test_cli_round_trip(tmp_path, capsys):
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    onnx.save(b.mlp(seed=0), src)
    onnx.save(_renamed(b.mlp(seed=1), "onnx"), dst)
    out = tmp_path / "out.onnx"
    assert main(["transfer", str(src), str(dst), str(out), "--report", str(tmp_path / "r.json")]) == 0
    assert "by position 4" in capsys.readouterr().out
    np.testing.assert_array_equal(b.run(str(out), X)[0], b.run(str(src), X)[0])
    assert json.loads((tmp_path / "r.json").read_text())["parity"]["passed"]


def test_cli_strict_fails_when_unmatched(tmp_path, capsys):
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    onnx.save(b.mlp(sizes=(16, 32, 8)), src)
    onnx.save(_renamed(b.mlp(sizes=(16, 24, 8)), "z"), dst)
    assert main(["transfer", str(src), str(dst), str(tmp_path / "o.onnx"), "--strict"]) == 3
    assert "not matched" in capsys.readouterr().err and not (tmp_path / "o.onnx").exists()


def test_encoded_destination_weights_are_reported_not_written(tmp_path, capsys):
    """Into a --deep-compression result (compact-storage decode chains): the encoded layer weights are
    listed with the --apply-plan hint, the constants inside the chains are not called unmatched, and
    nothing is verified as if the result reproduced the source."""
    from onnxcompress.api import compress
    from onnxcompress.recipe import OutputConfig, VerifyConfig
    from onnxcompress.recipes import preset_recipe

    import transfer_models as tm
    from onnxcompress.datasets import calibration_npz

    src = tm.digits_mlp((64, 32))
    calib = str(calibration_npz(tmp_path / "c.npz", src))
    recipe = preset_recipe(["deep_compression"]).replace(verify=VerifyConfig(enabled=False),
                                                          output=OutputConfig(embed_plan=True))
    dst = compress(src, recipe, data=calib)
    model, rep = transplant(src, dst.model)
    assert sorted(rep.encoded) and all(not n.startswith("~") for n in rep.encoded)
    assert not any(n.startswith("~") for n in rep.unmatched_dst)
    assert "--apply-plan" in rep.summary()
    onnx.save(src, tmp_path / "src.onnx")
    dst.save(tmp_path / "dst.onnx")
    assert main(["transfer", str(tmp_path / "src.onnx"), str(tmp_path / "dst.onnx"), str(tmp_path / "out.onnx")]) == 0
    out = capsys.readouterr().out
    assert "not verified" in out and "--apply-plan" in out


def test_cli_failed_check_still_writes_the_report_it_points_to(tmp_path, capsys):
    """DST computes another function (Sigmoid for Relu) with the same weights: the check fails (exit 1,
    no output) and the --report the hint names is written, with the failed parity in it."""
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    onnx.save(b.mlp(seed=0), src)
    other = b.mlp(seed=1)
    for n in other.graph.node:
        if n.op_type == "Relu":
            n.op_type = "Sigmoid"
    onnx.save(other, dst)
    report = tmp_path / "r.json"
    assert main(["transfer", str(src), str(dst), str(tmp_path / "o.onnx"), "--report", str(report)]) == 1
    err = capsys.readouterr().err
    assert "does not reproduce SRC's outputs" in err and "--no-verify" in err
    assert not (tmp_path / "o.onnx").exists()
    assert json.loads(report.read_text())["parity"]["passed"] is False
