"""Building the decode subgraph of one encoded weight.

A :class:`DecodeBuilder` appends plain-op nodes (Cast, Gather, BitShift, Mod, CumSum, Mul,
Concat, ScatterElements, ConstantOfShape, Reshape) to the graph the weight lives in (the main graph
or an If/Loop body) and names every new tensor and node after the weight through
:class:`~onnxcompress.graph.naming.Namer`. Every input of every node it makes is a constant, so
onnxruntime folds the whole chain into one dense initializer when the session is created.

Packed sub-byte tensors (``UINT4`` / ``UINT2``) are written as ready-made TensorProtos wrapped in
``LazyValues``: onnx-graphsurgeon exports those untouched, so the packed bytes reach the file as
they are.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcompress.encode.packing import native_packed_dtype, pack_bits
from onnxcompress.graph.naming import Namer

__all__ = ["DecodeBuilder", "stream_nodes"]


def stream_nodes(count: int, bits: int, opset: int) -> int:
    """How many nodes :meth:`DecodeBuilder.uint_stream` makes (for the size estimate)."""
    if bits == 8 or native_packed_dtype(bits, opset) is not None:
        return 1
    return 4 + (count % (8 // bits) != 0)


class DecodeBuilder:
    """Appends the decode nodes of one weight (named ``<base>_<suffix>``) to ``graph``."""

    #: constants up to this many bytes are shared between the decoders of one graph
    SHARED_BYTES = 16

    def __init__(self, graph: gs.Graph, namer: Namer, base: str, opset: int,
                 shared: dict | None = None) -> None:
        self.graph = graph
        self.namer = namer
        self.base = base
        self.opset = opset
        self.nodes: list[gs.Node] = []
        self.shared = shared if shared is not None else {}
        self._count = 0

    def _name(self) -> str:
        """Short names (``<base>~<n>``): in a compressed file the decode graph's names are overhead."""
        self._count += 1
        return self.namer.fresh(f"{self.base}~{self._count}")

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
        """An int64 tensor [count] decoding unsigned ints ``< 2**bits`` stored packed."""
        count = int(values.size)
        if bits == 8:
            src = self.const(values.astype(np.uint8), suffix)
            return self.op("Cast", [src], f"{suffix}_i64", to=onnx.TensorProto.INT64)
        packed = pack_bits(values, bits)
        native = native_packed_dtype(bits, self.opset)
        if native is not None:
            src = self.packed_const(packed, native, count, suffix)
            return self.op("Cast", [src], f"{suffix}_i64", to=onnx.TensorProto.INT64)
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

