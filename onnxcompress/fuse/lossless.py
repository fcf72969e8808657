"""The ``fuse`` pass: every lossless merge rule, applied until the graph stops changing.

Rules, in the order they run each round (the math of each is in its module):

* :mod:`weight_fold`: ``transpose_constant``, ``scale_after_linear``, ``scale_before_linear``
* :mod:`bn_folding`: ``bn_after_linear``, ``bn_before_linear``
* :mod:`linear_merge`: ``consecutive_conv1x1``, ``consecutive_linear``, ``parallel_linear``,
  ``matmul_add_to_gemm``

A round runs each rule once over the graph and its subgraphs (:func:`apply_rules`); rounds repeat
(at most ``max_rounds``) while a round changed something, so chains such as
Conv → BN → Mul or MatMul → Add → MatMul → Add fold completely. The skips reported are those of the
last round: places where a rule still declines in the final graph. Ranks come from ONNX shape
inference once per run (rules that depend on a rank decline when it is unknown). The result is
exact up to float rounding (new weights are computed in float64 and rounded once), so the pass is
verified with the lossless budget.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxcompress.fuse.bn_folding import BnAfterLinear, BnBeforeLinear
from onnxcompress.fuse.linear_merge import ConsecutiveConv1x1, ConsecutiveLinear, MatMulAddToGemm, ParallelLinear
from onnxcompress.fuse.patterns import RuleContext, infer_ranks
from onnxcompress.fuse.weight_fold import ScaleAfterLinear, ScaleBeforeLinear, TransposeConstant
from onnxcompress.graph.naming import Namer
from onnxcompress.graph.rewrite import Rule, apply_rules
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.recipe import StepConfig, option

__all__ = ["FuseConfig", "FusePass", "RULE_NAMES", "make_rules"]

RULE_NAMES = ("transpose_constant", "scale_after_linear", "scale_before_linear", "bn_after_linear",
              "bn_before_linear", "consecutive_conv1x1", "consecutive_linear", "parallel_linear",
              "matmul_add_to_gemm")


def make_rules(rc: RuleContext, names: tuple[str, ...] = RULE_NAMES) -> list[Rule]:
    """The rule objects for ``names``, in the canonical order."""
    table = {
        "transpose_constant": lambda: TransposeConstant(),
        "scale_after_linear": lambda: ScaleAfterLinear(rc),
        "scale_before_linear": lambda: ScaleBeforeLinear(rc),
        "bn_after_linear": lambda: BnAfterLinear(rc),
        "bn_before_linear": lambda: BnBeforeLinear(rc),
        "consecutive_conv1x1": lambda: ConsecutiveConv1x1(rc),
        "consecutive_linear": lambda: ConsecutiveLinear(rc),
        "parallel_linear": lambda: ParallelLinear(rc),
        "matmul_add_to_gemm": lambda: MatMulAddToGemm(rc),
    }
    return [table[n]() for n in RULE_NAMES if n in names]


@dataclass(frozen=True)
class FuseConfig(StepConfig):
    name = "fuse"
    order = 3

    enabled: bool = option(True, "lossless merges: fold BatchNormalization, constant transposes and scalings "
                                 "into weights; merge consecutive and parallel linear layers; MatMul+Add -> "
                                 "Gemm for 2-D inputs", flag="--fuse")
    rules: tuple[str, ...] = option(RULE_NAMES, "which merge rules to apply, comma separated",
                                    flag="--fuse-rules", choices=RULE_NAMES, metavar="LIST")
    max_rounds: int = option(4, "apply the rules again while a round still changes the graph, at most this often",
                             minimum=1, maximum=100)


class FusePass(Pass):
    config_cls = FuseConfig
    lossless = True

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        cfg = self.config
        if not cfg.enabled:
            res.details = {"enabled": False}
            return res
        rc = RuleContext(Namer.for_graph(graph), infer_ranks(graph), int(graph.opset or 13))
        rules = make_rules(rc, cfg.rules)
        counts: Counter[str] = Counter()
        rounds = 0
        last = PassResult()
        for _ in range(cfg.max_rounds):
            rounds += 1
            last = PassResult()
            for rule in rules:
                before = len(last.changes)
                apply_rules([rule], graph, ctx, last)
                counts[rule.name] += len(last.changes) - before
            for line in last.changes:
                res.changed(line)
            if not last.modified:
                break
        seen = set()
        for s in last.skipped:
            key = (s.node, s.rule, s.reason)
            if key not in seen:
                seen.add(key)
                res.skipped.append(s)
        res.details = {"enabled": True, "rounds": rounds, "rules": list(cfg.rules),
                       "applied": {k: v for k, v in counts.items() if v}, "changes": list(res.changes)}
        return res

