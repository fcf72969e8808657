"""Lossless cleanup passes: cleanup, dedupe_initializers, fold_constants.

``cleanup``
    * Identity elimination: ``y = Identity(x)`` — every reader of ``y`` reads ``x`` instead. When
      ``y`` is a graph output, the producer of ``x`` writes ``y`` directly (same graph, ``x`` not
      itself visible outside); otherwise the Identity stays (Skip).
    * Weights listed as graph inputs (IR < 4 exporters list every initializer as an input) are
      already treated as weights by the importer (onnx-graphsurgeon drops them from the inputs, as
      onnxruntime's own tools do): they were optional overrides nobody feeds in practice.
    * Attributes that restate the operator's default (``alpha=1.0``, ``transA=0`` on Gemm, as
      exporters write them) are dropped: the schema of the model's opset gives the default, so the
      meaning is unchanged; only attributes of default-domain ops with a scalar, string or list
      default are compared, exactly (tensors and graphs never).
    * Dead nodes and unused initializers go in the pipeline's cleanup after this pass.

``dedupe_initializers``
    Initializers with equal dtype, shape and bytes are merged into the first one; readers of the
    others are rewired. Tensors visible outside the graph (inputs, outputs) are never touched.
    Subgraphs are deduplicated within themselves.

``fold_constants``
    A node whose inputs are all constants is evaluated once with onnxruntime and replaced by its
    result — only when that does not grow the file:
    ``bytes(outputs) <= max(always_fold_bytes, max_growth * bytes(inputs freed))``, where the freed
    inputs are those the node is the only reader of. So ``Cast(int8) -> Mul`` decode chains (made
    on purpose by compact storage) and ``ConstantOfShape`` expansions stay as they are, while shape
    arithmetic and transposes of weights fold. Non-deterministic ops, Q/DQ, control flow and ops of
    custom domains are never folded.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.graph.query import (
    consumers,
    const_value,
    is_constant,
    is_graph_io,
    iter_graphs,
    peek_values,
    producer,
)
from onnxcompress.graph.rewrite import disconnect, replace_all_uses, replace_output
from onnxcompress.passes.base import Pass, PassResult, cleanup_graph
from onnxcompress.recipe import StepConfig, option

__all__ = [
    "CleanupConfig",
    "CleanupPass",
    "DedupeConfig",
    "DedupeInitializersPass",
    "FoldConstantsConfig",
    "FoldConstantsPass",
]


# ----------------------------------------------------------------------------------------------
# cleanup


@dataclass(frozen=True)
class CleanupConfig(StepConfig):
    name = "cleanup"
    order = 0
    flag = "--cleanup"
    flag_help = "remove Identity nodes, dead nodes and unused initializers"

    remove_identity: bool = option(True, "bypass Identity nodes")
    drop_default_attributes: bool = option(True, "drop attributes equal to the operator's default value")


class CleanupPass(Pass):
    config_cls = CleanupConfig
    lossless = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        cfg = self.config
        if cfg.remove_identity:
            n = 0
            for g in iter_graphs(graph):
                for node in list(g.nodes):
                    if node.op == "Identity" and len(node.inputs) == 1 and len(node.outputs) == 1:
                        reason = self._bypass_identity(node, g)
                        if reason:
                            res.skip(node.name, "identity", reason)
                        else:
                            n += 1
            if n:
                res.changed(f"{n} Identity nodes bypassed")
        if cfg.drop_default_attributes and graph.opset:
            n = sum(_drop_defaults(node, int(graph.opset)) for g in iter_graphs(graph) for node in g.nodes)
            if n:
                res.changed(f"{n} attributes equal to their defaults dropped")
        before = _count(graph)
        cleanup_graph(graph)
        after = _count(graph)
        if after != before:
            res.changed(f"dead code removed: {before[0] - after[0]} nodes, {before[1] - after[1]} tensors")
        return res

    @staticmethod
    def _bypass_identity(node: gs.Node, g: gs.Graph) -> str | None:
        """Rewire around one Identity; return a reason string when it must stay."""
        x, y = node.inputs[0], node.outputs[0]
        if any(y is o for o in g.outputs):
            p = producer(x)
            if p is None or p not in g.nodes or is_graph_io(x, g) or isinstance(x, gs.Constant):
                return "its output is a graph output fed directly by an input, a constant or an outer scope"
            if any(x is o for o in g.outputs):
                return "both its input and output are graph outputs"
            # the producer writes y directly; other readers of x read y
            disconnect(node)
            replace_all_uses(x, y)
            replace_output(p, x, y)
            return None
        disconnect(node)
        replace_all_uses(y, x)
        return None


@functools.lru_cache(maxsize=None)
def _default_of(op: str, opset: int, name: str):
    """The schema default of attribute ``name`` of default-domain ``op`` at ``opset``, or None."""
    try:
        schema = onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return None
    attr = schema.attributes.get(name)
    if attr is None or attr.default_value.type in (onnx.AttributeProto.UNDEFINED, onnx.AttributeProto.TENSOR,
                                                   onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS,
                                                   onnx.AttributeProto.TENSORS, onnx.AttributeProto.SPARSE_TENSOR):
        return None
    value = onnx.helper.get_attribute_value(attr.default_value)
    return value.decode() if isinstance(value, bytes) else value


def _same(value, default) -> bool:
    """Equal and of the same kind (an int attribute is never equal to a float default)."""
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return len(value) == len(default) and all(_same(a, b) for a, b in zip(value, default))
    if isinstance(value, bool) or isinstance(default, bool):
        return False
    return type(value) is type(default) and value == default


def _drop_defaults(node: gs.Node, opset: int) -> int:
    """Remove ``node``'s attributes that equal their schema defaults; return how many."""
    if (node.domain or "") not in ("", "ai.onnx"):
        return 0
    drop = [k for k, v in node.attrs.items()
            if not isinstance(v, (gs.Tensor, gs.Graph)) and _same(v, _default_of(node.op, opset, k))]
    for k in drop:
        del node.attrs[k]
    return len(drop)


