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
   ``metadata_props["onnxcompress.plan"]`` records the channel indices kept by structured pruning:
   ``prune_channels`` / ``width`` steps (kept indices per dependency group) are first replayed on the
   source (:func:`onnxcompress.prune.channels.replay_plan`), so its weights get the destination's
   shapes and names and then match by name; per-tensor records (``tensors[name]["keep"] =
   {axis: [indices]}``) slice a source weight of the original shape before it is copied.

4. **Into a quantized destination.** A destination weight stored as ``DequantizeLinear(q, scale,
   zero_point)`` of constants (the int8 QDQ pass writes ``<name>_quantized``; int32 biases too) is
   matched to a source float weight by its base name (the ``_quantized`` suffix removed), else by the
   graph position of the dequantized tensor, and **re-quantized on the destination's grid**:
   ``q = clip(round(w / scale) + zero_point)`` with the destination's scale and zero point (axis
   and per-channel layout included), so the quantization types, scales and the graph stay as they
   are; the fraction of values that had to be clipped is reported per tensor. Scales and zero points
   (of weights and activations) are the destination's, reported as ``quant_params``; given
   calibration ``data``, the activation ranges are recalibrated (min/max on the data, the
   destination's quantized types and symmetry kept) and int32 biases re-quantized with
   ``scale = s_x · s_w``. Weights in other encodings (``Cast -> Mul`` storage chains, compact
   storage decode graphs, MatMulNBits) stay unmatched.

5. **Encoded destination weights are reported, not written.** A layer weight that the destination
   computes from constants through a decode chain (``compact_storage``'s sparse / codebook graphs,
   ``Cast -> Mul`` storage) would have to be re-pruned, re-shared and re-encoded to take new values:
   that is replaying the destination's plan on the source (``onnxcompress SRC OUT --apply-plan
   DST``), which the report's ``encoded`` list and the CLI's hint point to. The constants inside
   such chains (packed streams, codebooks, shapes) are not listed as unmatched weights.

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
from onnxcompress.graph.query import WeightRef, is_constant, iter_graphs, iter_weights

__all__ = ["TransplantReport", "transplant", "PLAN_KEY", "position_keys", "recalibrate_activations"]

PLAN_KEY = "onnxcompress.plan"


@dataclass
class TransplantReport:
    """What was copied and what was not, tensor by tensor."""

    by_name: list[str] = field(default_factory=list)
    by_position: list[tuple[str, str]] = field(default_factory=list)  # (dst, src)
    by_plan: list[tuple[str, str]] = field(default_factory=list)  # (dst, src), sliced
    requantized: list[dict[str, Any]] = field(default_factory=list)  # {dst, src, how, clipped}
    quant_params: list[str] = field(default_factory=list)  # destination scales / zero points, kept
    recalibrated: list[str] = field(default_factory=list)  # activations whose range was recalibrated
    plan_replayed: list[str] = field(default_factory=list)  # channel groups of the plan applied to the source
    mismatched: list[dict[str, Any]] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)
    unmatched_dst: list[str] = field(default_factory=list)
    unmatched_src: list[str] = field(default_factory=list)
    encoded: list[str] = field(default_factory=list)  # destination weights decoded from constants at load

    @property
    def matched(self) -> int:
        return len(self.by_name) + len(self.by_position) + len(self.by_plan) + len(self.requantized)

    def to_dict(self) -> dict[str, Any]:
        return {
            "matched": self.matched,
            "by_name": self.by_name,
            "by_position": [{"dst": d, "src": s} for d, s in self.by_position],
            "by_plan": [{"dst": d, "src": s} for d, s in self.by_plan],
            "requantized": self.requantized,
            "quant_params": self.quant_params,
            "recalibrated": self.recalibrated,
            "plan_replayed": self.plan_replayed,
            "mismatched": self.mismatched,
            "ambiguous": self.ambiguous,
            "unmatched_dst": self.unmatched_dst,
            "unmatched_src": self.unmatched_src,
            "encoded": self.encoded,
        }

    def summary(self) -> str:
        return (f"matched {self.matched} (by name {len(self.by_name)}, by position {len(self.by_position)}, "
                f"through the plan {len(self.by_plan)}, re-quantized {len(self.requantized)}); mismatched {len(self.mismatched)}, "
                f"ambiguous {len(self.ambiguous)}, unmatched in destination {len(self.unmatched_dst)}, "
                f"unused from source {len(self.unmatched_src)}"
                + (f"; {len(self.encoded)} destination weights are encoded (decoded from constants at load) and "
                   "were not written: to give them the source's values, replay the destination's plan on the "
                   "source (onnxcompress SRC OUT --apply-plan DST)" if self.encoded else ""))


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


