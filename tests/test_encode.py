"""compact_storage: exact codebook / bitmask / gap-encoded storage that onnxruntime folds at load.

Three ways: the structure (which encoding, which ops, how many bytes), the numbers (outputs and
decoded weights bit-identical to the dense model, with and without onnxruntime's optimizations; the
decode folds away in the optimized graph) and the refusals (graph outputs, small or dense weights,
old opsets, unsupported dtypes).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import builders as b
from onnxcompress.context import Context
from onnxcompress.encode.codebook import work_array
from onnxcompress.encode.compact import CompactStorageConfig, CompactStoragePass, _candidates
from onnxcompress.encode.decoder import DecodeBuilder
from onnxcompress.encode.packing import pack_bits, packed_nbytes, unpack_bits
from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
from onnxcompress.graph.naming import Namer
from onnxcompress.passes.base import Pipeline
from onnxcompress.recipe import Recipe
from onnxcompress.recipes import lossless_steps


def apply_passes(model: onnx.ModelProto, *passes):
    """Run passes through the Pipeline; return (model, results)."""
    src = open_model(model)
    graph = model_to_graph(src)
    ctx = Context()
    ctx.original = src
    results = Pipeline(list(passes)).run(graph, ctx)
    out = graph_to_model(graph, src.model)
    return out, results


def ops(model: onnx.ModelProto) -> list[str]:
    """Every op in the graph and its subgraphs."""
    found = []

    def walk(g):
        for n in g.node:
            found.append(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(model.graph)
    return found


def optimized_ops(model: onnx.ModelProto) -> list[str]:
    """Ops left after onnxruntime's default (ORT_ENABLE_ALL) optimizations, subgraphs included."""
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return ops(onnx.load(so.optimized_model_filepath))


