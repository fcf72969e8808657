"""Structured pruning benchmark: accuracy, parameters, FLOPs, file size and CPU latency, side by side.

For each digits model and each variant (``prune_channels`` at 25 / 50 % of the channels of every
dependency group with l1, bn or activation importance, with and without bias correction, l1
followed by the ``distill`` repair from the original model, and ``merge_neurons`` at 25 / 50 %; for
CNNs also l1 with ``--round-to 8``; calibration data: the digits calib split; no fine-tuning) the
variant is produced with ``onnxcompress.compress`` (those steps only) and compared against the fp32
input in the same process:

* digits test accuracy (450 samples, :mod:`onnxcompress.datasets`);
* parameters and FLOPs (Conv/Gemm/MatMul, ``prune_channels.model_cost``) and file size, relative;
* CPU latency speed-up against fp32 at batch 64 (onnxruntime default optimizations, one intra-op
  thread unless ``--threads``; every model warmed up, then rounds that call every model ``--reps``
  times in an order shuffled per round; per model the 10th percentile of its single calls, as the
  machine is shared — see :func:`speedups`).

Where the pruned CNNs' channel counts fall below onnxruntime's NCHWc block (16 with AVX-512), its layout
pass computes the padded channels anyway and converts back to NCHW after every such Conv; a note says
how many channels it computes and how many ReorderOutput nodes it adds (:func:`nchwc_layout`).

Models: ``models/mlp.onnx``, ``models/cnn.onnx`` and ``models/transformer.onnx`` when they are built (the
transformer: feed-forward widths only); without the bundled MLP a
LeNet-300-100 MLP is trained here with scikit-learn on the same train split. The digits CNN has
16 and 32 channels on 8x8 images (at batch 64 its Convs take ~95% of the fp32 time in onnxruntime's
profile, but pruned to 8 channels they fall below the NCHWc block, see above): latency is measured as
well on the same architecture with random weights (what the bundled CNN is: 1->16 stem, one
16-channel residual block, strided 16->32, pool, Linear; usable when models/cnn.onnx is not built)
and on a wider synthetic CNN (ResNet-style blocks with BatchNorm, 3x32x32 input, 64 and 128
channels). For random-weight models only structure and latency mean something.

    python bench/prune_structured.py                 # prints the tables
    python bench/prune_structured.py --write-docs    # ... and writes them into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from _docs import machine, write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "prune-structured"


def variants(kind: str) -> list[tuple[str, tuple]]:
    """``(label, steps)``; ``kind`` is mlp, cnn (digits models, with data) or synthetic."""
    from onnxcompress.fuse.neuron_merge import MergeNeuronsConfig
    from onnxcompress.prune.channels import PruneChannelsConfig as Prune
    from onnxcompress.recipes import default_recipe
    from onnxcompress.transfer.reconstruct import DistillConfig

    out: list[tuple[str, tuple]] = [("fp32", ())]
    for r in (0.25, 0.5):
        p = f"prune {r:.0%}"
        out.append((f"{p} l1", (Prune(ratio=r),)))
        # what `onnxcompress in.onnx out.onnx --prune-channels R` runs: the lossless prefix, then pruning
        out.append((f"{p} l1, CLI recipe", default_recipe().with_step(Prune(ratio=r)).steps))
        if kind != "mlp":
            out.append((f"{p} l1 round-to 8", (Prune(ratio=r, round_to=8),)))
        if kind == "synthetic":
            continue
        if kind == "transformer":  # only the feed-forward widths are prunable (heads reshape, LayerNorm)
            out.append((f"{p} activation", (Prune(ratio=r, importance="activation"),)))
            out.append((f"merge {r:.0%}", (MergeNeuronsConfig(ratio=r),)))
            continue
        if kind == "cnn":
            out.append((f"{p} bn", (Prune(ratio=r, importance="bn"),)))
        out.append((f"{p} activation", (Prune(ratio=r, importance="activation"),)))
        out.append((f"{p} l1 + bias corr.", (Prune(ratio=r, bias_correction=True),)))
        out.append((f"{p} activation + bias corr.", (Prune(ratio=r, importance="activation", bias_correction=True),)))
        out.append((f"{p} l1 + distill repair", (Prune(ratio=r), DistillConfig())))
        out.append((f"merge {r:.0%}", (MergeNeuronsConfig(ratio=r),)))
    return out


def make(model: onnx.ModelProto, steps: tuple, calib, *, roundtrip: bool = False) -> onnx.ModelProto:
    from onnxcompress.api import compress
    from onnxcompress.recipe import Recipe, VerifyConfig

    if not steps and not roundtrip:
        return model
    return compress(model, Recipe(steps=steps, verify=VerifyConfig(enabled=False)), data=calib).model


def session(model: onnx.ModelProto, threads: int = 1):
    """Default optimizations (ORT_ENABLE_ALL), ``threads`` intra-op threads, one inter-op thread, sequential."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def speedups(models: dict[str, onnx.ModelProto], feed: dict, rounds: int, reps: int,
             threads: int = 1, seconds: float = 0.0) -> tuple[dict[str, float], float]:
    """fp32 time / variant time, each the 10th percentile of its single-call times, and that fp32 time (s).

    Every model is warmed up (10 calls), then each round calls every model ``reps`` times, in an order
    shuffled per round (seeded), so no variant always follows the same neighbour and every model samples
    the whole run; rounds go on past ``rounds`` until ``seconds`` have passed. On this shared machine
    other processes and the host only ever add time, and not evenly: in a disturbed phase (measured) the
    pruned digits CNN slowed by 50-70% and fp32 by 15-20%, so a statistic of whole rounds (the fastest,
    the median, or paired round ratios) depends on how the phases fell. A low percentile of many single
    calls keeps the undisturbed fast path of every model, provided the run spans enough time to meet it
    (disturbed phases last from a fraction of a second to minutes)."""
    import random

    sessions = {k: session(m, threads) for k, m in models.items()}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, feed)
    calls: dict[str, list[float]] = {k: [] for k in sessions}
    order, shuffle = list(sessions), random.Random(0).shuffle
    done, start = 0, time.perf_counter()
    while done < rounds or time.perf_counter() - start < seconds:
        done += 1
        shuffle(order)
        for k in order:
            run, out = sessions[k].run, calls[k]
            for _ in range(reps):
                t0 = time.perf_counter()
                run(None, feed)
                out.append(time.perf_counter() - t0)
    base = float(np.percentile(calls["fp32"], 10))
    return {k: base / float(np.percentile(v, 10)) for k, v in calls.items()}, base


