"""Options of the int8 quantization passes (``quantize_int8``) and of size-only storage (``storage``).

Defaults live here and only here. ``--int8`` (a preset in :mod:`onnxcompress.recipes`) adds
``quantize_int8`` with ``mode="auto"``: static QDQ when calibration data is in the context, otherwise
dynamic int8 for MatMul/Gemm and size-only int8 storage for Conv. ``--storage int8|int4`` adds the
``storage`` step (file size only; fp32 numerics and speed).
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxcompress.errors import RecipeError
from onnxcompress.recipe import StepConfig, option

__all__ = ["QuantizeInt8Config", "StorageConfig", "CALIB_METHODS"]

CALIB_METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass(frozen=True)
class QuantizeInt8Config(StepConfig):
    """int8 quantization: static QDQ (with calibration data) or dynamic (without)."""

    name = "quantize_int8"
    order = 60

    mode: str = option("auto", "static: QDQ with calibrated activation ranges (needs --calib-data); dynamic: "
                       "DynamicQuantizeLinear + MatMulInteger for MatMul/Gemm and int8 storage for Conv; "
                       "auto: static when calibration data is given, else dynamic",
                       flag="--int8-mode", choices=("auto", "static", "dynamic"))
    per_channel: bool = option(True, "one weight scale per output channel (off: one per tensor)", flag="--per-channel")
    symmetric: bool = option(False, "symmetric activation ranges (zero point 0 / 128); off: the seed's asymmetric "
                             "min-max mapping. Weights are always symmetric", flag="--symmetric")
    activation_type: str = option("u8", "integer type of activations (u8 is what onnxruntime's CPU kernels fuse best)",
                                  flag="--activation-type", choices=("u8", "s8"))
    weight_type: str = option("s8", "integer type of weights", flag="--weight-type", choices=("s8", "u8"))
    calib_method: str = option("mse", "how an activation range is chosen from its streamed statistics (mse: least "
                               "round-trip error on the histogram; entropy can clip attention probabilities hard)",
                               flag="--calib-method", choices=CALIB_METHODS)
    percentile: float = option(99.99, "percentile kept by --calib-method percentile (each tail)",
                               flag="--calib-percentile", minimum=50.0, maximum=100.0)
    num_bins: int = option(2048, "bins of the streamed histogram (percentile, entropy, mse)",
                           flag="--calib-bins", minimum=128, maximum=65536)
    max_calib_batches: int = option(0, "stop calibrating after this many batches (0: all of them)",
                                    flag="--calib-batches", minimum=0)
    calib_cache: str | None = option(None, "save the calibrated ranges to this JSON file, or reuse them when it "
                                     "exists and was made for this model (graph and weights) with the same "
                                     "method and settings; the calibration data is not checked", flag="--calib-cache", metavar="FILE")
    exclude_nodes: tuple[str, ...] = option((), "node name patterns (fnmatch, comma separated) kept in float",
                                            flag="--exclude-nodes", metavar="PATTERNS")
    exclude_ops: tuple[str, ...] = option((), "op types kept in float (comma separated)", flag="--exclude-ops",
                                          metavar="TYPES")
    keep_first_last: bool = option(False, "keep the first and the last quantizable layer in float",
                                   flag="--keep-first-last")
    keep_sensitive_float: bool = option(True, "keep residual Adds (an Add of two activations feeding a normalization) "
                                        "in float; LayerNorm and its decomposition, Softmax, GELU/Erf and embedding "
                                        "Gathers always stay float in this pass (what breaks int8 in transformers)",
                                        flag="--keep-sensitive-float")
    quantize_act_matmul: bool = option(True, "quantize MatMuls whose both inputs are activations "
                                       "(attention scores and context)", flag="--quantize-attention")
    matmul_float_output: bool = option(True, "a quantized MatMul whose output only float ops read gets no output "
                                       "QuantizeLinear (onnxruntime runs it as MatMulIntegerToFloat, bias Add fused); "
                                       "off: a QuantizeLinear after every quantized op", flag="--matmul-float-output")
    smoothquant: float | None = option(None, "SmoothQuant scale migration strength alpha in [0, 1] for MatMul/Gemm "
                                       "fed by a normalization (static mode)", flag="--smoothquant",
                                       minimum=0.0, maximum=1.0, metavar="ALPHA")
    conv_storage: bool = option(True, "dynamic mode: store Conv weights as int8 (size only) instead of leaving them",
                                flag="--conv-storage")
    min_elements: int = option(16, "weights with fewer elements stay float", minimum=0)

    def validate(self) -> None:
        if self.activation_type == "s8" and self.mode == "dynamic":
            raise RecipeError("dynamic int8 quantizes activations to uint8 only (DynamicQuantizeLinear)",
                              where="recipe, quantize_int8", hint="drop --activation-type s8 or use --int8-mode static")
        if self.smoothquant is not None and self.mode == "dynamic":
            raise RecipeError("--smoothquant needs calibration statistics (static mode)",
                              where="recipe, quantize_int8", hint="use --int8-mode static with --calib-data")


@dataclass(frozen=True)
class StorageConfig(StepConfig):
    """Size-only integer storage: weights stored as int8 / int4, decoded by Cast -> Mul at load time."""

    name = "storage"
    order = 80

    bits: str = option("int8", "integer type of stored weights (decoded to float when onnxruntime loads the model)",
                       flag="--storage", choices=("int8", "int4"))
    block: int = option(0, "block size along each channel (0: one scale per channel)", flag="--storage-block",
                        minimum=0, maximum=4096)
    ops: tuple[str, ...] = option(("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"),
                                  "op types whose weight inputs are stored as integers")
    min_elements: int = option(1024, "weights with fewer elements stay float", minimum=1)

    def validate(self) -> None:
        if self.block and (self.block < 8 or self.block & (self.block - 1)):
            raise RecipeError(f"--storage-block {self.block} must be 0 or a power of two >= 8",
                              where="recipe, storage", hint="use 0 (per channel), 32, 64 or 128")
