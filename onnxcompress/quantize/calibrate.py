"""Streaming calibration: activation ranges from onnxruntime runs, batch by batch.

The model is run with the tensors to calibrate added as extra graph outputs; after each batch the
statistics of every tensor are updated and the batch is dropped, so peak memory depends on one batch,
never on the number of samples, and activations whose shapes vary between batches (variable sequence
length) are no different from fixed ones.

Per tensor, :class:`TensorStats` keeps

* the running ``min`` / ``max``;
* a fixed-bin signed histogram over ``[-R, R]`` (``num_bins`` bins, even). When a batch holds a value
  beyond ``R``, ``R`` doubles ``k`` times and adjacent bins are summed pairwise ``k`` times (the old
  range becomes the middle of the new one), so merging is exact and the bin count never changes;
* optionally the running max of ``|x|`` per last-axis channel (SmoothQuant).

**Mask sentinels.** Exported attention masks add about ``-3.4e38`` (or ``-1e9``, ``-1e4``·large) on
padded positions; one such value would ruin the tensor's range. Values with ``|x| >= SENTINEL``
(1e30), infinities and NaNs are left out of every statistic and counted (``sentinels``).

Ranges from the statistics (``[lo, hi]``, always widened to contain 0 later by the parameter math):

* ``minmax``: ``[min, max]``.
* ``percentile``: the ``(100 - p)``-th and ``p``-th percentiles of the histogram, clamped to min/max.
* ``entropy``: TensorRT's KL rule on the histogram of ``|x|``: for each threshold ``T`` (a bin edge
  from ``L`` bins up), ``P`` = the histogram up to ``T`` with the tail added to its last bin, ``Q`` = ``P``
  merged into ``L`` levels and spread back over the non-empty bins; pick ``argmin KL(P || Q)``; range
  ``[max(min, -T), min(max, T)]``. ``L`` is the number of integer levels that cover ``[0, T]``: all 256
  for a one-signed tensor (a ReLU output), 128 when the tensor has both signs. ``T`` is at least half
  of ``max|x|`` (onnxruntime's search has the same floor).
* ``mse``: the range ``[r·min, r·max]`` (``r`` in ``[0.05, 1.1]``) minimizing the squared round-trip error
  ``sum_bins n_b (DQ(Q(c_b)) - c_b)^2`` over the histogram's bin centres ``c_b``: clipping when
  ``r < 1``; ``r`` a little above 1 can align a grid of values (pixel / 16) with the integer grid.

``--calib-cache FILE`` stores the ranges as JSON (``{"version": 1, "method": ..., "settings": {...,
"model": fingerprint}, "ranges": {name: [lo, hi]}}``) and reuses them when the method, the settings
that decide a range (percentile, bins, levels) and the fingerprint of the calibrated model
(:func:`model_fingerprint`: graph and weights) match and every tensor the plan needs is in the
file. The calibration data is not fingerprinted: a cache made on other data is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from onnxcompress.errors import CalibrationError

__all__ = ["TensorStats", "Calibrator", "compute_range", "collect_stats", "save_cache", "load_cache", "SENTINEL"]

log = logging.getLogger(__name__)

SENTINEL = 1e30


@dataclass
class TensorStats:
    """Running statistics of one tensor (see the module docstring)."""

    num_bins: int = 2048
    channels: bool = False
    count: int = 0
    sentinels: int = 0
    min: float = math.inf
    max: float = -math.inf
    R: float = 0.0
    hist: np.ndarray | None = None
    chan_absmax: np.ndarray | None = None
    shapes: set = field(default_factory=set)

    def update(self, arr: np.ndarray) -> None:
        a = np.asarray(arr)
        if a.dtype.kind != "f":
            return
        self.shapes.add(tuple(a.shape))
        x = a.astype(np.float32, copy=False).reshape(-1)
        ok = np.isfinite(x) & (np.abs(x) < SENTINEL)
        n_bad = int(x.size - np.count_nonzero(ok))
        if n_bad:
            self.sentinels += n_bad
            x = x[ok]
        if self.channels and a.ndim >= 1 and a.size:
            c = np.where(np.isfinite(a) & (np.abs(a) < SENTINEL), np.abs(a), 0).reshape(-1, a.shape[-1]).max(axis=0)
            self.chan_absmax = c if self.chan_absmax is None or self.chan_absmax.shape != c.shape else \
                np.maximum(self.chan_absmax, c)
        if not x.size:
            return
        self.count += int(x.size)
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(abs(lo), abs(hi))
        if self.hist is None:
            self.hist = np.zeros(self.num_bins, dtype=np.int64)
        if amax > self.R:
            self._grow(amax)
        if self.R == 0:
            self.hist[self.num_bins // 2] += x.size
            return
        idx = np.floor((x + self.R) * (self.num_bins / (2 * self.R))).astype(np.int64)
        np.clip(idx, 0, self.num_bins - 1, out=idx)
        self.hist += np.bincount(idx, minlength=self.num_bins)

    def _grow(self, amax: float) -> None:
        if self.R == 0:
            # zeros seen so far sit in the middle bin whatever R becomes
            self.R = amax
            return
        k = max(1, math.ceil(math.log2(amax / self.R)))
        n = self.num_bins
        h = self.hist
        for _ in range(k):
            if self.R * 2 > 1e38:
                break
            coarse = h.reshape(-1, 2).sum(axis=1)
            h = np.zeros(n, dtype=np.int64)
            h[n // 4: n // 4 + n // 2] = coarse
            self.R *= 2
        self.hist = h

    def merge(self, other: "TensorStats") -> None:
        """Add another tensor's statistics (e.g. from a second process)."""
        if other.hist is None:
            return
        if self.hist is None:
            self.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in other.__dict__.items()})
            return
        if other.R > self.R:
            self._grow(other.R)
        h = other.hist
        r = other.R
        while r < self.R:
            coarse = h.reshape(-1, 2).sum(axis=1)
            h = np.zeros(self.num_bins, dtype=np.int64)
            h[self.num_bins // 4: self.num_bins // 4 + self.num_bins // 2] = coarse
            r *= 2
        self.hist = self.hist + h
        self.count += other.count
        self.sentinels += other.sentinels
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    def edges(self) -> np.ndarray:
        return np.linspace(-self.R, self.R, self.num_bins + 1)


def _percentile_range(s: TensorStats, p: float) -> tuple[float, float]:
    cdf = np.cumsum(s.hist) / max(1, s.hist.sum())
    e = s.edges()
    tail = (100.0 - p) / 100.0
    lo_i = int(np.searchsorted(cdf, tail, side="left"))
    hi_i = int(np.searchsorted(cdf, 1.0 - tail, side="left"))
    lo, hi = float(e[lo_i]), float(e[min(hi_i + 1, len(e) - 1)])
    return max(s.min, lo), min(s.max, hi)


def _entropy_threshold(s: TensorStats, levels: int = 128, stride: int = 1) -> float:
    n = s.num_bins // 2
    h = s.hist
    absh = (h[n:] + h[:n][::-1]).astype(np.float64)  # |x| histogram over [0, R], n bins
    nz = np.nonzero(absh)[0]
    if nz.size == 0:
        return 0.0
    last = int(nz[-1]) + 1
    if last <= levels:
        return s.R * last / n
    best_kl, best_i = math.inf, last
    # never clip more than half the observed range away (as onnxruntime's 128-bin search): with fine
    # bins KL alone may clip a [0, 1] attention probability at 0.1 and wreck the attention
    for i in range(max(levels, last // 2), last + 1, stride):
        p = absh[:i].copy()
        p[i - 1] += absh[i:].sum()
        nonzero = p > 0
        # merge i bins into `levels` groups and spread each group's mass over its non-empty bins
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        mass = np.bincount(groups, weights=absh[:i], minlength=levels)
        cnt = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, mass[groups] / np.maximum(cnt[groups], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        pn, qn = p[nonzero] / ps, q[nonzero] / qs
        kl = float(np.sum(pn * np.log(pn / np.maximum(qn, 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return s.R * best_i / n


def _mse_range(s: TensorStats, levels: int) -> tuple[float, float]:
    e = s.edges()
    c = (e[:-1] + e[1:]) / 2
    w = s.hist.astype(np.float64)
    keep = w > 0
    c, w = c[keep], w[keep]
    lo0, hi0 = min(s.min, 0.0), max(s.max, 0.0)
    best, best_r = math.inf, 1.0
    # shrink (clip outliers) or widen a little (so that a value grid, e.g. pixel / 16, lands on the
    # integer grid); the error is the exact round trip of every bin centre, clipping included
    for r in np.concatenate([np.linspace(0.05, 1.0, 96), np.linspace(1.0025, 1.1, 40)]):
        lo, hi = lo0 * r, hi0 * r
        step = (hi - lo) / levels
        if step <= 0:
            continue
        zp = np.round(-lo / step)
        deq = (np.clip(np.round(c / step) + zp, 0, levels) - zp) * step
        total = float(np.sum(w * (deq - c) ** 2))
        if total < best * (1 - 1e-9):
            best, best_r = total, r
    lo = lo0 * best_r if (s.min < 0 or best_r > 1) else s.min
    hi = hi0 * best_r if (s.max > 0 or best_r > 1) else s.max
    return lo, hi


def compute_range(s: TensorStats, method: str, *, percentile: float = 99.99, levels: int = 255) -> tuple[float, float]:
    """The range ``[lo, hi]`` one method chooses from the statistics."""
    if s.count == 0:
        raise CalibrationError("no finite values were seen", where="calibration",
                               hint="check the calibration data reaches this tensor")
    if method == "minmax" or s.R == 0 or s.hist is None:
        return float(s.min), float(s.max)
    if method == "percentile":
        return _percentile_range(s, percentile)
    if method == "entropy":
        # the levels the threshold must cover: all of them for a one-signed tensor, half each side otherwise
        one_sided = s.min >= 0 or s.max <= 0
        t = _entropy_threshold(s, levels=(levels + 1) if one_sided else (levels + 1) // 2,
                               stride=max(1, s.num_bins // 1024))
        return max(s.min, -t), min(s.max, t)
    if method == "mse":
        return _mse_range(s, levels)
    raise CalibrationError(f"unknown calibration method {method!r}", where="calibration")


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return m


def collect_stats(model: onnx.ModelProto, names: Iterable[str], feeds: Iterable[dict], *, num_bins: int = 2048,
                  channels: Iterable[str] = (), max_batches: int = 0, base_dir: Any = None,
                  progress=None) -> dict[str, TensorStats]:
    """Run ``model`` on every feed with ``names`` exposed; return the streamed statistics.

    ``channels``: tensors that also get per-last-axis ``|x|`` maxima. Batches are run one at a time.
    """
    from onnxcompress.verify.session import make_session, run_on_data

    names = list(dict.fromkeys(names))
    chan = set(channels)
    stats = {n: TensorStats(num_bins=num_bins, channels=n in chan) for n in names}
    if not names:
        return stats
    sess = make_session(_with_outputs(model, names), "cpu", optimize=True, base_dir=base_dir)
    input_names = {i.name for i in sess.get_inputs()}
    batches = 0
    it = feeds if progress is None else progress(feeds, desc="calibrating", unit="batch")
    for feed in it:
        missing = input_names - set(feed)
        if missing:
            raise CalibrationError(f"calibration feed lacks input(s) {sorted(missing)}", where="calibration",
                                   hint=f"the model's inputs are {sorted(input_names)}")
        outs = run_on_data(sess, feed, names, where="calibration", batch=batches + 1)
        for n in names:
            stats[n].update(outs[n])
        del outs
        batches += 1
        if max_batches and batches >= max_batches:
            break
    if batches == 0:
        raise CalibrationError("the calibration data holds no feeds", where="calibration",
                               hint="give an .npz with at least one sample")
    log.info("calibrated %d tensors on %d batches", len(names), batches)
    return stats


class Calibrator:
    """Ranges for a set of tensors by one method, with an optional JSON cache."""

    def __init__(self, method: str, *, percentile: float = 99.99, num_bins: int = 2048, levels: int = 255,
                 cache: str | None = None, model: str | None = None) -> None:
        self.method = method
        self.percentile = percentile
        self.num_bins = num_bins
        self.levels = levels
        self.cache = Path(cache) if cache else None
        self.model = model  # model_fingerprint() of the model calibrated: a cache of another is not reused
        self.from_cache = False
        self.rejected = ""  # why an existing cache was not reused

    def ranges(self, stats: dict[str, TensorStats]) -> dict[str, tuple[float, float]]:
        out = {}
        for n, s in stats.items():
            if s.count:
                out[n] = compute_range(s, self.method, percentile=self.percentile, levels=self.levels)
        return out

    def cached(self, needed: Iterable[str]) -> dict[str, tuple[float, float]] | None:
        if self.cache is None or not self.cache.is_file():
            return None
        data = load_cache(self.cache)
        made, now, r = data.get("settings") or {}, self.settings(), data["ranges"]
        if data.get("method") != self.method:
            self.rejected = f"was made by the {data.get('method')} method"
        elif "model" not in made:
            self.rejected = "was made by an earlier onnxcompress, without the model's fingerprint"
        elif made["model"] != now["model"]:
            self.rejected = "was made for another model (or other weights)"
        elif made != now:
            self.rejected = f"was made with other settings ({made})"
        elif any(n not in r for n in needed):
            self.rejected = "lacks some of this model's tensors"
        if self.rejected:
            log.info("calibration cache %s %s; recalibrating", self.cache, self.rejected)
            return None
        self.from_cache = True
        return {n: (float(r[n][0]), float(r[n][1])) for n in needed}

    def settings(self) -> dict:
        """What besides the method decides a range: a cache made with other values is not reused."""
        return {"percentile": float(self.percentile), "num_bins": int(self.num_bins), "levels": int(self.levels),
                "model": self.model}

    def store(self, ranges: dict[str, tuple[float, float]]) -> None:
        if self.cache is not None:
            save_cache(self.cache, self.method, ranges, self.settings())


def model_fingerprint(model: onnx.ModelProto, base_dir=None) -> str:
    """A short hash of what decides a model's activations: its nodes (attributes, subgraphs and
    ``Constant`` values included), initializers, inputs and outputs, and the bytes of weights held
    in external data (read from ``base_dir`` a chunk at a time). Read part by part, so no second
    copy of the model is made."""
    from onnxcompress.graph.io import external_chunks, iter_node_tensors

    def tensors(part) -> list[onnx.TensorProto]:
        if isinstance(part, onnx.TensorProto):
            return [part]
        if isinstance(part, onnx.SparseTensorProto):
            return [part.values, part.indices]
        if isinstance(part, onnx.NodeProto):
            return [t for t, _ in iter_node_tensors(part)]
        return []  # inputs and outputs

    external = onnx.TensorProto.EXTERNAL
    h = hashlib.sha256()
    g = model.graph
    for part in (*g.input, *g.output, *g.node, *g.initializer, *g.sparse_initializer):
        ext = [t for t in tensors(part) if t.data_location == external]
        if not ext:
            h.update(part.SerializeToString())
            continue
        # where the bytes sit (a file name, a scratch folder a run spilled them to) is not the model:
        # hash the part without that, then the bytes themselves
        clone = type(part)()
        clone.CopyFrom(part)
        for t in tensors(clone):
            if t.data_location == external:
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
        h.update(clone.SerializeToString())
        for t in ext:
            for data in external_chunks(t, base_dir):
                h.update(data)
    return h.hexdigest()[:16]


def save_cache(path: str | Path, method: str, ranges: dict[str, tuple[float, float]], settings: dict) -> None:
    from onnxcompress.graph.io import write_text_atomic

    body = {"version": 1, "method": method, "settings": settings,
            "ranges": {k: [float(a), float(b)] for k, (a, b) in sorted(ranges.items())}}
    write_text_atomic(Path(path), json.dumps(body, indent=1))


def load_cache(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CalibrationError(f"cannot read calibration cache: {e}", where=f"calib cache {str(p)!r}",
                               hint="delete the file to recalibrate") from e
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("ranges"), dict):
        raise CalibrationError("not an onnxcompress calibration cache (version 1)", where=f"calib cache {str(p)!r}",
                               hint="delete the file to recalibrate")
    return data
