"""Name and op-type options that select nothing are reported, never silently ignored.

``--exclude-nodes fc9`` on a model without ``fc9`` used to change nothing without a word, so the
layer the user meant to keep float was quantized. Every pass that takes node-name patterns or op
types now adds a summary note naming the entries that select nothing, with the model's closest
names. Patterns select a name by equality first, then as a case-sensitive fnmatch glob, so names
with glob characters (``blk[0]/fc``, as TensorFlow exports spell them) select themselves.
"""

import numpy as np
import onnx
import pytest

import builders as b
import onnxcompress as oc
from onnxcompress.fuse.neuron_merge import MergeNeuronsConfig
from onnxcompress.graph.query import name_matches
from onnxcompress.prune.channels import PruneChannelsConfig
from onnxcompress.prune.sparsity import SparsifyConfig
from onnxcompress.quantize.config import QuantizeInt8Config
from onnxcompress.quantize.embed import QuantizeEmbeddingConfig
from onnxcompress.quantize.fp16 import ConvertFp16Config
from onnxcompress.quantize.int4 import QuantizeInt4Config


def _compress(model, step):
    return oc.compress(model, oc.Recipe(steps=(step,), verify=oc.VerifyConfig(enabled=False)))


def _notes(model, step) -> list[str]:
    return _compress(model, step).report.notes


CASES = [  # (step with a pattern that selects nothing, the flag the note names, the same step selecting something)
    (QuantizeInt8Config(mode="dynamic", exclude_nodes=("MatMul_9",)), "--exclude-nodes 'MatMul_9'",
     QuantizeInt8Config(mode="dynamic", exclude_nodes=("MatMul_*",))),
    (QuantizeInt8Config(mode="dynamic", exclude_ops=("MatMu",)), "--exclude-ops 'MatMu'",
     QuantizeInt8Config(mode="dynamic", exclude_ops=("MatMul",))),
    (QuantizeInt4Config(exclude=("matmul_1",)), "--int4-exclude 'matmul_1'", QuantizeInt4Config(exclude=("MatMul_1",))),
    (ConvertFp16Config(keep_nodes=("Relu",)), "--half-keep-nodes 'Relu'", ConvertFp16Config(keep_nodes=("Relu_0",))),
    (ConvertFp16Config(keep_ops=("Relus",)), "--half-keep-ops 'Relus'", ConvertFp16Config(keep_ops=("Relu",))),
    (SparsifyConfig(ratio=0.5, overrides=("matmul_0*=skip",)), "--prune-override 'matmul_0*'",
     SparsifyConfig(ratio=0.5, overrides=("MatMul_0=skip",))),
    (PruneChannelsConfig(ratio=0.5, exclude=("MatMul_3",)), "exclude 'MatMul_3'",
     PruneChannelsConfig(ratio=0.5, exclude=("MatMul_0",))),
    (MergeNeuronsConfig(ratio=0.5, exclude=("matmul_0",)), "exclude 'matmul_0'",
     MergeNeuronsConfig(ratio=0.5, exclude=("MatMul_0",))),
]


@pytest.mark.parametrize("missing, flag, selecting", CASES, ids=[c[1] for c in CASES])
def test_an_entry_that_selects_nothing_is_reported_with_close_names(missing, flag, selecting):
    m = b.mlp(sizes=(64, 128, 10))
    notes = [n for n in _notes(m, missing) if flag in n]
    assert len(notes) == 1, _notes(m, missing)
    assert "close names:" in notes[0]  # every case above is one typo away from a real name
    assert not [n for n in _notes(m, selecting) if "select" in n or "no node of this model" in n]


def test_the_default_fp16_keep_ops_are_not_reported():
    """The built-in keep list names ops most models lack; only what the user added is checked."""
    assert not [n for n in _notes(b.mlp(), ConvertFp16Config()) if "keep-ops" in n]


def test_names_with_glob_characters_select_themselves():
    assert name_matches("blk[0]/fc", "blk[0]/fc") and name_matches("blk[0]/fc", "blk?0?/*")
    assert not name_matches("MatMul_0", "matmul_0")  # case-sensitive, as documented
    m = b.mlp(sizes=(64, 128, 10))
    m.graph.node[0].name = "blk[0]/fc"
    res = _compress(m, QuantizeInt8Config(mode="dynamic", exclude_nodes=("blk[0]/fc",)))
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("MatMul") == 1 and ops.count("MatMulInteger") == 1  # the named layer stayed float
    assert not [n for n in res.report.notes if "exclude-nodes" in n]
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    onnx.checker.check_model(res.model)
    out, ref = b.run(res.model, {"x": x})[0], b.run(m, {"x": x})[0]
    cos = float(np.sum(out * ref) / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cos > 0.99


def test_exclude_lists_of_the_structured_passes_take_globs_and_report_non_layers():
    """prune_channels / merge_neurons matched ``exclude`` by exact name while the note matched globs,
    so 'MatMul_*' drew no note and excluded nothing; a node that writes no prunable group (Relu_0)
    drew no note either. Both now match globs against the layers they can act on."""
    m = b.mlp(sizes=(64, 128, 10))
    for cfg in (PruneChannelsConfig(ratio=0.5, exclude=("MatMul_*",)), MergeNeuronsConfig(ratio=0.5, exclude=("MatMul_*",))):
        res = _compress(m, cfg)
        assert sum(int(np.prod(t.dims)) for t in res.model.graph.initializer) == \
            sum(int(np.prod(t.dims)) for t in m.graph.initializer)  # every layer excluded: nothing removed
        assert not [n for n in res.report.notes if "selects nothing" in n]
    for cfg in (PruneChannelsConfig(ratio=0.5, exclude=("Relu_0",)), MergeNeuronsConfig(ratio=0.5, exclude=("Relu_0",))):
        assert [n for n in _notes(m, cfg) if "exclude 'Relu_0' matches no layer" in n]


def test_sparsify_overrides_are_checked_against_what_they_can_select():
    """A graph input (x) or a node without a weight (Relu_0) is a name of the model but selects no
    weight to sparsify: reported too."""
    notes = _notes(b.mlp(sizes=(64, 128, 10)), SparsifyConfig(ratio=0.5, overrides=("x=skip", "Relu_0=skip")))
    assert [n for n in notes if "--prune-override 'x', 'Relu_0' match no weight that could be sparsified" in n]