def _encoded_weights(graph: gs.Graph) -> tuple[list[str], set[int]]:
    """``(names, ids)``: the layer weights that ``graph`` computes from constants through a decode
    chain other than DequantizeLinear (compact storage, Cast -> Mul storage) — read in a weight slot
    (:data:`~onnxcompress.quantize.storage.WEIGHT_SLOTS`) or as a Gemm / Conv bias — and the ids of
    every tensor inside those chains (their packed streams, codebooks and shape constants)."""
    from onnxcompress.quantize.storage import WEIGHT_SLOTS

    names: list[str] = []
    inside: set[int] = set()
    for g in iter_graphs(graph):
        derived: dict[int, gs.Node] = {}  # variable -> its producer, for variables computed from constants only
        for node in g.nodes:  # topological order (the importer and the pipeline keep graphs sorted)
            if node.op != "Constant" and node.inputs and next(node.subgraphs(), None) is None \
                    and all(not t.name or is_constant(t) or id(t) in derived for t in node.inputs):
                derived.update((id(t), node) for t in node.outputs)
        for node in g.nodes:
            if node.op not in WEIGHT_SLOTS:
                continue
            slots = (WEIGHT_SLOTS[node.op], 2) if node.op in ("Gemm", "Conv", "ConvTranspose") else (WEIGHT_SLOTS[node.op],)
            for t in (node.inputs[i] for i in slots if i < len(node.inputs)):
                if id(t) not in derived or derived[id(t)].op == "DequantizeLinear" or t.name in names:
                    continue
                names.append(t.name)
                stack = [derived[id(t)]]
                while stack:
                    for i in stack.pop().inputs:
                        if id(i) not in inside:
                            inside.add(id(i))
                            if id(i) in derived:
                                stack.append(derived[id(i)])
    return names, inside


def _set_values(ref: WeightRef, values: np.ndarray) -> None:
    values = np.ascontiguousarray(values.astype(ref.dtype, copy=False))
    if ref.node is not None:
        ref.node.attrs["value"] = gs.Constant(ref.constant.name or ref.name, values)
    else:
        ref.constant.values = values


def _replay_channel_plan(src_graph: gs.Graph, dst: onnx.ModelProto) -> list[str]:
    """Apply the destination plan's structured-pruning steps (``prune_channels`` / ``width`` /
    ``drop_dead_channels``: kept
    indices per dependency group) to the source graph, so its weights get the destination's shapes
    and names; return the groups applied. A plan that does not fit the source changes nothing."""
    raw = next((p.value for p in dst.metadata_props if p.key == PLAN_KEY), None)
    if not raw:
        return []
    try:
        plan = json.loads(raw)
    except json.JSONDecodeError:
        return []
    if not isinstance(plan, dict) or not isinstance(plan.get("steps"), list):
        return []
    from onnxcompress.errors import OnnxCompressError
    from onnxcompress.passes.base import cleanup_graph
    from onnxcompress.prune.channels import replay_plan
    from onnxcompress.transfer.replay import CHANNEL_STEPS, plan_steps

    done: list[str] = []
    try:
        steps = plan_steps(plan)
    except OnnxCompressError:
        return []
    for step in steps:
        groups = step.details.get("groups") if step.config.name in CHANNEL_STEPS else None
        if not groups:
            continue
        trial = src_graph.copy()
        try:
            replay_plan(trial, groups)
        except OnnxCompressError:
            return done
        replay_plan(src_graph, groups)
        cleanup_graph(src_graph)
        done += [g["group"] for g in groups]
    return done


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


