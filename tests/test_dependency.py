"""Channel dependency groups: which tensors are coupled, where, and what blocks a group.

Also home of the small conv/linear models the structured-pruning and neuron-merging tests share
(``net(...)``): each is built with onnx.helper from a list of layers, seeded.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import mlp, with_if_subgraph
from onnxcompress.prune.dependency import build_dependency_graph, eval_const


class Net:
    """A tiny graph builder: ``n.conv("x", 8)`` adds a Conv and returns its output name."""

    def __init__(self, shape=(2, 3, 8, 8), seed: int = 0, opset: int = 17) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.shape = list(shape)
        self.opset = opset
        self.count = 0

    def _name(self, op: str) -> str:
        self.count += 1
        return f"{op.lower()}{self.count}"

    def init(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        name = self._name(op)
        outs = [f"{name}_out{i}" if n_out > 1 else name for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def weight(self, name: str, shape, scale: float = 0.3) -> str:
        return self.init(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True) -> str:
        name = f"w{self.count + 1}"
        ins = [x, self.weight(name, (cout, cin // group, k, k), 0.5 / np.sqrt(cin * k * k / group))]
        if bias:
            ins.append(self.weight(name + "_b", (cout,), 0.1))
        return self.node("Conv", ins, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        base = f"bn{self.count + 1}"
        ins = [x, self.init(base + "_s", self.rng.uniform(0.5, 1.5, c).astype(np.float32)),
               self.weight(base + "_b", (c,), 0.1), self.weight(base + "_m", (c,), 0.1),
               self.init(base + "_v", self.rng.uniform(0.5, 1.5, c).astype(np.float32))]
        return self.node("BatchNormalization", ins)

    def gemm(self, x: str, k: int, n: int, trans_b: int = 1) -> str:
        name = f"fc{self.count + 1}"
        w = self.weight(name, (n, k) if trans_b else (k, n), 1 / np.sqrt(k))
        return self.node("Gemm", [x, w, self.weight(name + "_b", (n,), 0.1)], transB=trans_b)

    def model(self, out: str, out_shape) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, list(out_shape))], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="tests")
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def resnet_block(seed: int = 0, c: int = 8) -> onnx.ModelProto:
    """conv-bn-relu -> (conv-bn-relu-conv-bn) + skip -> relu -> GAP -> Flatten -> Gemm."""
    n = Net(seed=seed)
    a = n.node("Relu", [n.bn(n.conv("x", 3, c), c)])
    b = n.bn(n.conv(n.node("Relu", [n.bn(n.conv(a, c, c), c)]), c, c), c)
    r = n.node("Relu", [n.node("Add", [a, b])])
    f = n.node("Flatten", [n.node("GlobalAveragePool", [r])], axis=1)
    return n.model(n.gemm(f, c, 4), (2, 4))


def branchy(seed: int = 0, split_a: int = 4) -> onnx.ModelProto:
    """Two convs concatenated, split back unevenly, a depthwise conv, a per-channel Mul,
    a grouped conv, then Flatten of the spatial map into a Gemm (channel x spatial blocks)."""
    n = Net(shape=(2, 3, 4, 4), seed=seed)
    a = n.node("Relu", [n.conv("x", 3, split_a)])
    b = n.node("Relu", [n.conv("x", 3, 16 - split_a)])
    cat = n.node("Concat", [a, b], axis=1)                                        # 16
    s1, s2 = n.node("Split", [cat, n.init("split_sizes", np.array([4, 12], np.int64))], n_out=2, axis=1)
    dw = n.conv(s2, 12, 12, group=12)                                             # depthwise on 12
    m = n.node("Mul", [dw, n.weight("chan_scale", (12, 1, 1), 1.0)])
    g = n.node("Relu", [n.conv(m, 12, 8, k=1, group=4)])                           # grouped 4
    both = n.node("Concat", [s1, g], axis=1)                                      # 12
    f = n.node("Flatten", [n.conv(both, 12, 6)], axis=1)                          # 6 * 16
    return n.model(n.gemm(f, 6 * 16, 5, trans_b=0), (2, 5))


def graph_of(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def groups_by_name(model):
    g = graph_of(model)
    dg = build_dependency_graph(g, model)
    return g, {grp.name: grp for grp in dg.groups}


def spaces(group):
    return {s.name: s.size for s in group.spaces}


# ----------------------------------------------------------------------------------------------


def test_mlp_group_couples_producer_bias_activation_and_consumer():
    g, groups = groups_by_name(mlp((16, 32, 8)))
    hidden = groups["mm0"]
    assert hidden.prunable and not hidden.blocked
    assert spaces(hidden) == {"mm0": 32, "add0": 32, "relu0": 32}
    roles = sorted((p.node.name, p.slot, p.axis, p.role) for p in hidden.params)
    assert roles == [("Add_0", 1, 0, "ew"), ("MatMul_0", 1, 1, "out"), ("MatMul_1", 1, 0, "in")]
    assert len(hidden.units()) == 32 and [len(p) for p in hidden.partitions()] == [32]
    out = groups["mm1"]
    assert out.blocked and "graph output" in out.blocked[0][1]


def test_residual_add_couples_both_producers_into_one_unit_per_channel():
    _, groups = groups_by_name(resnet_block(c=8))
    res = [grp for grp in groups.values() if grp.prunable and len([p for p in grp.params if p.role == "out"]) == 4]
    assert len(res) == 1, "the first conv and the block's last conv share the residual channels"
    grp = res[0]
    assert len(grp.units()) == 8, "8 coupled channels, not 16"
    outs = sorted(p.node.op for p in grp.params if p.role == "out")
    assert outs == ["Conv", "Conv", "Conv", "Conv"]  # two convs: weight + bias each
    ins = sorted((p.node.op, p.axis) for p in grp.params if p.role == "in")
    assert ins == [("Conv", 1), ("Gemm", 1)], "the inner conv reads it, and the Gemm (transB=1) after GAP"
    bn = [p for p in grp.params if p.role == "bn"]
    assert len(bn) == 8, "both BatchNormalizations' four parameters follow the channels"
    inner = [grp for grp in groups.values() if grp.prunable and grp is not res[0] and len(grp.units()) == 8]
    assert len(inner) == 1, "the block's inner channels are a group of their own"


def test_concat_split_depthwise_grouped_and_flatten_links():
    _, groups = groups_by_name(branchy())
    grp = next(g for g in groups.values() if "cat" not in g.name and "concat" in " ".join(spaces(g)))
    sp = spaces(grp)
    assert sp["concat5"] == 16 and sp["split6_out0"] == 4 and sp["split6_out1"] == 12
    assert not grp.blocked
    # units: 4 + 12 channels of the two convs, and the grouped conv's 8, all meeting in the second
    # Concat; partitions separate by the tensors and grouped-conv chunks they fall into
    assert len(grp.units()) == 24
    sizes = sorted(len(p) for p in grp.partitions())
    assert sizes == [2, 2, 2, 2, 3, 3, 3, 3, 4], "s1 (4), 4 chunks of 3 of the split half, 4 chunks of 2 outputs"
    kinds = sorted({f.kind for f in grp.fixups})
    assert kinds == ["group", "split"], "depthwise group and Split sizes follow the channels"
    chunked = [p for p in grp.params if p.chunks > 1]
    assert len(chunked) == 1 and chunked[0].chunks == 4 and chunked[0].node.op == "Conv"
    # the grouped conv's input (12 = 4 chunks of 3) and output (8 = 4 chunks of 2) keep equal counts per chunk
    assert sorted(s.size for s in grp.spaces if s.chunks == 4) == [8, 12]
    last = next(g for g in groups.values() if any(p.node.op == "Gemm" and p.role == "in" for p in g.params))
    flat = next(s for s in last.spaces if s.size == 6 * 16)
    assert len(last.units()) == 6 and len(last.unit_ids(flat)) == 96
    assert np.array_equal(last.unit_ids(flat)[:16], np.full(16, last.unit_ids(flat)[0])), \
        "a channel owns a block of H*W flattened columns"


def test_grouped_conv_chunks_coupled_unevenly_block_the_group():
    # 6 + 10 channels: the Split's second half starts with 2 channels of the first conv, so the
    # grouped conv's first chunk of 3 would lose a different count than the others
    _, groups = groups_by_name(branchy(split_a=6))
    grp = next(g for g in groups.values() if "concat5" in spaces(g))
    assert any("coupled unevenly" in r for _, r in grp.blocked)


def test_unknown_op_blocks_its_group_with_a_reason():
    n = Net()
    c = n.conv("x", 3, 8)
    lrn = n.node("LRN", [c], size=3)
    m = n.model(n.node("Flatten", [n.node("GlobalAveragePool", [lrn])]), (2, 8))
    _, groups = groups_by_name(m)
    grp = groups[c]
    assert not grp.prunable or grp.blocked
    assert any("LRN is not understood" in r for _, r in grp.blocked)


@pytest.mark.parametrize("case", ["activation_weight", "reshape_mix", "subgraph"])
def test_blocking_reasons(case):
    if case == "activation_weight":  # attention-like: MatMul of two activations
        n = Net(shape=(2, 4, 8))
        q = n.node("MatMul", ["x", n.weight("wq", (8, 8))])
        k = n.node("MatMul", ["x", n.weight("wk", (8, 8))])
        s = n.node("MatMul", [q, n.node("Transpose", [k], perm=[0, 2, 1])])
        _, groups = groups_by_name(n.model(s, (2, 4, 4)))
        assert any("not a constant 2-D weight" in r for g in groups.values() for _, r in g.blocked)
        assert not any(g.prunable and not g.blocked for g in groups.values())
    elif case == "reshape_mix":  # folds pairs of channels into the spatial axis
        n = Net(shape=(1, 3, 4, 4))
        c = n.conv("x", 3, 8)
        r = n.node("Reshape", [c, n.init("shp", np.array([1, 4, 32], np.int64))])
        back = n.node("Reshape", [n.node("Relu", [r]), n.init("shp2", np.array([1, 8, 4, 4], np.int64))])
        _, groups = groups_by_name(n.model(n.conv(back, 8, 2), (1, 2, 4, 4)))
        assert any("mixes the channel axis" in r for _, r in groups[c].blocked)
    else:
        m = with_if_subgraph(mlp((8, 16, 4)))
        g = graph_of(m)
        dg = build_dependency_graph(g, m)
        assert not any(grp.prunable and not grp.blocked for grp in dg.groups), "subgraph layers are left alone"


def test_constant_node_and_constant_of_shape_weights_are_parameters():
    n = Net(shape=(2, 16))
    n.nodes.append(helper.make_node("Constant", [], ["w_const"], name="wc",
                                    value=numpy_helper.from_array(np.ones((16, 12), np.float32), "v")))
    n.nodes.append(helper.make_node("ConstantOfShape", [n.init("w2_shape", np.array([12, 4], np.int64))], ["w2"],
                                    name="w2_fill", value=numpy_helper.from_array(np.array([0.5], np.float32))))
    h = n.node("Relu", [n.node("MatMul", ["x", "w_const"])])
    m = n.model(n.node("MatMul", [h, "w2"]), (2, 4))
    _, groups = groups_by_name(m)
    grp = next(g for g in groups.values() if g.prunable and not g.blocked)
    assert len(grp.units()) == 12
    params = {(p.node.op, p.role): p for p in grp.params}
    assert eval_const(params[("MatMul", "in")].node.inputs[1]).shape == (12, 4)
    assert float(eval_const(params[("MatMul", "in")].node.inputs[1])[0, 0]) == 0.5


def test_transformer_ffn_hidden_group_is_prunable_and_the_residual_stream_is_not():
    """LayerNorm -> MatMul -> Add -> GELU (erf form) -> MatMul -> Add -> + x: the feed-forward
    width couples through scalar-constant elementwise ops; the residual stream reaches LayerNorm and
    the graph input, so it is blocked."""
    n = Net(shape=(2, 5, 8), opset=18)
    ln_params = [n.init("ln_s", np.ones(8, np.float32)), n.init("ln_b", np.zeros(8, np.float32))]
    ln = n.node("LayerNormalization", ["x", *ln_params], axis=-1)
    h = n.node("Add", [n.node("MatMul", [ln, n.weight("w_in", (8, 16))]), n.weight("b_in", (16,))])
    erf = n.node("Erf", [n.node("Div", [h, n.init("sqrt2", np.array(1.4142135, np.float32))])])
    gelu = n.node("Mul", [n.node("Mul", [h, n.node("Add", [erf, n.init("one", np.array(1.0, np.float32))])]),
                          n.init("half", np.array(0.5, np.float32))])
    out = n.node("Add", [n.node("Add", [n.node("MatMul", [gelu, n.weight("w_out", (16, 8))]), n.weight("b_out", (8,))]),
                         "x"])
    _, groups = groups_by_name(n.model(out, (2, 5, 8)))
    ffn = next(g for g in groups.values() if any(p.node.op == "MatMul" and p.role == "out" and p.space.size == 16
                                                 for p in g.params))
    assert not ffn.blocked and len(ffn.units()) == 16
    assert sorted((p.node.op, p.role) for p in ffn.params) == [("Add", "ew"), ("MatMul", "in"), ("MatMul", "out")]
    stream = [g for g in groups.values() if g is not ffn]
    assert stream and all(g.blocked for g in stream)
    assert any("graph input" in r or "LayerNormalization" in r for g in stream for _, r in g.blocked)


@pytest.mark.parametrize("axes,keepdims,prunable", [((2, 3), 0, True), ((2, 3), 1, True), ((1,), 1, False)])
def test_reductions_keep_channels_unless_they_reduce_the_channel_axis(axes, keepdims, prunable):
    n = Net(shape=(2, 3, 4, 4), opset=18)
    c = n.node("Relu", [n.conv("x", 3, 8)])
    red = n.node("ReduceMean", [c, n.init("axes", np.array(axes, np.int64))], keepdims=keepdims)
    flat = n.node("Flatten", [red], axis=1)
    width = 8 if 1 not in axes else 16
    m = n.model(n.gemm(flat, width, 3), (2, 3))
    _, groups = groups_by_name(m)
    grp = groups["conv1"]
    assert (grp.prunable and not grp.blocked) == prunable
    if prunable:
        assert any(p.node.op == "Gemm" and p.role == "in" for p in grp.params) and len(grp.units()) == 8
    else:
        assert any("reduces over the channel axis" in r for _, r in grp.blocked)
