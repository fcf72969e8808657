"""Shared questions and edits for the merge rules: linear layers as (x, W[K, N], bias), ranks, new nodes.

The merge rules (:mod:`bn_folding`, :mod:`linear_merge`, :mod:`weight_fold`) all look at the same
three layer kinds — MatMul, Gemm, Conv — and ask the same "may I?" questions: is the weight a
constant that only this node reads, is the intermediate tensor read once and invisible outside the
graph, what is the rank of an activation. This module answers them once.

**Gemm normal form.** ``Gemm(A, B, C; alpha, beta, transA=0, transB)`` computes
``A @ W + bias`` with ``W = alpha * (B.T if transB else B)`` (shape ``[K, N]``) and
``bias = beta * C``. Rules rewrite Gemms through this normal form, so alpha and beta are folded
into the new weights and the new Gemm has ``alpha = beta = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import FLOAT_DTYPES, const_value, consumers, is_graph_io, iter_graphs
from onnxcompress.graph.rewrite import Rule, Verdict

__all__ = ["Linear", "RuleContext", "as_linear", "sole_reader", "own_constant", "infer_ranks",
           "last_axis_vector", "channel_vector", "is_float", "weights_private", "emit_linear", "FuseRule", "conv_params_private", "bias_add_after", "other_operand"]


def is_float(a: np.ndarray | None) -> bool:
    return a is not None and a.dtype in FLOAT_DTYPES


@dataclass
class RuleContext:
    """What the rules share during one run of the ``fuse`` pass: names, known ranks, the opset."""

    namer: Namer
    ranks: dict[str, int]
    opset: int

    def rank(self, t: gs.Tensor) -> int | None:
        if t.shape is not None:
            return len(t.shape)
        return self.ranks.get(t.name)

    def constant(self, base: str, suffix: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.namer.fresh(base, suffix), np.ascontiguousarray(values))

    def updated(self, old: gs.Tensor | None, suffix: str, values: np.ndarray, dtype,
                base: str = "weight") -> gs.Constant:
        """``values`` as a constant: written into ``old`` (keeping its name) when ``old`` is an initializer
        of the same size — callers have checked that only the rewritten node reads it — else a new one."""
        values = np.asarray(values).astype(dtype)
        if isinstance(old, gs.Constant) and tuple(old.shape) and int(np.prod(old.shape)) == values.size:
            old.values = np.ascontiguousarray(values.reshape(old.shape))
            return old
        return self.constant(old.name if old is not None else base, suffix, values)

    def variable(self, base: str, suffix: str, like: gs.Tensor, rank: int | None = None) -> gs.Variable:
        v = gs.Variable(self.namer.fresh(base, suffix), dtype=getattr(like, "dtype", None))
        if rank is not None:
            self.ranks[v.name] = rank
        return v

    def node(self, graph: gs.Graph, op: str, base: str, inputs, outputs, attrs=None, *,
             keep: gs.Node | None = None) -> gs.Node:
        """A new node; ``keep`` is the (disconnected) node it replaces, whose name it takes over so
        names and doc strings survive the rewrite."""
        name = keep.name if keep is not None and keep.name else self.namer.fresh(base, op.lower())
        n = gs.Node(op, name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=list(outputs))
        graph.nodes.append(n)
        return n


def infer_ranks(graph: gs.Graph) -> dict[str, int]:
    """Tensor name -> rank from ONNX shape inference (empty when inference fails, e.g. > 2 GB)."""
    ranks: dict[str, int] = {}
    try:
        light = graph.copy()
        for g in iter_graphs(light):
            for t in list(g.tensors().values()):
                # large float weights only matter by their shape: export them as typed values, not bytes
                if isinstance(t, gs.Constant) and t.dtype in FLOAT_DTYPES and int(np.prod(t.shape)) > 4096:
                    t.to_variable(dtype=t.dtype, shape=list(t.shape))
                    t.type = "tensor_type"
        model = gs.export_onnx(light, do_type_check=False)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is best effort: unknown ranks make rules decline
        return ranks

    from onnxcompress.graph.io import iter_graph_protos

    for g in iter_graph_protos(model.graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            tt = vi.type.tensor_type
            if tt.HasField("shape"):
                ranks[vi.name] = len(tt.shape.dim)
        for init in g.initializer:
            ranks[init.name] = len(init.dims)
    return ranks


def sole_reader(t: gs.Tensor, node: gs.Node, graph: gs.Graph) -> Verdict:
    """May ``node`` consume ``t`` away? Only when it is the one reader and ``t`` is not graph I/O."""
    readers = consumers(t)
    if len(readers) != 1 or readers[0] is not node:
        return Verdict.no(f"{t.name!r} has {len(readers)} readers")
    for g in iter_graphs(graph):
        if is_graph_io(t, g):
            return Verdict.no(f"{t.name!r} is a graph input or output")
    return Verdict.yes()


def own_constant(t: gs.Tensor, node: gs.Node, graph: gs.Graph, what: str = "weight") -> Verdict:
    """Is ``t`` a float constant that only ``node`` reads (so rewriting it changes nobody else)?"""
    v = const_value(t)
    if v is None:
        return Verdict.no(f"the {what} {t.name!r} is not a constant")
    if not is_float(np.asarray(v)):
        return Verdict.no(f"the {what} {t.name!r} is {np.asarray(v).dtype}, not float")
    readers = consumers(t)
    if any(r is not node for r in readers):
        return Verdict.no(f"the {what} {t.name!r} is shared with {len(readers) - 1} other node(s)")
    for g in iter_graphs(graph):
        if is_graph_io(t, g):
            return Verdict.no(f"the {what} {t.name!r} is a graph input or output")
    return Verdict.yes()


def last_axis_vector(c: np.ndarray, n: int, max_rank: int | None) -> np.ndarray | None:
    """``c`` as a length-``n`` vector if it only broadcasts along the last axis (scalar, [n], [1,..,n]).

    ``max_rank`` is the rank of the tensor it is combined with: a constant of higher rank would
    change the result's shape. Returns None when ``c`` is not such a vector.
    """
    c = np.asarray(c)
    if max_rank is None and c.ndim > 1:
        return None
    if max_rank is not None and c.ndim > max_rank:
        return None
    if c.size == 1:
        return np.full((n,), c.reshape(()), dtype=c.dtype)
    if c.shape[-1] != n or any(d != 1 for d in c.shape[:-1]):
        return None
    return c.reshape(n)


def channel_vector(c: np.ndarray, n: int, rank: int) -> np.ndarray | None:
    """``c`` as a length-``n`` vector if it broadcasts along axis 1 of a rank-``rank`` NCHW tensor."""
    c = np.asarray(c)
    if c.ndim > rank:
        return None
    if c.size == 1:
        return np.full((n,), c.reshape(()), dtype=c.dtype)
    full = (1,) * (rank - c.ndim) + c.shape
    if full[1] != n or any(d != 1 for i, d in enumerate(full) if i != 1):
        return None
    return c.reshape(n)


@dataclass
class Linear:
    """A MatMul or Gemm with a constant weight, in normal form ``y = x @ W + bias``."""

    node: gs.Node
    x: gs.Tensor
    w: np.ndarray           # [K, N], alpha folded in
    bias: np.ndarray | None  # [N] (beta folded in) or None
    w_tensor: gs.Tensor
    b_tensor: gs.Tensor | None

    @property
    def k(self) -> int:
        return int(self.w.shape[0])

    @property
    def n(self) -> int:
        return int(self.w.shape[1])


def as_linear(node: gs.Node, graph: gs.Graph) -> tuple[Linear | None, str]:
    """``node`` as a :class:`Linear` (MatMul/Gemm, 2-D constant weight, vector bias) or a reason."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None, "not a MatMul or Gemm"
    x, wt = node.inputs[0], node.inputs[1]
    w = const_value(wt)
    if w is None:
        return None, f"the weight {wt.name!r} is not a constant"
    w = np.asarray(w)
    if w.ndim != 2 or not is_float(w):
        return None, f"the weight {wt.name!r} is not a 2-D float matrix"
    if not np.isfinite(w).all():  # products with it would move NaNs around (inf · 0), not preserve them
        return None, f"the weight {wt.name!r} holds NaN or Inf values"
    if node.op == "MatMul":
        return Linear(node, x, w, None, wt, None), ""
    if int(node.attrs.get("transA", 0)):
        return None, "Gemm with transA=1"
    alpha = float(node.attrs.get("alpha", 1.0))
    beta = float(node.attrs.get("beta", 1.0))
    if not (math.isfinite(alpha) and math.isfinite(beta)):
        return None, f"Gemm alpha={alpha:g} / beta={beta:g} is not finite"
    w_eff = (w.T if int(node.attrs.get("transB", 0)) else w) * np.asarray(alpha, dtype=w.dtype)
    bias, bt = None, None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bt = node.inputs[2]
        c = const_value(bt)
        if c is None:
            return None, f"the bias {bt.name!r} is not a constant"
        vec = last_axis_vector(np.asarray(c), w_eff.shape[1], 2)
        if vec is None:
            return None, f"the bias {bt.name!r} of shape {list(np.shape(c))} is not a per-column vector"
        bias = vec * np.asarray(beta, dtype=vec.dtype)
    return Linear(node, x, w_eff.astype(w.dtype), bias, wt, bt), ""