def _by_position(src_graph: gs.Graph, src_refs: list, dst_graph: gs.Graph, dst_refs: list, todo: list
                 ) -> list[tuple[Any, Any, str]]:
    """``(destination, source or None, "match" | "ambiguous" | "none")`` for each of ``todo`` by
    :func:`position_keys`: a match needs exactly one source and one destination with the key."""
    skeys = position_keys(src_graph, src_refs)
    dkeys = position_keys(dst_graph, dst_refs)
    src_by_key: dict[tuple, list] = defaultdict(list)
    for s in src_refs:
        if id(s) in skeys:
            src_by_key[skeys[id(s)]].append(s)
    dst_key_count = Counter(dkeys[id(d)] for d in todo if id(d) in dkeys)
    out = []
    for d in todo:
        key = dkeys.get(id(d))
        cands = src_by_key.get(key, []) if key is not None else []
        if len(cands) == 1 and dst_key_count[key] == 1:
            out.append((d, cands[0], "match"))
        elif len(cands) > 1 or (key is not None and dst_key_count[key] > 1):
            out.append((d, None, "ambiguous"))
        else:
            out.append((d, None, "none"))
    return out


def transplant(source: ModelLike, destination: ModelLike, *, by_position: bool = True, data: Any = None
               ) -> tuple[onnx.ModelProto, TransplantReport]:
    """Copy ``source``'s weights into ``destination``; return the new model and the report.

    ``data`` (calibration feeds, any form :func:`onnxcompress.data.as_feed_source` takes): when the
    destination is quantized and weights were re-quantized, its activation ranges are recalibrated
    on it (see :func:`recalibrate_activations`). Neither argument is modified.
    """
    src_ms, dst_ms = open_model(source), open_model(destination)
    src_graph, dst_graph = model_to_graph(src_ms), model_to_graph(dst_ms)
    rep_groups = _replay_channel_plan(src_graph, dst_ms.model)
    src_refs = list(iter_weights(src_graph))
    encoded, inside = _encoded_weights(dst_graph)
    dst_refs = [r for r in iter_weights(dst_graph) if id(r.tensor) not in inside]
    slices = _plan_slices(dst_ms.model)
    rep = TransplantReport()
    rep.encoded = encoded
    rep.plan_replayed = rep_groups
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

    todo = _requantize(src_graph, dst_graph, src_refs, dst_refs, todo, used_src, rep, by_position)
    if by_position and todo:
        remaining_src = [s for s in src_refs if id(s) not in used_src]
        for d, s, status in _by_position(src_graph, remaining_src, dst_graph, dst_refs, todo):
            if status == "match":
                _set_values(d, s.values)
                rep.by_position.append((d.name, s.name))
                used_src.add(id(s))
            elif status == "ambiguous":
                rep.ambiguous.append(d.name)
            else:
                rep.unmatched_dst.append(d.name)
    else:
        rep.unmatched_dst.extend(d.name for d in todo)
    rep.unmatched_src = [s.name for s in src_refs if id(s) not in used_src]
    out = graph_to_model(dst_graph, dst_ms.model)
    if rep.requantized:
        _rescale_int32_biases(out, {t.name: t for t in out.graph.initializer})
    if data is not None and rep.requantized:
        rep.recalibrated = recalibrate_activations(out, data)
    return out, rep


# ----------------------------------------------------------------------------------------------
# into a quantized destination


