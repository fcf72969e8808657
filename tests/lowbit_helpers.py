"""Shared helpers of the int4 / embedding / fp16 tests: run one pass on a model, count ops, run it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from onnxcompress.context import Context
from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
from onnxcompress.passes.base import Pipeline


def apply_pass(model: onnx.ModelProto, pass_obj, *, data=None, notes: list | None = None):
    """Run one pass through the Pipeline; return (checked model, PassResult). ``notes`` (a list) gets the
    run's summary notes."""
    src = open_model(model)
    graph = model_to_graph(src)
    with Context(data=data) as ctx:
        ctx.original = src
        result = Pipeline([pass_obj]).run(graph, ctx)[0]
        if notes is not None:
            notes.extend(ctx.notes)
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


def tiny_encoder(*, seed: int = 0, vocab: int = 64, seq: int = 16, d: int = 64, ff: int = 128,
                 opset: int = 17) -> onnx.ModelProto:
    """A one-layer, one-head BERT-shaped encoder: token + position embeddings, LayerNorm, attention with
    an exported-style additive mask (−3.4e38 on padded positions), residuals, a ReLU feed-forward,
    mean pooling and a classifier. Inputs ``tokens`` int64 [N, seq], ``mask`` int64 [N, seq]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name, *shape, scale=None):
        s = scale if scale is not None else 1 / np.sqrt(shape[0])
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    def c(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    inits = [w("tok_emb", vocab, d, scale=0.5), w("pos_emb", seq, d, scale=0.1),
             c("ln1_g", np.ones(d)), c("ln1_b", np.zeros(d)), c("ln2_g", np.ones(d)), c("ln2_b", np.zeros(d)),
             w("Wq", d, d), w("Wk", d, d), w("Wv", d, d), w("Wo", d, d), w("W1", d, ff), w("W2", ff, d),
             c("b1", rng.standard_normal(ff) * 0.1), w("Wc", 10, d), c("bc", np.zeros(10)),
             c("one", 1.0), c("neg_big", np.finfo(np.float32).min), c("inv_sqrt_d", 1 / np.sqrt(d)),
             c("unsq_axes", [1], np.int64)] + ([c("pool_axes", [1], np.int64)] if opset >= 18 else [])
    n = helper.make_node
    nodes = [
        n("Gather", ["tok_emb", "tokens"], ["emb"], name="embed"),
        n("Add", ["emb", "pos_emb"], ["h0"], name="add_pos"),
        n("LayerNormalization", ["h0", "ln1_g", "ln1_b"], ["h"], name="ln1", axis=-1),
        n("MatMul", ["h", "Wq"], ["q"], name="q_proj"),
        n("MatMul", ["h", "Wk"], ["k"], name="k_proj"),
        n("MatMul", ["h", "Wv"], ["v"], name="v_proj"),
        n("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["s0"], name="scores"),
        n("Mul", ["s0", "inv_sqrt_d"], ["s1"], name="scale"),
        n("Cast", ["mask"], ["mf"], name="mask_float", to=TensorProto.FLOAT),
        n("Sub", ["one", "mf"], ["inv"], name="mask_inv"),
        n("Mul", ["inv", "neg_big"], ["bias0"], name="mask_bias"),
        n("Unsqueeze", ["bias0", "unsq_axes"], ["bias"], name="mask_unsq"),
        n("Add", ["s1", "bias"], ["s2"], name="add_mask"),
        n("Softmax", ["s2"], ["p"], name="softmax", axis=-1),
        n("MatMul", ["p", "v"], ["ctx"], name="context"),
        n("MatMul", ["ctx", "Wo"], ["o"], name="o_proj"),
        n("Add", ["h", "o"], ["r1"], name="residual1"),
        n("LayerNormalization", ["r1", "ln2_g", "ln2_b"], ["h2"], name="ln2", axis=-1),
        n("MatMul", ["h2", "W1"], ["f0"], name="ff1"),
        n("Add", ["f0", "b1"], ["f1"], name="ff1_bias"),
        n("Relu", ["f1"], ["f2"], name="ff_relu"),
        n("MatMul", ["f2", "W2"], ["f3"], name="ff2"),
        n("Add", ["h2", "f3"], ["r2"], name="residual2"),
        n("ReduceMean", ["r2", "pool_axes"] if opset >= 18 else ["r2"], ["pooled"], name="pool", keepdims=0,
          **({} if opset >= 18 else {"axes": [1]})),
        n("Gemm", ["pooled", "Wc", "bc"], ["logits"], name="classifier", transB=1),
    ]
    g = helper.make_graph(nodes, "tiny_encoder",
                          [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["N", seq]),
                           helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", seq])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def encoder_feeds(n: int, *, seed: int = 0, vocab: int = 64, seq: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, seq), np.int64)
    for i in range(n):
        mask[i, rng.integers(seq // 2, seq + 1):] = 0
    return {"tokens": rng.integers(0, vocab, (n, seq)).astype(np.int64), "mask": mask}


def bundled(name: str) -> onnx.ModelProto:
    """A bundled digits model, or skip the test when it has not been built."""
    import pytest

    from onnxcompress import datasets

    try:
        return onnx.load(datasets.bundled_model_path(name))
    except Exception as e:  # built by tools/build_models.py
        pytest.skip(f"bundled digits model {name!r} not available: {e}")
