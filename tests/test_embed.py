"""quantize_embedding: structure (GatherBlockQuantized or a folded decode chain), numbers (exactly the
numpy dequantized rows; within half a quantization step of the fp32 rows for RTN), file size, and
declines (tied tables, axis != 0, constant indices, small tables)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import builders
from lowbit_helpers import apply_pass, op_counts, run1, skip_reasons
from onnxcompress.quantize.embed import QuantizeEmbeddingConfig, QuantizeEmbeddingPass
from onnxcompress.quantize.int4 import quantize_blocks

GBQ = "com.microsoft::GatherBlockQuantized"


def _table(v: int = 100, d: int = 64, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((v, d)) * 0.5).astype(np.float32)


def _embedding_model(table: np.ndarray, *, opset: int = 17, extra_nodes=(), axis: int = 0, ids_const=False):
    v, d = table.shape
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed", axis=axis),
             helper.make_node("Relu", ["e"], ["y"], name="relu"), *extra_nodes]
    inits = [numpy_helper.from_array(table, "E")]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])]
    if ids_const:
        inits.append(numpy_helper.from_array(np.array([[1, 2, 3, 4, 5]], np.int64), "ids"))
        inputs = [helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1])]
    y_shape = ["N", 5, d] if axis == 0 else [v, "N", 5]
    if ids_const:
        y_shape = [1, 5, d] if axis == 0 else [v, 1, 5]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)]
    outs += [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, [2, d]) for n in extra_nodes]
    g = helper.make_graph(nodes, "emb", inputs, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _ids(v: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, v, (3, 5)).astype(np.int64)


@pytest.mark.parametrize("fmt,bits,opset,d", [
    ("gather_block_quantized", 4, 17, 64), ("gather_block_quantized", 8, 17, 64),
    ("decode", 4, 17, 64), ("decode", 4, 21, 64), ("decode", 8, 17, 64),
    ("gather_block_quantized", 4, 21, 40),  # 40 % 32 != 0: falls back to the decode form
])
def test_structure_and_exact_rows(fmt, bits, opset, d):
    table = _table(d=d)
    m = _embedding_model(table, opset=opset)
    cfg = QuantizeEmbeddingConfig(format=fmt, bits=bits, method="rtn", min_elements=0)
    out, res = apply_pass(m, QuantizeEmbeddingPass(cfg))
    ops = op_counts(out)
    used = res.details["tables"][0]["format"]
    assert used == ("decode" if d % 32 else fmt)
    if used == "gather_block_quantized":
        assert ops[GBQ] == 1 and ops["Gather"] == 0
    else:
        assert ops["Gather"] == 1 and ops["Cast"] >= 2 and ops["Mul"] >= 1
        assert not any(t.data_type == TensorProto.FLOAT and t.name == "E" for t in out.graph.initializer)
    ids = _ids(100)
    expect = np.maximum(quantize_blocks(table, 32, bits=bits).dequant()[ids], 0)
    for optimize in (False, True):  # the decode chain is folded at load when optimizing
        got = run1(out, {"ids": ids}, optimize=optimize)
        assert np.array_equal(got, expect)


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_rows_within_half_a_step_and_file_shrinks(bits):
    table = _table(v=200, d=128)
    m = _embedding_model(table)
    out, res = apply_pass(m, QuantizeEmbeddingPass(QuantizeEmbeddingConfig(bits=bits, method="rtn")))
    bq = quantize_blocks(table, 32, bits=bits)
    ids = _ids(200)
    got = run1(out, {"ids": ids})
    step = np.repeat(bq.scale, 32, axis=1)[ids]  # the step of each gathered element
    assert np.all(np.abs(got - np.maximum(table[ids], 0)) <= 0.5 * step + 1e-6)
    ratio = out.ByteSize() / m.ByteSize()
    assert ratio < (0.20 if bits == 4 else 0.32), ratio  # 4 bits + scale/zero per 32: ~0.16; 8 bits ~0.28


def test_search_error_not_above_rtn():
    table = (np.random.default_rng(3).standard_t(3, size=(256, 64)) * 0.1).astype(np.float32)
    m = _embedding_model(table)
    errs = {}
    for method in ("rtn", "search"):
        _, res = apply_pass(m, QuantizeEmbeddingPass(QuantizeEmbeddingConfig(method=method)))
        errs[method] = res.details["tables"][0]["rel_error"]
    assert errs["search"] < errs["rtn"]


def test_declines_tied_axis_constant_indices_and_small():
    table = _table()
    tied = helper.make_node("MatMul", ["q", "E"], ["logits"], name="lm_head")  # reads the table too
    m = _embedding_model(table, extra_nodes=[tied])
    m.graph.input.append(helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 100]))
    out, res = apply_pass(m, QuantizeEmbeddingPass(QuantizeEmbeddingConfig()))
    assert op_counts(out) == {"Gather": 1, "Relu": 1, "MatMul": 1}
    assert any("tied" in r for r in skip_reasons(res))

    out, res = apply_pass(_embedding_model(table, axis=1), QuantizeEmbeddingPass(QuantizeEmbeddingConfig()))
    assert GBQ not in op_counts(out) and any("axis 1" in r for r in skip_reasons(res))

    out, res = apply_pass(_embedding_model(table, ids_const=True), QuantizeEmbeddingPass(QuantizeEmbeddingConfig()))
    assert GBQ not in op_counts(out) and any("constant" in r for r in skip_reasons(res))

    out, res = apply_pass(_embedding_model(_table(v=10, d=32)), QuantizeEmbeddingPass(QuantizeEmbeddingConfig()))
    assert GBQ not in op_counts(out) and any("min_elements" in r for r in skip_reasons(res))
    assert not res.modified


def test_declines_a_table_another_gather_reads_with_constant_indices():
    """A fixed lookup (a BOS row: Gather(E, 7)) beside the token lookup: the constant-index Gather
    declines, so quantizing the table for the other one used to keep the float table for it and
    add the 4-bit copy — a 'compressed' file 1.17x larger."""
    table = _table(v=1000)
    bos = helper.make_node("Gather", ["E", "bos"], ["b"], name="bos_embed")
    m = _embedding_model(table, extra_nodes=[bos])
    m.graph.initializer.append(numpy_helper.from_array(np.array([7, 7], np.int64), "bos"))
    out, res = apply_pass(m, QuantizeEmbeddingPass(QuantizeEmbeddingConfig()))
    assert not res.modified and op_counts(out) == op_counts(m)
    assert any("also read by Gather 'bos_embed'" in r and "add a copy" in r for r in skip_reasons(res))


@pytest.mark.parametrize("variant", ["constant_nodes", "if_subgraph"])
def test_tables_in_constant_nodes_and_if_subgraphs(variant):
    table = _table()
    m = _embedding_model(table)
    m = builders.with_constant_nodes(m) if variant == "constant_nodes" else builders.with_if_subgraph(m)
    out, res = apply_pass(m, QuantizeEmbeddingPass(QuantizeEmbeddingConfig(method="rtn")))
    assert op_counts(out)[GBQ] == (1 if variant == "constant_nodes" else 2)
    ids = _ids(100)
    expect = np.maximum(quantize_blocks(table, 32).dequant()[ids], 0)
    assert np.array_equal(run1(out, {"ids": ids}), expect)


def test_bundled_transformer_keeps_accuracy_with_int4_preset():
    datasets = pytest.importorskip("onnxcompress.datasets")
    try:
        path = datasets.bundled_model_path("transformer")
    except Exception as e:
        pytest.skip(f"bundled digits transformer not available: {e}")
    from onnxcompress.quantize.int4 import QuantizeInt4Config, QuantizeInt4Pass

    fp32 = onnx.load(path)
    mid, res_e = apply_pass(fp32, QuantizeEmbeddingPass(QuantizeEmbeddingConfig()))
    out, _ = apply_pass(mid, QuantizeInt4Pass(QuantizeInt4Config(accuracy_level=0)))
    assert res_e.details["tables"], "the transformer's token embedding should be quantized"
    assert out.ByteSize() < 0.35 * fp32.ByteSize()
    assert datasets.digits_accuracy(out) >= datasets.digits_accuracy(fp32) - 0.02


def test_encoder_shrinks_as_a_whole_with_int4_and_4bit_embeddings():
    from lowbit_helpers import encoder_feeds, tiny_encoder

    from onnxcompress.quantize.int4 import QuantizeInt4Config, QuantizeInt4Pass

    m = tiny_encoder()
    feeds = encoder_feeds(64)
    ref = builders.run(m, feeds)[0]
    mid, res_e = apply_pass(m, QuantizeEmbeddingPass(QuantizeEmbeddingConfig()))
    out, res_q = apply_pass(mid, QuantizeInt4Pass(QuantizeInt4Config(accuracy_level=0, min_elements=0,
                                                                      keep_last=False)))
    ops = op_counts(out)
    assert ops[GBQ] == 1 and ops["com.microsoft::MatMulNBits"] == 7  # q, k, v, o, ff1, ff2, classifier
    assert ops["MatMul"] == 2  # attention scores and context: both inputs are activations
    assert {s.node for s in res_q.skipped} == {"scores", "context"}
    assert out.ByteSize() < 0.25 * m.ByteSize()
    got = run1(out, feeds)
    cos = float(np.sum(got * ref) / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.97  # random weights, 4-bit everywhere: measured 0.989
