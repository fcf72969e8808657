"""The onnxcompress command: exit codes, one-line errors, summary, report, --print-recipe, -q."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import builders as b
from onnxcompress.cli import main


@pytest.fixture()
def model_path(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(b.conv_bn(), p)
    return p


def test_runs_and_prints_a_summary(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main([str(model_path), str(out), "--report", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "size" in text and "parity    PASSED" in text
    onnx.checker.check_model(onnx.load(out))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["parity"]["passed"] and report["input"]["nodes"] == 6
    assert report["op_changes"] == {"BatchNormalization": -1}  # folded into the Conv by the lossless merges


def test_quiet_prints_nothing(model_path, tmp_path, capsys):
    assert main([str(model_path), str(tmp_path / "o.onnx"), "-q"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""


def test_quiet_prints_nothing_with_bf16_either(model_path, tmp_path, capfd):
    """graphsurgeon's own logger prints '[W] Could not convert: BFLOAT16 ...' to stdout; -q silences it."""
    assert main([str(model_path), str(tmp_path / "o.onnx"), "-q", "--bf16"]) == 0
    cap = capfd.readouterr()
    assert cap.out == "" and cap.err == ""


def test_print_recipe(model_path, capsys):
    assert main([str(model_path), "--print-recipe", "--fold-max-growth", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"pass": "fold_constants", "max_growth": 2.0, "always_fold_bytes": 0} in r["steps"]


def test_python_dash_m_and_help():
    r = subprocess.run([sys.executable, "-m", "onnxcompress", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "exit codes" in r.stdout and "--calib-data" in r.stdout


def _one_line_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_not_onnx_exit_3(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a model at all" * 10)
    out = tmp_path / "out.onnx"
    assert main([str(bad), str(out)]) == 3
    line = _one_line_error(capsys.readouterr().err)
    assert "not an ONNX model" in line and "hint:" in line
    assert not out.exists()


def test_output_equal_to_input_exit_2(model_path, capsys):
    before = model_path.read_bytes()
    assert main([str(model_path), str(model_path)]) == 2
    assert "is the input" in _one_line_error(capsys.readouterr().err)
    assert model_path.read_bytes() == before


def test_missing_output_folder_exit_2(model_path, tmp_path, capsys):
    assert main([str(model_path), str(tmp_path / "nope" / "o.onnx")]) == 2
    assert "does not exist" in _one_line_error(capsys.readouterr().err)


def test_unknown_recipe_key_exit_2(model_path, tmp_path, capsys):
    r = tmp_path / "r.json"
    r.write_text('{"steps": [{"pass": "fold_constants", "max_grwoth": 1}]}')
    assert main([str(model_path), str(tmp_path / "o.onnx"), "--recipe", str(r)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "did you mean 'max_growth'" in line and not (tmp_path / "o.onnx").exists()


def test_bad_flag_value_exit_2(model_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "onnxcompress", str(model_path), str(tmp_path / "o.onnx"),
                        "--providers", "tpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "not one of" in r.stderr and "Traceback" not in r.stderr


def test_cuda_requested_without_gpu_is_reported_as_skipped(model_path, tmp_path, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the skip path is not reachable")
    assert main([str(model_path), str(tmp_path / "o.onnx"), "--providers", "cpu,cuda"]) == 0
    assert "skipped cuda" in capsys.readouterr().out


def test_failed_check_hints_at_the_repair_that_fits_the_recipe(tmp_path, capsys):
    """Half the bundled MLP's weights zeroed fails the check on its digits (cosine 0.979 < 0.98); the
    hint names the teacher-guided repair, which then passes; with the repair already there it says
    to go milder instead. Nothing is written either time the check fails."""
    from onnxcompress.datasets import bundled_model_path

    src, out = bundled_model_path("mlp"), tmp_path / "o.onnx"
    src, calib = str(src), str(src.with_name("mlp.calib.npz"))
    assert main([src, str(out), "--prune", "0.5", "--calib-data", calib, "-q"]) == 1
    err = capsys.readouterr().err
    assert "repair sparsify from the original with --distill or try a milder setting;" in err
    assert "--calib-data DATA" not in err and not out.exists()
    assert main([src, str(out), "--prune", "0.5", "--distill", "--calib-data", calib, "-q"]) == 0
    assert out.exists()
    out.unlink()
    assert main([src, str(out), "--prune", "0.9", "--distill", "--calib-data", calib, "-q"]) == 1
    assert "try a milder sparsify setting;" in capsys.readouterr().err and not out.exists()


def test_repair_hint_asks_for_data_when_the_repair_was_skipped_for_lack_of_it():
    from onnxcompress.cli import _repair_hint
    from onnxcompress.recipes import preset_recipe

    recipe = preset_recipe(["deep_compression"])
    assert _repair_hint(recipe, None).startswith("give --calib-data DATA: the repair (distill) needs it")
    assert _repair_hint(recipe, "calib.npz") == "try a milder sparsify setting; "
    assert _repair_hint(preset_recipe(["int8"]), None) == ""


def test_two_presets_that_set_one_step_differently_are_refused(model_path, tmp_path, capsys):
    """--fp16 --bf16 used to become bfloat16 silently (the later preset replaced the step)."""
    assert main([str(model_path), str(tmp_path / "o.onnx"), "--fp16", "--bf16"]) == 2
    err = capsys.readouterr().err
    assert "--fp16 and --bf16 both set the convert_fp16 step" in err and not (tmp_path / "o.onnx").exists()


def _custom_op_model() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    w = onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
                           helper.make_node("Bar", ["y"], ["z"], domain="foo", name="bar")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("foo", 1)])


def test_custom_ops_pass_through_reported_and_unverifiable_models_get_a_useful_hint(tmp_path, capsys):
    onnx.save(_custom_op_model(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    assert main([str(tmp_path / "m.onnx"), str(out), "--int8"]) == 3  # onnxruntime cannot run foo:Bar
    err = capsys.readouterr().err
    assert "foo:Bar" in err and "use --no-verify and data-free techniques" in err and not out.exists()
    assert main([str(tmp_path / "m.onnx"), str(out), "--int8", "--no-verify"]) == 0
    assert "1 node(s) of custom domains passed through unchanged (foo:Bar)" in capsys.readouterr().out
    bar = [n for n in onnx.load(out).graph.node if n.op_type == "Bar"]
    assert len(bar) == 1 and bar[0].domain == "foo"
