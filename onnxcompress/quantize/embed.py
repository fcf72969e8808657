"""quantize_embedding: embedding tables (Gather on a constant) stored in 4 or 8 bits.

The rule, per row v of the table E[V, D] and block b of ``bs`` consecutive columns::

    E[v, d] ≈ (q[v, d] − z[v, b]) · s[v, b],   b = d // bs,   q, z ∈ {0 .. 2^bits − 1}

with the asymmetric min–max scale of :func:`onnxcompress.quantize.int4.quantize_blocks`, and (``search``)
the per-block clipping ratio that minimizes Σ(E − Ê)² (ratio 1 = plain round-to-nearest is always
tried).

**Small tables in 8 bits** (``first_bits`` = 8, default). The tables are the model's input layer: their
error reaches every later layer. As quantize_int4 does for its input layer, they get 8 bits (``bits``
otherwise) when together they hold at most ``first_max_share`` (25%) of the weight elements (the
tables' and every layer's: MatMul, Gemm, Conv, MatMulNBits); a model that is mostly its embedding
keeps ``bits``. Measured on the digits transformer (17×64 table, 1.6% of the weights, after int4):
4-bit rows double the logit MSE against fp32 (0.016 → 0.032 on the calib, train and test splits
alike), 8-bit rows add nothing measurable, for +0.0014 of the fp32 size. ``y = Gather(E, idx, axis=0)`` becomes one of:

* ``gather_block_quantized`` (default): ``com.microsoft::GatherBlockQuantized(data, idx, scales,
  zero_points, gather_axis=0, quantize_axis=1, block_size=bs, bits)`` with data uint8[V, D·bits/8]
  (4 bits: two codes per byte, the even column in the low nibble), scales float[V, D/bs] and zero
  points packed the same way. The table stays quantized in memory; only the gathered rows are
  decoded. Needs D % bs == 0; other tables use the decode form.
* ``decode`` (size-only, any runtime): ``Cast(uint4|uint8 codes → float) → Reshape[V, nb, bs] →
  Sub(Cast(zero points)) → Mul(scales) → Reshape[V, nb·bs] (→ Slice to D) → Gather``, made only of
  plain ops that onnxruntime constant-folds at session creation: a smaller file, the fp32 table in
  memory, fp32 speed, exactly the dequantized values.

**May I?** A Gather on axis 0 whose data is a constant float32 rank-2 table with at least
``min_elements`` elements, read only by such Gathers (a table tied to an output projection, read by
a MatMul or Transpose too, stays float: quantizing it is the int4/int8 MatMul pass's business), not
a graph output.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import is_constant, is_graph_io, iter_nodes, weight_ref
from onnxcompress.graph.rewrite import disconnect, replace_input
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.quantize.int4 import (MS_DOMAIN, BlockQuant, layer_weight_elements, matches_any, proto_constant,
                                        quantize_blocks)
from onnxcompress.recipe import StepConfig, option

__all__ = ["QuantizeEmbeddingConfig", "QuantizeEmbeddingPass", "decode_blocks"]


@dataclass(frozen=True)
class QuantizeEmbeddingConfig(StepConfig):
    name = "quantize_embedding"
    order = 61
    flag_help = "store embedding tables (Gather on a constant) in 4 or 8 bits"

    bits: int = option(4, "bits per table entry", flag="--embed-bits", choices=(4, 8))
    first_bits: int = option(8, "bits of the tables when they are small (first_max_share): they are the input "
                             "layer", flag="--embed-first-bits", choices=(4, 8))
    first_max_share: float = option(0.25, "first_bits applies when the tables hold at most this share of the "
                                    "weight elements (tables and layers)", minimum=0.0, maximum=1.0)
    block_size: int = option(32, "columns per scale block", flag="--embed-block-size", choices=(16, 32, 64, 128, 256))
    format: str = option("gather_block_quantized", "gather_block_quantized (com.microsoft, table stays quantized "
                         "in memory) or decode (plain Cast/Mul decode that onnxruntime folds at load)",
                         flag="--embed-format", choices=("gather_block_quantized", "decode"))
    method: str = option("search", "rounding: rtn or search (per-block clipping search)", flag="--embed-method",
                         choices=("rtn", "search"))
    search_grid: int = option(24, "clipping ratios tried per block by search", minimum=1, maximum=200)
    search_min_ratio: float = option(0.55, "smallest clipping ratio tried", minimum=0.05, maximum=1.0)
    min_elements: int = option(1024, "tables with fewer elements stay float", minimum=0)
    exclude: tuple[str, ...] = option((), "Gather node-name patterns (fnmatch) kept in float", metavar="PATTERNS")


def _check(node: gs.Node, graph: gs.Graph, cfg: QuantizeEmbeddingConfig) -> str:
    """'' when the Gather's table may be quantized, else the reason."""
    if matches_any(node.name or "", cfg.exclude):
        return "excluded by name"
    if int(node.attrs.get("axis", 0)) != 0:
        return f"Gather on axis {node.attrs.get('axis')} (only row lookups, axis 0)"
    data = node.inputs[0]
    if not is_constant(data):
        return ""  # not an embedding lookup: silently not ours
    if is_constant(node.inputs[1]):
        return "the indices are constant too (fold it instead)"
    ref = weight_ref(data, graph)
    if ref is None or ref.dtype != np.float32 or len(ref.shape) != 2:
        return "the table is not a float32 2-D constant"
    if ref.size < cfg.min_elements:
        return f"the table has {ref.size} elements (< min_elements {cfg.min_elements})"
    if is_graph_io(data, graph):
        return "the table is a graph output"
    for c in data.outputs:
        if c.op != "Gather" or c.inputs[0] is not data or int(c.attrs.get("axis", 0)) != 0:
            return f"the table is also read by {c.op} {c.name!r} (tied weights)"
    return "ok"


