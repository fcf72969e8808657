"""``compact_storage``: every large constant weight in the smallest exact encoding stock onnxruntime
folds back at load.

For a weight flattened to ``x[n]`` (see :mod:`~onnxcompress.encode.codebook` for the work dtype), each
candidate is a layout (which entries are stored: all, the nonzeros behind a bitmask, or the nonzeros
with gap-encoded positions — :mod:`~onnxcompress.encode.sparse`) times a value stream (the entries
as they are, or ``codebook[idx]`` with packed indices). Sizes, in bytes, with ``s`` the itemsize,
``z`` = nonzeros, ``L`` = gap entries (fillers included), ``K`` = distinct values, ``b`` index bits
(1..8; ``ceil(x·b/8)`` is in whole groups of 8 elements for 3, 5, 6, 7 bits, see
:mod:`~onnxcompress.encode.packing`):

==================  ==========================================
dense               ``n·s``
codebook            ``K·s + ceil(n·b/8)``
bitmask + raw       ``ceil(n/8) + z·s``
bitmask + codebook  ``ceil(n/8) + K·s + ceil(z·b/8)``
gaps(g) + raw       ``ceil(L·g/8) + L·s``
gaps(g) + codebook  ``ceil(L·g/8) + K·s + ceil(L·b/8)``
==================  ==========================================

The smallest wins when, with ``node_bytes`` per decode node added, it saves at least
``min_saving`` of the dense bytes; otherwise the weight stays dense. Integer weights are encoded the
same way, so the int8/int4 tensor that feeds a ``Cast -> Mul`` storage chain is re-encoded sparsely
and the chain stays in place. The holes need not be zeros: the most frequent value is used when it is
more frequent than zero (the int4 storage form's byte ``0x88`` for two pruned codes).

The decode (``... -> Reshape (unless 1-D) [-> Cast back to int4/uint4]``) is written into the graph that holds
the weight (If/Loop bodies included); its output takes the weight's name, so consumers and
reports keep seeing the same tensor. Before anything is written, the numpy mirror of the decode is
compared bit for bit with the original (a mismatch is a bug: PassError). Weights that are graph
outputs, weights read by custom-domain ops (``com.microsoft::MatMulNBits`` and the like prepack
initializers), of a dtype with no encoding, or in a model below opset 11 (BitShift, CumSum) stay as
they are, each reported as a Skip. QDQ weights (``DequantizeLinear`` inputs) are encoded: the decode
folds before onnxruntime's QDQ fusions run, so QLinearMatMul/QLinearConv still form. ``res.details["tensors"]`` has the bytes per tensor (``{name: {...}}``, the plan format).

onnxruntime constant-folds every decode op at session creation (ORT_ENABLE_BASIC and above), so the
optimized graph, numerics and latency are those of the dense model; only with
ORT_DISABLE_ALL does the decode run at every inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.encode.codebook import CodebookValues, RawValues, WorkArray, bit_keys, codebook_values, work_array
from onnxcompress.encode.decoder import DecodeBuilder, StreamPools
from onnxcompress.encode.packing import ALL_BITS, MIN_OPSET, packed_nbytes
from onnxcompress.encode.sparse import BitmaskLayout, FullLayout, GapLayout, background, gap_layout, nonzero_mask
from onnxcompress.errors import PassError
from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import WeightRef, is_graph_io, iter_weights
from onnxcompress.graph.rewrite import replace_all_uses
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.recipe import StepConfig, option

__all__ = ["CompactStorageConfig", "CompactStoragePass", "Encoding", "choose_encoding"]

FORMS = ("codebook", "bitmask", "gaps")
#: gap widths tried by default: the best width is near log2(1/p) + 1 bits for a fraction p of non-zeros
GAP_BITS = (3, 4, 5, 6, 8)

Layout = Union[FullLayout, BitmaskLayout, GapLayout]
Values = Union[RawValues, CodebookValues]


@dataclass(frozen=True)
class CompactStorageConfig(StepConfig):
    name = "compact_storage"
    order = 95

    enabled: bool = option(True, "store large weights in the smallest exact encoding (codebook, bitmask or "
                                 "gap-encoded sparse) that onnxruntime folds back at load; part of every preset",
                           flag="--compact-storage")
    min_elements: int = option(1024, "only weights with at least this many elements are encoded",
                               flag="--compact-min-elements", minimum=1)
    forms: tuple[str, ...] = option(FORMS, "encodings that may be used, comma separated", flag="--compact-forms",
                                    choices=FORMS, metavar="LIST")
    gap_bits: tuple[int, ...] = option(GAP_BITS, "bit widths tried for gap-encoded positions", choices=ALL_BITS)
    max_codebook: int = option(256, "a codebook holds at most this many distinct values", minimum=2, maximum=256)
    min_saving: float = option(0.02, "encode only when that saves at least this fraction of the dense bytes",
                               minimum=0, maximum=1)
    node_bytes: int = option(64, "estimated file bytes per decode node, added to each candidate's size", minimum=0)


@dataclass(frozen=True)
class Encoding:
    """One candidate: a layout and a value stream for one weight."""

    work: WorkArray
    layout: Layout
    values: Values

    @property
    def label(self) -> str:
        if isinstance(self.layout, FullLayout):
            return "dense" if isinstance(self.values, RawValues) else self.values.label
        return f"{self.layout.label}+{self.values.label}"

    @property
    def is_dense(self) -> bool:
        return self.label == "dense"

    @property
    def nbytes(self) -> int:
        return self.work.nbytes if self.is_dense else self.layout.nbytes + self.values.nbytes

    def n_nodes(self, opset: int) -> int:
        if self.is_dense:
            return 0
        return (self.layout.n_nodes(opset) + self.values.n_nodes(opset)
                + (len(self.work.shape) != 1) + bool(self.work.sub_byte_bits))

    def decode(self) -> np.ndarray:
        """The numpy mirror of :meth:`emit` (flat, work dtype)."""
        return self.layout.decode(self.values.decoded())

    def emit(self, b: DecodeBuilder) -> gs.Tensor:
        out = self.layout.emit(b, self.values.emit(b), self.work.flat.dtype)
        if len(self.work.shape) != 1:  # a 1-D weight (a bias) is decoded in its shape already
            out = b.op("Reshape", [out, b.i64(list(self.work.shape))])
        if self.work.sub_byte_bits:
            out = b.op("Cast", [out], to=self.work.onnx_dtype)
        return out


def _candidates(work: WorkArray, cfg: CompactStorageConfig, rng: np.random.Generator, *,
                everything: bool = False) -> list[Encoding]:
    """The candidate encodings of one weight.

    A sparse layout is built only when its lower bound (position bytes plus 1 bit per stored entry)
    beats the best full-layout candidate, unless ``everything`` (tests decode every candidate).
    """
    flat = work.flat
    out: list[Encoding] = []

    def add(layout: Layout) -> None:
        entries = layout.entries(flat)
        out.append(Encoding(work, layout, RawValues(entries, work.sub_byte_bits, work.onnx_dtype)))
        if "codebook" in cfg.forms:
            cb = codebook_values(entries, max_size=cfg.max_codebook, rng=rng)
            if cb is not None:
                out.append(Encoding(work, layout, cb))

    add(FullLayout(flat.size))
    fill = background(flat, rng)
    mask = nonzero_mask(flat, fill)
    nnz = int(np.count_nonzero(mask))
    if (flat.size - nnz) * work.itemsize_bits <= flat.size:  # a bitmask costs 1 bit per element
        return out
    bitmask_bound = packed_nbytes(flat.size, 1) + nnz // 8
    if "bitmask" in cfg.forms and (everything or bitmask_bound < min(c.nbytes for c in out)):
        add(BitmaskLayout(mask, fill))
    if "gaps" in cfg.forms and nnz:
        for g in sorted(set(cfg.gap_bits)):
            if everything or nnz * (g + 1) // 8 < min(c.nbytes for c in out):
                add(gap_layout(mask, g, fill))
    return out


def choose_encoding(work: WorkArray, cfg: CompactStorageConfig, opset: int,
                    rng: np.random.Generator | None = None) -> tuple[Encoding, dict[str, int]]:
    """The chosen encoding (possibly dense) and every candidate's estimated bytes, by label."""
    rng = rng if rng is not None else np.random.default_rng(0)
    cands = _candidates(work, cfg, rng)
    cost = {c.label: c.nbytes + cfg.node_bytes * c.n_nodes(opset) for c in cands}
    dense = next(c for c in cands if c.is_dense)
    best = min(cands, key=lambda c: cost[c.label])
    if best.is_dense or cost[best.label] > dense.nbytes * (1.0 - cfg.min_saving):
        best = dense
    return best, cost


