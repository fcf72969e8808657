"""Edge rewiring and the Rule protocol (match / check / rewrite).

Passes never edit ``node.inputs`` lists by slicing (graphsurgeon keeps producer/consumer links in
sync only through item assignment); they call these helpers.

A :class:`Rule` splits a local rewrite in three: ``match(node)`` finds where the pattern starts,
``check(match, graph)`` answers "may I?" with a :class:`Verdict` (a refusal carries a reason), and
``rewrite(match, graph)`` computes the new initializers, rewires edges and disconnects what is
replaced — no cleanup, the pipeline does it. :func:`apply_rules` runs a rule set over every graph
and subgraph and fills a PassResult.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Iterable, TypeVar

import onnx_graphsurgeon as gs

from onnxcompress.graph.query import consumers, iter_graphs

__all__ = [
    "replace_input",
    "replace_all_uses",
    "replace_output",
    "disconnect",
    "Verdict",
    "Rule",
    "apply_rules",
]


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> int:
    """Make ``node`` read ``new`` wherever it read ``old``; return how many slots changed."""
    n = 0
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new
            n += 1
    return n


def replace_all_uses(old: gs.Tensor, new: gs.Tensor, *, graph: gs.Graph | None = None) -> int:
    """Every reader of ``old`` reads ``new``; graph outputs naming ``old`` are swapped too."""
    n = 0
    for c in consumers(old):
        n += replace_input(c, old, new)
    if graph is not None:
        for g in iter_graphs(graph):
            for i, t in enumerate(g.outputs):
                if t is old:
                    g.outputs[i] = new
                    n += 1
    return n


def replace_output(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(node.outputs):
        if t is old:
            node.outputs[i] = new


def disconnect(node: gs.Node) -> None:
    """Detach a node from the graph (the pipeline's cleanup removes it)."""
    node.inputs.clear()
    node.outputs.clear()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> "Verdict":
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> "Verdict":
        return cls(False, reason)

    def __bool__(self) -> bool:
        return self.ok


M = TypeVar("M")


class Rule(Generic[M]):
    """One local rewrite. ``name`` appears in Skips and change lines."""

    name: str = "rule"

    def match(self, node: gs.Node, graph: gs.Graph) -> M | None:  # pragma: no cover - interface
        raise NotImplementedError

    def check(self, match: M, graph: gs.Graph) -> Verdict:  # pragma: no cover - interface
        raise NotImplementedError

    def rewrite(self, match: M, graph: gs.Graph, ctx: Any) -> str:  # pragma: no cover - interface
        """Apply the rewrite; return a one-line description of the change."""
        raise NotImplementedError


def apply_rules(rules: Iterable[Rule], graph: gs.Graph, ctx: Any, result) -> None:
    """Run each rule once over every node of the graph and its subgraphs, recording into ``result``.

    A node disconnected by an earlier rewrite is not matched again.
    """
    for rule in rules:
        for g in list(iter_graphs(graph)):
            for node in list(g.nodes):
                if not node.outputs and not node.inputs:
                    continue
                m = rule.match(node, g)
                if m is None:
                    continue
                verdict = rule.check(m, g)
                if not verdict:
                    result.skip(node.name or node.op, rule.name, verdict.reason)
                    continue
                result.changed(rule.rewrite(m, g, ctx))
