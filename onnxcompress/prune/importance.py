"""Importance of removable channels (units of a dependency group); higher means keep.

For a unit ``u`` of a group (one channel, with every coupled element of every member):

* ``l1``: ``sum over producer weights W of sum |W[u, ...]|`` — the filter norm of every layer that
  writes the channel (the weight row of a Conv/Gemm/MatMul output, a depthwise filter), summed over
  coupled producers (both sides of a residual Add);
* ``l2``: ``sqrt(sum over producer weights of sum W[u, ...]^2)``;
* ``bn``: ``sum over BatchNormalization members of |gamma[u]|`` (Network Slimming); groups without a
  BatchNormalization fall back to ``l1`` (the pass reports it);
* ``activation``: ``sum over the next layers' weights V of mean|x[..., u, ...]| · ||V[u, :]||_2`` —
  the mean magnitude of the channel on the calibration batches times the norm of the weights that
  read it: to first order, how much removing it changes the next layers' outputs. (Activation
  magnitude alone ignores how much the next layer uses a channel; on the digits MLP at 50% it kept
  the wrong ones.) The tensors are read with onnxruntime by adding them as extra graph outputs
  (one session for all groups).

Scores are in the order of :meth:`Group.units`.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import numpy as np
import onnx

from onnxcompress.prune.dependency import Group, eval_const

__all__ = ["IMPORTANCE_METHODS", "ChannelStats", "unit_scores", "activation_inputs", "activation_means", "reader_l1"]

IMPORTANCE_METHODS = ("l1", "l2", "bn", "activation")


class ChannelStats(NamedTuple):
    """Per element of a channel axis, over calibration data: ``mean |x|`` and ``mean x``."""

    abs_mean: np.ndarray
    mean: np.ndarray


def _rows(value: np.ndarray, axis: int, power: int) -> np.ndarray:
    m = np.moveaxis(np.asarray(value, dtype=np.float64), axis, 0).reshape(value.shape[axis], -1)
    return np.abs(m).sum(axis=1) if power == 1 else (m * m).sum(axis=1)


def _accumulate(group: Group, units: np.ndarray, per_space: Iterable[tuple]) -> np.ndarray:
    pos = {int(u): i for i, u in enumerate(units)}
    score = np.zeros(len(units), dtype=np.float64)
    for space, values in per_space:
        for u, v in zip(group.unit_ids(space), values):
            score[pos[int(u)]] += v
    return score


def unit_scores(group: Group, method: str, *, activations: dict[str, ChannelStats] | None = None) -> np.ndarray | None:
    """Scores for ``group.units()``, or None when ``method`` has nothing to measure in this group
    (``bn`` without a BatchNormalization, ``activation`` without activations)."""
    units = group.units()
    if method in ("l1", "l2"):
        power = 1 if method == "l1" else 2
        members = [(p.space, _rows(eval_const(p.node.inputs[p.slot]), p.axis, power))
                   for p in group.params if p.role in ("out", "dw") and p.slot == 1]
        score = _accumulate(group, units, members)
        return score if power == 1 else np.sqrt(score)
    if method == "bn":
        members = [(p.space, np.abs(np.asarray(eval_const(p.node.inputs[1]), dtype=np.float64)))
                   for p in group.params if p.role == "bn" and p.slot == 1]
        return _accumulate(group, units, members) if members else None
    if method == "activation":
        if not activations:
            return None
        members = []
        for p in group.params:
            if p.role == "in" and p.space.name in activations and p.chunks == 1:
                reads = np.sqrt(_rows(eval_const(p.node.inputs[p.slot]), p.axis, 2))
                members.append((p.space, activations[p.space.name].abs_mean * reads))
        return _accumulate(group, units, members) if members else None
    raise ValueError(f"unknown importance {method!r}")


def reader_l1(group: Group, readers: list) -> np.ndarray | None:
    """Per unit of ``group.units()``: the summed ``|V|`` of the reader weights ``V`` (``in``
    parameters, un-chunked) over the unit's input rows — 0 where no reader uses the unit; None when
    a reader's weight is not a constant."""
    values = [eval_const(p.node.inputs[p.slot]) for p in readers]
    if any(v is None for v in values):
        return None
    return _accumulate(group, group.units(), [(p.space, _rows(v, p.axis, 1)) for p, v in zip(readers, values)])


def activation_inputs(group: Group) -> list:
    """The spaces of ``group`` that a next layer reads (its weight's input rows follow them)."""
    seen, out = set(), []
    for p in group.params:
        if p.role == "in" and p.space.index not in seen:
            seen.add(p.space.index)
            out.append(p.space)
    return out


def activation_means(model: onnx.ModelProto, targets: dict[str, int], feeds: Iterable[dict],
                     *, max_batches: int, base_dir=None) -> dict[str, ChannelStats]:
    """``name -> ChannelStats`` per element of ``axis`` for each target tensor, over at most
    ``max_batches`` feeds, read in one onnxruntime session (graph optimizations off)."""
    from onnxcompress.verify.layers import expose_tensors
    from onnxcompress.verify.session import make_session, run_on_data

    exposed_model, names = expose_tensors(model, list(targets))
    sess = make_session(exposed_model, "cpu", optimize=False, base_dir=base_dir)
    sums: dict[str, np.ndarray] = {}
    signed: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i, feed in enumerate(feeds):
        if i >= max_batches:
            break
        outs = run_on_data(sess, feed, names, where="channel importance (activations)", batch=i + 1)
        for name, x in ((n, outs[n]) for n in names):
            axis = targets[name] % x.ndim
            m = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0).reshape(x.shape[axis], -1)
            sums[name] = sums.get(name, 0) + np.abs(m).sum(axis=1)
            signed[name] = signed.get(name, 0) + m.sum(axis=1)
            counts[name] = counts.get(name, 0) + m.shape[1]
    return {n: ChannelStats(sums[n] / max(1, counts[n]), signed[n] / max(1, counts[n])) for n in sums}
