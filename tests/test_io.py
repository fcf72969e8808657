"""Model I/O (issue 2 item 2): load from path / bytes / ModelProto, lazy external data, external data
on demand and over the protobuf limit, atomic saves, never over the input, everything no pass touched
preserved, and weights visible wherever they live (initializers, Constant nodes, If/Loop/Scan bodies).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
import onnxcompress as oc
from onnxcompress.errors import ModelError
from onnxcompress.graph import io as gio
from onnxcompress.graph.query import iter_weights
from onnxcompress.passes.cleanup import CleanupConfig, DedupeConfig, FoldConstantsConfig
from onnxcompress.recipe import Recipe
from onnxcompress.recipes import default_recipe

#: the core lossless passes only (later passes such as fusions may legitimately rename nodes)
CORE = Recipe(steps=(CleanupConfig(), DedupeConfig(), FoldConstantsConfig()))
FEED = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}


def _lossless(ref, out):
    assert builders.lossless_close(ref, out), float(np.max(np.abs(np.asarray(ref) - np.asarray(out))))


def _external_mlp(folder: Path, sizes=(16, 64, 8)) -> Path:
    """An MLP saved with every tensor in ``model.onnx.data`` next to ``model.onnx``."""
    m = builders.mlp(sizes)
    path = folder / "model.onnx"
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    return path


def _tmp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------------------------
# loading


def test_load_from_path_bytes_and_proto_agree(tmp_path):
    m = builders.mlp()
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p))
    raw = m.SerializeToString()
    before = m.SerializeToString()
    loaded = [oc.load(p), oc.load(raw), oc.load(m), oc.load(str(p))]
    for x in loaded:
        assert x.SerializeToString() == raw
    assert loaded[2] is not m  # a copy, never the caller's object
    loaded[2].graph.node[0].name = "changed"
    assert m.SerializeToString() == before


def test_compress_never_mutates_the_callers_proto():
    m = builders.conv_bn()
    before = m.SerializeToString()
    res = oc.compress(m)
    assert m.SerializeToString() == before
    assert res.passed


def test_external_data_stays_lazy_until_a_pass_reads_it(tmp_path, monkeypatch):
    path = _external_mlp(tmp_path)
    loads = []
    real_load = gio.ExternalValues.load
    monkeypatch.setattr(gio.ExternalValues, "load", lambda self: loads.append(self.tensor.name) or real_load(self))
    src = gio.open_model(path)
    # nothing inlined: every tensor still points at the data file
    assert all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in src.model.graph.initializer)
    graph = gio.model_to_graph(src)
    consts = [t for t in graph.tensors().values() if t.__class__.__name__ == "Constant"]
    assert consts and all(isinstance(c._values, gio.ExternalValues) for c in consts)
    out = gio.graph_to_model(graph, src.model)
    gio.save(out, tmp_path / "copy.onnx", base_dir=src.base_dir)  # inline: read straight from the file
    assert loads == []
    # a pass asking for values loads exactly that tensor
    w = next(c for c in consts if c.name == "W0")
    assert w.values.shape == (16, 64) and loads == ["W0"]
    _lossless(builders.run(builders.mlp((16, 64, 8)), FEED)[0], builders.run(str(tmp_path / "copy.onnx"), FEED)[0])


def test_external_data_model_through_compress_and_cli(tmp_path):
    path = _external_mlp(tmp_path)
    ref = builders.run(builders.mlp((16, 64, 8)), FEED)[0]
    res = oc.compress(path)
    assert res.passed
    res.save(tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx.data").exists()  # small model: inline by default
    _lossless(ref, builders.run(str(tmp_path / "out.onnx"), FEED)[0])
    # --external-data writes <out>.data, and the result loads from its own folder
    r = subprocess.run([sys.executable, "-m", "onnxcompress", str(path), str(tmp_path / "ext.onnx"),
                        "--external-data", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ext = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    locs = {e.value for t in ext.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {"ext.onnx.data"}
    assert (tmp_path / "ext.onnx.data").stat().st_size > 16 * 64 * 4
    onnx.checker.check_model(str(tmp_path / "ext.onnx"))
    _lossless(ref, builders.run(str(tmp_path / "ext.onnx"), FEED)[0])
    assert _tmp_leftovers(tmp_path) == []


def test_external_data_is_chosen_automatically_over_the_protobuf_limit(tmp_path, monkeypatch):
    m = builders.mlp((16, 256, 8))
    # the real limit is 2 GiB (tests/test_scale.py crosses it); here a tiny limit exercises the same branch
    monkeypatch.setattr(gio, "PROTOBUF_LIMIT", 8 * 1024)
    data = gio.save(m, tmp_path / "big.onnx")
    assert data == tmp_path / "big.onnx.data" and data.exists()
    loaded = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
    # offsets are aligned (mmap-friendly) and lengths exact
    for t in loaded.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if info:
            assert int(info["offset"]) % 4096 == 0
    feed = {"x": FEED["x"]}
    _lossless(builders.run(m, feed)[0], builders.run(str(tmp_path / "big.onnx"), feed)[0])
    # asked to stay inline while over the limit: a clear error, nothing written
    with pytest.raises(ModelError, match="external"):
        gio.save(m, tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx").exists()
    assert _tmp_leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# saving atomically, never over the input


def test_save_is_atomic_when_writing_the_model_fails(tmp_path, monkeypatch):
    m = builders.mlp()
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gio.os, "fsync", boom)
    with pytest.raises(ModelError, match="No space left") as e:
        gio.save(m, out, external_data=True)
    assert "hint" in str(e.value)
    assert out.read_bytes() == b"previous"  # the old file is untouched
    assert not (tmp_path / "out.onnx.data").exists()
    assert _tmp_leftovers(tmp_path) == []


def test_save_renames_data_before_model_and_cleans_up_on_failure(tmp_path, monkeypatch):
    m = builders.mlp((16, 64, 8))
    out = tmp_path / "out.onnx"
    calls = []
    real_replace = os.replace

    def replace(a, b):
        calls.append(Path(b).name)
        if Path(b).name == "out.onnx":
            raise OSError(5, "I/O error")
        return real_replace(a, b)

    monkeypatch.setattr(gio.os, "replace", replace)
    with pytest.raises(ModelError):
        gio.save(m, out, external_data=True)
    assert calls == ["out.onnx.data", "out.onnx"]  # data first, model last: no model points at missing data
    assert not out.exists()
    assert _tmp_leftovers(tmp_path) == []


def test_refuses_to_write_over_the_input_and_its_data(tmp_path):
    path = _external_mlp(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    res = oc.compress(path)
    with pytest.raises(ModelError, match="over the input"):
        res.save(path)
    # writing <x>.onnx with external data would produce <x>.onnx.data == the input's data file
    with pytest.raises(ModelError, match="over the input"):
        res.save(tmp_path / "model.onnx", external_data=True)
    # through a symlink to the input as well
    (tmp_path / "alias.onnx").symlink_to(path)
    with pytest.raises(ModelError, match="over the input"):
        res.save(tmp_path / "alias.onnx")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "alias.onnx"}
    assert after == before


# ----------------------------------------------------------------------------------------------
# preserving what no pass touched


def _decorated_model() -> onnx.ModelProto:
    """An MLP with producer, metadata, doc strings, a custom-domain local function and value_info."""
    m = builders.mlp((16, 32, 8))
    m.producer_name, m.producer_version = "some-exporter", "9.9"
    m.domain, m.model_version, m.doc_string = "org.example", 7, "model doc"
    m.graph.doc_string = "graph doc"
    m.graph.node[0].doc_string = "first matmul"
    m.graph.input[0].doc_string = "the features"
    helper.set_model_props(m, {"author": "tests", "license": "MIT"})
    # a local function in a custom domain (onnxruntime inlines model-local functions)
    fn = helper.make_function(
        "org.example.ops", "Swishish", ["X"], ["Y"],
        [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("org.example.ops", 1))
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "Swishish", "org.example.ops"
    m.graph.value_info.append(helper.make_tensor_value_info("mm0", TensorProto.FLOAT, ["N", 32]))
    # an Identity that cleanup removes, so the model really changes
    ident = helper.make_node("Identity", ["add1"], ["y"], name="ident")
    m.graph.node[-1].output[0] = "add1"
    m.graph.node.append(ident)
    onnx.checker.check_model(m, full_check=True)
    return m


def test_save_preserves_everything_no_pass_touched(tmp_path):
    m = _decorated_model()
    ref = builders.run(m, FEED)[0]
    res = oc.compress(m, CORE)
    assert res.passed
    assert not any(n.op_type == "Identity" for n in res.model.graph.node)
    res.save(tmp_path / "out.onnx")
    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out, full_check=True)
    assert (out.producer_name, out.producer_version) == ("some-exporter", "9.9")
    assert (out.domain, out.model_version, out.doc_string) == ("org.example", 7, "model doc")
    assert out.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in out.metadata_props if p.key != "onnxcompress.plan"} == {"author": "tests", "license": "MIT"}
    assert {(o.domain, o.version) for o in out.opset_import} >= {("", 17), ("org.example.ops", 1)}
    assert [f.name for f in out.functions] == ["Swishish"]
    assert out.functions[0].SerializeToString() == m.functions[0].SerializeToString()
    assert [n.domain for n in out.graph.node if n.op_type == "Swishish"] == ["org.example.ops"]
    assert next(n for n in out.graph.node if n.name == "MatMul_0").doc_string == "first matmul"
    assert out.graph.input[0].doc_string == "the features"
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    assert out.graph.output[0].type == m.graph.output[0].type
    assert "mm0" in {v.name for v in out.graph.value_info}
    _lossless(ref, builders.run(out, FEED)[0])


# ----------------------------------------------------------------------------------------------
# weights wherever they live


def _loop_model() -> onnx.ModelProto:
    """y = x @ W applied ``trip`` times by a Loop whose body holds W as a Constant node."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((8, 8)) / 3).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["W"], name="body_W", value=numpy_helper.from_array(w, "W")),
         helper.make_node("MatMul", ["h_in", "W"], ["h_out"], name="body_mm"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 8])],
    )
    g = helper.make_graph(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)],
        "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.array(3, np.int64), "trip"), numpy_helper.from_array(np.array(True), "cond")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _scan_model() -> onnx.ModelProto:
    """A Scan over rows of x; the body adds an initializer B (kept inside the body) to each row."""
    b = np.arange(4, dtype=np.float32)
    body = helper.make_graph(
        [helper.make_node("Add", ["row", "B"], ["out_row"], name="scan_add"),
         helper.make_node("Identity", ["s_in"], ["s_out"], name="scan_state")],
        "scan_body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("row", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("out_row", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(b, "B")],
    )
    g = helper.make_graph(
        [helper.make_node("Scan", ["s0", "x"], ["s_final", "y"], name="scan", body=body, num_scan_inputs=1)],
        "scan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(np.zeros(1, np.float32), "s0")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _weight_list(model: onnx.ModelProto) -> list[tuple[str, str, list[str], str]]:
    graph = gio.model_to_graph(gio.open_model(model))
    return [(w.name, w.kind, sorted(c.name for c in w.consumers), w.graph.name) for w in iter_weights(graph)]


def _weights(model: onnx.ModelProto) -> dict[str, tuple[str, list[str], str]]:
    """name -> (kind, consumers, graph) for models whose weight names are unique."""
    return {n: (k, c, g) for n, k, c, g in _weight_list(model)}


def test_weights_in_constant_nodes_are_visible():
    w = _weights(builders.with_constant_nodes(builders.conv_bn()))
    assert w["conv.w"] == ("constant_node", ["conv"], "conv_bn")
    assert w["fc.w"] == ("constant_node", ["fc"], "conv_bn")
    assert len(w) == 8


def test_weights_in_if_loop_and_scan_bodies_are_visible():
    w = _weight_list(builders.with_if_subgraph(builders.conv_bn()))
    # the same names live in both branches: each branch's copy is its own weight with its own reader
    assert sorted((n, g) for n, _, _, g in w if n == "conv.w") == [("conv.w", "else"), ("conv.w", "then")]
    assert all(c == ["conv"] for n, _, c, _ in w if n == "conv.w")
    assert len(w) == 1 + 2 * 8  # cond + 8 weights per branch
    loop = _weights(_loop_model())
    assert loop["W"] == ("constant_node", ["body_mm"], "body")
    scan = _weights(_scan_model())
    assert scan["B"] == ("initializer", ["scan_add"], "scan_body")


@pytest.mark.parametrize("make", [_loop_model, _scan_model,
                                  lambda: builders.with_if_subgraph(builders.conv_bn())], ids=["loop", "scan", "if"])
def test_subgraph_models_survive_the_lossless_passes(make, tmp_path):
    m = make()
    name = m.graph.input[0].name
    shape = [d.dim_value or 2 for d in m.graph.input[0].type.tensor_type.shape.dim]
    feed = {name: np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
    res = oc.compress(m, default_recipe())
    assert res.passed
    res.save(tmp_path / "o.onnx")
    onnx.checker.check_model(str(tmp_path / "o.onnx"))
    # the body weights are still there, still inside their bodies (whatever the fusions did to them)
    body = lambda model: sorted({g for _, _, _, g in _weight_list(model)} - {model.graph.name})  # noqa: E731
    assert body(onnx.load(str(tmp_path / "o.onnx"))) == body(m)
    _lossless(builders.run(m, feed)[0], builders.run(str(tmp_path / "o.onnx"), feed)[0])


def test_recipe_with_no_steps_round_trips_bytes_for_bytes_in_values(tmp_path):
    """An empty recipe: the saved model computes exactly what the input did and keeps every tensor."""
    m = builders.conv_bn()
    res = oc.compress(m, Recipe())
    res.save(tmp_path / "o.onnx")
    out = onnx.load(str(tmp_path / "o.onnx"))
    a = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
