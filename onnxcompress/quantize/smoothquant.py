"""SmoothQuant-style scale migration: move activation outliers into the weights.

For a normalization ``y = LN(x) * gamma + beta`` whose output is read only by MatMul/Gemm nodes with
constant weights ``W_i`` (``[K, N]``, rows indexed by the input channel ``j``), per channel::

    s_j = max|y_j|^alpha / max_i max_n |W_i[j, n]|^(1 - alpha)       (clipped to [1e-5, 1e5])
    gamma'_j = gamma_j / s_j,  beta'_j = beta_j / s_j,  W_i'[j, :] = W_i[j, :] * s_j

so ``y' W' = y W`` exactly in real arithmetic, while ``y'`` has flatter channels (easier to
quantize per tensor) and the weights, quantized per output column, absorb the outliers. ``alpha``
sets how much moves (0.5 in the paper). ``max|y_j|`` comes from calibration (per last-axis channel).

When other ops read ``y`` too (the residual stream of a post-norm transformer), ``gamma`` and ``beta``
stay and a ``Mul(y, 1/s)`` feeds only the MatMul readers: one elementwise op, same equality.

May I? The normalization is ``LayerNormalization`` normalizing the last axis, or its decomposition
as exporters below opset 17 write it (``... Div(x - mean, Sqrt(var + eps)) -> Mul(gamma) [-> Add(beta)]``,
found from its tail: a Div by a Sqrt, then a Mul by a constant, then optionally an Add of a
constant), with constant scale (and bias) varying along the last axis only; its output is no graph
output; at least one reader is a MatMul (weight rank 2) or a Gemm (``transB`` handled) reading it as
input 0 with a constant float32 weight that nobody else reads, and every MatMul/Gemm reader is such
a one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import const_value, consumers, is_constant, is_graph_io, producer
from onnxcompress.graph.rewrite import replace_input
from onnxcompress.quantize.params import contiguous

__all__ = ["Norm", "smooth_candidates", "smooth_check", "apply_smoothing"]


@dataclass
class Norm:
    """A normalization whose output ``y`` may be smoothed: the scale ``gamma`` and the bias ``beta``
    are the constant inputs ``(node, slot)`` that make ``y`` (the bias may be absent)."""

    name: str
    y: gs.Tensor
    gamma: tuple[gs.Node, int]
    beta: tuple[gs.Node, int] | None
    node: gs.Node  # the LayerNormalization, or the decomposition's Div (for the checks)
    foldable: bool = True  # False: a value between the scale and y is read elsewhere (smooth with a Mul)


def _const_slot(node: gs.Node, other: gs.Tensor) -> int | None:
    """The slot of ``node``'s constant input beside ``other`` (a binary Mul/Add), else None."""
    if len(node.inputs) != 2 or not any(t is other for t in node.inputs):
        return None
    slot = 1 if node.inputs[0] is other else 0
    return slot if is_constant(node.inputs[slot]) else None


def _decomposed(div: gs.Node, graph: gs.Graph) -> Norm | None:
    """The decomposed LayerNorm ending at ``div`` (``x_centered / Sqrt(...)``), or None."""
    den = producer(div.inputs[1]) if len(div.inputs) == 2 else None
    if den is None or den.op != "Sqrt":
        return None
    readers = consumers(div.outputs[0])
    slot = _const_slot(readers[0], div.outputs[0]) if len(readers) == 1 and readers[0].op == "Mul" else None
    if slot is None:
        return None
    mul = readers[0]
    gamma = (mul, slot)
    y, beta, foldable = mul.outputs[0], None, True
    adds = [c for c in consumers(y) if c.op == "Add" and _const_slot(c, y) is not None]
    if len(adds) == 1:  # the bias; if the scaled value is read elsewhere too, the scale cannot take 1/s
        foldable = len(consumers(y)) == 1 and not is_graph_io(y, graph)
        beta, y = (adds[0], _const_slot(adds[0], y)), adds[0].outputs[0]
    return Norm(div.name or y.name, y, gamma, beta, div, foldable)


def smooth_candidates(graph: gs.Graph) -> list[Norm]:
    """The normalizations of ``graph``'s top level: LayerNormalization nodes and decompositions."""
    out = []
    for n in graph.nodes:
        if n.op == "LayerNormalization" and n.outputs:
            beta = (n, 2) if len(n.inputs) > 2 and n.inputs[2].name else None
            out.append(Norm(n.name or n.outputs[0].name, n.outputs[0], (n, 1), beta, n))
        elif n.op == "Div":
            norm = _decomposed(n, graph)
            if norm is not None:
                out.append(norm)
    return out