def sparse_mlp(*, sparsity: float, levels: int | None = None, opset: int = 18, seed: int = 0,
               sizes=(64, 300, 100)) -> onnx.ModelProto:
    """MatMul-Add-Relu MLP whose weights are ``sparsity`` zeros, optionally on ``levels`` values (0 included)."""
    rng = np.random.default_rng(seed)
    m = b.mlp(sizes, seed=seed, opset=opset)
    for init in m.graph.initializer:
        w = numpy_helper.to_array(init).copy()
        if w.ndim != 2:
            continue
        if levels is not None:
            grid = np.linspace(-1, 1, levels - 1, dtype=np.float32) * float(np.abs(w).max())
            w = grid[np.abs(w[..., None] - grid).argmin(-1)]
        w[rng.random(w.shape) < sparsity] = 0
        init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    return m


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every tensor in the model (initializers and Constant values, subgraphs included)."""
    from onnxcompress.graph.io import iter_tensor_protos

    return sum(len(t.raw_data) or t.ByteSize() for t, _ in iter_tensor_protos(model.graph))


def feed(model: onnx.ModelProto, n: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    dim = model.graph.input[0].type.tensor_type.shape.dim
    shape = [n] + [d.dim_value for d in dim[1:]]
    return {model.graph.input[0].name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def assert_bit_identical(ref: onnx.ModelProto, out: onnx.ModelProto, feeds) -> None:
    for optimize in (False, True):
        for r, o in zip(b.run(ref, feeds, optimize=optimize), b.run(out, feeds, optimize=optimize)):
            assert r.dtype == o.dtype and np.array_equal(r.view(np.uint8), o.view(np.uint8))


# ------------------------------------------------------------------------------------------------
# structure and size


@pytest.mark.parametrize("opset", [18, 21, 25])
def test_sparse_mlp_shrinks_and_stays_bit_identical(opset):
    ref = sparse_mlp(sparsity=0.9, opset=opset)
    out, (res,) = apply_passes(ref, CompactStoragePass())
    onnx.checker.check_model(out, full_check=True)
    table = res.details["tensors"]
    for name in ("W0", "W1"):
        layout = table[name]["encoding"].split("+")[0]
        assert layout == "bitmask" or layout.startswith("gaps"), layout
    assert "B0" not in table  # 300 elements < min_elements
    # float values: the target is <= 0.35x fp32 for 90 % sparse weights
    for name in ("W0", "W1"):
        assert table[name]["encoded_bytes"] <= 0.35 * table[name]["dense_bytes"]
    assert sum(n.op_type == "MatMul" and n.input[1] in ("W0", "W1") for n in out.graph.node) == 2
    assert {"ScatterElements", "Gather"} & set(ops(out))
    assert weight_bytes(out) <= 0.35 * weight_bytes(ref)
    assert_bit_identical(ref, out, feed(ref))
    # onnxruntime folds the decode at load: only the model's own ops remain
    assert sorted(set(optimized_ops(out))) == sorted(set(optimized_ops(ref)))


def test_codebook_values_reach_deep_compression_size():
    ref = sparse_mlp(sparsity=0.9, levels=16)
    out, (res,) = apply_passes(ref, CompactStoragePass())
    table = res.details["tensors"]
    for name in ("W0", "W1"):
        assert "codebook" in table[name]["encoding"]
        assert table[name]["encoded_bytes"] <= 0.06 * table[name]["dense_bytes"], table[name]
    assert_bit_identical(ref, out, feed(ref))


def test_dense_codebook_without_sparsity_uses_packed_indices():
    ref = sparse_mlp(sparsity=0.0, levels=16, opset=21)
    out, (res,) = apply_passes(ref, CompactStoragePass())
    assert res.details["tensors"]["W0"]["encoding"] == "codebook4"
    packed = [t for t in out.graph.initializer if t.data_type == TensorProto.UINT4]
    # native uint4 indices at opset 21, both weights' streams pooled into one tensor cut by one Split
    assert len(packed) == 1 and packed[0].dims == [64 * 300 + 300 * 100]
    assert ops(out).count("Split") == 1
    assert_bit_identical(ref, out, feed(ref))


def test_decoded_output_keeps_the_weight_name():
    ref = sparse_mlp(sparsity=0.9)
    out, _ = apply_passes(ref, CompactStoragePass())
    produced = {o for n in out.graph.node for o in n.output}
    assert {"W0", "W1"} <= produced
    assert not {"W0", "W1"} & {t.name for t in out.graph.initializer}


def test_every_preset_ends_with_compact_storage():
    assert isinstance(lossless_steps()[-1], CompactStorageConfig)
    from onnxcompress.recipes import default_recipe

    assert default_recipe().steps[-1].name == "compact_storage"


def test_recipe_round_trip_and_validation():
    r = Recipe.from_dict({"steps": [{"pass": "compact_storage", "forms": ["bitmask"], "gap_bits": [4]}]})
    assert Recipe.from_dict(r.to_dict()) == r
    from onnxcompress.errors import RecipeError

    with pytest.raises(RecipeError):
        Recipe.from_dict({"steps": [{"pass": "compact_storage", "forms": ["zip"]}]})
    with pytest.raises(RecipeError):
        Recipe.from_dict({"steps": [{"pass": "compact_storage", "min_elemnts": 3}]})


# ------------------------------------------------------------------------------------------------
# where weights live: Constant nodes, If bodies, int8/int4 storage chains


def test_constant_node_weights_and_if_subgraphs():
    base = sparse_mlp(sparsity=0.9, sizes=(64, 128, 32))
    for ref in (b.with_constant_nodes(base), b.with_if_subgraph(base)):
        out, (res,) = apply_passes(ref, CompactStoragePass())
        onnx.checker.check_model(out)
        encoded = [k for k, v in res.details["tensors"].items() if v["encoding"] != "dense"]
        assert len(encoded) >= 2, res.details["tensors"]
        assert weight_bytes(out) < 0.35 * weight_bytes(ref)
        assert_bit_identical(ref, out, feed(base))
        assert "ScatterElements" not in optimized_ops(out) and "CumSum" not in optimized_ops(out)


def _int_chain_model(dtype: int, opset: int, sparsity: float = 0.9) -> onnx.ModelProto:
    """x @ (Cast(q) * scale), q an int8 or int4 constant (the storage pass's decode chain)."""
    rng = np.random.default_rng(3)
    q = rng.integers(-7, 8, (64, 96)).astype(np.int8)
    q[rng.random(q.shape) < sparsity] = 0
    if dtype == TensorProto.INT4:
        packed = pack_bits((q.ravel().astype(np.uint8) & 0xF), 4)
        qt = helper.make_tensor("q", TensorProto.INT4, q.shape, packed.tobytes(), raw=True)
    else:
        qt = numpy_helper.from_array(q, "q")
    scale = numpy_helper.from_array(np.full((1, 96), 0.01, np.float32), "scale")
    g = helper.make_graph(
        [helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT), helper.make_node("Mul", ["qf", "scale"], ["w"]),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 96])], [qt, scale])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