@dataclass
class _Dequantized:
    """A destination weight stored as DequantizeLinear(q, scale, zero_point): looks like a WeightRef
    (``tensor``, ``consumers``, ``shape``, ``dtype``) for :func:`position_keys`."""

    dq: gs.Node
    q: WeightRef
    graph: gs.Graph

    @property
    def tensor(self) -> gs.Tensor:
        return self.dq.outputs[0]

    @property
    def consumers(self) -> list[gs.Node]:
        return list(self.dq.outputs[0].outputs)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def base(self) -> str:
        import re

        return re.sub(r"_quantized(_\d+)?$", "", self.q.name)


def _dequantized_weights(graph: gs.Graph, todo_ids: set[int]) -> list[_Dequantized]:
    """DequantizeLinear nodes reading an integer weight still unmatched, with constant scale/zero point."""
    from onnxcompress.graph.query import weight_ref

    out = []
    for g in iter_graphs(graph):
        for node in g.nodes:
            if node.op != "DequantizeLinear" or not node.inputs or not node.outputs:
                continue
            q = weight_ref(node.inputs[0], g)
            if q is None or id(q.tensor) not in todo_ids or q.dtype.kind not in "iu" or q.dtype.itemsize > 4:
                continue
            if any(weight_ref(t, g) is None for t in node.inputs[1:] if t.name):
                continue
            if int(node.attrs.get("block_size", 0) or 0) or len(q.consumers) != 1:
                continue
            out.append(_Dequantized(node, q, g))
    return out


