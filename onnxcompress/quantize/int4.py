"""quantize_int4: block-wise 4-bit weights for MatMul and Gemm.

The rule (weight-only, per block of ``bs`` consecutive input features k of one output column n)::

    y = A @ W            W[K, N] a constant float weight
    W[k, n] ≈ (q[n, k] − z[n, b]) · s[n, b],     b = k // bs,  q, z ∈ {0..15}

*Asymmetric* (default, the min–max affine rule with zero kept representable)::

    lo = min(0, min_block W) · r,  hi = max(0, max_block W) · r
    s = (hi − lo) / 15,  z = clip(round(−lo / s), 0, 15),  q = clip(round(W / s) + z, 0, 15)

*Symmetric*: z = 8 and s = −m · r / 8 where m is the block's value of largest magnitude (so m maps
exactly onto −8, the code with the larger reach), q = clip(round(W / s) + 8, 0, 15).

**Rounding.** ``rtn`` is r = 1 (onnxruntime's ``MatMulNBitsQuantizer`` default; our codes, zero points
and scales are bit for bit the same). ``search`` tries ``search_grid`` clipping ratios r ∈
[search_min_ratio, 1] per block, each also with one weighted least-squares refit of (s, z) to its codes
(s' = argmin Σ h (w − s'(q − z'))²), and keeps the candidate that minimizes the reconstruction error
Σ_k h_k (W − Ŵ)² — r = 1 is always among them, so the *weight* error is never worse than RTN. h_k is 1,
or, with calibration data, the mean square of input feature k (the diagonal of the Hessian,
activation-aware). ``hqq`` (data-free, asymmetric blocks; :func:`hqq_blocks`) keeps the min–max scale
and optimizes each block's zero point as a real number for the ℓ0.7 error (half-quadratic
quantization); the part of it off the integer grid is added after the layer as a per-block sum of its
input (``shift``, below). ``gptq`` (with calibration data, :mod:`onnxcompress.quantize.gptq`) quantizes column
by column and feeds each column's error back into the columns not yet quantized, using H = 2XᵀX of the
layer's streamed input activations (a layer with fewer than ``gptq_min_rows``·K activation rows gets the
activation-weighted search instead: its XᵀX is rank-deficient and GPTQ would fit the calibration set,
not the task). ``auto`` is gptq with data; without data it is hqq at block sizes ≥ 64 and rtn below
(and for symmetric blocks, which have no zero point to optimize).

*Why hqq from block 64, rtn below.* Measured on the digits transformer against onnxruntime's RTN on the
test split and 60 noisy copies of it (27,450 samples, ``bench/int4_block_sizes.py``): at blocks 64 and
128 rtn was significantly below onnxruntime at three of the four accuracy-level rows (0.8740 vs 0.8756
at block 64 level 0, McNemar p = 0.049; it also quantizes the two attention output projections that
onnxruntime leaves float); hqq was significantly above at all four (p = 0.003–0.023) and lowered the
held-out logit MSE 1.5–1.9×. At block 32 rtn was not below onnxruntime and hqq was no more accurate
(test split 0.9600 / 0.9578 at levels 0 / 4, rtn 0.9600 / 0.9600), and the shift costs 4 bytes a
block: +20% of the 4-bit bytes at block 32 (+11% at 64, +6% at 128; the whole file at block 64: +9% on
the transformer, +12% on the MLP), plus three to five small ops per layer (+0.05–0.14× of the fp32
latency on the digits transformer, batch 1 and 64).

*Why not search without data.* With h = 1 the search assumes isotropic inputs, and its lower
weight error did not carry to the model output. Logit MSE against fp32 on the digits models' calib +
train splits (never the test split), summed over block sizes 16–128 and accuracy levels 0 and 4: MLP
rtn 0.155, search 0.210; transformer (input layer in 8 bits, below) rtn 0.130, search 0.140. Part of
the reason: clipping shrinks blocks towards zero, a bias that does not average out (the MLP's logits
shrink: gain 0.989 against fp32 under the search, 0.996 under rtn).

**Input layer in 8 bits** (``first_bits`` = 8, default). The MatMul/Gemm layers whose input depends on
no other layer — they read the pixels or the embeddings, e.g. a transformer's first q/k/v projection —
get 8-bit blocks (256 levels: 1/16 of the 4-bit step, rounded to nearest) when together they hold at
most ``first_max_share`` (25%) of the weight elements of all layers, so their codes add at most about a
fifth to the 4-bit weight bytes. Their error passes through every later layer (and, for q/k, through the
softmax): on the digits transformer, 4-bit rounding of its first layer alone makes over half of the
logit error of the fully 4-bit model and flips exactly the two test samples on which onnxruntime's RTN
differs from fp32; in 8 bits the model's logit MSE falls 2.1–2.7× (block sizes 16–128) for +0.016 to
+0.018 of the fp32 size. With calibration data it stays (8-bit RTN rather than 4-bit GPTQ): the
held-out train split's logit MSE falls from 0.0117 to 0.0057. This is the usual rule of low-bit
quantization (first and last layers at higher precision); the last one is ``keep_last``. Emitted as MatMulNBits
``bits=8`` at accuracy_level 4 (fast: int8 activations); at other levels (onnxruntime's 8-bit kernel
without int8 activations is up to 28× slower than fp32 at batch 1) as the exact decode form
``Cast(uint8) → Sub(zero) → Mul(scale) → Transpose → MatMul`` that onnxruntime folds into a float
weight at load (fp32 speed; the file keeps the 8-bit codes); in the qdq form as an 8-bit blocked
DequantizeLinear.

**hqq's shift.** A block's real zero point z = z₀ + f is stored as the integer z₀ (the usual uint4
zero point) and a float ``shift`` = −f·s per block, added after the layer:
``y = y_int + Σ_b (Σ_{k∈b} x_k)·shift[n, b]`` — ReduceSum over the input (Reshape into blocks, and a
zero Pad for a ragged last block, when a column has several), then a product with shiftᵀ[nb, N]
(``com.microsoft::FusedMatMul`` next to MatMulNBits, ``Einsum`` in the portable form: never a plain
MatMul, which later passes would take for a layer), then Add. onnxruntime's MatMulNBits does accept
float zero points, but then leaves its integer kernels for a float path many times slower
(``bench/int4_zero_points.py``). A layer whose input rank
is unknown, or the input of any reader of its shared weight (needed for the block reshape), rounds to
nearest; its report entry (``hqq_declined``) and the summary say why.

**Forms.** ``matmulnbits`` (default): ``com.microsoft::MatMulNBits(A, B, scales[, zero_points][, bias])``
with B uint8[N, K/bs, bs/2] (low nibble = even k; 8 bits: [N, K/bs, bs]), scales float[N, K/bs], zero
points packed two per byte (8 bits: one; omitted when symmetric: default 8, or 128). Gemm folds in as
alpha → scales, transB → layout, β·C → the bias input. ``qdq`` (portable, opset ≥ 21): ``DequantizeLinear(int4|uint4 W[K, N],
scale[K/bs, N], zero_point, axis=0, block_size=bs) → MatMul`` — any ONNX runtime loads it, but
onnxruntime runs the DequantizeLinear at every inference (slower than fp32, see the notes).

**accuracy_level** (MatMulNBits only): 4 quantizes the activations to int8 inside the kernel (about
half the fp32 latency at batch 1, ~3.5% of the output std of extra error); 0 computes in float
(exact up to the 4-bit weights, 1.1–1.3× slower than fp32). The default is 4; see
docs/benchmarks.md (quantize-int4-fp16) for the measured accuracy of both.

**May I?** Not the output layer when it is small (``keep_last``, default on, for output layers with
at most ``keep_last_max_share`` = 10% of the weights: a classifier is cheap to keep and the most
sensitive layer, as GPTQ/AWQ tools keep their lm_head). MatMul with a constant float32
rank-2 B and a non-constant A; Gemm with transA = 0 and a
bias C that is a constant vector (or absent). A weight read by other nodes is quantized once and
shared only when every reader is such a MatMul/Gemm reading it the same way; a weight that is a graph
output, too small (``min_elements``) or excluded by name stays float (a Skip with the reason).
"""

