"""Scale / zero-point math for integer quantization (numpy only, no graph).

The seed's affine rule maps a float range ``[lo, hi]`` onto the integers ``[qmin, qmax]``::

    q = round((x - lo) / (hi - lo) * (qmax - qmin) + qmin)          (asymmetric, the seed's rule)
    scale = (hi - lo) / (qmax - qmin),   zero_point = round(qmin - lo / scale)
    x ~ (q - zero_point) * scale

Zero must be exactly representable (padding, ReLU outputs, pruned weights), so the range is first
widened to contain 0 (``lo = min(lo, 0)``, ``hi = max(hi, 0)``) and the zero point is rounded to an
integer; ``q`` is then ``clip(round(x / scale) + zero_point, qmin, qmax)``, which is the seed's rule
with the zero point nudged onto the integer grid.

**Symmetric** variant (weights by default): ``scale = max|x| / qmax_sym`` with the restricted range
``[-qmax_sym, qmax_sym]`` (int8: ±127, int4: ±7) and ``zero_point = 0`` for signed types (128 for
uint8), so an exact zero stays an exact zero and negation is exact.

**Per-channel** parameters take the statistics along every axis but ``axis``; **block-wise**
parameters (see :func:`block_view`) along blocks of ``block`` consecutive elements of one channel.

**Bias** of Gemm/Conv in the classic QDQ layout is int32 with ``scale = s_x * s_w`` and zero point 0:
``b_q = round(b / (s_x * s_w))`` — the accumulator's own unit, so onnxruntime adds it inside the
integer kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "QType",
    "QTYPES",
    "qtype",
    "QParams",
    "affine_params",
    "symmetric_params",
    "weight_params",
    "quantize",
    "dequantize",
    "quantize_bias",
    "block_view",
    "contiguous",
]

#: smallest scale ever produced: a constant-zero tensor still gets a valid (positive) scale
MIN_SCALE = 1e-12


@dataclass(frozen=True)
class QType:
    """An integer type: name (``s8``, ``u8``, ``s4``), numpy dtype, full and symmetric ranges."""

    name: str
    dtype: np.dtype
    qmin: int
    qmax: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def bits(self) -> int:
        return int(np.log2(self.qmax - self.qmin + 1))

    def sym_range(self) -> tuple[int, int]:
        """The restricted symmetric range: int8 [-127, 127], uint8 [1, 255] around 128."""
        if self.signed:
            return -self.qmax, self.qmax
        mid = (self.qmax + 1) // 2
        return mid - (mid - 1), mid + (mid - 1)

    def sym_zero(self) -> int:
        return 0 if self.signed else (self.qmax + 1) // 2


QTYPES = {
    "s8": QType("s8", np.dtype(np.int8), -128, 127),
    "u8": QType("u8", np.dtype(np.uint8), 0, 255),
    "s4": QType("s4", np.dtype(np.int8), -8, 7),
}


def qtype(name: str) -> QType:
    return QTYPES[name]


@dataclass(frozen=True)
class QParams:
    """Scale and zero point (scalars, or vectors along ``axis``) of one quantized tensor."""

    scale: np.ndarray
    zero_point: np.ndarray
    qt: QType
    axis: int | None = None

    def to_dict(self) -> dict:
        s = np.asarray(self.scale, dtype=np.float64)
        z = np.asarray(self.zero_point)
        if s.ndim == 0:
            return {"type": self.qt.name, "scale": float(s), "zero_point": int(z)}
        return {"type": self.qt.name, "axis": self.axis, "channels": int(s.size),
                "scale_min": float(s.min()), "scale_max": float(s.max()), "zero_point": int(z.flat[0])
                if np.all(z == z.flat[0]) else [int(v) for v in z.flat]}


def affine_params(lo, hi, qt: QType, *, symmetric: bool = False, axis: int | None = None) -> QParams:
    """Parameters for the range ``[lo, hi]`` (scalars or per-channel vectors).

    Asymmetric: the seed's min–max rule with 0 representable. Symmetric: ``max(|lo|, |hi|)`` onto
    the restricted symmetric range.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if symmetric:
        return symmetric_params(np.maximum(-lo, hi), qt, axis=axis)
    scale = np.maximum((hi - lo) / (qt.qmax - qt.qmin), MIN_SCALE)
    zp = np.clip(np.round(qt.qmin - lo / scale), qt.qmin, qt.qmax)
    return QParams(scale.astype(np.float32), zp.astype(qt.dtype), qt, axis)


def symmetric_params(absmax, qt: QType, *, axis: int | None = None) -> QParams:
    """``scale = absmax / qmax_sym``, zero point 0 (signed) or the middle code (unsigned)."""
    absmax = np.asarray(absmax, dtype=np.float64)
    lo_q, hi_q = qt.sym_range()
    half = (hi_q - lo_q) / 2
    scale = np.maximum(absmax / half, MIN_SCALE)
    zp = np.full(scale.shape, qt.sym_zero())
    return QParams(scale.astype(np.float32), zp.astype(qt.dtype), qt, axis)


def _reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if axis is None or i != axis % ndim)


