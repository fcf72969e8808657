"""Shared helpers of the int4 / embedding / fp16 tests: run one pass on a model, count ops, run it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from onnxcompress.context import Context
from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
from onnxcompress.passes.base import Pipeline


def apply_pass(model: onnx.ModelProto, pass_obj, *, data=None):
    """Run one pass through the Pipeline; return (checked model, PassResult)."""
    src = open_model(model)
    graph = model_to_graph(src)
    with Context(data=data) as ctx:
        ctx.original = src
        result = Pipeline([pass_obj]).run(graph, ctx)[0]
    out = graph_to_model(graph, src.model)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def op_counts(model: onnx.ModelProto, *, subgraphs: bool = True) -> Counter:
    """Op types (``domain::op`` for custom domains) of the graph and, optionally, its subgraphs."""
    counts: Counter = Counter()

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            counts[f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type] += 1
            if subgraphs:
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.GRAPH:
                        walk(a.g)

    walk(model.graph)
    return counts


def session(model: onnx.ModelProto, *, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run1(model: onnx.ModelProto, feeds: dict, *, optimize: bool = True) -> np.ndarray:
    """First output of the model on the CPU execution provider."""
    return session(model, optimize=optimize).run(None, feeds)[0]


def skip_reasons(result) -> list[str]:
    return [s.reason for s in result.skipped]


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()