from __future__ import annotations

from typing import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcompress.errors import RecipeError
from onnxcompress.graph.naming import Namer
from onnxcompress.graph.query import (const_value, is_constant, is_graph_io, iter_graphs, iter_nodes, name_matches,
                                      weight_ref)
from onnxcompress.graph.rewrite import disconnect
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.quantize.params import nonfinite_reason
from onnxcompress.recipe import StepConfig, option

__all__ = [
    "BlockQuant",
    "quantize_blocks",
    "hqq_blocks",
    "proto_constant",
    "QuantizeInt4Config",
    "QuantizeInt4Pass",
]

MS_DOMAIN = "com.microsoft"
QMAX = 15  # 4-bit unsigned codes 0..15


# ----------------------------------------------------------------------------------------------
# block quantization math (shared with gptq.py and embed.py)


@dataclass
class BlockQuant:
    """Rows quantized in blocks along the last axis: ``W[r, c] ≈ (q[r, c] − zero[r, b]) · scale[r, b]``.

    ``q`` uint8 codes (0..15 for 4 bits, 0..255 for 8) of shape [R, nb·bs] (padded columns hold the zero code), ``scale``
    float32 [R, nb], ``zero`` uint8 [R, nb]; ``cols`` is the unpadded column count. ``shift`` (float32 [R, nb],
    :func:`hqq_blocks` only) adds a constant per block: ``W[r, c] ≈ (q − zero)·scale + shift[r, b]`` — a zero point
    off the integer grid, which onnxruntime's fast kernels cannot take, kept apart so the codes stay standard.
    """

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    block_size: int
    cols: int
    bits: int = 4
    shift: np.ndarray | None = None

    @property
    def n_blocks(self) -> int:
        return self.scale.shape[1]

    def dequant(self) -> np.ndarray:
        r = self.q.shape[0]
        qb = self.q.reshape(r, self.n_blocks, self.block_size).astype(np.float32)
        w = (qb - self.zero[..., None].astype(np.float32)) * self.scale[..., None]
        if self.shift is not None:
            w = w + self.shift[..., None]
        return w.reshape(r, -1)[:, : self.cols]

    def pack_nibbles(self) -> np.ndarray:
        """uint8[R, nb, bs/2]: two codes per byte, the even column in the low nibble."""
        qb = self.q.reshape(self.q.shape[0], self.n_blocks, self.block_size)
        return (qb[..., 0::2] | (qb[..., 1::2] << 4)).astype(np.uint8)

    def pack_zero_points(self) -> np.ndarray:
        """uint8[R, ceil(nb/2)]: two zero points per byte, the even block in the low nibble."""
        z = self.zero
        if z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
        return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)

    def packed(self) -> tuple[np.ndarray, np.ndarray]:
        """(codes, zero points) as MatMulNBits and GatherBlockQuantized store them: 4 bits two per byte
        (:meth:`pack_nibbles`, :meth:`pack_zero_points`), 8 bits one per byte ([R, nb, bs], [R, nb])."""
        if self.bits == 4:
            return self.pack_nibbles(), self.pack_zero_points()
        return self.q.reshape(self.q.shape[0], self.n_blocks, self.block_size).astype(np.uint8), \
            self.zero.astype(np.uint8)


def _params(wb: np.ndarray, ratio: float, symmetric: bool, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero code per block of ``wb`` [..., bs] for one clipping ratio."""
    qmax, mid = 2**bits - 1, 2 ** (bits - 1)
    if symmetric:
        idx = np.argmax(np.abs(wb), axis=-1)[..., None]
        m = np.take_along_axis(wb, idx, axis=-1)[..., 0]
        s = -m * ratio / mid
        s = np.where(s == 0, 1.0, s)
        return s, np.full(s.shape, float(mid))
    lo = np.minimum(wb.min(axis=-1), 0.0) * ratio
    hi = np.maximum(wb.max(axis=-1), 0.0) * ratio
    s = (hi - lo) / qmax
    s = np.where(s == 0, 1.0, s)
    z = np.clip(np.round(-lo / s), 0, qmax)
    return s, z


def _codes(wb: np.ndarray, s: np.ndarray, z: np.ndarray, bits: int = 4) -> np.ndarray:
    return np.clip(np.round(wb / s[..., None]) + z[..., None], 0, 2**bits - 1)


def _refit(wb: np.ndarray, s: np.ndarray, z: np.ndarray, imp: np.ndarray, symmetric: bool,
           bits: int) -> tuple[np.ndarray, np.ndarray]:
    """One least-squares refit of (scale, zero) to the codes of (s, z): w ≈ s'·(q − z')."""
    q = _codes(wb, s, z, bits)
    tot = imp.sum(axis=-1)
    tot = np.where(tot > 0, tot, 1.0)
    if not symmetric:
        qm = (imp * q).sum(-1) / tot
        wm = (imp * wb).sum(-1) / tot
        var = (imp * (q - qm[..., None]) ** 2).sum(-1)
        a = (imp * (q - qm[..., None]) * (wb - wm[..., None])).sum(-1) / np.where(var > 0, var, 1.0)
        ok = (var > 0) & (a > 0)
        z = np.where(ok, np.clip(np.round(qm - wm / np.where(ok, a, 1.0)), 0, 2**bits - 1), z)
    c = q - z[..., None]
    den = (imp * c * c).sum(-1)
    s2 = (imp * c * wb).sum(-1) / np.where(den > 0, den, 1.0)
    s2 = np.where((den > 0) & (s2 * s > 0), s2, s)
    return s2, z


def choose_block_params(wb: np.ndarray, *, symmetric: bool, grid: int, min_ratio: float,
                        importance: np.ndarray | None = None, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per-block (scale, zero) minimizing Σ importance·(w − ŵ)² over the candidates tried.

    ``wb`` [..., bs]; ``importance`` broadcastable to ``wb`` (None: uniform). Candidates: for each
    clipping ratio, the min–max parameters and one least-squares refit of them to their codes. The
    first candidate is ratio 1.0 (plain round-to-nearest), so the result is never worse than RTN.
    ``grid`` = 1 is exactly RTN (no refit).
    """
    wb = np.asarray(wb, dtype=np.float64)
    imp = np.broadcast_to(np.ones(1) if importance is None else importance, wb.shape)
    ratios = np.linspace(1.0, min_ratio, grid) if grid > 1 else np.array([1.0])
    best_s = best_z = best_err = None
    for r in ratios:
        s0, z0 = _params(wb, float(r), symmetric, bits)
        cands = [(s0, z0)] if grid == 1 else [(s0, z0), _refit(wb, s0, z0, imp, symmetric, bits)]
        for s, z in cands:
            err = (imp * (wb - (_codes(wb, s, z, bits) - z[..., None]) * s[..., None]) ** 2).sum(axis=-1)
            if best_err is None:
                best_s, best_z, best_err = s, z, err
                continue
            better = err < best_err
            best_s = np.where(better, s, best_s)
            best_z = np.where(better, z, best_z)
            best_err = np.where(better, err, best_err)
    return best_s, best_z


