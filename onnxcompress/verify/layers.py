"""Layer-by-layer parity: compare the intermediate tensors two graphs share by name.

Like Polygraphy's "mark all outputs", made useful for compressed graphs, where most tensor names
survive a pass but many nodes and weights do not:

1. **Shared tensors.** The top-level node outputs present in both graphs by name, excluding graph
   inputs, initializers and ``Constant`` outputs, in the reference's node order (ONNX keeps nodes
   topologically sorted).
2. **Exposing them.** On copies of both models each shared tensor that is not already a graph output
   becomes one: with its element type when onnx shape inference (or existing ``value_info``) knows it,
   otherwise without type information, which onnxruntime infers while loading. Tensors whose inferred
   type is not a tensor (sequences, maps) are left out. If onnxruntime refuses the model, the untyped
   outputs are dropped and it is tried once more; if it still refuses, layer mode gives up with a
   note (no exception).
3. **First divergence.** Walking the reference's nodes in order, each compared tensor gets
   ``rel = max|r - c| / max|r|`` and ``upstream`` = the largest ``rel`` among the nearest compared
   tensors it depends on (0 at graph inputs and constants; tensors not compared pass their upstream
   value through). A tensor *diverges* when

   * its shape or dtype differs, or non-finite values differ; or
   * the tolerance has ``min_cosine`` and ``cosine < min_cosine``; or
   * its error is above the noise bound and ``rel > 10 × upstream``: the layer itself multiplied the
     error it received by more than ten. The noise bound is the tolerance's lossless bound
     ``atol + rtol · max|r|`` when it has one, else that of ``LOSSLESS``, so float reassociation noise
     after a bit-exact layer is not a divergence.

   ``first_divergence`` is the first diverging tensor in that order.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import onnx
import onnxruntime as ort
from onnx import helper

from onnxcompress.errors import ModelError
from onnxcompress.verify.metrics import OutputMetrics
from onnxcompress.verify.report import LayerParity
from onnxcompress.verify.session import make_session
from onnxcompress.verify.tolerance import LOSSLESS, Tolerance

__all__ = ["shared_tensors", "expose_tensors", "layer_session", "analyse_layers"]

log = logging.getLogger(__name__)

#: A layer diverges when its relative error exceeds this many times its inputs'.
JUMP_FACTOR = 10.0


def _produced(graph: onnx.GraphProto) -> list[str]:
    """Top-level node outputs in node order, without Constant outputs, inputs and initializers."""
    excluded = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names = []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        names += [o for o in node.output if o and o not in excluded]
    return names


def shared_tensors(ref: onnx.ModelProto, cand: onnx.ModelProto) -> list[str]:
    """Tensors produced by nodes of both graphs, in the reference's order (rule 1)."""
    in_cand = set(_produced(cand.graph))
    return [name for name in _produced(ref.graph) if name in in_cand]


def _known_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Types onnx shape inference knows, without loading external data; empty if inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # custom domains, unsupported ops: just fall back to untyped outputs
        log.debug("shape inference failed (%s); exposing layers without type information", exc)
        inferred = model
    graph = inferred.graph
    return {v.name: v.type for v in (*graph.value_info, *graph.output, *graph.input)}


def expose_tensors(model: onnx.ModelProto, names: Sequence[str], *, typed_only: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with ``names`` added as graph outputs (rule 2); returns it and the names
    that are outputs of the copy (those already outputs included)."""
    types = _known_types(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    exposed = []
    for name in names:
        kind = types.get(name)
        if kind is not None and kind.WhichOneof("value") not in (None, "tensor_type"):
            continue
        if name not in existing:
            elem = kind.tensor_type.elem_type if kind is not None and kind.HasField("tensor_type") else 0
            if elem:
                copy.graph.output.append(helper.make_tensor_value_info(name, elem, None))
            elif typed_only:
                continue
            else:
                copy.graph.output.append(helper.make_empty_tensor_value_info(name))
        exposed.append(name)
    return copy, exposed


def layer_session(
    model: onnx.ModelProto,
    names: Sequence[str],
    provider: str,
    *,
    optimize: bool,
    base_dir: str | None,
) -> tuple[ort.InferenceSession | None, list[str], str | None]:
    """A session for ``model`` with ``names`` exposed: ``(session, exposed names, note)``; the session
    is None (and the note says why) when onnxruntime refuses even the typed-only copy."""
    exposed_model, exposed = expose_tensors(model, names)
    try:
        return make_session(exposed_model, provider, optimize=optimize, base_dir=base_dir), exposed, None
    except ModelError as first:
        typed_model, typed = expose_tensors(model, names, typed_only=True)
        if len(typed) == len(exposed):
            return None, [], f"onnxruntime refused the model with its layers exposed: {first.what}"
        try:
            session = make_session(typed_model, provider, optimize=optimize, base_dir=base_dir)
        except ModelError as second:
            return None, [], f"onnxruntime refused the model with its layers exposed: {second.what}"
        note = f"{len(exposed) - len(typed)} layer(s) without a known type were left out"
        return session, typed, note


def analyse_layers(
    graph: onnx.GraphProto,
    metrics: dict[str, OutputMetrics],
    tolerance: Tolerance,
) -> tuple[tuple[LayerParity, ...], str | None]:
    """Per-layer parity in the reference's order and the first divergence (rule 3)."""
    noise = tolerance if tolerance.is_lossless else LOSSLESS
    error: dict[str, float] = {}
    layers = []
    first = None
    for node in graph.node:
        upstream = max((error.get(t, 0.0) for t in node.input if t), default=0.0)
        for name in node.output:
            m = metrics.get(name)
            if m is None:
                error[name] = upstream
                continue
            rel = m.rel_err
            reason = _divergence(m, rel, upstream, tolerance, noise)
            error[name] = math.inf if m.mismatch else (rel if rel is not None else upstream)
            layers.append(
                LayerParity(
                    name=name,
                    op_type=node.op_type,
                    node=node.name,
                    metrics=m,
                    rel_err=rel,
                    upstream_rel_err=upstream,
                    diverged=reason,
                )
            )
            if reason and first is None:
                first = name
    return tuple(layers), first


def _divergence(m: OutputMetrics, rel: float | None, upstream: float, tolerance: Tolerance, noise: Tolerance) -> str | None:
    if m.mismatch:
        return m.mismatch
    if m.nonfinite_mismatch:
        return f"{m.nonfinite_mismatch} non-finite value(s) differ"
    if tolerance.min_cosine is not None and m.cosine is not None and m.cosine < tolerance.min_cosine:
        return f"cosine {m.cosine:.6f} < {tolerance.min_cosine:g}"
    if rel is None or m.max_abs_err is None:
        return None
    if m.max_abs_err > noise.bound(m.ref_max_abs or 0.0) and rel > JUMP_FACTOR * upstream:
        if upstream == 0.0:
            return f"relative error {rel:.3g} where its inputs match"
        return f"relative error {rel:.3g} is {rel / upstream:.0f}x its inputs' {upstream:.3g}"
    return None
