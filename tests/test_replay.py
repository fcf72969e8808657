"""apply_plan (--apply-plan) and width (--width): structure transfer (onnxcompress.transfer.replay).

Three ways: the replayed model has the recorded structure (shapes, kept channel indices, per-layer
sparsity, op types); the numbers are the new checkpoint's (replaying on the original reproduces the
compressed model bit for bit; replaying on a fine-tuned copy gives its weights sliced by the plan);
and bad plans are refused before the model is loaded, mismatched graphs with a precondition error.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import builders
from onnxcompress.api import compress
from onnxcompress.errors import OnnxCompressError, RecipeError
from onnxcompress.prune.sparsity import SparsifyConfig
from onnxcompress.recipe import Recipe, VerifyConfig
from onnxcompress.transfer.replay import ApplyPlanConfig, WidthConfig, load_plan, plan_steps
from onnxcompress.transfer.transplant import PLAN_KEY

OFF = VerifyConfig(enabled=False)


def _weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _plan(m: onnx.ModelProto) -> dict:
    return json.loads(next(p.value for p in m.metadata_props if p.key == PLAN_KEY))


def _fine_tuned(m: onnx.ModelProto, seed: int = 5) -> onnx.ModelProto:
    """The same architecture with different weights (a stand-in for a fine-tuned checkpoint)."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array((a + 0.3 * rng.standard_normal(a.shape)).astype(a.dtype), t.name))
    return out


@pytest.fixture(scope="module")
def base():
    return builders.mlp((16, 32, 24, 8), seed=1)


@pytest.fixture(scope="module")
def compressed(base):
    """width 0.5 then 50% sparsity: the plan to replay."""
    return compress(base, Recipe(steps=(WidthConfig(width=0.5), SparsifyConfig(ratio=0.5)), verify=OFF)).model


def _replay(model, plan_path) -> onnx.ModelProto:
    return compress(model, Recipe(steps=(ApplyPlanConfig(plan=str(plan_path)),), verify=OFF)).model


# -- width --------------------------------------------------------------------------------------


def test_width_halves_every_hidden_layer_without_data(base):
    r = compress(base, Recipe(steps=(WidthConfig(width=0.5),), verify=OFF))
    w = _weights(r.model)
    shapes = sorted(a.shape for a in w.values() if a.ndim == 2)
    assert shapes == sorted([(16, 16), (16, 12), (12, 8)])
    assert Counter(n.op_type for n in r.model.graph.node) == Counter(n.op_type for n in base.graph.node)
    groups = r.report.step("width").details["groups"]
    assert [g["kept"] for g in groups] == [16, 12]
    # the kept neurons are those of largest l1 filter norm (importance by weight, no data)
    w0 = _weights(base)["W0"]
    expected = np.sort(np.argsort(-np.abs(w0).sum(0), kind="stable")[:16])
    assert groups[0]["keep"]["mm0"] == expected.tolist()


def test_width_one_is_the_identity(base):
    r = compress(base, Recipe(steps=(WidthConfig(width=1.0),), verify=OFF))
    assert not r.report.step("width").modified
    x = {"x": np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)}
    (a,), (b,) = builders.run(base, x), builders.run(r.model, x)
    assert np.abs(a - b).max() <= 1e-5 + 1e-4 * np.abs(a).max()


def test_width_flag_adds_the_step():
    recipe = Recipe.from_cli(["--width", "0.25"])
    assert recipe.step("width").width == 0.25
    with pytest.raises(RecipeError):
        Recipe.from_cli(["--width", "0"])


# -- apply_plan ---------------------------------------------------------------------------------


def test_replay_on_the_original_reproduces_the_compressed_model(base, compressed, tmp_path):
    path = tmp_path / "c.onnx"
    onnx.save(compressed, path)
    again = _replay(base, path)
    a, b = _weights(compressed), _weights(again)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_replay_on_a_fine_tuned_checkpoint_gives_the_same_structure(base, compressed, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan(compressed)))
    ft = _fine_tuned(base)
    out = _replay(ft, path)
    a, b = _weights(compressed), _weights(out)
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    # same kept channels: the recorded indices, not re-ranked on the new weights
    p_src, p_out = _plan(compressed), _plan(out)
    src_groups = p_src["steps"][0]["details"]["groups"]
    out_groups = p_out["steps"][0]["details"]["steps"][0]["details"]["groups"]
    assert [g["keep"] for g in src_groups] == [g["keep"] for g in out_groups]
    # the values are the fine-tuned ones, sliced by the plan (first layer: columns kept)
    keep0 = src_groups[0]["keep"]["mm0"]
    w_ft = _weights(ft)["W0"][:, keep0]
    w_out = next(v for k, v in b.items() if k.startswith("W0"))
    nz = w_out != 0
    assert np.array_equal(w_out[nz], w_ft[nz])
    # same per-layer sparsity (the mask itself is re-derived by magnitude on the new weights)
    for k, v in a.items():
        if v.ndim == 2:
            assert int((b[k] == 0).sum()) == int((v == 0).sum())
    assert not all(np.array_equal(a[k], b[k]) for k in a if a[k].ndim == 2)


