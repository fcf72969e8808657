"""Every preset on models whose weights live in Constant nodes or inside If branches.

Sibling If branches read the same outer-scope input; a rule that looks at "all readers of x" must
not merge nodes across branches (a fuse bug once did, producing a non-SSA graph).
"""

import numpy as np
import onnx
import pytest

import builders as b
import onnxcompress as oc
from onnxcompress.recipes import PRESETS

VARIANTS = {
    "if-mlp": lambda: b.with_if_subgraph(b.mlp(sizes=(64, 128, 10))),
    "const-mlp": lambda: b.with_constant_nodes(b.mlp(sizes=(64, 128, 10))),
    "if-conv": lambda: b.with_if_subgraph(b.conv_bn(channels=16)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("preset", [None] + [p.name for p in PRESETS])
def test_preset_gives_a_valid_model_that_runs(variant, preset):
    m = VARIANTS[variant]()
    recipe = oc.preset_recipe([preset] if preset else [])
    res = oc.compress(m, recipe.replace(verify=oc.VerifyConfig(enabled=False)))
    onnx.checker.check_model(res.model, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, *[d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]]))
    out = b.run(res.model, {"x": x.astype(np.float32)}, optimize=True)[0]
    ref = b.run(m, {"x": x.astype(np.float32)})[0]
    assert out.shape == ref.shape and np.isfinite(out).all()
    if preset is None:  # the lossless prefix alone must be exact
        assert b.lossless_close(ref, out)
