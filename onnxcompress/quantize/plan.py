"""The quantization plan: a value one can inspect, print and replay.

For every node the int8 pass looked at, one :class:`NodePlan` (quantized or not, why, the form used:
``qdq``, ``dynamic``, ``storage``, ``float``); for every quantized tensor one :class:`TensorPlan`
(its range, scale and zero point, where the range came from). ``Plan.to_dict()`` is JSON-safe and is
written into ``PassResult.details["plan"]`` (and so into the report); :meth:`Plan.ranges` gives back
the calibrated ranges, which is what ``--calib-cache`` stores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Plan", "NodePlan", "TensorPlan"]


@dataclass
class NodePlan:
    node: str
    op: str
    form: str  # "qdq", "dynamic", "storage", "float", "fused" (a Relu absorbed by a Q)
    reason: str = ""
    weight: dict[str, Any] | None = None
    graph: str = ""


@dataclass
class TensorPlan:
    tensor: str
    lo: float
    hi: float
    scale: float
    zero_point: int
    type: str
    source: str  # "calibrated", "cache", "same as <tensor>", "relu <node>"


@dataclass
class Plan:
    mode: str
    method: str = ""
    nodes: list[NodePlan] = field(default_factory=list)
    tensors: list[TensorPlan] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, node, form: str, reason: str = "", *, weight: dict | None = None, graph: str = "") -> NodePlan:
        entry = NodePlan(node.name or node.op, node.op, form, reason, weight, graph)
        self.nodes.append(entry)
        return entry

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.form] = out.get(n.form, 0) + 1
        return out

    def node(self, name: str) -> NodePlan | None:
        return next((n for n in self.nodes if n.node == name), None)

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {t.tensor: (t.lo, t.hi) for t in self.tensors}

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "method": self.method, "counts": self.counts(),
                "nodes": [{k: v for k, v in asdict(n).items() if v not in (None, "")} for n in self.nodes],
                "tensors": [asdict(t) for t in self.tensors], "notes": list(self.notes)}
