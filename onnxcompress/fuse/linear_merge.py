"""Merge linear layers: MatMul + Add → Gemm, consecutive layers into one, parallel layers into one.

All layers are read in normal form ``y = x @ W + b`` with ``W`` of shape ``[K, N]`` (see
:mod:`onnxcompress.fuse.patterns`).

``matmul_add_to_gemm``
    ``MatMul(x, W) + b  →  Gemm(x, W, b)`` when ``x`` and ``W`` are known to be 2-D and ``b`` is a
    constant per-column vector (scalar, ``[N]`` or ``[1, N]``). 3-D inputs keep MatMul + Add (Gemm
    is 2-D only, and quantizers expect MatMul there).

``consecutive_linear``
    Two linear layers with nothing nonlinear between them are one layer:

        (x W1 + b1) W2 + b2 = x (W1 W2) + (b1 W2 + b2)

    for MatMul→MatMul, MatMul→Add→MatMul, Gemm→Gemm (and mixed MatMul/Gemm). A MatMul with a
    following constant bias Add takes that Add along. Applied only when it reduces parameters and
    FLOPs per row: ``K·N < K·M + M·N`` (``M`` the inner width). The result is a Gemm when either
    layer was a Gemm (2-D), else MatMul [+ Add].

``consecutive_conv1x1``
    ``Conv1x1(W2, b2) ∘ Conv1x1(W1, b1) = Conv1x1(W2 W1, W2 b1 + b2)`` for 1×1 kernels, group 1, no
    padding, the second one with stride 1 (the first keeps its strides), under the same
    parameter condition ``Cin·Cout < Cin·C + C·Cout``.

``parallel_linear``
    Several MatMuls (or Gemms) reading the same input with constant weights of the same ``K`` (the
    Q/K/V projections of attention) become one: ``x [W1 | W2 | W3]`` followed by ``Split`` on the
    last axis into the original widths. Bias Adds (or Gemm biases) are concatenated too when every
    branch has one.

May I? Every intermediate tensor has one reader and is not a graph output; every weight and bias
rewritten is a constant that only its node reads; bias constants only broadcast along the feature
axis; ranks are known where the rule depends on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.fuse.patterns import (
    FuseRule,
    Linear,
    as_linear,
    bias_add_after,
    conv_params_private,
    is_float,
    last_axis_vector,
    sole_reader,
    weights_private,
)
from onnxcompress.graph.query import const_value, consumers, producer
from onnxcompress.graph.rewrite import Verdict, disconnect

__all__ = ["MatMulAddToGemm", "ConsecutiveLinear", "ConsecutiveConv1x1", "ParallelLinear"]


# ----------------------------------------------------------------------------------------------


@dataclass
class _MatMulAdd:
    mm: gs.Node
    add: gs.Node
    bias: gs.Tensor


class MatMulAddToGemm(FuseRule):
    name = "matmul_add_to_gemm"

    def match(self, node: gs.Node, graph: gs.Graph) -> _MatMulAdd | None:
        if node.op != "Add" or len(node.inputs) != 2:
            return None
        for i in (0, 1):
            p = producer(node.inputs[i])
            if p is not None and p.op == "MatMul":
                return _MatMulAdd(p, node, node.inputs[1 - i])
        return None

    def check(self, m: _MatMulAdd, graph: gs.Graph) -> Verdict:
        if m.bias is m.add.inputs[0] and m.bias is m.add.inputs[1]:
            return Verdict.no("Add of a tensor to itself")
        c = const_value(m.bias)
        if c is None:
            return Verdict.no(f"the added tensor {m.bias.name!r} is not a constant")
        v = sole_reader(m.mm.outputs[0], m.add, graph)
        if not v:
            return v
        a, b = m.mm.inputs
        ra, rb = self.rc.rank(a), self.rc.rank(b)
        if ra != 2 or rb != 2:
            return Verdict.no(f"MatMul operands are not known to be 2-D (ranks {ra}, {rb}); Gemm is 2-D only")
        wv = const_value(b)
        n = np.asarray(wv).shape[1] if wv is not None else (b.shape[1] if b.shape else None)
        if n is None or not isinstance(n, int):
            return Verdict.no("the output width is unknown")
        if last_axis_vector(np.asarray(c), n, 2) is None:
            return Verdict.no(f"the bias of shape {list(np.shape(c))} is not a per-column vector")
        if not is_float(np.asarray(c)):
            return Verdict.no("the bias is not float")
        return Verdict.yes()

    def rewrite(self, m: _MatMulAdd, graph: gs.Graph, ctx) -> str:
        a, b = m.mm.inputs
        y = m.add.outputs[0]
        bias = m.bias
        disconnect(m.add)
        disconnect(m.mm)
        self.rc.node(graph, "Gemm", m.mm.name or "MatMul", [a, b, bias], [y], keep=m.mm)
        return f"MatMul {m.mm.name} + Add {m.add.name} -> Gemm"


# ----------------------------------------------------------------------------------------------


@dataclass
class _Chain:
    first: Linear
    bias_add: gs.Node | None        # Add(b1) between the two
    b1: np.ndarray | None
    second: Linear
    tail_add: gs.Node | None        # Add(b2) after a MatMul second
    b2: np.ndarray | None


class ConsecutiveLinear(FuseRule):
    name = "consecutive_linear"

    def match(self, node: gs.Node, graph: gs.Graph) -> _Chain | None:
        if node.op not in ("MatMul", "Gemm"):
            return None
        second, _ = as_linear(node, graph)
        if second is None:
            return None
        p = producer(second.x)
        bias_add, b1 = None, None
        if p is not None and p.op == "Add":
            bias_add = p
            q = None
            for t in p.inputs:
                pp = producer(t)
                if pp is not None and pp.op == "MatMul":
                    q = pp
            if q is None:
                return None
            p = q
        if p is None or p.op not in ("MatMul", "Gemm"):
            return None
        first, _ = as_linear(p, graph)
        if first is None:
            return None
        return _Chain(first, bias_add, b1, second, None, None)

    def check(self, m: _Chain, graph: gs.Graph) -> Verdict:
        f, s = m.first, m.second
        if f.n != s.k:
            return Verdict.no(f"inner widths differ ({f.n} vs {s.k})")
        if not (f.k * s.n < f.k * f.n + f.n * s.n):
            return Verdict.no(f"merging [{f.k}x{f.n}]·[{s.k}x{s.n}] into [{f.k}x{s.n}] would not reduce "
                              "parameters")
        mid = f.node.outputs[0]
        if m.bias_add is not None:
            v = sole_reader(mid, m.bias_add, graph)
            if not v:
                return v
            found = bias_add_after(mid, f.n, self.rc.rank(mid), graph)
            if found is None or found[0] is not m.bias_add:
                return Verdict.no("the Add between the layers does not add a constant per-column vector")
            m.b1 = found[1]
            v = sole_reader(m.bias_add.outputs[0], s.node, graph)
        else:
            v = sole_reader(mid, s.node, graph)
        if not v:
            return v
        for lin in (f, s):
            v = weights_private(lin, graph)
            if not v:
                return v
        if s.node.op == "MatMul":
            tail = bias_add_after(s.node.outputs[0], s.n, self.rc.rank(s.node.outputs[0]), graph)
            if tail is not None:
                m.tail_add, m.b2 = tail
        return Verdict.yes()

    def rewrite(self, m: _Chain, graph: gs.Graph, ctx) -> str:
        rc, f, s = self.rc, m.first, m.second
        dt = f.w.dtype
        w2 = s.w.astype(np.float64)
        w = f.w.astype(np.float64) @ w2
        bias = None
        for part in (None if f.bias is None else f.bias.astype(np.float64) @ w2,
                     None if m.b1 is None else m.b1.astype(np.float64) @ w2,
                     s.bias, m.b2):
            if part is not None:
                bias = part.astype(np.float64) if bias is None else bias + part
        out = (m.tail_add or s.node).outputs[0]
        x = f.x
        base = f.node.name or f.node.op
        for n in (f.node, m.bias_add, s.node, m.tail_add):
            if n is not None:
                disconnect(n)
        wc = rc.constant(f.w_tensor.name, "merged", w.astype(dt))
        if "Gemm" in (f.node.op, s.node.op):
            inputs = [x, wc] + ([rc.constant(f.w_tensor.name, "merged_bias", bias.astype(dt))]
                                if bias is not None else [])
            rc.node(graph, "Gemm", base, inputs, [out], {"transA": 0, "transB": 0}, keep=f.node)
        elif bias is None:
            rc.node(graph, "MatMul", base, [x, wc], [out], keep=f.node)
        else:
            mid = rc.variable(out.name, "merged", out, rank=rc.rank(out))
            rc.node(graph, "MatMul", base, [x, wc], [mid], keep=f.node)
            rc.node(graph, "Add", base, [mid, rc.constant(f.w_tensor.name, "merged_bias", bias.astype(dt))],
                    [out])
        return (f"{f.node.op} {f.node.name} [{f.k}x{f.n}] and {s.node.op} {s.node.name} [{s.k}x{s.n}] "
                f"merged into [{f.k}x{s.n}]")


# ----------------------------------------------------------------------------------------------


def _is_pointwise_conv(node: gs.Node, *, stride_one: bool) -> str:
    """'' if ``node`` is a 1x1 Conv with group 1 and no padding (and stride 1 if asked), else why not."""
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return "the weight is not a constant"
    w = np.asarray(w)
    if not is_float(w) or w.ndim < 3 or any(d != 1 for d in w.shape[2:]):
        return "not a 1x1 convolution"
    if int(node.attrs.get("group", 1)) != 1:
        return "group > 1"
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID") or any(int(p) for p in node.attrs.get("pads", [])):
        return "padded"
    if stride_one and any(int(s) != 1 for s in node.attrs.get("strides", [])):
        return "strided"
    return ""


@dataclass
class _ConvPair:
    first: gs.Node
    second: gs.Node


class ConsecutiveConv1x1(FuseRule):
    name = "consecutive_conv1x1"

    def match(self, node: gs.Node, graph: gs.Graph) -> _ConvPair | None:
        if node.op != "Conv" or not node.inputs:
            return None
        p = producer(node.inputs[0])
        if p is None or p.op != "Conv":
            return None
        return _ConvPair(p, node)

    def check(self, m: _ConvPair, graph: gs.Graph) -> Verdict:
        why = _is_pointwise_conv(m.first, stride_one=False) or _is_pointwise_conv(m.second, stride_one=True)
        if why:
            return Verdict.no(why)
        w1 = np.asarray(const_value(m.first.inputs[1]))
        w2 = np.asarray(const_value(m.second.inputs[1]))
        cin, c, cout = w1.shape[1], w1.shape[0], w2.shape[0]
        if w2.shape[1] != c:
            return Verdict.no("channel count mismatch")
        if not (cin * cout < cin * c + c * cout):
            return Verdict.no(f"merging {cin}->{c}->{cout} into {cin}->{cout} would not reduce parameters")
        v = sole_reader(m.first.outputs[0], m.second, graph)
        if not v:
            return v
        return conv_params_private(m.first, graph) and conv_params_private(m.second, graph)

    def rewrite(self, m: _ConvPair, graph: gs.Graph, ctx) -> str:
        rc = self.rc
        w1 = np.asarray(const_value(m.first.inputs[1]))
        w2 = np.asarray(const_value(m.second.inputs[1]))
        dt = w1.dtype
        spatial = w1.shape[2:]
        a = w1.reshape(w1.shape[0], w1.shape[1]).astype(np.float64)
        b = w2.reshape(w2.shape[0], w2.shape[1]).astype(np.float64)

        def bias(node, n):
            has = len(node.inputs) > 2 and node.inputs[2].name
            return np.asarray(const_value(node.inputs[2]), np.float64) if has else np.zeros(n)

        w = (b @ a).reshape((b.shape[0], a.shape[1]) + spatial)
        bb = b @ bias(m.first, a.shape[0]) + bias(m.second, b.shape[0])
        x, y = m.first.inputs[0], m.second.outputs[0]
        attrs = dict(m.first.attrs)
        wname = m.first.inputs[1].name
        disconnect(m.first)
        disconnect(m.second)
        rc.node(graph, "Conv", m.first.name or "Conv", [x, rc.constant(wname, "merged", w.astype(dt)),
                                                        rc.constant(wname, "merged_bias", bb.astype(dt))], [y], attrs,
                keep=m.first)
        return f"1x1 Conv {m.first.name} and {m.second.name} merged ({a.shape[1]}->{a.shape[0]}->{b.shape[0]})"


# ----------------------------------------------------------------------------------------------


@dataclass
class _Parallel:
    x: gs.Tensor
    op: str
    branches: list[Linear]
    adds: list[tuple[gs.Node, np.ndarray]] = field(default_factory=list)


class ParallelLinear(FuseRule):
    name = "parallel_linear"

    def match(self, node: gs.Node, graph: gs.Graph) -> _Parallel | None:
        if node.op not in ("MatMul", "Gemm") or not node.inputs:
            return None
        x = node.inputs[0]
        in_graph = {id(n) for n in graph.nodes}  # readers in sibling subgraphs cannot be merged with this one
        peers = [c for c in consumers(x) if c.op == node.op and c.inputs and c.inputs[0] is x and id(c) in in_graph]
        # match once per (input, op): at the first such reader
        if len(peers) < 2 or peers[0] is not node:
            return None
        branches = []
        for c in peers:
            lin, _ = as_linear(c, graph)
            if lin is not None and weights_private(lin, graph) and len(c.outputs) == 1:
                branches.append(lin)
        return _Parallel(x, node.op, branches)

    def check(self, m: _Parallel, graph: gs.Graph) -> Verdict:
        if len(m.branches) < 2:
            return Verdict.no(f"fewer than two {m.op}s reading {m.x.name!r} have private constant weights")
        k = m.branches[0].k
        dt = m.branches[0].w.dtype
        m.branches = [b for b in m.branches if b.k == k and b.w.dtype == dt]
        if len(m.branches) < 2:
            return Verdict.no("the weights reading the same input have different shapes or types")
        rank = self.rc.rank(m.x)
        if rank is None and self.rc.opset < 11:
            return Verdict.no("the input rank is unknown and this opset's Split needs a non-negative axis")
        if m.op == "MatMul":
            if rank is not None and rank < 2:
                return Verdict.no("a 1-D input")
            adds = [bias_add_after(b.node.outputs[0], b.n, self.rc.rank(b.node.outputs[0]), graph) for b in m.branches]
            if all(a is not None for a in adds):
                m.adds = adds
        return Verdict.yes()

    def rewrite(self, m: _Parallel, graph: gs.Graph, ctx) -> str:
        rc = self.rc
        dt = m.branches[0].w.dtype
        w = np.concatenate([b.w for b in m.branches], axis=1).astype(dt)
        sizes = [b.n for b in m.branches]
        base = m.branches[0].w_tensor.name
        rank = rc.rank(m.x)
        outs = [(a[0] if m.adds else b.node).outputs[0] for b, a in
                zip(m.branches, m.adds or [None] * len(m.branches))]
        bias = None
        if m.op == "Gemm":
            if any(b.bias is not None for b in m.branches):
                bias = np.concatenate([b.bias if b.bias is not None else np.zeros(b.n, dt) for b in m.branches])
        elif m.adds:
            bias = np.concatenate([a[1] for a in m.adds])
        for b in m.branches:
            disconnect(b.node)
        for a in m.adds:
            disconnect(a[0])
        wc = rc.constant(base, "concat", w)
        y = rc.variable(base, "concat_out", outs[0], rank=rank)
        nname = m.branches[0].node.name or m.op
        if m.op == "Gemm":
            inputs = [m.x, wc] + ([rc.constant(base, "concat_bias", bias.astype(dt))] if bias is not None else [])
            rc.node(graph, "Gemm", nname, inputs, [y], {"transA": 0, "transB": 0}, keep=m.branches[0].node)
        else:
            rc.node(graph, "MatMul", nname, [m.x, wc], [y], keep=m.branches[0].node)
            if bias is not None:
                yb = rc.variable(base, "concat_biased", outs[0], rank=rank)
                rc.node(graph, "Add", nname, [y, rc.constant(base, "concat_bias", bias.astype(dt))], [yb])
                y = yb
        axis = -1 if rank is None else rank - 1
        if m.op == "Gemm":
            axis = 1
        if rc.opset >= 13:
            split = rc.constant(base, "split_sizes", np.asarray(sizes, np.int64))
            rc.node(graph, "Split", nname, [y, split], outs, {"axis": axis})
        else:
            rc.node(graph, "Split", nname, [y], outs, {"axis": axis, "split": sizes})
        return f"{len(m.branches)} parallel {m.op}s reading {m.x.name} merged into one + Split {sizes}"
