"""Dynamic int8 for MatMul / Gemm: activations quantized at run time, weights int8 ahead of time.

Rule (per batch, ``x`` float32, ``W`` a constant ``[K, N]``; Gemm with ``transB=1`` uses ``B^T``)::

    x_q, s_x, z_x = DynamicQuantizeLinear(x)         # uint8, range [min(x, 0), max(x, 0)]
    W_q = round(W / s_w) (symmetric int8, s_w per output column or per tensor, z_w = 0)
    y   = Cast(MatMulInteger(x_q, W_q, z_x, z_w), float) * (s_x * s_w)   [+ C for Gemm]

which onnxruntime fuses into ``DynamicQuantizeMatMul`` (``MatMulIntegerToFloat``). The result
differs from the float product by the rounding of ``x`` and ``W`` only: per element at most
``sum_k (|x_k| s_w / 2 + |W_kn| s_x / 2 + s_x s_w / 4)``.

May I? A constant float weight of rank 2 not visible outside the graph, a float32 activation,
Gemm with ``transA=0``, ``alpha=beta=1`` and a constant ``C``. Conv is never ConvInteger (slow or
missing kernels in onnxruntime): in dynamic mode Conv weights get size-only int8 storage instead
(:mod:`onnxcompress.quantize.storage`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import const_value, is_constant, is_graph_io
from onnxcompress.graph.rewrite import disconnect
from onnxcompress.quantize.params import QType, contiguous, nonfinite_reason, quantize, weight_params

__all__ = ["dynamic_check", "quantize_dynamic_node"]


def _weight_2d(node: gs.Node) -> np.ndarray | None:
    w = const_value(node.inputs[1])
    if w is None:
        return None
    w = np.asarray(w)
    if node.op == "Gemm" and node.attrs.get("transB", 0) and w.ndim == 2:
        w = w.T
    return w


def dynamic_check(node: gs.Node, graph: gs.Graph) -> str | None:
    """None when ``node`` can be quantized dynamically, else the reason."""
    if node.op not in ("MatMul", "Gemm"):
        return f"{node.op} has no dynamic int8 form"
    if len(node.inputs) < 2 or not is_constant(node.inputs[1]):
        return "its weight is not a constant"
    if is_graph_io(node.inputs[1], graph):
        return "its weight is a graph input or output"
    w = const_value(node.inputs[1])
    if w is None or np.asarray(w).ndim != 2:
        return "its weight is not a matrix (rank 2)"
    if np.asarray(w).dtype != np.float32:
        return f"its weight is {np.asarray(w).dtype}, not float32"
    bad = nonfinite_reason(w)
    if bad:
        return bad
    x = node.inputs[0]
    if x.dtype is not None and np.dtype(x.dtype) != np.float32:
        return "its input is not float32 (DynamicQuantizeLinear reads float32 only)"
    if node.op == "Gemm":
        a = node.attrs
        if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
            return "Gemm with transA, alpha or beta other than the defaults"
        if len(node.inputs) > 2 and node.inputs[2].name and not is_constant(node.inputs[2]):
            return "Gemm bias is not a constant"
    return None


def quantize_dynamic_node(node: gs.Node, graph: gs.Graph, namer: Namer, *, weight_qt: QType,
                          per_channel: bool) -> dict:
    """Replace ``node`` (checked by :func:`dynamic_check`) by the dynamic int8 chain; return the plan entry."""
    base = node.name or node.outputs[0].name
    w = _weight_2d(node)
    p = weight_params(w, weight_qt, axis=1 if per_channel else None, symmetric=True)
    wq = quantize(w, p, restrict=True)
    x, y = node.inputs[0], node.outputs[0]

    def v(suffix, dt):
        return gs.Variable(namer.fresh(base, suffix), dtype=dt)

    def c(arr, suffix):
        return gs.Constant(namer.fresh(base, suffix), contiguous(arr))

    xq, xs, xz = v("x_quantized", np.uint8), v("x_scale", np.float32), v("x_zero_point", np.uint8)
    acc, accf, scale = v("int32", np.int32), v("int32_float", np.float32), v("scale", np.float32)
    s_w = np.asarray(p.scale, np.float32).reshape(-1) if per_channel else np.asarray(p.scale, np.float32).reshape(())
    z_w = np.asarray(p.zero_point).astype(weight_qt.dtype)
    z_w = z_w.reshape(-1) if per_channel else z_w.reshape(())
    has_bias = node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name
    out = v("product", np.float32) if has_bias else y
    nodes = [
        gs.Node("DynamicQuantizeLinear", namer.fresh(base, "DynamicQuantizeLinear"), inputs=[x], outputs=[xq, xs, xz]),
        gs.Node("MatMulInteger", namer.fresh(base, "MatMulInteger"),
                inputs=[xq, c(wq, "weight_quantized"), xz, c(z_w, "weight_zero_point")], outputs=[acc]),
        gs.Node("Cast", namer.fresh(base, "Cast"), attrs={"to": TensorProto.FLOAT}, inputs=[acc], outputs=[accf]),
        gs.Node("Mul", namer.fresh(base, "scale_Mul"), inputs=[xs, c(s_w, "weight_scale")], outputs=[scale]),
        gs.Node("Mul", namer.fresh(base, "Mul"), inputs=[accf, scale], outputs=[out]),
    ]
    if has_bias:
        nodes.append(gs.Node("Add", namer.fresh(base, "bias_Add"), inputs=[out, node.inputs[2]], outputs=[y]))
    disconnect(node)
    graph.nodes.extend(nodes)
    return {"form": "dynamic", "weight_type": weight_qt.name, "per_channel": per_channel,
            "scales": int(s_w.size), "shape": list(w.shape)}
