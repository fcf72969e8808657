"""Helpers for the fuse / share_weights / low_rank tests: tiny models from ONNX text, pass runner, checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper

import builders as b
from onnxcompress.context import Context
from onnxcompress.graph.io import graph_to_model, model_to_graph, open_model
from onnxcompress.passes.base import Pipeline

CORPUS = Path(onnx.__file__).parent / "backend" / "test" / "data"


def parse(text: str, **weights: np.ndarray) -> onnx.ModelProto:
    """A model from ONNX text; ``weights`` become initializers (names with '_' for '.')."""
    m = onnx.parser.parse_model(text)
    for name, arr in weights.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    onnx.checker.check_model(m)
    return m


def header(opset: int = 17) -> str:
    return f'<ir_version: 8, opset_import: ["" : {opset}]>'


def randn(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def apply(model: onnx.ModelProto, *passes, data=None):
    """Run passes through the Pipeline (cleanup after each), export, check; return (model, results)."""
    graph = model_to_graph(open_model(model))
    with Context(data=data) as ctx:
        results = Pipeline(list(passes)).run(graph, ctx)
    out = graph_to_model(graph, model)
    onnx.checker.check_model(out)
    return out, results


def ops(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def max_rel_err(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    """max over outputs of max|ref - out| / max(max|ref|, 1e-12)."""
    worst = 0.0
    for r, o in zip(ref, out):
        r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
        assert r64.shape == o64.shape
        with np.errstate(invalid="ignore"):
            diff = np.where(r64 == o64, 0.0, np.abs(r64 - o64))  # equal infinities are equal
        scale = float(np.max(np.abs(r64[np.isfinite(r64)]), initial=0))
        worst = max(worst, float(np.max(diff, initial=0)) / max(scale, 1e-12))
    return worst


def assert_lossless(model: onnx.ModelProto, out: onnx.ModelProto, feeds: dict, rel: float = 1e-5) -> None:
    """Outputs equal within ``rel`` of the output's largest magnitude (the merges' budget)."""
    ref, got = b.run(model, feeds), b.run(out, feeds)
    err = max_rel_err(ref, got)
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def bundled(name: str) -> Path | None:
    p = Path(__file__).resolve().parent.parent / "models" / f"{name}.onnx"
    return p if p.is_file() else None


def digits_data(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The project's fixed digits split, or a seeded split of sklearn's digits if datasets.py is absent."""
    try:
        from onnxcompress.datasets import digits_split

        return digits_split(split)
    except ImportError:  # pragma: no cover - the datasets module is built in parallel
        from sklearn.datasets import load_digits

        d = load_digits()
        idx = np.random.default_rng(0).permutation(len(d.target))
        part = {"test": idx[:450], "calib": idx[450:706], "train": idx[706:]}[split]
        return (d.data[part] / 16).astype(np.float32), d.target[part]


_DIGITS_CACHE: dict = {}


