"""Read-only questions about an onnx-graphsurgeon graph.

Every pass asks the same questions before it rewrites anything: who produces this tensor, who
consumes it, is it a constant (an initializer, or the output of a ``Constant`` node), is it visible
outside the graph (a graph input or output), is this node its only consumer. This module answers
them in one place so that passes do not reach into graphsurgeon internals.

A **weight** is a constant tensor that nodes consume. Exporters keep weights in three places:
initializers, ``Constant`` nodes, and either of those inside If/Loop/Scan bodies.
:func:`iter_weights` yields every one of them as a :class:`WeightRef`, wherever it lives, with its
consumers, so a technique written once compresses all three.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

__all__ = [
    "WeightRef",
    "iter_graphs",
    "iter_nodes",
    "iter_weights",
    "producer",
    "consumers",
    "const_value",
    "peek_values",
    "is_constant",
    "is_graph_io",
    "only_consumer",
    "weight_ref",
    "name_matches",
    "unmatched_note",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES = (np.float32, np.float16, np.float64)


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph itself, then every subgraph (If branches, Loop/Scan bodies) at any depth."""
    yield graph
    yield from graph.subgraphs(recursive=True)


def iter_nodes(graph: gs.Graph) -> Iterator[tuple[gs.Node, gs.Graph]]:
    """``(node, graph_it_lives_in)`` for every node of the graph and its subgraphs."""
    for g in iter_graphs(graph):
        for node in list(g.nodes):
            yield node, g


def name_matches(name: str, pattern: str) -> bool:
    """Whether ``name`` is selected by ``pattern``: equal to it, or matching it as a case-sensitive
    fnmatch glob. Equality first, so a name with glob characters (``blocks[0]/fc``, as TensorFlow
    and JAX exports spell them) is still selected by itself."""
    return name == pattern or fnmatch.fnmatchcase(name, pattern)


def unmatched_note(step: str, flag: str, patterns: Iterable[str], graph: gs.Graph, *, ops: bool = False,
                   names: Iterable[str] | None = None, what: str = "") -> str | None:
    """The summary note for the entries of ``patterns`` (given as ``flag``) that select nothing in
    ``graph`` or its subgraphs, with the closest selectable names; None when every entry selects
    something.

    An entry selects a name (see :func:`name_matches`) among the node names, or among ``names`` when
    given (what the option can act on, such as the layers that write a prunable group; ``what`` says
    what they are). With ``ops`` the entries are op types, compared exactly. An entry that selects
    nothing is almost always a typo or a name from another export of the model, and it would
    otherwise change nothing without a word."""
    import difflib

    patterns = list(patterns)
    if names is not None:
        known = {n for n in names if n}
    else:
        known = {n.op if ops else n.name for n, _ in iter_nodes(graph)} - {""}
    if ops:
        missing = [p for p in patterns if p not in known]
    else:
        missing = [p for p in patterns if not any(name_matches(n, p) for n in known)]
    if not missing:
        return None
    listed = ", ".join(repr(p) for p in missing)
    one = len(missing) == 1
    if ops:
        text = (f"{step}: {flag} {listed}: no node of this model has {'that op type' if one else 'those op types'}, "
                f"so {'it changes' if one else 'they change'} nothing")
    else:
        text = (f"{step}: {flag} {listed} {'matches' if one else 'match'} no {what or 'node name of this model'}, so "
                f"{'it selects' if one else 'they select'} nothing (case-sensitive fnmatch globs)")
    close = sorted({c for p in missing for c in difflib.get_close_matches(p, sorted(known), n=3)})
    return text + (f"; close names: {', '.join(close[:5])}" if close else "")


def producer(t: gs.Tensor) -> gs.Node | None:
    """The node that produces ``t``, or None for inputs and initializers."""
    return t.inputs[0] if t.inputs else None