def test_plan_sources_agree_and_replayed_plans_replay(base, compressed, tmp_path):
    onnx_path, json_path, report_path = tmp_path / "c.onnx", tmp_path / "p.json", tmp_path / "r.json"
    onnx.save(compressed, onnx_path)
    json_path.write_text(json.dumps(_plan(compressed)))
    r = compress(base, Recipe(steps=(WidthConfig(width=0.5), SparsifyConfig(ratio=0.5)), verify=OFF))
    r.report.to_json(report_path)
    ft = _fine_tuned(base)
    outs = [_replay(ft, p) for p in (onnx_path, json_path, report_path)]
    ws = [_weights(o) for o in outs]
    assert all(ws[0].keys() == w.keys() and all(np.array_equal(ws[0][k], w[k]) for k in w) for w in ws[1:])
    # the plan of a replayed model is itself a plan: replaying it gives the same model again
    twice_path = tmp_path / "twice.onnx"
    onnx.save(outs[0], twice_path)
    twice = _weights(_replay(ft, twice_path))
    assert all(np.array_equal(twice[k], ws[0][k]) for k in twice)


def test_recomputed_steps_keep_their_config(base, tmp_path):
    """A pass without pinned choices (here fold_constants, and share_weights when present) is run again
    with its recorded config: mode 'recomputed'."""
    from onnxcompress.passes.cleanup import FoldConstantsConfig

    c = compress(base, Recipe(steps=(FoldConstantsConfig(max_growth=2.0), WidthConfig(width=0.5)), verify=OFF))
    path = tmp_path / "c.onnx"
    onnx.save(c.model, path)
    out = compress(_fine_tuned(base), Recipe(steps=(ApplyPlanConfig(plan=str(path)),), verify=OFF))
    steps = out.report.step("apply_plan").details["steps"]
    assert [(s["pass"], s["mode"]) for s in steps] == [("fold_constants", "recomputed"), ("width", "pinned")]
    assert steps[0]["config"]["max_growth"] == 2.0


# -- refusals -----------------------------------------------------------------------------------


def test_bad_plans_are_refused_before_loading(tmp_path):
    with pytest.raises(RecipeError, match="no plan given"):
        compress(b"not a model", Recipe(steps=(ApplyPlanConfig(),), verify=OFF))
    with pytest.raises(RecipeError, match="file not found"):
        compress(b"not a model", Recipe(steps=(ApplyPlanConfig(plan=str(tmp_path / "none.json")),), verify=OFF))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "recipe": {"steps": [{"pass": "no_such_pass"}]},
                               "steps": [{"pass": "no_such_pass", "details": {}}]}))
    with pytest.raises(RecipeError, match="unknown pass"):
        compress(b"not a model", Recipe(steps=(ApplyPlanConfig(plan=str(bad)),), verify=OFF))
    plain = tmp_path / "plain.onnx"
    onnx.save(builders.mlp(), plain)
    with pytest.raises(RecipeError, match="no 'onnxcompress.plan' metadata"):
        load_plan(plain)


def test_plan_on_a_different_architecture_is_a_precondition_error(compressed, tmp_path):
    path = tmp_path / "c.onnx"
    onnx.save(compressed, path)
    other = builders.conv_bn()
    with pytest.raises(OnnxCompressError, match="none of its tensors"):
        _replay(other, path)


def test_plan_steps_pair_configs_and_details(compressed):
    steps = plan_steps(_plan(compressed))
    assert [s.config.name for s in steps] == ["width", "sparsify"]
    assert steps[1].details["tensors"]  # sparsify's per-tensor records come back from plan["tensors"]