def _count(graph: gs.Graph) -> tuple[int, int]:
    return (sum(len(g.nodes) for g in iter_graphs(graph)),
            sum(len(g.tensors()) for g in iter_graphs(graph)))


# ----------------------------------------------------------------------------------------------
# dedupe_initializers


@dataclass(frozen=True)
class DedupeConfig(StepConfig):
    name = "dedupe_initializers"
    order = 4  # after fold_constants (2) and fuse (3)
    flag = "--dedupe"
    flag_help = "merge initializers with identical contents"

    min_elements: int = option(1, "only consider initializers with at least this many elements", minimum=0)


class DedupeInitializersPass(Pass):
    config_cls = DedupeConfig
    lossless = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        for g in iter_graphs(graph):
            io = {id(t) for t in g.inputs} | {id(t) for t in g.outputs}
            by_size: dict[tuple, list[gs.Constant]] = {}
            for t in g.tensors().values():
                if not isinstance(t, gs.Constant) or id(t) in io or not t.outputs:
                    continue
                size = int(np.prod(t.shape, dtype=np.int64)) if t.shape is not None else 0
                if size < self.config.min_elements:
                    continue
                by_size.setdefault((str(t.dtype), tuple(t.shape)), []).append(t)
            for group in by_size.values():
                if len(group) < 2:
                    continue
                first_by_hash: dict[str, gs.Constant] = {}
                for t in group:
                    arr = np.ascontiguousarray(peek_values(t))  # streamed: not kept in the graph
                    h = hashlib.sha256(arr.tobytes()).hexdigest()
                    keep = first_by_hash.setdefault(h, t)
                    if keep is t:
                        continue
                    replace_all_uses(t, keep)
                    res.changed(f"{t.name} -> {keep.name} ({arr.nbytes} bytes)")
        return res


# ----------------------------------------------------------------------------------------------
# fold_constants

_NEVER_FOLD = {
    "Constant", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "SequenceConstruct", "SequenceEmpty", "Optional",
}


@dataclass(frozen=True)
class FoldConstantsConfig(StepConfig):
    name = "fold_constants"
    order = 2
    flag = "--fold-constants"
    flag_help = "evaluate constant-only subgraphs once, when that does not grow the file"

    max_growth: float = option(1.0, "fold only when the result is at most this many times the bytes "
                                    "of the inputs it frees", flag="--fold-max-growth", minimum=0)
    always_fold_bytes: int = option(0, "results up to this size are folded even when they grow the file", minimum=0)


