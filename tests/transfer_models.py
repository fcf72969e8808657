"""Small trained digits models for the transfer tests, without PyTorch.

``digits_mlp(hidden)`` trains scikit-learn's MLPClassifier (ReLU, Adam, seeded) on the fixed digits
``train`` split and writes it as ONNX ``Gemm (transB=1) -> Relu -> ... -> Gemm`` with input ``x``
[N, 64] and output ``logits`` [N, 10], the layout of ``models/mlp.onnx``. Results are cached per
process. ``names`` renames every tensor with a prefix (a second "export" of the same network).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@functools.lru_cache(maxsize=4)
def _trained(hidden: tuple[int, ...], max_iter: int) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from onnxcompress.datasets import digits_split

    x, y = digits_split("train")
    clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=max_iter, random_state=0, alpha=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return tuple(w.astype(np.float32) for w in clf.coefs_), tuple(b.astype(np.float32) for b in clf.intercepts_)


def digits_mlp(hidden: tuple[int, ...] = (64, 32), *, max_iter: int = 300, prefix: str = "") -> onnx.ModelProto:
    """A trained digits MLP as ONNX (Gemm with transB=1, like a PyTorch export)."""
    coefs, biases = _trained(tuple(hidden), max_iter)
    nodes, inits = [], []
    prev = "x"
    for i, (w, b) in enumerate(zip(coefs, biases)):
        last = i == len(coefs) - 1
        inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"{prefix}fc{i}.weight"),
                  numpy_helper.from_array(b, f"{prefix}fc{i}.bias")]
        out = "logits" if last else f"{prefix}fc{i}_out"
        nodes.append(helper.make_node("Gemm", [prev, f"{prefix}fc{i}.weight", f"{prefix}fc{i}.bias"], [out],
                                      name=f"{prefix}fc{i}", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"{prefix}relu{i}"], name=f"{prefix}relu{i}"))
            prev = f"{prefix}relu{i}"
    graph = helper.make_graph(nodes, "digits_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def kmeans_share(w: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """Snap the non-zeros of ``w`` to ``k`` 1-D k-means centres (zeros pinned), linear init."""
    out = w.copy()
    nz = w != 0
    v = w[nz].astype(np.float64)
    c = np.linspace(v.min(), v.max(), k)
    for _ in range(30):
        a = np.abs(v[:, None] - c[None, :]).argmin(1)
        for j in range(k):
            if np.any(a == j):
                c[j] = v[a == j].mean()
    out[nz] = c[np.abs(v[:, None] - c[None, :]).argmin(1)].astype(w.dtype)
    return out


def magnitude_prune(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the ``floor(sparsity · n)`` smallest magnitudes of ``w``."""
    flat = w.reshape(-1).copy()
    k = int(np.floor(sparsity * flat.size))
    flat[np.argsort(np.abs(flat), kind="stable")[:k]] = 0
    return flat.reshape(w.shape)


def edit_weights(model: onnx.ModelProto, fn) -> onnx.ModelProto:
    """A copy of ``model`` with ``fn(name, array) -> array`` applied to every 2-D+ initializer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim >= 2:
            t.CopyFrom(numpy_helper.from_array(fn(t.name, a).astype(a.dtype), t.name))
    return out
