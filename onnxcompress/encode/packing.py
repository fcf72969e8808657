"""Bit packing of small unsigned integers, and the plain-op subgraphs that unpack them.

A stream of ``count`` unsigned integers below ``2**bits`` (``bits`` in 1, 2, 4, 8) is stored
little-endian inside bytes: element ``i`` sits in byte ``i * bits // 8`` at bit offset
``(i * bits) % 8`` — the layout ONNX uses for packed ``UINT4`` / ``UINT2`` tensors (low nibble first).

Decoding, in plain ONNX ops that onnxruntime constant-folds at session creation:

* ``bits == 8``: ``Cast(uint8 -> int64)``.
* ``bits == 4`` and opset >= 21, ``bits == 2`` and opset >= 25: the bytes are a native ``UINT4`` /
  ``UINT2`` tensor of ``count`` elements; ``Cast(uintN -> int64)``.
* otherwise (older opsets, and the 1-bit bitmask): ``p = bytes[m, 1]`` (uint8);
  ``u = Mod(BitShift(p, [0, b, 2b, ...], RIGHT), 2**b)`` -> ``[m, 8/b]``; ``Reshape(-1)``;
  ``Slice(0, count)``; ``Cast(-> int64)``. BitShift needs opset 11; Mod on uint8 opset 10.
"""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes", "bits_for", "native_packed_dtype", "MIN_OPSET"]

#: the lowest default-domain opset the BitShift unpacking needs
MIN_OPSET = 11

_NATIVE = {4: (onnx.TensorProto.UINT4, 21), 2: (onnx.TensorProto.UINT2, 25)}


def bits_for(n_symbols: int, *, allowed: tuple[int, ...] = (1, 2, 4, 8)) -> int | None:
    """The fewest bits in ``allowed`` that can index ``n_symbols`` symbols, or None."""
    for b in sorted(allowed):
        if n_symbols <= (1 << b):
            return b
    return None


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ints ``< 2**bits`` (1-D) into uint8 bytes, low bits first."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
    v = np.asarray(values).astype(np.uint8, copy=False).ravel()
    if v.size and int(v.max()) >= (1 << bits):
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    per = 8 // bits
    pad = (-v.size) % per
    v = np.concatenate([v, np.zeros(pad, np.uint8)]).reshape(-1, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(v << shifts, axis=1).astype(np.uint8) if per > 1 else v[:, 0].copy()


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The numpy inverse of :func:`pack_bits` (the reference for the ONNX decode)."""
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    u = (packed.reshape(-1, 1) >> shifts) % np.uint8(1 << bits) if per > 1 else packed.reshape(-1, 1)
    return u.reshape(-1)[:count]


def native_packed_dtype(bits: int, opset: int) -> int | None:
    """The ONNX packed dtype (UINT4, UINT2) usable for ``bits`` at ``opset``, or None."""
    entry = _NATIVE.get(bits)
    if entry is None or opset < entry[1]:
        return None
    return entry[0]