def other_operand(add: gs.Node, x: gs.Tensor) -> gs.Tensor | None:
    """The other operand of a binary node whose one operand is ``x``."""
    if len(add.inputs) != 2:
        return None
    a, b = add.inputs
    if a is x and b is not x:
        return b
    if b is x and a is not x:
        return a
    return None


def bias_add_after(t: gs.Tensor, n: int, rank: int | None, graph: gs.Graph) -> tuple[gs.Node, np.ndarray] | None:
    """The Add that is the only reader of ``t`` and adds a constant per-column vector of length ``n``."""
    readers = consumers(t)
    if len(readers) != 1 or readers[0].op != "Add" or not sole_reader(t, readers[0], graph):
        return None
    add = readers[0]
    other = other_operand(add, t)
    if other is None:
        return None
    c = const_value(other)
    if c is None or not is_float(np.asarray(c)):
        return None
    vec = last_axis_vector(np.asarray(c), n, rank)
    return (add, vec) if vec is not None else None


def conv_params_private(node: gs.Node, graph: gs.Graph) -> Verdict:
    """A Conv's weight (and bias, if any) are constants only ``node`` reads."""
    for i, what in ((1, "weight"), (2, "bias")):
        if len(node.inputs) > i and node.inputs[i].name:
            v = own_constant(node.inputs[i], node, graph, what)
            if not v:
                return v
    return Verdict.yes()


