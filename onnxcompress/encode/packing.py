"""Bit packing of small unsigned integers, and the plain-op subgraphs that unpack them.

A stream of ``count`` unsigned integers below ``2**bits`` (``bits`` in 1..8) is stored as one
little-endian bit string: bit ``j`` of element ``i`` is bit ``i * bits + j`` of the stream, and bit
``k`` of the stream is bit ``k % 8`` of byte ``k // 8``. For ``bits`` in 1, 2, 4 an element never
straddles a byte (element ``i`` sits in byte ``i * bits // 8`` at bit offset ``(i * bits) % 8``), the
layout ONNX uses for packed ``UINT4`` / ``UINT2`` tensors (low nibble first). For 3, 5, 6, 7 bits every
8 elements fill exactly ``bits`` bytes; the stream is padded to whole groups of 8.

Decoding, in plain ONNX ops that onnxruntime constant-folds at session creation:

* ``bits == 8``: ``Cast(uint8 -> int64)``.
* ``bits == 4`` and opset >= 21, ``bits == 2`` and opset >= 25: the bytes are a native ``UINT4`` /
  ``UINT2`` tensor of ``count`` elements; ``Cast(uintN -> int64)``.
* ``bits`` in 1, 2, 4 otherwise: ``p = bytes[m, 1]`` (uint8);
  ``u = Mod(BitShift(p, [0, b, 2b, ...], RIGHT), 2**b)`` -> ``[m, 8/b]``; ``Reshape(-1)``;
  ``Slice(0, count)``; ``Cast(-> int64)``. BitShift needs opset 11; Mod on uint8 opset 10.
* ``bits`` in 3, 5, 6, 7: ``P = bytes[m, b]`` holds 8 elements per row, so the row read as one
  little-endian integer is ``word = Σ_j P[:, j]·256^j < 2^(8b) <= 2^56`` (int64 is exact):
  ``word = MatMul(Cast(P -> int64), [256^j]_j)`` -> ``[m, 1]``;
  ``u = Mod(Div(word, [2^(b·k)]_k), 2^b)`` -> ``[m, 8]``; ``Reshape(-1)``; ``Slice(0, count)``.
  (BitShift has no int64 kernel; integer Div and Mod do.)

Non-power-of-two widths matter for sparse positions: for a weight with a fraction ``p`` of
non-zeros the gaps between them are about geometric with mean ``1/p``, and the best gap width is
near ``log2(1/p) + 1`` bits — 5 or 6 bits at 95% sparsity, where 4 bits need many filler entries
and 8 bits waste 2–3 bits on every entry.
"""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes", "bits_for", "native_packed_dtype", "byte_aligned", "ALL_BITS",
           "MIN_OPSET"]

#: the lowest default-domain opset the BitShift unpacking needs
MIN_OPSET = 11

_NATIVE = {4: (onnx.TensorProto.UINT4, 21), 2: (onnx.TensorProto.UINT2, 25)}


#: every width :func:`pack_bits` writes
ALL_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def bits_for(n_symbols: int, *, allowed: tuple[int, ...] = ALL_BITS) -> int | None:
    """The fewest bits in ``allowed`` that can index ``n_symbols`` symbols, or None."""
    for b in sorted(allowed):
        if n_symbols <= (1 << b):
            return b
    return None


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes :func:`pack_bits` writes for ``count`` elements of ``bits`` bits."""
    if byte_aligned(bits):
        return (count * bits + 7) // 8
    return bits * ((count + 7) // 8)


def byte_aligned(bits: int) -> bool:
    """True when no element straddles a byte (1, 2, 4, 8 bits)."""
    return 8 % bits == 0


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ints ``< 2**bits`` (1-D) into uint8 bytes, low bits first (see the module
    docstring); widths that do not divide 8 are padded to whole groups of 8 elements."""
    if bits not in ALL_BITS:
        raise ValueError(f"bits must be one of 1..8, got {bits}")
    v = np.asarray(values).astype(np.uint8, copy=False).ravel()
    if v.size and int(v.max()) >= (1 << bits):
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    if bits == 8:
        return v.copy()
    group = 8 // bits if byte_aligned(bits) else 8
    v = np.concatenate([v, np.zeros((-v.size) % group, np.uint8)])
    stream = ((v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8).ravel()
    return np.packbits(stream, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The numpy inverse of :func:`pack_bits` (the reference for the ONNX decode)."""
    if bits == 8:
        return np.asarray(packed, np.uint8).ravel()[:count].copy()
    stream = np.unpackbits(np.asarray(packed, np.uint8).ravel(), bitorder="little")[: count * bits]
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return (stream.reshape(count, bits).astype(np.uint16) @ weights).astype(np.uint8)


def native_packed_dtype(bits: int, opset: int) -> int | None:
    """The ONNX packed dtype (UINT4, UINT2) usable for ``bits`` at ``opset``, or None."""
    entry = _NATIVE.get(bits)
    if entry is None or opset < entry[1]:
        return None
    return entry[0]
