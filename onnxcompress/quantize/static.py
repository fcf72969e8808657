"""``quantize_int8``: static QDQ int8 with streamed calibration, or dynamic int8 without data.

**Static** (calibration data in the context). For each MatMul / Gemm / Conv / ConvTranspose that may
be quantized (constant float weight, not excluded, see :meth:`QuantizeInt8Pass._check`):

* activation inputs: ``x -> Q(s_x, z_x) -> DQ`` with ``[lo, hi]`` from calibration and the seed's
  affine rule (:mod:`onnxcompress.quantize.params`), uint8 by default;
* weight: int8 symmetric, per output channel by default, ``DQ(W_q, s_w, 0, axis)``;
* bias (Gemm, Conv): int32 ``round(b / (s_x s_w))`` through ``DQ(b_q, s_x s_w, 0)``;
* output: ``Q -> DQ`` with its own calibrated range. A Relu (or Clip(0, .)) that is the only reader
  of the output is removed and the output takes the Relu's range: with ``zero_point = qmin`` the
  saturating Q computes ``max(x, 0)`` itself. Exception (``matmul_float_output``, on by default): a
  MatMul whose output only float ops read (a bias Add, a Softmax) keeps a float output — onnxruntime
  runs ``DQ(x), DQ(W) -> MatMul [-> Add(bias)]`` as one MatMulIntegerToFloat with the bias fused,
  which saves a Q/DQ pair and a rounding step.

Between quantized layers the chain stays integer (:mod:`onnxcompress.quantize.policy`): ops that keep
their input's scale (Reshape, Transpose, Flatten, Squeeze, Unsqueeze, MaxPool) reuse the input's
parameters; Concat, Resize, Average/GlobalAveragePool and an Add of two quantized tensors get their
own range. Such an op is included only when its input is already quantized and its output leads to
a quantized layer. Transformer-sensitive ops (LayerNorm and its decomposition, Softmax, GELU/Erf,
residual Adds, embedding Gathers) stay float by default. Weights inside If/Loop bodies cannot be
calibrated through extra outputs: MatMul/Gemm there get dynamic int8, Conv int8 storage.

**Dynamic** (no data): MatMul/Gemm -> DynamicQuantizeLinear + MatMulInteger
(:mod:`onnxcompress.quantize.dynamic`), Conv/ConvTranspose -> size-only int8 storage
(:mod:`onnxcompress.quantize.storage`). Activation ranges are never guessed from random inputs.

The plan (:mod:`onnxcompress.quantize.plan`) is written into ``PassResult.details["plan"]``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.errors import CalibrationError
from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import (const_value, consumers, is_constant, is_graph_io, iter_graphs, iter_weights,
                                      name_matches)
from onnxcompress.graph.rewrite import disconnect, replace_output
from onnxcompress.passes.base import Pass, PassResult, cleanup_graph
from onnxcompress.quantize import policy
from onnxcompress.quantize.calibrate import Calibrator, collect_stats, model_fingerprint
from onnxcompress.quantize.config import QuantizeInt8Config
from onnxcompress.quantize.dynamic import dynamic_check, quantize_dynamic_node
from onnxcompress.quantize.params import (QParams, affine_params, bias_safe_weight_scale, nonfinite_reason, qtype,
                                          weight_params)
from onnxcompress.quantize.plan import Plan, TensorPlan
from onnxcompress.quantize.qdq import QDQBuilder
from onnxcompress.quantize.smoothquant import apply_smoothing, smooth_candidates, smooth_check
from onnxcompress.quantize.storage import storage_check, store_weight, weight_axis

__all__ = ["QuantizeInt8Pass"]

log = logging.getLogger(__name__)

#: per-channel QuantizeLinear/DequantizeLinear (axis) need opset 13
MIN_OPSET = 13
STATIC_HINT = "give calibration data (--calib-data calib.npz, samples stacked on axis 0) for the faster static form"


def _activation_inputs(node: gs.Node) -> list[gs.Tensor]:
    if node.op == "MatMul" and not is_constant(node.inputs[1]):
        return [node.inputs[0], node.inputs[1]]
    return [node.inputs[0]]


class QuantizeInt8Pass(Pass):
    config_cls = QuantizeInt8Config
    lossless = False

    # -- may I? ------------------------------------------------------------------------------------

    def _excluded(self, node: gs.Node) -> str | None:
        cfg: QuantizeInt8Config = self.config
        if node.op in cfg.exclude_ops:
            return f"op type {node.op} is excluded (--exclude-ops)"
        for pat in cfg.exclude_nodes:
            if name_matches(node.name or "", pat):
                return f"node name matches the excluded pattern {pat!r} (--exclude-nodes)"
        return None

    def _check(self, node: gs.Node, graph: gs.Graph) -> str | None:
        """None when the weighted ``node`` may get static QDQ, else the reason."""
        cfg: QuantizeInt8Config = self.config
        reason = self._excluded(node)
        if reason:
            return reason
        if len(node.inputs) < 2:
            return "it has no weight input"
        x = node.inputs[0]
        if is_constant(x):
            return "its first input is a constant, not an activation"
        if x.dtype is not None and np.dtype(x.dtype) != np.float32:
            return f"its input is {np.dtype(x.dtype)}, not float32"
        if node.op == "MatMul" and not is_constant(node.inputs[1]):
            if not cfg.quantize_act_matmul:
                return "both inputs are activations (--no-quantize-attention)"
            return None
        w_t = node.inputs[1]
        if not is_constant(w_t):
            return "its weight is not a constant"
        if is_graph_io(w_t, graph):
            return "its weight is a graph input or output"
        w = const_value(w_t)
        if w is None or np.asarray(w).dtype != np.float32:
            return "its weight is not a float32 constant"
        if np.asarray(w).size < cfg.min_elements:
            return f"its weight has {np.asarray(w).size} elements < min_elements {cfg.min_elements}"
        bad = nonfinite_reason(w)
        if bad:
            return bad
        if node.op == "MatMul" and np.asarray(w).ndim != 2:
            return "its weight is not a matrix (rank 2)"
        if node.op == "Gemm":
            a = node.attrs
            if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
                return "Gemm with transA, alpha or beta other than the defaults"
        if node.op in ("Gemm", "Conv", "ConvTranspose") and len(node.inputs) > 2 and node.inputs[2].name:
            b = const_value(node.inputs[2])
            if b is None or np.asarray(b).ndim != 1:
                return "its bias is not a constant vector"
        if node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
            return "grouped ConvTranspose has no per-channel int8 kernel"
        return None

    # -- do it -------------------------------------------------------------------------------------

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        cfg: QuantizeInt8Config = self.config
        res = PassResult()
        self.note_unmatched(ctx, graph, "exclude_nodes")
        self.note_unmatched(ctx, graph, "exclude_ops", ops=True)
        shared = [(w, len(w.consumers)) for w in iter_weights(graph, float_only=True) if len(w.consumers) > 1]
        has_data = ctx is not None and getattr(ctx, "data", None) is not None
        mode = cfg.mode if cfg.mode != "auto" else ("static" if has_data else "dynamic")
        cached = bool(cfg.calib_cache) and Path(cfg.calib_cache).is_file()
        if mode == "static" and not has_data and not cached:
            raise CalibrationError("static int8 needs calibration data", where="quantize_int8",
                                   hint="pass --calib-data calib.npz (or data= in the API), or use --int8-mode dynamic")
        namer = Namer.for_graph(graph)
        opset = int(graph.opset or 0)
        if opset < MIN_OPSET:
            plan = Plan("storage")
            why = (f"the model's opset {opset} is below {MIN_OPSET} (per-channel QuantizeLinear): weights stored as "
                   "int8, decoded at load (size only)")
            self._dynamic(graph, graph_list=list(iter_graphs(graph)), res=res, plan=plan, namer=namer, why=why,
                          storage_only=True)
            if ctx is not None:
                ctx.note(f"int8: {why}; convert the model to opset {MIN_OPSET}+ (onnx.version_converter) for int8 "
                         "kernels")
            res.details = {"plan": plan.to_dict()}
            return res
        plan = Plan(mode, cfg.calib_method if mode == "static" else "")
        if mode == "static":
            self._static(graph, ctx, res, plan, namer)
            if ctx is not None:
                ctx.note(f"int8: static QDQ ({cfg.calib_method} calibration{', from cache' if 'cache' in ' '.join(plan.notes) else ''}): "
                         f"{plan.counts().get('qdq', 0)} nodes quantized")
        else:
            self._dynamic(graph, graph_list=list(iter_graphs(graph)), res=res, plan=plan, namer=namer)
            if ctx is not None:
                if ctx.data is None:
                    ctx.note("int8: no calibration data, so dynamic int8 for MatMul/Gemm and int8 storage (size "
                             f"only) for Conv; {STATIC_HINT}")
                else:
                    ctx.note("int8: dynamic int8 for MatMul/Gemm and int8 storage (size only) for Conv, as asked "
                             "(--int8-mode dynamic); the calibration data served verification only")
        self._note_float_copies(shared, ctx)
        counts = plan.counts()
        if ctx is not None and res.skipped and not any(counts.get(f) for f in ("qdq", "dynamic", "storage")):
            reasons = sorted({sk.reason for sk in res.skipped})
            ctx.note(f"int8: no layer was quantized ({'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''})")
        res.details = {"plan": plan.to_dict()}
        return res

    @staticmethod
    def _note_float_copies(shared, ctx) -> None:
        """A weight that some readers now read in int8 while others still read in float (a tied LM
        head: Gather and Gemm on one table) is stored twice: say so, and by how much the file grows."""
        kept = [(w, [c.name for c in w.tensor.outputs]) for w, n in shared if 0 < len(w.tensor.outputs) < n]
        if not kept or ctx is None:
            return
        extra = sum(w.size for w, _ in kept)  # one int8 byte per element beside the float copy
        (w, readers), more = kept[0], len(kept) - 1
        ctx.note(f"int8: {len(kept)} weight(s) also read by nodes that stay float keep their float copy beside the "
                 f"int8 one (the int8 copies add about {extra:,} bytes): {w.name!r} (still read in float by "
                 f"{', '.join(readers[:3])}){f' and {more} more' if more else ''}; --exclude-nodes on the quantized "
                 "reader keeps the weight stored once")

    # dynamic ----------------------------------------------------------------------------------------

    def _dynamic(self, graph: gs.Graph, *, graph_list, res: PassResult, plan: Plan, namer: Namer, why: str = "",
                 storage_only: bool = False) -> None:
        cfg: QuantizeInt8Config = self.config
        wqt = qtype(cfg.weight_type)
        weighted = [(n, g) for g in graph_list for n in list(g.nodes) if n.op in policy.QUANTIZED]
        skip_ends = self._first_last(weighted) if cfg.keep_first_last else set()
        for node, g in weighted:
            gname = g.name if g is not graph else ""
            reason = self._excluded(node) or ("first or last layer (--keep-first-last)" if id(node) in skip_ends else None)
            if reason is None and storage_only:
                reason = self._weight_storage(node, g, graph, namer, plan, res, why, gname)
                if reason is None:
                    continue
            elif reason is None and node.op in ("MatMul", "Gemm"):
                reason = dynamic_check(node, g)
                if reason is None:
                    name = node.name
                    info = quantize_dynamic_node(node, g, namer, weight_qt=wqt, per_channel=cfg.per_channel)
                    plan.nodes.append(_entry(name, node.op, "dynamic", why, info, gname))
                    res.changed(f"{name}: dynamic int8")
                    continue
            elif reason is None and cfg.conv_storage:
                reason = self._weight_storage(node, g, graph, namer, plan, res, why, gname)
                if reason is None:
                    continue
            elif reason is None:
                reason = "Conv stays float in dynamic mode (--no-conv-storage)"
            res.skip(node.name or node.op, "quantize_int8", reason)
            plan.nodes.append(_entry(node.name, node.op, "float", reason, None, gname))

    def _weight_storage(self, node, g, top, namer, plan, res, why, gname) -> str | None:
        from onnxcompress.graph.query import weight_ref

        w = weight_ref(node.inputs[1], g) if len(node.inputs) > 1 else None
        if w is None:
            return "its weight is not a constant"
        values, reason = storage_check(w, tuple(policy.QUANTIZED), self.config.min_elements)
        if reason:
            return reason
        enc = store_weight(w, values, top, namer, bits="int8", axis=weight_axis(node, len(w.shape)))
        plan.nodes.append(_entry(node.name, node.op, "storage", why or "no int8 Conv kernel without calibration "
                                 "(ConvInteger is slow): weight stored as int8, decoded at load", enc.info, gname))
        res.changed(f"{node.name}: int8 weight storage")
        return None

    @staticmethod
    def _first_last(weighted) -> set[int]:
        top = [n for n, _ in weighted]
        return {id(top[0]), id(top[-1])} if top else set()

    # static -----------------------------------------------------------------------------------------

    def _static(self, graph: gs.Graph, ctx, res: PassResult, plan: Plan, namer: Namer) -> None:
        cfg: QuantizeInt8Config = self.config
        graph.toposort(recurse_subgraphs=False)
        subgraphs = [g for g in iter_graphs(graph) if g is not graph]
        if subgraphs:
            self._dynamic(graph, graph_list=subgraphs, res=res, plan=plan, namer=namer,
                          why="inside an If/Loop body: activations there cannot be calibrated, so dynamic int8 "
                              "or int8 storage")
            # the replaced body nodes are disconnected but still listed; the model calibrated below
            # is exported from this graph, so they must go first (an empty MatMul fails to load)
            cleanup_graph(graph)
        weighted = [n for n in graph.nodes if n.op in policy.QUANTIZED]
        ends = {id(weighted[0]), id(weighted[-1])} if (cfg.keep_first_last and weighted) else set()
        qnodes = []
        for n in weighted:
            reason = "first or last layer (--keep-first-last)" if id(n) in ends else self._check(n, graph)
            if reason is None and n.op in policy.STORAGE_ONLY:
                reason = self._weight_storage(n, graph, graph, namer, plan, res, policy.STORAGE_ONLY[n.op], "")
                if reason is None:
                    continue
            if reason:
                res.skip(n.name or n.op, "quantize_int8", reason)
                plan.add(n, "float", reason)
            else:
                qnodes.append(n)
        if not qnodes:
            plan.notes.append("nothing to quantize statically")
            return
        base_dir = ctx.base_dir if ctx is not None else None

        if cfg.smoothquant is not None:
            self._smooth(graph, ctx, plan, namer, base_dir)

        model = ctx.model_of(graph) if ctx is not None and ctx.original is not None else None
        # onnxruntime turns a 2-D MatMul + Add into a Gemm before its QDQ fusions, and a Gemm without
        # an output Q stays float: a float-output MatMul is only worth it for inputs of rank >= 3
        ranks = _ranks(model) if cfg.matmul_float_output and model is not None else {}
        qset = {id(n) for n in qnodes}
        act_qt = qtype(cfg.activation_type)
        fuse_relu = not cfg.symmetric
        memo: dict[int, bool] = {}

        def chain_ok(node: gs.Node) -> bool:
            if self._excluded(node):
                return False
            if cfg.keep_sensitive_float and policy.is_residual_add(node):
                return False
            return True

        def wants_int(t: gs.Tensor) -> bool:
            if id(t) in memo:
                return memo[id(t)]
            memo[id(t)] = False
            ok = False
            for c in consumers(t):
                if id(c) in qset and any(a is t for a in _activation_inputs(c)):
                    ok = True
                elif (c.op in policy.SAME_SCALE or c.op in policy.OWN_SCALE or policy.relu_like(c)) \
                        and len(c.outputs) == 1 and chain_ok(c) and not (c.op == "Add" and any(
                            is_constant(i) for i in c.inputs)) and wants_int(c.outputs[0]):
                    ok = True
                if ok:
                    break
            memo[id(t)] = ok
            return ok

        def fusible_relu(node: gs.Node) -> gs.Node | None:
            out = node.outputs[0]
            cs = consumers(out)
            if not fuse_relu or len(cs) != 1 or is_graph_io(out, graph) or not policy.relu_like(cs[0]):
                return None
            r = cs[0]
            return r if len(r.outputs) == 1 and not self._excluded(r) else None

        # forward: which tensors are integer (source: own range, or same as another tensor)
        own: dict[int, gs.Tensor] = {}
        same: dict[int, gs.Tensor] = {}
        marked: list[tuple[gs.Node, gs.Tensor, str]] = []
        fused: list[tuple[gs.Node, gs.Node]] = []
        for node in list(graph.nodes):
            if len(node.outputs) != 1:
                continue
            if id(node) in qset:
                kind = "own"
                if node.op == "MatMul" and cfg.matmul_float_output and not wants_int(node.outputs[0]) \
                        and fusible_relu(node) is None and ranks.get(node.inputs[0].name, 0) >= 3:
                    kind = "float"
            elif node.op in policy.SAME_SCALE and node.inputs and _is_int(node.inputs[0], own, same) \
                    and all(is_constant(t) for t in node.inputs[1:] if t.name) and chain_ok(node) \
                    and wants_int(node.outputs[0]):
                kind = "same"
            elif node.op in policy.OWN_SCALE and chain_ok(node) and wants_int(node.outputs[0]) and \
                    all(_is_int(t, own, same) for t in _data_inputs(node)):
                kind = "own"
            else:
                continue
            out = node.outputs[0]
            if kind == "float":
                marked.append((node, out, kind))
                continue
            if kind == "own":
                r = fusible_relu(node)
                if r is not None:
                    fused.append((node, r))
                    out = r.outputs[0]
                own[id(out)] = out
            else:
                same[id(out)] = node.inputs[0]
            marked.append((node, out, kind))
        # branch tensors: activation inputs of quantized nodes produced in float
        branch: dict[int, tuple[gs.Tensor, list[gs.Node]]] = {}
        for n in qnodes:
            for t in _activation_inputs(n):
                if not _is_int(t, own, same):
                    branch.setdefault(id(t), (t, []))[1].append(n)
        needed = [t.name for t in own.values()] + [t.name for t, _ in branch.values()]

        # calibration (streamed, batch by batch) or the cache
        ranges, source = self._calibrate(model, ctx, needed, base_dir, plan)

        def params_of(t: gs.Tensor) -> QParams:
            while id(t) in same:
                t = same[id(t)]
            lo, hi = ranges[t.name]
            return affine_params(lo, hi, act_qt, symmetric=cfg.symmetric)

        for t in list(own.values()) + [t for t, _ in branch.values()]:
            p = params_of(t)
            lo, hi = ranges[t.name]
            plan.tensors.append(TensorPlan(t.name, float(lo), float(hi), float(p.scale), int(p.zero_point),
                                           act_qt.name, source))
        for node, out, kind in marked:
            if kind == "same":
                p = params_of(out)
                src = same[id(out)]
                plan.tensors.append(TensorPlan(out.name, *ranges.get(_root(src, same).name, (0.0, 0.0)),
                                               float(p.scale), int(p.zero_point), act_qt.name, f"same as {src.name}"))

        # materialize
        qb = QDQBuilder(graph, namer)
        wqt = qtype(cfg.weight_type)
        x_scale = {id(n): float(params_of(n.inputs[0]).scale) for n in qnodes}
        for node, relu in fused:
            out, rout = node.outputs[0], relu.outputs[0]
            disconnect(relu)
            replace_output(node, out, rout)
            plan.add(relu, "fused", f"computed by the saturating QuantizeLinear after {node.name} (zero point = qmin)")
        for t, readers in branch.values():
            qb.on_branch(t, readers, params_of(t))
        for node, out, kind in marked:
            if id(node) in qset:
                winfo = self._quantize_weights(node, qb, wqt, x_scale[id(node)])
                plan.add(node, "qdq", "float output: only float ops read it (MatMulIntegerToFloat)"
                         if kind == "float" else "", weight=winfo)
                res.changed(f"{node.name}: static int8 QDQ")
                if kind == "float":
                    continue
            else:
                plan.add(node, "qdq", "keeps its input's scale" if kind == "same" else "integer kernel, own range")
            qb.on_output(out, node, params_of(out))
        # everything else in the top graph stays float; say why
        done = {p.node for p in plan.nodes}
        for node in graph.nodes:
            if node.op == "Constant" or (node.name or node.op) in done or not node.outputs:
                continue
            if node.op in ("QuantizeLinear", "DequantizeLinear"):
                continue
            plan.add(node, "float", self._float_reason(node))
        plan.notes.append(f"{qb.count.get('QuantizeLinear', 0)} QuantizeLinear, "
                          f"{qb.count.get('DequantizeLinear', 0)} DequantizeLinear")

    def _float_reason(self, node: gs.Node) -> str:
        cfg: QuantizeInt8Config = self.config
        ex = self._excluded(node)
        if ex:
            return ex
        if cfg.keep_sensitive_float:
            if node.op in policy.SENSITIVE:
                return "kept float: sensitive in int8 (transformers)"
            if policy.is_residual_add(node):
                return "kept float: residual Add feeding a normalization"
            if policy.is_embedding_gather(node):
                return "kept float: embedding Gather"
            if policy.is_decomposed_norm_op(node):
                return "kept float: part of a decomposed LayerNorm"
        if node.op in policy.SAME_SCALE or node.op in policy.OWN_SCALE:
            return "its input is not quantized or its output reaches no quantized layer"
        return f"{node.op} has no int8 form here; passes through in float"

    def _quantize_weights(self, node: gs.Node, qb: QDQBuilder, wqt, xs: float) -> dict | None:
        cfg: QuantizeInt8Config = self.config
        if node.op == "MatMul" and not is_constant(node.inputs[1]):
            return {"weight": "activation x activation"}
        w_t = node.inputs[1]
        w = np.asarray(const_value(w_t), dtype=np.float32)
        axis = weight_axis(node, w.ndim) if cfg.per_channel else None
        p = weight_params(w, wqt, axis=axis, symmetric=True)
        has_bias = node.op in ("Gemm", "Conv", "ConvTranspose") and len(node.inputs) > 2 and node.inputs[2].name
        raised = 0
        if has_bias:  # a dead channel's tiny weight scale would overflow its int32 bias
            scale, raised = bias_safe_weight_scale(p.scale, const_value(node.inputs[2]), xs)
            p = dataclasses.replace(p, scale=scale)
        base = w_t.name
        key = (id(w_t), axis, wqt.name) + ((np.asarray(p.scale).tobytes(),) if raised else ())
        readers = len(consumers(w_t))
        y = qb.weight(key, w, p, base)
        node.inputs[1] = y
        info = {"name": base, "type": wqt.name, "axis": axis, "scales": int(np.asarray(p.scale).size)}
        if readers > 1:  # the float weight goes only when no reader is left with it (cleanup decides)
            info["shared"] = (f"read by {readers} nodes; this one has its own int8 copy (its bias needed larger "
                              "weight scales)" if raised else f"read by {readers} nodes; one int8 copy per axis and type")

        if has_bias:
            b_t = node.inputs[2]
            b = np.asarray(const_value(b_t), dtype=np.float32)
            ws = np.asarray(p.scale, dtype=np.float32)
            if ws.size == 1 and b.size > 1:
                ws = np.full(b.shape, float(ws), np.float32)
            node.inputs[2] = qb.bias(b, xs, ws, b_t.name)
            info["bias"] = "int32"
            if raised:
                info["bias_safe_scales"] = raised  # channels whose weight scale was raised to hold the bias
        return info

    def _calibrate(self, model, ctx, needed, base_dir, plan: Plan):
        cfg: QuantizeInt8Config = self.config
        levels = qtype(cfg.activation_type).qmax - qtype(cfg.activation_type).qmin
        cal = Calibrator(cfg.calib_method, percentile=cfg.percentile, num_bins=cfg.num_bins, levels=levels,
                         cache=cfg.calib_cache,
                         model=model_fingerprint(model, base_dir) if cfg.calib_cache and model is not None else None)
        ranges = cal.cached(needed)
        if ranges is not None:
            plan.notes.append(f"ranges from the calibration cache {cfg.calib_cache}")
            return ranges, "cache"
        if ctx is None or getattr(ctx, "data", None) is None:
            found = cal.rejected or "does not exist"
            raise CalibrationError(f"the calibration cache {cfg.calib_cache} {found}, and no calibration data was "
                                   "given", where="calibration", hint="pass --calib-data to recalibrate")
        if cal.rejected:
            ctx.note(f"int8: the calibration cache {cfg.calib_cache} {cal.rejected}: recalibrated, and the cache "
                     "rewritten")
        feeds = ctx.feeds(model)
        stats = collect_stats(model, needed, feeds, num_bins=cfg.num_bins, max_batches=cfg.max_calib_batches,
                              base_dir=base_dir, progress=ctx.progress_bar if ctx.progress else None)
        empty = [n for n in needed if stats[n].count == 0]
        if empty:
            raise CalibrationError(f"no finite values reached {len(empty)} tensor(s), e.g. {empty[0]!r}",
                                   where="quantize_int8 calibration", hint="check the calibration data")
        sentinel = {n: s.sentinels for n, s in stats.items() if s.sentinels}
        if sentinel:
            plan.notes.append(f"mask sentinels (|x| >= 1e30) ignored in {len(sentinel)} tensor(s)")
        variable = [n for n, s in stats.items() if len(s.shapes) > 1]
        if variable:
            plan.notes.append(f"{len(variable)} tensor(s) changed shape between batches")
        ranges = cal.ranges(stats)
        cal.store(ranges)
        return ranges, "calibrated"

    def _smooth(self, graph, ctx, plan: Plan, namer: Namer, base_dir) -> None:
        cfg: QuantizeInt8Config = self.config
        norms = []
        candidates = smooth_candidates(graph)
        for norm in candidates:
            reason = smooth_check(norm, graph)
            if reason:
                plan.notes.append(f"smoothquant skipped {norm.name}: {reason}")
            else:
                norms.append(norm)
        if not norms:
            why = ("no normalization (LayerNormalization or its decomposition) in the main graph" if not candidates
                   else "no normalization qualified (the plan's notes say why)")
            if ctx is not None:
                ctx.note(f"quantize_int8: --smoothquant changed nothing: {why}")
            return
        model = ctx.model_of(graph)
        names = [norm.y.name for norm in norms]
        stats = collect_stats(model, names, ctx.feeds(model), num_bins=128, channels=names,
                              max_batches=cfg.max_calib_batches, base_dir=base_dir)
        for norm in norms:
            s = stats[norm.y.name]
            if s.chan_absmax is None:
                continue
            info = apply_smoothing(norm, graph, namer, s.chan_absmax, cfg.smoothquant)
            graph.toposort(recurse_subgraphs=False)
            plan.notes.append(f"smoothquant {info['norm']}: alpha {info['alpha']}, scales "
                              f"{info['scale_min']:.3g}..{info['scale_max']:.3g}")


def _ranks(model) -> dict[str, int]:
    """Tensor name -> rank, from onnx shape inference (unknown ranks are left out)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort here: unknown ranks keep the default layout
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    return out


def _is_int(t: gs.Tensor, own: dict, same: dict) -> bool:
    return id(t) in own or id(t) in same


def _root(t: gs.Tensor, same: dict) -> gs.Tensor:
    while id(t) in same:
        t = same[id(t)]
    return t


def _data_inputs(node: gs.Node) -> list[gs.Tensor]:
    if node.op == "Concat":
        return [t for t in node.inputs if t.name]
    if node.op == "Add":
        return list(node.inputs) if not any(is_constant(t) for t in node.inputs) else [gs.Variable("")]
    return [node.inputs[0]] if node.inputs else []


def _entry(name, op, form, reason, info, graph_name):
    from onnxcompress.quantize.plan import NodePlan

    return NodePlan(name or op, op, form, reason, info, graph_name)
