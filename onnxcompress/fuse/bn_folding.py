"""Fold BatchNormalization (inference form) into the neighbouring Conv / ConvTranspose / Gemm / MatMul.

In inference form ``BN(z) = s * z + t`` per channel (axis 1), with

    s = gamma / sqrt(var + eps)        t = beta - mean * s

**After a linear layer** (``BnAfterLinear``): ``z = W x + B`` with output channels ``o``:

    W'[o] = W[o] * s[o]               B' = (B - mean) * s + beta  ( = B * s + t )

The output-channel axis is axis 0 of a Conv weight ``[O, I/g, k...]``, axis 1 of each group of a
ConvTranspose weight ``[I, O/g, k...]``, and the column of a MatMul/Gemm weight in normal form
``[K, N]`` — for MatMul/Gemm only when the output is 2-D, because BN normalizes axis 1 and that is
the feature axis only for ``[batch, N]``. A MatMul becomes MatMul + Add(B') (the MatMul+Add → Gemm
rule of ``linear_merge`` then makes it a Gemm where the input is 2-D).

**Before a linear layer** (``BnBeforeLinear``, the other direction): ``y = W (s * x + t) + B``:

    W'[:, c] = W[:, c] * s[c]         B' = B + sum_{c, k} W[:, c, k] * t[c]

Valid for a Gemm/MatMul whose input is 2-D (axis 1 = K) and for a Conv with ``group == 1`` and no
padding (a padded border holds 0, not ``t``, so the shift would be wrong there).

May I? BN is in inference form (``training_mode = 0``, no running-statistics outputs in use,
``spatial = 1``); its four parameters are constants; the tensor between the two nodes has one reader
and is not a graph output; the linear layer's weight and bias are constants only it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.fuse.patterns import (
    FuseRule,
    as_linear,
    emit_linear,
    is_float,
    conv_params_private,
    sole_reader,
    weights_private,
)
from onnxcompress.graph.query import const_value, producer
from onnxcompress.graph.rewrite import Verdict, disconnect

__all__ = ["BnAfterLinear", "BnBeforeLinear", "bn_affine", "bn_inference_check"]

_LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def bn_inference_check(bn: gs.Node) -> Verdict:
    """May this BatchNormalization be treated as ``s * x + t``?"""
    if int(bn.attrs.get("training_mode", 0)):
        return Verdict.no("BatchNormalization is in training mode (training_mode=1)")
    if "is_test" in bn.attrs and not int(bn.attrs["is_test"]):
        return Verdict.no("BatchNormalization is in training mode (is_test=0)")
    if not int(bn.attrs.get("spatial", 1)):
        return Verdict.no("BatchNormalization with spatial=0 normalizes per element, not per channel")
    if any(o.outputs for o in bn.outputs[1:]):
        return Verdict.no("BatchNormalization's running statistics outputs are used")
    if len(bn.inputs) < 5:
        return Verdict.no("BatchNormalization has fewer than five inputs")
    for t, what in zip(bn.inputs[1:5], ("scale", "bias", "mean", "var")):
        v = const_value(t)
        if v is None:
            return Verdict.no(f"BatchNormalization's {what} {t.name!r} is not a constant")
        if not is_float(np.asarray(v)):
            return Verdict.no(f"BatchNormalization's {what} is not float")
    return Verdict.yes()


def bn_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` with ``BN(x) = s * x + t`` per channel, computed in float64."""
    gamma, beta, mean, var = (np.asarray(const_value(t), dtype=np.float64).reshape(-1) for t in bn.inputs[1:5])
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


@dataclass
class _Pair:
    bn: gs.Node
    layer: gs.Node


def _conv_pads_zero(node: gs.Node) -> bool:
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return False
    return not any(int(p) for p in node.attrs.get("pads", []))


