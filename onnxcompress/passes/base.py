"""The pass protocol: Pass, PassResult, Skip and the Pipeline that runs them.

A **pass** mutates an onnx-graphsurgeon graph in place and returns a :class:`PassResult`: whether it
changed anything, a line per change, a :class:`Skip` per place where a rule did not apply (with the
reason), and ``details``, a JSON-safe dict for what the pass wants recorded (a quantization plan,
kept channel indices, codebook sizes). "The rule did not apply here" is a Skip, never an exception.

A pass does not clean up after itself: it rewires edges and disconnects what it replaced. The
:class:`Pipeline` runs ``cleanup().toposort()`` once after every pass that modified the graph, wraps
unexpected exceptions in :class:`~onnxcompress.errors.PassError` naming the pass (``raise ... from``
the cause), prefixes library errors with the pass name, and records every step in the report.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_graphsurgeon as gs

from onnxcompress.errors import OnnxCompressError, PassError

if TYPE_CHECKING:  # pragma: no cover
    from onnxcompress.context import Context
    from onnxcompress.recipe import StepConfig
    from onnxcompress.report import Report

__all__ = ["Pass", "PassResult", "Skip", "Pipeline", "cleanup_graph"]

log = logging.getLogger("onnxcompress")


@dataclass(frozen=True)
class Skip:
    """A place where a rule declined, and why."""

    node: str
    rule: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class PassResult:
    """What one pass did. ``details`` must be JSON-safe."""

    modified: bool = False
    changes: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def changed(self, line: str) -> None:
        """Record one change and mark the graph modified."""
        self.modified = True
        self.changes.append(line)

    def skip(self, node: str, rule: str, reason: str) -> None:
        self.skipped.append(Skip(node, rule, reason))


class Pass(ABC):
    """One technique. Subclasses set ``config_cls`` (its StepConfig) and implement :meth:`run`.

    ``lossless`` says which verification budget applies: True means the outputs must match within
    float rounding; False means the technique's task-metric budget (cosine, top-1).
    """

    config_cls: ClassVar[type["StepConfig"]]
    lossless: ClassVar[bool] = True

    def __init__(self, config: "StepConfig | None" = None) -> None:
        self.config = config if config is not None else self.config_cls()

    @property
    def name(self) -> str:
        return self.config_cls.name

    @abstractmethod
    def run(self, graph: gs.Graph, ctx: "Context") -> PassResult:
        """Rewrite ``graph`` in place and say what changed."""

    def note_unmatched(self, ctx: "Context | None", graph: gs.Graph, option: str, patterns=None, *,
                       ops: bool = False, names=None, what: str = "") -> None:
        """Tell the user, in a summary note, which entries of the config field ``option`` (node-name
        patterns, or op types with ``ops``) select nothing in ``graph``; call it before the pass renames
        anything. ``patterns`` defaults to the field's value; ``names``/``what``: what it can select
        (default: any node name; see :func:`~onnxcompress.graph.query.unmatched_note`). The note
        names the field's CLI flag."""
        from dataclasses import fields

        from onnxcompress.graph.query import unmatched_note

        meta = next(f.metadata for f in fields(self.config) if f.name == option)
        values = getattr(self.config, option) if patterns is None else patterns
        text = unmatched_note(self.name, meta.get("flag") or option, values, graph, ops=ops, names=names, what=what)
        if text and ctx is not None:
            ctx.note(text)


def cleanup_graph(graph: gs.Graph) -> gs.Graph:
    """Drop dead nodes and unused tensors (subgraphs too) and sort topologically.

    Graph inputs are kept even when unused: removing one would change the model's interface.
    """
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
    graph.toposort(recurse_subgraphs=True)
    return graph


class Pipeline:
    """Runs passes in order, cleans up after each that changed the graph, records every step."""

    def __init__(self, passes: list[Pass]) -> None:
        self.passes = list(passes)

    def run(self, graph: gs.Graph, ctx: "Context", report: "Report | None" = None) -> list[PassResult]:
        results = []
        steps = ctx.progress_bar(self.passes, desc="passes", unit="pass")
        for p in steps:
            if hasattr(steps, "set_postfix_str"):
                steps.set_postfix_str(p.name)
            t0 = time.perf_counter()
            log.info("running pass %s", p.name)
            try:
                result = p.run(graph, ctx)
                if result is None:  # a bug in the pass, not a user error
                    raise TypeError("run() returned None instead of a PassResult")
                if result.modified:
                    cleanup_graph(graph)
                    if ctx.spill_dir is not None:
                        from onnxcompress.graph.io import spill

                        spill(graph, ctx.spill_dir, ctx.spill_bytes)
            except OnnxCompressError as e:
                raise e.with_where(f"pass {p.name}")
            except Exception as e:
                raise PassError(f"unexpected {type(e).__name__}: {e}", where=f"pass {p.name}",
                                hint="this is a bug in onnxcompress; re-run with -v for the traceback and "
                                     f"leave the pass out of the recipe to work around it") from e
            seconds = time.perf_counter() - t0
            log.info("pass %s: %d changes, %d skipped, %.2fs", p.name, len(result.changes),
                     len(result.skipped), seconds)
            if report is not None:
                report.add_step(p, result, graph, seconds)
            results.append(result)
        return results
