"""Materializes QuantizeLinear / DequantizeLinear in one place.

Three shapes, all in the classic layout onnxruntime fuses into QLinear* kernels:

* **On an output** (``on_output``): the producer writes a fresh tensor ``t'``, and
  ``Q(t') -> DQ -> t`` writes the original tensor object, so every reader (and a graph output of
  that name) now reads the fake-quantized value ``DQ(Q(t))`` — needed after each MatMul/Gemm/Conv so
  that the output Q is fused into the integer kernel.
* **On a branch** (``on_branch``): ``Q(t) -> DQ -> t_dq`` read only by the given nodes; float readers
  of ``t`` (a residual path, a LayerNorm) keep reading the exact value.
* **Weights and bias** (``weight``, ``bias``): ``DQ(W_q, s_w[, 0], axis)`` with ``W_q`` an int8/uint8
  constant (per channel along ``axis``), and ``DQ(b_q:int32, s_x * s_w, 0)`` for Gemm/Conv bias.

Per tensor: ``Q(x) = saturate(round(x / s) + z)``, ``DQ(q) = (q - z) * s``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph.naming import Namer
from onnxcompress.graph.rewrite import replace_input, replace_output
from onnxcompress.quantize.params import QParams, quantize, quantize_bias, contiguous

__all__ = ["QDQBuilder"]


class QDQBuilder:
    """Creates Q/DQ nodes and quantized constants in one graph, with readable unique names."""

    def __init__(self, graph: gs.Graph, namer: Namer) -> None:
        self.graph = graph
        self.namer = namer
        self._weights: dict[tuple, gs.Variable] = {}
        self.count = {"QuantizeLinear": 0, "DequantizeLinear": 0}

    def _params(self, p: QParams, base: str) -> tuple[gs.Constant, gs.Constant]:
        s = np.asarray(p.scale, dtype=np.float32)
        z = np.asarray(p.zero_point).astype(p.qt.dtype)
        if p.axis is None:
            s, z = s.reshape(()), z.reshape(())
        return (gs.Constant(self.namer.fresh(base, "scale"), contiguous(s)),
                gs.Constant(self.namer.fresh(base, "zero_point"), contiguous(z)))

    def _node(self, op: str, base: str, inputs, outputs, attrs=None) -> gs.Node:
        n = gs.Node(op, name=self.namer.fresh(base, op), inputs=list(inputs), outputs=list(outputs),
                    attrs=dict(attrs or {}))
        self.graph.nodes.append(n)
        self.count[op] = self.count.get(op, 0) + 1
        return n

    def qdq(self, x: gs.Tensor, y: gs.Variable, p: QParams, base: str) -> None:
        """``Q(x) -> DQ -> y``."""
        s, z = self._params(p, base)
        q = gs.Variable(self.namer.fresh(base, "quantized"), dtype=p.qt.dtype)
        attrs = {"axis": p.axis} if p.axis is not None else {}
        self._node("QuantizeLinear", base, [x, s, z], [q], attrs)
        self._node("DequantizeLinear", base, [q, s, z], [y], attrs)

    def on_output(self, t: gs.Variable, producer: gs.Node, p: QParams) -> None:
        pre = gs.Variable(self.namer.fresh(t.name, "float"), dtype=t.dtype, shape=t.shape)
        replace_output(producer, t, pre)
        self.qdq(pre, t, p, t.name)

    def on_branch(self, t: gs.Tensor, readers: list[gs.Node], p: QParams) -> gs.Variable:
        y = gs.Variable(self.namer.fresh(t.name, "dq"), dtype=np.float32, shape=t.shape)
        self.qdq(t, y, p, t.name)
        for r in readers:
            replace_input(r, t, y)
        return y

    def weight(self, key: tuple, values: np.ndarray, p: QParams, base: str) -> gs.Variable:
        """The dequantized weight (one DQ per weight and layout, shared by its readers)."""
        if key in self._weights:
            return self._weights[key]
        q = quantize(values, p, restrict=True)
        s, z = self._params(p, base)
        qc = gs.Constant(self.namer.fresh(base, "quantized"), contiguous(q))
        y = gs.Variable(self.namer.fresh(base, "dequantized"), dtype=np.float32, shape=list(values.shape))
        attrs = {"axis": p.axis} if p.axis is not None else {}
        self._node("DequantizeLinear", base, [qc, s, z], [y], attrs)
        self._weights[key] = y
        return y

    def bias(self, values: np.ndarray, x_scale: float, w_scale: np.ndarray, base: str) -> gs.Variable:
        q, s = quantize_bias(values, x_scale, w_scale)
        s = s.reshape(-1) if s.size > 1 else s.reshape(())
        sc = gs.Constant(self.namer.fresh(base, "scale"), contiguous(s))
        zc = gs.Constant(self.namer.fresh(base, "zero_point"), np.zeros(s.shape, dtype=np.int32))
        qc = gs.Constant(self.namer.fresh(base, "quantized"), contiguous(q))
        y = gs.Variable(self.namer.fresh(base, "dequantized"), dtype=np.float32, shape=list(values.shape))
        self._node("DequantizeLinear", base, [qc, sc, zc], [y], {"axis": 0} if s.ndim else {})
        return y
