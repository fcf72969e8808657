"""GPTQ-style error-compensating 4-bit rounding, and the activation statistics it needs.

For one linear layer y = x·W with W[K, N] and calibration inputs X[S, K], the output error of a
quantized Ŵ is ‖X(W − Ŵ)‖² = Σ_n (w_n − ŵ_n)ᵀ H (w_n − ŵ_n) / 2 with H = 2XᵀX. GPTQ (Frantar et al.,
2022) quantizes the input features k one at a time and moves each one's rounding error onto the
features not yet quantized, which is the optimal least-squares update for H::

    H ← H + λ·mean(diag H)·I              (damping; dead features with H_kk = 0 get H_kk = 1)
    U = chol(H⁻¹)ᵀ                        (upper Cholesky factor of the inverse)
    for each block of bs features [i1, i2):   scales/zero points chosen on the *updated* block
        for k in block:  q_k = quant(w_k);  e = (w_k − q_k) / U_kk;  w_j −= e·U_kj  for j > k
        W[:, i2:] −= E · U[i1:i2, i2:]     (lazy batch update of the later blocks)

The per-block scale is chosen by the clipping search of :mod:`onnxcompress.quantize.int4` weighted
by diag(H) (so GPTQ is never given a worse starting grid than the search).

*Dead features* (H_kk = 0: zero in every calibration sample, like a digit image's border pixels) keep
their weights. The reference implementation zeroes them, which costs nothing on the calibration data
but changes the answer for every input that does activate them: on the digits MLP with noisy inputs
(σ = 0.12 pixel noise, 4,950 samples) the logit MSE against fp32 was 0.30 with zeroing against 0.015
with the weights kept (block 64), and the held-out clean digits' MSE fell from 0.0141 to 0.0133. With
H_kk = 1 and no off-diagonal terms, their rounding errors move onto no other feature; they weigh
1% of the mean live diag(H) in the block's scale search (:func:`~onnxcompress.quantize.int4.with_dead_floor`,
as in the activation-weighted search), so the search does not ignore them.

Statistics are streamed: onnxruntime runs the model with the layers' input tensors as extra outputs,
batch by batch; only the running sums XᵀX [K, K] (for GPTQ) or Σx² [K] (for the search) are kept,
so memory does not grow with the number of samples. Inputs of nodes inside If/Loop bodies cannot be
graph outputs: those layers get no statistics (the caller rounds them to nearest under gptq and auto,
and searches without activation weights under search).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.quantize.int4 import QMAX, BlockQuant, choose_block_params, with_dead_floor

__all__ = ["InputStats", "collect_input_stats", "gptq_quantize", "stream_tensors"]

log = logging.getLogger("onnxcompress")


@dataclass
class InputStats:
    """Running statistics of one layer's input features: Σx² per feature and optionally XᵀX."""

    rows: int
    mean_square: np.ndarray          # [K]
    hessian: np.ndarray | None       # [K, K] = 2XᵀX / rows, or None


def stream_tensors(graph: gs.Graph, ctx, names: list[str], max_samples: int):
    """Yield ``(names, values)`` per calibration batch: the current model run with ``names`` exposed
    as outputs (no graph optimizations), until ``max_samples`` samples (first axis) were seen."""
    from onnxcompress.verify.layers import expose_tensors
    from onnxcompress.verify.session import make_session, run_on_data

    model = ctx.model_of(graph)
    exposed, names = expose_tensors(model, names)
    sess = make_session(exposed, "cpu", optimize=False, base_dir=ctx.base_dir)
    seen = 0
    for i, feed in enumerate(ctx.feeds(model)):
        if seen >= max_samples:
            return
        n_batch = len(next(iter(feed.values()))) if feed else 1
        take = min(n_batch, max_samples - seen)
        if take < n_batch:
            feed = {k: v[:take] for k, v in feed.items()}
        seen += take
        outs = run_on_data(sess, feed, names, where="calibration (activation statistics)", batch=i + 1)
        yield names, [outs[n] for n in names]


def collect_input_stats(graph: gs.Graph, ctx, nodes: list[gs.Node], *, full: bool,
                        max_samples: int) -> dict[int, InputStats] | None:
    """Stream the calibration data through the current model; statistics of each node's input 0,
    keyed by id(node).

    Returns None when the context has no data. ``full`` also accumulates XᵀX (for GPTQ).
    Only nodes of the top-level graph get statistics.
    """
    if ctx is None or getattr(ctx, "data", None) is None:
        return None
    top = {id(n) for n in graph.nodes}
    wanted: dict[str, list[gs.Node]] = {}
    for n in nodes:
        if id(n) in top and n.inputs and n.inputs[0].name:
            wanted.setdefault(n.inputs[0].name, []).append(n)
    if not wanted:
        return {}
    sums: dict[str, list] = {}
    for names, outs in stream_tensors(graph, ctx, list(wanted), max_samples):
        for name, x in zip(names, outs):
            x = np.asarray(x, np.float64)
            x = x.reshape(-1, x.shape[-1])
            acc = sums.setdefault(name, [0, np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2) if full else None])
            acc[0] += x.shape[0]
            acc[1] += (x * x).sum(axis=0)
            if full:
                acc[2] += x.T @ x
    stats: dict[int, InputStats] = {}
    for name, (rows, sq, xtx) in sums.items():
        if rows == 0:
            continue
        st = InputStats(rows, sq / rows, 2.0 * xtx / rows if xtx is not None else None)
        for n in wanted[name]:
            stats[id(n)] = st
    log.info("collected input statistics of %d layers", len(stats))
    return stats


def gptq_quantize(w_rows: np.ndarray, hessian: np.ndarray, block_size: int, *, symmetric: bool = False,
                  grid: int = 24, min_ratio: float = 0.55, damp: float = 0.01) -> BlockQuant:
    """Quantize ``w_rows`` [N, K] (rows = output columns, K = input features) with error feedback."""
    w = np.array(w_rows, dtype=np.float64)
    n, k = w.shape
    nb = -(-k // block_size)
    kp = nb * block_size
    h = np.zeros((kp, kp))
    h[:k, :k] = hessian
    if kp > k:
        w = np.concatenate([w, np.zeros((n, kp - k))], axis=1)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(kp)] += damp * float(np.mean(np.diag(h)))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:  # not positive definite even after damping: more damping
        h[np.diag_indices(kp)] += 0.1 * float(np.mean(np.diag(h)))
        u = np.linalg.cholesky(np.linalg.inv(h)).T
    imp = with_dead_floor(diag)  # dead features (diag 0): kept (module docstring), weighed a little
    q = np.zeros((n, kp), np.uint8)
    scales = np.zeros((n, nb))
    zeros = np.zeros((n, nb))
    for b in range(nb):
        i1, i2 = b * block_size, (b + 1) * block_size
        s, z = choose_block_params(w[:, i1:i2], symmetric=symmetric, grid=grid, min_ratio=min_ratio,
                                   importance=imp[i1:i2][None, :])
        scales[:, b], zeros[:, b] = s, z
        w1 = w[:, i1:i2].copy()
        err = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(block_size):
            col = w1[:, i]
            code = np.clip(np.round(col / s) + z, 0, QMAX)
            q[:, i1 + i] = code
            e = (col - (code - z) * s) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    if kp > k:  # padded features decode to 0
        q[:, k:] = np.repeat(zeros.astype(np.uint8), block_size, axis=1)[:, k:]
    return BlockQuant(q, scales.astype(np.float32), zeros.astype(np.uint8), block_size, k)
