"""Fusion benchmark: weight sharing, low-rank and the lossless merges, side by side in one run.

Part 1 — **techniques** on the bundled digits models (``models/{mlp,cnn,transformer}.onnx``; when
they are absent, a digits MLP 64-300-100-10 trained here with numpy): for each recipe, built with
``onnxcompress.compress`` (the default lossless prefix — cleanup, folding, ``fuse``,
``compact_storage`` — then the technique), the file size relative to the fp32 input, digits test
accuracy (450 samples), and CPU latency relative to the fp32 input (onnxruntime default
optimizations, one thread, batch 1 and batch 64, best of interleaved rounds).

Part 2 — **lossless merges** (``fuse``) against onnxslim and onnxruntime's own session-level
fusions: node counts of the original, after ``onnxcompress`` (lossless prefix without compact
storage), after ``onnxslim.slim``, and of onnxruntime's optimized graph (ORT_ENABLE_ALL written
with ``optimized_model_filepath``); latency of each graph in a default session relative to the
original; the largest output difference of ours relative to the output's largest magnitude. Rows:
the bundled models, the ``light`` corpus models, and one summary row per corpus suite
(``pytorch-converted``, ``pytorch-operator``).

Part 3 — **speed of k-means sharing**: a synthetic model of 22 M float parameters (four
[2048, 2688] MatMul weights) shared at K=16; seconds for the pass alone and the whole compress().

    python bench/fuse.py                  # prints the tables
    python bench/fuse.py --write-docs     # ... and writes them into docs/benchmarks.md (section fuse)
    python bench/fuse.py --quick          # fewer latency rounds, no light corpus models
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from _docs import write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SECTION = "fuse"
LIGHT = ("light_bvlc_alexnet", "light_densenet121", "light_inception_v1", "light_inception_v2", "light_resnet50",
         "light_shufflenet", "light_squeezenet", "light_vgg19", "light_zfnet512")


def techniques() -> dict[str, list]:
    from onnxcompress.fuse.low_rank import LowRankConfig
    from onnxcompress.fuse.weight_sharing import ShareWeightsConfig

    return {
        "fp32 + lossless prefix": [],
        "share K=16 (4 bit)": [ShareWeightsConfig(clusters=16)],
        "share K=16, 8 channel groups": [ShareWeightsConfig(clusters=16, channel_groups=8)],
        "share K=4 (2 bit)": [ShareWeightsConfig(clusters=4)],
        "low-rank E=0.9": [LowRankConfig(energy=0.9, min_size=1024)],
        "low-rank E=0.9 data-aware": [LowRankConfig(energy=0.9, min_size=1024, data_aware=True)],
    }


# ---------------------------------------------------------------------------------------------- helpers


def session(model: str | bytes, *, threads: int = 1, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            save_to: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.graph_optimization_level = level
    if save_to:
        so.optimized_model_filepath = save_to
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def latencies(models: dict[str, str | bytes], feed: dict, rounds: int) -> dict[str, float]:
    """Seconds per run of each model: the best of ``rounds`` interleaved rounds of about 20 ms each
    (the machine is shared; the minimum is the least disturbed measurement, and interleaving exposes
    every model to the same background)."""
    sessions = {k: session(v) for k, v in models.items()}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feed)
    first = next(iter(sessions.values()))
    t0 = time.perf_counter()
    for _ in range(5):
        first.run(None, feed)
    reps = max(1, min(500, int(0.02 / max((time.perf_counter() - t0) / 5, 1e-7))))
    best = {k: float("inf") for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            for _ in range(reps):
                s.run(None, feed)
            best[k] = min(best[k], (time.perf_counter() - t) / reps)
    return best


def max_rel(ref: list, out: list) -> float:
    worst = 0.0
    for r, o in zip(ref, out):
        r, o = np.asarray(r, np.float64), np.asarray(o, np.float64)
        if r.shape != o.shape:
            return float("inf")
        diff = np.where(r == o, 0.0, np.abs(r - o))
        worst = max(worst, float(diff.max(initial=0)) / max(float(np.abs(r[np.isfinite(r)]).max(initial=0)), 1e-12))
    return worst


def digits(split: str):
    from onnxcompress.datasets import digits_split

    return digits_split(split)


def fallback_mlp(path: Path) -> Path:
    """A digits MLP 64-300-100-10 trained with numpy (full-batch Adam), when models/mlp.onnx is absent."""
    from threadpoolctl import threadpool_limits

    x, y = digits("train")
    rng = np.random.default_rng(0)
    sizes = (64, 300, 100, 10)
    params = []
    for a, c in zip(sizes[:-1], sizes[1:]):
        params += [rng.standard_normal((a, c)) * np.sqrt(2 / a), np.zeros(c)]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    onehot = np.eye(10)[y]
    with threadpool_limits(1):
        for t in range(1, 301):
            acts = [x.astype(np.float64)]
            for i in range(0, len(params), 2):
                z = acts[-1] @ params[i] + params[i + 1]
                acts.append(np.maximum(z, 0) if i < len(params) - 2 else z)
            p = np.exp(acts[-1] - acts[-1].max(1, keepdims=True))
            g = (p / p.sum(1, keepdims=True) - onehot) / len(y)
            grads = [None] * len(params)
            for i in range(len(params) - 2, -1, -2):
                grads[i], grads[i + 1] = acts[i // 2].T @ g, g.sum(0)
                g = (g @ params[i].T) * (acts[i // 2] > 0)
            for i, gr in enumerate(grads):
                m1[i] = 0.9 * m1[i] + 0.1 * gr
                m2[i] = 0.999 * m2[i] + 0.001 * gr * gr
                params[i] -= 0.005 * (m1[i] / (1 - 0.9 ** t)) / (np.sqrt(m2[i] / (1 - 0.999 ** t)) + 1e-8)
    h = onnx.helper
    nodes, inits, prev = [], [], "x"
    for j in range(3):
        inits += [onnx.numpy_helper.from_array(params[2 * j].astype(np.float32), f"fc{j}.weight"),
                  onnx.numpy_helper.from_array(params[2 * j + 1].astype(np.float32), f"fc{j}.bias")]
        out = "logits" if j == 2 else f"a{j}"
        nodes += [h.make_node("MatMul", [prev, f"fc{j}.weight"], [f"m{j}"]), h.make_node("Add", [f"m{j}", f"fc{j}.bias"], [out])]
        if j < 2:
            nodes.append(h.make_node("Relu", [out], [f"r{j}"]))
            prev = f"r{j}"
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 64])],
                     [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 10])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def bundled_models(tmp: Path) -> tuple[dict[str, Path], list[str]]:
    models, notes = {}, []
    for name in ("mlp", "cnn", "transformer"):
        p = ROOT / "models" / f"{name}.onnx"
        if p.is_file():
            models[name] = p
    if "mlp" not in models:
        models["mlp (numpy-trained)"] = fallback_mlp(tmp / "mlp.onnx")
        notes.append("models/mlp.onnx was absent: the MLP row is a 64-300-100-10 MLP trained by this script.")
    for name in ("cnn", "transformer"):
        if name not in models:
            notes.append(f"models/{name}.onnx was absent: no {name} rows.")
    return models, notes


def accuracy(model: str | bytes, x_name: str, x: np.ndarray, y: np.ndarray) -> float:
    out = session(model, threads=1).run(None, {x_name: x})[0]
    return float(np.mean(np.argmax(out, axis=1) == y))


def digits_input(path: Path, split: str) -> tuple[str, np.ndarray, np.ndarray]:
    from onnxcompress.datasets import digits_feeds

    feeds = digits_feeds(str(path), split)
    name = next(iter(feeds))
    _, y = digits(split)
    return name, feeds[name], y


# ---------------------------------------------------------------------------------------------- part 1


def part_techniques(models: dict[str, Path], tmp: Path, rounds: int) -> list[str]:
    from onnxcompress.api import compress
    from onnxcompress.recipe import Recipe, VerifyConfig
    from onnxcompress.recipes import lossless_steps

    rows = ["| model | technique | file / fp32 | accuracy (fp32) | latency b1 / fp32 | latency b64 / fp32 | seconds |",
            "|---|---|---|---|---|---|---|"]
    for mname, path in models.items():
        xname, xt, yt = digits_input(path, "test")
        _, xc, _ = digits_input(path, "calib")
        base_acc = accuracy(str(path), xname, xt, yt)
        size0 = path.stat().st_size
        outs: dict[str, Path] = {}
        info: dict[str, tuple] = {}
        for tname, steps in techniques().items():
            recipe = Recipe(tuple(lossless_steps()), verify=VerifyConfig(enabled=False))
            for s in steps:
                recipe = recipe.with_step(s)
            t0 = time.perf_counter()
            res = compress(str(path), recipe, data=[{xname: xc}])
            secs = time.perf_counter() - t0
            out = res.save(tmp / f"{mname.split()[0]}_{len(outs)}.onnx")
            outs[tname] = out
            info[tname] = (out.stat().st_size / size0, accuracy(str(out), xname, xt, yt), secs)
        lat = {b: latencies({"fp32": str(path), **{k: str(v) for k, v in outs.items()}},
                            {xname: xt[:b]}, rounds) for b in (1, 64)}
        for tname in outs:
            ratio, acc, secs = info[tname]
            rows.append(f"| {mname} | {tname} | {ratio:.3f} | {acc:.4f} ({base_acc:.4f}) | "
                        f"{lat[1][tname] / lat[1]['fp32']:.2f} | {lat[64][tname] / lat[64]['fp32']:.2f} | {secs:.1f} |")
    return rows


# ---------------------------------------------------------------------------------------------- part 2


def _ours(src: str | bytes) -> onnx.ModelProto:
    from onnxcompress.api import compress
    from onnxcompress.recipe import Recipe, VerifyConfig
    from onnxcompress.recipes import lossless_steps

    steps = tuple(s for s in lossless_steps() if s.name != "compact_storage")
    return compress(src, Recipe(steps, verify=VerifyConfig(enabled=False))).model


def _slim(src: str | bytes) -> onnx.ModelProto | None:
    import onnxslim

    model = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(src)
    try:
        return onnxslim.slim(model)
    except Exception:
        return None


def _ort_nodes(src: str | bytes, tmp: Path) -> int:
    out = tmp / "ort_optimized.onnx"
    session(src, save_to=str(out))
    return len(onnx.load(str(out)).graph.node)


def merge_row(name: str, src: str | bytes, feeds: list[dict], tmp: Path, rounds: int, timing: bool) -> dict:
    orig = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(src)
    ours = _ours(src)
    slim = _slim(src)
    row = {"name": name, "nodes": len(orig.graph.node), "ours": len(ours.graph.node),
           "slim": len(slim.graph.node) if slim is not None else None, "ort": _ort_nodes(src, tmp),
           "size_ours": ours.ByteSize() / orig.ByteSize(),
           "size_slim": slim.ByteSize() / orig.ByteSize() if slim is not None else None}
    ref_s = session(src, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    our_s = session(ours.SerializeToString(), level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    row["err"] = max(max_rel(ref_s.run(None, f), our_s.run(None, f)) for f in feeds)
    if timing:
        models = {"orig": src, "ours": ours.SerializeToString()}
        if slim is not None:
            models["slim"] = slim.SerializeToString()
        lat = latencies(models, feeds[0], rounds)
        row.update({f"lat_{k}": lat[k] / lat["orig"] for k in lat if k != "orig"})
    return row


def part_merges(models: dict[str, Path], tmp: Path, rounds: int, light: bool) -> list[str]:
    from corpus import discover, feeds_for

    rows = ["| model | nodes | onnxcompress | onnxslim | ORT_ENABLE_ALL graph | file ours / orig | "
            "file onnxslim / orig | latency ours / orig | latency onnxslim / orig | max rel. error (ours) |",
            "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(r):
        num = lambda k: f"{r[k]:.2f}" if r.get(k) is not None else "–"  # noqa: E731
        slim = r["slim"] if r["slim"] is not None else "failed"
        return (f"| {r['name']} | {r['nodes']} | {r['ours']} | {slim} | {r['ort']} | {num('size_ours')} | "
                f"{num('size_slim')} | {num('lat_ours')} | {num('lat_slim')} | {r['err']:.1e} |")

    for name, path in models.items():
        xname, xt, _ = digits_input(path, "test")
        rows.append(fmt(merge_row(name, str(path), [{xname: xt[:1]}, {xname: xt[:64]}], tmp, rounds, True)))
    cases, _ = discover(("light", "pytorch-converted", "pytorch-operator"), bundled=False)
    per_suite: dict[str, list[dict]] = {}
    for case in cases:
        if case.suite == "light" and (not light or case.name not in LIGHT):
            continue
        try:
            feeds = feeds_for(case)
            session(case.source, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feeds[0])
            r = merge_row(case.name, case.source, feeds[:1], tmp, rounds, case.suite == "light")
        except Exception:  # the original does not run or load here: not a fuse question
            continue
        if case.suite == "light":
            rows.append(fmt(r))
        else:
            per_suite.setdefault(case.suite, []).append(r)
    for suite, rs in per_suite.items():
        changed = sum(r["ours"] != r["nodes"] for r in rs)
        rows.append(f"| {suite} ({len(rs)} models, {changed} changed by us; node totals) | "
                    f"{sum(r['nodes'] for r in rs)} | {sum(r['ours'] for r in rs)} | "
                    f"{sum(r['slim'] or r['nodes'] for r in rs)} | {sum(r['ort'] for r in rs)} | – | – | – | – | "
                    f"{max(r['err'] for r in rs):.1e} |")
    return rows


# ---------------------------------------------------------------------------------------------- part 3


def part_speed(tmp: Path) -> list[str]:
    from onnxcompress.api import compress
    from onnxcompress.context import Context
    from onnxcompress.fuse.weight_sharing import ShareWeightsConfig, ShareWeightsPass
    from onnxcompress.graph.io import model_to_graph, open_model
    from onnxcompress.recipe import Recipe, VerifyConfig

    rng = np.random.default_rng(0)
    h = onnx.helper
    d_in, d_hidden = 2048, 2688
    nodes, inits, prev = [], [], "x"
    for i in range(4):
        shape = (d_in, d_hidden) if i % 2 == 0 else (d_hidden, d_in)
        inits.append(onnx.numpy_helper.from_array((rng.standard_normal(shape) / 50).astype(np.float32), f"w{i}"))
        nodes.append(h.make_node("MatMul", [prev, f"w{i}"], [f"y{i}" if i < 3 else "y"]))
        prev = f"y{i}"
    g = h.make_graph(nodes, "big", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", d_in])],
                     [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", d_in])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    graph = model_to_graph(open_model(model))
    t0 = time.perf_counter()
    with Context() as ctx:
        ShareWeightsPass(ShareWeightsConfig(clusters=16)).run(graph, ctx)
    t_pass = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = compress(model, Recipe((ShareWeightsConfig(clusters=16),), verify=VerifyConfig(enabled=False)))
    t_all = time.perf_counter() - t0
    del res
    return ["| parameters | K | share_weights pass | compress() (load + pass + export) |", "|---|---|---|---|",
            f"| {params / 1e6:.1f} M | 16 | {t_pass:.1f} s | {t_all:.1f} s |"]


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-docs", action="store_true", help="write the tables into docs/benchmarks.md")
    ap.add_argument("--quick", action="store_true", help="fewer latency rounds, no light corpus models")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (default 1,2,3)")
    args = ap.parse_args(argv)
    rounds = 5 if args.quick else 15
    parts = {p.strip() for p in args.parts.split(",")}
    import onnxslim

    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
             f"onnxruntime {ort.__version__} CPU, onnxslim {onnxslim.__version__}; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
             f"Command: `python bench/fuse.py {' '.join(argv if argv is not None else sys.argv[1:])}`.", ""]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        models, notes = bundled_models(tmp)
        if "1" in parts:
            lines += ["### Techniques on the digits models", "",
                      "File size after the whole recipe (lossless prefix with compact_storage, then the technique), "
                      "digits test accuracy, latency relative to the fp32 input (1 thread, best of interleaved "
                      "rounds, best round). Low-rank data-aware uses the calib split (256 samples).", ""]
            lines += part_techniques(models, tmp, rounds) + [""]
        if "2" in parts:
            lines += ["### Lossless merges against onnxslim and onnxruntime's session fusions", "",
                      "Node counts of the graph as written; the ORT column is onnxruntime's own optimized graph "
                      "(ORT_ENABLE_ALL, saved with optimized_model_filepath, contrib ops included). Latencies: "
                      "default session (ORT_ENABLE_ALL), 1 thread, batch 1 for corpus models, relative to the "
                      "original; so ORT's fusions are in every latency column. Error: ours vs the original, both "
                      "unoptimized, relative to the largest output magnitude.", ""]
            lines += part_merges(models, tmp, rounds, light=not args.quick) + [""]
            lines += ["The `light_*` corpus models hold every weight as a `ConstantOfShape` output, not a constant: "
                      "`fuse` declines them (folding a BatchNormalization there would first have to materialize the "
                      "weight), while onnxslim materializes every weight (see its file column) and then folds. "
                      "Where both graphs are identical, the latency column shows the measurement noise of this "
                      "shared machine. Our file column is after the whole lossless prefix (cleanup, dedupe, "
                      "fold_constants, fuse) including the replayable plan onnxcompress embeds in the metadata.", ""]
        if "3" in parts:
            lines += ["### Speed of k-means sharing (synthetic 22 M parameters)", ""]
            lines += part_speed(tmp) + [""]
        lines += [f"Note: {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


def write_docs(text: str) -> None:
    write_section(SECTION, text, heading='Fusion: weight sharing, low rank, lossless merges')


if __name__ == "__main__":
    sys.exit(main())
