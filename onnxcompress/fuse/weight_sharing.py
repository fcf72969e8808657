"""``share_weights``: k-means weight sharing (Deep Compression, Han et al. 2016), one codebook per layer.

Each large float weight ``W`` (or each group of its output channels) — not the parameters of another
encoding (:func:`encoding_reader`: custom-domain op inputs such as MatMulNBits scales, Q/DQ scales,
storage decodes) — is replaced by the nearest of
``K`` centres ``c_1 < ... < c_K`` found by 1-D k-means:

    minimize  sum_i a_i (w_i - c_{j(i)})^2        j(i) = argmin_j |w_i - c_j|

with ``a_i = 1`` or, activation-aware, ``a_i = E[x_k^2]`` for the input feature ``k`` that ``w_i``
multiplies (calibration statistics; MatMul/Gemm weights), so errors on busy inputs cost more.

**Solver.** Centres start evenly spaced over ``[min W, max W]`` (Deep Compression's linear
initialisation: large weights keep their own centres); then sorted Lloyd iterations. In 1-D every
cluster is a contiguous run of the sorted values, bounded by the midpoints between neighbouring
centres, so one iteration is ``K`` binary searches into the sorted values and two prefix sums:

    b_j = (c_j + c_{j+1}) / 2;   [lo_j, hi_j) = searchsorted(sorted w, b);
    c_j = (S_aw[hi_j] - S_aw[lo_j]) / (S_a[hi_j] - S_a[lo_j])

— ``O(K log n)`` per iteration after one ``O(n log n)`` sort, deterministic (no random seed is
needed). An empty cluster keeps its centre. Iterations stop when no centre moves by more than
``1e-7`` of the range.

**Zeros stay zero.** When a weight holds exact zeros (pruning left them) and ``pin_zero`` is on, one
code is reserved for 0: the zeros are excluded from the fit and kept, the non-zero values share the
other ``K - 1`` centres, so the sparsity pattern survives exactly.

The pass only *snaps* values (the weight stays a dense float tensor with at most ``K`` distinct
values); ``compact_storage`` (``onnxcompress.encode``) later stores such a tensor as a codebook plus
packed ``ceil(log2 K)``-bit indices decoded by ``Gather(codebook, Cast(indices))``, which
onnxruntime folds at load: the file shrinks to about ``bits / 32`` of fp32 and speed is unchanged.

``details["tensors"][name]`` records per weight: clusters used, bits per weight (``bits``: with one
codebook for the whole tensor, as compact storage writes it — ``G`` groups of ``K`` values need
``ceil(log2(G K))`` bits there; ``bits_per_group``: with a codebook per group), groups and axis,
relative reconstruction error ``||W - W'|| / ||W||``, max abs error, whether zero was pinned, and the
codebooks (when small), so the plan can be replayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.errors import RecipeError
from onnxcompress.graph.query import WeightRef, iter_weights
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.recipe import StepConfig, option

__all__ = ["ShareWeightsConfig", "ShareWeightsPass", "kmeans_1d", "share_values", "output_axis"]


@dataclass(frozen=True)
class ShareWeightsConfig(StepConfig):
    name = "share_weights"
    order = 78  # after pruning, quantization and teacher-guided repair (75); before int8 storage (80), fp16 and compact storage

    clusters: int | None = option(None, "k-means weight sharing: number of shared values per layer "
                                        "(default 16 when --codebook-bits is not given)",
                                  flag="--cluster", minimum=2, maximum=256, metavar="K")
    codebook_bits: int | None = option(None, "k-means weight sharing with 2^B shared values per layer",
                                       flag="--codebook-bits", minimum=1, maximum=8, metavar="B")
    channel_groups: int = option(1, "separate codebooks for this many groups of output channels per weight",
                                 flag="--cluster-groups", minimum=1)
    min_size: int = option(1024, "share only float weights with at least this many elements", minimum=1)
    max_iterations: int = option(50, "Lloyd iterations at most", minimum=1, maximum=10000)
    pin_zero: bool = option(True, "keep exact zeros exactly zero (one code reserved for 0)")
    activation_aware: bool = option(False, "weight each weight's error by the mean square of the input feature "
                                           "it multiplies (needs --calib-data; MatMul/Gemm weights)",
                                    flag="--cluster-activation-aware")
    max_samples: int = option(256, "calibration samples used for the activation statistics", minimum=1)

    def validate(self) -> None:
        if self.clusters is not None and self.codebook_bits is not None and self.clusters > 2 ** self.codebook_bits:
            raise RecipeError(f"clusters={self.clusters} needs more than codebook_bits={self.codebook_bits} bits",
                              where="recipe, share_weights", hint="give one of --cluster and --codebook-bits")

    @property
    def k(self) -> int:
        if self.clusters is not None:
            return self.clusters
        return 2 ** self.codebook_bits if self.codebook_bits is not None else 16


def kmeans_1d(values: np.ndarray, k: int, *, weights: np.ndarray | None = None,
              max_iterations: int = 50) -> np.ndarray:
    """Centres (ascending, float64) of a weighted 1-D k-means of ``values`` by sorted Lloyd iterations."""
    v = np.asarray(values, np.float64).reshape(-1)
    if weights is None:
        xs = np.sort(v)
        sa = np.arange(xs.size + 1, dtype=np.float64)
        ws = None
    else:
        order = np.argsort(v, kind="stable")
        xs = v[order]
        ws = np.asarray(weights, np.float64).reshape(-1)[order]
        sa = np.concatenate([[0.0], np.cumsum(ws)])
    saw = np.concatenate([[0.0], np.cumsum(xs * ws if ws is not None else xs)])
    lo, hi = float(xs[0]), float(xs[-1])
    c = np.linspace(lo, hi, k)
    tol = 1e-7 * max(hi - lo, 1e-30)
    for _ in range(max_iterations):
        cut = np.concatenate([[0], np.searchsorted(xs, (c[:-1] + c[1:]) / 2), [xs.size]])
        mass = sa[cut[1:]] - sa[cut[:-1]]
        total = saw[cut[1:]] - saw[cut[:-1]]
        new = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), c)
        new = np.sort(new)
        moved = float(np.max(np.abs(new - c)))
        c = new
        if moved <= tol:
            break
    return c


def _snap(v: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Each value replaced by its nearest centre (ties go up, as in :func:`kmeans_1d`'s partition)."""
    idx = np.searchsorted((centres[:-1] + centres[1:]) / 2, v, side="right")
    return centres[idx]


