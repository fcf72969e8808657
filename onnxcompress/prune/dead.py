"""``drop_dead_channels``: remove the channels no layer reads any more — a lossless structural cleanup.

Rule
----
Channel pruning's dependency groups (:mod:`onnxcompress.prune.dependency`) list, for every unit ``u``
(one channel with every coupled element), the layers that *read* it: each consumer weight ``V``
whose input rows follow the group (``in`` parameters: Gemm/MatMul input rows, Conv input channels,
the channel × spatial blocks behind a Flatten). A unit is **dead** when every reader's weights for
it are exactly zero::

    dead(u)  ⇔  V[..., e, ...] == 0  for every element e of u, in every reader V of the group

Whatever value ``x_e`` the channel carries, each reader adds ``x_e · 0`` to its outputs, so removing
``u`` — the producer's weight rows and bias, BatchNormalization parameters, per-channel constants,
and the zero input rows of every reader — leaves every output unchanged (bit for bit, barring a
reader that multiplied an infinite or NaN ``x_e`` by zero, where the original gave NaN).

Unstructured pruning makes such units common: magnitude pruning at 90% (global) leaves 108 of the
digits MLP's 300 first-layer neurons with no outgoing weight, and their incoming weights and biases
are then pure file and compute overhead.

May I? The group is not blocked (an op channel pruning does not understand, a graph output, a
subgraph reader: see :func:`~onnxcompress.prune.channels.group_skip_reason`); it has at least one
reader, and every reader is an un-chunked consumer weight (a grouped Conv's input side is left alone);
at least one unit always remains (the group's first, when all are dead). Otherwise the group is a
Skip with the reason, or passes silently when it has no dead unit.

The plan (``details["groups"]``) has the same form as ``prune_channels``' (kept element indices per
tensor, ``keep``), so ``--apply-plan`` and ``transfer`` slice other checkpoints the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.prune.channels import group_skip_reason
from onnxcompress.prune.dependency import Group, ParamWriter, apply_keep, build_dependency_graph
from onnxcompress.prune.importance import reader_l1
from onnxcompress.recipe import StepConfig, option

__all__ = ["DropDeadChannelsConfig", "DropDeadChannelsPass", "dead_units"]


@dataclass(frozen=True)
class DropDeadChannelsConfig(StepConfig):
    name = "drop_dead_channels"
    order = 31  # right after pruning (30) made weights zero, before the repair (79) refits what is left
    flag = "--drop-dead-channels"
    flag_help = ("remove channels / neurons whose outgoing weights are all zero (lossless; "
                 "unstructured pruning leaves many)")

    min_units: int = option(1, "keep at least this many channels in every group", minimum=1)


def dead_units(group: Group) -> tuple[np.ndarray | None, str | None]:
    """``(mask over group.units(), None)`` — True where no reader uses the unit — or ``(None, reason)``."""
    readers = [p for p in group.params if p.role == "in"]
    if not readers:
        return None, "no layer reads these channels through a weight"
    grouped = next((p for p in readers if p.chunks > 1), None)
    if grouped is not None:
        return None, f"{grouped.node.name or grouped.node.op} reads them as a grouped Conv"
    used = reader_l1(group, readers)
    if used is None:
        return None, "a layer reading them has a weight that is not a constant"
    return used == 0, None  # NaN weights count as read


class DropDeadChannelsPass(Pass):
    config_cls = DropDeadChannelsConfig
    lossless = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        model = ctx.model_of(graph) if ctx is not None else None
        dg = build_dependency_graph(graph, model)
        writer = ParamWriter(graph)
        plan = []
        for group in dg.groups:
            if not group.prunable and not group.blocked:
                continue
            dead, why = (None, group_skip_reason(group)) if group.blocked else dead_units(group)
            if dead is None:
                res.skip(group.name, "drop_dead_channels", why)
                continue
            if not dead.any():
                continue
            units = group.units()
            alive = units[~dead]
            if len(alive) < self.config.min_units:
                alive = np.sort(np.concatenate([alive, units[dead][: self.config.min_units - len(alive)]]))
            if len(alive) == len(units):
                continue
            kept = apply_keep(graph, group, alive, writer)
            res.changed(f"{group.name}: dropped {len(units) - len(alive)} of {len(units)} channels nothing reads "
                        f"({', '.join(group.layers()[:4])}{', ...' if len(group.layers()) > 4 else ''})")
            plan.append({"group": group.name, "layers": group.layers(), "channels": int(len(units)),
                         "kept": int(len(alive)), "importance": "dead", "keep": kept})
        res.details = {"groups": plan, "dropped": sum(g["channels"] - g["kept"] for g in plan)}
        return res
