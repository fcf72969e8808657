"""The op policy table of static int8: which ops are quantized, which keep their input's scale, which
stay float by default.

* ``QUANTIZED``: the weighted ops. Their activation inputs get QuantizeLinear/DequantizeLinear, their
  weights int8 (per channel along :func:`onnxcompress.quantize.storage.weight_axis`), Gemm/Conv bias
  int32 with scale ``s_x * s_w``, and a QuantizeLinear after them — the layout onnxruntime fuses
  into QLinearMatMul / QGemm / QLinearConv. ConvTranspose is in ``STORAGE_ONLY``: onnxruntime's CPU EP
  has no fused kernel for it, so its weight gets size-only int8 storage.
* ``SAME_SCALE``: data movement and max-like ops whose output range is inside the input's; the output
  reuses the input's scale and zero point, so onnxruntime drops the DQ -> op -> Q pair and the integer
  chain is unbroken.
* ``OWN_SCALE``: ops with integer kernels whose output needs its own range (QLinearConcat,
  QLinearAveragePool, QLinearGlobalAveragePool, QLinearAdd when both sides are quantized, Resize).
* ``RELU_LIKE``: activation functions that a QuantizeLinear with ``zero_point == qmin`` computes for
  free (Relu, Clip with min 0): they are removed when they are the only reader of a quantized op's
  output, whose range becomes theirs.
* ``SENSITIVE``: ops that break int8 in transformers and stay float by default
  (``keep_sensitive_float``): LayerNormalization and its decomposition, Softmax, GELU/Erf; plus two
  patterns found by :func:`is_residual_add` and :func:`is_embedding_gather`.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxcompress.graph.query import consumers, is_constant, producer

__all__ = ["QUANTIZED", "STORAGE_ONLY", "SAME_SCALE", "OWN_SCALE", "RELU_LIKE", "SENSITIVE", "NORMALIZATION",
           "is_residual_add", "is_embedding_gather", "relu_like"]

QUANTIZED = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
#: weighted ops that onnxruntime's CPU EP has no fused int8 kernel for (measured with onnxruntime 1.32:
#: QDQ around ConvTranspose stays a float ConvTranspose with run-time DequantizeLinear, slower than
#: fp32, whatever the calibrator): static mode stores their weights as int8 (size only) instead
STORAGE_ONLY = {"ConvTranspose": "no fused int8 ConvTranspose kernel in onnxruntime's CPU EP (QDQ would run "
                                 "float with run-time DequantizeLinear): weight stored as int8, decoded at load"}
SAME_SCALE = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool"})
OWN_SCALE = frozenset({"Concat", "Resize", "AveragePool", "GlobalAveragePool", "Add"})
RELU_LIKE = frozenset({"Relu", "Clip"})
SENSITIVE = frozenset({"LayerNormalization", "Softmax", "Gelu", "Erf", "ReduceMean", "Pow", "Sqrt", "Div",
                       "SkipLayerNormalization", "SimplifiedLayerNormalization", "FastGelu", "BiasGelu",
                       "Tanh", "Sigmoid", "Exp", "Log"})
NORMALIZATION = frozenset({"LayerNormalization", "ReduceMean", "SkipLayerNormalization",
                           "SimplifiedLayerNormalization", "BatchNormalization", "InstanceNormalization"})


def relu_like(node: gs.Node) -> bool:
    """Relu, or Clip whose lower bound is exactly 0 (a constant)."""
    if node.op == "Relu":
        return True
    if node.op != "Clip":
        return False
    if "min" in node.attrs:
        return float(node.attrs["min"]) == 0.0
    if len(node.inputs) > 1 and node.inputs[1].name:
        from onnxcompress.graph.query import const_value

        v = const_value(node.inputs[1])
        return v is not None and v.size == 1 and float(v.reshape(-1)[0]) == 0.0
    return False


def is_residual_add(node: gs.Node) -> bool:
    """An Add of two activations whose sum feeds a normalization (the transformer residual stream)."""
    if node.op != "Add" or len(node.inputs) != 2 or any(is_constant(t) for t in node.inputs):
        return False
    return any(c.op in NORMALIZATION for o in node.outputs for c in consumers(o))


def is_embedding_gather(node: gs.Node) -> bool:
    """A Gather reading rows of a constant table (token / position embeddings)."""
    return node.op == "Gather" and bool(node.inputs) and is_constant(node.inputs[0])


def is_decomposed_norm_op(node: gs.Node) -> bool:
    """A Sub/Mul/Add inside a decomposed LayerNorm: it reads a ReduceMean output or feeds one."""
    if node.op not in ("Sub", "Mul", "Add"):
        return False
    for t in node.inputs:
        p = producer(t)
        if p is not None and p.op in ("ReduceMean", "Sqrt", "Div"):
            return True
    return any(c.op in ("ReduceMean", "Pow") for o in node.outputs for c in consumers(o))
