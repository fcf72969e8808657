"""Size-only integer storage (``--storage int8|int4``): smaller files, fp32 numerics and speed.

Rule. A float weight ``W`` with channel axis ``a`` is stored as symmetric integers and a float scale
per channel (or per block of ``block`` elements of one channel, see
:func:`onnxcompress.quantize.params.block_view`)::

    s = max|W| / qmax          (int8: qmax = 127, int4: qmax = 7; over the channel or the block)
    Q = clip(round(W / s), -qmax, qmax)
    W' = Q * s                 (what the model computes with, exactly)

Symmetric, so an exact zero stays an exact zero (a later compact sparse encoder relies on that).
The model decodes ``W'`` with plain ops that onnxruntime constant-folds when it loads the model
(graph optimizations BASIC and above, the default), after which it runs as fast as fp32:

* int8, per channel: ``Cast(Q:int8 -> float) -> Mul(s)``;
* int8, block-wise:  ``Cast(Q:int8[view]) -> Mul(s[view]) -> Reshape(shape)``;
* int4 (any opset): two codes per byte, ``P = (Q[0::2] + 8) + 16 (Q[1::2] + 8)`` stored as uint8
  ``[n/2, 1]`` and decoded with integer arithmetic ``hi = P div 16``, ``lo = P - 16 hi``,
  ``Concat(lo, hi) -> Reshape(-1) [-> Concat(odd last code)] -> Sub(8) -> Cast(float) -> Reshape(view)
  -> Mul(s) [-> Reshape(shape)]``.

With graph optimizations disabled onnxruntime decodes at every run (much slower): keep the default
optimization level. Which weights: inputs in the weight slot of the configured op types (MatMul B,
Gemm B, Conv/ConvTranspose W, Gather data) whose every consumer reads them in such a slot; graph
outputs and tiny tensors stay float. :func:`encode_weight` builds the decode subgraph for one weight
so other passes (dynamic int8 for Conv, embeddings) can call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import WeightRef, is_graph_io, iter_weights
from onnxcompress.graph.rewrite import replace_all_uses
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.quantize.config import StorageConfig
from onnxcompress.quantize.params import block_view, contiguous, nonfinite_reason

__all__ = ["StoragePass", "EncodedWeight", "encode_weight", "store_weight", "storage_check", "weight_axis",
           "WEIGHT_SLOTS", "encode_values"]

#: op type -> the input index that holds the weight
WEIGHT_SLOTS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}

_QMAX = {"int8": 127, "int4": 7}


def weight_axis(node: gs.Node, ndim: int) -> int:
    """The output-channel axis of ``node``'s weight (its scale axis)."""
    op = node.op
    if op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if ndim > 1 else 0
    if op == "Gather":
        return int(node.attrs.get("axis", 0)) % max(ndim, 1)
    return ndim - 1  # MatMul: one scale per output column


@dataclass
class EncodedWeight:
    """What :func:`encode_weight` made: the float tensor to read, and the plan entry."""

    output: gs.Variable
    nodes: list[gs.Node]
    info: dict


def encode_values(w: np.ndarray, *, bits: str, axis: int, block: int) -> tuple[np.ndarray, np.ndarray, tuple | None]:
    """Symmetric integer codes and scales of ``w``: ``(q[view or shape], scale[broadcastable], view)``."""
    qmax = _QMAX[bits]
    w = np.asarray(w, dtype=np.float32)
    view = block_view(w.shape, axis, block) if block else None
    if view is not None:
        v = w.reshape(view[0])
        red = 3 if len(view[0]) == 4 else 1
        amax = np.abs(v).max(axis=red, keepdims=True)
    else:
        v = w
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(v).max(axis=red, keepdims=True) if w.ndim else np.abs(v)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.round(v / scale), -qmax, qmax).astype(np.int8)
    return q, scale, (view[0] if view is not None else None)


