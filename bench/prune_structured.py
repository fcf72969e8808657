"""Structured pruning benchmark: accuracy, parameters, FLOPs, file size and CPU latency, side by side.

For each digits model and each variant (``prune_channels`` at 25 / 50 % of the channels of every
dependency group with l1, bn or activation importance, activation with bias correction, and
``merge_neurons`` at 25 / 50 %; one-shot, no fine-tuning; calibration data: the digits calib split) the variant is produced with ``onnxcompress.compress`` (that step only) and compared
against the fp32 input in the same process:

* digits test accuracy (450 samples, :mod:`onnxcompress.datasets`);
* parameters and FLOPs (Conv/Gemm/MatMul, ``prune_channels.model_cost``) and file size, relative;
* CPU latency speed-up against fp32 at batch 64 (onnxruntime default optimizations, one thread;
  rounds interleave the variants; median over rounds).

Models: ``models/mlp.onnx`` and ``models/cnn.onnx`` when they are built; without the bundled MLP a
LeNet-300-100 MLP is trained here with scikit-learn on the same train split. The digits CNN reads
8x8 images, so its latency is dominated by per-op overhead, not arithmetic: the speed-up target is
measured as well on a wider synthetic CNN (random weights; ResNet-style blocks with BatchNorm,
3x32x32 input, 64 and 128 channels), where only structure and latency mean something.

    python bench/prune_structured.py                 # prints the tables
    python bench/prune_structured.py --write-docs    # ... and writes them into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "prune-structured"


def variants(kind: str) -> list[tuple[str, object]]:
    from onnxcompress.fuse.neuron_merge import MergeNeuronsConfig
    from onnxcompress.prune.channels import PruneChannelsConfig

    out = [("fp32", None)]
    for r in (0.25, 0.5):
        out.append((f"prune {r:.0%} l1", PruneChannelsConfig(ratio=r, importance="l1")))
        if kind == "cnn":
            out.append((f"prune {r:.0%} bn", PruneChannelsConfig(ratio=r, importance="bn")))
        if kind != "synthetic":
            out.append((f"prune {r:.0%} activation", PruneChannelsConfig(ratio=r, importance="activation")))
            out.append((f"prune {r:.0%} activation + bias corr.",
                        PruneChannelsConfig(ratio=r, importance="activation", bias_correction=True)))
            out.append((f"merge {r:.0%}", MergeNeuronsConfig(ratio=r)))
    return out


def make(model: onnx.ModelProto, step, calib) -> onnx.ModelProto:
    from onnxcompress.api import compress
    from onnxcompress.recipe import Recipe, VerifyConfig

    if step is None:
        return model
    return compress(model, Recipe(steps=(step,), verify=VerifyConfig(enabled=False)), data=calib).model


def session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def speedups(models: dict[str, onnx.ModelProto], feed: dict, rounds: int, reps: int) -> dict[str, float]:
    """fp32 median time / variant median time; rounds interleave the variants."""
    sessions = {k: session(m) for k, m in models.items()}
    for s in sessions.values():
        s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                s.run(None, feed)
            times[k].append((time.perf_counter() - t0) / reps)
    base = float(np.median(times["fp32"]))
    return {k: base / float(np.median(v)) for k, v in times.items()}


# -- models -------------------------------------------------------------------------------------


def sklearn_mlp() -> onnx.ModelProto:
    """LeNet-300-100 trained with scikit-learn on the digits train split (x float [N, 64] in [0, 1])."""
    from sklearn.neural_network import MLPClassifier

    from onnxcompress.datasets import digits_split

    x, y = digits_split("train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier(hidden_layer_sizes=(300, 100), max_iter=200, random_state=0).fit(x, y)
    nodes, inits, h = [], [], "x"
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"fc{i}.weight"),
                  numpy_helper.from_array(b.astype(np.float32), f"fc{i}.bias")]
        nodes += [helper.make_node("MatMul", [h, f"fc{i}.weight"], [f"mm{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [f"lin{i}"], name=f"fc{i}_bias")]
        h = f"lin{i}"
        if i < len(clf.coefs_) - 1:
            nodes.append(helper.make_node("Relu", [h], [f"relu{i}"], name=f"relu{i}"))
            h = f"relu{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                          [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def synthetic_cnn(seed: int = 0, size: int = 32) -> onnx.ModelProto:
    """conv64-bn-relu, 2 residual blocks (64), strided conv128-bn-relu, 1 residual block (128),
    global average pool, Gemm 128->10; He-initialised random weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    count = [0]

    def conv_bn(x, cin, cout, stride=1, relu=True):
        count[0] += 1
        i = count[0]
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (cin * 9))).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"conv{i}.w"),
                      numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(np.float32), f"bn{i}.s"),
                      numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"bn{i}.b"),
                      numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), f"bn{i}.m"),
                      numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(np.float32), f"bn{i}.v")])
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.w"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4,
                                      strides=[stride] * 2))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}"] + [f"bn{i}.{k}" for k in "sbmv"], [f"n{i}"],
                                      name=f"bn{i}"))
        if not relu:
            return f"n{i}"
        nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"))
        return f"r{i}"

    def block(x, c):
        y = conv_bn(conv_bn(x, c, c), c, c, relu=False)
        nodes.append(helper.make_node("Add", [x, y], [f"{y}_add"], name=f"{y}_add"))
        nodes.append(helper.make_node("Relu", [f"{y}_add"], [f"{y}_out"], name=f"{y}_out"))
        return f"{y}_out"

    h = block(block(conv_bn("x", 3, 64), 64), 64)
    h = block(conv_bn(h, 64, 128, stride=2), 128)
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    inits += [numpy_helper.from_array((rng.standard_normal((10, 128)) / 11).astype(np.float32), "fc.w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    g = helper.make_graph(nodes, "wide_cnn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, size, size])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


