"""Channel dependency groups: which tensors' axes must shrink together when a channel is removed.

Rule
----
A **channel space** is one axis of one tensor (``(tensor, axis)``, e.g. the C axis of a Conv output,
the last axis of a MatMul output). Every element of every space gets an id; ops **link** ids that must
be removed together:

* a layer's output channel ``j`` (Conv/ConvTranspose out-channel, Gemm/MatMul output column) is
  linked to row ``j`` of its weight and element ``j`` of its bias (parameters follow the space);
* a consumer's input channel ``i`` is linked to its weight's input row/column ``i``
  (Gemm ``B[i, :]`` or ``B[:, i]`` with ``transB``; MatMul ``B[i, :]``; Conv ``W[:, i]``; grouped Conv
  ``W[o, i - g·Cin/g]`` for outputs ``o`` of group ``g`` — every group must keep the same count);
* elementwise and channel-preserving ops (Relu, Clip, Sigmoid, pools, reductions over other axes,
  Dropout, BatchNormalization,
  Add/Mul/Sub/Div/Sum/Max/Min, PRelu, depthwise Conv ``group == C``) link input ``i`` to output ``i``;
  their constant operands are sliced when they are per-channel along the axis (``shape[axis] == C``)
  and left alone when they broadcast (``shape[axis] == 1``); a residual Add links both inputs, so the
  coupled channels of its producers are pruned together;
* ``Concat``/``Split`` along the axis link element ``i`` of input ``k`` to element ``offset_k + i``;
* ``Flatten``/``Reshape``/``Squeeze``/``Unsqueeze``/``Transpose`` that keep the channel axis link it
  to its new position; a flatten into a linear layer (``[N, C, H, W] -> [N, C·H·W]``) links channel
  ``c`` to the block ``c·HW .. c·HW + HW - 1``;
* a channel shuffle (``Reshape [N, g, C/g, ...] -> Transpose(0, 2, 1, ...) -> Reshape [N, C, ...]``,
  ShuffleNet) links ``y[a·g + b]`` to ``x[b·C/g + a]`` and makes channel ``a`` of all ``g`` chunks one
  unit, so the pruned tensor still shuffles into the pruned output (both shapes are edited).

Ids linked directly or indirectly form a **unit** (one removable channel, e.g. conv out-channel 5 +
BN element 5 + the next conv's in-channel 5); spaces that share links form a **group**. Anything the
builder does not understand — an unknown op, a graph input or output, a non-constant weight, a read
from a subgraph, a reshape that mixes channels with other axes, a channel-mixing op
(LRN, Softmax, LayerNormalization over the axis) — **blocks** the whole group, with a reason.

Applying a decision (:func:`apply_keep`) gathers, for every parameter of every member, the kept
indices along its axis (``np.take``), writes the result as a new initializer (or a new ``Constant``
node, or a new ``ConstantOfShape`` with an edited shape when that is how the weight was stored), and
fixes attributes that count channels (depthwise ``group``, explicit ``Reshape`` sizes, ``Split``
sizes) and the recorded shapes of intermediate tensors. It never removes nodes: the pipeline's
cleanup drops the old weights.

Weights may be initializers, ``Constant`` nodes, or small constant chains (``ConstantOfShape``,
``Unsqueeze``/``Squeeze``/``Reshape``/``Identity``/``Cast`` of constants), as in the onnx backend's
model zoo files. Only the top-level graph is analysed; subgraphs' readers block their group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import const_value, consumers, producer

__all__ = [
    "Space",
    "Param",
    "Group",
    "DependencyGraph",
    "build_dependency_graph",
    "infer_dims",
    "eval_const",
    "apply_keep",
    "ParamWriter",
]

log = logging.getLogger("onnxcompress")

#: ops whose output channel i depends only on input channel i (unary or elementwise)
_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Gelu",
    "Erf", "Softplus", "Softsign", "Mish", "Swish", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log", "Sqrt",
    "Reciprocal", "Floor", "Ceil", "Round", "Sin", "Cos", "ThresholdedRelu", "Clip", "Cast", "Not", "Sign",
}
_BINARY = {"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "PRelu", "Pow", "Where"}
#: channel-preserving ops on NC... tensors (axis 1 only)
_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
_RESHAPE_LIKE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
#: reductions keep the channel axis when they reduce other axes only
_REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd",
           "ReduceLogSumExp", "ReduceSumSquare"}
#: ops a constant weight may be computed by (evaluated with numpy)
_CONST_CHAIN = {"ConstantOfShape", "Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast"}


# ----------------------------------------------------------------------------------------------
# constants and shapes


def _attr_or_input_ints(node: gs.Node, attr: str, slot: int) -> list[int] | None:
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if len(node.inputs) > slot and node.inputs[slot].name:
        v = eval_const(node.inputs[slot])
        return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]
    return None


def eval_const(t: gs.Tensor, depth: int = 4) -> np.ndarray | None:
    """The value of ``t`` if it is a constant or a short chain of shape ops over constants, else None."""
    v = const_value(t)
    if v is not None:
        return np.asarray(v)
    p = producer(t)
    if p is None or depth == 0 or p.op not in _CONST_CHAIN or not p.inputs:
        return None
    x = eval_const(p.inputs[0], depth - 1)
    if x is None:
        return None
    if p.op == "ConstantOfShape":
        value = p.attrs.get("value")
        fill = np.asarray(value.values).reshape(-1)[0] if isinstance(value, gs.Constant) else np.float32(0)
        return np.full(tuple(int(d) for d in x.reshape(-1)), fill, dtype=np.asarray(fill).dtype)
    if p.op == "Identity":
        return x
    if p.op == "Cast":
        to = p.attrs.get("to")
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(to)))
    if p.op == "Unsqueeze":
        axes = _attr_or_input_ints(p, "axes", 1)
        if axes is None:
            return None
        rank = x.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            x = np.expand_dims(x, a)
        return x
    if p.op == "Squeeze":
        axes = _attr_or_input_ints(p, "axes", 1)
        return np.squeeze(x) if axes is None else np.squeeze(x, tuple(a % x.ndim for a in axes))
    if p.op == "Reshape":
        shape = eval_const(p.inputs[1], depth - 1) if len(p.inputs) > 1 else None
        if shape is None:
            return None
        shape = [int(s) if s != 0 else x.shape[i] for i, s in enumerate(shape.reshape(-1))]
        return x.reshape(shape)
    return None


def infer_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Tensor name -> dims (int, symbolic name, or None) from onnx shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # a model shape inference cannot handle: fall back to what is recorded
        log.info("shape inference failed (%s); using recorded shapes only", e)
        inferred = model
    g = inferred.graph
    dims: dict[str, list] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            continue
        dims[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    for init in g.initializer:
        dims[init.name] = list(init.dims)
    return dims


def _same_prefix(a: list, b: list) -> bool:
    if list(a) == list(b):
        return True
    if all(isinstance(x, int) for x in a) and all(isinstance(x, int) for x in b):
        return int(np.prod(a, dtype=np.int64)) == int(np.prod(b, dtype=np.int64))
    return False


# ----------------------------------------------------------------------------------------------
# the dependency graph


@dataclass(eq=False)
class Space:
    """One axis of one tensor whose elements are channels."""

    tensor: gs.Tensor
    axis: int
    size: int
    ids: np.ndarray
    index: int = -1
    #: g > 1 when a grouped Conv reads or writes this space: each of g chunks keeps the same count
    chunks: int = 1

    @property
    def name(self) -> str:
        return self.tensor.name


@dataclass(eq=False)
class Param:
    """A constant input ``node.inputs[slot]`` whose ``axis`` follows ``space``.

    ``role``: ``out`` (producer weight rows / bias), ``in`` (consumer weight input rows),
    ``bn`` (BatchNormalization parameters; slot 1 is gamma), ``ew`` (per-channel elementwise
    constants), ``dw`` (depthwise conv weights). ``chunks`` > 1: the weight's axis holds Cin/g input
    channels per group of outputs (grouped Conv input side).
    """

    node: gs.Node
    slot: int
    axis: int
    space: Space
    role: str
    chunks: int = 1


@dataclass(eq=False)
class Fixup:
    """An attribute or shape input counting channels: ``kind`` is group, reshape or split."""

    kind: str
    node: gs.Node
    space: Space
    outputs: tuple[Space, ...] = ()
    position: int = 0
    #: reshape: the new count at ``position`` is the space's count divided by this (channel shuffle)
    divisor: int = 1
    #: tensors whose recorded shapes go stale (dropped, shape inference restores them)
    stale: tuple = ()


@dataclass(eq=False)
class Group:
    """Spaces coupled by links; units are sets of ids removed together."""

    id: int
    spaces: list[Space]
    params: list[Param] = field(default_factory=list)
    fixups: list[Fixup] = field(default_factory=list)
    blocked: list[tuple[str, str]] = field(default_factory=list)
    #: element id -> unit id (global), filled by the builder
    unit_of: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """A stable name: the first producer layer's output tensor, else the first space's tensor."""
        for p in self.params:
            if p.role == "out":
                return p.space.name
        return self.spaces[0].name

    @property
    def prunable(self) -> bool:
        return not self.blocked and any(p.role in ("out", "dw") for p in self.params)

    def units(self) -> np.ndarray:
        """Sorted unit ids of this group."""
        return np.unique(np.concatenate([self.unit_ids(s) for s in self.spaces]))

    def unit_ids(self, space: Space) -> np.ndarray:
        """The unit id of each element of ``space``."""
        return np.array([self.unit_of[int(i)] for i in space.ids], dtype=np.int64)

    def partitions(self) -> list[np.ndarray]:
        """Units split by which spaces (and grouped-conv chunks) they touch; each is pruned alone
        with the same fraction, so every space keeps a count that is the sum of partition counts
        (``round_to`` and the equal-per-chunk rule then hold for every tensor)."""
        sig: dict[int, set] = {}
        for s in self.spaces:
            uids = self.unit_ids(s)
            chunk = max(1, s.size // s.chunks)
            for e, u in enumerate(uids):
                sig.setdefault(int(u), set()).add((s.index, e // chunk if s.chunks > 1 else 0))
        by_sig: dict[frozenset, list[int]] = {}
        for u, s in sig.items():
            by_sig.setdefault(frozenset(s), []).append(u)
        return [np.array(sorted(v), dtype=np.int64) for _, v in sorted(by_sig.items(), key=lambda kv: min(kv[1]))]

    def kept_elements(self, space: Space, keep_units: np.ndarray) -> np.ndarray:
        return np.nonzero(np.isin(self.unit_ids(space), keep_units))[0]

    def layers(self) -> list[str]:
        return sorted({p.node.name for p in self.params if p.role in ("out", "in", "dw")})

    def describe(self) -> dict:
        return {"name": self.name, "tensors": [s.name for s in self.spaces], "layers": self.layers(),
                "units": int(len(self.units())), "blocked": [{"node": n, "reason": r} for n, r in self.blocked]}


@dataclass
class DependencyGraph:
    groups: list[Group]
    dims: dict[str, list]


class _Builder:
    def __init__(self, graph: gs.Graph, dims: dict[str, list]) -> None:
        self.graph = graph
        self.dims = dims
        self.nodes = {id(n) for n in graph.nodes}
        self.outputs = {id(t) for t in graph.outputs}
        self.inputs = {id(t) for t in graph.inputs}
        self.spaces: dict[tuple[str, int], Space] = {}
        self.order: list[Space] = []
        self.queue: list[Space] = []
        self.next_id = 0
        self.links: list[tuple[np.ndarray, np.ndarray]] = []
        self.space_links: list[tuple[int, int]] = []
        self.params: list[Param] = []
        self.fixups: list[Fixup] = []
        self.blocks: dict[int, list[tuple[str, str]]] = {}
        self.done: set[tuple[int, str]] = set()

    # -- helpers -----------------------------------------------------------------------------

    def rank(self, t: gs.Tensor) -> int | None:
        d = self.dims.get(t.name)
        if d is None and t.shape is not None:
            d = list(t.shape)
        return None if d is None else len(d)

    def dim_list(self, t: gs.Tensor) -> list | None:
        d = self.dims.get(t.name)
        if d is None and t.shape is not None:
            d = list(t.shape)
        return d

    def space(self, t: gs.Tensor, axis: int, *, size: int | None = None) -> Space | None:
        """The space (t, axis), created on first use; None when its size is unknown."""
        r = self.rank(t)
        if r is None:
            return None
        axis = axis % r if r else 0
        key = (t.name, axis)
        if key in self.spaces:
            return self.spaces[key]
        if size is None:
            d = self.dim_list(t)[axis]
            if not isinstance(d, int) or d <= 0:
                return None
            size = d
        s = Space(t, axis, size, np.arange(self.next_id, self.next_id + size), index=len(self.order))
        self.next_id += size
        self.spaces[key] = s
        self.order.append(s)
        self.queue.append(s)
        return s

    def block(self, s: Space, node: str, reason: str) -> None:
        self.blocks.setdefault(s.index, []).append((node, reason))

    def link(self, a: Space, b: Space, a_ids: np.ndarray | None = None, b_ids: np.ndarray | None = None) -> bool:
        a_ids = a.ids if a_ids is None else a_ids
        b_ids = b.ids if b_ids is None else b_ids
        if len(a_ids) != len(b_ids):
            self.block(a, b.name, f"channel counts differ ({len(a_ids)} vs {len(b_ids)})")
            return False
        self.links.append((a_ids, b_ids))
        self.space_links.append((a.index, b.index))
        return True

    def param(self, node: gs.Node, slot: int, axis: int, s: Space, role: str, chunks: int = 1) -> bool:
        """Attach a constant parameter; block when it is not a constant with the right size."""
        t = node.inputs[slot]
        v = eval_const(t)
        if v is None:
            self.block(s, node.name, f"input {slot} ({t.name}) is not a constant")
            return False
        if v.ndim <= axis:
            self.block(s, node.name, f"input {slot} ({t.name}) has rank {v.ndim}")
            return False
        expect = s.size // chunks if chunks > 1 else s.size
        if v.shape[axis] != expect:
            self.block(s, node.name, f"input {slot} ({t.name}) has {v.shape[axis]} channels on axis {axis}, "
                                     f"expected {expect}")
            return False
        self.params.append(Param(node, slot, axis, s, role, chunks))
        return True

    def chunked(self, s: Space, g: int, node: gs.Node) -> None:
        if s.chunks not in (1, g) and g > 1:
            self.block(s, node.name, f"grouped convolutions with different group counts ({s.chunks}, {g}) share it")
        elif s.size % g:
            self.block(s, node.name, f"{s.size} channels do not split into {g} groups")
        else:
            s.chunks = g

    def once(self, node: gs.Node, role: str) -> bool:
        key = (id(node), role)
        if key in self.done:
            return False
        self.done.add(key)
        return True

    # -- the walk ----------------------------------------------------------------------------

    def run(self) -> None:
        while self.queue:
            s = self.queue.pop(0)
            t = s.tensor
            if id(t) in self.outputs:
                self.block(s, t.name, "it is a graph output")
            p = producer(t)
            if p is None:
                self.block(s, t.name, "its channels come from a graph input" if id(t) in self.inputs
                           else "its channels come from a constant")
            elif id(p) not in self.nodes:
                self.block(s, p.name, "produced outside the top-level graph")
            else:
                self.visit(p, s, as_output=True)
            for c in consumers(t):
                if id(c) not in self.nodes:
                    self.block(s, c.name or c.op, "read inside a subgraph")
                    continue
                self.visit(c, s, as_output=False)

    def visit(self, node: gs.Node, s: Space, *, as_output: bool) -> None:
        op = node.op
        if (node.domain or "") not in ("", "ai.onnx"):
            self.block(s, node.name, f"custom op {node.domain}::{op} is not understood")
        elif op in ("Conv", "ConvTranspose"):
            self.conv(node, s, as_output)
        elif op == "Gemm":
            self.gemm(node, s, as_output)
        elif op == "MatMul":
            self.matmul(node, s, as_output)
        elif op in _UNARY or op in _BINARY or op in _POOL or op == "BatchNormalization":
            self.elementwise(node, s)
        elif op in _REDUCE:
            self.reduce(node, s)
        elif op == "Concat":
            self.concat(node, s)
        elif op == "Split":
            self.split(node, s)
        elif op in ("Reshape", "Transpose") and _match_shuffle(node, self.dim_list) is not None:
            self.shuffle(_match_shuffle(node, self.dim_list), s)
        elif op in _RESHAPE_LIKE or op == "Transpose":
            self.reshape(node, s, as_output)
        else:
            self.block(s, node.name, f"{op} is not understood by channel pruning")

    # layers ----------------------------------------------------------------------------------

    def conv(self, node: gs.Node, s: Space, as_output: bool) -> None:
        w = eval_const(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim < 3:
            self.block(s, node.name, "its weight is not a constant")
            return
        g = int(node.attrs.get("group", 1))
        transpose = node.op == "ConvTranspose"
        x = node.inputs[0]
        if not as_output and x is not s.tensor:
            self.block(s, node.name, f"the tensor is read as a {node.op} weight or bias")
            return
        if s.axis != 1:
            self.block(s, node.name, f"{node.op} channels are axis 1, not {s.axis}")
            return
        cin = self.dim_list(x)[1] if self.dim_list(x) else None
        cout = w.shape[1] * g if transpose else w.shape[0]
        if g > 1 and g == cin and cout == cin and not transpose:  # depthwise: a per-channel op
            if not self.once(node, "dw"):
                return
            xs = self.space(x, 1)
            ys = self.space(node.outputs[0], 1)
            if xs is None or ys is None:
                self.block(s, node.name, "unknown channel count")
                return
            self.link(xs, ys)
            self.param(node, 1, 0, ys, "dw")
            if len(node.inputs) > 2 and node.inputs[2].name:
                self.param(node, 2, 0, ys, "dw")
            self.fixups.append(Fixup("group", node, ys))
            return
        if transpose and g > 1:
            self.block(s, node.name, "grouped ConvTranspose is not supported")
            return
        if g > 1 and cin is not None and g == cin and cout != cin:
            self.block(s, node.name, f"depthwise Conv with channel multiplier {cout // cin}")
            return
        if as_output:
            if not self.once(node, "out"):
                return
            if g > 1:
                self.chunked(s, g, node)
            self.param(node, 1, 1 if transpose else 0, s, "out")
            if len(node.inputs) > 2 and node.inputs[2].name:
                self.param(node, 2, 0, s, "out")
        else:
            if not self.once(node, "in"):
                return
            if g > 1:
                self.chunked(s, g, node)
            self.param(node, 1, 0 if transpose else 1, s, "in", chunks=g)

    def gemm(self, node: gs.Node, s: Space, as_output: bool) -> None:
        ta, tb = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
        if as_output:
            if not self.once(node, "out"):
                return
            if s.axis != 1:
                self.block(s, node.name, "Gemm output channels are axis 1")
                return
            self.param(node, 1, 0 if tb else 1, s, "out")
            if len(node.inputs) > 2 and node.inputs[2].name:
                c = eval_const(node.inputs[2])
                if c is None:
                    self.block(s, node.name, "its bias C is not a constant")
                elif c.ndim >= 1 and c.shape[-1] != 1:
                    self.param(node, 2, c.ndim - 1, s, "out")
            return
        if node.inputs[0] is not s.tensor or (len(node.inputs) > 1 and node.inputs[1] is s.tensor):
            self.block(s, node.name, "the tensor is read as a Gemm weight or bias")
            return
        if not self.once(node, "in"):
            return
        if s.axis != (0 if ta else 1):
            self.block(s, node.name, "the axis is not Gemm's reduction axis")
            return
        self.param(node, 1, 1 if tb else 0, s, "in")

    def matmul(self, node: gs.Node, s: Space, as_output: bool) -> None:
        b = eval_const(node.inputs[1])
        if b is None or b.ndim != 2:
            self.block(s, node.name, "MatMul's second input is not a constant 2-D weight")
            return
        if as_output:
            if not self.once(node, "out"):
                return
            if s.axis != (self.rank(s.tensor) or 0) - 1:
                self.block(s, node.name, "MatMul output channels are the last axis")
                return
            self.param(node, 1, 1, s, "out")
            return
        if node.inputs[0] is not s.tensor:
            self.block(s, node.name, "the tensor is read as a MatMul weight")
            return
        if not self.once(node, "in"):
            return
        if s.axis != (self.rank(s.tensor) or 0) - 1:
            self.block(s, node.name, "the axis is not MatMul's reduction axis")
            return
        self.param(node, 1, 0, s, "in")

    # channel-preserving ops ------------------------------------------------------------------

    def elementwise(self, node: gs.Node, s: Space) -> None:
        if not self.once(node, "ew"):
            return
        op = node.op
        r = self.rank(s.tensor)
        neg = s.axis - r  # axis counted from the end (broadcasting aligns trailing axes)
        if (op in _POOL or op == "BatchNormalization") and s.axis != 1:
            self.block(s, node.name, f"{op} keeps channels on axis 1 only")
            return
        if op in _POOL and op != "GlobalAveragePool" and op != "GlobalMaxPool" and len(node.outputs) > 1 \
                and node.outputs[1].outputs:
            self.block(s, node.name, "its indices output is used")
            return
        for slot, t in enumerate(node.inputs):
            if not t.name:
                continue
            if op == "BatchNormalization" and slot > 0:
                self.param(node, slot, 0, s, "bn")
                continue
            c = eval_const(t)
            if c is not None:
                ax = c.ndim + neg
                if ax < 0 or c.shape[ax] == 1:
                    continue
                self.param(node, slot, ax, s, "ew")
                continue
            rt = self.rank(t)
            if rt is None or rt + neg < 0:
                self.block(s, node.name, f"the rank of {t.name} is unknown or too small")
                continue
            other = self.space(t, rt + neg)
            if other is None or other.size != s.size:
                self.block(s, node.name, f"{t.name} broadcasts along the channel axis")
                continue
            self.link(s, other)
        for t in node.outputs:
            if not t.outputs and not any(t is o for o in self.graph.outputs):
                continue
            rt = self.rank(t)
            other = self.space(t, rt + neg) if rt is not None and rt + neg >= 0 else None
            if other is None:
                self.block(s, node.name, f"the shape of {t.name} is unknown")
                continue
            self.link(s, other)

    def reduce(self, node: gs.Node, s: Space) -> None:
        """A reduction over other axes keeps channel i in output channel i (shifted by the reduced
        axes before it when ``keepdims=0``)."""
        if not self.once(node, "reduce"):
            return
        x = node.inputs[0]
        if x is not s.tensor:
            self.block(s, node.name, f"the tensor is read as {node.op}'s axes")
            return
        r = self.rank(x)
        axes = _attr_or_input_ints(node, "axes", 1)
        if axes is None:
            if int(node.attrs.get("noop_with_empty_axes", 0)):
                axes = []
            else:
                self.block(s, node.name, f"{node.op} reduces every axis")
                return
        axes = sorted({a % r for a in axes})
        if s.axis in axes:
            self.block(s, node.name, f"{node.op} reduces over the channel axis")
            return
        keep = int(node.attrs.get("keepdims", 1))
        ys = self.space(node.outputs[0], s.axis if keep else s.axis - sum(a < s.axis for a in axes))
        if ys is None:
            self.block(s, node.name, "unknown output shape")
            return
        self.link(s, ys)

    def concat(self, node: gs.Node, s: Space) -> None:
        if not self.once(node, "concat"):
            return
        out = node.outputs[0]
        r = self.rank(out)
        axis = int(node.attrs.get("axis", 0)) % r if r else 0
        ys = self.space(out, s.axis - (self.rank(s.tensor) or 0) + (r or 0))
        if ys is None:
            self.block(s, node.name, "unknown output shape")
            return
        offset = 0
        for t in node.inputs:
            if eval_const(t) is not None:
                self.block(ys, node.name, f"it concatenates a constant ({t.name})")
                return
            xs = self.space(t, ys.axis)
            if xs is None:
                self.block(ys, node.name, f"unknown shape of {t.name}")
                return
            if ys.axis == axis:
                self.link(xs, ys, b_ids=ys.ids[offset:offset + xs.size])
                offset += xs.size
            else:
                self.link(xs, ys)
        if ys.axis == axis and offset != ys.size:
            self.block(ys, node.name, f"inputs add up to {offset} channels, output has {ys.size}")

    def split(self, node: gs.Node, s: Space) -> None:
        if not self.once(node, "split"):
            return
        x = node.inputs[0]
        r = self.rank(x)
        axis = int(node.attrs.get("axis", 0)) % r if r else 0
        xs = self.space(x, s.axis - (self.rank(s.tensor) or 0) + (r or 0))
        if xs is None:
            self.block(s, node.name, "unknown input shape")
            return
        outs = []
        offset = 0
        for t in node.outputs:
            ys = self.space(t, xs.axis)
            if ys is None:
                self.block(xs, node.name, f"unknown shape of {t.name}")
                return
            outs.append(ys)
            if xs.axis == axis:
                self.link(ys, xs, b_ids=xs.ids[offset:offset + ys.size])
                offset += ys.size
            else:
                self.link(ys, xs)
        if xs.axis == axis:
            self.fixups.append(Fixup("split", node, xs, tuple(outs)))

    def reshape(self, node: gs.Node, s: Space, as_output: bool) -> None:
        """Reshape-like ops that keep the channel axis whole, or flatten it into a linear layer."""
        if not self.once(node, "reshape"):
            return
        x, y = node.inputs[0], node.outputs[0]
        if (not as_output and x is not s.tensor) or any(t is s.tensor for t in node.inputs[1:]):
            self.block(s, node.name, f"the tensor is read as {node.op}'s shape")
            return
        xs = s if x is s.tensor else None
        xd, yd = self.dim_list(x), self.dim_list(y)
        if xd is None or yd is None:
            self.block(s, node.name, "unknown shapes around it")
            return
        if xs is None:  # reached from the output side: find the input axis
            xs = self._input_space_of(node, s, xd, yd)
            if xs is None:
                return
        a = xs.axis
        if node.op == "Transpose":
            perm = list(node.attrs.get("perm", list(range(len(xd)))[::-1]))
            ys = self.space(y, perm.index(a))
            if ys is not None:
                self.link(xs, ys)
            return
        prefix, c, suffix = xd[:a], xd[a], xd[a + 1:]
        for b in range(len(yd)):
            if not _same_prefix(prefix, yd[:b]):
                continue
            if yd[b] == c and _same_prefix(suffix, yd[b + 1:]):
                ys = self.space(y, b)
                if ys is not None and self.link(xs, ys):
                    if node.op == "Reshape":
                        self.fixups.append(Fixup("reshape", node, ys, position=b))
                    return
            if all(isinstance(d, int) for d in suffix) and suffix and yd[b] == c * int(np.prod(suffix)) \
                    and len(yd) == b + 1:
                hw = int(np.prod(suffix))
                ys = self.space(y, b)
                if ys is not None and self.link(xs, ys, a_ids=np.repeat(xs.ids, hw)):
                    if node.op == "Reshape":
                        self.fixups.append(Fixup("reshape", node, ys, position=b))
                    return
        self.block(s, node.name, f"{node.op} {xd} -> {yd} mixes the channel axis with others")

    def shuffle(self, match: tuple, s: Space) -> None:
        """A channel shuffle ``y[a·g + b] = x[b·C/g + a]``: channel a of every one of the g chunks
        of x is one unit (the shuffle of the pruned tensor must equal the pruned shuffle)."""
        r1, t, r2, g = match
        if not self.once(r1, "shuffle"):
            return
        x, y = r1.inputs[0], r2.outputs[0]
        xs, ys = self.space(x, 1), self.space(y, 1)
        if xs is None or ys is None:
            self.block(s, r1.name, "unknown shape around a channel shuffle")
            return
        if s is not xs and s is not ys:
            self.block(s, r1.name, "the channel shuffle's intermediate tensor is read elsewhere")
            return
        per = xs.size // g
        a, b = np.meshgrid(np.arange(per), np.arange(g), indexing="ij")  # [per, g]
        self.link(xs, ys, a_ids=xs.ids[(b * per + a).reshape(-1)], b_ids=ys.ids[(a * g + b).reshape(-1)])
        if g > 1:
            self.link(xs, xs, a_ids=xs.ids[(b[:, 1:] * per + a[:, 1:]).reshape(-1)],
                      b_ids=np.repeat(xs.ids[:per], g - 1))
        stale = (r1.outputs[0], t.outputs[0])
        self.fixups.append(Fixup("reshape", r1, xs, position=2, divisor=g, stale=stale))
        self.fixups.append(Fixup("reshape", r2, ys, position=1))

    def _input_space_of(self, node: gs.Node, s: Space, xd: list, yd: list) -> Space | None:
        if node.op == "Transpose":
            perm = list(node.attrs.get("perm", list(range(len(xd)))[::-1]))
            return self.space(node.inputs[0], perm[s.axis])
        b = s.axis
        for a in range(len(xd)):
            if _same_prefix(xd[:a], yd[:b]) and xd[a] == yd[b] and _same_prefix(xd[a + 1:], yd[b + 1:]):
                return self.space(node.inputs[0], a)
        self.block(s, node.name, f"{node.op} {xd} -> {yd} makes this axis from several input axes")
        return None

    # -- grouping ----------------------------------------------------------------------------

    def groups(self) -> list[Group]:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        n_ids, n_sp = self.next_id, len(self.order)
        if n_ids == 0:
            return []
        a = np.concatenate([x for x, _ in self.links]) if self.links else np.zeros(0, np.int64)
        b = np.concatenate([y for _, y in self.links]) if self.links else np.zeros(0, np.int64)
        _, unit = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n_ids, n_ids)), directed=False)
        sa = np.array([x for x, _ in self.space_links] or [0], dtype=np.int64)
        sb = np.array([y for _, y in self.space_links] or [0], dtype=np.int64)
        _, comp = connected_components(coo_matrix((np.ones(len(sa)), (sa, sb)), shape=(n_sp, n_sp)), directed=False)
        by_comp: dict[int, Group] = {}
        for sp in self.order:
            g = by_comp.setdefault(int(comp[sp.index]), Group(len(by_comp), []))
            g.spaces.append(sp)
            g.blocked.extend(self.blocks.get(sp.index, []))
            g.unit_of.update({int(i): int(unit[i]) for i in sp.ids})
        for p in self.params:
            by_comp[int(comp[p.space.index])].params.append(p)
        for f in self.fixups:
            by_comp[int(comp[f.space.index])].fixups.append(f)
        for g in by_comp.values():
            self._check_chunks(g)
        return list(by_comp.values())

    @staticmethod
    def _check_chunks(g: Group) -> None:
        """Every chunk of a grouped conv's space must hold the same multiset of partition sizes, so
        that pruning each partition by the same fraction keeps equal counts per chunk."""
        chunked = [s for s in g.spaces if s.chunks > 1]
        if not chunked or g.blocked:
            return
        parts = g.partitions()
        for s in chunked:
            uids = g.unit_ids(s)
            per = s.size // s.chunks
            layout = []
            for k in range(s.chunks):
                here = set(uids[k * per:(k + 1) * per].tolist())
                layout.append(sorted(len(p) for p in parts if here.intersection(p.tolist())))
            if any(x != layout[0] for x in layout):
                g.blocked.append((s.name, f"the {s.chunks} groups of a grouped convolution on {s.name} "
                                          "are coupled unevenly to other layers"))
                return


def build_dependency_graph(graph: gs.Graph, model: onnx.ModelProto | None = None,
                           dims: dict[str, list] | None = None) -> DependencyGraph:
    """Analyse ``graph``: every layer's output channels and how they couple to the rest.

    ``model`` (the graph exported) or precomputed ``dims`` give tensor shapes; without either the
    graph is exported here.
    """
    if dims is None:
        if model is None:
            from onnxcompress.graph.io import graph_to_model

            model = graph_to_model(graph.copy())
        dims = infer_dims(model)
    b = _Builder(graph, dims)
    for node in list(graph.nodes):
        if node.op in ("Conv", "ConvTranspose", "Gemm") and node.outputs:
            b.space(node.outputs[0], 1)
        elif node.op == "MatMul" and node.outputs and eval_const(node.inputs[1]) is not None:
            r = b.rank(node.outputs[0])
            if r:
                b.space(node.outputs[0], r - 1)
    b.run()
    return DependencyGraph(b.groups(), dims)


# ----------------------------------------------------------------------------------------------
# applying a decision


class ParamWriter:
    """Writes sliced parameters back, in the form the original was stored, sharing identical results."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.namer = Namer.for_graph(graph)
        self.cache: dict[tuple, gs.Tensor] = {}

    def write(self, node: gs.Node, slot: int, value: np.ndarray, key: tuple) -> gs.Tensor:
        old = node.inputs[slot]
        ck = (id(old), key)
        if ck in self.cache:
            new = self.cache[ck]
        else:
            new = self._make(old, value)
            self.cache[ck] = new
        node.inputs[slot] = new
        return new

    def _make(self, old: gs.Tensor, value: np.ndarray) -> gs.Tensor:
        name = self.namer.fresh(old.name, "pruned")
        p = producer(old)
        flat = value.reshape(-1)
        if p is not None and p.op == "ConstantOfShape" and flat.size and np.all(flat == flat[0]) \
                and eval_const(p.inputs[0]) is not None:
            shape = gs.Constant(self.namer.fresh(name, "shape"), np.array(value.shape, dtype=np.int64))
            out = gs.Variable(name, dtype=value.dtype, shape=list(value.shape))
            self.graph.nodes.append(gs.Node("ConstantOfShape", name=self.namer.fresh(name, "fill"),
                                            attrs=dict(p.attrs), inputs=[shape], outputs=[out]))
            return out
        if p is not None and p.op == "Constant":
            out = gs.Variable(name, dtype=value.dtype, shape=list(value.shape))
            self.graph.nodes.append(gs.Node("Constant", name=self.namer.fresh(name, "node"),
                                            attrs={"value": gs.Constant(name + "_value", np.ascontiguousarray(value))},
                                            outputs=[out]))
            return out
        return gs.Constant(name, np.ascontiguousarray(value))


