"""convert_fp16: compute in float16 (or bfloat16) where that is safe, keep the model's interface.

The rule. Every node is either *half* (its float inputs and outputs become the half type h) or kept
*float32*. A tensor is half when a half node produces it; where a tensor's type differs from what
its reader expects, one ``Cast`` per (tensor, graph, type) is inserted. Weights read by half nodes
are stored in h (``w_h = h(w)``); weights read by float32 nodes are, with ``store_kept_weights``,
stored in h too behind a ``Cast → float32`` that onnxruntime constant-folds at load (smaller file,
unchanged float32 compute).

A node stays float32 (each with a Skip saying why) when:

* its op is not in the converter's table of ops whose float slots it knows how to type (unknown and
  custom-domain ops pass through unchanged), or is listed in ``keep_ops`` / matches ``keep_nodes``;
* a tensor in one of its float slots is not float32 or has no known type;
* a weight it reads would overflow or lose too much: ``max|w| > max_h`` (65504 for fp16) or
  ‖w − h(w)‖ / ‖w‖ > ``max_weight_rel_error`` (tiny non-zero values flushed to 0 count here);
  its direct readers stay float32 too (the value it makes is likely out of range as well);
* with calibration data: an activation it reads or writes has max|x| > max_h / ``activation_headroom``
  or is not finite (e.g. an attention-mask bias of −3.4e38);
* ``target=cpu`` and the onnxruntime CPU execution provider has no kernel for the node in h (probed
  once per op signature; onnxruntime falls back by itself for fp16, not for bf16).

Typing details that the incumbent converter gets wrong: the graph inputs and outputs keep their
types (Casts at the boundary; an output tensor keeps its name); the inputs and outputs of If / Loop
bodies keep their types, and bodies are converted inside; Resize ``roi`` / ``scales``, Dropout
``ratio``, LayerNormalization's mean / inv-std outputs and every non-float slot keep their types;
a ``Cast(to=float32)`` whose every reader is half gets ``to = h`` (nothing else is retargeted).
``compute="float"`` keeps every node float32 (size-only half storage of the weights).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import iter_graphs, weight_ref
from onnxcompress.graph.rewrite import replace_input, replace_output
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.quantize.int4 import matches_any, proto_constant
from onnxcompress.recipe import StepConfig, option

__all__ = ["ConvertFp16Config", "ConvertFp16Pass", "HALF_OPS"]

log = logging.getLogger("onnxcompress")

_ALL = None
#: op -> (input slots of type T, output slots of type T); None = every slot. Only float32 tensors in
#: these slots change type; everything else keeps its type.
HALF_OPS: dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]] = {
    **{op: (_ALL, _ALL) for op in (
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Sqrt", "Exp",
        "Log", "Neg", "Abs", "Reciprocal", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Floor", "Ceil", "Round",
        "Sign", "Sin", "Cos", "Identity", "Clip", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean",
        "MatMul", "Gemm", "Conv", "ConvTranspose", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
        "BatchNormalization", "InstanceNormalization", "Softmax", "LogSoftmax", "Flatten", "Transpose", "Concat",
        "Split", "Einsum", "DepthToSpace", "SpaceToDepth", "GroupNormalization")},
    **{op: ((0,), _ALL) for op in ("Reshape", "Squeeze", "Unsqueeze", "Slice", "Gather", "Expand", "Tile",
                                   "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "Resize", "GatherElements")},
    "MaxPool": (_ALL, (0,)),
    "Dropout": ((0,), (0,)),
    "LayerNormalization": (_ALL, (0,)),
    "Pad": ((0, 2), _ALL),
    "Where": ((1, 2), _ALL),
    **{op: (_ALL, ()) for op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")},
}
#: readers that accept any type: no Cast is needed in front of them
_ANY_TYPE_READERS = {"Shape": (0,), "Size": (0,), "Cast": (0,)}
_CONTROL_FLOW = {"If", "Loop", "Scan"}

#: ops that only move or select values: in half they compute nothing, they only round
_MOVES = frozenset({"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice",
                    "Gather", "GatherElements", "GatherND", "Concat", "Split", "Tile", "DepthToSpace",
                    "SpaceToDepth"})
_DEFAULT_KEEP = ("Exp", "Pow", "ReduceSum", "Range", "CumSum", "TopK", "NonMaxSuppression", "RoiAlign")
_HALF = {"float16": (np.float16, onnx.TensorProto.FLOAT16, 65504.0),
         "bfloat16": (ml_dtypes.bfloat16, onnx.TensorProto.BFLOAT16, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max))}


@dataclass(frozen=True)
class ConvertFp16Config(StepConfig):
    name = "convert_fp16"
    order = 90
    flag_help = "compute in float16 / bfloat16, keeping the model's inputs and outputs"

    dtype: str = option("float16", "the half type", flag="--half-dtype", choices=("float16", "bfloat16"))
    compute: str = option("half", "half: nodes compute in the half type; float: every node stays float32 and only the "
                          "weights are stored in half (Cast back, folded by onnxruntime at load)",
                          flag="--half-compute", choices=("half", "float"))
    target: str = option("cpu", "cpu: nodes the onnxruntime CPU execution provider cannot run in the half type stay "
                         "float32 (probed); any: convert every op the converter knows (e.g. for CUDA)",
                         flag="--half-target", choices=("cpu", "any"))
    keep_ops: tuple[str, ...] = option(_DEFAULT_KEEP, "op types kept in float32 (overflow-prone ones by default)",
                                       flag="--half-keep-ops", metavar="TYPES")
    keep_nodes: tuple[str, ...] = option((), "node-name patterns (fnmatch) kept in float32", flag="--half-keep-nodes",
                                         metavar="PATTERNS")
    max_weight_rel_error: float | None = option(None, "a node whose weight loses more than this relative error "
                                                "stays float32 (default: 1e-3 for float16, 1e-2 for bfloat16)",
                                                minimum=0.0)
    activation_headroom: float = option(4.0, "with data: activations above max_half / headroom keep their producer and "
                                        "readers in float32", minimum=1.0)
    store_kept_weights: bool = option(True, "store the weights of float32 nodes in half too (Cast back at load)",
                                      flag="--half-store-kept")
    calib_samples: int = option(64, "samples used to check activation ranges when data is given", minimum=1)

    @property
    def weight_tolerance(self) -> float:
        if self.max_weight_rel_error is not None:
            return self.max_weight_rel_error
        return 1e-3 if self.dtype == "float16" else 1e-2


@dataclass
class _State:
    cfg: ConvertFp16Config
    np_half: type
    onnx_half: int
    max_half: float
    namer: Namer
    types: dict[str, int]
    half_nodes: set[int] = field(default_factory=set)
    half_tensors: set[int] = field(default_factory=set)
    casts: dict[tuple[int, int, int], gs.Tensor] = field(default_factory=dict)
    half_consts: dict[tuple[int, int], gs.Tensor] = field(default_factory=dict)
    weight_ok: dict[int, str] = field(default_factory=dict)
    n_casts: int = 0
    n_weights: int = 0
    flushed: int = 0


def _slots(spec, n: int) -> tuple[int, ...]:
    return tuple(range(n)) if spec is None else tuple(i for i in spec if i < n)


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor name onnx shape inference can tell (subgraphs included)."""
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as e:  # > 2 GB, unknown ops: fall back to what the model declares
        log.info("convert_fp16: shape inference failed (%s); using declared types only", e)
    types: dict[str, int] = {}

    from onnxcompress.graph.io import iter_graph_protos

    for g in iter_graph_protos(model.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        types[n.output[0]] = a.t.data_type
    return types


class ConvertFp16Pass(Pass):
    config_cls = ConvertFp16Config
    lossless = False

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        cfg: ConvertFp16Config = self.config
        res = PassResult()
        self.note_unmatched(ctx, graph, "keep_nodes")
        self.note_unmatched(ctx, graph, "keep_ops", [op for op in cfg.keep_ops if op not in _DEFAULT_KEEP], ops=True)
        np_half, onnx_half, max_half = _HALF[cfg.dtype]
        if cfg.dtype == "bfloat16" and (graph.opset or 0) < 13:
            res.skip(graph.name or "graph", "fp16", f"bfloat16 needs opset >= 13 (Cast to and from bfloat16); the "
                     f"model has opset {graph.opset}")
            if ctx is not None:
                ctx.note("convert_fp16: the model's opset is below 13, which has no bfloat16; nothing converted "
                         "(use --fp16, or upgrade the model's opset)")
            return res
        model = ctx.model_of(graph) if ctx is not None else gs.export_onnx(graph.copy(), do_type_check=False)
        st = _State(cfg, np_half, onnx_half, max_half, Namer.for_graph(graph), _tensor_types(model))
        hot = self._hot_tensors(graph, ctx, st.types, res)
        probe = _KernelProbe(graph.opset or 17, onnx_half, st.types) if cfg.target == "cpu" else None
        graphs = list(iter_graphs(graph))

        # 1. which nodes compute in half (the plan)
        kept: dict[str, int] = {}
        weight_bad: set[int] = set()
        for g in graphs:
            for node in g.nodes:
                reason = self._may_convert(node, st, hot, probe)
                if reason.startswith("weight"):
                    weight_bad.add(id(node))
                if node.op in ("Constant", "Cast"):  # weights; Casts are retargeted below
                    continue
                if reason:
                    res.skip(node.name or node.op, "fp16", reason)
                    kept[node.op] = kept.get(node.op, 0) + 1
                else:
                    st.half_nodes.add(id(node))
        # a node kept for an out-of-range weight: its direct readers stay float32 too
        for g in graphs:
            for node in g.nodes:
                if id(node) in weight_bad:
                    for out in node.outputs:
                        for c in out.outputs:
                            if id(c) in st.half_nodes:
                                st.half_nodes.discard(id(c))
                                res.skip(c.name or c.op, "fp16", f"reads {out.name!r}, made from a weight out of "
                                         f"{cfg.dtype} range")
                                kept[c.op] = kept.get(c.op, 0) + 1
        # a node that only moves data computes nothing in half, it only rounds: it goes half when a half
        # node feeds it, or when half nodes are all that read it (the Cast then comes before it); else it
        # stays float32 (an input passed through to an output, say, stays exact)
        movers = {id(n): n for g in graphs for n in g.nodes if n.op in _MOVES and id(n) in st.half_nodes}
        st.half_nodes -= set(movers)
        io = {id(t) for g in graphs for t in (*g.inputs, *g.outputs)}
        grown = True
        while grown:
            grown = False
            for key, node in list(movers.items()):
                readers = [c for o in node.outputs for c in o.outputs]
                if any(t.inputs and id(t.inputs[0]) in st.half_nodes for t in node.inputs) or (
                        readers and all(id(c) in st.half_nodes for c in readers)
                        and not any(id(o) in io for o in node.outputs)):
                    st.half_nodes.add(key)
                    del movers[key]
                    grown = True
        for node in movers.values():
            res.skip(node.name or node.op, "fp16", f"only moves data between float32 ends: exact in float32, "
                     f"rounded in {cfg.dtype}")
            kept[node.op] = kept.get(node.op, 0) + 1
        # 2. retarget Cast(to=float32) nodes whose readers are all half
        retargeted = 0
        for g in graphs:
            for node in g.nodes:
                if node.op == "Cast" and int(node.attrs.get("to", 0)) == onnx.TensorProto.FLOAT and node.outputs:
                    out = node.outputs[0]
                    readers = out.outputs
                    if readers and not _is_io(out, graphs) and all(self._expects(c, out, st) == "half" for c in readers):
                        node.attrs["to"] = onnx_half
                        st.half_tensors.add(id(out))
                        out.dtype = self._gs_half(st)
                        retargeted += 1
        # 3. type the half nodes' outputs
        for g in graphs:
            for node in g.nodes:
                if id(node) not in st.half_nodes:
                    continue
                for i in _slots(HALF_OPS[node.op][1], len(node.outputs)):
                    t = node.outputs[i]
                    if t.name and st.types.get(t.name) == onnx.TensorProto.FLOAT:
                        st.half_tensors.add(id(t))
        # 4. outputs of graphs and bodies keep their types: the producer writes a half twin
        for g in graphs:
            for t in list(g.outputs):
                if id(t) in st.half_tensors:
                    twin = gs.Variable(st.namer.fresh(t.name, cfg.dtype), dtype=self._gs_half(st), shape=t.shape)
                    replace_output(t.inputs[0], t, twin)
                    st.half_tensors.discard(id(t))
                    st.half_tensors.add(id(twin))
                    for c in list(t.outputs):
                        replace_input(c, t, twin)
                    self._cast_node(g, twin, t, onnx.TensorProto.FLOAT, st)
                    st.casts[(id(twin), id(g), onnx.TensorProto.FLOAT)] = t
        for g in graphs:
            for t in g.tensors().values():
                if id(t) in st.half_tensors and isinstance(t, gs.Variable):
                    t.dtype = self._gs_half(st)
        # 5. every reader gets the type it expects
        for g in graphs:
            for node in list(g.nodes):
                for i, t in enumerate(list(node.inputs)):
                    if not t.name:
                        continue
                    want = self._slot_want(node, i, t, st)
                    if want is None:
                        continue
                    new = self._provide(t, want, node, g, st)
                    if new is not t:
                        node.inputs[i] = new
        n_half = len(st.half_nodes)
        total = sum(len(g.nodes) for g in graphs)
        if n_half or st.n_weights:
            res.changed(f"{n_half} nodes compute in {cfg.dtype}; {st.n_weights} weights stored in {cfg.dtype}; "
                        f"{st.n_casts} Casts inserted; {retargeted} Casts retargeted")
        res.details = {**res.details, "dtype": cfg.dtype, "compute": cfg.compute, "half_nodes": n_half, "nodes": total,
                       "kept_float_by_op": kept, "weights_converted": st.n_weights, "casts_inserted": st.n_casts,
                       "casts_retargeted": retargeted, "values_flushed_to_zero": st.flushed,
                       "hot_tensors": sorted(hot)[:50]}
        if cfg.dtype == "bfloat16" and cfg.target == "cpu":
            ctx and ctx.note("convert_fp16: onnxruntime's CPU execution provider has bfloat16 kernels for few ops; "
                             "the others stay float32 with bfloat16 weights (file size only)")
        return res

    # -- "may I?" ---------------------------------------------------------------------------------

    def _may_convert(self, node: gs.Node, st: _State, hot: set[str], probe) -> str:
        cfg = st.cfg
        if cfg.compute == "float":
            return "compute=float"
        if node.op == "Constant":
            return ""  # a weight: converted where it is read
        if node.op in _CONTROL_FLOW:
            return "control flow: its bodies are converted inside, its boundary keeps its types"
        if (node.domain or "") not in ("", "ai.onnx") or node.op not in HALF_OPS:
            return f"{node.op} is not in the converter's op table"
        if node.op in cfg.keep_ops:
            return f"{node.op} is in keep_ops"
        if matches_any(node.name or "", cfg.keep_nodes):
            return "matches keep_nodes"
        ins, outs = HALF_OPS[node.op]
        float_slots = 0
        for i in _slots(ins, len(node.inputs)):
            t = node.inputs[i]
            if not t.name:
                continue
            ty = st.types.get(t.name)
            if ty is None:
                return f"input {t.name!r} has no known type"
            if ty != onnx.TensorProto.FLOAT:
                return f"input {t.name!r} is {onnx.TensorProto.DataType.Name(ty)}, not FLOAT"
            float_slots += 1
            if t.name in hot:
                return f"input {t.name!r} exceeds the {cfg.dtype} range on the calibration data"
            ref = weight_ref(t, None)
            if ref is not None:
                why = self._weight_check(ref.constant, st)
                if why:
                    return f"weight {t.name!r}: {why}"
        for i in _slots(outs, len(node.outputs)):
            t = node.outputs[i]
            ty = st.types.get(t.name)
            if ty is None:
                return f"output {t.name!r} has no known type"
            if ty != onnx.TensorProto.FLOAT:
                return f"output {t.name!r} is {onnx.TensorProto.DataType.Name(ty)}, not FLOAT"
            if t.name in hot:
                return f"output {t.name!r} exceeds the {cfg.dtype} range on the calibration data"
        if not float_slots:
            return "no float32 input"
        if probe is not None and not probe.runs(node, ins):
            return f"the onnxruntime CPU execution provider has no {cfg.dtype} kernel for {node.op}"
        return ""

    @staticmethod
    def _weight_check(const: gs.Constant, st: _State) -> str:
        key = id(const)
        if key not in st.weight_ok:
            w = np.asarray(const.values)
            why = ""
            if w.dtype != np.float32:
                why = f"dtype {w.dtype}"
            elif w.size:
                amax = float(np.max(np.abs(w)))
                if not np.isfinite(amax) or amax > st.max_half:
                    why = f"max |w| = {amax:.3g} overflows {st.cfg.dtype}"
                else:
                    h = w.astype(st.np_half).astype(np.float32)
                    rel = float(np.linalg.norm(h - w) / max(float(np.linalg.norm(w)), 1e-38))
                    if rel > st.cfg.weight_tolerance:
                        flushed = int(np.count_nonzero((h == 0) & (w != 0)))
                        why = (f"relative error {rel:.2g} in {st.cfg.dtype} > {st.cfg.weight_tolerance:g}"
                               + (f" ({flushed} values flushed to 0)" if flushed else ""))
            st.weight_ok[key] = why
        return st.weight_ok[key]

    # -- typing -----------------------------------------------------------------------------------

    @staticmethod
    def _gs_half(st: _State):
        # graphsurgeon has no numpy bfloat16: such tensors get no value_info (shape inference fills it)
        return np.float16 if st.onnx_half == onnx.TensorProto.FLOAT16 else None

    def _expects(self, node: gs.Node, t: gs.Tensor, st: _State) -> str | None:
        """What type ``node`` wants for ``t`` (first slot reading it): 'half', 'float' or None (any)."""
        for i, x in enumerate(node.inputs):
            if x is t:
                return self._slot_want(node, i, t, st)
        return None

    @staticmethod
    def _slot_want(node: gs.Node, i: int, t: gs.Tensor, st: _State) -> str | None:
        if st.types.get(t.name) != onnx.TensorProto.FLOAT and id(t) not in st.half_tensors:
            return None
        if node.op in _ANY_TYPE_READERS and i in _ANY_TYPE_READERS[node.op]:
            return None
        if id(node) in st.half_nodes and i in _slots(HALF_OPS[node.op][0], len(node.inputs)):
            return "half"
        return "float"

    def _provide(self, t: gs.Tensor, want: str, node: gs.Node, g: gs.Graph, st: _State) -> gs.Tensor:
        """``t`` as the type ``want``: itself, a converted weight, or the output of a (shared) Cast."""
        ref = weight_ref(t, g)
        if ref is not None and ref.dtype == np.float32:
            ok = not self._weight_check(ref.constant, st)
            # a custom-domain op keeps its constant inputs as they are: onnxruntime's contrib kernels
            # prepack constant inputs at load, and MatMulNBits (accuracy level 4) given its scales
            # through a Cast computes wrong numbers unless the optimizer happens to fold that Cast
            native = (node.domain or "") in ("", "ai.onnx")
            if want == "half" or (ok and native and st.cfg.store_kept_weights and ref.size >= 16):
                h = self._half_constant(ref, g, st)
                if want == "half":
                    return h
                key = (id(h), id(g), onnx.TensorProto.FLOAT)
                if key not in st.casts:
                    out = gs.Variable(st.namer.fresh(t.name, "float"), dtype=np.float32, shape=list(ref.shape))
                    st.casts[key] = self._cast_node(g, h, out, onnx.TensorProto.FLOAT, st)
                return st.casts[key]
            return t
        is_half = id(t) in st.half_tensors
        if (want == "half") == is_half:
            return t
        to = st.onnx_half if want == "half" else onnx.TensorProto.FLOAT
        key = (id(t), id(g), to)
        if key not in st.casts:
            out = gs.Variable(st.namer.fresh(t.name, "fp16" if want == "half" and st.cfg.dtype == "float16" else
                                             ("bf16" if want == "half" else "fp32")),
                              dtype=self._gs_half(st) if want == "half" else np.float32, shape=t.shape)
            st.casts[key] = self._cast_node(g, t, out, to, st)
        return st.casts[key]

    def _half_constant(self, ref, g: gs.Graph, st: _State) -> gs.Tensor:
        key = (id(ref.constant), id(g))
        if key not in st.half_consts:
            w = np.asarray(ref.values, np.float32)
            h = w.astype(st.np_half)
            st.flushed += int(np.count_nonzero((h.astype(np.float32) == 0) & (w != 0)))
            name = st.namer.fresh(ref.name, "fp16" if st.cfg.dtype == "float16" else "bf16")
            st.half_consts[key] = gs.Constant(name, h) if st.np_half is np.float16 else proto_constant(name, h)
            st.n_weights += 1
        return st.half_consts[key]

    @staticmethod
    def _cast_node(g: gs.Graph, src: gs.Tensor, out: gs.Tensor, to: int, st: _State) -> gs.Tensor:
        g.nodes.append(gs.Node("Cast", name=st.namer.fresh(out.name, "Cast"), inputs=[src], outputs=[out],
                               attrs={"to": int(to)}))
        st.n_casts += 1
        return out

    # -- activation ranges ------------------------------------------------------------------------

    def _hot_tensors(self, graph: gs.Graph, ctx, types: dict[str, int], res: PassResult) -> set[str]:
        """Names of float32 activations whose max |x| exceeds the half range (needs data)."""
        if ctx is None or getattr(ctx, "data", None) is None or self.config.compute == "float":
            return set()
        from onnxcompress.quantize.gptq import stream_tensors

        cfg = self.config
        limit = _HALF[cfg.dtype][2] / cfg.activation_headroom
        names = [t.name for n in graph.nodes for t in n.outputs
                 if t.name and types.get(t.name) == onnx.TensorProto.FLOAT]
        amax = dict.fromkeys(names, 0.0)
        for got, values in stream_tensors(graph, ctx, names, cfg.calib_samples):
            for nm, x in zip(got, values):
                x = np.asarray(x)
                if x.size:
                    a = float(np.max(np.abs(x)))
                    amax[nm] = max(amax[nm], a if np.isfinite(a) else float("inf"))
        hot = {nm for nm, a in amax.items() if a > limit}
        if hot:
            res.details["activation_max"] = {nm: amax[nm] for nm in sorted(hot)}
        return hot


def _is_io(t: gs.Tensor, graphs: list[gs.Graph]) -> bool:
    return any(any(t is x for x in g.outputs) or any(t is x for x in g.inputs) for g in graphs)


class _KernelProbe:
    """Does the onnxruntime CPU EP have a kernel for this node with its float slots in the half type?"""

    def __init__(self, opset: int, onnx_half: int, types: dict[str, int]) -> None:
        self.opset, self.half, self.types = opset, onnx_half, types
        self.cache: dict[tuple, bool] = {}

    def runs(self, node: gs.Node, ins) -> bool:
        import onnxruntime as ort

        slots = set(_slots(ins, len(node.inputs)))
        in_types = tuple(self.half if i in slots else self.types.get(t.name, onnx.TensorProto.FLOAT)
                         for i, t in enumerate(node.inputs) if t.name)
        key = (node.op, in_types, tuple(sorted((k, str(v)) for k, v in node.attrs.items()
                                               if not isinstance(v, (gs.Graph, gs.Constant)))))
        if key in self.cache:
            return self.cache[key]
        names, inputs = [], []
        for i, t in enumerate(node.inputs):
            if not t.name:
                names.append("")
                continue
            ty = self.half if i in slots else self.types.get(t.name, onnx.TensorProto.FLOAT)
            names.append(f"i{i}")
            inputs.append(onnx.helper.make_tensor_value_info(f"i{i}", ty, None))
        outs = [f"o{i}" for i in range(len(node.outputs))]
        attrs = {k: v for k, v in node.attrs.items() if not isinstance(v, (gs.Graph, gs.Constant))}
        try:
            onode = onnx.helper.make_node(node.op, names, outs, **attrs)
            g = onnx.helper.make_graph([onode], "probe", inputs, [onnx.helper.make_empty_tensor_value_info(o)
                                                                 for o in outs])
            m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
            m.ir_version = 10
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.log_severity_level = 4
            ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            ok = True
        except Exception:  # no kernel (or the probe itself is not loadable): keep it float32
            ok = False
        self.cache[key] = ok
        return ok
