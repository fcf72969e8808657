"""Tolerances: when is a candidate output close enough to the reference?

A :class:`Tolerance` holds up to five criteria; each one that is set and applies to an output must
hold (criteria left ``None`` are not checked):

* **lossless** (``atol`` and/or ``rtol``, a missing one counting as 0):
  ``max|r - c| ≤ atol + rtol · max|r|``. The bound scales with the output's magnitude (a large logit
  tensor may differ in the 6th digit) but does not blow up for outputs near zero the way a per-element
  relative error does.
* **cosine** (``min_cosine``, float outputs): ``cosine(r, c) ≥ min_cosine``.
* **top-1** (``min_top1``, classifier-like float outputs ``(N, C)``, ``C > 1``): top-1 agreement
  ``≥ min_top1``.
* **quantization steps** (``max_steps``): ``max|r - c| / step ≤ max_steps`` where ``step`` is the
  output's quantization step: ``Tolerance.step`` when set, else the step found in the candidate graph
  (an output produced by ``DequantizeLinear`` with a constant scale: the largest scale), and 1 for
  integer outputs (quantized values are already in steps). Where no step is known the criterion does
  not apply.

Integer and bool outputs: the lossless and step criteria apply as above; when neither is set, the
exact-match fraction must be ``≥ min_top1`` (labels, argmax indices) if that is set, and 1 otherwise.

A failure is any criterion that fails, a shape or dtype mismatch, a missing output, or non-finite
values where the reference has other values. A float output to which no criterion applies (only
``min_top1`` on a non-classifier output, say) fails too, rather than pass unchecked.

Presets: :data:`LOSSLESS` for rewrites that should not change numbers (BN folding, merges),
:data:`LOSSY` for approximating techniques (pruning, low-rank), :func:`quantized` for quantization;
:data:`LOSSY_RANDOM` is what ``compress`` applies instead of :data:`LOSSY` when it verifies on random inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnxcompress.errors import RecipeError, did_you_mean
from onnxcompress.verify.metrics import OutputMetrics

__all__ = ["Tolerance", "LOSSLESS", "LOSSY", "LOSSY_RANDOM", "quantized", "policy_for", "POLICIES", "overridden"]


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """Parity criteria; see the module docstring for the rules."""

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None
    max_steps: float | None = None
    step: float | None = None

    def __post_init__(self) -> None:
        for field in ("atol", "rtol", "max_steps", "step"):
            value = getattr(self, field)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise RecipeError(f"tolerance {field} must be a finite number ≥ 0, got {value}", where="tolerance", hint="e.g. atol=1e-5")
        if self.step == 0:
            raise RecipeError("tolerance step must be > 0", where="tolerance", hint="the output's quantization scale")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise RecipeError(f"min_cosine must be in [-1, 1], got {self.min_cosine}", where="tolerance", hint="e.g. 0.98")
        if self.min_top1 is not None and not 0.0 <= self.min_top1 <= 1.0:
            raise RecipeError(f"min_top1 must be in [0, 1], got {self.min_top1}", where="tolerance", hint="e.g. 0.9")
        if all(getattr(self, f) is None for f in ("atol", "rtol", "min_cosine", "min_top1", "max_steps")):
            raise RecipeError(
                "a tolerance needs at least one criterion",
                where="tolerance",
                hint="set atol/rtol, min_cosine, min_top1 or max_steps (or use LOSSLESS / LOSSY)",
            )

    @property
    def is_lossless(self) -> bool:
        """True when the lossless bound ``atol + rtol · max|r|`` is part of this tolerance."""
        return self.atol is not None or self.rtol is not None

    def bound(self, ref_max_abs: float) -> float:
        """The lossless bound ``atol + rtol · max|r|`` (``atol``/``rtol`` unset count as 0)."""
        return (self.atol or 0.0) + (self.rtol or 0.0) * ref_max_abs

    def describe(self) -> str:
        """``"atol=1e-05 rtol=0.0001"``: the criteria that are set."""
        parts = [
            f"{name}={value:g}"
            for name, value in (
                ("atol", self.atol),
                ("rtol", self.rtol),
                ("min_cosine", self.min_cosine),
                ("min_top1", self.min_top1),
                ("max_steps", self.max_steps),
                ("step", self.step),
            )
            if value is not None
        ]
        return " ".join(parts)

    def check(self, metrics: OutputMetrics, *, step: float | None = None) -> list[str]:
        """Failure reasons for one output (empty: it passes). ``step``: the output's quantization step
        found in the graph, used when ``self.step`` is unset. ``max|r|`` comes from ``metrics``."""
        if metrics.mismatch is not None:
            return [metrics.mismatch]
        reasons: list[str] = []
        if metrics.nonfinite_mismatch:
            reasons.append(f"{metrics.nonfinite_mismatch} non-finite value(s) differ from the reference")
        if metrics.max_abs_err is None:
            return reasons or ["nothing was compared"]
        applied = False
        if self.is_lossless:
            applied = True
            limit = self.bound(metrics.ref_max_abs or 0.0)
            if metrics.max_abs_err > limit:
                reasons.append(
                    f"max abs error {metrics.max_abs_err:.3g} > {limit:.3g} "
                    f"(atol {self.atol or 0:g} + rtol {self.rtol or 0:g} × max|ref| {metrics.ref_max_abs:.3g})"
                )
        step = self.step if self.step is not None else (step if metrics.is_float else 1.0)
        if self.max_steps is not None and step:
            applied = True
            steps = metrics.max_abs_err / step
            if steps > self.max_steps:
                reasons.append(f"max error {steps:.3g} quantization steps > {self.max_steps:g} (step {step:.3g})")
        if metrics.is_float:
            if self.min_cosine is not None and metrics.cosine is not None:
                applied = True
                if metrics.cosine < self.min_cosine:
                    reasons.append(f"cosine {metrics.cosine:.6f} < {self.min_cosine:g}")
            if self.min_top1 is not None and metrics.top1 is not None:
                applied = True
                if metrics.top1 < self.min_top1:
                    reasons.append(f"top-1 agreement {metrics.top1:.4f} < {self.min_top1:g}")
            if not applied:
                reasons.append(f"no criterion of the tolerance ({self.describe()}) applies to this output")
        elif not applied and self.min_top1 is not None and metrics.exact is not None:
            if metrics.exact < self.min_top1:
                reasons.append(f"exact match {metrics.exact:.4f} < {self.min_top1:g}")
        elif not applied and metrics.exact is not None and metrics.exact < 1.0:
            reasons.append(f"integer output differs: exact match {metrics.exact:.4f} < 1")
        return reasons


#: Rewrites that must not change the numbers beyond float reassociation noise.
LOSSLESS = Tolerance(atol=1e-5, rtol=1e-4)
#: Approximating techniques: direction preserved, classifier decisions mostly kept.
LOSSY = Tolerance(min_cosine=0.98, min_top1=0.9)
#: :data:`LOSSY` where the feeds are seeded random inputs (no data given): the cosine budget only.
#: Random inputs sit near class boundaries, so their top-1 agreement measures noise, not the task
#: (bundled digits transformer: median top-1 margin 3.1 on 450 random inputs, 8.0 on the test split;
#: its ``--int4`` output agrees with fp32 on 450 of 450 test digits but on 0.96 of the random inputs,
#: 7 of the 8 a default check draws). Top-1 agreement is still measured and reported.
LOSSY_RANDOM = Tolerance(min_cosine=0.98, min_top1=0.0)


def quantized(
    step: float | None = None,
    *,
    max_steps: float = 1.0,
    min_cosine: float | None = 0.98,
    min_top1: float | None = 0.9,
) -> Tolerance:
    """Quantization: within ``max_steps`` output quantization steps where a step is known (``step``,
    or the one found in the candidate graph), and within the cosine / top-1 budgets everywhere.

    One step is the default because onnxruntime's fused QDQ kernels may round ties differently from
    the unfused graph (one step apart)."""
    return Tolerance(max_steps=max_steps, step=step, min_cosine=min_cosine, min_top1=min_top1)


POLICIES = {"lossless": LOSSLESS, "lossy": LOSSY, "quantized": quantized()}


_FAMILIES = (("atol", "rtol"), ("max_steps", "step"), ("min_cosine", "min_top1"))  # bound, steps, task


def overridden(base: Tolerance, **given: float | None) -> Tolerance:
    """``base`` with the criteria the user gave (``atol``, ``rtol``, ``max_steps``, ``step``,
    ``min_cosine``, ``min_top1``; None: not given) put in.

    Criteria come in three families: the elementwise bound (atol, rtol), the quantization-step
    bound (max_steps, step) and the task metrics (min_cosine, min_top1). A given value replaces its
    own field and keeps the rest of its family; the families none of whose values were given are
    dropped — ``--min-cosine 0.99`` on a lossless run checks the cosine alone, ``--atol 1e-3`` on a
    lossy run the bound alone, ``--min-top1 0`` on a lossy run keeps its 0.98 cosine. On a lossless
    run ``--min-top1`` alone is the whole budget: it applies to classifier outputs only, and any
    other output then fails as unchecked (see the module docstring), never passes unchecked.
    """
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return base
    fields: dict[str, float | None] = {}
    for family in _FAMILIES:
        if any(k in given for k in family):
            fields.update({k: given.get(k, getattr(base, k)) for k in family})
    return Tolerance(**fields)


def policy_for(kind: str) -> Tolerance:
    """The tolerance for a kind of technique: ``"lossless"``, ``"lossy"`` or ``"quantized"``."""
    try:
        return POLICIES[kind]
    except KeyError:
        raise RecipeError(
            f"unknown tolerance policy {kind!r}{did_you_mean(kind, POLICIES)}",
            where="tolerance",
            hint=f"use one of {sorted(POLICIES)}",
        ) from None
