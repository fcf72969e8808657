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

May I? The normalization is ``LayerNormalization`` with constant scale (and bias), normalizing the
last axis; its output is no graph output; at least one reader is a MatMul (weight rank 2) or a Gemm
(``transB`` handled) reading it as input 0 with a constant float32 weight that nobody else reads, and
every MatMul/Gemm reader is such a one.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import const_value, consumers, is_constant, is_graph_io
from onnxcompress.graph.rewrite import replace_input
from onnxcompress.quantize.params import contiguous

__all__ = ["smooth_candidates", "smooth_check", "apply_smoothing"]


def smooth_candidates(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == "LayerNormalization"]


def smooth_check(ln: gs.Node, graph: gs.Graph) -> str | None:
    if len(ln.inputs) < 2 or not is_constant(ln.inputs[1]):
        return "its scale is not a constant"
    if len(ln.inputs) > 2 and ln.inputs[2].name and not is_constant(ln.inputs[2]):
        return "its bias is not a constant"
    if int(ln.attrs.get("axis", -1)) != -1:
        return "it does not normalize the last axis only"
    y = ln.outputs[0]
    if is_graph_io(y, graph):
        return "its output is a graph output"
    readers = [r for r in consumers(y) if r.op in ("MatMul", "Gemm")]
    if not readers:
        return "no MatMul/Gemm reads its output"
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
    return None


def apply_smoothing(ln: gs.Node, graph: gs.Graph, namer: Namer, chan_absmax: np.ndarray, alpha: float) -> dict:
    """Rescale (checked by :func:`smooth_check`); return the plan entry."""
    y = ln.outputs[0]
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
    base = ln.name or y.name
    if others:  # the normalization's output is read elsewhere too: scale only the MatMul branch
        ys = gs.Variable(namer.fresh(y.name, "smoothed"), dtype=np.float32)
        inv = gs.Constant(namer.fresh(base, "smooth_inverse"), (1.0 / s).astype(np.float32))
        graph.nodes.append(gs.Node("Mul", namer.fresh(base, "smooth_Mul"), inputs=[y, inv], outputs=[ys]))
        for r in readers:
            replace_input(r, y, ys)
    else:
        gamma = np.asarray(const_value(ln.inputs[1]), dtype=np.float32)
        replace_input(ln, ln.inputs[1], gs.Constant(namer.fresh(base, "smooth_scale"), (gamma / s).astype(np.float32)))
        if len(ln.inputs) > 2 and ln.inputs[2].name:
            beta = np.asarray(const_value(ln.inputs[2]), dtype=np.float32)
            replace_input(ln, ln.inputs[2], gs.Constant(namer.fresh(base, "smooth_bias"), (beta / s).astype(np.float32)))
    for r, w, t in mats:
        w2 = w * s[:, None]
        wname = r.inputs[1].name
        replace_input(r, r.inputs[1], gs.Constant(namer.fresh(wname, "smoothed"), contiguous(w2.T if t else w2)))
    return {"norm": base, "alpha": alpha, "readers": [r.name for r, _, _ in mats], "form": "mul" if others else "folded",
            "scale_min": float(s.min()), "scale_max": float(s.max())}
