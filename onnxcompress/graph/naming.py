"""Unique names for new tensors and nodes, derived from the names they replace.

A :class:`Namer` is built once per pass run from every tensor and node name in the model (subgraphs
included) and hands out ``<base>_<suffix>`` names, adding ``_1``, ``_2`` ... on collision, so new
names stay readable (``fc1.weight_quantized``) and never shadow an outer-scope name.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxcompress.graph.query import iter_graphs

__all__ = ["Namer"]


class Namer:
    """Hands out names unused anywhere in the model; remembers what it handed out."""

    def __init__(self, used: set[str] | None = None) -> None:
        self._used: set[str] = set(used or ())
        self._short = 0

    @classmethod
    def for_graph(cls, graph: gs.Graph) -> "Namer":
        used: set[str] = set()
        for g in iter_graphs(graph):
            used.update(g.tensors().keys())
            used.update(n.name for n in g.nodes if n.name)
            used.update(t.name for t in g.inputs)
            used.update(t.name for t in g.outputs)
        return cls(used)

    def fresh(self, base: str, suffix: str = "") -> str:
        """``base_suffix`` (or ``base``), made unique."""
        stem = f"{base}_{suffix}" if suffix else base
        name, i = stem, 1
        while name in self._used:
            name = f"{stem}_{i}"
            i += 1
        self._used.add(name)
        return name

    def short(self, prefix: str = "~") -> str:
        """The next unused ``<prefix><n>`` (``~0``, ``~1`` ...): for tensors nobody reads by name, such as
        the inside of a decode chain that onnxruntime folds away at load, where long names are only
        file overhead."""
        while True:
            name = f"{prefix}{self._short:x}"
            self._short += 1
            if name not in self._used:
                self._used.add(name)
                return name
