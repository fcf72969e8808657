"""Parameter transfer: copy trained weights from a SOURCE model into a DESTINATION graph.

Matching, in order, each source and destination weight used at most once:

1. **By name.** A destination weight whose name is also a source weight's name receives it when
   dtype and shape agree. Same name but a different shape or dtype is *mismatched* (reported, not
   copied) — unless the destination's recorded plan says how the shapes relate (see below).
2. **By graph position.** Two exports of one architecture usually differ only in tensor names. Each
   remaining weight gets a position key: ``(consumer op type, input slot, ordinal of that consumer
   among the weighted nodes of its op type in topological order, shape, dtype)``. A destination weight
   whose key is held by exactly one remaining source weight receives it. A key held by several
   weights on either side is *ambiguous* and nothing is copied for it — never a nearest-name guess.
3. **Through the destination's plan.** When the destination was compressed by onnxcompress, its
   ``metadata_props["onnxcompress.plan"]`` records, per tensor, the channel indices kept by
   structured pruning (``keep: {axis: [indices]}``). A source weight of the original shape is
   sliced with those indices before it is copied.

Weights are found with :func:`onnxcompress.graph.query.iter_weights`, so initializers, ``Constant``
nodes and weights inside If/Loop/Scan bodies all take part. The result is the destination model with
new values and a :class:`TransplantReport` listing matched (and how), unmatched and mismatched
tensors.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.errors import ModelError
from onnxcompress.graph.io import ModelLike, graph_to_model, model_to_graph, open_model
from onnxcompress.graph.query import WeightRef, iter_graphs, iter_weights

__all__ = ["TransplantReport", "transplant", "PLAN_KEY", "position_keys"]

PLAN_KEY = "onnxcompress.plan"


@dataclass
class TransplantReport:
    """What was copied and what was not, tensor by tensor."""

    by_name: list[str] = field(default_factory=list)
    by_position: list[tuple[str, str]] = field(default_factory=list)  # (dst, src)
    by_plan: list[tuple[str, str]] = field(default_factory=list)  # (dst, src), sliced
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    unmatched_dst: list[str] = field(default_factory=list)
    unmatched_src: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return len(self.by_name) + len(self.by_position) + len(self.by_plan)

    def to_dict(self) -> dict[str, Any]:
        return {
            "matched": self.matched,
            "by_name": self.by_name,
            "by_position": [{"dst": d, "src": s} for d, s in self.by_position],
            "by_plan": [{"dst": d, "src": s} for d, s in self.by_plan],
            "mismatched": self.mismatched,
            "ambiguous": self.ambiguous,
            "unmatched_dst": self.unmatched_dst,
            "unmatched_src": self.unmatched_src,
        }

    def summary(self) -> str:
        return (f"matched {self.matched} (by name {len(self.by_name)}, by position {len(self.by_position)}, "
                f"through the plan {len(self.by_plan)}); mismatched {len(self.mismatched)}, "
                f"ambiguous {len(self.ambiguous)}, unmatched in destination {len(self.unmatched_dst)}, "
                f"unused from source {len(self.unmatched_src)}")


def position_keys(graph: gs.Graph, refs: list[WeightRef]) -> dict[int, tuple]:
    """``id(ref) -> (op, slot, ordinal, shape, dtype)`` for weights with one consumer.

    The ordinal counts, in topological order, the nodes of the same op type that read at least one
    weight, per (sub)graph depth, so the same layer in two exports gets the same key.
    """
    ordinal: dict[int, int] = {}
    counters: dict[tuple[int, str], int] = Counter()
    weight_ids = {id(r.tensor) for r in refs}
    for depth, g in enumerate(iter_graphs(graph)):
        g.toposort(recurse_subgraphs=False)
        for node in g.nodes:
            if any(id(t) in weight_ids for t in node.inputs):
                key = (depth, node.op)
                ordinal[id(node)] = counters[key]
                counters[key] += 1
    keys = {}
    for r in refs:
        cons = r.consumers
        if len(cons) != 1:
            continue
        node = cons[0]
        slot = next(i for i, t in enumerate(node.inputs) if t is r.tensor)
        keys[id(r)] = (node.op, slot, ordinal.get(id(node), -1), r.shape, str(r.dtype))
    return keys


def _set_values(ref: WeightRef, values: np.ndarray) -> None:
    values = np.ascontiguousarray(values.astype(ref.dtype, copy=False))
    if ref.node is not None:
        ref.node.attrs["value"] = gs.Constant(ref.constant.name or ref.name, values)
    else:
        ref.constant.values = values


def _plan_slices(model: onnx.ModelProto) -> dict[str, dict[int, list[int]]]:
    """``tensor name -> {axis: kept indices}`` from an onnxcompress plan in the metadata, if any."""
    raw = next((p.value for p in model.metadata_props if p.key == PLAN_KEY), None)
    if not raw:
        return {}
    try:
        plan = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelError(f"metadata {PLAN_KEY!r} is not valid JSON", where="transfer",
                         hint="the destination's plan is corrupt; re-export it") from e
    out: dict[str, dict[int, list[int]]] = {}
    for tensor, spec in (plan.get("tensors") or {}).items():
        keep = spec.get("keep") if isinstance(spec, dict) else None
        if isinstance(keep, dict):
            out[tensor] = {int(axis): list(map(int, idx)) for axis, idx in keep.items()}
    return out


def transplant(source: ModelLike, destination: ModelLike, *, by_position: bool = True
               ) -> tuple[onnx.ModelProto, TransplantReport]:
    """Copy ``source``'s weights into ``destination``; return the new model and the report.

    Neither argument is modified.
    """
    src_ms, dst_ms = open_model(source), open_model(destination)
    src_graph, dst_graph = model_to_graph(src_ms), model_to_graph(open_model(dst_ms.model, base_dir=dst_ms.base_dir))
    src_refs = list(iter_weights(src_graph))
    dst_refs = list(iter_weights(dst_graph))
    slices = _plan_slices(dst_ms.model)
    rep = TransplantReport()
    src_by_name = {r.name: r for r in src_refs}
    used_src: set[int] = set()
    todo: list[WeightRef] = []

    for d in dst_refs:
        s = src_by_name.get(d.name)
        if s is None:
            todo.append(d)
            continue
        if s.shape == d.shape and s.dtype == d.dtype:
            _set_values(d, s.values)
            rep.by_name.append(d.name)
            used_src.add(id(s))
        elif d.name in slices and s.dtype == d.dtype:
            values = s.values
            for axis, idx in sorted(slices[d.name].items()):
                values = np.take(values, idx, axis=axis)
            if values.shape != d.shape:
                rep.mismatched.append({"tensor": d.name, "source_shape": list(s.shape), "destination_shape":
                                       list(d.shape), "reason": "the plan's kept indices do not give this shape"})
            else:
                _set_values(d, values)
                rep.by_plan.append((d.name, s.name))
            used_src.add(id(s))
        else:
            rep.mismatched.append({"tensor": d.name, "source_shape": list(s.shape), "destination_shape": list(d.shape),
                                   "source_dtype": str(s.dtype), "destination_dtype": str(d.dtype),
                                   "reason": "same name, different shape or dtype"})
            used_src.add(id(s))

    if by_position and todo:
        remaining_src = [s for s in src_refs if id(s) not in used_src]
        skeys = position_keys(src_graph, remaining_src)
        dkeys = position_keys(dst_graph, dst_refs)
        src_by_key: dict[tuple, list[WeightRef]] = defaultdict(list)
        for s in remaining_src:
            if id(s) in skeys:
                src_by_key[skeys[id(s)]].append(s)
        dst_key_count = Counter(dkeys[id(d)] for d in todo if id(d) in dkeys)
        for d in todo:
            key = dkeys.get(id(d))
            cands = src_by_key.get(key, []) if key is not None else []
            if len(cands) == 1 and dst_key_count[key] == 1:
                s = cands[0]
                _set_values(d, s.values)
                rep.by_position.append((d.name, s.name))
                used_src.add(id(s))
            elif len(cands) > 1 or (key is not None and dst_key_count[key] > 1):
                rep.ambiguous.append(d.name)
            else:
                rep.unmatched_dst.append(d.name)
    else:
        rep.unmatched_dst.extend(d.name for d in todo)
    rep.unmatched_src = [s.name for s in src_refs if id(s) not in used_src]
    out = graph_to_model(dst_graph, dst_ms.model)
    return out, rep