# -- the tables -----------------------------------------------------------------------------------


def bench(name: str, model: onnx.ModelProto, kind: str, batch: int, rounds: int, reps: int) -> list[dict]:
    from onnxcompress.prune.channels import model_cost

    digits = kind != "synthetic"
    if digits:
        from onnxcompress.datasets import digits_accuracy, digits_feeds

        calib_x = next(iter(digits_feeds(model, "calib").items()))
        calib = [{calib_x[0]: calib_x[1][i:i + 64]} for i in range(0, len(calib_x[1]), 64)]
        (in_name, test), = digits_feeds(model, "test").items()
        feed = {in_name: np.resize(test, (batch,) + test.shape[1:])}
    else:
        calib = None
        shape = [batch] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
        feed = {model.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    built = {label: make(model, step, calib) for label, step in variants(kind)}
    speed = speedups(built, feed, rounds, reps)
    base_cost, base_size = model_cost(model), model.ByteSize()
    rows = []
    for label, m in built.items():
        onnx.checker.check_model(m)
        cost = model_cost(m)
        rows.append({"model": name, "variant": label,
                     "accuracy": digits_accuracy(m) if digits else None,
                     "params": cost["params"] / base_cost["params"], "flops": cost["flops"] / base_cost["flops"],
                     "size": m.ByteSize() / base_size, "speedup": speed[label]})
    return rows


def render(rows: list[dict], command: str, batch: int, notes: list[str]) -> str:
    import onnxruntime

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} cores (shared), onnxruntime {onnxruntime.__version__}; "
        f"{datetime.date.today().isoformat()}; `{command}`",
        "",
        "One-shot structured pruning / neuron merging, no fine-tuning. Ratios are against the fp32 input "
        f"in the same run; speed-up = fp32 latency / variant latency at batch {batch} (one thread, "
        "onnxruntime default optimizations, median of interleaved rounds).",
        "",
        "| model | variant | accuracy | params | FLOPs | file size | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "n/a (random weights)"
        lines.append(f"| {r['model']} | {r['variant']} | {acc} | {r['params']:.3f} | {r['flops']:.3f} | "
                     f"{r['size']:.3f} | {r['speedup']:.2f}x |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text(encoding="utf-8")
    start, end = f"<!-- section: {SECTION} -->", f"<!-- end: {SECTION} -->"
    i, j = doc.index(start) + len(start), doc.index(end)
    path.write_text(doc[:i] + "\n" + text + doc[j:], encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=32, help="input size of the synthetic CNN")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    from onnxcompress.datasets import bundled_model_path

    rows, notes = [], []
    for name in ("mlp", "cnn"):
        try:
            model = onnx.load(bundled_model_path(name))
            label = f"digits {name}"
        except FileNotFoundError:
            if name == "cnn":
                notes.append("models/cnn.onnx was not built when this ran: no digits CNN rows.")
                continue
            model, label = sklearn_mlp(), "digits mlp (scikit-learn)"
            notes.append("models/mlp.onnx was not built when this ran: the MLP is LeNet-300-100 trained "
                         "here with scikit-learn on the digits train split.")
        rows += bench(label, model, name, args.batch, args.rounds, args.reps)
    rows += bench(f"synthetic CNN 3x{args.size}x{args.size}", synthetic_cnn(size=args.size), "synthetic",
                  args.batch, args.rounds, max(1, args.reps // 3))
    command = "python bench/prune_structured.py" + (" " + " ".join(argv) if argv else "")
    text = render(rows, command, args.batch, notes)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