def consumers(t: gs.Tensor) -> list[gs.Node]:
    """Every node that reads ``t`` (subgraph nodes that read it from the outer scope included)."""
    return list(t.outputs)


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs and isinstance(attrs["value"], gs.Constant):
        return peek_values(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of ``t`` if it is a constant (initializer or ``Constant`` node output), else None.

    Loads lazy values on demand; external ones are not kept in the graph (see :func:`peek_values`).
    """
    if isinstance(t, gs.Constant):
        return peek_values(t)
    p = producer(t)
    if p is not None and p.op == "Constant":
        return _constant_node_value(p)
    return None


def peek_values(t: gs.Constant) -> np.ndarray:
    """The values of a constant; tensors in external data are read from disk and not kept in the graph.

    graphsurgeon's ``Constant.values`` caches what it loads, so a pass that looks at every weight once
    would end up holding a whole external-data model (gigabytes) in memory. Here external tensors are
    read on each call and let go, so passes stream tensor by tensor; so are 4-bit tensors (graphsurgeon
    could not export them again from a cached array); other inline tensors are cached as before. To
    change a weight, assign ``constant.values`` (or replace the tensor): an array returned for an
    external tensor is a fresh copy.
    """
    v = t._values
    if isinstance(v, LazyValues) and (getattr(v.tensor, "data_location", 0) == onnx.TensorProto.EXTERNAL
                                      or v.tensor.data_type in _PACKED_TYPES):
        return v.load()
    return t.values


#: element types stored two per byte: graphsurgeon cannot export them again from a numpy array (it
#: writes one byte per value), so their lazy protos are read without caching the array in the graph
_PACKED_TYPES = frozenset(getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
                          if hasattr(onnx.TensorProto, n))


def is_constant(t: gs.Tensor) -> bool:
    """True for initializers and ``Constant`` node outputs (without loading their values)."""
    if isinstance(t, gs.Constant):
        return True
    p = producer(t)
    return p is not None and p.op == "Constant"


def is_graph_io(t: gs.Tensor, graph: gs.Graph) -> bool:
    """True when ``t`` is an input or output of ``graph`` (renaming or removing it changes the API)."""
    return any(t is x for x in graph.inputs) or any(t is x for x in graph.outputs)


def only_consumer(t: gs.Tensor, node: gs.Node) -> bool:
    """True when ``node`` is the one and only reader of ``t`` (each input slot counted)."""
    return all(c is node for c in t.outputs) and len(t.outputs) >= 1


@dataclass
class WeightRef:
    """A constant tensor that nodes consume, wherever it is stored.

    ``tensor`` is what consumers read (the initializer itself, or the ``Constant`` node's output);
    ``constant`` holds the values (the initializer, or the node's ``value`` attribute); ``node`` is
    the ``Constant`` node when there is one; ``graph`` is the graph or subgraph it lives in.
    """

    tensor: gs.Tensor
    constant: gs.Constant
    graph: gs.Graph
    node: gs.Node | None = None

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def kind(self) -> str:
        return "constant_node" if self.node is not None else "initializer"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.constant.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.constant.dtype)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def values(self) -> np.ndarray:
        """The weight's values (external data is read per call, see :func:`peek_values`)."""
        return peek_values(self.constant)

    @property
    def consumers(self) -> list[gs.Node]:
        return consumers(self.tensor)


def weight_ref(t: gs.Tensor, graph: gs.Graph) -> WeightRef | None:
    """A :class:`WeightRef` for ``t`` if it is a tensor-valued constant, else None."""
    if isinstance(t, gs.Constant):
        return WeightRef(t, t, graph)
    p = producer(t)
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return WeightRef(t, p.attrs["value"], graph, p)
    return None


def iter_weights(graph: gs.Graph, *, min_size: int = 0, float_only: bool = False) -> Iterator[WeightRef]:
    """Yield every constant weight in ``graph`` and its subgraphs, each once.

    Initializers that are also graph inputs are skipped: the user may override them at run time,
    so they are not constants (use :mod:`onnxcompress.passes.cleanup`'s ``initializers_as_inputs``
    normalization to turn them into weights). ``min_size`` filters by element count; ``float_only``
    keeps float16/32/64 tensors.
    """
    seen: set[int] = set()
    for g in iter_graphs(graph):
        inputs = {id(t) for t in g.inputs}
        candidates: list[gs.Tensor] = [t for t in g.tensors().values() if isinstance(t, gs.Constant)]
        candidates += [n.outputs[0] for n in g.nodes if n.op == "Constant" and n.outputs]
        for t in candidates:
            if id(t) in seen or id(t) in inputs:
                continue
            ref = weight_ref(t, g)
            if ref is None or not ref.consumers:
                continue
            if ref.size < min_size:
                continue
            if float_only and ref.dtype not in FLOAT_DTYPES:
                continue
            seen.add(id(t))
            yield ref