def _requantize_one(d: _Dequantized, values: np.ndarray) -> float:
    """Write ``values`` (float) into ``d``; return the fraction of clipped values.

    Integer weights of at most 16 bits get their scale recomputed from ``values`` the way the
    destination's grid was made (same axis; symmetric ``scale = max|w| / max|q − zp|`` over the
    other axes when the zero point is 0, else ``(max − min) / (qmax − qmin)`` with a new zero point);
    int32 tensors (biases) keep their grid (see :func:`_rescale_int32_biases`).
    """
    from onnxcompress.graph.query import weight_ref
    from onnxcompress.transfer.reconstruct import dq_params

    w = values.astype(np.float64)
    info = np.iinfo(d.q.dtype)
    if d.q.dtype.itemsize <= 2:
        s_ref = weight_ref(d.dq.inputs[1], d.graph)
        z_in = d.dq.inputs[2] if len(d.dq.inputs) > 2 and d.dq.inputs[2].name else None
        z_ref = weight_ref(z_in, d.graph) if z_in is not None else None
        s_old = np.asarray(s_ref.values)
        z_old = np.asarray(z_ref.values) if z_ref is not None else np.zeros(s_old.shape, d.q.dtype)
        axis = int(d.dq.attrs.get("axis", 1)) % w.ndim if s_old.size > 1 else None
        red = tuple(i for i in range(w.ndim) if i != axis)
        keep = [1] * w.ndim
        if axis is not None:
            keep[axis] = -1
        if not np.any(z_old):
            qmax = float(np.max(np.abs(d.q.values.astype(np.int64)))) or float(info.max)
            qmax = 127.0 if info.max == 127 and qmax >= 127 else (float(info.max) if qmax > info.max // 2 else qmax)
            scale = np.max(np.abs(w), axis=red) / qmax
            zp = np.zeros_like(scale)
        else:
            lo, hi = np.minimum(np.min(w, axis=red), 0.0), np.maximum(np.max(w, axis=red), 0.0)
            scale = (hi - lo) / (info.max - info.min)
            zp = np.round(info.min - lo / np.where(scale > 0, scale, 1.0))
        fallback = np.asarray(s_old, np.float64).reshape(scale.shape) if s_old.size == scale.size else 1.0
        scale = np.where(scale > 0, scale, fallback)
        _set_values(s_ref, scale.reshape(s_old.shape).astype(s_old.dtype))
        if z_ref is not None:
            _set_values(z_ref, np.clip(zp, info.min, info.max).reshape(z_old.shape).astype(z_old.dtype))
    _, scale_b, zp_b = dq_params(d.dq, d.graph)
    raw = np.round(w / scale_b + zp_b)
    clipped = float(np.mean((raw < info.min) | (raw > info.max))) if raw.size else 0.0
    _set_values(d.q, np.clip(raw, info.min, info.max).astype(d.q.dtype))
    return clipped


def _requantize(src_graph: gs.Graph, dst_graph: gs.Graph, src_refs: list[WeightRef], dst_refs: list[WeightRef],
                todo: list[WeightRef], used_src: set[int], rep: TransplantReport, by_position: bool) -> list[WeightRef]:
    """Match quantized destination weights (by base name, then position) and re-quantize them; return
    the weights still to match."""
    qparam_ids = {id(t) for g in iter_graphs(dst_graph) for n in g.nodes
                  if n.op in ("QuantizeLinear", "DequantizeLinear") for t in n.inputs[1:]}
    qparams = [t for t in todo if id(t.tensor) in qparam_ids and all(
        c.op in ("QuantizeLinear", "DequantizeLinear") and c.inputs[0] is not t.tensor for c in t.consumers)]
    rep.quant_params.extend(t.name for t in qparams)
    todo = [t for t in todo if all(t is not q for q in qparams)]
    deq = _dequantized_weights(dst_graph, {id(d.tensor) for d in todo})
    if not deq:
        return todo
    done: set[int] = set()
    src_by_name = {r.name: r for r in src_refs if id(r) not in used_src and r.dtype.kind == "f"}
    left = []
    for d in deq:
        s = src_by_name.get(d.base)
        if s is not None and s.shape == d.shape and id(s) not in used_src:
            rep.requantized.append({"dst": d.q.name, "src": s.name, "how": "name",
                                    "clipped": round(_requantize_one(d, s.values), 6)})
            used_src.add(id(s))
            done.add(id(d.q.tensor))
        else:
            left.append(d)
    if by_position and left:
        remaining = [s for s in src_refs if id(s) not in used_src and s.dtype.kind == "f"]
        others = [r for r in dst_refs if id(r.tensor) not in {id(x.q.tensor) for x in deq}]
        for d, s, status in _by_position(src_graph, remaining, dst_graph, [*others, *left], left):
            if status == "match":
                rep.requantized.append({"dst": d.q.name, "src": s.name, "how": "position",
                                        "clipped": round(_requantize_one(d, s.values), 6)})
                used_src.add(id(s))
                done.add(id(d.q.tensor))
    return [t for t in todo if id(t.tensor) not in done]


def recalibrate_activations(model: onnx.ModelProto, data: Any) -> list[str]:
    """Recalibrate, in place, every activation ``QuantizeLinear(x, scale, zero_point)`` of ``model``
    (constant per-tensor scale and zero point) from min/max of ``x`` on ``data``, measured on the float
    path (every activation Q -> DQ pair bypassed); return their names.

    Types are kept, and a range that started at 0 (zero point at the type's minimum: a Relu fused into
    the Q) keeps starting at 0: ``uint8`` zero points give ``scale = (hi − lo)/255, zp = round(−lo/scale)`` over
    ``[min(lo, 0), max(hi, 0)]``; an ``int8`` zero point of 0 gives ``scale = max|x|/127``; any other
    ``int8`` zero point ``zp = round(−128 − lo/scale)``. DequantizeLinear nodes read the same
    initializers, so each Q/DQ pair stays consistent. Then every int32 bias ``DequantizeLinear`` read by
    a Gemm/Conv whose input and weight are dequantized gets ``s_b = s_x · s_w`` and
    ``q_b = round(b / s_b)`` for its current float value ``b``.
    """
    from onnx import numpy_helper

    from onnxcompress.data import as_feed_source
    from onnxcompress.verify.layers import expose_tensors
    from onnxcompress.verify.session import make_session, run_session

    inits = {t.name: t for t in model.graph.initializer}
    targets: dict[str, tuple[str, str]] = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) >= 3 and n.input[1] in inits and n.input[2] in inits:
            if numpy_helper.to_array(inits[n.input[1]]).size == 1 and n.input[0] not in inits:
                targets.setdefault(n.input[0], (n.input[1], n.input[2]))
    if not targets:
        return []
    names = list(targets)
    # ranges are measured on the float path (each activation Q -> DQ pair bypassed), so no layer sees
    # its input clipped by a range that is about to change
    float_path = onnx.ModelProto()
    float_path.CopyFrom(model)
    q_in = {n.output[0]: n.input[0] for n in float_path.graph.node if n.op_type == "QuantizeLinear"}
    bypass = {n.output[0]: q_in[n.input[0]] for n in float_path.graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in q_in}
    outputs = {o.name for o in float_path.graph.output}
    for n in float_path.graph.node:
        n.input[:] = [bypass[x] if x in bypass and x not in outputs else x for x in n.input]
    exposed, _ = expose_tensors(float_path, names)
    sess = make_session(exposed, "cpu", optimize=False)
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)
    for feed in as_feed_source(data, model=model):
        for name, v in run_session(sess, feed, names).items():
            lo[name], hi[name] = min(lo[name], float(np.min(v))), max(hi[name], float(np.max(v)))
    done = []
    for name, (s_name, z_name) in targets.items():
        if not np.isfinite(lo[name]):
            continue
        zp_old = numpy_helper.to_array(inits[z_name])
        a, b = min(lo[name], 0.0), max(hi[name], 0.0)
        if np.all(zp_old == np.iinfo(zp_old.dtype).min):
            a = 0.0  # a range that starts at 0 (a Relu fused into the Q): values below are clipped on purpose
        if zp_old.dtype == np.int8 and not np.any(zp_old):
            scale, zp = max(abs(a), abs(b)) / 127.0, 0
        else:
            scale = (b - a) / 255.0
            base = -128 if zp_old.dtype == np.int8 else 0
            zp = round(base - a / scale) if scale > 0 else base
        if scale <= 0:
            continue
        s_dtype = numpy_helper.to_array(inits[s_name]).dtype
        inits[s_name].CopyFrom(numpy_helper.from_array(np.array(scale, s_dtype).reshape(
            numpy_helper.to_array(inits[s_name]).shape), s_name))
        inits[z_name].CopyFrom(numpy_helper.from_array(np.array(zp, zp_old.dtype).reshape(zp_old.shape), z_name))
        done.append(name)
    _rescale_int32_biases(model, inits)
    return done