class BnAfterLinear(FuseRule):
    """Conv / ConvTranspose / Gemm / MatMul → BatchNormalization  ⇒  one layer with scaled weights."""

    name = "bn_after_linear"

    def match(self, node: gs.Node, graph: gs.Graph) -> _Pair | None:
        if node.op != "BatchNormalization" or not node.inputs:
            return None
        p = producer(node.inputs[0])
        if p is None or p.op not in _LINEAR_OPS:
            return None
        return _Pair(node, p)

    def check(self, m: _Pair, graph: gs.Graph) -> Verdict:
        for v in (bn_inference_check(m.bn), sole_reader(m.bn.inputs[0], m.bn, graph)):
            if not v:
                return v
        layer = m.layer
        if len(layer.outputs) != 1:
            return Verdict.no(f"{layer.op} has several outputs")
        if layer.op in ("Gemm", "MatMul"):
            lin, why = as_linear(layer, graph)
            if lin is None:
                return Verdict.no(why)
            if self.rc.rank(layer.outputs[0]) != 2:
                return Verdict.no(f"the {layer.op} output is not known to be 2-D, so BatchNormalization's "
                                  "channel axis is not its feature axis")
            if np.asarray(const_value(m.bn.inputs[1])).size != lin.n:
                return Verdict.no("channel count mismatch")
            return weights_private(lin, graph)
        v = conv_params_private(layer, graph)
        if not v:
            return v
        w = np.asarray(const_value(layer.inputs[1]))
        out_ch = w.shape[0] if layer.op == "Conv" else w.shape[1] * int(layer.attrs.get("group", 1))
        if np.asarray(const_value(m.bn.inputs[1])).size != out_ch:
            return Verdict.no("channel count mismatch")
        return Verdict.yes()

    def rewrite(self, m: _Pair, graph: gs.Graph, ctx) -> str:
        rc, bn, layer = self.rc, m.bn, m.layer
        s, t = bn_affine(bn)
        y = bn.outputs[0]
        if layer.op in ("Conv", "ConvTranspose"):
            w = np.asarray(const_value(layer.inputs[1]))
            dt = w.dtype
            has_b = len(layer.inputs) > 2 and layer.inputs[2].name
            b = np.asarray(const_value(layer.inputs[2]), np.float64) if has_b else np.zeros(len(s))
            if layer.op == "Conv":
                w2 = w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
            else:
                g = int(layer.attrs.get("group", 1))
                wg = w.astype(np.float64).reshape((g, w.shape[0] // g) + w.shape[1:])
                w2 = (wg * s.reshape((g, 1, w.shape[1]) + (1,) * (w.ndim - 2))).reshape(w.shape)
            b2 = b * s + t
            wc = rc.updated(layer.inputs[1], "bnfold", w2, dt)
            bc = rc.updated(layer.inputs[2] if has_b else None, "bias_bnfold", b2, dt, layer.inputs[1].name)
            inputs = [layer.inputs[0], wc, bc]
            attrs = dict(layer.attrs)
            disconnect(bn)
            disconnect(layer)
            rc.node(graph, layer.op, layer.name or layer.op, inputs, [y], attrs, keep=layer)
            return f"BatchNormalization {bn.name} folded into {layer.op} {layer.name}"
        lin, _ = as_linear(layer, graph)
        b = lin.bias.astype(np.float64) if lin.bias is not None else np.zeros(lin.n)
        disconnect(bn)
        disconnect(layer)
        emit_linear(rc, graph, lin, lin.x, lin.w.astype(np.float64) * s[None, :], b * s + t, y, "bnfold")
        return f"BatchNormalization {bn.name} folded into {layer.op} {layer.name}"


class BnBeforeLinear(FuseRule):
    """BatchNormalization → Conv (group 1, no padding) / Gemm / MatMul (2-D input)  ⇒  one layer."""

    name = "bn_before_linear"

    def match(self, node: gs.Node, graph: gs.Graph) -> _Pair | None:
        if node.op not in ("Conv", "Gemm", "MatMul") or not node.inputs:
            return None
        p = producer(node.inputs[0])
        if p is None or p.op != "BatchNormalization":
            return None
        return _Pair(p, node)

    def check(self, m: _Pair, graph: gs.Graph) -> Verdict:
        for v in (bn_inference_check(m.bn), sole_reader(m.bn.outputs[0], m.layer, graph)):
            if not v:
                return v
        if any(t is m.bn.outputs[0] for t in m.layer.inputs[1:]):
            return Verdict.no("the normalized tensor is also the weight")
        layer = m.layer
        c = np.asarray(const_value(m.bn.inputs[1])).size
        if layer.op == "Conv":
            if int(layer.attrs.get("group", 1)) != 1:
                return Verdict.no("Conv with group > 1")
            if not _conv_pads_zero(layer):
                return Verdict.no("Conv pads its input with zeros, which BatchNormalization's shift would not reach")
            v = conv_params_private(layer, graph)
            if not v:
                return v
            if np.asarray(const_value(layer.inputs[1])).shape[1] != c:
                return Verdict.no("channel count mismatch")
            return Verdict.yes()
        lin, why = as_linear(layer, graph)
        if lin is None:
            return Verdict.no(why)
        if self.rc.rank(lin.x) != 2:
            return Verdict.no(f"the {layer.op} input is not known to be 2-D")
        if lin.k != c:
            return Verdict.no("channel count mismatch")
        return weights_private(lin, graph)

    def rewrite(self, m: _Pair, graph: gs.Graph, ctx) -> str:
        rc, bn, layer = self.rc, m.bn, m.layer
        s, t = bn_affine(bn)
        x = bn.inputs[0]
        y = layer.outputs[0]
        base = layer.name or layer.op
        if layer.op == "Conv":
            w = np.asarray(const_value(layer.inputs[1]))
            dt = w.dtype
            w64 = w.astype(np.float64)
            has_b = len(layer.inputs) > 2 and layer.inputs[2].name
            b = np.asarray(const_value(layer.inputs[2]), np.float64) if has_b else np.zeros(w.shape[0])
            w2 = w64 * s.reshape((1, -1) + (1,) * (w.ndim - 2))
            b2 = b + w64.sum(axis=tuple(range(2, w.ndim))) @ t
            attrs = dict(layer.attrs)
            wc = rc.updated(layer.inputs[1], "bnfold", w2, dt)
            bc = rc.updated(layer.inputs[2] if has_b else None, "bias_bnfold", b2, dt, layer.inputs[1].name)
            disconnect(bn)
            disconnect(layer)
            rc.node(graph, "Conv", base, [x, wc, bc], [y], attrs, keep=layer)
            return f"BatchNormalization {bn.name} folded into the following Conv {layer.name}"
        lin, _ = as_linear(layer, graph)
        w64 = lin.w.astype(np.float64)
        b = lin.bias.astype(np.float64) if lin.bias is not None else np.zeros(lin.n)
        disconnect(bn)
        disconnect(layer)
        emit_linear(rc, graph, lin, x, w64 * s[:, None], b + t @ w64, y, "bnfold")
        return f"BatchNormalization {bn.name} folded into the following {layer.op} {layer.name}"
