"""Helpers for the fuse / share_weights / low_rank tests: tiny models from ONNX text, pass runner, checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

import builders as b
from onnxcompress.context import Context
from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
from onnxcompress.passes.base import Pipeline

CORPUS = Path(onnx.__file__).parent / "backend" / "test" / "data"


def parse(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    """A model from ONNX text; ``weights`` become initializers (names with '_' for '.')."""
    m = onnx.parser.parse_model(text)
    for name, arr in weights.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    onnx.checker.check_model(m)
    return m


def header(opset: int = 17) -> str:
    return f'<ir_version: 8, opset_import: ["" : {opset}]>'


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def apply(model: onnx.ModelProto, *passes, data=None):
    """Run passes through the Pipeline (cleanup after each), export, check; return (model, results)."""
    graph = model_to_graph(open_model(model))
    with Context(data=data) as ctx:
        results = Pipeline(list(passes)).run(graph, ctx)
    out = graph_to_model(graph, model)
    onnx.checker.check_model(out)
    return out, results


def ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def max_rel_err(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """max over outputs of max|ref - out| / max(max|ref|, 1e-12)."""
    worst = 0.0
    for r, o in zip(ref, out):
        r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
        assert r64.shape == o64.shape
        diff = np.where(r64 == o64, 0.0, np.abs(r64 - o64))  # equal infinities are equal
        scale = float(np.max(np.abs(r64[np.isfinite(r64)]), initial=0))
        worst = max(worst, float(np.max(diff, initial=0)) / max(scale, 1e-12))
    return worst


def assert_lossless(model: onnx.ModelProto, out: onnx.ModelProto, feeds: dict, rel: float = 1e-5) -> None:
    """Outputs equal within ``rel`` of the output's largest magnitude (the merges' budget)."""
    ref, got = b.run(model, feeds), b.run(out, feeds)
    err = max_rel_err(ref, got)
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def bundled(name: str) -> Path | None:
    p = Path(__file__).resolve().parent.parent / "models" / f"{name}.onnx"
    return p if p.is_file() else None