def _grouped_take(w: np.ndarray, axis: int, chunks: int, kept: np.ndarray, cin: int) -> np.ndarray:
    """Grouped conv input side: rows of output group g keep the local indices of chunk g."""
    per_in = cin // chunks
    cout = w.shape[0] if axis == 1 else w.shape[1]
    per_out = cout // chunks
    local = [kept[(kept >= k * per_in) & (kept < (k + 1) * per_in)] - k * per_in for k in range(chunks)]
    counts = {len(x) for x in local}
    if len(counts) != 1:
        raise ValueError("grouped convolution chunks keep different channel counts")
    parts = [np.take(w[k * per_out:(k + 1) * per_out], local[k], axis=axis) for k in range(chunks)]
    return np.concatenate(parts, axis=0)


def apply_keep(graph: gs.Graph, group: Group, keep_units: np.ndarray, writer: ParamWriter,
               *, transform: Callable[[Param, np.ndarray], np.ndarray] | None = None) -> dict[str, list[int]]:
    """Shrink every member of ``group`` to the units in ``keep_units``; return the kept element
    indices per tensor (the plan). ``transform(param, value)`` may edit a parameter before it is
    sliced (neuron merging adds outgoing weights together this way)."""
    kept = {s.index: group.kept_elements(s, keep_units) for s in group.spaces}
    edits: dict[tuple[int, int], list[Param]] = {}
    for p in group.params:
        edits.setdefault((id(p.node), p.slot), []).append(p)
    for plist in edits.values():
        node, slot = plist[0].node, plist[0].slot
        value = eval_const(node.inputs[slot])
        key = []
        for p in sorted(plist, key=lambda q: -q.chunks):
            if transform is not None:
                value = transform(p, value)
            idx = kept[p.space.index]
            if p.chunks > 1:
                value = _grouped_take(value, p.axis, p.chunks, idx, p.space.size)
            else:
                value = np.take(value, idx, axis=p.axis)
            key.append((p.axis, p.chunks, tuple(idx.tolist()), transform is not None and id(p)))
        writer.write(node, slot, value, tuple(key))
    for f in group.fixups:
        n_new = len(kept[f.space.index])
        if f.kind == "group":
            f.node.attrs["group"] = n_new
        elif f.kind == "reshape":
            _fix_reshape(f, n_new, writer)
        elif f.kind == "split":
            _fix_split(f, [len(kept[o.index]) for o in f.outputs], writer)
    for s in group.spaces:
        if isinstance(s.tensor, gs.Variable) and s.tensor.shape is not None and len(s.tensor.shape) > s.axis:
            shape = list(s.tensor.shape)
            shape[s.axis] = len(kept[s.index])
            s.tensor.shape = shape
    return {s.name: kept[s.index].tolist() for s in group.spaces}


