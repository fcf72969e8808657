"""The result of a parity check: :class:`ParityReport` and its parts, as JSON and as a text table.

``to_dict()`` is JSON-safe: tuples become lists and non-finite floats become the strings ``"inf"``,
``"-inf"`` and ``"nan"`` (``json.dumps`` would otherwise write ``Infinity``, which is not JSON).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from onnxcompress.verify.metrics import OutputMetrics
from onnxcompress.verify.tolerance import Tolerance

__all__ = ["OutputParity", "ProviderRun", "LayerParity", "ParityReport", "json_safe"]


def json_safe(value: Any) -> Any:
    """Dataclasses, tuples and floats → JSON-safe values (``inf`` → ``"inf"``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


@dataclass(frozen=True, kw_only=True)
class OutputParity:
    """One output on one provider: its metrics, the quantization step used (if any), the failures."""

    name: str
    metrics: OutputMetrics
    failures: tuple[str, ...]
    step: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True, kw_only=True)
class ProviderRun:
    """The candidate on one provider: per-output parity and problems of the run itself (a run that
    failed, inputs the candidate lacks)."""

    provider: str
    ort_provider: str
    outputs: tuple[OutputParity, ...]
    problems: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.problems and all(o.passed for o in self.outputs)


@dataclass(frozen=True, kw_only=True)
class LayerParity:
    """One intermediate tensor both graphs share, in the reference's topological order.

    ``rel_err`` is ``max|r - c| / max|r|``; ``upstream_rel_err`` the largest ``rel_err`` of the nearest
    compared tensors it depends on (0 at the graph inputs); ``diverged`` says why this layer counts as a
    divergence, or is ``None``."""

    name: str
    op_type: str
    node: str
    metrics: OutputMetrics
    rel_err: float | None
    upstream_rel_err: float
    diverged: str | None = None


@dataclass(frozen=True, kw_only=True)
class ParityReport:
    """Parity of a candidate model against a reference.

    ``passed`` is True when every run passed, no global problem was found and at least one provider
    ran. ``skipped`` lists ``(provider, reason)`` for providers that could not run (not a failure).
    ``layers`` is None unless layer mode was asked for; ``first_divergence`` names the first diverging
    layer (see :mod:`onnxcompress.verify.layers`). ``notes`` are informative (layers that could not be
    exposed, for instance)."""

    passed: bool
    runs: tuple[ProviderRun, ...]
    skipped: tuple[tuple[str, str], ...]
    tolerance: Tolerance
    feeds: int
    layers: tuple[LayerParity, ...] | None = None
    first_divergence: str | None = None
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def failures(self) -> list[str]:
        """Every failure as ``"provider/output: reason"``, then the global problems."""
        found = []
        for run in self.runs:
            found += [f"{run.provider}: {p}" for p in run.problems]
            for output in run.outputs:
                found += [f"{run.provider}/{output.name}: {reason}" for reason in output.failures]
        return found + list(self.problems)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the whole report (see the module docstring)."""
        data = json_safe(self)
        data["tolerance"]["text"] = self.tolerance.describe()
        return data

    def summary(self, *, max_layers: int = 40) -> str:
        """A compact human-readable table."""
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [f"parity {verdict}: {self.feeds} feed(s), tolerance {self.tolerance.describe()}"]
        header = ("provider", "output", "shape", "max_abs", "mean_abs", "cosine", "snr_db", "top1", "status")
        rows = [header]
        for run in self.runs:
            for output in run.outputs:
                rows.append((run.provider, output.name, *_metric_cells(output.metrics), _status(output.failures)))
        if len(rows) > 1:
            lines += _table(rows)
        for run in self.runs:
            lines += [f"  {run.provider}: {problem}" for problem in run.problems]
        for run in self.runs:
            for output in run.outputs:
                lines += [f"  {run.provider}/{output.name}: {reason}" for reason in output.failures]
        lines += [f"skipped {provider}: {reason}" for provider, reason in self.skipped]
        lines += [f"problem: {problem}" for problem in self.problems]
        if self.layers is not None:
            lines.append(f"layers compared: {len(self.layers)}; first divergence: {self.first_divergence or 'none'}")
            shown = self.layers[:max_layers]
            layer_rows = [("layer", "op", "max_abs", "rel_err", "cosine", "snr_db", "diverged")]
            for layer in shown:
                m = layer.metrics
                layer_rows.append(
                    (layer.name, layer.op_type, _num(m.max_abs_err), _num(layer.rel_err), _num(m.cosine, 6), _num(m.snr_db, 1), layer.diverged or "")
                )
            if shown:
                lines += _table(layer_rows)
            if len(self.layers) > len(shown):
                lines.append(f"  ... {len(self.layers) - len(shown)} more layer(s)")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _metric_cells(m: OutputMetrics) -> tuple[str, ...]:
    shape = "x".join(map(str, m.ref_shape)) or "scalar"
    return (shape, _num(m.max_abs_err), _num(m.mean_abs_err), _num(m.cosine, 6), _num(m.snr_db, 1), _num(m.top1, 3))


def _status(failures: tuple[str, ...]) -> str:
    return "ok" if not failures else "FAIL"


def _num(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if digits is not None else f"{value:.3g}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