def test_cli_apply_plan(base, compressed, tmp_path):
    from onnxcompress.cli import main

    src, plan, out = tmp_path / "ft.onnx", tmp_path / "c.onnx", tmp_path / "out.onnx"
    onnx.save(_fine_tuned(base), src)
    onnx.save(compressed, plan)
    assert main([str(src), str(out), "--apply-plan", str(plan), "--no-verify", "-q"]) == 0
    got = onnx.load(str(out))
    assert {k: v.shape for k, v in _weights(got).items()} == {k: v.shape for k, v in _weights(compressed).items()}


def test_codebook_sizes_and_quantization_types_replay(base, tmp_path):
    """share_weights and quantize_int8 are recomputed with their recorded config: the same number of
    shared values per layer and the same quantized ops, with values (centres, scales) of the new weights."""
    from onnxcompress.passes.registry import step_config_class
    from onnxcompress.quantize.config import QuantizeInt8Config

    share = step_config_class("share_weights")
    steps = (WidthConfig(width=0.5), share(clusters=8, min_size=16), QuantizeInt8Config(mode="dynamic"))
    c = compress(base, Recipe(steps=steps, verify=OFF))
    path = tmp_path / "c.onnx"
    onnx.save(c.model, path)
    ft = _fine_tuned(base)
    out = compress(ft, Recipe(steps=(ApplyPlanConfig(plan=str(path)),), verify=OFF))
    modes = [(s["pass"], s["mode"]) for s in out.report.step("apply_plan").details["steps"]]
    assert modes == [("width", "pinned"), ("share_weights", "recomputed"), ("quantize_int8", "recomputed")]
    assert Counter(n.op_type for n in out.model.graph.node) == Counter(n.op_type for n in c.model.graph.node)
    a, b = _weights(c.model), _weights(out.model)
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    shared = c.report.step("share_weights").details["tensors"]
    again = out.report.step("apply_plan").details["tensors"]
    for name, rec in shared.items():
        assert again[name]["clusters"] == rec["clusters"]
    assert any(not np.array_equal(a[k], b[k]) for k in a if a[k].dtype == np.int8)


def test_transplant_into_a_pruned_model_goes_through_its_plan(base, tmp_path):
    """transplant(fine-tuned, width-pruned): the plan's kept channels are replayed on the source first,
    so every weight matches by name and the result is what apply_plan gives."""
    from onnxcompress.transfer.transplant import transplant

    pruned = compress(base, Recipe(steps=(WidthConfig(width=0.5),), verify=OFF)).model
    ft = _fine_tuned(base)
    out, rep = transplant(ft, pruned)
    assert rep.plan_replayed == ["mm0", "mm1"]
    assert sorted(rep.by_name) == sorted(_weights(pruned)) and not rep.unmatched_dst and not rep.mismatched
    keep = _plan(pruned)["steps"][0]["details"]["groups"][0]["keep"]["mm0"]
    assert np.array_equal(_weights(out)["W0_pruned"], _weights(ft)["W0"][:, keep])
    path = tmp_path / "pruned.onnx"
    onnx.save(pruned, path)
    replayed = _weights(_replay(ft, path))
    assert all(np.array_equal(replayed[k], v) for k, v in _weights(out).items())


def test_recorded_weights_missing_here_are_reported(compressed, tmp_path):
    """A plan replayed on a model whose weights are named differently: every recorded weight that is
    not found is a Skip with the reason (never silently dropped)."""
    path = tmp_path / "c.onnx"
    onnx.save(compressed, path)
    sparsify_only = compress(builders.mlp((16, 32, 24, 8), seed=1),
                             Recipe(steps=(SparsifyConfig(ratio=0.5),), verify=OFF)).model
    plan_path = tmp_path / "s.onnx"
    onnx.save(sparsify_only, plan_path)
    other = builders.mlp((16, 32, 24, 8), seed=3)
    for t in other.graph.initializer:
        t.name = "renamed_" + t.name
    for n in other.graph.node:
        n.input[:] = ["renamed_" + x if x.startswith(("W", "B")) else x for x in n.input]
    r = compress(other, Recipe(steps=(ApplyPlanConfig(plan=str(plan_path)),), verify=OFF))
    skipped = {s["node"]: s["reason"] for s in r.report.step("apply_plan").skipped}
    assert {"W0", "W1", "W2"} <= set(skipped) and "not replayed" in skipped["W0"]
    assert all((v != 0).all() for k, v in _weights(r.model).items())