def _match_shuffle(node: gs.Node, dims) -> tuple | None:
    """``(reshape, transpose, reshape, g)`` when ``node`` is part of a channel shuffle
    ``[N, C, *S] -> [N, g, C/g, *S] -> Transpose(0, 2, 1, ...) -> [N, C, *S]``, else None."""
    def only(t: gs.Tensor) -> gs.Node | None:
        c = consumers(t)
        return c[0] if len(c) == 1 else None

    chain: list[gs.Node | None]
    if node.op == "Transpose":
        chain = [producer(node.inputs[0]), node, only(node.outputs[0])]
    else:
        t = only(node.outputs[0])
        if t is not None and t.op == "Transpose":
            chain = [node, t, only(t.outputs[0])]
        else:
            t = producer(node.inputs[0])
            chain = [producer(t.inputs[0]) if t is not None and t.inputs else None, t, node]
    r1, t, r2 = chain
    if r1 is None or t is None or r2 is None or (r1.op, t.op, r2.op) != ("Reshape", "Transpose", "Reshape"):
        return None
    xd, md, yd = dims(r1.inputs[0]), dims(r1.outputs[0]), dims(r2.outputs[0])
    if xd is None or md is None or yd is None or len(xd) < 3 or len(md) != len(xd) + 1 or list(yd) != list(xd):
        return None
    g, per = md[1], md[2]
    perm = list(t.attrs.get("perm", []))
    if not (isinstance(g, int) and isinstance(per, int) and xd[1] == g * per and md[3:] == xd[2:]
            and perm == [0, 2, 1, *range(3, len(md))] and only(r1.outputs[0]) is t):
        return None
    return r1, t, r2, g


def _fix_reshape(f: Fixup, n_new: int, writer: ParamWriter) -> None:
    node = f.node
    n_new //= f.divisor
    for t in f.stale:
        t.shape = None
    shape = eval_const(node.inputs[1])
    if shape is None:
        return
    shape = shape.reshape(-1).copy()
    if f.position < len(shape) and shape[f.position] > 0 and shape[f.position] != n_new:
        shape[f.position] = n_new
        writer.write(node, 1, shape.astype(np.int64), ("reshape", tuple(shape.tolist())))


def _fix_split(f: Fixup, sizes: list[int], writer: ParamWriter) -> None:
    node = f.node
    arr = np.array(sizes, dtype=np.int64)
    if "split" in node.attrs:
        node.attrs["split"] = sizes
    elif len(node.inputs) > 1 and node.inputs[1].name:
        writer.write(node, 1, arr, ("split", tuple(sizes)))
    else:
        opset = writer.graph.opset or 13
        if opset >= 13:
            node.attrs.pop("num_outputs", None)
            node.inputs.append(gs.Constant(writer.namer.fresh(node.name or "split", "sizes"), arr))
        else:
            node.attrs["split"] = sizes


