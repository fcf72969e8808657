"""Error metrics between a reference output ``r`` and a candidate output ``c``.

All sums run in float64 over the flattened tensors, accumulated over every feed (so the numbers for
several feeds are those of the concatenated outputs, and memory does not grow with the feed count):

* ``max_abs_err = max |r - c|``, ``mean_abs_err = Σ|r - c| / n``, ``ref_max_abs = max |r|``;
* cosine similarity ``Σ r·c / sqrt(Σ r² · Σ c²)``, defined as 1.0 when both are all zeros and 0.0 when
  only one is (float outputs only);
* SNR in dB ``10 · log10(Σ r² / Σ (r - c)²)``: ``inf`` when the candidate is exact, ``-inf`` when the
  reference is all zeros and the candidate is not (float outputs only);
* top-1 agreement for classifier-like outputs, shaped ``(N, C)`` with ``C > 1``: the fraction of rows
  where ``argmax`` along the last axis agrees (float outputs only);
* exact-match fraction ``#(r == c) / n`` (all outputs; the figure that matters for integer and bool
  outputs).

Non-finite values: positions where both are finite enter the sums; a position where they differ in
finiteness, or are both non-finite but different (``inf`` vs ``-inf``, ``nan`` vs ``inf``), counts in
``nonfinite_mismatch``; ``nan`` against ``nan`` matches.

A missing candidate output or a shape that differs from the reference is recorded in ``mismatch`` and
that feed adds nothing to the sums; a dtype difference is recorded in ``mismatch`` too, but the values
are still compared (as float64). None of these raise: a mismatch is a parity failure for the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from onnxcompress.data import is_float_dtype

__all__ = ["OutputMetrics", "MetricAccumulator", "compute_metrics", "is_classifier_shape", "mcnemar_p"]


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for two classifiers scored on the same samples.

    ``b``: samples only the first gets right; ``c``: only the second. Under "equally accurate" each of
    the b + c discordant samples is a fair coin, so p = P(a Binomial(b + c, ½) split at least as uneven)
    = min(1, 2 · Σ_{i ≤ min(b, c)} C(b + c, i) / 2^(b + c)); 1.0 when there is no discordant sample."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def is_classifier_shape(shape: tuple[int, ...]) -> bool:
    """``(N, C)`` with ``C > 1``: an output whose rows are class scores."""
    return len(shape) == 2 and shape[1] > 1


@dataclass(frozen=True, kw_only=True)
class OutputMetrics:
    """Metrics of one output over all feeds (see the module docstring). ``None`` where a metric does
    not apply (cosine of an integer output) or nothing could be compared."""

    name: str
    ref_shape: tuple[int, ...]
    ref_dtype: str
    cand_shape: tuple[int, ...] | None
    cand_dtype: str | None
    is_float: bool
    count: int
    max_abs_err: float | None
    mean_abs_err: float | None
    ref_max_abs: float | None
    cosine: float | None
    snr_db: float | None
    top1: float | None
    exact: float | None
    nonfinite_mismatch: int
    mismatch: str | None

    @property
    def rel_err(self) -> float | None:
        """``max_abs_err / max|ref|`` (``inf`` for an error on an all-zero reference, 0 when exact)."""
        if self.max_abs_err is None or self.ref_max_abs is None:
            return None
        if self.ref_max_abs == 0.0:
            return 0.0 if self.max_abs_err == 0.0 else math.inf
        return self.max_abs_err / self.ref_max_abs


class MetricAccumulator:
    """Streams ``(reference, candidate)`` pairs of one output and returns :class:`OutputMetrics`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ref_shape: tuple[int, ...] = ()
        self._ref_dtype = ""
        self._cand_shape: tuple[int, ...] | None = None
        self._cand_dtype: str | None = None
        self._is_float = False
        self._mismatch: str | None = None
        self._count = 0
        self._finite = 0
        self._equal = 0
        self._nonfinite = 0
        self._max_abs = 0.0
        self._sum_abs = 0.0
        self._ref_max_abs = 0.0
        self._rc = self._rr = self._cc = self._dd = 0.0  # dot products of the values divided by _scale
        self._scale = 0.0  # a power of two >= the largest |value| seen: keeps r·r finite near 1e300
        self._rows = self._agree = 0
        self._seen = False

    def update(self, ref: np.ndarray, cand: np.ndarray | None) -> None:
        """Add one feed's outputs; ``cand=None`` means the candidate lacks this output."""
        ref = np.asarray(ref)
        self._ref_shape, self._ref_dtype = tuple(ref.shape), str(ref.dtype)
        self._is_float = is_float_dtype(ref.dtype)
        self._seen = True
        if cand is None:
            self._mismatch = self._mismatch or "missing in the candidate"
            return
        cand = np.asarray(cand)
        self._cand_shape, self._cand_dtype = tuple(cand.shape), str(cand.dtype)
        if cand.shape != ref.shape:
            self._mismatch = self._mismatch or f"shape {tuple(cand.shape)} differs from the reference {tuple(ref.shape)}"
            return
        if cand.dtype != ref.dtype:
            self._mismatch = self._mismatch or f"dtype {cand.dtype} differs from the reference {ref.dtype}"
        if ref.dtype.kind in "OUSV" or cand.dtype.kind in "OUSV":  # strings, bytes, objects: exact match only
            same = ref.ravel() == cand.ravel()
            self._count += ref.size
            self._equal += int(np.count_nonzero(same))
            return
        r = ref.astype(np.float64).ravel()
        c = cand.astype(np.float64).ravel()
        both_nan = np.isnan(r) & np.isnan(c)
        finite = np.isfinite(r) & np.isfinite(c)
        same = (r == c) | both_nan
        self._count += r.size
        self._equal += int(np.count_nonzero(same))
        self._nonfinite += int(np.count_nonzero(~finite & ~same))
        rf, cf = r[finite], c[finite]
        if rf.size:
            diff = rf - cf
            abs_diff = np.abs(diff)
            self._max_abs = max(self._max_abs, float(abs_diff.max()))
            self._sum_abs += float(abs_diff.sum())
            self._ref_max_abs = max(self._ref_max_abs, float(np.abs(rf).max()))
            self._finite += rf.size
            top = max(self._ref_max_abs, float(np.abs(cf).max()))
            if top > self._scale:  # cosine and SNR are ratios: rescaling every sum leaves them exact
                scale = math.ldexp(1.0, math.frexp(top)[1])  # a power of two >= top: divisions are exact
                shrink = (self._scale / scale) ** 2
                self._rc, self._rr, self._cc, self._dd = (v * shrink for v in (self._rc, self._rr, self._cc, self._dd))
                self._scale = scale
            if self._scale > 0.0:
                rs, cs = rf / self._scale, cf / self._scale
                ds = rs - cs  # exactly diff / scale (power-of-two scaling), and finite where diff overflows
                self._rc += float(rs @ cs)
                self._rr += float(rs @ rs)
                self._cc += float(cs @ cs)
                self._dd += float(ds @ ds)
        if self._is_float and is_classifier_shape(ref.shape):
            rows = ref.shape[0]
            self._rows += rows
            self._agree += int(np.count_nonzero(r.reshape(ref.shape).argmax(-1) == c.reshape(ref.shape).argmax(-1)))

    def result(self) -> OutputMetrics:
        compared = self._count > 0
        cosine = snr = None
        if self._is_float and compared:
            cosine = _cosine(self._rc, self._rr, self._cc)
            snr = _snr_db(self._rr, self._dd)
        return OutputMetrics(
            name=self.name,
            ref_shape=self._ref_shape,
            ref_dtype=self._ref_dtype,
            cand_shape=self._cand_shape,
            cand_dtype=self._cand_dtype,
            is_float=self._is_float,
            count=self._count,
            max_abs_err=self._max_abs if compared else None,
            mean_abs_err=(self._sum_abs / self._finite if self._finite else 0.0) if compared else None,
            ref_max_abs=self._ref_max_abs if compared else None,
            cosine=cosine,
            snr_db=snr,
            top1=self._agree / self._rows if self._rows else None,
            exact=self._equal / self._count if self._count else None,
            nonfinite_mismatch=self._nonfinite,
            mismatch=self._mismatch if self._seen else "never produced by the reference",
        )


def _cosine(rc: float, rr: float, cc: float) -> float:
    if rr == 0.0 and cc == 0.0:
        return 1.0
    if rr == 0.0 or cc == 0.0:
        return 0.0
    return max(-1.0, min(1.0, rc / math.sqrt(rr * cc)))


def _snr_db(rr: float, dd: float) -> float:
    if dd == 0.0:
        return math.inf
    if rr == 0.0:
        return -math.inf
    return 10.0 * math.log10(rr / dd)


def compute_metrics(name: str, ref: np.ndarray, cand: np.ndarray | None) -> OutputMetrics:
    """Metrics for a single pair of arrays."""
    accumulator = MetricAccumulator(name)
    accumulator.update(ref, cand)
    return accumulator.result()