#: the importance, relative to the mean of the others, of a feature the calibration data never activates
DEAD_FEATURE_WEIGHT = 1e-2


def with_dead_floor(importance: np.ndarray) -> np.ndarray:
    """``importance`` (E[x_k²] or diag H per input feature) where the features never active in the
    calibration data (importance 0) weigh :data:`DEAD_FEATURE_WEIGHT` of the mean live importance.

    With weight 0 a block's scale search ignores their weights and may clip them arbitrarily, which
    costs nothing on the calibration data and changes the answer for every input that does use them
    (a digit image's border pixels under noise). A small weight keeps them within the block's grid
    while the live features still decide the scale."""
    imp = np.asarray(importance, np.float64)
    live = imp[imp > 0]
    return np.where(imp > 0, imp, DEAD_FEATURE_WEIGHT * float(live.mean()) if live.size else 1.0)


def _blocked(w: np.ndarray, block_size: int) -> np.ndarray:
    """``w`` [R, C] as [R, nb, block_size] blocks along its columns, the last one padded with zeros."""
    r, c = w.shape
    nb = -(-c // block_size)
    if nb * block_size != c:
        w = np.concatenate([w, np.zeros((r, nb * block_size - c), w.dtype)], axis=1)
    return w.reshape(r, nb, block_size)


def quantize_blocks(w_rows: np.ndarray, block_size: int, *, symmetric: bool = False, grid: int = 1,
                    min_ratio: float = 0.5, importance: np.ndarray | None = None, bits: int = 4) -> BlockQuant:
    """Quantize ``w_rows`` [R, C] to ``bits`` (4 or 8) in blocks of ``block_size`` columns.

    ``grid`` = 1 is round-to-nearest; more tries clipping ratios down to ``min_ratio``.
    ``importance`` [C] weights the per-column reconstruction error (e.g. E[x_c²]).
    """
    r, c = np.shape(w_rows)
    wb = _blocked(np.asarray(w_rows, dtype=np.float64), block_size)
    nb = wb.shape[1]
    pad = nb * block_size - c
    imp = None
    if importance is not None:
        imp = np.concatenate([np.asarray(importance, np.float64), np.zeros(pad)]).reshape(1, nb, block_size)
    s, z = choose_block_params(wb, symmetric=symmetric, grid=grid, min_ratio=min_ratio, importance=imp, bits=bits)
    q = _codes(wb, s, z, bits).astype(np.uint8).reshape(r, -1)
    if pad:  # padded columns decode to exactly 0
        q[:, c:] = np.repeat(z.astype(np.uint8), block_size, axis=1)[:, c:]
    return BlockQuant(q, s.astype(np.float32), z.astype(np.uint8), block_size, c, bits)


#: HQQ's settings (Badri & Shaji 2023, as onnxruntime's HQQWeightOnlyQuantizer uses them): the error norm p,
#: the penalty β and its growth κ per round, the rounds
HQQ_P, HQQ_BETA, HQQ_KAPPA, HQQ_ITERS = 0.7, 10.0, 1.01, 20
#: the smallest block size at which ``auto`` uses hqq without data (below it: rtn; see the module docstring)
HQQ_MIN_BLOCK = 64
HQQ_CHUNK = 1 << 20  # weight elements per chunk of rows (bounds the temporaries)


def hqq_blocks(w_rows: np.ndarray, block_size: int, *, iters: int = HQQ_ITERS, p: float = HQQ_P,
               beta: float = HQQ_BETA, kappa: float = HQQ_KAPPA) -> BlockQuant:
    """Half-quadratic quantization (HQQ) of ``w_rows`` [R, C] to 4 bits in blocks of ``block_size`` columns.

    The scale is the block's min–max one, s = (max − min)/15; the zero point z is optimized, as a real
    number, for the ℓp error (p < 1) of the block, min_z ‖w − s·(q(z) − z)‖_p^p with
    q(z) = clip(round(w/s + z), 0, 15). Half-quadratic splitting adds an auxiliary error e and
    alternates, starting from z = −min/s::

        q = clip(round(w/s + z), 0, 15);   r = w − s·(q − z)
        e = sign(r)·max(|r| − |r|^(p−1)/β, 0)            (the ℓp proximal step: shrink r)
        z = mean_block(q − (w − e)/s);     β ← κ·β

    keeping each block's z with the lowest mean |w − ŵ| seen (the start included). Padded columns take
    no part; float32 throughout, as onnxruntime's implementation.

    *What does the work.* The shrink step moves a residual only where |r| > β^(−1/(2−p)) ≈ 0.17 in
    weight units (it is not scale-invariant, as in the reference implementation). Trained layers'
    rounding errors are smaller: on every MatMul/Gemm weight of the digits models e ≡ 0 (the result is
    bit for bit that of β → 0, at blocks 32–128), so the iteration is z ← mean_block(q(z) − w/s): each block's mean rounding error driven to zero by
    a zero point off the integer grid, keeping the z of lowest mean |error|. That is where the
    measured gains come from.

    A real z = z₀ + f (z₀ = clip(round(z), 0, 15) the stored integer zero point) decodes as
    (q − z₀)·s + shift with shift = −f·s per block (:attr:`BlockQuant.shift`), which the pass adds as
    Σ_b (Σ_{k∈b} x_k)·shift[n, b] after the integer kernel: onnxruntime's MatMulNBits takes a float zero
    point too, but then leaves its integer kernels for a float path many times slower
    (``bench/int4_zero_points.py``).

    Measured (``bench/int4_block_sizes.py``, blocks 64 and 128, levels 0 and 4): against plain
    round-to-nearest the digits transformer's held-out logit MSE is 1.5–1.9× lower; the digits MLP's is
    1.2–1.3× higher, at an accuracy not significantly different from either's (docs/benchmarks.md).
    """
    w_all = np.ascontiguousarray(w_rows, dtype=np.float32)  # float32 sums depend on the layout: one layout
    r, c = w_all.shape
    nb = -(-c // block_size)
    pad = nb * block_size - c
    q_out = np.empty((r, nb * block_size), np.uint8)
    s_out, z_out, f_out = (np.empty((r, nb), np.float32) for _ in range(3))
    live = np.ones((1, nb, block_size), np.float32)
    live[..., -1, block_size - pad:] = 0  # the ragged last block's padding

    def mean(x):  # over each block's live columns
        return (x * live).sum(-1) / live.sum(-1) if pad else x.mean(-1)

    step = max(1, HQQ_CHUNK // max(nb * block_size, 1))
    for r0 in range(0, r, step):
        wb = _blocked(w_all[r0:r0 + step], block_size)
        lo = np.where(live > 0, wb, np.inf).min(-1)
        hi = np.where(live > 0, wb, -np.inf).max(-1)
        s = (hi - lo) / np.float32(QMAX)
        s = np.where(s > 0, s, np.float32(1.0))
        wi = wb / s[..., None]  # the weights in quantization steps: q = clip(round(wi + z))
        z = -lo / s
        q = np.clip(np.round(wi + z[..., None]), 0, QMAX)
        res = wi - (q - z[..., None])  # the error in steps (× s: in weight units)
        best_z, best = z, mean(np.abs(res))
        b = beta
        for _ in range(iters):
            rw = res * s[..., None]
            a = np.abs(rw)
            e = np.sign(rw) * np.maximum(a - np.power(a + np.float32(1e-8), np.float32(p - 1)) / np.float32(b), 0)
            z = mean(q - wi + e / s[..., None])
            b *= kappa
            q = np.clip(np.round(wi + z[..., None]), 0, QMAX)
            res = wi - (q - z[..., None])
            err = mean(np.abs(res))  # per block, in steps: s is the block's throughout
            better = err < best
            best_z, best = np.where(better, z, best_z), np.where(better, err, best)
        z0 = np.clip(np.round(best_z), 0, QMAX)
        q = np.clip(np.round(wi + best_z[..., None]), 0, QMAX)
        q = np.where(live > 0, q, z0[..., None])  # padded columns: the zero code
        q_out[r0:r0 + step] = q.astype(np.uint8).reshape(len(wb), -1)
        s_out[r0:r0 + step], z_out[r0:r0 + step] = s, z0
        f_out[r0:r0 + step] = -(best_z - z0) * s
    return BlockQuant(q_out, s_out, z_out.astype(np.uint8), block_size, c, 4, shift=f_out)


def proto_constant(name: str, array: np.ndarray) -> gs.Constant:
    """A graphsurgeon constant from any array onnx can store (int4, uint4, bfloat16 included)."""
    return gs.Constant(name, LazyValues(onnx.numpy_helper.from_array(array, name)))


def matches_any(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name_matches(name, p) for p in patterns)


# ----------------------------------------------------------------------------------------------
# the pass


@dataclass(frozen=True)
class QuantizeInt4Config(StepConfig):
    name = "quantize_int4"
    order = 60
    flag_help = "4-bit block-wise weights for MatMul/Gemm"

    block_size: int = option(32, "4-bit block size along the input features", flag="--int4-block-size",
                             choices=(16, 32, 64, 128, 256))
    format: str = option("matmulnbits", "matmulnbits (com.microsoft::MatMulNBits, fast on onnxruntime) or qdq "
                         "(portable blocked DequantizeLinear int4, opset >= 21; embedding tables follow "
                         "--embed-format: add --embed-format decode for standard ops only)", flag="--int4-format",
                         choices=("matmulnbits", "qdq"))
    method: str = option("auto", "rounding: rtn (round to nearest), hqq (half-quadratic zero-point optimization, "
                         "data-free, asymmetric blocks), search (per-block clipping search), gptq (error feedback, "
                         "needs calibration data), auto (gptq with data, else hqq; rtn for symmetric blocks)",
                         flag="--int4-method", choices=("auto", "rtn", "hqq", "search", "gptq"))
    symmetric: bool = option(False, "symmetric blocks (zero point 8, no zero-point tensor) instead of "
                             "asymmetric ones with explicit 4-bit zero points", flag="--int4-symmetric")
    accuracy_level: int = option(4, "MatMulNBits accuracy_level: 4 = int8 activations inside the kernel (fast), "
                                 "0 = float activations (exact, slower than fp32)", flag="--int4-accuracy-level",
                                 choices=(0, 1, 2, 3, 4))
    search_grid: int = option(24, "clipping ratios tried per block by search and gptq", minimum=1, maximum=200)
    search_min_ratio: float = option(0.55, "smallest clipping ratio tried", minimum=0.05, maximum=1.0)
    gptq_damp: float = option(0.01, "GPTQ damping, as a fraction of the Hessian's mean diagonal",
                              flag="--gptq-damp", minimum=0.0, maximum=1.0)
    gptq_min_rows: float = option(2.0, "GPTQ needs at least this many activation rows per input feature "
                                  "(fewer: XᵀX is rank-deficient and GPTQ overfits; the layer uses the "
                                  "activation-weighted search instead)", minimum=0.0)
    calib_samples: int = option(256, "calibration samples used for activation statistics (gptq, search)",
                                minimum=1)
    min_elements: int = option(256, "weights with fewer elements stay float", minimum=0)
    exclude: tuple[str, ...] = option((), "node-name patterns (fnmatch) kept in float", flag="--int4-exclude",
                                      metavar="PATTERNS")
    keep_last: bool = option(True, "keep the output layer (a MatMul/Gemm from which a graph output is reached "
                             "without another MatMul/Gemm/Conv: a classifier, an lm_head) in float, as GPTQ/AWQ "
                             "tools do, when it is small (keep_last_max_share)", flag="--int4-keep-last")
    keep_last_max_share: float = option(0.1, "keep_last applies only to output layers holding at most this share of "
                                        "the weight elements of all layers (MatMul, Gemm, Conv): a large output "
                                        "layer is where the bytes are",
                                        minimum=0.0, maximum=1.0)
    first_bits: int = option(8, "bits of the input layer (the MatMul/Gemm layers whose input depends on no other "
                             "layer: they read the pixels or embeddings) when it is small (first_max_share); "
                             "4 = like every other layer", flag="--int4-first-bits", choices=(4, 8))
    first_max_share: float = option(0.25, "first_bits applies only when the input layers hold at most this share of "
                                    "the weight elements of all layers (MatMul, Gemm, Conv)", minimum=0.0, maximum=1.0)

    def validate(self) -> None:
        if self.method == "hqq" and self.symmetric:
            raise RecipeError("--int4-method hqq optimizes each block's zero point, and symmetric blocks have none",
                              where="recipe, quantize_int4", hint="drop --int4-symmetric or use --int4-method rtn")


@dataclass
class _Target:
    """One MatMul/Gemm whose weight W[K, N] (MatMul orientation) gets quantized.

    The weight is read when first needed and let go by :meth:`release`, so a pass over a model in
    external data holds one layer's floats at a time, not the whole model."""

    node: gs.Node
    graph: gs.Graph
    load: Callable[[], np.ndarray]  # -> [K, N] float (alpha folded)
    bias: np.ndarray | None  # [N] float (beta·C) for Gemm
    weight: gs.Tensor
    _w: np.ndarray | None = None
    bits: int = 4  # 8 for the input layer (first_bits)

    @property
    def w(self) -> np.ndarray:
        if self._w is None:
            self._w = self.load()
        return self._w

    def release(self) -> None:
        self._w = None


def _check_target(node: gs.Node, graph: gs.Graph, cfg: QuantizeInt4Config) -> tuple[_Target | None, str]:
    """May I? Returns the target or a reason why not."""
    if matches_any(node.name or "", cfg.exclude):
        return None, "excluded by name"
    if len(node.inputs) < 2 or not node.inputs[0].name:
        return None, "missing inputs"
    a, b = node.inputs[0], node.inputs[1]
    if is_constant(a):
        return None, "input A is a constant (fold it instead)"
    if not is_constant(b):
        return None, "weight B is not a constant"
    ref = weight_ref(b, graph)
    if ref is None:
        return None, "weight B is not a tensor constant"
    if ref.dtype != np.float32:
        return None, f"weight dtype {ref.dtype} is not float32"
    if len(ref.shape) != 2:
        return None, f"weight has rank {len(ref.shape)}, MatMulNBits needs a 2-D weight"
    if ref.size < cfg.min_elements:
        return None, f"weight has {ref.size} elements (< min_elements {cfg.min_elements})"
    if a.dtype is not None and np.dtype(a.dtype) != np.float32:
        return None, f"activation dtype {np.dtype(a.dtype)} is not float32"
    if a.shape is not None and len(a.shape) < 2:
        return None, "activation is 1-D"
    trans, alpha = False, np.float32(1.0)
    n_out = ref.shape[1]
    bias = None
    if node.op == "Gemm":
        at = node.attrs
        if int(at.get("transA", 0)):
            return None, "Gemm with transA=1"
        trans = bool(int(at.get("transB", 0)))
        n_out = ref.shape[0] if trans else ref.shape[1]
        alpha = np.float32(at.get("alpha", 1.0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = const_value(node.inputs[2])
            if c is None:
                return None, "Gemm bias C is not a constant"
            c = np.asarray(c, np.float32) * np.float32(at.get("beta", 1.0))
            if c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1):
                return None, f"Gemm bias C of shape {list(c.shape)} is not a vector over N"
            bias = np.broadcast_to(c.reshape(-1), (n_out,)).astype(np.float32).copy()

    def load() -> np.ndarray:
        w = np.asarray(ref.values, dtype=np.float32)
        w = w.T if trans else w
        return np.ascontiguousarray(w * alpha if alpha != 1 else w)

    return _Target(node, graph, load, bias, b), ""


_LAYER_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulNBits", "MatMulInteger")


def _weight_elements(node: gs.Node) -> int:
    if node.op == "MatMulNBits":  # packed codes: count the weight it stands for
        return int(node.attrs.get("K", 0)) * int(node.attrs.get("N", 0))
    w = node.inputs[1] if len(node.inputs) > 1 else None
    ref = weight_ref(w, None) if w is not None else None
    return ref.size if ref is not None else 0


def layer_weight_elements(graph: gs.Graph) -> int:
    """Weight elements of all layers (MatMul, Gemm, Conv ..., MatMulNBits as its K·N) in the graph and
    its subgraphs: the whole against which the input and output layer rules measure a share."""
    return sum(_weight_elements(n) for n, _ in iter_nodes(graph) if n.op in _LAYER_OPS)


def output_layers(graph: gs.Graph, max_share: float = 1.0) -> set[int]:
    """ids of the MatMul/Gemm nodes from which an output of their (sub)graph is reached without
    passing another layer (MatMul, Gemm, Conv ...) — and whose output feeds no other layer at all (a
    residual stream reaches the graph output from every block; those blocks are not output layers) —
    that hold at most ``max_share`` of the weight elements of all layers."""
    total = layer_weight_elements(graph)
    found: set[int] = set()
    for g in iter_graphs(graph):
        for p in _reach(g.outputs, lambda n: n.op in _LAYER_OPS):
            if p.op in ("MatMul", "Gemm") and _weight_elements(p) <= max_share * total and not _feeds_a_layer(p):
                found.add(id(p))
    return found


def _reach(tensors, stop: Callable[[gs.Node], bool], *, down: bool = False):
    """The nodes that compute ``tensors`` (``down``: that read them), each once, walking on through
    their inputs (outputs); a node for which ``stop(node)`` holds is yielded but not walked past."""
    seen: set[int] = set()
    stack = list(tensors)
    while stack:
        t = stack.pop()
        for p in (t.outputs if down else t.inputs):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield p
            if not stop(p):
                stack.extend(p.outputs if down else (x for x in p.inputs if not isinstance(x, gs.Constant)))


def _feeds_a_layer(node: gs.Node) -> bool:
    """True when some path from ``node``'s outputs reaches another layer."""
    return any(c.op in _LAYER_OPS for c in _reach(node.outputs, lambda c: c.op in _LAYER_OPS, down=True))


def input_layers(graph: gs.Graph, max_share: float = 1.0) -> set[int]:
    """ids of the MatMul/Gemm nodes whose input A depends on no other layer (MatMul, Gemm, Conv ...):
    the layers that read the graph inputs through plain ops only (pixels, embedding lookups, LayerNorm,
    reshapes) — empty when together they hold more than ``max_share`` of the weight elements of all
    layers. A node with subgraphs (If, Loop) on the way counts as a layer."""
    total = layer_weight_elements(graph)
    found = [n for n, _ in iter_nodes(graph) if n.op in ("MatMul", "Gemm") and _weight_elements(n)
             and n.inputs and not _reads_a_layer(n.inputs[0])]
    if sum(_weight_elements(n) for n in found) > max_share * total:
        return set()
    return {id(n) for n in found}


def _reads_a_layer(tensor: gs.Tensor) -> bool:
    """True when ``tensor`` is computed from the output of some layer (or of a node with subgraphs)."""
    def layer(n: gs.Node) -> bool:
        return n.op in _LAYER_OPS or any(isinstance(v, gs.Graph) or (isinstance(v, list) and v
                                                                   and isinstance(v[0], gs.Graph))
                                         for v in n.attrs.values())
    return any(layer(p) for p in _reach([tensor], layer))


def _nothing_quantized(graph: gs.Graph, res: PassResult) -> str:
    """The summary line when no layer was quantized: the distinct reasons the layers were skipped for,
    and where the weights are when they sit in Conv layers (which 4-bit blocks do not cover)."""
    reasons = sorted({s.reason for s in res.skipped})
    text = "quantize_int4: no layer was quantized" + (f" ({'; '.join(reasons)})" if reasons else "")
    conv = sum(_weight_elements(n) for n, _ in iter_nodes(graph) if n.op in ("Conv", "ConvTranspose"))
    if conv:
        text += (f"; 4-bit blocks cover MatMul/Gemm only, and {100 * conv / max(layer_weight_elements(graph), 1):.0f}% "
                 "of this model's layer weights are in Conv layers; --storage int4 stores those in 4 bits (size "
                 "only, fp32 speed)")
    return text


_FREE_NAMES = {"hqq": "half-quadratic zero points (hqq)", "rtn": "round-to-nearest"}


def _hqq_reason(t: _Target, cfg: QuantizeInt4Config, rank: Callable[[gs.Tensor], int | None]) -> str:
    """May this layer take hqq's off-grid zero points? They are added back as a sum of the input over
    each block (:meth:`QuantizeInt4Pass._add_shift`): one block per column needs nothing more; several
    need the input reshaped into blocks, so its rank must be known (for every reader of a shared weight)."""
    if t.w.shape[0] <= cfg.block_size:
        return ""
    for reader in t.weight.outputs:  # a shared weight's shift serves every reader
        if rank(reader.inputs[0]) is None:
            return "the rank of its input is unknown" if reader is t.node else \
                f"the rank of the input of {reader.op} {reader.name!r}, which shares its weight, is unknown"
    return ""


def _rel_error(bq: BlockQuant, w: np.ndarray) -> float:
    """‖Ŵ − W‖ / ‖W‖ for the report, in float32 with one temporary; scaled by max|W| first when a
    float32 sum of squares could overflow (weights beyond ~1e15)."""
    d = bq.dequant().T
    d -= w
    m = float(np.max(np.abs(w), initial=0.0))
    if m > 1e15:
        d /= np.float32(m)
        return float(np.linalg.norm(d) / max(float(np.linalg.norm(w / np.float32(m))), 1e-30))
    return float(np.linalg.norm(d) / max(float(np.linalg.norm(w)), 1e-30))


def _orientation(node: gs.Node) -> str:
    return "T" if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else "N"


def _shared_reason(weight: gs.Tensor, graph: gs.Graph, node: gs.Node) -> str:
    """Why a weight read by several nodes cannot be replaced ('' when all readers agree)."""
    if is_graph_io(weight, graph):
        return "the weight is a graph output"
    here = {id(n) for n in graph.nodes}
    for c in weight.outputs:
        if c is node:
            continue
        if id(c) not in here:
            return f"the weight is also read by {c.op} {c.name!r} in another (sub)graph"
        if c.op not in ("MatMul", "Gemm") or c.inputs[1] is not weight or c.inputs[0] is weight:
            return f"the weight is also read by {c.op} {c.name!r}"
        if _orientation(c) != _orientation(node) or (c.op == "Gemm" and float(c.attrs.get("alpha", 1.0)) !=
                                                       float(node.attrs.get("alpha", 1.0))):
            return f"the weight is also read by {c.op} {c.name!r} with another layout or alpha"
    return ""


class QuantizeInt4Pass(Pass):
    config_cls = QuantizeInt4Config
    lossless = False

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        cfg: QuantizeInt4Config = self.config
        res = PassResult()
        self.note_unmatched(ctx, graph, "exclude")
        namer = Namer.for_graph(graph)
        targets: list[_Target] = []
        last = output_layers(graph, cfg.keep_last_max_share) if cfg.keep_last else set()
        first = input_layers(graph, cfg.first_max_share) if cfg.first_bits != 4 else set()
        for node, g in iter_nodes(graph):
            if node.op not in ("MatMul", "Gemm") or (node.domain or "") not in ("", "ai.onnx"):
                continue
            if id(node) in last:
                res.skip(node.name or node.op, "int4", "the output layer stays float (keep_last)")
                continue
            t, reason = _check_target(node, g, cfg)
            if t is None:
                res.skip(node.name or node.op, "int4", reason)
                continue
            shared = _shared_reason(t.weight, g, node)
            if shared:
                res.skip(node.name or node.op, "int4", shared)
                continue
            if cfg.format == "qdq" and (graph.opset or 0) < 21:
                res.skip(node.name or node.op, "int4", f"the portable qdq form needs opset >= 21 and the model has "
                         f"{graph.opset}; use format=matmulnbits or convert the model "
                         "(onnx.version_converter.convert_version(model, 21))")
                continue
            t.bits = cfg.first_bits if id(node) in first else 4
            targets.append(t)
        # a weight whose other readers stay float (keep_last, exclude, min_elements ...) would be stored
        # twice: its readers stay float together
        chosen = {id(t.node) for t in targets}
        for t in list(targets):
            left = [c for c in t.weight.outputs if id(c) not in chosen]
            if left:
                res.skip(t.node.name or t.node.op, "int4", f"the weight is also read by {left[0].op} "
                         f"{left[0].name!r}, which stays float: quantizing would store it twice")
                targets.remove(t)
        if not targets:
            res.details = {"layers": [], "format": cfg.format}
            if ctx is not None:
                ctx.note(_nothing_quantized(graph, res))
            return res

        method = cfg.method
        stats = None
        free = "hqq" if not cfg.symmetric and cfg.block_size >= HQQ_MIN_BLOCK else "rtn"  # the data-free default
        if method in ("auto", "gptq", "search"):
            from onnxcompress.quantize.gptq import collect_input_stats

            stats = collect_input_stats(graph, ctx, [t.node for t in targets], full=method in ("auto", "gptq"),
                                        max_samples=cfg.calib_samples)
            if stats is None and method == "gptq":
                ctx.note(f"quantize_int4: gptq needs calibration data (--calib-data); used {_FREE_NAMES[free]} "
                         "(the data-free default) instead")
            if method in ("auto", "gptq"):
                method = "gptq" if stats is not None else free
            if cfg.method == "auto" and stats is None and ctx is not None:
                ctx.note(f"quantize_int4: no calibration data, so {_FREE_NAMES[free]}; give calibration data "
                         "(--calib-data) for GPTQ, which compensates each layer's rounding error on it")

        from onnxcompress.fuse.patterns import RuleContext, infer_ranks

        hqq_possible = method == "hqq" or (method == "gptq" and free == "hqq")  # gptq: layers without statistics
        # ranks from shape inference, for hqq layers whose input has no shape (before the first rewrite)
        ranks = infer_ranks(graph) if hqq_possible and any(t.node.inputs[0].shape is None for t in targets) else {}
        self._rc = RuleContext(namer, ranks, graph.opset or 0)
        self._free = free
        self._shifts: dict[int, gs.Constant] = {}  # weight -> its hqq shift constant (one per shared weight)
        layers = []
        done: dict[int, tuple[BlockQuant, list, str, float]] = {}  # weight -> (codes, constants, first node, error)
        for t in targets:
            node_name = t.node.name or t.node.op
            first = done.get(id(t.weight))
            readers = len(t.weight.outputs)  # before emit() rewires this node away from the weight
            if first is None:
                bad = nonfinite_reason(t.w)  # read here, where the weight is loaded anyway
                bq, used, declined = self._quantize(t, method, stats) if bad is None else (None, "", "")
                if bad is None and not np.all(np.isfinite(bq.scale)):
                    bad = "its weight's range overflows float32 in a block's scale"
                if bad is not None:
                    res.skip(node_name, "int4", bad)
                    t.release()
                    continue
                err = _rel_error(bq, t.w)
            else:
                bq, used, declined, err = first[0], "shared", "", first[3]
            fmt = cfg.format
            if fmt == "matmulnbits" and bq.bits != 4 and cfg.accuracy_level != 4:
                fmt = "decode"  # onnxruntime's 8-bit kernel is slow without int8 activations
            emit = {"matmulnbits": self._emit_nbits, "qdq": self._emit_qdq, "decode": self._emit_decoded}[fmt]
            consts = emit(t, bq, namer, cfg, first[1] if first is not None else None)
            if first is None and readers > 1:  # keep the codes only while other readers need them
                done[id(t.weight)] = (bq, consts, node_name, err)
            entry = {"node": node_name, "op": t.node.op, "weight": t.weight.name, "K": int(t.w.shape[0]),
                     "N": int(t.w.shape[1]), "bits": bq.bits, "block_size": cfg.block_size, "method": used,
                     "format": fmt, "symmetric": cfg.symmetric,
                     "rel_error": round(err, 6)}
            if first is not None:
                entry["shared_with"] = first[2]
            if declined:
                entry["hqq_declined"] = declined
            layers.append(entry)
            t.release()
            res.changed(f"{node_name}: {t.node.op} {entry['K']}x{entry['N']} -> int{bq.bits} {entry['format']} "
                        f"(block {cfg.block_size}, {used}, rel. error {err:.4f})")
        res.details = {"format": cfg.format, "block_size": cfg.block_size, "accuracy_level": cfg.accuracy_level,
                       "method": method, "symmetric": cfg.symmetric, "layers": layers}
        declined = [f"{e['node']} ({e['hqq_declined']})" for e in layers if "hqq_declined" in e]
        if declined and ctx is not None:
            ctx.note(f"quantize_int4: round-to-nearest instead of hqq for {len(declined)} layer(s): "
                     + "; ".join(declined[:5]) + (" ..." if len(declined) > 5 else ""))
        if cfg.format == "qdq":
            ctx.note("quantize_int4: the portable qdq form: onnxruntime with graph optimizations on fuses each "
                     "DequantizeLinear + MatMul into its MatMulNBits at accuracy level 4 (int8 activations: "
                     "--int4-accuracy-level does not apply to this form); with them off it dequantizes at every "
                     "inference (slower than fp32); format=matmulnbits sets the kernel and its level explicitly")
        return res

    def _quantize(self, t: _Target, method: str, stats) -> tuple[BlockQuant, str, str]:
        """(codes, the method used, why hqq was declined for this layer or "")."""
        cfg = self.config
        wt = t.w.T  # [N, K]: rows = output columns, blocks along K
        if t.bits != 4:  # the input layer: at 256 levels the clipping search gains nothing measurable
            return quantize_blocks(wt, cfg.block_size, symmetric=cfg.symmetric, bits=t.bits), "rtn", ""
        st = stats.get(id(t.node)) if stats is not None else None
        if method == "gptq" and st is not None and st.hessian is not None and st.rows >= cfg.gptq_min_rows * len(wt[0]):
            from onnxcompress.quantize.gptq import gptq_quantize

            return gptq_quantize(wt, st.hessian, cfg.block_size, symmetric=cfg.symmetric, grid=cfg.search_grid,
                                 min_ratio=cfg.search_min_ratio, damp=cfg.gptq_damp), "gptq", ""
        if method == "gptq" and st is None:  # no statistics (a layer in a subgraph): the data-free default
            method = self._free
        why = ""
        if method == "hqq":
            why = _hqq_reason(t, cfg, self._rc.rank)
            if not why:
                return hqq_blocks(wt, cfg.block_size), "hqq", ""
            method = "rtn"
        if method == "rtn":
            return quantize_blocks(wt, cfg.block_size, symmetric=cfg.symmetric), "rtn", why
        imp = with_dead_floor(st.mean_square) if st is not None else None
        used = "search+act" if imp is not None else "search"
        return quantize_blocks(wt, cfg.block_size, symmetric=cfg.symmetric, grid=cfg.search_grid,
                               min_ratio=cfg.search_min_ratio, importance=imp), used, ""

    def _emit_nbits(self, t: _Target, bq: BlockQuant, namer: Namer, cfg: QuantizeInt4Config,
                    shared: list | None) -> list:
        """Replace the node by MatMulNBits [-> the hqq shift]; return the constants (B, scales[, zero points])."""
        node, g = t.node, t.graph
        base = t.weight.name
        if shared is not None:
            consts = shared
        else:
            codes, zero_points = bq.packed()
            consts = [proto_constant(namer.fresh(base, f"q{bq.bits}"), codes),
                      gs.Constant(namer.fresh(base, "scales"), bq.scale.astype(np.float32))]
            if not cfg.symmetric:
                consts.append(gs.Constant(namer.fresh(base, "zero_points"), zero_points))
        inputs = [node.inputs[0], *consts]
        if t.bias is not None:
            if cfg.symmetric:
                inputs.append(gs.Variable(""))
            inputs += [gs.Variable(""), gs.Constant(namer.fresh(base, "bias"), t.bias)]
        outs = list(node.outputs)
        name = node.name
        disconnect(node)
        outs = self._add_shift(t, bq, inputs[0], outs, "matmulnbits")
        k, n = t.w.shape
        new = gs.Node("MatMulNBits", name=namer.fresh(name or base, "nbits") if not name else name,
                      domain=MS_DOMAIN, inputs=inputs, outputs=outs,
                      attrs={"K": int(k), "N": int(n), "bits": int(bq.bits), "block_size": int(cfg.block_size),
                             "accuracy_level": int(cfg.accuracy_level)})
        g.nodes.append(new)
        return consts

    def _emit_qdq(self, t: _Target, bq: BlockQuant, namer: Namer, cfg: QuantizeInt4Config,
                  shared: list | None) -> list:
        """Replace the node by DequantizeLinear(int4|int8) -> MatMul [-> Add] [-> the hqq shift]; return
        [dequantized tensor]."""
        base = t.weight.name
        k, n = t.w.shape
        if shared is not None:
            deq = shared[0]
        else:
            codes = bq.q[:, :k].T  # [K, N]
            scale = np.ascontiguousarray(bq.scale.T)  # [nb, N]
            signed, unsigned = (ml_dtypes.int4, ml_dtypes.uint4) if bq.bits == 4 else (np.int8, np.uint8)
            if cfg.symmetric:
                mid = 2 ** (bq.bits - 1)
                x = proto_constant(namer.fresh(base, f"int{bq.bits}"), (codes.astype(np.int16) - mid).astype(signed))
                dq_in = [x, gs.Constant(namer.fresh(base, "scale"), scale)]
            else:
                x = proto_constant(namer.fresh(base, f"uint{bq.bits}"), codes.astype(unsigned))
                zp = proto_constant(namer.fresh(base, "zero_point"), np.ascontiguousarray(bq.zero.T).astype(unsigned))
                dq_in = [x, gs.Constant(namer.fresh(base, "scale"), scale), zp]
            deq = gs.Variable(namer.fresh(base, "dequantized"), dtype=np.float32, shape=[k, n])
            t.graph.nodes.append(gs.Node("DequantizeLinear", name=namer.fresh(base, "DequantizeLinear"), inputs=dq_in,
                                         outputs=[deq], attrs={"axis": 0, "block_size": int(cfg.block_size)}))
        self._replace_by_matmul(t, bq, deq, namer, "qdq")
        return [deq]

    def _emit_decoded(self, t: _Target, bq: BlockQuant, namer: Namer, cfg: QuantizeInt4Config,
                      shared: list | None) -> list:
        """Replace the node by MatMul(A, Transpose(decode(codes))) [-> Add]: the plain-op decode chain of
        :func:`onnxcompress.quantize.embed.decode_blocks`, folded by onnxruntime at load (exact, fp32
        speed). Used for 8-bit layers below accuracy_level 4; returns [the decoded W[K, N]]."""
        from onnxcompress.quantize.embed import decode_blocks

        base = t.weight.name
        k, n = t.w.shape
        if shared is not None:
            w = shared[0]
        else:
            rows = decode_blocks(t.graph, bq, bq.bits, namer, base, self._rc.opset)  # [N, K]
            w = gs.Variable(namer.fresh(base, "decoded_t"), dtype=np.float32, shape=[k, n])
            t.graph.nodes.append(gs.Node("Transpose", name=namer.fresh(base, "Transpose"), inputs=[rows],
                                         outputs=[w], attrs={"perm": [1, 0]}))
        self._replace_by_matmul(t, bq, w, namer, "decode")
        return [w]

    def _replace_by_matmul(self, t: _Target, bq: BlockQuant, w: gs.Tensor, namer: Namer, form: str) -> None:
        """Replace ``t.node`` by MatMul(A, w) [-> Add(bias)] [-> the hqq shift] writing the node's outputs."""
        node, g = t.node, t.graph
        outs = list(node.outputs)
        a = node.inputs[0]
        name = node.name or namer.fresh(t.weight.name, "MatMul")
        disconnect(node)
        outs = self._add_shift(t, bq, a, outs, form)
        if t.bias is None:
            g.nodes.append(gs.Node("MatMul", name=name, inputs=[a, w], outputs=outs))
            return
        mm = gs.Variable(namer.fresh(t.weight.name, "matmul"), dtype=np.float32)
        g.nodes.append(gs.Node("MatMul", name=name, inputs=[a, w], outputs=[mm]))
        g.nodes.append(gs.Node("Add", name=namer.fresh(name, "bias"), inputs=[mm, gs.Constant(
            namer.fresh(t.weight.name, "bias"), t.bias)], outputs=outs))

    def _add_shift(self, t: _Target, bq: BlockQuant, x: gs.Tensor, outs: list, form: str) -> list:
        """Add hqq's per-block shift: y = y_int + Σ_b (Σ_{k∈b} x_k) · shift[n, b].

        With one block per column that is ReduceSum(x, -1, keepdims) @ shiftᵀ[1, N]; with nb blocks,
        ReduceSum(Reshape(x, [..., nb, bs]), -1) @ shiftᵀ[nb, N] (x zero-padded to nb·bs first when K
        is not a multiple of the block). The product is ``com.microsoft::FusedMatMul`` next to
        MatMulNBits (onnxruntime runs it as a MatMul) and ``Einsum`` in the portable form: not a
        MatMul, so no later pass (storage, weight sharing, int4 or fuse on a second run) takes the
        shift for a layer's weight and re-encodes it; and the fp16 pass keeps the custom op, like
        MatMulNBits itself, in float32 (a block sum can exceed fp16's range where the activations
        do not). Returns the tensor list the layer itself now writes (``outs`` unchanged when ``bq``
        has no shift). The shift constant is made once per weight (the readers of a shared weight share
        it). ``form``: the layer's emitted form.
        """
        if bq.shift is None:
            return outs
        g, rc, stem = t.graph, self._rc, t.node.name or t.weight.name
        sc = self._shifts.get(id(t.weight))
        if sc is None:
            sc = self._shifts[id(t.weight)] = rc.constant(t.weight.name, "hqq_shift", bq.shift.T.astype(np.float32))

        def op(name: str, inputs: list, suffix: str, domain: str = "", **attrs) -> gs.Variable:
            out = gs.Variable(rc.namer.fresh(stem, suffix), dtype=np.float32)
            rc.node(g, name, stem, inputs, [out], attrs).domain = domain
            return out

        nb, src = bq.n_blocks, x
        if nb > 1:
            rank = rc.rank(x)
            pad = nb * bq.block_size - bq.cols
            if pad:  # a ragged last block: zeros to a whole one
                pads = [0] * (2 * rank - 1) + [pad]  # begins of every axis, then ends: only the last grows
                src = op("Pad", [src, rc.constant(stem, "pads", np.array(pads, np.int64))], "padded") \
                    if rc.opset >= 11 else op("Pad", [src], "padded", pads=pads)
            src = op("Reshape", [src, rc.constant(stem, "blocks_shape", np.array([0] * (rank - 1) + [nb, bq.block_size],
                                                                             np.int64))], "blocks")
        keep = int(nb == 1)  # [..., 1] or [..., nb]: either way a matrix product with shiftᵀ[nb, N]
        sums = op("ReduceSum", [src, rc.constant(stem, "axes", np.array([-1], np.int64))], "block_sums", keepdims=keep) \
            if rc.opset >= 13 else op("ReduceSum", [src], "block_sums", axes=[-1], keepdims=keep)
        if form == "matmulnbits":  # the model uses com.microsoft already
            corr = op("FusedMatMul", [sums, sc], "hqq_correction", MS_DOMAIN)
        else:
            corr = op("Einsum", [sums, sc], "hqq_correction", equation="...b,bn->...n")
        y_int = gs.Variable(rc.namer.fresh(stem, "int_zero"), dtype=np.float32)
        rc.node(g, "Add", stem, [y_int, corr], outs)
        return [y_int]
