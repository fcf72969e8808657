"""onnxcompress: make trained ONNX models smaller and faster, with proof that they still work.

The public API::

    import onnxcompress as oc
    result = oc.compress("model.onnx", oc.preset_recipe(["int8"]), data="calib.npz")
    result.save("model-int8.onnx")
    print(result.report.summary())
"""

__version__ = "0.1.0"

from onnxcompress.api import CompressResult, compress  # noqa: E402
from onnxcompress.context import Context  # noqa: E402
from onnxcompress.errors import (  # noqa: E402
    CalibrationError,
    ModelError,
    OnnxCompressError,
    ParityError,
    PassError,
    PreconditionError,
    RecipeError,
)
from onnxcompress.graph.io import load, save  # noqa: E402
from onnxcompress.recipe import OutputConfig, Recipe, StepConfig, VerifyConfig  # noqa: E402
from onnxcompress.recipes import default_recipe, preset_recipe  # noqa: E402
from onnxcompress.report import Report  # noqa: E402

__all__ = [
    "__version__",
    "compress",
    "CompressResult",
    "Context",
    "load",
    "save",
    "Recipe",
    "StepConfig",
    "VerifyConfig",
    "OutputConfig",
    "preset_recipe",
    "default_recipe",
    "Report",
    "OnnxCompressError",
    "RecipeError",
    "ModelError",
    "PreconditionError",
    "CalibrationError",
    "PassError",
    "ParityError",
]