@pytest.mark.parametrize("dtype,opset", [(TensorProto.INT8, 18), (TensorProto.INT4, 21)])
def test_integer_storage_chain_is_re_encoded(dtype, opset):
    ref = _int_chain_model(dtype, opset)
    out, (res,) = apply_passes(ref, CompactStoragePass())
    onnx.checker.check_model(out)
    row = res.details["tensors"]["q"]
    assert row["encoding"] != "dense" and row["encoded_bytes"] < 0.7 * row["dense_bytes"], row
    assert ops(out).count("Mul") >= 1 and "Cast" in ops(out)  # the storage chain is still there
    produced = {o: n for n in out.graph.node for o in n.output}
    if dtype == TensorProto.INT4:
        assert produced["q"].op_type == "Cast"  # decoded in int8, narrowed back to int4
    assert_bit_identical(ref, out, feed(ref))


# ------------------------------------------------------------------------------------------------
# every candidate decodes exactly, for many dtypes and opsets (not only the one chosen)


def _decode_all(arr: np.ndarray, opset: int) -> None:
    work = work_array(arr)
    cfg = CompactStorageConfig(gap_bits=(2, 4, 8))
    cands = [c for c in _candidates(work, cfg, np.random.default_rng(0), everything=True) if not c.is_dense]
    assert cands
    graph = gs.Graph(opset=opset)
    namer = Namer()
    outs = []
    for i, enc in enumerate(cands):
        np.testing.assert_array_equal(enc.decode().view(np.uint8), work.flat.view(np.uint8))
        bld = DecodeBuilder(graph, namer, opset)
        t = enc.emit(bld)
        y = gs.Variable(f"y{i}", dtype=arr.dtype, shape=list(arr.shape))
        graph.nodes.append(gs.Node("Identity", inputs=[t], outputs=[y]))
        outs.append(y)
    graph.outputs = outs
    model = gs.export_onnx(graph)
    model.ir_version = 10 if opset < 23 else 11
    onnx.checker.check_model(model)
    for optimize in (False, True):
        for enc, got in zip(cands, b.run(model, {}, optimize=optimize)):
            assert got.dtype == arr.dtype and got.shape == arr.shape, enc.label
            assert np.array_equal(got.view(np.uint8), arr.view(np.uint8)), (enc.label, optimize)


@settings(max_examples=16, deadline=None, derandomize=True)
@given(dtype=st.sampled_from(["float32", "float16", "int8", "uint8", "int64"]),
       sparsity=st.sampled_from([0.3, 0.7, 0.95]), levels=st.sampled_from([2, 5, 17, 300]),
       n=st.integers(1, 700), opset=st.sampled_from([13, 21, 25]), hole=st.sampled_from([0, 0, 3]))
def test_every_candidate_decodes_bit_exactly(dtype, sparsity, levels, n, opset, hole):
    rng = np.random.default_rng(n)
    vals = (rng.standard_normal(levels) * 50).astype(dtype)
    arr = vals[rng.integers(0, levels, (n, 3))]
    arr[rng.random(arr.shape) < sparsity] = hole  # the holes need not be zeros
    if dtype.startswith("float") and arr.size > 2:
        arr.ravel()[0] = -0.0  # signed zero is a value, not a hole
        arr.ravel()[1] = np.nan
    _decode_all(arr, opset)


def test_pack_bits_round_trip_and_layout():
    v = np.arange(16, dtype=np.uint8)
    assert pack_bits(v[:2], 4).tolist() == [0x10]  # low nibble first, as ONNX UINT4
    # 3 bits: one little-endian bit string, 8 elements in 3 bytes
    assert pack_bits(np.array([1, 2, 3, 4, 5, 6, 7, 0], np.uint8), 3).tolist() == [
        1 | 2 << 3 | (3 & 3) << 6, 3 >> 2 | 4 << 1 | 5 << 4 | (6 & 1) << 7, 6 >> 1 | 7 << 2 | 0 << 5]
    for bits in range(1, 9):
        for n in (1, 8, 37):
            x = np.random.default_rng(bits).integers(0, 1 << bits, n).astype(np.uint8)
            packed = pack_bits(x, bits)
            assert packed.size == packed_nbytes(n, bits)
            assert np.array_equal(unpack_bits(packed, bits, n), x)
    with pytest.raises(ValueError):
        pack_bits(np.array([4], np.uint8), 2)
    with pytest.raises(ValueError):
        pack_bits(np.array([1], np.uint8), 9)