def _train_mlp(x: np.ndarray, y: np.ndarray, hidden: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    """Full-batch Adam on softmax cross-entropy for x -> Relu(x W1 + b1) W2 + b2 (seeded, numpy only)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal((x.shape[1], hidden)) * np.sqrt(2 / x.shape[1]), np.zeros(hidden),
              rng.standard_normal((hidden, 10)) * np.sqrt(1 / hidden), np.zeros(10)]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    onehot = np.eye(10)[y]
    for t in range(1, steps + 1):
        w1, b1, w2, b2 = params
        h = np.maximum(x @ w1 + b1, 0)
        z = h @ w2 + b2
        p = np.exp(z - z.max(1, keepdims=True))
        g = (p / p.sum(1, keepdims=True) - onehot) / len(y)
        gh = g @ w2.T * (h > 0)
        for i, grad in enumerate((x.T @ gh, gh.sum(0), h.T @ g, g.sum(0))):
            m1[i] = 0.9 * m1[i] + 0.1 * grad
            m2[i] = 0.999 * m2[i] + 0.001 * grad * grad
            params[i] -= 0.01 * (m1[i] / (1 - 0.9 ** t)) / (np.sqrt(m2[i] / (1 - 0.999 ** t)) + 1e-8)
    return [p.astype(np.float32) for p in params]


def digits_mlp(hidden: int = 128) -> onnx.ModelProto:
    """A digits classifier x[N, 64] -> fc0 (MatMul+Add) -> Relu -> fc1 (MatMul+Add) -> y[N, 10], ~97% accurate.

    Trained here with numpy (one BLAS thread: several developers share two cores), cached per process.
    """
    if hidden not in _DIGITS_CACHE:
        from threadpoolctl import threadpool_limits

        x, y = digits_data("train")
        with threadpool_limits(1):
            w1, b1, w2, b2 = _train_mlp(x.astype(np.float64), y, hidden, 200)
        mk = onnx.helper.make_node
        nodes = [mk("MatMul", ["x", "fc0.weight"], ["mm0"], name="fc0"), mk("Add", ["mm0", "fc0.bias"], ["a0"]),
                 mk("Relu", ["a0"], ["r0"]), mk("MatMul", ["r0", "fc1.weight"], ["mm1"], name="fc1"),
                 mk("Add", ["mm1", "fc1.bias"], ["y"])]
        inits = [numpy_helper.from_array(a, n) for n, a in
                 (("fc0.weight", w1), ("fc0.bias", b1), ("fc1.weight", w2), ("fc1.bias", b2))]
        g = onnx.helper.make_graph(nodes, "digits_mlp",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 10])], inits)
        m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)], producer_name="tests")
        m.ir_version = 8
        _DIGITS_CACHE[hidden] = m.SerializeToString()
    return onnx.load_from_string(_DIGITS_CACHE[hidden])


def digits_acc(model: onnx.ModelProto) -> float:
    x, y = digits_data("test")
    return float(np.mean(np.argmax(b.run(model, {"x": x})[0], axis=1) == y))


def random_chain(seed: int) -> tuple[onnx.ModelProto, dict]:
    """A seeded random chain of MatMul / Gemm / Add / Mul / Div / BatchNormalization / Relu, constant
    transposes and parallel MatMul pairs on a 2-D or 3-D input, some intermediates exposed as outputs."""
    rng = np.random.default_rng(seed)
    mk = onnx.helper.make_node
    rank3 = rng.random() < 0.4
    width = k = int(rng.integers(2, 12))
    nodes, inits, outputs = [], [], []

    def fresh(prefix: str) -> str:
        return f"{prefix}{len(nodes)}_{len(inits)}_{rng.integers(1 << 30)}"

    def const(arr) -> str:
        name = fresh("c")
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def vector(n: int, low: float | None = None):
        """A per-column constant in one of three broadcast forms."""
        shape = ((n,), (), (1, n))[int(rng.integers(3))]
        return rng.standard_normal(shape) if low is None else rng.uniform(low, 2, shape)

    cur = "x"
    for _ in range(int(rng.integers(2, 8))):
        op = rng.choice(["matmul", "add", "mul", "div", "gemm", "bn", "relu", "tmatmul", "parallel"])
        out = fresh("t")
        if op in ("matmul", "tmatmul", "parallel", "gemm") and (op != "gemm" or not rank3):
            n = int(rng.integers(1, 12))
        if op == "matmul":
            nodes.append(mk("MatMul", [cur, const(rng.standard_normal((width, n)))], [out]))
        elif op == "tmatmul":
            wt = fresh("wt")
            nodes += [mk("Transpose", [const(rng.standard_normal((n, width)))], [wt]), mk("MatMul", [cur, wt], [out])]
        elif op == "add":
            c = const(vector(width))
            nodes.append(mk("Add", [cur, c] if rng.random() < 0.5 else [c, cur], [out]))
        elif op in ("mul", "div"):
            c = const(vector(width, 0.5))
            args = [cur, c] if op == "div" or rng.random() < 0.5 else [c, cur]
            nodes.append(mk(op.capitalize(), args, [out]))
        elif op == "gemm" and not rank3:
            tb = int(rng.integers(2))
            ins = [cur, const(rng.standard_normal((n, width) if tb else (width, n)))]
            if rng.random() < 0.7:
                ins.append(const(rng.standard_normal(n)))
            nodes.append(mk("Gemm", ins, [out], transB=tb, alpha=float(rng.uniform(0.5, 2)),
                            beta=float(rng.uniform(0.5, 2))))
        elif op == "bn" and not rank3:
            ins = [cur] + [const(v) for v in (rng.uniform(0.5, 1.5, width), rng.standard_normal(width),
                                              rng.standard_normal(width), rng.uniform(0.5, 1.5, width))]
            nodes.append(mk("BatchNormalization", ins, [out], epsilon=1e-3))
        elif op == "relu":
            nodes.append(mk("Relu", [cur], [out]))
        elif op == "parallel":
            a, b2 = fresh("pa"), fresh("pb")
            nodes += [mk("MatMul", [cur, const(rng.standard_normal((width, n)))], [a]),
                      mk("MatMul", [cur, const(rng.standard_normal((width, n)))], [b2])]
            if rng.random() < 0.5:
                a2 = fresh("pa")
                nodes.append(mk("Add", [a, const(rng.standard_normal(n))], [a2]))
                a = a2
            nodes.append(mk("Add", [a, b2], [out]))
        else:
            continue
        if op in ("matmul", "tmatmul", "parallel", "gemm"):
            width = n
        if rng.random() < 0.15:
            outputs.append(out)
        cur = out
    if not nodes:
        nodes.append(mk("Relu", [cur], ["y"]))
        cur = "y"
    shape = ["N", 3, k] if rank3 else ["N", k]
    g = onnx.helper.make_graph(nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                               [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None)
                                for o in dict.fromkeys(outputs + [cur])], inits)
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    m.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(m).graph
    types = {v.name: v.type for v in [*inferred.value_info, *inferred.output]}
    for o in m.graph.output:
        if o.name in types:
            o.type.CopyFrom(types[o.name])
    onnx.checker.check_model(m)
    return m, {"x": rng.standard_normal([2] + shape[1:]).astype(np.float32)}