def _rescale_int32_biases(model: onnx.ModelProto, inits: dict) -> None:
    from onnx import numpy_helper

    dq_of = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}

    def scale_of(tensor: str) -> np.ndarray | None:
        n = dq_of.get(tensor)
        if n is None or n.input[1] not in inits:
            return None
        return numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)

    for n in model.graph.node:
        if n.op_type not in ("Gemm", "Conv") or len(n.input) < 3:
            continue
        bdq = dq_of.get(n.input[2])
        if bdq is None or bdq.input[0] not in inits or bdq.input[1] not in inits:
            continue
        qb = numpy_helper.to_array(inits[bdq.input[0]])
        sx, sw = scale_of(n.input[0]), scale_of(n.input[1])
        if qb.dtype != np.int32 or sx is None or sw is None:
            continue
        sb_old = numpy_helper.to_array(inits[bdq.input[1]])
        b = qb.astype(np.float64) * sb_old.astype(np.float64)
        sb = (sx.reshape(-1)[0] * sw).reshape(sb_old.shape) if sw.size == sb_old.size else None
        if sb is None or np.any(sb <= 0):
            continue
        q = np.clip(np.round(b / sb), np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        inits[bdq.input[0]].CopyFrom(numpy_helper.from_array(q, bdq.input[0]))
        inits[bdq.input[1]].CopyFrom(numpy_helper.from_array(sb.astype(sb_old.dtype), bdq.input[1]))
