"""Transfer benchmark: the repair step (distill), the transplant round trip, the Deep Compression table.

1. **Repair.** Digits accuracy (fixed 450-sample test split) of the teacher, of the compressed student
   and of the same student repaired by ``distill`` from the teacher on the 256-sample calib split,
   side by side, at several compression levels: the digits MLP with magnitude sparsity (per layer)
   and 4-bit k-means sharing (16 codes, zero pinned), and the digits CNN with structured channel
   pruning (``prune_channels``, l1). ``recovered`` = (repaired − compressed) / (teacher − compressed).
2. **Transplant round trip.** One network written twice with different tensor and node names (the
   second "export" also has different, random weights); ``transplant(first, second)`` must make the
   second compute exactly what the first does: max |Δ| over the test split, matches by name/position.
3. **Deep Compression** (``--deep-compression``) on the LeNet-300-100-shaped digits MLP: each stage's
   ratio on the weights (as the paper's table), the file ratio with and without the embedded plan,
   and the accuracy, with and without calibration data.

The models are ``models/{mlp,cnn}.onnx`` when they exist; otherwise stand-ins of the same shapes made
without PyTorch (the MLP trained by scikit-learn; the CNN with PCANet-style filters — each conv's
filters are the principal components of its 3x3 input patches on the train split —, BatchNorm fitted
to the train split and a logistic-regression head), named as such in the table.

    python bench/transfer.py                 # prints the tables
    python bench/transfer.py --write-docs    # ... and writes them into docs/benchmarks.md (transfer)
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from _docs import machine, write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SECTION = "transfer"


# ---------------------------------------------------------------------------------------------- models


def mlp_model(work: Path) -> tuple[str, str]:
    from onnxcompress.datasets import bundled_model_path

    try:
        return str(bundled_model_path("mlp")), "models/mlp.onnx"
    except FileNotFoundError:
        import transfer_models as tm

        path = work / "mlp.onnx"
        onnx.save(tm.digits_mlp((300, 100)), path)
        return str(path), "MLP 64-300-100-10 (scikit-learn stand-in)"


def _conv(x, w, stride=1):
    """numpy Conv 3x3, pad 1 (for fitting the stand-in's BatchNorm)."""
    from onnxcompress.transfer.reconstruct import im2col

    rows = im2col(x, w.shape, {"pads": [1, 1, 1, 1], "strides": [stride, stride]})
    ho = (x.shape[2] + 2 - 3) // stride + 1
    return np.moveaxis((rows @ w.reshape(w.shape[0], -1).T).reshape(x.shape[0], ho, ho, -1), -1, 1)


def cnn_model(work: Path) -> tuple[str, str]:
    from onnxcompress.datasets import bundled_model_path

    try:
        return str(bundled_model_path("cnn")), "models/cnn.onnx"
    except FileNotFoundError:  # PCANet-style filters: no training loop, no PyTorch
        pass
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.linear_model import LogisticRegression

    from onnxcompress.datasets import digits_split

    from onnxcompress.transfer.reconstruct import im2col

    rng = np.random.default_rng(0)
    x, y = digits_split("train")
    x = x.reshape(-1, 1, 8, 8).astype(np.float64)
    ws, bn = {}, {}

    def pca_filters(h, o, stride=1):
        """The top principal components of the layer's 3x3 input patches (PCANet), random beyond them."""
        rows = im2col(h, (o, h.shape[1], 3, 3), {"pads": [1, 1, 1, 1], "strides": [stride, stride]})
        vt = np.linalg.svd(rows[::3] - rows.mean(0), full_matrices=False)[2][:o]
        extra = rng.standard_normal((o - len(vt), vt.shape[1])) / np.sqrt(vt.shape[1])
        return np.concatenate([vt, extra]).reshape(o, h.shape[1], 3, 3)

    def conv_bn(name, h, stride=1):
        ws[name] = pca_filters(h, {"down": 32}.get(name, 16), stride)
        z = _conv(h, ws[name], stride)
        mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3))
        bn[name] = (mean, var)
        return (z - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)

    h = np.maximum(conv_bn("stem", x), 0)
    h = np.maximum(h + conv_bn("b", np.maximum(conv_bn("a", h), 0)), 0)
    h = np.maximum(conv_bn("down", h, 2), 0)
    feats = h.mean((2, 3))
    clf = LogisticRegression(max_iter=3000, C=100.0).fit(feats, y)
    inits, nodes = [], []
    for name, w in ws.items():
        mean, var = bn[name]
        inits += [numpy_helper.from_array(w.astype(np.float32), f"{name}.conv.weight"),
                  numpy_helper.from_array(np.ones(len(mean), np.float32), f"{name}.bn.weight"),
                  numpy_helper.from_array(np.zeros(len(mean), np.float32), f"{name}.bn.bias"),
                  numpy_helper.from_array(mean.astype(np.float32), f"{name}.bn.running_mean"),
                  numpy_helper.from_array(var.astype(np.float32), f"{name}.bn.running_var")]

    def block(name, src, out, stride=1):
        nodes.append(helper.make_node("Conv", [src, f"{name}.conv.weight"], [f"{name}_conv"], name=f"{name}.conv",
                                      pads=[1, 1, 1, 1], strides=[stride, stride], kernel_shape=[3, 3]))
        nodes.append(helper.make_node("BatchNormalization", [f"{name}_conv", f"{name}.bn.weight", f"{name}.bn.bias",
                                                             f"{name}.bn.running_mean", f"{name}.bn.running_var"],
                                      [out], name=f"{name}.bn", epsilon=1e-5))

    block("stem", "x", "stem_bn")
    nodes.append(helper.make_node("Relu", ["stem_bn"], ["h0"], name="relu0"))
    block("a", "h0", "a_bn")
    nodes.append(helper.make_node("Relu", ["a_bn"], ["a_relu"], name="relu_a"))
    block("b", "a_relu", "b_bn")
    nodes.append(helper.make_node("Add", ["h0", "b_bn"], ["res"], name="residual"))
    nodes.append(helper.make_node("Relu", ["res"], ["h1"], name="relu1"))
    block("down", "h1", "down_bn", 2)
    nodes.append(helper.make_node("Relu", ["down_bn"], ["h2"], name="relu2"))
    nodes.append(helper.make_node("GlobalAveragePool", ["h2"], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    inits += [numpy_helper.from_array(clf.coef_.astype(np.float32), "fc.weight"),
              numpy_helper.from_array(clf.intercept_.astype(np.float32), "fc.bias")]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    path = work / "cnn.onnx"
    onnx.save(m, path)
    return str(path), "CNN (stand-in: PCA filters, fitted BN, trained linear head)"


# ---------------------------------------------------------------------------------------------- 1. repair


def repair_rows(model: str, label: str, calib: str, levels: list[tuple[str, list]]) -> list[dict]:
    from onnxcompress.api import compress
    from onnxcompress.datasets import digits_accuracy
    from onnxcompress.recipe import Recipe, VerifyConfig
    from onnxcompress.recipes import lossless_steps
    from onnxcompress.transfer.reconstruct import DistillConfig

    off = VerifyConfig(enabled=False)
    teacher = digits_accuracy(model)
    rows = []
    for name, steps in levels:
        base = Recipe(steps=tuple(lossless_steps()), verify=off)
        for s in steps:
            base = base.with_step(s)
        plain = compress(model, base)
        t0 = time.perf_counter()
        fixed = compress(model, base.with_step(DistillConfig()), data=calib)
        seconds = time.perf_counter() - t0
        a_c, a_r = digits_accuracy(plain.model), digits_accuracy(fixed.model)
        gap = teacher - a_c
        rows.append({"model": label, "level": name, "teacher": teacher, "compressed": a_c, "repaired": a_r,
                     "recovered": (a_r - a_c) / gap if gap > 1e-9 else float("nan"), "seconds": seconds,
                     "layers": sum(1 for r in fixed.report.step("distill").details.get("layers", []) if r["refit"])})
        print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- 2. transplant


def second_export(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """The same network with every tensor and node renamed and the weights replaced by random values."""
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    io = {i.name for i in m.graph.input} | {o.name for o in m.graph.output}
    names = {t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output}
    new = {n: (n if n in io else f"export2::{i}") for i, n in enumerate(sorted(names))}
    rng = np.random.default_rng(seed)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f":
            a = (rng.standard_normal(a.shape) * (a.std() + 1e-3)).astype(a.dtype)
            if "var" in t.name:
                a = np.abs(a) + 0.1
        t.CopyFrom(numpy_helper.from_array(a, new[t.name]))
    for i, n in enumerate(m.graph.node):
        n.input[:] = [new.get(x, x) for x in n.input]
        n.output[:] = [new.get(o, o) for o in n.output]
        n.name = f"export2/{n.op_type}_{i}"
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    return m


def transplant_row(model: str, label: str) -> dict:
    import onnxruntime as ort

    from onnxcompress.datasets import digits_accuracy, digits_feeds
    from onnxcompress.transfer.transplant import transplant

    src = onnx.load(model)
    dst = second_export(src, seed=1)
    out, rep = transplant(src, dst)
    feeds = digits_feeds(src, "test")

    def run(m):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    a, b, c = run(src), run(dst), run(out)
    return {"model": label, "weights": len(src.graph.initializer), "by_name": len(rep.by_name),
            "by_position": len(rep.by_position), "unmatched": len(rep.unmatched_dst) + len(rep.ambiguous)
            + len(rep.mismatched), "before": float(np.abs(a - b).max()), "after": float(np.abs(a - c).max()),
            "acc_src": digits_accuracy(src), "acc_dst": digits_accuracy(dst), "acc_out": digits_accuracy(out)}


# ---------------------------------------------------------------------------------------------- 3. deep compression


def deep_compression_rows(model: str, label: str, calib: str, work: Path) -> list[dict]:
    from onnxcompress.api import compress
    from onnxcompress.datasets import digits_accuracy
    from onnxcompress.recipe import OutputConfig, VerifyConfig
    from onnxcompress.recipes import preset_recipe

    recipe = preset_recipe(["deep_compression"]).replace(verify=VerifyConfig(enabled=False))
    size0 = os.path.getsize(model)
    acc0 = digits_accuracy(model)
    rows = []
    for data in (calib, None):
        t0 = time.perf_counter()
        r = compress(model, recipe, data=data)  # the preset: no embedded plan
        seconds = time.perf_counter() - t0
        out = work / f"dc_{'data' if data else 'nodata'}.onnx"
        r.save(out)
        planned = compress(model, recipe.replace(output=OutputConfig(embed_plan=True)), data=data)
        out_plan = work / f"dc_plan_{'data' if data else 'nodata'}.onnx"
        planned.save(out_plan)
        stages = r.report.step("compression_stages").details["stages"]
        m = onnx.load(str(out))
        nodes = sum(n.ByteSize() for n in m.graph.node)
        big = sum(t.ByteSize() for t in m.graph.initializer if t.ByteSize() > 100)
        rows.append({"model": label, "data": bool(data), "acc0": acc0, "acc": digits_accuracy(str(out)),
                     "size0": size0, "size": os.path.getsize(out), "size_plan": os.path.getsize(out_plan),
                     "stages": stages, "seconds": seconds, "nodes_bytes": nodes, "payload_bytes": big,
                     "small_bytes": sum(t.ByteSize() for t in m.graph.initializer) - big,
                     "n_nodes": len(m.graph.node)})
        print({k: v for k, v in rows[-1].items() if k != "stages"}, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- output




def render(repair: list[dict], transplants: list[dict], dc: list[dict], command: str) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    out = [
        "### Transfer: repair from the teacher, transplant, Deep Compression",
        "",
        f"Machine: {machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Command: `{command}`. Accuracy: the fixed 450-sample digits test split; repair data: the "
        "256-sample calib split (never the test split). No training loop anywhere.",
        "",
        "**Repair (`--distill`)**: the same compressed student without and with the layer-wise repair.",
        "",
        "| model | compression | teacher | compressed | repaired | recovered | layers refitted | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in repair:
        out.append(f"| {r['model']} | {r['level']} | {pct(r['teacher'])} | {pct(r['compressed'])} | "
                   f"{pct(r['repaired'])} | {100 * r['recovered']:.0f}% | {r['layers']} | {r['seconds']:.1f} |")
    out += ["", "**Transplant round trip**: the network written a second time with every tensor and node "
            "renamed and random weights; `transplant(first, second)`.", "",
            "| model | weights | matched by name | by position | unmatched | max abs diff before | after | "
            "accuracy first / second / transplanted |", "|---|---|---|---|---|---|---|---|"]
    for t in transplants:
        out.append(f"| {t['model']} | {t['weights']} | {t['by_name']} | {t['by_position']} | {t['unmatched']} | "
                   f"{t['before']:.3g} | {t['after']:.3g} | {pct(t['acc_src'])} / {pct(t['acc_dst'])} / "
                   f"{pct(t['acc_out'])} |")
    out += ["", "**Deep Compression (`--deep-compression`)**: 90% magnitude sparsity ranked globally, channels "
            "no layer reads dropped, refit of the pruned layers from the teacher (`refit_pruned`, with data), "
            "8-value k-means sharing (zero pinned; weights and biases from 64 elements), repair again (`distill`, "
            "with data), compact storage. Stage ratios are on the MatMul/Gemm weights against the original "
            "layers (bytes as defined in `onnxcompress/transfer/stages.py`), the file ratios on the whole "
            "`.onnx` (graph, biases, decode nodes) as the preset writes it (no embedded plan) and with "
            "`--embed-plan`.", "",
            "| model | data | accuracy | pruning | + quantization | + encoding | file | "
            "file with the plan | s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in dc:
        st = {s["stage"]: s["ratio"] for s in r["stages"]}
        out.append(f"| {r['model']} | {'calib split' if r['data'] else 'none (repairs skipped)'} | "
                   f"{pct(r['acc0'])} → {pct(r['acc'])} | {st['pruning']:.1f}× | {st['+ quantization']:.1f}× | "
                   f"{st['+ encoding']:.1f}× | {r['size0']:,} B → {r['size']:,} B "
                   f"(**{r['size0'] / r['size']:.1f}×**) | {r['size_plan']:,} B "
                   f"({r['size0'] / r['size_plan']:.1f}×) | {r['seconds']:.1f} |")
    if dc:
        r = dc[0]
        drop = 100 * (r["acc0"] - r["acc"])
        ratio = r["size0"] / r["size"]
        verdict = "met" if ratio >= 30 and drop <= 1.0 else "**NOT met**"
        out += ["", f"Where the {r['size']:,} bytes go (with data): packed weight streams and codebooks "
                f"{r['payload_bytes']:,} B, {r['n_nodes']} nodes {r['nodes_bytes']:,} B (the model's own and the "
                f"decode graph, whose streams of one bit width share one unpacking chain), small constants "
                f"{r['small_bytes']:,} B, the rest the graph's inputs, outputs and metadata.", "",
                f"Target (file ≥ 30× smaller than fp32, ≤ 1 point lost): {ratio:.1f}×, {drop:.2f} points: {verdict}."]
    return "\n".join(out) + "\n"


def write_docs(text: str) -> None:
    write_section(SECTION, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one compression level per model")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    from onnxcompress.datasets import calibration_npz
    from onnxcompress.passes.registry import step_config_class
    from onnxcompress.prune.channels import PruneChannelsConfig
    from onnxcompress.prune.sparsity import SparsifyConfig

    share = step_config_class("share_weights")
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        work = Path(tmp)
        mlp, mlp_label = mlp_model(work)
        cnn, cnn_label = cnn_model(work)
        calib_mlp = str(calibration_npz(work / "calib_mlp.npz", mlp))
        calib_cnn = str(calibration_npz(work / "calib_cnn.npz", cnn))
        sparsities = [0.9] if args.quick else [0.8, 0.9, 0.95]
        widths = [0.5] if args.quick else [0.25, 0.5, 0.75]
        repair = repair_rows(mlp, mlp_label, calib_mlp, [
            (f"{int(100 * s)}% sparse (each layer) + 4-bit sharing", [SparsifyConfig(ratio=s), share(clusters=16, min_size=256)])
            for s in sparsities])
        repair += repair_rows(cnn, cnn_label, calib_cnn, [
            (f"{int(100 * w)}% of channels pruned", [PruneChannelsConfig(ratio=w)]) for w in widths])
        transplants = [transplant_row(mlp, mlp_label), transplant_row(cnn, cnn_label)]
        for t in transplants:
            print(t, flush=True)
        dc = deep_compression_rows(mlp, mlp_label, calib_mlp, work)
    command = "python bench/transfer.py" + (" --quick" if args.quick else "")
    text = render(repair, transplants, dc, command)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
