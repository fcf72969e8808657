"""Building the decode subgraph of one encoded weight.

A :class:`DecodeBuilder` appends plain-op nodes (Cast, Gather, BitShift, Mod, CumSum, Mul,
Concat, ScatterElements, ConstantOfShape, Reshape) to the graph the weight lives in (the main graph
or an If/Loop body) and gives every new tensor a short unique name (``~0``, ``~1`` ...: :meth:`Namer.short
<onnxcompress.graph.naming.Namer.short>`) and no node name: the chain is folded away when onnxruntime
loads the model, so its names would be pure file overhead (about 60 of the 75 bytes of a decode node
named after its weight). Only its last tensor is named, after the weight it replaces. Every input of
every node it makes is a constant, so onnxruntime folds the whole chain into one dense initializer
when the session is created.

**Pooled streams.** Each encoded weight reads one to three packed integer streams (codebook
indices, gaps, a bitmask), and unpacking one takes four to six nodes — about 200 bytes of file, as
much as the packed data of a small layer. With a :class:`StreamPools` (what ``compact_storage``
passes), every stream of the same bit width in one graph is appended to one packed constant,
unpacked by one chain and cut apart by one ``Split`` (sizes = the streams' lengths, plus the
padding the packing added): a further stream costs one ``Split`` output instead of a chain.
:meth:`StreamPools.finish` writes the packed constants once every weight is encoded.

Packed sub-byte tensors (``UINT4`` / ``UINT2``) are written as ready-made TensorProtos wrapped in
``LazyValues``: onnx-graphsurgeon exports those untouched, so the packed bytes reach the file as
they are.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcompress.encode.packing import byte_aligned, native_packed_dtype, pack_bits
from onnxcompress.graph.naming import Namer
from onnxcompress.graph.rewrite import replace_all_uses

__all__ = ["DecodeBuilder", "StreamPools", "stream_nodes"]


def stream_nodes(count: int, bits: int, opset: int, *, pooled: bool = False) -> int:
    """How many nodes :meth:`DecodeBuilder.uint_stream` makes (for the size estimate); a pooled
    stream is counted as one (its share of the pool's chain and its ``Split`` output)."""
    if pooled:
        return 1
    if bits == 8 or native_packed_dtype(bits, opset) is not None:
        return 1
    if not byte_aligned(bits):
        return 5 + (count % 8 != 0)
    return 4 + (count % (8 // bits) != 0)


class DecodeBuilder:
    """Appends the decode nodes of one weight (``base``: its name, for messages) to ``graph``."""

    #: constants up to this many bytes are shared between the decoders of one graph
    SHARED_BYTES = 64

    def __init__(self, graph: gs.Graph, namer: Namer, base: str, opset: int,
                 shared: dict | None = None, pools: "StreamPools | None" = None) -> None:
        self.graph = graph
        self.namer = namer
        self.base = base
        self.opset = opset
        self.nodes: list[gs.Node] = []
        self.shared = shared if shared is not None else {}
        self.pools = pools

    def _name(self) -> str:
        return self.namer.short()

    def const(self, values: np.ndarray, suffix: str) -> gs.Constant:
        values = np.ascontiguousarray(values)
        key = None
        if values.nbytes <= self.SHARED_BYTES:
            key = (id(self.graph), values.dtype.str, values.shape, values.tobytes())
            if key in self.shared:
                return self.shared[key]
        c = gs.Constant(self._name(), values)
        if key is not None:
            self.shared[key] = c
        return c

    def packed_const(self, packed: np.ndarray, data_type: int, count: int, suffix: str) -> gs.Constant:
        """A constant of a packed sub-byte ONNX type holding ``count`` elements in ``packed`` bytes."""
        name = self._name()
        proto = onnx.helper.make_tensor(name, data_type, [count], np.ascontiguousarray(packed, np.uint8).tobytes(),
                                        raw=True)
        return gs.Constant(name, LazyValues(proto))

    def op(self, op: str, inputs: list[gs.Tensor], suffix: str, **attrs) -> gs.Variable:
        out = gs.Variable(self._name())
        node = gs.Node(op, name="", attrs=attrs, inputs=list(inputs), outputs=[out])
        self.graph.nodes.append(node)
        self.nodes.append(node)
        return out

    def i64(self, values, suffix: str) -> gs.Constant:
        return self.const(np.asarray(values, dtype=np.int64), suffix)

    def uint_stream(self, values: np.ndarray, bits: int, suffix: str) -> gs.Variable:
        """An int64 tensor [count] decoding unsigned ints ``< 2**bits`` stored packed (appended to the
        graph's pool of ``bits``-bit streams when the builder has pools)."""
        if self.pools is not None:
            return self.pools.add(self, values, bits)
        return self.unpack(values, bits, suffix)

    def unpack(self, values: np.ndarray, bits: int, suffix: str) -> gs.Variable:
        """The unpacking chain of one packed stream (see :mod:`onnxcompress.encode.packing`)."""
        count = int(values.size)
        if bits == 8:
            src = self.const(values.astype(np.uint8), suffix)
            return self.op("Cast", [src], f"{suffix}_i64", to=onnx.TensorProto.INT64)
        packed = pack_bits(values, bits)
        native = native_packed_dtype(bits, self.opset)
        if native is not None:
            src = self.packed_const(packed, native, count, suffix)
            return self.op("Cast", [src], f"{suffix}_i64", to=onnx.TensorProto.INT64)
        if not byte_aligned(bits):
            return self._word_stream(packed, bits, count, suffix)
        per = 8 // bits
        src = self.const(packed.reshape(-1, 1), f"{suffix}_packed")
        shifts = self.const((np.arange(per) * bits).astype(np.uint8), f"{suffix}_shifts")
        shifted = self.op("BitShift", [src, shifts], f"{suffix}_shifted", direction="RIGHT")
        mod = self.op("Mod", [shifted, self.const(np.array(1 << bits, np.uint8), f"{suffix}_modulus")],
                      f"{suffix}_digits")
        flat = self.op("Reshape", [mod, self.i64([-1], f"{suffix}_flat_shape")], f"{suffix}_flat")
        if packed.size * per != count:
            flat = self.op("Slice", [flat, self.i64([0], f"{suffix}_start"), self.i64([count], f"{suffix}_end")],
                           f"{suffix}_sliced")
        return self.op("Cast", [flat], f"{suffix}_i64", to=onnx.TensorProto.INT64)

    def _word_stream(self, packed: np.ndarray, bits: int, count: int, suffix: str) -> gs.Variable:
        """3, 5, 6 or 7 bits: each row of ``bits`` bytes is one integer holding 8 elements."""
        src = self.const(packed.reshape(-1, bits), f"{suffix}_packed")
        wide = self.op("Cast", [src], f"{suffix}_wide", to=onnx.TensorProto.INT64)
        word = self.op("MatMul", [wide, self.i64((256 ** np.arange(bits)).reshape(bits, 1), "radix")], "word")
        shifted = self.op("Div", [word, self.i64(2 ** (bits * np.arange(8)), "powers")], f"{suffix}_shifted")
        digits = self.op("Mod", [shifted, self.i64(1 << bits, "modulus")], f"{suffix}_digits")
        flat = self.op("Reshape", [digits, self.i64([-1], "flat_shape")], f"{suffix}_flat")
        if packed.size // bits * 8 != count:
            flat = self.op("Slice", [flat, self.i64([0], "start"), self.i64([count], "end")], f"{suffix}_sliced")
        return flat


class StreamPools:
    """The pooled packed streams of one ``compact_storage`` run: one pool per (graph, bit width).

    :meth:`add` records a stream and returns its ``Split`` output at once (so the weight's decode
    can be built on it); :meth:`finish` then builds each pool's constant and unpacking chain and
    sets the ``Split`` sizes. A pool of a single stream is unpacked directly, without a ``Split``.
    """

    def __init__(self) -> None:
        self._pools: dict[tuple[int, int], dict] = {}

    def add(self, b: DecodeBuilder, values: np.ndarray, bits: int) -> gs.Variable:
        key = (id(b.graph), bits)
        pool = self._pools.get(key)
        if pool is None:
            split = gs.Node("Split", name="", attrs={"axis": 0}, inputs=[], outputs=[])
            b.graph.nodes.append(split)
            pool = self._pools[key] = {"builder": b, "bits": bits, "parts": [], "split": split}
        pool["parts"].append(np.asarray(values, np.uint8).ravel())
        out = gs.Variable(b.namer.short())  # no dtype: it would only add a value_info entry
        pool["split"].outputs.append(out)
        return out

    def finish(self) -> None:
        """Write every pool's packed constant and chain (idempotent: pools are emptied)."""
        for pool in self._pools.values():
            b: DecodeBuilder = pool["builder"]
            parts, split = pool["parts"], pool["split"]
            values = np.concatenate(parts)
            decoded = b.unpack(values, pool["bits"], "pool")
            if len(parts) == 1:  # nothing to cut apart: consumers read the chain itself
                replace_all_uses(split.outputs[0], decoded)
                split.outputs.clear()
                b.graph.nodes.remove(split)
                continue
            sizes = [int(p.size) for p in parts]
            split.inputs = [decoded]
            if b.opset >= 13:
                split.inputs.append(b.i64(sizes, "sizes"))
            else:
                split.attrs["split"] = sizes
        self._pools.clear()
