"""Layouts: which entries of a flattened weight ``x[n]`` are stored, and where they go back.

* :class:`FullLayout`: every element is an entry (``L = n``, no position data). With a codebook
  value stream this is plain weight sharing storage.
* :class:`BitmaskLayout`: ``m_i = [x_i != 0]`` packed 1 bit per element (``ceil(n / 8)`` bytes), the
  ``L = nnz`` nonzeros stored in order. Decode::

      pos = CumSum(m) * m                       # 1-based rank of each nonzero, 0 elsewhere
      x   = Gather(Concat([0], e), pos)

* :class:`GapLayout` (Deep Compression's relative indices): the nonzero positions ``p_0 < p_1 < ...``
  are stored as gaps ``d_j = p_j - p_{j-1}`` (``p_{-1} = -1``, so ``d_j >= 1``) in ``b`` bits each as
  ``d_j - 1``. A gap longer than ``2**b`` is bridged with filler entries (value ``f``, gap ``2**b``), so
  ``L = nnz + sum_j floor((d_j - 1) / 2**b)``. ``ceil(L · b / 8)`` bytes. Decode::

      pos = CumSum(Cast(g) + 1) - 1
      x   = ScatterElements(Expand(0, [n]), pos, e, axis=0)

The hole value ``f`` (``fill``) is 0 for pruned weights; "nonzero" means "bits differ from ``f``", so
``-0.0`` is stored as a value and the decode is bit-exact. ``f`` may be any value (the most frequent
one): the int4 storage form packs two codes per byte with an offset, so a pruned pair is the byte
``0x88``, not ``0x00``; everything above holds with ``0`` read as ``f``.
Every numpy ``decode`` here mirrors the ONNX ops the layout emits; the pass checks it before writing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.encode.codebook import bit_keys
from onnxcompress.encode.decoder import DecodeBuilder, STREAM_NODES
from onnxcompress.encode.packing import packed_nbytes

__all__ = ["FullLayout", "BitmaskLayout", "GapLayout", "gap_layout", "nonzero_mask", "background"]


def nonzero_mask(flat: np.ndarray, fill: np.ndarray | None = None) -> np.ndarray:
    """True where ``flat`` differs bitwise from ``fill`` (default: zero)."""
    if fill is None:
        return bit_keys(flat) != 0
    return bit_keys(flat) != bit_keys(fill.astype(flat.dtype).reshape(1))[0]


def background(flat: np.ndarray, rng: np.random.Generator, probe: int = 4096) -> np.ndarray:
    """The hole value: zero, unless a random probe finds another value more frequent than zero and
    than 1/16 of the elements (then that one)."""
    keys = bit_keys(flat)
    sample = keys if keys.size <= probe else keys[rng.integers(0, keys.size, probe)]
    vals, counts = np.unique(sample, return_counts=True)
    zero = np.zeros(1, flat.dtype)
    if vals.size == 0:
        return zero
    top = int(np.argmax(counts))
    zero_count = int(counts[vals == 0].sum())
    if vals[top] == 0 or counts[top] <= max(zero_count, sample.size // 16):
        return zero
    return flat[np.flatnonzero(keys == vals[top])[:1]].copy()


@dataclass(frozen=True)
class FullLayout:
    n: int

    label = "full"
    nbytes = 0

    def entries(self, flat: np.ndarray) -> np.ndarray:
        return flat

    def n_nodes(self, opset: int) -> int:
        return 0

    def decode(self, entries: np.ndarray) -> np.ndarray:
        return entries

    def emit(self, b: DecodeBuilder, values: gs.Tensor, dtype: np.dtype) -> gs.Tensor:
        return values


@dataclass(frozen=True)
class BitmaskLayout:
    mask: np.ndarray  # bool [n]: True where an entry is stored
    fill: np.ndarray  # [1], the value of the holes

    label = "bitmask"

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.mask.size, 1)

    def entries(self, flat: np.ndarray) -> np.ndarray:
        return flat[self.mask]

    def n_nodes(self, opset: int) -> int:
        return STREAM_NODES + 4

    def decode(self, entries: np.ndarray) -> np.ndarray:
        m = self.mask.astype(np.int64)
        pos = np.cumsum(m) * m
        return np.concatenate([self.fill.astype(entries.dtype), entries])[pos]

    def emit(self, b: DecodeBuilder, values: gs.Tensor, dtype: np.dtype) -> gs.Tensor:
        bits = b.uint_stream(self.mask.astype(np.uint8), 1)
        ranks = b.op("CumSum", [bits, b.i64(0)])
        pos = b.op("Mul", [ranks, bits])
        padded = b.op("Concat", [b.const(self.fill.astype(dtype)), values], axis=0)
        return b.op("Gather", [padded, pos], axis=0)


@dataclass(frozen=True)
class GapLayout:
    n: int
    bits: int
    gaps: np.ndarray  # uint8 [L]: gap - 1 per entry
    fill: np.ndarray  # [1], the value of the holes (and of the filler entries)

    @property
    def label(self) -> str:
        return f"gaps{self.bits}"

    @property
    def nbytes(self) -> int:
        return packed_nbytes(self.gaps.size, self.bits)

    def positions(self) -> np.ndarray:
        return np.cumsum(self.gaps.astype(np.int64) + 1) - 1

    def entries(self, flat: np.ndarray) -> np.ndarray:
        return flat[self.positions()]

    def n_nodes(self, opset: int) -> int:
        return STREAM_NODES + 5

    def decode(self, entries: np.ndarray) -> np.ndarray:
        out = np.full(self.n, self.fill[0], entries.dtype)
        out[self.positions()] = entries
        return out

    def emit(self, b: DecodeBuilder, values: gs.Tensor, dtype: np.dtype) -> gs.Tensor:
        g = b.uint_stream(self.gaps, self.bits)
        one = b.i64(1)
        steps = b.op("Add", [g, one])
        ends = b.op("CumSum", [steps, b.i64(0)])
        pos = b.op("Sub", [ends, one])
        holes = b.op("Expand", [b.const(self.fill.astype(dtype)), b.i64([self.n])])
        return b.op("ScatterElements", [holes, pos, values], axis=0)


def gap_layout(mask: np.ndarray, bits: int, fill: np.ndarray) -> GapLayout:
    """The gap encoding of the True positions of ``mask``, with fillers for gaps over ``2**bits``."""
    span = 1 << bits
    p = np.flatnonzero(mask)
    gaps = np.diff(p, prepend=-1)
    fillers = (gaps - 1) // span
    ends = np.cumsum(fillers + 1) - 1
    out = np.full(int(ends[-1]) + 1 if ends.size else 0, span - 1, dtype=np.int64)
    out[ends] = gaps - fillers * span - 1
    return GapLayout(int(mask.size), bits, out.astype(np.uint8), fill)
