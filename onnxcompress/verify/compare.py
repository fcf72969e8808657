"""``compare_models``: run a reference and a candidate model on the same feeds and judge the outputs.

The rule (DESIGN §6):

* **Reference**: ``ref`` on the CPU execution provider with graph optimizations disabled
  (``ORT_DISABLE_ALL``), so the reference numbers are those of the graph as written.
* **Candidate**: ``cand`` on each requested provider with onnxruntime's default optimizations, the
  way users run it. A provider missing from this onnxruntime build, or one that fails to initialize
  (onnxruntime then silently falls back to the CPU), is *skipped* with the reason — not a failure.
  Nothing passes when no requested provider could run.
* **Feeds**: ``feeds`` (one dict, a list of dicts, or anything :func:`~onnxcompress.data.as_feed_source`
  accepts) or ``inputs`` (a path to an ``.npz`` file or folder); by default one seeded random feed
  built from ``ref``'s input specs (:func:`~onnxcompress.data.random_feeds` with ``shapes``, ``batch``,
  ``seed``). Every feed is validated against ``ref``'s inputs first. The feeds are read once: the
  reference runs once per feed and each candidate session on the same feed, so a one-shot
  ``CalibrationDataReader`` works.
* **Outputs** are matched by name; metrics accumulate over all feeds
  (:mod:`~onnxcompress.verify.metrics`) and each output is judged by ``tolerance``
  (:mod:`~onnxcompress.verify.tolerance`), with quantization steps read from the candidate graph: an
  output produced by ``DequantizeLinear`` with a constant scale (possibly through Reshape / Transpose /
  Flatten / Squeeze / Unsqueeze / Identity) has step ``max|scale|``.
* **Layers** (``layers=True``): see :mod:`~onnxcompress.verify.layers`. The reference runs with the
  shared tensors exposed (its outputs are unchanged: nothing is optimized); the candidate gets a second,
  exposed session on the first provider that runs, since exposing tensors blocks some fusions and the
  output verdict must be that of the model as users run it.

A failed parity raises nothing: ``ParityReport.passed`` is False (higher layers raise ``ParityError``).
Raised: :class:`RecipeError` (unknown provider, both ``feeds`` and ``inputs``),
:class:`CalibrationError` (feeds that do not fit the reference, no feeds at all), :class:`ModelError`
(a model that onnxruntime cannot load, or a reference that fails to run on a valid feed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxcompress.data import FeedSource, as_feed_source, input_specs, random_feeds, read_model, validate_feed
from onnxcompress.errors import CalibrationError, ModelError, OnnxCompressError, RecipeError
from onnxcompress.verify.layers import analyse_layers, layer_session, shared_tensors
from onnxcompress.verify.metrics import MetricAccumulator
from onnxcompress.verify.report import OutputParity, ParityReport, ProviderRun
from onnxcompress.verify.session import (DATA_FIT_HINT, ProviderChoice, feed_shapes, make_session, one_line,
                                         resolve_providers, run_session)
from onnxcompress.verify.tolerance import LOSSLESS, Tolerance

__all__ = ["compare_models", "output_steps"]

log = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike | bytes
_STEP_PASSTHROUGH = {"Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"}


@dataclass(frozen=True)
class _Model:
    """A model read once: its proto (external data not loaded), the folder its external data is
    relative to, and its path when it came from a file (sessions then load the path itself)."""

    role: str
    proto: onnx.ModelProto
    base_dir: str | None
    path: str | None

    @classmethod
    def read(cls, model: ModelLike, base_dir: str | os.PathLike | None, role: str) -> "_Model":
        try:
            proto, file_dir = read_model(model)
        except OnnxCompressError as exc:
            raise exc.with_where(f"{role} model")
        path = str(model) if isinstance(model, (str, os.PathLike)) else None
        folder = file_dir if file_dir is not None else (str(base_dir) if base_dir is not None else None)
        return cls(role, proto, folder, path)

    def session(self, provider: str, *, optimize: bool) -> ort.InferenceSession:
        try:
            if self.path is not None:
                return make_session(self.path, provider, optimize=optimize)
            return make_session(self.proto, provider, optimize=optimize, base_dir=self.base_dir)
        except ModelError as exc:
            raise exc.with_where(f"{self.role} model")


def compare_models(
    ref: ModelLike,
    cand: ModelLike,
    *,
    feeds: Any = None,
    inputs: str | os.PathLike | None = None,
    shapes: dict[str, Sequence[int]] | None = None,
    providers: Sequence[str] | str = ("cpu",),
    tolerance: Tolerance = LOSSLESS,
    seed: int = 0,
    batch: int = 1,
    layers: bool = False,
    ref_base_dir: str | os.PathLike | None = None,
    cand_base_dir: str | os.PathLike | None = None,
) -> ParityReport:
    """Compare ``cand`` against ``ref`` (see the module docstring for the rule).

    ``ref`` / ``cand``: a path, bytes or ``onnx.ModelProto``; ``*_base_dir``: where a proto's external
    data lives (a path's own folder is used for a path). ``shapes``, ``batch`` and ``seed`` shape the
    default random feed only.
    """
    if feeds is not None and inputs is not None:
        raise RecipeError("give feeds or inputs, not both", where="compare", hint="inputs is a path; feeds anything else")
    choices = resolve_providers(providers)
    reference = _Model.read(ref, ref_base_dir, "reference")
    candidate = _Model.read(cand, cand_base_dir, "candidate")
    specs = input_specs(reference.proto)
    given = feeds is not None or inputs is not None
    source = _feed_source(reference.proto, feeds if feeds is not None else inputs, shapes=shapes, batch=batch, seed=seed)
    outputs = [o.name for o in reference.proto.graph.output]
    problems: list[str] = []
    notes: list[str] = []

    needed = {s.name for s in input_specs(candidate.proto)} - {s.name for s in specs}
    if needed:
        problems.append(f"the candidate needs input(s) the reference does not have: {sorted(needed)}")

    names = shared_tensors(reference.proto, candidate.proto) if layers else []
    ref_session, ref_exposed = None, []
    if names:
        ref_session, ref_exposed, note = layer_session(
            reference.proto, names, "cpu", optimize=False, base_dir=reference.base_dir
        )
        notes += [f"layers (reference): {note}"] if note else []
    if ref_session is None:
        ref_session = reference.session("cpu", optimize=False)

    active, skipped = _candidate_sessions(candidate, choices) if not needed else ([], [])
    if not active and not needed:
        problems.append("no requested provider could run the candidate: " + ", ".join(c.short for c in choices))

    cand_layers, layer_names = None, []
    if ref_exposed and active:
        cand_layers, cand_exposed, note = layer_session(
            candidate.proto, ref_exposed, active[0][0].short, optimize=True, base_dir=candidate.base_dir
        )
        notes += [f"layers (candidate): {note}"] if note else []
        layer_names = [n for n in ref_exposed if n in set(cand_exposed)]
    elif layers and not names:
        notes.append("layers: the two graphs share no intermediate tensor names")

    accumulators = {c.short: {n: MetricAccumulator(n) for n in outputs} for c, _ in active}
    run_problems: dict[str, list[str]] = {c.short: [] for c, _ in active}
    layer_accumulators = {n: MetricAccumulator(n) for n in layer_names}
    count = 0
    for label, feed in source.labeled():
        validate_feed(specs, feed, where=label)
        try:
            ref_out = run_session(ref_session, feed)
        except Exception as exc:
            if given:  # the user's data does not fit the model: a data error (exit 2), like calibration's
                raise CalibrationError(f"the reference model failed to run on it ({feed_shapes(feed)}): "
                                       f"{one_line(exc)}", where=label, hint=DATA_FIT_HINT) from exc
            raise ModelError(
                f"the reference model failed to run: {one_line(exc)}",
                where=label,
                hint="check the feed's shapes against the model (--shape) and the model itself",
            ) from exc
        for choice, session in active:
            if run_problems[choice.short]:
                continue  # a candidate that failed once is not run again
            try:
                cand_out = run_session(session, feed)
            except Exception as exc:
                run_problems[choice.short].append(f"the candidate failed to run on {label}: {one_line(exc)}")
                continue
            for name in outputs:
                accumulators[choice.short][name].update(ref_out[name], cand_out.get(name))
        if cand_layers is not None:
            try:
                layer_out = run_session(cand_layers, feed, layer_names)
            except Exception as exc:
                notes.append(f"layers: the exposed candidate failed to run on {label}: {one_line(exc)}")
                cand_layers, layer_accumulators = None, {}
            else:
                for name in layer_names:
                    layer_accumulators[name].update(ref_out[name], layer_out[name])
        count += 1
    if count == 0:
        raise CalibrationError(
            f"no feeds in {source.description}", where="compare", hint="pass at least one feed dict"
        )

    steps = output_steps(candidate.proto, candidate.base_dir) if tolerance.max_steps is not None else {}
    runs = []
    for choice, _ in active:
        parities = []
        for name in outputs:
            metrics = accumulators[choice.short][name].result()
            step = tolerance.step if tolerance.step is not None else steps.get(name)
            failures = tuple(tolerance.check(metrics, step=steps.get(name)))
            parities.append(OutputParity(name=name, metrics=metrics, failures=failures, step=step))
        runs.append(
            ProviderRun(
                provider=choice.short,
                ort_provider=choice.ort_name,
                outputs=tuple(parities),
                problems=tuple(run_problems[choice.short]),
            )
        )

    layer_report, first = None, None
    if layers:
        layer_metrics = {n: a.result() for n, a in layer_accumulators.items()}
        layer_report, first = analyse_layers(reference.proto.graph, layer_metrics, tolerance)
    passed = bool(runs) and not problems and all(run.passed for run in runs)
    report = ParityReport(
        passed=passed,
        runs=tuple(runs),
        skipped=tuple(skipped),
        tolerance=tolerance,
        feeds=count,
        layers=layer_report,
        first_divergence=first,
        problems=tuple(problems),
        notes=tuple(notes),
    )
    log.info("parity %s on %d feed(s)", "passed" if passed else "FAILED", count)
    return report


def _feed_source(proto: onnx.ModelProto, feeds: Any, *, shapes: Any, batch: int, seed: int) -> FeedSource:
    if feeds is not None:
        if shapes:
            log.info("shapes only shape random feeds; the feeds given are used as they are")
        return as_feed_source(feeds, model=proto)
    feed = random_feeds(proto, shapes=shapes, batch=batch, seed=seed)
    label = f"random feed (seed {seed})"
    return FeedSource(lambda: iter([(label, feed)]), description=label, length=1)


def _candidate_sessions(
    candidate: _Model, choices: list[ProviderChoice]
) -> tuple[list[tuple[ProviderChoice, ort.InferenceSession]], list[tuple[str, str]]]:
    active, skipped = [], []
    for choice in choices:
        if not choice.available:
            skipped.append((choice.short, choice.reason))
            log.info("skipping %s: %s", choice.short, choice.reason)
            continue
        session = candidate.session(choice.short, optimize=True)
        if choice.ort_name not in session.get_providers():
            reason = f"{choice.ort_name} failed to initialize (onnxruntime fell back to {session.get_providers()})"
            skipped.append((choice.short, reason))
            log.warning("skipping %s: %s", choice.short, reason)
            continue
        active.append((choice, session))
    return active, skipped


def output_steps(model: onnx.ModelProto, base_dir: str | None = None) -> dict[str, float]:
    """Quantization step of each graph output produced by ``DequantizeLinear`` with a constant scale
    (through the shape-only ops listed in the module docstring): ``max|scale|``."""
    graph = model.graph
    producer = {o: node for node in graph.node for o in node.output}
    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    steps = {}
    for output in graph.output:
        node = producer.get(output.name)
        while node is not None and node.op_type in _STEP_PASSTHROUGH:
            node = producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        scale = constants.get(node.input[1])
        if scale is None:
            continue
        value = float(np.max(np.abs(numpy_helper.to_array(scale, base_dir=base_dir or "").astype(np.float64))))
        if value > 0:
            steps[output.name] = value
    return steps
