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
unpacked by one chain (whose Slice drops the packing's padding) and cut apart by one ``Split``
(sizes = the streams' lengths): a further stream costs one ``Split`` output instead of a chain.
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

__all__ = ["DecodeBuilder", "StreamPools", "STREAM_NODES"]


#: the decode nodes a packed stream is counted as in size estimates: ``compact_storage`` pools its
#: streams, so one stream costs its share of the pool's chain and one ``Split`` output
STREAM_NODES = 1


class DecodeBuilder:
    """Appends the decode nodes of one weight to ``graph``."""

    #: constants up to this many bytes are shared between the decoders of one graph
    SHARED_BYTES = 64

    def __init__(self, graph: gs.Graph, namer: Namer, opset: int, shared: dict | None = None,
                 pools: "StreamPools | None" = None) -> None:
        self.graph = graph
        self.namer = namer
        self.opset = opset
        self.shared = shared if shared is not None else {}
        self.pools = pools

    def const(self, values: np.ndarray) -> gs.Constant:
        values = np.ascontiguousarray(values)
        key = None
        if values.nbytes <= self.SHARED_BYTES:
            key = (id(self.graph), values.dtype.str, values.shape, values.tobytes())
            if key in self.shared:
                return self.shared[key]
        c = gs.Constant(self.namer.short(), values)
        if key is not None:
            self.shared[key] = c
        return c

    def packed_const(self, packed: np.ndarray, data_type: int, count: int) -> gs.Constant:
        """A constant of a packed sub-byte ONNX type holding ``count`` elements in ``packed`` bytes."""
        name = self.namer.short()
        proto = onnx.helper.make_tensor(name, data_type, [count], np.ascontiguousarray(packed, np.uint8).tobytes(),
                                        raw=True)
        return gs.Constant(name, LazyValues(proto))

    def op(self, op: str, inputs: list[gs.Tensor], **attrs) -> gs.Variable:
        out = gs.Variable(self.namer.short())
        node = gs.Node(op, name="", attrs=attrs, inputs=list(inputs), outputs=[out])
        self.graph.nodes.append(node)
        return out

    def i64(self, values) -> gs.Constant:
        return self.const(np.asarray(values, dtype=np.int64))

    def uint_stream(self, values: np.ndarray, bits: int) -> gs.Variable:
        """An int64 tensor [count] decoding unsigned ints ``< 2**bits`` stored packed (appended to the
        graph's pool of ``bits``-bit streams when the builder has pools)."""
        if self.pools is not None:
            return self.pools.add(self, values, bits)
        return self.unpack(values, bits)

    def unpack(self, values: np.ndarray, bits: int) -> gs.Variable:
        """The unpacking chain of one packed stream (see :mod:`onnxcompress.encode.packing`)."""
        count = int(values.size)
        if bits == 8:
            src = self.const(values.astype(np.uint8))
            return self.op("Cast", [src], to=onnx.TensorProto.INT64)
        packed = pack_bits(values, bits)
        native = native_packed_dtype(bits, self.opset)
        if native is not None:
            src = self.packed_const(packed, native, count)
            return self.op("Cast", [src], to=onnx.TensorProto.INT64)
        if not byte_aligned(bits):
            return self._word_stream(packed, bits, count)
        per = 8 // bits
        src = self.const(packed.reshape(-1, 1))
        shifts = self.const((np.arange(per) * bits).astype(np.uint8))
        shifted = self.op("BitShift", [src, shifts], direction="RIGHT")
        mod = self.op("Mod", [shifted, self.const(np.array(1 << bits, np.uint8))])
        flat = self.op("Reshape", [mod, self.i64([-1])])
        if packed.size * per != count:
            flat = self.op("Slice", [flat, self.i64([0]), self.i64([count])])
        return self.op("Cast", [flat], to=onnx.TensorProto.INT64)

    def _word_stream(self, packed: np.ndarray, bits: int, count: int) -> gs.Variable:
        """3, 5, 6 or 7 bits: each row of ``bits`` bytes is one integer holding 8 elements."""
        src = self.const(packed.reshape(-1, bits))
        wide = self.op("Cast", [src], to=onnx.TensorProto.INT64)
        word = self.op("MatMul", [wide, self.i64((256 ** np.arange(bits)).reshape(bits, 1))])
        shifted = self.op("Div", [word, self.i64(2 ** (bits * np.arange(8)))])
        digits = self.op("Mod", [shifted, self.i64(1 << bits)])
        flat = self.op("Reshape", [digits, self.i64([-1])])
        if packed.size // bits * 8 != count:
            flat = self.op("Slice", [flat, self.i64([0]), self.i64([count])])
        return flat


class StreamPools:
    """The pooled packed streams of one ``compact_storage`` run: one pool per (graph, bit width).

    :meth:`add` records a stream and returns the tensor that will hold it (so the weight's decode can
    be built on it at once); :meth:`finish` builds each pool's constant and unpacking chain and cuts
    it with one ``Split`` into those tensors — or, for a pool of one stream, lets its reader read the
    chain itself.
    """

    def __init__(self) -> None:
        self._pools: dict[tuple[int, int], tuple[DecodeBuilder, list[np.ndarray], list[gs.Variable]]] = {}

    def add(self, b: DecodeBuilder, values: np.ndarray, bits: int) -> gs.Variable:
        _, parts, outs = self._pools.setdefault((id(b.graph), bits), (b, [], []))
        parts.append(np.asarray(values, np.uint8).ravel())
        outs.append(gs.Variable(b.namer.short()))  # no dtype: it would only add a value_info entry
        return outs[-1]

    def finish(self) -> None:
        """Write every pool's packed constant and chain (pools are emptied)."""
        for (_, bits), (b, parts, outs) in self._pools.items():
            decoded = b.unpack(np.concatenate(parts), bits)
            if len(parts) == 1:  # nothing to cut apart
                replace_all_uses(outs[0], decoded)
                continue
            sizes = [int(p.size) for p in parts]
            inputs, attrs = ([decoded, b.i64(sizes)], {}) if b.opset >= 13 else ([decoded], {"split": sizes})
            b.graph.nodes.append(gs.Node("Split", name="", attrs={"axis": 0, **attrs}, inputs=inputs, outputs=outs))
        self._pools.clear()