def decode_blocks(g: gs.Graph, bq: BlockQuant, bits: int, namer: Namer, base: str, opset: int) -> gs.Variable:
    """Add the size-only decode subgraph of ``bq`` to ``g``; return the float [R, cols] tensor.

    Cast(codes) → Reshape[R, nb, bs] → Sub(Cast(zero points)) → Mul(scales) → Reshape[R, nb·bs]
    (→ Slice to cols): plain ops only, folded by onnxruntime at session creation. 4-bit codes are
    stored as uint4 from opset 21 on; below it (Cast takes no uint4) as bytes holding two codes,
    split in float: hi = Floor(p / 16), lo = p − 16·hi (exact).
    """
    r, nb, bs = bq.q.shape[0], bq.n_blocks, bq.block_size

    def var(suffix: str, shape) -> gs.Variable:
        return gs.Variable(namer.fresh(base, suffix), dtype=np.float32, shape=shape)

    def const(suffix: str, value) -> gs.Constant:
        return gs.Constant(namer.fresh(base, suffix), np.asarray(value))

    def node(op: str, inputs: list, out: gs.Variable, **attrs) -> gs.Variable:
        g.nodes.append(gs.Node(op, name=namer.fresh(out.name, op), inputs=inputs, outputs=[out], attrs=attrs))
        return out

    to_float = 1  # onnx.TensorProto.FLOAT
    if bits == 4 and opset < 21:
        half = nb * bs // 2
        p = node("Cast", [gs.Constant(namer.fresh(base, "u4x2"), bq.pack_nibbles().reshape(r, half))],
                 var("packed_f", [r, half]), to=to_float)
        hi = node("Floor", [node("Mul", [p, const("sixteenth", np.float32(1 / 16))], var("div16", [r, half]))],
                  var("hi", [r, half]))
        lo = node("Sub", [p, node("Mul", [hi, const("sixteen", np.float32(16))], var("hi16", [r, half]))],
                  var("lo", [r, half]))
        pair = [node("Reshape", [t, const("pair_shape", np.array([r, half, 1], np.int64))], var(nm, [r, half, 1]))
                for t, nm in ((lo, "lo3"), (hi, "hi3"))]
        x = node("Concat", pair, var("codes_f", [r, half, 2]), axis=2)
        zeros = gs.Constant(namer.fresh(base, "zero_point"), bq.zero.reshape(r, nb, 1).astype(np.uint8))
    else:
        store = ml_dtypes.uint4 if bits == 4 else np.uint8
        codes = proto_constant(namer.fresh(base, f"u{bits}"), bq.q.astype(store))
        zeros = proto_constant(namer.fresh(base, "zero_point"), bq.zero.reshape(r, nb, 1).astype(store))
        x = node("Cast", [codes], var("codes_f", [r, nb * bs]), to=to_float)
    x = node("Reshape", [x, const("blocks_shape", np.array([r, nb, bs], np.int64))], var("blocks", [r, nb, bs]))
    z = node("Cast", [zeros], var("zero_f", [r, nb, 1]), to=to_float)
    x = node("Sub", [x, z], var("centered", [r, nb, bs]))
    x = node("Mul", [x, const("scale", bq.scale.reshape(r, nb, 1).astype(np.float32))], var("scaled", [r, nb, bs]))
    x = node("Reshape", [x, const("table_shape", np.array([r, nb * bs], np.int64))],
             var("padded" if bq.cols != nb * bs else "decoded", [r, nb * bs]))
    if bq.cols != nb * bs:
        x = node("Slice", [x, const("starts", np.array([0], np.int64)), const("ends", np.array([bq.cols], np.int64)),
                           const("axes", np.array([1], np.int64))], var("decoded", [r, bq.cols]))
    return x


