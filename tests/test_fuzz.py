"""Fuzzing (issue 7 item 3) with hypothesis, derandomized so every run sees the same examples.

1. Random small valid graphs — linear layers, conv layers (with BatchNormalization), elementwise
   chains and residual blocks, sprinkled with the things lossless passes act on (Identity nodes, an
   Identity writing a graph output, duplicate constants, constant-only subexpressions, dead branches)
   — go through each lossless pass and through all of them together; the result passes the checker,
   loads in onnxruntime and computes the same outputs: ``max|ref - out| <= 1e-5 + 1e-4 * max|ref|``.
2. Random byte mutations of a model file (flips, truncation, insertions, deletions, splices) give
   either a model or an :class:`OnnxCompressError` that is not an internal error — never another
   exception.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import builders
import onnxcompress as oc
from onnxcompress.errors import OnnxCompressError, PassError
from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
from onnxcompress.passes.base import Pipeline
from onnxcompress.passes.registry import make_pass, pass_classes
from onnxcompress.recipe import Recipe, VerifyConfig

FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _lossless_configs():
    return [c.config_cls for c in pass_classes() if c.lossless]


# ----------------------------------------------------------------------------------------------
# random valid graphs


class _Builder:
    """Accumulates nodes and initializers with unique names; weights from a seeded generator."""

    def __init__(self, seed: int, draw):
        self.rng = np.random.default_rng(seed)
        self.draw = draw
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.outputs: list[str] = []

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def const(self, arr: np.ndarray) -> str:
        """An initializer, sometimes stored twice (dedupe), via a Constant node, or through a foldable op."""
        arr = arr.astype(np.float32)
        name = self.name("w")
        how = self.draw(st.sampled_from(["init", "init", "dup", "constant_node", "transpose", "identity"]))
        if how == "constant_node":
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.name("Constant"),
                                               value=numpy_helper.from_array(arr, name)))
            return name
        if how == "transpose" and arr.ndim == 2:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr.T), name))
            return self.node("Transpose", [name], perm=[1, 0])
        self.inits.append(numpy_helper.from_array(arr, name))
        if how == "dup":  # an identical copy under another name, read by a second (dead-end) Add
            twin = self.name("twin")
            self.inits.append(numpy_helper.from_array(arr.copy(), twin))
            return twin
        if how == "identity":
            return self.node("Identity", [name])
        return name

    def maybe_identity(self, t: str) -> str:
        return self.node("Identity", [t]) if self.draw(st.booleans()) else t

    def act(self, t: str) -> str:
        op = self.draw(st.sampled_from(["Relu", "Tanh", "Sigmoid", None]))
        return self.node(op, [t]) if op else t


def _linear(b: _Builder, h: str, f_in: int, f_out: int) -> str:
    w = b.rng.standard_normal((f_in, f_out)) / np.sqrt(f_in)
    bias = 0.1 * b.rng.standard_normal(f_out)
    if b.draw(st.booleans()):
        y = b.node("Add", [b.node("MatMul", [h, b.const(w)]), b.const(bias)])
    else:
        y = b.node("Gemm", [h, b.const(np.ascontiguousarray(w.T)), b.const(bias)], transB=1)
    return b.act(b.maybe_identity(y))


def _conv(b: _Builder, h: str, c_in: int, c_out: int) -> str:
    k = b.draw(st.sampled_from([1, 3]))
    w = b.rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * k * k)
    ins = [h, b.const(w)] + ([b.const(0.1 * b.rng.standard_normal(c_out))] if b.draw(st.booleans()) else [])
    y = b.node("Conv", ins, pads=[k // 2] * 4)
    if b.draw(st.booleans()):
        y = b.node("BatchNormalization", [y, b.const(b.rng.uniform(0.5, 1.5, c_out)),
                                          b.const(0.1 * b.rng.standard_normal(c_out)),
                                          b.const(0.1 * b.rng.standard_normal(c_out)),
                                          b.const(b.rng.uniform(0.5, 1.5, c_out))])
    return b.act(b.maybe_identity(y))


def _elementwise(b: _Builder, h: str, shape: tuple[int, ...]) -> str:
    op = b.draw(st.sampled_from(["Add", "Mul", "Sub", "Div", "Neg", "Abs", "Relu", "Sigmoid"]))
    if op in ("Neg", "Abs", "Relu", "Sigmoid"):
        return b.node(op, [h])
    c_shape = b.draw(st.sampled_from([(), shape[1:], (shape[-1],)]))
    c = b.rng.uniform(0.5, 1.5, c_shape) * (1 if op == "Div" else b.rng.choice([-1, 1], c_shape))
    return b.maybe_identity(b.node(op, [h, b.const(np.asarray(c))]))


@st.composite
def valid_models(draw):
    kind = draw(st.sampled_from(["linear", "conv", "elementwise", "residual_linear", "residual_conv"]))
    b = _Builder(draw(st.integers(0, 2**16)), draw)
    depth = draw(st.integers(1, 3))
    conv = "conv" in kind
    width = draw(st.sampled_from([2, 3, 4])) if conv else draw(st.sampled_from([3, 4, 8]))
    shape = (2, width, 5, 5) if conv else (2, width)
    h = "x"
    for _ in range(depth):
        if kind == "linear":
            out = draw(st.sampled_from([3, 4, 8]))
            h, width = _linear(b, h, width, out), out
        elif kind == "conv":
            out = draw(st.sampled_from([2, 3, 4]))
            h, width = _conv(b, h, width, out), out
        elif kind == "elementwise":
            h = _elementwise(b, h, shape)
        else:  # residual: h + f(h), f keeps the shape
            f = _conv(b, h, width, width) if conv else _linear(b, h, width, width)
            h = b.node("Add", [h, f])
        if draw(st.integers(0, 4)) == 0:  # a dead branch nobody reads
            b.node("Relu", [h])
    out_shape = (2, width, 5, 5) if conv else (2, width)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))]
    # the last node writes y directly, or through an Identity (cleanup must keep the name y)
    last = b.nodes[-1] if b.nodes else None
    readers = [n for n in b.nodes if h in n.input]
    if last is not None and list(last.output) == [h] and not readers and draw(st.booleans()):
        last.output[0] = "y"
        h = "y"
    else:
        b.nodes.append(helper.make_node("Identity", [h], ["y"], name="out_identity"))
    if draw(st.booleans()) and h != "x":  # an intermediate also exposed as a second output
        outputs.append(helper.make_tensor_value_info("h_out", TensorProto.FLOAT, list(out_shape)))
        b.nodes.append(helper.make_node("Identity", [h], ["h_out"], name="second_out"))
    graph = helper.make_graph(b.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              outputs, b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fuzz")
    m.ir_version = 8
    onnx.checker.check_model(m)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return m, {"x": x}


@settings(FUZZ, max_examples=200)
@given(data=valid_models(), which=st.integers(0, 64))
def test_lossless_passes_keep_outputs_of_random_graphs(data, which):
    model, feed = data
    configs = _lossless_configs()
    # each lossless pass alone, or all of them together (the default prefix)
    steps = (configs[which % len(configs)](),) if which < 48 else tuple(c() for c in configs)
    ref = builders.run(model, feed)
    result = oc.compress(model, Recipe(steps=steps, verify=VerifyConfig(enabled=False)))
    out = result.model
    onnx.checker.check_model(out)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    got = builders.run(out, feed, optimize=True)
    for r, g in zip(ref, got):
        assert builders.lossless_close(r, g), (steps, float(np.max(np.abs(r - g))))


def test_the_generator_covers_what_the_passes_act_on():
    """The random graphs really contain Identity nodes, duplicate and foldable constants, BN, residuals."""
    seen = set()

    @settings(FUZZ, max_examples=80)
    @given(data=valid_models())
    def collect(data):
        m = data[0]
        ops = {n.op_type for n in m.graph.node}
        seen.update(ops)
        vals = [numpy_helper.to_array(t).tobytes() for t in m.graph.initializer]
        if len(vals) != len(set(vals)):
            seen.add("duplicate initializer")

    collect()
    assert {"Identity", "Transpose", "Constant", "BatchNormalization", "Conv", "Gemm", "MatMul",
            "duplicate initializer", "Add"} <= seen


# ----------------------------------------------------------------------------------------------
# mutated files


_SEED_MODELS = [
    builders.mlp((8, 16, 4)).SerializeToString(),
    builders.conv_bn().SerializeToString(),
    builders.with_if_subgraph(builders.mlp((4, 8, 2))).SerializeToString(),
    builders.with_constant_nodes(builders.mlp((4, 6, 3))).SerializeToString(),
]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(_SEED_MODELS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "flip", "set", "truncate", "insert", "delete", "splice"]))
        n = len(data)
        if n == 0:
            break
        i = draw(st.integers(0, n - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[i] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x08, 0x12, 0x1A]))
        elif kind == "truncate":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        else:  # copy a chunk of the file somewhere else (field-shaped garbage)
            j = draw(st.integers(0, n - 1))
            data[j:j] = data[i:i + draw(st.integers(1, 32))]
    return bytes(data)


def _lossless_pipeline():
    return Pipeline([make_pass(c()) for c in _lossless_configs()])


@settings(FUZZ, max_examples=1500)
@given(blob=mutated())
def test_mutated_files_give_only_onnxcompress_errors(blob):
    """Load, import, run the lossless passes and export: a model or a clear OnnxCompressError."""
    from onnxcompress.context import Context

    try:
        src = open_model(blob)
        graph = model_to_graph(src)
        ctx = Context()
        ctx.original = src
        _lossless_pipeline().run(graph, ctx)
        graph_to_model(graph, src.model).SerializeToString()
    except PassError as e:  # an OnnxCompressError, but one that says "bug in onnxcompress"
        pytest.fail(f"internal error on a mutated model: {e}")
    except OnnxCompressError:
        pass


@settings(FUZZ, max_examples=100)
@given(blob=mutated())
def test_mutated_files_through_compress_and_verify(blob, tmp_path_factory):
    """The whole path, onnxruntime verification and saving included, on fewer examples."""
    out = tmp_path_factory.mktemp("m") / "o.onnx"
    try:
        res = oc.compress(blob)
        if res.passed:
            res.save(out)
            onnx.checker.check_model(str(out))
    except PassError as e:
        pytest.fail(f"internal error on a mutated model: {e}")
    except OnnxCompressError:
        assert not out.exists()


def test_mutations_do_reach_the_passes():
    """Not every mutant dies at parsing: a fair share survives to the passes (else the test proves little)."""
    survived = []

    @settings(FUZZ, max_examples=300)
    @given(blob=mutated())
    def count(blob):
        try:
            open_model(blob)
            survived.append(1)
        except OnnxCompressError:
            survived.append(0)

    count()
    assert 0.05 < sum(survived) / len(survived) < 0.95, sum(survived) / len(survived)
