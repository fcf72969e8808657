"""Large models: new weights are spilled to a private folder between passes, not held in memory."""

import gc
import os

import numpy as np
import onnx
import pytest

import builders as b
import onnxcompress as oc
from onnxcompress.errors import ModelError
from onnxcompress.graph.io import SPILL_KEY, open_model
from onnxcompress.recipe import Recipe


def _external(tmp_path, model):
    d = tmp_path / "src"
    d.mkdir()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.save(m, d / "m.onnx", save_as_external_data=True, location="m.bin", size_threshold=0)
    return d / "m.onnx"


def test_spilled_weights_are_verified_saved_and_cleaned_up(tmp_path):
    m = b.mlp(sizes=(256, 512, 10))
    src = _external(tmp_path, m)
    recipe = Recipe.from_cli(["--storage", "int8"])
    with oc.Context(spill_bytes=4096) as ctx:  # the default (1 MiB) is above this tiny model's tensors
        res = oc.compress(src, recipe, context=ctx)
    spilled = [t for t in res.model.graph.initializer if any(e.key == SPILL_KEY for e in t.external_data)]
    assert spilled, "the int8 codes of the large weight should live in the spill folder"
    folder = res._spill.name
    assert os.path.isdir(folder) and res.parity.passed  # verification ran through a saved copy
    out = res.save(tmp_path / "out.onnx")
    saved = onnx.load(str(out), load_external_data=False)
    assert not any(e.key == SPILL_KEY for t in saved.graph.initializer for e in t.external_data)
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    got, ref = b.run(str(out), {"x": x})[0], b.run(m, {"x": x})[0]
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.999
    del res
    gc.collect()
    assert not os.path.exists(folder)


def test_small_models_are_not_spilled():
    res = oc.compress(b.mlp(sizes=(256, 512, 10)), Recipe.from_cli(["--storage", "int8"]))
    assert res._spill is None
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in res.model.graph.initializer)


def test_an_input_cannot_use_the_spill_key(tmp_path):
    src = _external(tmp_path, b.mlp())
    m = onnx.load(str(src), load_external_data=False)
    e = m.graph.initializer[0].external_data.add()
    e.key, e.value = SPILL_KEY, "/etc"
    onnx.save(m, str(src))
    with pytest.raises(ModelError, match="could point anywhere"):
        open_model(src)


def test_packed_int4_blocks_are_spilled_too(tmp_path):
    m = b.mlp(sizes=(256, 512, 10))
    src = _external(tmp_path, m)
    with oc.Context(spill_bytes=4096) as ctx:
        res = oc.compress(src, Recipe.from_cli(["--int4", "--int4-method", "rtn"]), context=ctx)
    nbits = [n for n in res.model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and res.parity.passed
    packed = {t.name: t for t in res.model.graph.initializer}[nbits[0].input[1]]
    assert any(e.key == SPILL_KEY for e in packed.external_data)
    out = res.save(tmp_path / "out.onnx")
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    assert b.run(str(out), {"x": x})[0].shape == (4, 10)