class FoldConstantsPass(Pass):
    config_cls = FoldConstantsConfig
    lossless = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        folded = 0
        for g in iter_graphs(graph):
            g.toposort(recurse_subgraphs=False)
            for node in list(g.nodes):
                reason = self._may_fold(node, g)
                if reason is not None:
                    if reason:
                        res.skip(node.name or node.op, "fold_constants", reason)
                    continue
                freed = _freed_bytes(node)
                limit = max(self.config.always_fold_bytes, self.config.max_growth * freed)
                known = _known_output_bytes(node)
                if known is not None and known > limit:  # decided without materializing the result
                    res.skip(node.name or node.op, "fold_constants",
                             f"folding would grow the file: {freed} bytes of inputs -> {known} bytes")
                    continue
                try:
                    values = _evaluate(node, g, graph)
                except Exception as e:  # onnxruntime could not run it: leave the node alone
                    res.skip(node.name or node.op, "fold_constants", f"onnxruntime cannot evaluate it: "
                             f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
                    continue
                out_bytes = sum(v.nbytes for v in values)
                if out_bytes > limit:
                    res.skip(node.name or node.op, "fold_constants",
                             f"folding would grow the file: {freed} bytes of inputs -> {out_bytes} bytes")
                    continue
                for out, val in zip(node.outputs, values):
                    out.to_constant(val)
                disconnect(node)
                folded += 1
        if folded:
            res.changed(f"{folded} constant-only nodes folded")
        return res

    @staticmethod
    def _may_fold(node: gs.Node, g: gs.Graph) -> str | None:
        """None if the node may be folded; '' to skip silently; a reason to report a skip."""
        if node.op in _NEVER_FOLD or (node.domain or "") not in ("", "ai.onnx"):
            return ""
        real_inputs = [t for t in node.inputs if t.name]
        if not real_inputs or not all(is_constant(t) for t in real_inputs):
            return ""
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return ""
        if any(is_graph_io(o, g) for o in node.outputs):
            return "its output is a graph output"
        return None


def _known_output_bytes(node: gs.Node) -> int | None:
    """The result's size when it follows from the inputs alone (ConstantOfShape: the shape input), so a
    fill that would grow the file (a 400 MB weight made from a 32-byte shape) is never materialized."""
    if node.op != "ConstantOfShape" or not node.inputs:
        return None
    shape = const_value(node.inputs[0])
    if shape is None:
        return None
    value = node.attrs.get("value")
    itemsize = np.dtype(value.dtype).itemsize if isinstance(value, gs.Constant) else 4
    return int(np.prod(np.asarray(shape, dtype=np.int64))) * itemsize


def _freed_bytes(node: gs.Node) -> int:
    """Bytes of the constant inputs that only this node reads (they disappear once it is folded)."""
    seen, total = set(), 0
    for t in node.inputs:
        if not t.name or id(t) in seen:
            continue
        seen.add(id(t))
        if all(c is node for c in consumers(t)):
            v = const_value(t)
            total += v.nbytes if v is not None else 0
    return total


def _evaluate(node: gs.Node, g: gs.Graph, top: gs.Graph) -> list[np.ndarray]:
    """Run one node in onnxruntime (no graph optimizations) on its constant inputs."""
    import onnxruntime as ort

    feeds, inputs = {}, []
    names = []
    for i, t in enumerate(node.inputs):
        if not t.name:
            names.append("")
            continue
        arr = np.asarray(const_value(t))
        nm = f"in{i}"
        names.append(nm)
        if nm not in feeds:
            feeds[nm] = arr
            inputs.append(onnx.helper.make_tensor_value_info(
                nm, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
    outs = [f"out{i}" for i in range(len(node.outputs))]
    attrs = {}
    for k, v in node.attrs.items():
        attrs[k] = onnx.numpy_helper.from_array(np.asarray(v.values), k) if isinstance(v, gs.Constant) else v
    onode = onnx.helper.make_node(node.op, names, outs, domain=node.domain or "", **attrs)
    out_vi = [onnx.helper.make_empty_tensor_value_info(o) for o in outs]
    opset = top.opset or onnx.defs.onnx_opset_version()
    model = onnx.helper.make_model(
        onnx.helper.make_graph([onode], "fold", inputs, out_vi),
        opset_imports=[onnx.helper.make_opsetid("", opset)],
    )
    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # a node that cannot be folded raises; its log line would only be noise
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    results = sess.run(None, feeds)
    for r in results:
        if not isinstance(r, np.ndarray) or r.dtype == object:
            raise TypeError("non-tensor result")
    return results
