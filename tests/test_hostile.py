"""Hostile and broken inputs (issue 7 item 2, issue 2 item 9).

Each case runs the real command line (``onnxcompress.cli.main`` in process, a few through a
subprocess) and checks the whole contract: the documented exit code; one line on stderr of the form
``onnxcompress: error: <where>: <what> (hint: ...)`` naming the problem; no traceback; no output file
and no temporary file left next to it; the input's bytes unchanged.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
from onnxcompress import cli
from onnxcompress.errors import ModelError
from onnxcompress.graph import io as gio

X = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731


def _model(nodes, inits=(), *, ins=None, outs=None, opset=17, ir=8) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [X("x", [2, 4])] if ins is None else ins,
                          [X("y", [2, 4])] if outs is None else outs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def _relu(**kw) -> onnx.ModelProto:
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], **kw)


def _write(folder: Path, name: str, content) -> Path:
    p = folder / name
    p.write_bytes(content.SerializeToString() if isinstance(content, onnx.ModelProto) else content)
    return p


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def _cli(capsys, argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _refused(capsys, tmp_path, inp, code, *needles, extra=(), out=None):
    """Run ``onnxcompress inp out`` and check the whole error contract; return the error line."""
    out = Path(out) if out is not None else tmp_path / "out" / "o.onnx"
    out.parent.mkdir(exist_ok=True)
    before = _digest(tmp_path)
    existed = out.exists()
    rc, stdout, err = _cli(capsys, [inp, out, "-q", *extra])
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert rc == code, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("onnxcompress: error: ") and "(hint: " in line, line
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in line.lower(), line
    assert out.exists() == existed and not Path(str(out) + ".data").exists()
    if out.parent != tmp_path:
        assert [p.name for p in out.parent.iterdir()] == []  # not even a temporary file
    assert _digest(tmp_path) == before  # the input (and everything else) untouched
    return line


# ----------------------------------------------------------------------------------------------
# files that are not (usable) ONNX


@pytest.mark.parametrize("content,needle", [
    (b"this is a text file, not a model\n", "not an ONNX model"),
    (b"", "empty"),
    (b"\x08\x07\x12\x05hello", "no ONNX graph"),  # parses as a ModelProto with no graph
], ids=["text", "zero-bytes", "no-graph"])
def test_not_onnx(capsys, tmp_path, content, needle):
    _refused(capsys, tmp_path, _write(tmp_path, "in.onnx", content), 3, needle, "in.onnx")


def test_truncated(capsys, tmp_path):
    data = builders.mlp().SerializeToString()
    _refused(capsys, tmp_path, _write(tmp_path, "in.onnx", data[: len(data) // 2]), 3, "truncated")


def test_missing_input_and_folder_as_input(capsys, tmp_path):
    _refused(capsys, tmp_path, tmp_path / "nope.onnx", 3, "does not exist")
    (tmp_path / "dir.onnx").mkdir()
    _refused(capsys, tmp_path, tmp_path / "dir.onnx", 3, "folder")


@pytest.mark.parametrize("kw,needle", [
    ({"ir": 2}, "IR version 2"), ({"ir": 99}, "IR version 99"),
    ({"opset": 5}, "opset 5"), ({"opset": 99}, "opset 99"),
], ids=["ir-old", "ir-new", "opset-old", "opset-new"])
def test_versions_out_of_range(capsys, tmp_path, kw, needle):
    _refused(capsys, tmp_path, _write(tmp_path, "in.onnx", _relu(**kw)), 3, needle)


def test_no_graph_outputs(capsys, tmp_path):
    _refused(capsys, tmp_path, _write(tmp_path, "in.onnx", _relu(outs=[])), 3, "no graph outputs")


# ----------------------------------------------------------------------------------------------
# malformed graphs


def test_cyclic_graph(capsys, tmp_path):
    m = _model([helper.make_node("Relu", ["b"], ["a"], name="r1"),
                helper.make_node("Add", ["x", "a"], ["b"], name="r2"),
                helper.make_node("Relu", ["b"], ["y"], name="r3")])
    _refused(capsys, tmp_path, _write(tmp_path, "in.onnx", m), 3, "cycle", "r1", "r2")


def test_duplicate_tensor_names(capsys, tmp_path):
    m = _model([helper.make_node("Relu", ["x"], ["t"], name="r1"),
                helper.make_node("Neg", ["x"], ["t"], name="r2"),
                helper.make_node("Relu", ["t"], ["y"], name="r3")])
    _refused(capsys, tmp_path, _write(tmp_path, "in.onnx", m), 3, "'t'", "written by both", "r1", "r2")
    dup_init = _model([helper.make_node("Add", ["x", "W"], ["y"])],
                      [numpy_helper.from_array(np.ones(4, np.float32), "W")] * 2)
    _refused(capsys, tmp_path, _write(tmp_path, "in2.onnx", dup_init), 3, "'W'", "defined twice")


def test_dangling_input(capsys, tmp_path):
    m = _model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")])
    _refused(capsys, tmp_path, _write(tmp_path, "in.onnx", m), 3, "'ghost'", "add")


def test_output_never_computed(capsys, tmp_path):
    m = _model([helper.make_node("Relu", ["x"], ["t"], name="relu")])
    _refused(capsys, tmp_path, _write(tmp_path, "in.onnx", m), 3, "'y'", "never computed")


def test_unknown_custom_domain_op_passes_through_untouched(capsys, tmp_path):
    m = _model([helper.make_node("Identity", ["x"], ["t"], name="id"),
                helper.make_node("FancyOp", ["t"], ["y"], name="fancy", domain="com.unknown", alpha=0.5)])
    m.opset_import.append(helper.make_opsetid("com.unknown", 1))
    inp = _write(tmp_path, "in.onnx", m)
    # onnxruntime cannot run it, so it cannot be verified: a clear model error ...
    _refused(capsys, tmp_path, inp, 3, "FancyOp", extra=())
    # ... and without verification the op goes through as it was
    out = tmp_path / "o.onnx"
    rc, _, err = _cli(capsys, [inp, out, "-q", "--no-verify"])
    assert rc == 0, err
    got = onnx.load(str(out))
    fancy = [n for n in got.graph.node if n.op_type == "FancyOp"]
    assert len(fancy) == 1 and fancy[0].domain == "com.unknown"
    assert fancy[0].attribute[0].f == pytest.approx(0.5)
    assert ("com.unknown", 1) in {(o.domain, o.version) for o in got.opset_import}
    assert not any(n.op_type == "Identity" for n in got.graph.node)  # the lossless passes still ran
    assert list(fancy[0].input) == ["x"]


def test_absurd_declared_dimensions(capsys, tmp_path):
    m = _relu(ins=[X("x", [10**12, 10**12])], outs=[X("y", [10**12, 10**12])])
    _refused(capsys, tmp_path, _write(tmp_path, "in.onnx", m), 3, "'x'")


def test_absurd_declared_dimensions_with_verification_off(capsys, tmp_path):
    m = _relu(ins=[X("x", [10**12, 10**12])], outs=[X("y", [10**12, 10**12])])
    inp = _write(tmp_path, "in.onnx", m)
    rc, _, err = _cli(capsys, [inp, tmp_path / "o.onnx", "-q", "--no-verify"])
    assert rc == 0, err
    dims = [d.dim_value for d in onnx.load(str(tmp_path / "o.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [10**12, 10**12]


def test_nan_inf_weights_and_empty_tensors_survive(capsys, tmp_path):
    w = np.array([[np.nan, np.inf, -np.inf, 1.0]] * 2, np.float32)
    m = _model([helper.make_node("Add", ["x", "W"], ["a"], name="add"),
                helper.make_node("Concat", ["a", "E"], ["y"], name="cat", axis=0)],
               [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros((0, 4), np.float32), "E")])
    inp = _write(tmp_path, "in.onnx", m)
    rc, _, err = _cli(capsys, [inp, tmp_path / "o.onnx", "-q"])
    assert rc == 0, err
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "o.onnx")).graph.initializer}
    np.testing.assert_array_equal(got["W"], w)  # NaN positions and infinities kept bit for bit
    assert got["E"].shape == (0, 4)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(builders.run(str(tmp_path / "o.onnx"), {"x": x})[0], x + w)


# ----------------------------------------------------------------------------------------------
# external data


def _external(folder: Path, location: str = "w.bin", *, write_data=True, short=False) -> Path:
    w = np.arange(8, dtype=np.float32).reshape(2, 4)
    m = _model([helper.make_node("Add", ["x", "W"], ["y"], name="add")], [numpy_helper.from_array(w, "W")])
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    if write_data:
        (folder / location).write_bytes(w.tobytes()[: 12 if short else None])
    return _write(folder, "in.onnx", m)


def test_external_data_missing(capsys, tmp_path):
    _refused(capsys, tmp_path, _external(tmp_path, write_data=False), 3, "'w.bin'", "missing")


def test_external_data_location_that_is_a_folder(capsys, tmp_path):
    inp = _external(tmp_path, write_data=False)
    (tmp_path / "w.bin").mkdir()
    _refused(capsys, tmp_path, inp, 3, "'w.bin' is a folder, not a file")


def test_external_data_short(capsys, tmp_path):
    _refused(capsys, tmp_path, _external(tmp_path, short=True), 3, "too short", "file has 12")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_leaving_the_folder_is_refused_before_reading(capsys, tmp_path, monkeypatch, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(np.arange(8, dtype=np.float32).tobytes())
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    if kind == "absolute":
        inp = _external(model_dir, str(outside / "w.bin"), write_data=False)
    elif kind == "dotdot":
        inp = _external(model_dir, "../outside/w.bin", write_data=False)
    else:
        (model_dir / "w.bin").symlink_to(outside / "w.bin")
        inp = _external(model_dir, "w.bin", write_data=False)
    # nothing may be read from the data file: any open() of it fails the test
    real_open = open

    def guarded_open(file, *a, **k):
        assert "w.bin" not in str(file), f"external data read before the check: {file}"
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", guarded_open)
    needle = {"absolute": "absolute", "dotdot": "leaves the model's folder", "symlink": "outside the model's folder"}
    _refused(capsys, tmp_path, inp, 3, needle[kind])


def test_external_data_given_as_bytes_without_a_folder():
    with pytest.raises(ModelError, match="not given as a path"):
        gio.open_model(_external_model_bytes())


def _external_model_bytes() -> bytes:
    m = _relu()
    t = numpy_helper.from_array(np.ones(4, np.float32), "unused")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "w.bin"
    m.graph.initializer.append(t)
    return m.SerializeToString()


# ----------------------------------------------------------------------------------------------
# outputs


def test_output_equal_to_input(capsys, tmp_path):
    inp = _write(tmp_path, "in.onnx", builders.mlp())
    _refused(capsys, tmp_path, inp, 2, "is the input", out=inp)
    # the same file through a symlink
    (tmp_path / "link.onnx").symlink_to(inp)
    before = inp.read_bytes()
    rc, _, err = _cli(capsys, [inp, tmp_path / "link.onnx", "-q"])
    assert rc == 2 and "is the input" in err and inp.read_bytes() == before


def test_output_folder_missing(capsys, tmp_path):
    inp = _write(tmp_path, "in.onnx", builders.mlp())
    rc, _, err = _cli(capsys, [inp, tmp_path / "no" / "such" / "o.onnx", "-q"])
    assert rc == 2 and "does not exist" in err and "hint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()


def test_output_folder_unwritable(capsys, tmp_path, monkeypatch):
    inp = _write(tmp_path, "in.onnx", builders.mlp())
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # running as root: permissions do not bind, so simulate the answer
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == ro and m == os.W_OK
                            else real_access(p, m, *a, **k))
    try:
        _refused(capsys, tmp_path, inp, 3, "not writable", out=ro / "o.onnx")
    finally:
        ro.chmod(0o755)


def test_output_is_a_folder(capsys, tmp_path):
    inp = _write(tmp_path, "in.onnx", builders.mlp())
    (tmp_path / "o.onnx").mkdir()
    rc, _, err = _cli(capsys, [inp, tmp_path / "o.onnx", "-q"])
    assert rc == 3 and "is a folder" in err and (tmp_path / "o.onnx").is_dir()


# ----------------------------------------------------------------------------------------------
# recipes, flags and calibration data


def test_unknown_recipe_key_says_did_you_mean(capsys, tmp_path):
    inp = _write(tmp_path, "in.onnx", builders.mlp())
    r = tmp_path / "r.json"
    r.write_text('{"steps": [{"pass": "fold_constants", "max_grwth": 2.0}]}')
    line = _refused(capsys, tmp_path, inp, 2, "max_grwth", "did you mean 'max_growth'", extra=["--recipe", r])
    assert "recipe" in line
    r.write_text('{"steps": [{"pass": "fold_constans"}]}')
    _refused(capsys, tmp_path, inp, 2, "did you mean 'fold_constants'", extra=["--recipe", r])


@pytest.mark.parametrize("argv,needle", [
    (["--verify-batch", "0"], "below the minimum"),
    (["--providers", "tpu"], "tpu"),
    (["--min-cosine", "2"], "above the maximum"),
], ids=["batch-0", "provider", "cosine"])
def test_bad_flag_values(capsys, tmp_path, argv, needle):
    inp = _write(tmp_path, "in.onnx", builders.mlp())
    _refused(capsys, tmp_path, inp, 2, needle, extra=argv)


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--verify-batch", "two"], []], ids=["unknown", "type", "none"])
def test_bad_cli_arguments_exit_2_without_traceback(tmp_path, argv):
    inp = _write(tmp_path, "in.onnx", builders.mlp())
    args = [str(inp), str(tmp_path / "o.onnx")] + argv if argv else []
    r = subprocess.run([sys.executable, "-m", "onnxcompress", *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_no_output_path(capsys, tmp_path):
    inp = _write(tmp_path, "in.onnx", builders.mlp())
    rc, _, err = _cli(capsys, [inp, "-q"])
    assert rc == 2 and "no output path" in err and "hint" in err


@pytest.mark.parametrize("data,needle", [
    ({"z": np.zeros((4, 4), np.float32)}, "unknown input 'z'"),
    ({"x": np.zeros((4, 5), np.float32)}, "'x'"),
    ({"x": np.zeros((4, 4), np.int32)}, "dtype int32"),
    ({"x": np.zeros((0, 4), np.float32)}, "no feeds"),
    ({"x": np.full((4, 4), np.nan, np.float32)}, "NaN"),
], ids=["name", "shape", "dtype", "empty", "nan"])
def test_bad_calibration_data(capsys, tmp_path, data, needle):
    inp = _write(tmp_path, "in.onnx", _relu(ins=[X("x", [2, 4])]))
    npz = tmp_path / "calib.npz"
    np.savez(npz, **data)
    _refused(capsys, tmp_path, inp, 2, needle, extra=["--calib-data", npz])


@pytest.mark.parametrize("flags", [["--int8"], ["--int4"], ["--prune-channels", "0.25", "--prune-importance",
                                                             "activation"], ["--distill"]],
                         ids=["int8-static", "int4-gptq", "prune-activation", "distill"])
def test_calibration_data_for_another_model_is_refused_where_it_is_read(capsys, tmp_path, flags):
    """The CNN's calibration images given to the MLP: every pass that reads the data names the file, the
    batch and the shape mismatch (exit 2), where it was once 'unexpected InvalidArgument ... a bug'."""
    from onnxcompress.datasets import bundled_model_path

    src = bundled_model_path("mlp")
    inp = _write(tmp_path, "mlp.onnx", src.read_bytes())
    npz = _write(tmp_path, "cnn.calib.npz", src.with_name("cnn.calib.npz").read_bytes())
    line = _refused(capsys, tmp_path, inp, 2, "cnn.calib.npz[0:32]: input 'x' has rank 4 (32, 1, 8, 8), expected "
                    "rank 2", extra=[*flags, "--calib-data", npz])
    assert "bug" not in line


def test_calibration_file_missing_or_not_npz(capsys, tmp_path):
    inp = _write(tmp_path, "in.onnx", _relu())
    _refused(capsys, tmp_path, inp, 2, "calib", extra=["--calib-data", tmp_path / "missing.npz"])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _refused(capsys, tmp_path, inp, 2, "junk.npz", extra=["--calib-data", tmp_path / "junk.npz"])


# ----------------------------------------------------------------------------------------------
# the real process: exit codes and -v


def test_subprocess_exit_code_and_traceback_only_with_verbose(tmp_path):
    inp = tmp_path / "in.onnx"
    inp.write_bytes(b"garbage")
    cmd = [sys.executable, "-m", "onnxcompress", str(inp), str(tmp_path / "o.onnx")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run(cmd + ["-v"], capture_output=True, text=True)
    assert r.returncode == 3 and "Traceback" in r.stderr
    assert not (tmp_path / "o.onnx").exists() and inp.read_bytes() == b"garbage"


def test_if_and_loop_models_compress(capsys, tmp_path):
    inp = _write(tmp_path, "in.onnx", builders.with_if_subgraph(builders.conv_bn()))
    rc, _, err = _cli(capsys, [inp, tmp_path / "o.onnx", "-q"])
    assert rc == 0, err
    onnx.checker.check_model(str(tmp_path / "o.onnx"))
    assert [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node] == ["If"]


def test_an_output_named_after_the_inputs_data_file_is_refused(capsys, tmp_path):
    """a.onnx keeps its weights in b.onnx.data: writing b.onnx with external data would overwrite them
    (the input then no longer loads). Refused, exit 3, nothing touched. Found by a black-box run."""
    from onnxcompress.datasets import bundled_model_path

    onnx.save(onnx.load(str(bundled_model_path("mlp"))), str(tmp_path / "a.onnx"), save_as_external_data=True,
              location="b.onnx.data", size_threshold=0)
    before = _digest(tmp_path)
    rc, _, err = _cli(capsys, [tmp_path / "a.onnx", tmp_path / "b.onnx", "-q", "--external-data", "--fp16"])
    assert rc == 3 and "refusing to write over the input" in err and "b.onnx.data'" in err and "(hint: " in err
    assert _digest(tmp_path) == before and not (tmp_path / "b.onnx").exists()
    onnx.checker.check_model(str(tmp_path / "a.onnx"))


@pytest.mark.parametrize("flags", [["--prune", "nan"], ["--prune-channels", "inf"]], ids=["nan", "inf"])
def test_non_finite_option_values_are_usage_errors(capsys, tmp_path, flags):
    inp = _write(tmp_path, "in.onnx", builders.mlp())
    _refused(capsys, tmp_path, inp, 2, "is not a finite number", extra=flags)


def test_a_bad_report_path_is_refused_before_anything_is_written(capsys, tmp_path):
    inp = _write(tmp_path, "in.onnx", builders.mlp())
    _refused(capsys, tmp_path, inp, 2, "--report", extra=["--report", tmp_path / "nodir" / "r.json"])


def _reshape_model() -> onnx.ModelProto:
    """x[N, K] -> Reshape(-1, 8) -> MatMul: K is free in the signature, but only multiples of 8 run."""
    from onnx import TensorProto, helper

    w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "W")
    shape = onnx.numpy_helper.from_array(np.array([-1, 8], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["r"], name="rs"),
                           helper.make_node("MatMul", ["r", "W"], ["z"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "K"])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["M", 8])], [w, shape])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("flags", [["--int8"], ["--prune-channels", "0.5", "--prune-importance", "activation"]],
                         ids=["int8-static", "prune-activation"])
def test_calibration_data_the_model_cannot_run_is_a_data_error_in_one_line(capfd, tmp_path, flags):
    """onnxruntime failing on a calibration batch is the data's fault (exit 2, naming the batch and
    its shapes), not 'a bug in onnxcompress' (exit 4); and onnxruntime's own coloured log line for
    the failure does not reach stderr beside ours."""
    inp = _write(tmp_path, "in.onnx", _reshape_model())
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 7), np.float32))
    before = _digest(tmp_path)
    rc = cli.main([str(inp), str(tmp_path / "o.onnx"), "-q", "--calib-data", str(tmp_path / "bad.npz"), *flags])
    err = capfd.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "[E:onnxruntime" not in err, err
    assert "(x: float32[4, 7])" in lines[0] and "(hint: the data must fit the model" in lines[0]
    assert _digest(tmp_path) == before


def test_a_usage_error_is_one_line_not_the_usage_block(capfd):
    with pytest.raises(SystemExit) as exc:
        cli.main(["in.onnx", "out.onnx", "--int4-block-size", "7"])
    err = capfd.readouterr().err
    assert exc.value.code == 2
    assert err.splitlines() == ["onnxcompress: error: argument --int4-block-size: invalid choice: 7 (choose from "
                                "16, 32, 64, 128, 256) (see onnxcompress --help)"]


@pytest.mark.parametrize("target", ["input", "output", "data", "calib"])
def test_report_and_cache_paths_never_overwrite_the_runs_own_files(capsys, tmp_path, target):
    """--report INPUT replaced the model with JSON (exit 0); --report OUT, the input's external data
    and the calibration file likewise; --calib-cache INPUT; OUT = the calibration file. Each is now
    refused before anything is written."""
    m = builders.mlp()
    onnx.save(m, tmp_path / "in.onnx", save_as_external_data=True, location="in.data", size_threshold=0)
    np.savez(tmp_path / "cal.npz", x=np.zeros((4, 16), np.float32))
    paths = {"input": tmp_path / "in.onnx", "output": tmp_path / "out" / "o.onnx", "data": tmp_path / "in.data",
             "calib": tmp_path / "cal.npz"}
    (tmp_path / "out").mkdir()
    for flag in ("--report", "--calib-cache", "OUT"):
        if flag == "--calib-cache" and target in ("output", "data"):
            continue
        before = _digest(tmp_path)
        out = paths["calib"] if flag == "OUT" else paths["output"]
        if flag == "OUT" and target != "calib":
            continue
        extra = ["--int8", "--calib-data", tmp_path / "cal.npz"] + ([flag, paths[target]] if flag != "OUT" else [])
        rc, _, err = _cli(capsys, [paths["input"], out, "-q", *extra])
        assert rc == 2 and "one of this run's own files" in err, (flag, err)
        assert _digest(tmp_path) == before


@pytest.mark.parametrize("flags", [["--int8"], ["--int8", "--no-per-channel"], ["--int4", "--no-int4-keep-last"],
                                   ["--storage", "int4"]], ids=["int8", "int8-per-tensor", "int4", "storage"])
def test_non_finite_weights_leave_their_layer_float_with_a_reason(tmp_path, flags):
    """One Inf in a weight used to be quantized anyway: per tensor it spoiled every output column
    (the original has one non-finite column). The layer now stays float, with the reason."""
    import json

    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[3, 5] = np.inf
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
                          [onnx.numpy_helper.from_array(w, "W")])
    inp = _write(tmp_path, "in.onnx", helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    rc = cli.main([str(inp), str(tmp_path / "o.onnx"), "-q", "--no-verify", "--report", str(tmp_path / "r.json"),
                   *flags])
    assert rc == 0
    steps = json.loads((tmp_path / "r.json").read_text())["steps"]
    reasons = [s["reason"] for step in steps for s in step["skipped"]]
    assert any("1 non-finite value(s) (NaN or Inf)" in r for r in reasons), reasons
    out = onnx.load(tmp_path / "o.onnx")
    assert [t.name for t in out.graph.initializer] == ["W"]  # the float weight, untouched
    x = rng.standard_normal((4, 64)).astype(np.float32)
    y = builders.run(out, {"x": x})[0]
    assert sorted(set(np.flatnonzero(~np.isfinite(y).all(axis=0)))) == [5]


def test_a_model_without_a_default_opset_import_is_refused_at_load(capsys, tmp_path):
    """--int4 used to write a model onnx.checker rejects; the other presets failed at verification
    with a truncated onnxruntime message and a hint to upgrade onnxruntime."""
    m = builders.mlp()
    del m.opset_import[:]
    inp = _write(tmp_path, "in.onnx", m)
    for flags in ([], ["--int4"]):
        line = _refused(capsys, tmp_path, inp, 3, "declares no opset for the default ONNX domain", extra=flags)
        assert "make_opsetid('', 17)" in line
