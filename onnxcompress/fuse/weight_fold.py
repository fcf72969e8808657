"""Fold constant transposes and constant scalings into the neighbouring weight.

``transpose_constant``
    ``Transpose(W)`` of a constant ``W`` becomes the constant ``W.transpose(perm)`` — only when the
    Transpose is ``W``'s only reader, so the file never holds both layouts.

``scale_after_linear``
    ``(x @ W + b) * c = x @ (W * c) + b * c`` and ``/ c`` is ``* (1 / c)`` — also when the bias is a
    separate constant ``Add`` between a MatMul/Gemm and the scaling — for a constant ``c`` that
    broadcasts only along the output-feature axis (scalar, ``[N]``, ``[1, ..., N]`` for MatMul/Gemm;
    scalar, ``[O, 1, 1]``, ``[1, O, 1, 1]`` for Conv, where ``W'[o] = W[o] * c[o]``).

``scale_before_linear``
    ``(x * c) @ W + b = x @ (c[:, None] * W) + b`` for ``c`` broadcasting along the input-feature axis
    (the last axis of ``x``); for a Conv with group 1, ``W'[:, i] = W[:, i] * c[i]`` (exact with any
    padding: the padded zeros stay zero under scaling).

May I? The scaling node's other operand is a constant (for Div, the divisor, with no zeros); the
tensor between the two nodes has one reader and is not a graph output; the weight and bias are
constants only the layer reads; ``c`` has no more dimensions than the tensor it scales (else the
output shape would change).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.fuse.patterns import (
    FuseRule,
    Linear,
    RuleContext,
    as_linear,
    bias_add_after,
    conv_params_private,
    channel_vector,
    emit_linear,
    is_float,
    last_axis_vector,
    own_constant,
    sole_reader,
    weights_private,
)
from onnxcompress.graph.query import const_value, is_graph_io, iter_graphs, producer
from onnxcompress.graph.rewrite import Rule, Verdict, disconnect

__all__ = ["TransposeConstant", "ScaleAfterLinear", "ScaleBeforeLinear"]


class TransposeConstant(Rule[gs.Node]):
    name = "transpose_constant"

    def match(self, node: gs.Node, graph: gs.Graph) -> gs.Node | None:
        if node.op != "Transpose" or len(node.inputs) != 1:
            return None
        return node if const_value(node.inputs[0]) is not None else None

    def check(self, node: gs.Node, graph: gs.Graph) -> Verdict:
        v = own_constant(node.inputs[0], node, graph, "transposed constant")
        if not v:
            return Verdict.no(f"{v.reason}; folding would store it twice")
        if any(is_graph_io(node.outputs[0], g) for g in iter_graphs(graph)):
            return Verdict.no("the transposed tensor is a graph output")
        return Verdict.yes()

    def rewrite(self, node: gs.Node, graph: gs.Graph, ctx) -> str:
        v = np.asarray(const_value(node.inputs[0]))
        perm = node.attrs.get("perm")
        out = node.outputs[0]
        disconnect(node)
        out.to_constant(np.ascontiguousarray(np.transpose(v, perm)))
        return f"Transpose {node.name} of a constant folded into {out.name}"


@dataclass
class _Scale:
    scale: gs.Node            # the Mul or Div
    c: gs.Tensor              # its constant operand
    x: gs.Tensor              # its other operand
    layer: gs.Node
    lin: Linear | None = None
    vec: np.ndarray | None = None
    bias_add: gs.Node | None = None   # scale_after_linear: an Add(bias) between the layer and the scaling
    bias: np.ndarray | None = None


def _scale_operands(node: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    """``(x, c)`` for ``Mul(x, c)``, ``Mul(c, x)``, ``Div(x, c)`` with a constant ``c``."""
    if node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if const_value(b) is not None and const_value(a) is None:
        return a, b
    if node.op == "Mul" and const_value(a) is not None and const_value(b) is None:
        return b, a
    return None


def _factor(m: _Scale) -> Verdict:
    c = np.asarray(const_value(m.c))
    if not is_float(c):
        return Verdict.no(f"the constant {m.c.name!r} is not float")
    if m.scale.op == "Div" and np.any(c == 0):
        return Verdict.no("division by a constant holding zeros")
    return Verdict.yes()


def _vector(m: _Scale, n: int, rank: int | None, conv: bool) -> np.ndarray | None:
    c = np.asarray(const_value(m.c), np.float64)
    vec = channel_vector(c, n, rank) if conv and rank is not None else \
        (None if conv else last_axis_vector(c, n, rank))
    if vec is None:
        return None
    return 1.0 / vec if m.scale.op == "Div" else vec


def _layer_ok(m: _Scale, graph: gs.Graph) -> Verdict:
    layer = m.layer
    if layer.op == "Conv":
        return conv_params_private(layer, graph)
    m.lin, why = as_linear(layer, graph)
    if m.lin is None:
        return Verdict.no(why)
    return weights_private(m.lin, graph)


def _rewrite_conv(rc: RuleContext, graph: gs.Graph, layer: gs.Node, x: gs.Tensor, out: gs.Tensor,
                  w: np.ndarray, b: np.ndarray | None, suffix: str) -> None:
    dt = np.asarray(const_value(layer.inputs[1])).dtype
    inputs = [x, rc.updated(layer.inputs[1], suffix, w, dt)]
    if b is not None:
        inputs.append(rc.updated(layer.inputs[2], f"bias_{suffix}", b, dt))
    attrs = dict(layer.attrs)
    disconnect(layer)
    rc.node(graph, "Conv", layer.name or "Conv", inputs, [out], attrs, keep=layer)


def _conv_bias(layer: gs.Node) -> np.ndarray | None:
    if len(layer.inputs) > 2 and layer.inputs[2].name:
        return np.asarray(const_value(layer.inputs[2]), np.float64)
    return None


class _ScaleRule(FuseRule):
    """Shared body of the two scaling rules; ``after`` says which side of the layer the scaling is on."""

    after: bool = True

    def check(self, m: _Scale, graph: gs.Graph) -> Verdict:
        between = (m.x, m.scale) if self.after else (m.scale.outputs[0], m.layer)
        for v in (_factor(m), sole_reader(*between, graph), _layer_ok(m, graph)):
            if not v:
                return v
        if m.bias_add is not None:
            if m.layer.op == "Conv":
                return Verdict.no("a Conv followed by Add")
            found = bias_add_after(m.layer.outputs[0], m.lin.n, self.rc.rank(m.layer.outputs[0]), graph)
            if found is None or found[0] is not m.bias_add:
                return Verdict.no("the Add between the layer and the scaling does not add a constant per-column "
                                  "vector to the layer's only output reader")
            m.bias = found[1].astype(np.float64)
        if not self.after and any(t is m.scale.outputs[0] for t in m.layer.inputs[1:]):
            return Verdict.no("the scaled tensor is also the weight")
        rank = self.rc.rank(m.x)
        side = "output" if self.after else "input"
        if m.layer.op == "Conv":
            if not self.after and int(m.layer.attrs.get("group", 1)) != 1:
                return Verdict.no("Conv with group > 1")
            w = np.asarray(const_value(m.layer.inputs[1]))
            m.vec = _vector(m, w.shape[0 if self.after else 1], rank if rank is not None else w.ndim, conv=True)
        else:
            m.vec = _vector(m, m.lin.n if self.after else m.lin.k, rank, conv=False)
        if m.vec is None:
            return Verdict.no(f"the constant of shape {list(np.shape(const_value(m.c)))} does not broadcast "
                              f"along the {side}-feature axis only, or the rank is unknown")
        return Verdict.yes()

    def rewrite(self, m: _Scale, graph: gs.Graph, ctx) -> str:
        out = (m.scale if self.after else m.layer).outputs[0]
        x = m.layer.inputs[0] if self.after else m.x
        disconnect(m.scale)
        if m.bias_add is not None:
            disconnect(m.bias_add)
        s = m.vec
        if m.layer.op == "Conv":
            w = np.asarray(const_value(m.layer.inputs[1]), np.float64)
            b = _conv_bias(m.layer)
            shape = ((-1,) if self.after else (1, -1)) + (1,) * (w.ndim - (1 if self.after else 2))
            b2 = b * s if self.after and b is not None else b
            _rewrite_conv(self.rc, graph, m.layer, x, out, w * s.reshape(shape), b2, "scaled")
        else:
            lin = m.lin
            disconnect(lin.node)
            w2 = lin.w.astype(np.float64) * (s[None, :] if self.after else s[:, None])
            b = None if lin.bias is None else lin.bias.astype(np.float64)
            if m.bias is not None:
                b = m.bias if b is None else b + m.bias
            b2 = None if b is None else b * (s if self.after else 1.0)
            emit_linear(self.rc, graph, lin, x, w2, b2, out, "scaled")
        return f"{m.scale.op} {m.scale.name} folded into the weight of {m.layer.op} {m.layer.name}"


class ScaleAfterLinear(_ScaleRule):
    name = "scale_after_linear"
    after = True

    def match(self, node: gs.Node, graph: gs.Graph) -> _Scale | None:
        ops = _scale_operands(node)
        if ops is None:
            return None
        p = producer(ops[0])
        if p is not None and p.op == "Add":  # (x W + b) * c: look through the bias Add
            layer = next((producer(t) for t in p.inputs if producer(t) is not None
                          and producer(t).op in ("MatMul", "Gemm")), None)
            return _Scale(node, ops[1], ops[0], layer, bias_add=p) if layer is not None else None
        if p is None or p.op not in ("MatMul", "Gemm", "Conv"):
            return None
        return _Scale(node, ops[1], ops[0], p)


class ScaleBeforeLinear(_ScaleRule):
    name = "scale_before_linear"
    after = False

    def match(self, node: gs.Node, graph: gs.Graph) -> _Scale | None:
        if node.op not in ("MatMul", "Gemm", "Conv") or not node.inputs:
            return None
        p = producer(node.inputs[0])
        if p is None:
            return None
        ops = _scale_operands(p)
        if ops is None:
            return None
        return _Scale(p, ops[1], ops[0], node)
