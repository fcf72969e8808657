"""Value streams: how the stored values of a weight are kept — as they are, or through a codebook.

A weight is flattened to ``x[n]`` (in its *work dtype*: int4/uint4/int2/uint2 widen to int8/uint8,
every other dtype is kept). A layout (:mod:`onnxcompress.encode.sparse`) picks the ``L`` entries
it stores, ``e[L]``; a value stream stores them:

* :class:`RawValues`: ``e`` itself (``L · itemsize`` bytes; sub-byte originals stay packed).
* :class:`CodebookValues` (exact weight sharing, as k-means weight sharing leaves it): when ``e`` has
  ``K <= 256`` distinct bit patterns, ``e = codebook[idx]`` with ``codebook[K]`` and ``idx`` packed in
  ``b = min{1..8 : 2**b >= K}`` bits: ``K · itemsize + ceil(L · b / 8)`` bytes.
  Decode: ``Gather(codebook, Cast(idx -> int64))``.

Distinct values are told apart by their bit patterns, so ``-0.0`` and ``+0.0`` (and NaN payloads)
survive: the decoded tensor is bit-identical to the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.encode.decoder import DecodeBuilder, STREAM_NODES
from onnxcompress.encode.packing import bits_for, pack_bits, packed_nbytes

__all__ = ["WorkArray", "work_array", "RawValues", "CodebookValues", "codebook_values", "bit_keys"]

_SUB_BYTE = {"int4": (np.int8, 4), "uint4": (np.uint8, 4), "int2": (np.int8, 2), "uint2": (np.uint8, 2)}


@dataclass(frozen=True)
class WorkArray:
    """A weight flattened into the dtype its decode works in.

    ``flat``: the values, 1-D; ``shape``: the weight's shape; ``onnx_dtype``: the weight's ONNX type;
    ``sub_byte_bits``: 4 or 2 when the weight is a packed sub-byte type (decoded in int8/uint8 and
    cast back at the end), else None.
    """

    flat: np.ndarray
    shape: tuple[int, ...]
    onnx_dtype: int
    sub_byte_bits: int | None

    @property
    def itemsize_bits(self) -> int:
        return self.sub_byte_bits or self.flat.dtype.itemsize * 8

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.flat.size, self.itemsize_bits)


def work_array(values: np.ndarray) -> WorkArray | None:
    """The :class:`WorkArray` of a weight, or None for dtypes that cannot be encoded (bool, strings)."""
    dt = np.dtype(values.dtype)
    try:
        onnx_dtype = onnx.helper.np_dtype_to_tensor_dtype(dt)
    except Exception:  # not an ONNX tensor type
        return None
    if dt.name in _SUB_BYTE:
        work, bits = _SUB_BYTE[dt.name]
        return WorkArray(np.asarray(values).astype(work).ravel(), tuple(values.shape), onnx_dtype, bits)
    if dt.kind not in "fiuV" or dt.itemsize not in (1, 2, 4, 8) or dt == np.bool_:
        return None
    return WorkArray(np.ascontiguousarray(values).ravel(), tuple(values.shape), onnx_dtype, None)


def bit_keys(flat: np.ndarray) -> np.ndarray:
    """The values' bit patterns as unsigned ints (zero exactly where the value is all-zero bits)."""
    return flat.view(np.dtype(f"u{flat.dtype.itemsize}"))


@dataclass(frozen=True)
class RawValues:
    """The entries stored as they are."""

    values: np.ndarray
    sub_byte_bits: int | None = None
    onnx_dtype: int | None = None

    label = "raw"

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.values.size, self.sub_byte_bits or self.values.dtype.itemsize * 8)

    def n_nodes(self, opset: int) -> int:
        return 1 if self.sub_byte_bits else 0

    def decoded(self) -> np.ndarray:
        return self.values

    def emit(self, b: DecodeBuilder) -> gs.Tensor:
        if not self.sub_byte_bits:
            return b.const(self.values)
        mask = (1 << self.sub_byte_bits) - 1
        packed = pack_bits(self.values.astype(np.uint8) & np.uint8(mask), self.sub_byte_bits)
        src = b.packed_const(packed, self.onnx_dtype, self.values.size)
        work = onnx.helper.np_dtype_to_tensor_dtype(self.values.dtype)
        return b.op("Cast", [src], to=work)


@dataclass(frozen=True)
class CodebookValues:
    """The entries as ``codebook[indices]``, indices packed in ``bits`` bits."""

    codebook: np.ndarray
    indices: np.ndarray
    bits: int

    @property
    def label(self) -> str:
        return f"codebook{self.bits}"

    @property
    def nbytes(self) -> int:
        return self.codebook.nbytes + packed_nbytes(self.indices.size, self.bits)

    def n_nodes(self, opset: int) -> int:
        return 1 + STREAM_NODES

    def decoded(self) -> np.ndarray:
        return self.codebook[self.indices]

    def emit(self, b: DecodeBuilder) -> gs.Tensor:
        idx = b.uint_stream(self.indices, self.bits)
        return b.op("Gather", [b.const(self.codebook), idx], axis=0)


def codebook_values(values: np.ndarray, *, max_size: int = 256, probe: int = 4096,
                    rng: np.random.Generator | None = None) -> CodebookValues | None:
    """A :class:`CodebookValues` for ``values`` when they hold at most ``max_size`` distinct bit
    patterns, else None.

    The distinct values are guessed from a random probe of ``probe`` elements and confirmed with one
    binary search per element (``O(n log K)``, no full sort); values the probe missed are added once.
    """
    keys = bit_keys(values)
    rng = rng if rng is not None else np.random.default_rng(0)
    book = np.unique(keys if keys.size <= probe else keys[rng.integers(0, keys.size, probe)])
    for _ in range(2):
        if book.size > max_size:
            return None
        idx = np.minimum(np.searchsorted(book, keys), max(book.size - 1, 0))
        missing = book[idx] != keys if book.size else np.ones(keys.size, bool)
        if not missing.any():
            return CodebookValues(book.view(values.dtype).copy(), idx.astype(np.uint8), bits_for(int(book.size)))
        book = np.union1d(book, np.unique(keys[missing]))
    return None