def share_values(w: np.ndarray, k: int, *, weights: np.ndarray | None = None, pin_zero: bool = True,
                 max_iterations: int = 50) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(snapped, codebook, zero_pinned)`` for one group of values (any shape, float)."""
    flat = np.asarray(w).reshape(-1)
    dtype = flat.dtype
    zero_pinned = bool(pin_zero and np.any(flat == 0))
    keep = flat != 0 if zero_pinned else np.ones(flat.shape, bool)
    vals = flat[keep]
    out = np.zeros_like(flat)
    k_fit = k - 1 if zero_pinned else k
    if vals.size == 0 or k_fit < 1:
        return out.reshape(np.shape(w)), np.zeros(1, dtype), zero_pinned
    cw = None if weights is None else np.broadcast_to(weights, np.shape(w)).reshape(-1)[keep]
    centres = kmeans_1d(vals, min(k_fit, vals.size), weights=cw, max_iterations=max_iterations)
    centres = np.unique(centres.astype(dtype)).astype(np.float64)
    if zero_pinned:
        centres = centres[centres != 0] if np.any(centres != 0) else centres
    out[keep] = _snap(vals.astype(np.float64), centres).astype(dtype)
    book = np.union1d(centres.astype(dtype), np.zeros(1, dtype)) if zero_pinned else centres.astype(dtype)
    return out.reshape(np.shape(w)), book, zero_pinned


def output_axis(ref: WeightRef) -> int:
    """The output-channel axis of a weight, from how its readers use it (0 when unclear)."""
    axes = set()
    for node in ref.consumers:
        slot = next((i for i, t in enumerate(node.inputs) if t is ref.tensor), None)
        nd = len(ref.shape)
        if node.op == "MatMul" and slot == 1:
            axes.add(nd - 1)
        elif node.op == "Gemm" and slot == 1:
            axes.add(0 if int(node.attrs.get("transB", 0)) else 1)
        elif node.op == "ConvTranspose" and slot == 1:
            axes.add(1)
        else:
            axes.add(0)
    return axes.pop() if len(axes) == 1 else 0


def _input_importance(ref: WeightRef, stats: dict[int, object] | None) -> np.ndarray | None:
    """Per-element weights E[x_k^2] broadcastable to the weight, for a MatMul/Gemm weight, else None."""
    if not stats or len(ref.shape) != 2:
        return None
    vecs = []
    for node in ref.consumers:
        st = stats.get(id(node))
        if st is None or node.op not in ("MatMul", "Gemm") or node.inputs[1] is not ref.tensor:
            return None
        ms = np.asarray(st.mean_square, np.float64)
        trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        k_axis = 1 if trans_b else 0
        if ms.size != ref.shape[k_axis]:
            return None
        vecs.append(ms[None, :] if trans_b else ms[:, None])
    if not vecs:
        return None
    imp = sum(vecs) / len(vecs)
    return imp + 1e-8 * float(np.max(imp, initial=0) or 1.0)


def _bits(n: int) -> int:
    """Index bits for ``n`` values in one codebook."""
    return int(math.ceil(math.log2(max(n, 2))))


_QDQ = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def encoding_reader(ref: WeightRef) -> gs.Node | None:
    """May I share ``ref``? The reader that makes it a parameter of another encoding, whose values must
    stay as they are — or None (it may be shared).

    Those readers are custom-domain ops (``com.microsoft::MatMulNBits`` scales, the int4 hqq shift's
    ``FusedMatMul``, ``GatherBlockQuantized``: their kernels read encoding parameters and may prepack
    them), Quantize/DequantizeLinear (scales), and the ``Mul``/``Sub``/``Add`` of a size-only storage
    decode (the other operand is a ``Cast`` of integer codes). Every other float constant — layer
    weights, biases, norms, embeddings — may be shared."""
    for c in ref.consumers:
        if (c.domain or "") not in ("", "ai.onnx") or c.op in _QDQ:
            return c
        if c.op in ("Mul", "Sub", "Add") and any(_casts_integers(i) for i in c.inputs if i is not ref.tensor):
            return c
    return None


def _casts_integers(t: gs.Tensor) -> bool:
    """``t`` is ``Cast(x)`` of an integer-typed ``x`` (int codes being decoded)."""
    if len(t.inputs) != 1 or t.inputs[0].op != "Cast" or not t.inputs[0].inputs:
        return False
    src = t.inputs[0].inputs[0].dtype
    try:
        return src is not None and np.issubdtype(np.dtype(src), np.integer)
    except TypeError:  # ml_dtypes int4/uint4
        return "int" in str(src)


class ShareWeightsPass(Pass):
    config_cls = ShareWeightsConfig
    lossless = False

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        cfg = self.config
        k = cfg.k
        refs = list(iter_weights(graph, min_size=cfg.min_size, float_only=True))
        stats = None
        if cfg.activation_aware:
            from onnxcompress.quantize.gptq import collect_input_stats

            nodes = [n for r in refs for n in r.consumers if n.op in ("MatMul", "Gemm")
                     and not int(n.attrs.get("transA", 0))]
            stats = collect_input_stats(graph, ctx, nodes, full=False, max_samples=cfg.max_samples)
            if stats is None and ctx is not None:
                ctx.note("share_weights: activation-aware clustering needs calibration data (--calib-data); "
                         "clustered without it")
        tensors: dict[str, dict] = {}
        total = shared = 0
        bits_sum = 0.0
        for ref in refs:
            rec = self._share(ref, k, cfg, stats, res)
            if rec is None:
                continue
            tensors[ref.name] = rec
            total += ref.size
            shared += 1
            bits_sum += rec["bits"] * ref.size
            res.changed(f"{ref.name} {list(ref.shape)}: {rec['clusters']} shared values per group x "
                        f"{rec['groups']} ({rec['bits']} bits), rel. error {rec['rel_error']:.3g}")
        res.details = {"clusters": k, "channel_groups": cfg.channel_groups, "weights_shared": shared,
                       "parameters_shared": total,
                       "mean_bits": round(bits_sum / total, 3) if total else None,
                       "activation_aware": bool(stats), "tensors": tensors}
        return res

    @staticmethod
    def _share(ref: WeightRef, k: int, cfg: ShareWeightsConfig, stats, res: PassResult) -> dict | None:
        if any(ref.tensor is o for o in ref.graph.outputs):
            res.skip(ref.name, "share_weights", "it is a graph output")
            return None
        enc = encoding_reader(ref)
        if enc is not None:
            res.skip(ref.name, "share_weights", f"it is an encoding parameter of {enc.op} {enc.name!r} (custom-domain "
                     "op inputs, quantization scales and storage decodes keep their values)")
            return None
        w = np.asarray(ref.values)
        distinct = np.unique(w).size
        if distinct <= k:
            res.skip(ref.name, "share_weights", f"already has {distinct} <= {k} distinct values")
            return None
        if not np.all(np.isfinite(w)):
            res.skip(ref.name, "share_weights", "holds inf or nan")
            return None
        axis = output_axis(ref) if w.ndim else 0
        groups = max(1, min(cfg.channel_groups, w.shape[axis] if w.ndim else 1))
        imp = _input_importance(ref, stats) if stats else None
        moved = np.moveaxis(w, axis, 0) if w.ndim else w.reshape(1)
        imp_m = None if imp is None else np.moveaxis(np.broadcast_to(imp, w.shape), axis, 0)
        out = np.empty_like(moved)
        books, pinned = [], False
        for sl in np.array_split(np.arange(moved.shape[0]), groups):
            if sl.size == 0:
                continue
            part = moved[sl[0]:sl[-1] + 1]
            snapped, book, zp = share_values(part, k, pin_zero=cfg.pin_zero, max_iterations=cfg.max_iterations,
                                             weights=None if imp_m is None else imp_m[sl[0]:sl[-1] + 1])
            out[sl[0]:sl[-1] + 1] = snapped
            books.append(book)
            pinned |= zp
        new = np.moveaxis(out, 0, axis) if w.ndim else out.reshape(w.shape)
        ref.constant.values = np.ascontiguousarray(new.astype(w.dtype))
        used = max(len(b) for b in books)
        distinct = int(np.unique(ref.constant.values).size)
        err = new.astype(np.float64) - w.astype(np.float64)
        norm = float(np.linalg.norm(w.astype(np.float64)))
        rec = {"shape": list(w.shape), "clusters": int(used), "distinct": distinct,
               "bits": _bits(distinct), "bits_per_group": _bits(used),
               "groups": len(books), "axis": int(axis), "zero_pinned": pinned,
               "rel_error": float(np.linalg.norm(err) / norm) if norm else 0.0,
               "max_abs_error": float(np.max(np.abs(err))),
               "activation_aware": imp is not None}
        if sum(len(b) for b in books) <= 4096:
            rec["codebooks"] = [[float(x) for x in b] for b in books]
        return rec