def test_gap_width_follows_the_sparsity():
    """At ~94% zeros the gaps average ~17: 5 or 6 bits beat both 4 bits (fillers for 40% of the gaps)
    and 8 bits (2-3 wasted bits per entry)."""
    ref = sparse_mlp(sparsity=0.94, levels=16, sizes=(64, 2000, 100))
    out, (res,) = apply_passes(ref, CompactStoragePass(CompactStorageConfig(forms=("codebook", "gaps"))))
    row = res.details["tensors"]["W1"]
    assert row["encoding"] in ("gaps5+codebook4", "gaps6+codebook4"), row
    cand = row["candidates"]
    assert cand[row["encoding"]] < min(cand["gaps4+codebook4"], cand["gaps8+codebook4"])
    assert_bit_identical(ref, out, feed(ref))
    assert sorted(set(optimized_ops(out))) == sorted(set(optimized_ops(ref)))


# ------------------------------------------------------------------------------------------------
# refusals


def test_declines_dense_small_and_output_weights():
    ref = b.mlp((64, 300, 10), seed=0, opset=18)  # dense random float weights
    out, (res,) = apply_passes(ref, CompactStoragePass())
    assert not res.modified
    assert {v["encoding"] for v in res.details["tensors"].values()} == {"dense"}
    assert ops(out) == ops(ref)
    # a sparse weight that is also a graph output stays as it is
    m = sparse_mlp(sparsity=0.9)
    m.graph.output.append(helper.make_tensor_value_info("W0", TensorProto.FLOAT, [64, 300]))
    out, (res,) = apply_passes(m, CompactStoragePass())
    assert [s.node for s in res.skipped] == ["W0"] and "graph output" in res.skipped[0].reason
    assert "W0" in {t.name for t in out.graph.initializer}
    # small weights and a high min_elements
    out, (res,) = apply_passes(sparse_mlp(sparsity=0.9), CompactStoragePass(CompactStorageConfig(min_elements=10**6)))
    assert not res.modified and not res.details["tensors"]


def test_declines_old_opset_and_disabled():
    m = sparse_mlp(sparsity=0.9, opset=10)
    out, (res,) = apply_passes(m, CompactStoragePass())
    assert not res.modified and {s.node for s in res.skipped} == {"W0", "W1"}
    assert "opset 10" in res.skipped[0].reason
    out, (res,) = apply_passes(sparse_mlp(sparsity=0.9), CompactStoragePass(CompactStorageConfig(enabled=False)))
    assert not res.modified


def test_forms_restrict_the_choice():
    ref = sparse_mlp(sparsity=0.9, levels=16)
    _, (res,) = apply_passes(ref, CompactStoragePass(CompactStorageConfig(forms=("bitmask",))))
    assert {v["encoding"] for v in res.details["tensors"].values()} == {"bitmask+raw"}
    _, (res,) = apply_passes(ref, CompactStoragePass(CompactStorageConfig(forms=("codebook",))))
    assert {v["encoding"] for v in res.details["tensors"].values()} <= {"codebook4", "codebook8"}


def test_qdq_weight_is_encoded_and_onnxruntime_still_fuses_it():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (256, 256)).astype(np.int8)
    q[rng.random(q.shape) < 0.9] = 0
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["q", "ws"], ["w"]), helper.make_node("MatMul", ["xd", "w"], ["y0"]),
             helper.make_node("QuantizeLinear", ["y0", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
             numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(np.array(0.05, np.float32), "ys"), numpy_helper.from_array(np.array(0, np.uint8), "yz")]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])], inits)
    ref = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    ref.ir_version = 10
    out, (res,) = apply_passes(ref, CompactStoragePass())
    assert res.details["tensors"]["q"]["encoding"] != "dense"
    assert "QLinearMatMul" in optimized_ops(ref)
    assert optimized_ops(out) == optimized_ops(ref)
    assert_bit_identical(ref, out, {"x": rng.random((4, 256), dtype=np.float32)})