class QuantizeEmbeddingPass(Pass):
    config_cls = QuantizeEmbeddingConfig
    lossless = False

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        cfg: QuantizeEmbeddingConfig = self.config
        res = PassResult()
        self.note_unmatched(ctx, graph, "exclude")
        namer = Namer.for_graph(graph)
        tables: dict[int, tuple[gs.Tensor, gs.Graph, list[gs.Node]]] = {}
        for node, g in iter_nodes(graph):
            if node.op != "Gather" or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            reason = _check(node, g, cfg)
            if reason == "ok":
                tables.setdefault(id(node.inputs[0]), (node.inputs[0], g, []))[2].append(node)
            elif reason:
                res.skip(node.name or node.op, "embedding", reason)
        for key, (data, g, gathers) in list(tables.items()):
            left = [c for c in data.outputs if all(c is not n for n in gathers)]
            if left:  # a reader left on the float table would keep it: the file would grow by the copy
                for n in gathers:
                    res.skip(n.name or n.op, "embedding", f"the table is also read by {left[0].op} {left[0].name!r}, "
                             "which stays float: quantizing would add a copy and keep the float table")
                del tables[key]
        held = sum(weight_ref(data, g).size for data, g, _ in tables.values())
        small = held <= cfg.first_max_share * (held + layer_weight_elements(graph))
        bits = cfg.first_bits if small else cfg.bits
        layers = []
        for data, g, gathers in tables.values():
            if any(id(n) not in {id(x) for x in g.nodes} for n in gathers):
                for n in gathers:
                    res.skip(n.name or n.op, "embedding", "the table is read from several (sub)graphs")
                continue
            table = np.asarray(weight_ref(data, g).values, np.float32)
            v, d = table.shape
            grid = cfg.search_grid if cfg.method == "search" else 1
            bq = quantize_blocks(table, cfg.block_size, bits=bits, grid=grid, min_ratio=cfg.search_min_ratio)
            fmt = cfg.format
            if fmt == "gather_block_quantized" and d % cfg.block_size:
                fmt = "decode"
            if fmt == "gather_block_quantized":
                self._emit_gbq(g, gathers, bq, cfg, namer, data.name)
            else:
                decoded = decode_blocks(g, bq, bits, namer, data.name, graph.opset or 0)
                for n in gathers:
                    replace_input(n, data, decoded)
            err = float(np.linalg.norm(bq.dequant() - table) / max(float(np.linalg.norm(table)), 1e-30))
            entry = {"table": data.name, "gathers": [n.name or n.op for n in gathers], "rows": v, "cols": d,
                     "bits": bits, "block_size": cfg.block_size, "format": fmt,
                     "method": cfg.method, "rel_error": round(err, 6)}
            if fmt != cfg.format:
                entry["why_format"] = f"{d} columns are not a multiple of the block size"
            layers.append(entry)
            res.changed(f"{data.name}: embedding {v}x{d} -> {bits}-bit {fmt} (block {cfg.block_size}, "
                        f"rel. error {err:.4f})")
        res.details = {"bits": bits, "format": cfg.format, "tables": layers}
        return res

    @staticmethod
    def _emit_gbq(g: gs.Graph, gathers: list[gs.Node], bq: BlockQuant, cfg: QuantizeEmbeddingConfig,
                  namer: Namer, base: str) -> None:
        codes, zeros = bq.packed()
        data = codes.reshape(bq.q.shape[0], -1)  # [V, D·bits/8]
        consts = [gs.Constant(namer.fresh(base, f"q{bq.bits}"), data),
                  gs.Constant(namer.fresh(base, "scales"), bq.scale.astype(np.float32)),
                  gs.Constant(namer.fresh(base, "zero_points"), zeros)]
        for n in gathers:
            outs, idx, name = list(n.outputs), n.inputs[1], n.name
            disconnect(n)
            g.nodes.append(gs.Node("GatherBlockQuantized", name=name or namer.fresh(base, "GatherBlockQuantized"),
                                   domain=MS_DOMAIN, inputs=[consts[0], idx, consts[1], consts[2]], outputs=outs,
                                   attrs={"gather_axis": 0, "quantize_axis": 1, "block_size": int(cfg.block_size),
                                          "bits": int(bq.bits)}))