def encode_weight(graph: gs.Graph, namer: Namer, values: np.ndarray, *, base: str, bits: str = "int8",
                  axis: int = 0, block: int = 0) -> EncodedWeight:
    """Build the decode subgraph of one weight in ``graph``; the caller rewires readers to ``output``.

    ``block`` 0 means one scale per channel along ``axis``; a block length that does not divide the
    channel falls back to per channel (``info["block"]`` says which was used).
    """
    values = np.asarray(values)
    dtype = values.dtype
    q, scale, view = encode_values(values, bits=bits, axis=axis, block=block)
    nodes: list[gs.Node] = []

    def const(arr, suffix):
        return gs.Constant(namer.fresh(base, suffix), contiguous(arr))

    def var(suffix, dt=np.float32):
        return gs.Variable(namer.fresh(base, suffix), dtype=dt)

    def node(op, inputs, out, **attrs):
        nodes.append(gs.Node(op, name=namer.fresh(base, op.lower()), inputs=inputs, outputs=[out], attrs=attrs))
        return out

    if bits == "int8":
        codes = node("Cast", [const(q, "int8")], var("int8_cast", dtype), to=_onnx_type(dtype))
    else:
        flat = q.reshape(-1).astype(np.int16) + 8
        n = flat.size
        tail = flat[n - 1:].astype(np.int32) if n % 2 else None  # an odd last code is stored alone
        flat = flat[: n - (n % 2)]
        packed = (flat[0::2] + 16 * flat[1::2]).astype(np.uint8).reshape(-1, 1)
        p = node("Cast", [const(packed, "int4x2")], var("p32", np.int32), to=_onnx_type(np.int32))
        hi = node("Div", [p, const(np.array(16, np.int32), "sixteen")], var("hi", np.int32))
        hi16 = node("Mul", [hi, const(np.array(16, np.int32), "sixteen_b")], var("hi16", np.int32))
        lo = node("Sub", [p, hi16], var("lo", np.int32))
        pairs = node("Concat", [lo, hi], var("pairs", np.int32), axis=1)
        flat_t = node("Reshape", [pairs, const(np.array([-1], np.int64), "flat_shape")], var("flat", np.int32))
        if tail is not None:
            flat_t = node("Concat", [flat_t, const(tail, "tail")], var("all", np.int32), axis=0)
        signed = node("Sub", [flat_t, const(np.array(8, np.int32), "eight")], var("signed", np.int32))
        codes = node("Cast", [signed], var("int4_cast", dtype), to=_onnx_type(dtype))
        codes = node("Reshape", [codes, const(np.array(q.shape, np.int64), "code_shape")], var("codes", dtype))
    out = node("Mul", [codes, const(scale.astype(dtype), "scale")], var("decoded", dtype))
    if view is not None:
        out = node("Reshape", [out, const(np.array(values.shape, np.int64), "shape")], var("decoded_r", dtype))
    graph.nodes.extend(nodes)
    decoded = (q.astype(np.float32) * scale).reshape(values.shape)
    stored = q.size if bits == "int8" else q.size // 2 + 4 * (q.size % 2)
    info = {"bits": bits, "axis": int(axis), "block": int(block) if view is not None else 0,
            "scales": int(scale.size), "stored_bytes": int(stored + scale.size * scale.itemsize),
            "float_bytes": int(values.nbytes),
            "max_abs_err": float(np.max(np.abs(decoded - values))) if values.size else 0.0}
    return EncodedWeight(out, nodes, info)


def _onnx_type(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def storage_check(w: WeightRef, ops: tuple[str, ...], min_elements: int) -> tuple[np.ndarray | None, str | None]:
    """May ``w`` be stored as integers? ``(values, None)`` if yes, else ``(None, reason)``.

    The values are read once, after the checks that need none of them, and only for the finiteness
    check and the encoding that follows (an external weight is read from disk on each access)."""
    if w.size < min_elements:
        return None, f"{w.size} elements < min_elements {min_elements}"
    if w.dtype not in (np.float32, np.float16):
        return None, f"dtype {w.dtype} is not float32/float16"
    if is_graph_io(w.tensor, w.graph):
        return None, "it is a graph output"
    for c in w.consumers:
        slot = WEIGHT_SLOTS.get(c.op)
        if c.op not in ops or slot is None or len(c.inputs) <= slot or c.inputs[slot] is not w.tensor:
            return None, f"read by {c.op} {c.name!r} outside a weight slot of {', '.join(ops)}"
        if any(i != slot and t is w.tensor for i, t in enumerate(c.inputs)):
            return None, f"read twice by {c.op} {c.name!r}"
    values = w.values
    bad = nonfinite_reason(values, "it")
    return (None, bad) if bad else (values, None)


def store_weight(w: WeightRef, values: np.ndarray, top: gs.Graph, namer: Namer, **encoding) -> EncodedWeight:
    """Encode ``w`` (:func:`encode_weight`) and make every reader read the decoded tensor.

    The decode goes where every reader sees it: in ``w``'s graph, or, for an initializer read from
    several graphs (both branches of an If), in ``top``, whose scope they all see. Found in the branch
    that listed it first, it would be invisible to the other branch (an invalid model)."""
    here = {id(n) for n in w.graph.nodes}
    where = w.graph if w.node is not None or all(id(c) in here for c in w.consumers) else top
    enc = encode_weight(where, namer, values, base=w.name, **encoding)
    replace_all_uses(w.tensor, enc.output)
    return enc


class StoragePass(Pass):
    config_cls = StorageConfig
    lossless = False

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        cfg: StorageConfig = self.config
        res = PassResult()
        namer = Namer.for_graph(graph)
        plan = []
        for w in list(iter_weights(graph, float_only=True)):
            if not any(c.op in WEIGHT_SLOTS for c in w.consumers):
                continue
            values, reason = storage_check(w, cfg.ops, cfg.min_elements)
            if reason:
                res.skip(w.name, "storage", reason)
                plan.append({"weight": w.name, "stored": False, "reason": reason})
                continue
            axis = weight_axis(w.consumers[0], len(w.shape))
            enc = store_weight(w, values, graph, namer, bits=cfg.bits, axis=axis, block=cfg.block)
            info = {"weight": w.name, "stored": True, "kind": w.kind, "shape": list(w.shape), **enc.info}
            if cfg.block and not enc.info["block"]:
                info["note"] = f"length along the channel is not a multiple of {cfg.block}: one scale per channel"
            plan.append(info)
            res.changed(f"{w.name}: {cfg.bits} storage, {enc.info['float_bytes']} -> {enc.info['stored_bytes']} bytes")
        res.details = {"storage": plan}
        return res