def weights_private(lin: Linear, graph: gs.Graph) -> Verdict:
    """The weight (and the bias) of ``lin`` are constants only ``lin.node`` reads."""
    v = own_constant(lin.w_tensor, lin.node, graph)
    if not v:
        return v
    if lin.b_tensor is not None:
        return own_constant(lin.b_tensor, lin.node, graph, "bias")
    return Verdict.yes()


def emit_linear(rc: RuleContext, graph: gs.Graph, like: Linear, x: gs.Tensor, w: np.ndarray,
                bias: np.ndarray | None, out: gs.Tensor, suffix: str) -> None:
    """Write ``out = x @ w + bias`` in the form of ``like``: a Gemm (transB=0, alpha=beta=1), or a
    MatMul followed by an Add when there is a bias. ``like.node`` must already be disconnected."""
    dt = like.w.dtype
    base = like.node.name or like.node.op
    trans_b = like.node.op == "Gemm" and int(like.node.attrs.get("transB", 0))
    w = np.asarray(w)
    wc = rc.updated(like.w_tensor, suffix, w.T if trans_b else w, dt)
    bc = None
    if bias is not None:
        bc = rc.updated(like.b_tensor, f"bias_{suffix}", bias, dt) if like.b_tensor is not None else \
            rc.constant(like.w_tensor.name, f"bias_{suffix}", np.asarray(bias).astype(dt))
    if like.node.op == "Gemm":
        rc.node(graph, "Gemm", base, [x, wc] + ([bc] if bc is not None else []), [out],
                {"transA": 0, "transB": int(trans_b)}, keep=like.node)
    elif bc is None:
        rc.node(graph, "MatMul", base, [x, wc], [out], keep=like.node)
    else:
        mid = rc.variable(out.name, suffix, out, rank=rc.ranks.get(out.name))
        rc.node(graph, "MatMul", base, [x, wc], [mid], keep=like.node)
        rc.node(graph, "Add", base, [mid, bc], [out])


class FuseRule(Rule):
    """A :class:`Rule` that shares the run's :class:`RuleContext` (names, ranks, opset)."""

    def __init__(self, rc: RuleContext) -> None:
        self.rc = rc