class CompactStoragePass(Pass):
    config_cls = CompactStorageConfig
    lossless = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        cfg: CompactStorageConfig = self.config
        if not cfg.enabled:
            return res
        opset = int(graph.opset or 0)
        table: dict[str, dict] = {}
        res.details["tensors"] = table
        weights = list(iter_weights(graph, min_size=cfg.min_elements))
        if opset < MIN_OPSET:
            for ref in weights:
                res.skip(ref.name, "compact_storage", f"the model's opset {opset} is below {MIN_OPSET}, which the "
                         "decode ops (BitShift, CumSum, ScatterElements) need")
            return res
        namer = Namer.for_graph(graph)
        shared: dict = {}  # small decode constants shared between weights of one graph
        pools = StreamPools()  # packed streams of one width share one unpacking chain
        rng = ctx.rng("compact_storage") if ctx is not None else np.random.default_rng(0)
        for ref in weights:
            reason = self._refusal(ref)
            if reason is not None:
                res.skip(ref.name, "compact_storage", reason)
                continue
            work = work_array(ref.values)
            if work is None:
                res.skip(ref.name, "compact_storage", f"no exact encoding for dtype {ref.dtype}")
                continue
            enc, cost = choose_encoding(work, cfg, opset, rng)
            row = table[ref.name] = {
                "graph": ref.graph.name or "", "kind": ref.kind,
                "shape": list(work.shape), "dtype": str(ref.dtype),
                "nonzero": int(np.count_nonzero(bit_keys(work.flat))),
                "dense_bytes": work.nbytes, "encoded_bytes": enc.nbytes, "encoding": enc.label,
                "ratio": round(enc.nbytes / max(work.nbytes, 1), 4), "candidates": cost,
            }
            if enc.is_dense:
                continue
            self._rewrite(ref, enc, namer, opset, shared, pools)
            res.changed(f"{ref.name}: {enc.label}, {work.nbytes} -> {enc.nbytes} bytes ({row['ratio']:.3f}x)")
        pools.finish()
        dense = sum(r["dense_bytes"] for r in table.values())
        encoded = sum(r["encoded_bytes"] for r in table.values())
        res.details["totals"] = {"tensors": len(table), "encoded": sum(r["encoding"] != "dense" for r in table.values()),
                                 "dense_bytes": dense, "encoded_bytes": encoded,
                                 "ratio": round(encoded / dense, 4) if dense else 1.0}
        return res

    @staticmethod
    def _refusal(ref: WeightRef) -> str | None:
        """Why this weight may not be re-encoded, or None."""
        if is_graph_io(ref.tensor, ref.graph):
            return "the weight is a graph output; its name and storage are part of the model's interface"
        custom = next((c for c in ref.consumers if (c.domain or "") not in ("", "ai.onnx")), None)
        if custom is not None:
            return (f"read by {custom.domain}::{custom.op} ({custom.name}), a custom kernel that may need the weight "
                    "as an initializer when the session is built")
        return None

    @staticmethod
    def _rewrite(ref: WeightRef, enc: Encoding, namer: Namer, opset: int, shared: dict, pools: StreamPools) -> None:
        decoded = enc.decode()
        if decoded.shape != enc.work.flat.shape or not np.array_equal(bit_keys(decoded), bit_keys(enc.work.flat)):
            raise PassError(f"the {enc.label} encoding of {ref.name!r} does not decode to the original bits",
                            where="compact_storage", hint="leave compact_storage out of the recipe and report this bug")
        original = ref.tensor.name
        b = DecodeBuilder(ref.graph, namer, opset, shared, pools)
        out = enc.emit(b)
        ref.tensor.name = namer.fresh(original, "dense")
        out.name = original
        # no dtype / shape on ``out``: they would only add a value_info entry to the file (onnxruntime
        # folds the chain into an initializer with both); shape inference recovers them
        replace_all_uses(ref.tensor, out)
