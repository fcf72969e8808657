"""``low_rank``: truncated SVD of large MatMul/Gemm weights into two thinner layers.

For a layer ``y = x W + b`` with ``W`` of shape ``[K, N]`` and singular values ``s_1 >= s_2 >= ...``:

    W = U diag(s) V^T  ≈  A B,    A = U_r diag(s_r)  [K, r],   B = V_r^T  [r, N]

with the smallest rank ``r`` whose kept energy ``sum_{i<=r} s_i^2 / sum_i s_i^2`` reaches ``energy``.
The layer becomes ``MatMul(x, A)`` followed by the original layer with ``B`` as its weight (a Gemm
keeps its bias, alpha and beta folded into ``B`` and the bias). It is applied only where it reduces
parameters (and FLOPs per row): ``r (K + N) < K N`` — else a Skip says so.

**Data-aware** (``data_aware``, with calibration data): the error that matters is the output error
``E||x (W - A B)||^2``; weighting the input features by ``d_k = sqrt(E[x_k^2])`` (the diagonal of the
input second moment) gives the SVD of ``D W``:

    D W = U diag(s) V^T,   A = D^{-1} U_r diag(s_r),   B = V_r^T

so the energy (and the truncation) is measured on the scaled matrix, and features that are always
small lose their directions first. Without data the pass notes it and uses the plain SVD.

May I? The weight is a 2-D float constant that only this node reads (a shared weight would be
duplicated), the Gemm has ``transA = 0``, the weight has at least ``min_size`` elements.
``details["tensors"][name]`` records the rank, kept energy, parameter counts and relative error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.fuse.patterns import RuleContext, as_linear, emit_linear, weights_private
from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import iter_graphs
from onnxcompress.graph.rewrite import disconnect
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.recipe import StepConfig, option

__all__ = ["LowRankConfig", "LowRankPass", "truncated_factors"]


@dataclass(frozen=True)
class LowRankConfig(StepConfig):
    name = "low_rank"
    order = 20

    energy: float = option(0.9, "low-rank factorization: keep this fraction of each large MatMul/Gemm weight's "
                                "squared singular values (0 < E <= 1)", flag="--low-rank", minimum=1e-6, maximum=1.0,
                           metavar="E")
    min_size: int = option(4096, "factorize only weights with at least this many elements", minimum=1)
    data_aware: bool = option(False, "SVD of the weight scaled by the input features' root mean square "
                                     "(needs --calib-data)", flag="--low-rank-data-aware")
    max_samples: int = option(256, "calibration samples used for the activation statistics", minimum=1)


def truncated_factors(w: np.ndarray, energy: float, scale: np.ndarray | None = None, *,
                      rank: int | None = None) -> tuple[np.ndarray, np.ndarray, int, float]:
    """``(A, B, r, kept)`` with ``A @ B ≈ w`` ([K, r] and [r, N], float64), ``kept`` the energy kept.

    ``scale`` (length K, positive) makes it the SVD of ``diag(scale) @ w``, unscaled afterwards;
    ``rank`` fixes ``r`` instead of choosing it from ``energy``.
    """
    w64 = np.asarray(w, np.float64)
    m = w64 if scale is None else w64 * scale[:, None]
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    e = s ** 2
    total = float(e.sum())
    if total == 0:
        r = 1
        kept = 1.0
    else:
        cum = np.cumsum(e) / total
        r = int(min(np.searchsorted(cum, energy - 1e-12) + 1, s.size)) if rank is None else int(rank)
        kept = float(cum[r - 1])
    a = u[:, :r] * s[:r]
    if scale is not None:
        a = a / scale[:, None]
    return a, vt[:r], r, kept


class LowRankPass(Pass):
    config_cls = LowRankConfig
    lossless = False

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        cfg = self.config
        candidates = []
        for g in iter_graphs(graph):
            for node in list(g.nodes):
                if node.op not in ("MatMul", "Gemm"):
                    continue
                lin, why = as_linear(node, g)
                if lin is None:
                    if "not a constant" not in why:
                        res.skip(node.name or node.op, "low_rank", why)
                    continue
                if lin.w.size < cfg.min_size:
                    continue
                v = weights_private(lin, g)
                if not v:
                    res.skip(node.name or node.op, "low_rank", f"{v.reason}; factorizing would duplicate it")
                    continue
                candidates.append((lin, g))
        stats = None
        if cfg.data_aware and candidates:
            from onnxcompress.quantize.gptq import collect_input_stats

            stats = collect_input_stats(graph, ctx, [lin.node for lin, _ in candidates], full=False,
                                        max_samples=cfg.max_samples)
            if stats is None and ctx is not None:
                ctx.note("low_rank: data-aware SVD needs calibration data (--calib-data); used the plain SVD")
        rc = RuleContext(Namer.for_graph(graph), {}, int(graph.opset or 13))
        tensors: dict[str, dict] = {}
        for lin, g in candidates:
            st = stats.get(id(lin.node)) if stats else None
            scale = None
            if st is not None and np.asarray(st.mean_square).size == lin.k:
                rms = np.sqrt(np.asarray(st.mean_square, np.float64))
                scale = np.maximum(rms, 1e-6 * max(float(rms.max(initial=0)), 1e-12))
            a, bm, r, kept = truncated_factors(lin.w, cfg.energy, scale)
            k, n = lin.k, lin.n
            if r * (k + n) >= k * n:
                res.skip(lin.node.name or lin.node.op, "low_rank",
                         f"rank {r} for energy {cfg.energy} would not reduce parameters ({r * (k + n)} >= {k * n})")
                continue
            rel = float(np.linalg.norm(a @ bm - lin.w) / max(np.linalg.norm(lin.w), 1e-30))
            out = lin.node.outputs[0]
            dt = lin.w.dtype
            mid = rc.variable(out.name, "lowrank", out)
            disconnect(lin.node)
            rc.node(g, "MatMul", lin.node.name or lin.node.op, [lin.x, rc.constant(lin.w_tensor.name, "lowrank_a",
                                                                                    a.astype(dt))], [mid])
            emit_linear(rc, g, lin, mid, bm, lin.bias, out, "lowrank_b")
            tensors[lin.w_tensor.name] = {"shape": [k, n], "rank": r, "energy": round(kept, 6),
                                          "params_before": k * n, "params_after": r * (k + n),
                                          "rel_error": rel, "data_aware": scale is not None}
            res.changed(f"{lin.w_tensor.name} [{k}x{n}] -> [{k}x{r}]·[{r}x{n}] "
                        f"(energy {kept:.4f}, rel. error {rel:.3g})")
        res.details = {"energy": cfg.energy, "factorized": len(tensors), "tensors": tensors}
        return res