def weight_params(w: np.ndarray, qt: QType, *, axis: int | None, symmetric: bool = True) -> QParams:
    """Parameters of a weight: per tensor (``axis=None``) or per channel along ``axis``."""
    w = np.asarray(w, dtype=np.float64)
    red = _reduce_axes(w.ndim, axis)
    lo = w.min(axis=red) if w.size else np.zeros(())
    hi = w.max(axis=red) if w.size else np.zeros(())
    return affine_params(lo, hi, qt, symmetric=symmetric, axis=None if axis is None else axis % max(w.ndim, 1))


def _bshape(p: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(p.scale, dtype=np.float32)
    z = np.asarray(p.zero_point).astype(np.int32)
    if s.ndim == 0 or p.axis is None:
        return s, z
    shape = [1] * ndim
    shape[p.axis] = s.size
    return s.reshape(shape), z.reshape(shape)


def quantize(x: np.ndarray, p: QParams, *, restrict: bool = False) -> np.ndarray:
    """``clip(round(x / scale) + zero_point)`` (round half to even, as QuantizeLinear).

    ``restrict`` clips to the symmetric range (weights quantized symmetrically never use -128).
    """
    s, z = _bshape(p, np.ndim(x))
    q = np.round(np.asarray(x, dtype=np.float32) / s) + z
    lo, hi = p.qt.sym_range() if restrict else (p.qt.qmin, p.qt.qmax)
    return np.clip(q, lo, hi).astype(p.qt.dtype)


def dequantize(q: np.ndarray, p: QParams) -> np.ndarray:
    s, z = _bshape(p, np.ndim(q))
    return ((q.astype(np.int32) - z) * s).astype(np.float32)


def nonfinite_reason(values: np.ndarray, what: str = "its weight") -> str | None:
    """Why ``values`` cannot be quantized when they hold NaN or ±Inf (a scale from them is not finite,
    and per tensor one Inf spoils every value), else None. The layer stays float, reported."""
    v = np.asarray(values)
    if v.dtype.kind != "f":
        return None
    bad = int(v.size - np.count_nonzero(np.isfinite(v)))
    return f"{what} holds {bad} non-finite value(s) (NaN or Inf)" if bad else None


#: the largest |int32 bias| we produce: half the int32 range, the rest left to the accumulated products
BIAS_LIMIT = 2.0**30


def bias_safe_weight_scale(w_scale: np.ndarray, bias: np.ndarray, x_scale: float) -> tuple[np.ndarray, int]:
    """Raise the weight scales whose int32 bias would overflow; return them and how many were raised.

    The bias is stored as ``round(b / (s_x s_w))`` in int32. A channel whose weights are all zero
    or tiny (a pruned filter, a dead neuron) gets a tiny ``s_w`` while its bias may be large, so the
    quotient saturates and the channel loses its bias. The rule: ``s_w >= |b| / (s_x · 2^30)`` per
    channel (a per-tensor scale takes the largest such bound). The weights of a raised channel are
    then coarser — below its bias's precision, they matter less than the bias does.
    """
    ws = np.asarray(w_scale, dtype=np.float64)
    need = np.abs(np.asarray(bias, dtype=np.float64)).reshape(-1) / (max(float(x_scale), MIN_SCALE) * BIAS_LIMIT)
    if ws.size > 1 and need.size != ws.size:  # a bias that is not one value per channel: left as it was
        return np.asarray(w_scale), 0
    need = np.full(ws.shape, need.max(initial=0.0)) if ws.size == 1 else need.reshape(ws.shape)
    raised = int(np.count_nonzero(need > ws))
    return np.maximum(ws, need).astype(np.asarray(w_scale).dtype), raised


def quantize_bias(b: np.ndarray, x_scale: float, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias in the accumulator's unit: ``(round(b / (s_x * s_w)), s_x * s_w)``."""
    s = (np.float32(x_scale) * np.asarray(w_scale, dtype=np.float32)).astype(np.float32)
    s = np.maximum(s, np.float32(MIN_SCALE))
    q = np.clip(np.round(np.asarray(b, dtype=np.float64) / s), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    return q, s


def block_view(shape: tuple[int, ...], axis: int, block: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """How to cut a weight of ``shape`` with channel ``axis`` into blocks of ``block`` elements.

    The weight is viewed as ``[pre, c, post]`` (``c = shape[axis]``). Blocks run along ``post`` when
    it is larger than 1 (view ``[pre, c, post/block, block]``, scale ``[pre, c, post/block, 1]``),
    otherwise along ``pre`` (view ``[pre/block, block, c]``, scale ``[pre/block, 1, c]``). Each block
    belongs to one channel. Returns ``(view, scale_shape)``, or None when the length is not a
    multiple of ``block``.
    """
    axis %= len(shape)
    pre = int(np.prod(shape[:axis], dtype=np.int64))
    c = int(shape[axis])
    post = int(np.prod(shape[axis + 1:], dtype=np.int64))
    if post > 1:
        if post % block:
            return None
        return (pre, c, post // block, block), (pre, c, post // block, 1)
    if pre % block:
        return None
    return (pre // block, block, c), (pre // block, 1, c)


def contiguous(arr) -> np.ndarray:
    """A C-contiguous copy-if-needed that keeps 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    return np.require(np.asarray(arr), requirements="C")
