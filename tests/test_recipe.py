"""Recipes: strict validation, round trips through JSON/YAML/TOML, CLI flags map onto config fields."""

import json

import pytest

from onnxcompress.cli import build_parser, recipe_from_args
from onnxcompress.errors import RecipeError
from onnxcompress.passes.cleanup import FoldConstantsConfig
from onnxcompress.recipe import Recipe, VerifyConfig
from onnxcompress.recipes import default_recipe


def _from_cli(argv):
    parser, targets, owners = build_parser()
    return recipe_from_args(parser.parse_args(["in.onnx", "out.onnx", *argv]), targets, owners)


def test_default_recipe_is_lossless_and_round_trips():
    r = default_recipe()
    assert [s.name for s in r.steps][:4] == ["cleanup", "fold_constants", "fuse", "dedupe_initializers"]
    again = Recipe.from_dict(json.loads(r.to_json()))
    assert again == r


def test_unknown_key_is_an_error_with_did_you_mean():
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"steps": [{"pass": "fold_constants", "max_grwth": 2}]})
    msg = str(e.value)
    assert "max_grwth" in msg and "did you mean 'max_growth'" in msg and "\n" not in msg
    with pytest.raises(RecipeError, match="did you mean 'steps'"):
        Recipe.from_dict({"stepz": []})
    with pytest.raises(RecipeError, match="unknown pass 'fold_constant'.*did you mean 'fold_constants'"):
        Recipe.from_dict({"steps": [{"pass": "fold_constant"}]})


def test_types_and_ranges_are_validated_before_any_model_is_touched():
    with pytest.raises(RecipeError, match="expected a number"):
        Recipe.from_dict({"steps": [{"pass": "fold_constants", "max_growth": "lots"}]})
    with pytest.raises(RecipeError, match="below the minimum"):
        FoldConstantsConfig(max_growth=-1)
    with pytest.raises(RecipeError, match="not one of"):
        VerifyConfig(providers=("tpu",))


def test_configs_are_frozen():
    cfg = FoldConstantsConfig()
    with pytest.raises(Exception):
        cfg.max_growth = 3  # type: ignore[misc]


@pytest.mark.parametrize("suffix,text", [
    (".json", '{"steps": [{"pass": "fold_constants", "max_growth": 2.0}], "seed": 3}'),
    (".yaml", "steps:\n  - pass: fold_constants\n    max_growth: 2.0\nseed: 3\n"),
    (".toml", 'seed = 3\n[[steps]]\npass = "fold_constants"\nmax_growth = 2.0\n'),
])
def test_recipe_files(tmp_path, suffix, text):
    p = tmp_path / f"r{suffix}"
    p.write_text(text)
    r = Recipe.from_file(p)
    assert r.seed == 3 and r.steps == (FoldConstantsConfig(max_growth=2.0),)


def test_recipe_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(RecipeError, match="bad.json.*cannot parse"):
        Recipe.from_file(p)


def test_cli_flags_set_the_same_fields():
    r = _from_cli(["--fold-max-growth", "3", "--providers", "cpu,cuda", "--atol", "0.1", "--seed", "7"])
    assert r.step("fold_constants").max_growth == 3.0
    assert r.verify.providers == ("cpu", "cuda") and r.verify.atol == 0.1 and r.seed == 7


def test_cli_recipe_file_then_flags(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"steps": [{"pass": "fold_constants", "max_growth": 2.0}]}')
    r = _from_cli(["--recipe", str(p), "--fold-max-growth", "5"])
    assert [s.name for s in r.steps] == ["fold_constants"] and r.step("fold_constants").max_growth == 5.0


def test_recipe_from_cli_matches_the_command():
    assert Recipe.from_cli(["--fold-max-growth", "2"]) == _from_cli(["--fold-max-growth", "2"])


def test_print_recipe_round_trips():
    r = _from_cli(["--no-verify"])
    assert Recipe.from_dict(json.loads(r.to_json())) == r and r.verify.enabled is False


def test_derived_config_shares_its_base_flags():
    """refit_pruned (derived from distill) answers to --distill-ridge too; the flag alone still adds
    distill, and a preset that has both steps gets the value in both."""
    alone = Recipe.from_cli(["--distill-ridge", "0.01"])
    assert alone.step("distill").ridge == 0.01 and alone.step("refit_pruned") is None
    both = Recipe.from_cli(["--deep-compression", "--distill-ridge", "0.01"])
    assert both.step("distill").ridge == 0.01 and both.step("refit_pruned").ridge == 0.01