def test_declines_weights_of_custom_domain_ops():
    k, n, bs = 64, 32, 32
    packed = np.zeros((n, k // bs, bs // 2), np.uint8)
    packed[:, :, :2] = 0x99
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], name="mmnb", domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=bs)
    g = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                          [numpy_helper.from_array(packed, "B"),
                           numpy_helper.from_array(np.full(n * k // bs, 0.1, np.float32), "scales")])
    ref = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    ref.ir_version = 10
    out, (res,) = apply_passes(ref, CompactStoragePass())
    assert not res.modified and res.skipped[0].node == "B" and "com.microsoft::MatMulNBits" in res.skipped[0].reason
    assert np.array_equal(b.run(out, feed(ref), optimize=True)[0], b.run(ref, feed(ref), optimize=True)[0])


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_after_the_storage_pass_the_integer_codes_are_stored_sparsely(bits):
    """sparsify -> storage (Cast -> Mul decode chains) -> compact_storage: smaller again, same outputs."""
    from onnxcompress.prune.sparsity import SparsifyConfig, SparsifyPass
    from onnxcompress.quantize.config import StorageConfig
    from onnxcompress.quantize.storage import StoragePass

    base = b.mlp((64, 300, 100), seed=0, opset=18)
    stored, results = apply_passes(base, SparsifyPass(SparsifyConfig(ratio=0.9)), StoragePass(StorageConfig(bits=bits)))
    assert results[1].modified
    out, (res,) = apply_passes(stored, CompactStoragePass())
    onnx.checker.check_model(out)
    encoded = {k: v for k, v in res.details["tensors"].items() if v["encoding"] != "dense"}
    assert len(encoded) == 2, res.details["tensors"]
    for row in encoded.values():
        assert row["dtype"] in ("int8", "uint8") and row["encoded_bytes"] < 0.6 * row["dense_bytes"], row
    assert weight_bytes(out) < 0.6 * weight_bytes(stored)
    assert_bit_identical(stored, out, feed(base))
    assert "ScatterElements" not in optimized_ops(out) and "Gather" not in optimized_ops(out)


def test_external_data_model_through_compress(tmp_path):
    """Weights read lazily from a .data file are encoded; the result saves and runs the same."""
    from onnxcompress.api import compress
    from onnxcompress.recipe import VerifyConfig
    from onnxcompress.recipes import default_recipe

    ref = sparse_mlp(sparsity=0.9)
    src = tmp_path / "in.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(ref)  # onnx.save moves the tensors of the proto it is given
    onnx.save(copy, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="in.data",
              size_threshold=0)
    result = compress(src, default_recipe().replace(verify=VerifyConfig(enabled=False)))
    table = result.report.step("compact_storage").details["tensors"]
    for name in ("W0", "W1"):
        assert table[name]["encoding"].endswith("+raw") and table[name]["encoding"] != "dense"
    out = result.save(tmp_path / "out.onnx", external_data=True)
    assert (tmp_path / "out.onnx.data").stat().st_size < 0.35 * (tmp_path / "in.data").stat().st_size
    f = feed(ref)
    assert np.array_equal(b.run(str(out), f, optimize=True)[0], b.run(ref, f, optimize=True)[0])


def test_loop_body_weight_is_encoded_and_folds_inside_the_body():
    rng = np.random.default_rng(0)
    w = (0.1 * rng.standard_normal((64, 64))).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("MatMul", ["h_in", "Wb"], ["h_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "Wb")])
    g = helper.make_graph([helper.make_node("Loop", ["n", "c", "x"], ["y"], body=body)], "loop",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
                          [numpy_helper.from_array(np.array(3, np.int64), "n"), numpy_helper.from_array(np.array(True), "c")])
    ref = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    ref.ir_version = 10
    out, (res,) = apply_passes(ref, CompactStoragePass())
    onnx.checker.check_model(out)
    row = res.details["tensors"]["Wb"]
    assert row["graph"] == "body" and row["encoded_bytes"] < 0.2 * row["dense_bytes"]
    assert "ScatterElements" in ops(out) and sorted(optimized_ops(out)) == sorted(optimized_ops(ref))
    assert_bit_identical(ref, out, feed(ref))


@pytest.mark.parametrize("opset", [11, 13])
def test_pooled_streams_split_by_attribute_or_input(opset):
    """Two weights' streams of one width share one unpacking chain cut by one Split: its sizes are an
    attribute below opset 13 and an input from 13 on; the outputs stay bit-identical."""
    ref = sparse_mlp(sparsity=0.9, levels=16, opset=opset)
    out, (res,) = apply_passes(ref, CompactStoragePass())
    onnx.checker.check_model(out, full_check=True)
    splits = [n for n in out.graph.node if n.op_type == "Split"]
    assert splits and all(len(n.output) >= 2 for n in splits)
    assert all((len(n.input) == 1) == (opset < 13) for n in splits)
    assert_bit_identical(ref, out, feed(ref))
    assert sorted(set(optimized_ops(out))) == sorted(set(optimized_ops(ref)))