def nchwc_layout(model: onnx.ModelProto) -> dict[str, int]:
    """What onnxruntime's NCHWc layout pass (default optimizations) made of the model's Convs: ``convs``
    (Conv nodes), ``nchwc`` (of them run as NCHWc convs), ``reorders`` (ReorderOutput nodes back to NCHW),
    ``declared`` (output channels of all Convs) and ``computed`` (output channels of the NCHWc convs'
    blocked filters: onnxruntime rounds each up to its block, 16 with AVX-512, 8 with AVX2)."""
    import tempfile

    import onnxruntime as ort

    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    rows = {t.name: t.dims[0] for t in opt.graph.initializer}
    nchwc = [n for n in opt.graph.node if n.op_type == "Conv" and n.domain == "com.microsoft.nchwc"]
    return {"convs": len(conv_weights), "nchwc": len(nchwc),
            "reorders": sum(n.op_type == "ReorderOutput" for n in opt.graph.node),
            "declared": sum(t.dims[0] for t in model.graph.initializer if t.name in conv_weights),
            "computed": sum(rows.get(n.input[1], 0) for n in nchwc)}


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


def synthetic_cnn(seed: int = 0, size: int = 32, cin: int = 3, widths: tuple[int, int] = (64, 128),
                  blocks: tuple[int, int] = (2, 1)) -> onnx.ModelProto:
    """conv(w1)-bn-relu, ``blocks[0]`` residual blocks, strided conv(w2)-bn-relu, ``blocks[1]`` residual
    blocks, global average pool, Gemm w2->10; He-initialised random weights. The defaults are the
    wide CNN; ``cin=1, size=8, widths=(16, 32), blocks=(1, 0)`` is the bundled digits CNN's architecture."""
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

    w1, w2 = widths
    h = conv_bn("x", cin, w1)
    for _ in range(blocks[0]):
        h = block(h, w1)
    h = conv_bn(h, w1, w2, stride=2)
    for _ in range(blocks[1]):
        h = block(h, w2)
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    inits += [numpy_helper.from_array((rng.standard_normal((10, w2)) / np.sqrt(w2)).astype(np.float32), "fc.w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    g = helper.make_graph(nodes, "wide_cnn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", cin, size, size])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


# -- the tables -----------------------------------------------------------------------------------


def digits_data(model: onnx.ModelProto, batch: int) -> tuple[list[dict], dict]:
    """The calib split as feeds of 64 samples, and one timing feed of ``batch`` test samples."""
    from onnxcompress.datasets import digits_feeds

    (name, x), = digits_feeds(model, "calib").items()
    (_, test), = digits_feeds(model, "test").items()
    return [{name: x[i:i + 64]} for i in range(0, len(x), 64)], {name: np.resize(test, (batch,) + test.shape[1:])}


def bench(name: str, model: onnx.ModelProto, kind: str, batch: int, timing: dict, notes: list[str]) -> list[dict]:
    """The rows of one model; ``timing``: :func:`speedups`' rounds, reps, threads and seconds."""
    from onnxcompress.prune.channels import model_cost

    digits = kind != "synthetic"
    if digits:
        from onnxcompress.datasets import digits_accuracy

        calib, feed = digits_data(model, batch)
    else:
        calib = None
        shape = [batch] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
        feed = {model.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    built = {label: make(model, steps, calib) for label, steps in variants(kind)}
    speed, base_s = speedups(built, feed, **timing)
    if "prune 50% l1" in built and any(n.op_type == "Conv" for n in model.graph.node):
        note = layout_note(name, built["fp32"], built["prune 50% l1"])
        notes += [note] if note else []
    # sizes against the input after a plain load/save round trip (which drops exporter per-node metadata)
    base_cost, base_size = model_cost(model), make(model, (), None, roundtrip=True).ByteSize()
    rows = []
    for label, m in built.items():
        onnx.checker.check_model(m)
        cost = model_cost(m)
        rows.append({"model": name, "variant": label,
                     "accuracy": digits_accuracy(m) if digits else None,
                     "params": cost["params"] / base_cost["params"], "flops": cost["flops"] / base_cost["flops"],
                     "size": m.ByteSize() / base_size, "speedup": speed[label],
                     **({"ms": base_s * 1e3} if label == "fp32" else {})})
    return rows


def layout_note(name: str, fp32: onnx.ModelProto, pruned: onnx.ModelProto) -> str | None:
    """A note when onnxruntime computes padded channels or adds reorders for the pruned model, else None."""
    a, b = nchwc_layout(fp32), nchwc_layout(pruned)
    if b["computed"] == b["declared"] and b["reorders"] <= a["reorders"]:
        return None
    return (f"{name}, onnxruntime's optimized graph: fp32 runs {a['nchwc']} of its {a['convs']} Convs as NCHWc "
            f"convs computing {a['computed']} output channels for {a['declared']} declared, with "
            f"{a['reorders']} ReorderOutput; prune 50% l1: {b['nchwc']} of {b['convs']}, {b['computed']} "
            f"computed for {b['declared']} declared, {b['reorders']} ReorderOutput. Channel counts below its NCHWc "
            "block are computed padded to the block, and a Conv reading fewer channels than the block takes NCHW "
            "input, so the speed-up stays well below what the FLOPs ratio suggests.")


def render(rows: list[dict], command: str, batch: int, threads: int, timing: str, notes: list[str]) -> str:
    lines = [
        f"Machine: {machine()}; "
        f"{datetime.date.today().isoformat()}; `{command}`",
        "",
        "Structured pruning / neuron merging without fine-tuning (\"+ distill repair\": the transfer "
        "package's layer-wise repair from the original on the 256 calibration samples). "
        "Ratios are against the fp32 input in the same run; speed-up = fp32 latency (in brackets) / "
        f"variant latency at batch {batch} ({threads} intra-op thread{'s' if threads > 1 else ''}, "
        f"onnxruntime default optimizations, {timing}).",
        "",
        "| model | variant | accuracy | params | FLOPs | file size | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "n/a (random weights)"
        fp32_ms = f" ({r['ms']:.2f} ms)" if "ms" in r else ""
        lines.append(f"| {r['model']} | {r['variant']} | {acc} | {r['params']:.3f} | {r['flops']:.3f} | "
                     f"{r['size']:.3f} | {r['speedup']:.2f}x{fp32_ms} |")
    same = {}
    for r in rows:
        same.setdefault((r["model"], round(r["params"], 3), round(r["flops"], 3)), []).append(r)
    for (model, _, _), rs in same.items():
        if len(rs) > 1:  # same shapes, so the same work: their spread is timing noise
            lo, hi = min(r["speedup"] for r in rs), max(r["speedup"] for r in rs)
            names = ", ".join(r["variant"] for r in rs)
            notes.append(f"{model}: {names} have the same shapes (the same work); their speed-ups range "
                         f"{lo:.2f}x-{hi:.2f}x, which is this run's timing noise for that model.")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    write_section(SECTION, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=40, help="timing rounds at least (the wide CNN: 10)")
    ap.add_argument("--reps", type=int, default=8, help="timed calls of every model per round (the wide CNN: 1)")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="time every model set for at least this long (not the wide CNN)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--size", type=int, default=32, help="input size of the synthetic CNN")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    from onnxcompress.datasets import bundled_model_path

    timing = {"rounds": args.rounds, "reps": args.reps, "threads": args.threads, "seconds": args.seconds}
    wide = {"rounds": 10, "reps": 1, "threads": args.threads}
    rows, notes = [], []
    for name in ("mlp", "cnn", "transformer"):
        try:
            model = onnx.load(bundled_model_path(name))
            label = f"digits {name}"
        except FileNotFoundError:
            if name != "mlp":
                notes.append(f"models/{name}.onnx was not built when this ran: no digits {name} rows.")
                continue
            model, label = sklearn_mlp(), "digits mlp (scikit-learn)"
            notes.append("models/mlp.onnx was not built when this ran: the MLP is LeNet-300-100 trained "
                         "here with scikit-learn on the digits train split.")
        rows += bench(label, model, name, args.batch, timing, notes)
    digits_arch = synthetic_cnn(size=8, cin=1, widths=(16, 32), blocks=(1, 0))
    rows += bench("digits-CNN architecture, random weights", digits_arch, "synthetic", args.batch, timing, notes)
    rows += bench(f"wide synthetic CNN 3x{args.size}x{args.size}", synthetic_cnn(size=args.size), "synthetic",
                  args.batch, wide, notes)
    notes += [
        "The digits CNN has 16 channels per layer: one-shot removal of whole BatchNorm-shifted channels "
        "collapses its accuracy; bias correction puts back part of it, the distill repair most of it.",
        "`--round-to 8` keeps all 16 channels of a digits-CNN layer at 25% (12 rounds up to 16).",
        "The same 50% channel budget spent on other groups of the digits CNN (`--prune-channels-override`) "
        "runs between 1.25x and 2.5x faster: `python bench/prune_allocation.py` (next table).",
        "File sizes are against the input after a load/save round trip (which drops the exporter's per-node "
        "metadata); merge rows are slightly larger because the embedded plan records the clusters.",
    ]
    command = "python bench/prune_structured.py" + (" " + " ".join(argv) if argv else "")
    method = (f"10th percentile of single calls after 10 warm-up calls; rounds of {args.reps} calls per model "
              f"in an order shuffled per round, at least {args.rounds} rounds and {args.seconds:g} s per model set; "
              f"the wide CNN 10 rounds of 1 call")
    text = render(rows, command, args.batch, args.threads, method, notes)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
