"""drop_dead_channels: channels that no layer reads any more are removed, exactly.

Three ways: the structure (which channels went, every coupled tensor shrank, the plan), the numbers
(outputs equal to the input model's) and the refusals (no dead channel, a grouped-Conv reader, a
graph output).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

import builders as b
from onnxcompress.api import compress
from onnxcompress.recipe import Recipe, VerifyConfig
from onnxcompress.prune.dead import DropDeadChannelsConfig

OFF = VerifyConfig(enabled=False)


def _recipe(*steps) -> Recipe:
    r = Recipe()
    for s in steps:
        r = r.with_step(s)
    return r.replace(verify=OFF)


def _set(model: onnx.ModelProto, name: str, fn) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), name))
    return m


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _feed(model, n=16):
    return {"x": np.random.default_rng(3).standard_normal((n, 16)).astype(np.float32)}


def _dead_mlp():
    """16 -> 32 -> 8 -> 4: hidden units 3, 7 and 20 of the first layer have no outgoing weight (rows
    of W1), unit 5 of the second layer none either (column 5 of W2)."""
    m = b.mlp((16, 32, 8, 4), seed=1)

    def kill_rows(w):
        w[[3, 7, 20], :] = 0
        return w

    def kill_col(w):
        w[5, :] = 0
        return w

    return _set(_set(m, "W1", kill_rows), "W2", kill_col)


def test_dead_units_are_removed_with_every_coupled_tensor_and_outputs_do_not_change():
    ref = _dead_mlp()
    r = compress(ref, _recipe(DropDeadChannelsConfig()))
    res = r.report.step("drop_dead_channels")
    assert res.details["dropped"] == 4
    # W0 columns and B0 lose units 3, 7, 20; W1 loses those rows and column 5, B1 and W2's row 5 go too
    assert sorted(v.shape for v in _inits(r.model).values()) == [(4,), (7,), (7, 4), (16, 29), (29,), (29, 7)]
    onnx.checker.check_model(r.model, full_check=True)
    for got, want in zip(b.run(r.model, _feed(ref)), b.run(ref, _feed(ref))):
        np.testing.assert_array_equal(got, want)
    keep = {g["group"]: g for g in res.details["groups"]}
    kept = [g["keep"] for g in keep.values() if g["channels"] == 32][0]
    assert not {3, 7, 20} & set(next(iter(kept.values())))


def test_identity_without_dead_units():
    ref = b.mlp((16, 32, 8, 4), seed=1)
    r = compress(ref, _recipe(DropDeadChannelsConfig()))
    assert not r.report.step("drop_dead_channels").modified
    assert {k: v.shape for k, v in _inits(r.model).items()} == {k: v.shape for k, v in _inits(ref).items()}


def test_at_least_one_channel_stays_and_graph_outputs_are_left_alone():
    ref = _set(b.mlp((16, 32, 8, 4), seed=1), "W1", lambda w: w * 0)  # every hidden unit of layer 0 is dead
    r = compress(ref, _recipe(DropDeadChannelsConfig(min_units=2)))
    assert sorted(v.shape for v in _inits(r.model).values()) == [(2,), (2, 8), (4,), (8,), (8, 4), (16, 2)]
    for got, want in zip(b.run(r.model, _feed(ref)), b.run(ref, _feed(ref))):
        np.testing.assert_array_equal(got, want)
    # the last layer writes the graph output: its group is blocked, reported with the reason
    reasons = [s["reason"] for s in r.report.step("drop_dead_channels").skipped]
    assert any("graph output" in why for why in reasons)


def test_grouped_conv_reader_declines():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1 = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)  # group=4: each output reads 2 channels
    w1[:, 0] = 0  # channel 0 of every group read by nothing
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="c0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="r0"),
             helper.make_node("Conv", ["r0", "w1"], ["y"], name="c1", pads=[1, 1, 1, 1], group=4)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                          [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = compress(m, _recipe(DropDeadChannelsConfig()))
    res = r.report.step("drop_dead_channels")
    assert not res.modified
    assert any("grouped Conv" in s["reason"] for s in res.skipped)