def smooth_check(norm: Norm, graph: gs.Graph) -> str | None:
    node = norm.node
    if node.op == "LayerNormalization":
        if len(node.inputs) < 2 or not is_constant(node.inputs[1]):
            return "its scale is not a constant"
        if norm.beta is not None and not is_constant(node.inputs[2]):
            return "its bias is not a constant"
        if int(node.attrs.get("axis", -1)) != -1:
            return "it does not normalize the last axis only"
    y = norm.y
    if is_graph_io(y, graph):
        return "its output is a graph output"
    readers = [r for r in consumers(y) if r.op in ("MatMul", "Gemm")]
    if not readers:
        return "no MatMul/Gemm reads its output"
    k = None
    for r in readers:
        if r.inputs[0] is not y:
            return f"{r.op} {r.name!r} reads its output as the weight"
        if not is_constant(r.inputs[1]) or len(consumers(r.inputs[1])) != 1:
            return f"{r.name!r} has a weight that is not a constant read only by it"
        w = const_value(r.inputs[1])
        if w is None or np.asarray(w).ndim != 2 or np.asarray(w).dtype != np.float32:
            return f"{r.name!r} has a weight that is not a float32 matrix"
        if r.op == "Gemm" and r.attrs.get("transA", 0):
            return f"{r.name!r} is a Gemm with transA"
        w = np.asarray(w)
        k = w.shape[1] if r.op == "Gemm" and r.attrs.get("transB", 0) else w.shape[0]
    for what, holder in (("scale", norm.gamma), ("bias", norm.beta)):
        if holder is None:
            continue
        v = np.asarray(const_value(holder[0].inputs[holder[1]]))
        if not (v.size in (1, k) and (v.ndim == 0 or all(d == 1 for d in v.shape[:-1]))):
            return f"its {what} has shape {list(v.shape)}, not one value per channel of the last axis ({k})"
    return None


def apply_smoothing(norm: Norm, graph: gs.Graph, namer: Namer, chan_absmax: np.ndarray, alpha: float) -> dict:
    """Rescale (checked by :func:`smooth_check`); return the plan entry."""
    y = norm.y
    readers = [r for r in consumers(y) if r.op in ("MatMul", "Gemm")]
    others = [r for r in consumers(y) if r.op not in ("MatMul", "Gemm")]
    mats = []
    for r in readers:
        w = np.asarray(const_value(r.inputs[1]), dtype=np.float32)
        t = bool(r.op == "Gemm" and r.attrs.get("transB", 0))
        mats.append((r, w.T if t else w, t))
    wmax = np.max(np.stack([np.abs(w).max(axis=1) for _, w, _ in mats]), axis=0)
    a = np.asarray(chan_absmax, dtype=np.float64)
    s = (np.power(np.maximum(a, 1e-8), alpha) / np.power(np.maximum(wmax, 1e-8), 1.0 - alpha))
    s = np.clip(s, 1e-5, 1e5).astype(np.float32)
    base = norm.name
    if others or not norm.foldable:  # y (or a value before it) is read elsewhere too: scale the MatMul branch
        ys = gs.Variable(namer.fresh(y.name, "smoothed"), dtype=np.float32)
        inv = gs.Constant(namer.fresh(base, "smooth_inverse"), (1.0 / s).astype(np.float32))
        graph.nodes.append(gs.Node("Mul", namer.fresh(base, "smooth_Mul"), inputs=[y, inv], outputs=[ys]))
        for r in readers:
            replace_input(r, y, ys)
    else:  # fold 1/s into the scale and the bias: each keeps its rank, one value per channel
        for holder, suffix in ((norm.gamma, "smooth_scale"), (norm.beta, "smooth_bias")):
            if holder is None:
                continue
            node, slot = holder
            v = np.asarray(const_value(node.inputs[slot]), dtype=np.float32)
            shape = v.shape if v.size == s.size else (s.size,)
            node.inputs[slot] = gs.Constant(namer.fresh(base, suffix), (v.reshape(-1) / s).reshape(shape).astype(np.float32))
    for r, w, t in mats:
        w2 = w * s[:, None]
        wname = r.inputs[1].name
        replace_input(r, r.inputs[1], gs.Constant(namer.fresh(wname, "smoothed"), contiguous(w2.T if t else w2)))
    return {"norm": base, "alpha": alpha, "readers": [r.name for r, _, _ in mats],
            "form": "mul" if others or not norm.foldable else "folded",
            "scale_min": float(s.min()), "scale_max": float(s.max())}
