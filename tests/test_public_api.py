"""The public surface: what `import onnxcompress` offers, and nothing private leaks."""

import onnxcompress


def test_public_names():
    assert set(onnxcompress.__all__) == {
        "__version__", "compress", "CompressResult", "Context", "load", "save", "Recipe", "StepConfig",
        "VerifyConfig", "OutputConfig", "preset_recipe", "default_recipe", "Report",
        "OnnxCompressError", "RecipeError", "ModelError", "PreconditionError", "CalibrationError",
        "PassError", "ParityError",
    }
    for name in onnxcompress.__all__:
        assert hasattr(onnxcompress, name), name


def test_error_hierarchy_and_exit_codes():
    E = onnxcompress
    assert issubclass(E.PreconditionError, E.ModelError)
    for cls in (E.RecipeError, E.ModelError, E.CalibrationError, E.PassError, E.ParityError):
        assert issubclass(cls, E.OnnxCompressError)
    assert (E.ParityError.exit_code, E.RecipeError.exit_code, E.ModelError.exit_code, E.PassError.exit_code) == (1, 2, 3, 4)
    err = E.ModelError("bad thing", where="load", hint="fix it")
    assert str(err) == "load: bad thing (hint: fix it)"


def test_verify_is_importable_without_passes():
    import onnxcompress.verify as v

    assert callable(v.compare_models)
