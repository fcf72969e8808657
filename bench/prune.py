"""Unstructured sparsity benchmark: accuracy, file size and latency against sparsity, side by side.

Structured pruning (channels 25 / 50 %, the CPU speed-up at batch 64) has its own scripts, which write
the next sections of docs/benchmarks.md: ``bench/prune_structured.py`` (every importance and repair on
the digits models and two synthetic CNNs) and ``bench/prune_allocation.py`` (one 50 % budget spent on
different layers of the digits CNN).

For each digits model (``models/mlp.onnx``, ``models/cnn.onnx``) and each sparsity (50/75/90 % per
layer, ``--prune R``; no fine-tuning) the same pruned weights are stored five ways, all produced with
``onnxcompress.compress`` (the CLI's default lossless prefix, then the steps named):

* ``pruned dense``     ``--prune R --no-compact-storage``: zeros stored as dense fp32;
* ``compact float``    ``--prune R`` (compact_storage at the end of every recipe): bitmask or
  gap-encoded positions + fp32 values;
* ``global scope``     ``--prune R --prune-scope global``, stored as ``compact float``;
* ``+ int8 storage``   ``--prune R --storage int8``: the int8 codes behind ``Cast -> Mul`` re-encoded
  sparsely;
* ``+ int4 storage``   ``--prune R --storage int4``;
* ``+ k-means 16``     ``--prune R --cluster 16`` (weight sharing, zero pinned): positions + 4-bit
  codebook indices (Deep Compression).

Columns: digits test accuracy (450 samples); file size relative to the fp32 input file; the stored
bytes of the weights with >= 1024 elements (compact_storage's per-tensor table) relative to their
fp32 bytes in the input;
whether the compact model's outputs are bit-identical to the pruned dense model (test split,
onnxruntime default optimizations) and whether its optimized graph has exactly the pruned dense
model's ops (the decode folded away); CPU latency of the compact model relative to fp32 (one thread,
batch 1 and batch 64, 10th percentile of single calls over interleaved rounds) and its session
creation time relative to fp32;
the pruned dense model is timed too, as a control for machine noise.

    python bench/prune.py                  # prints the table
    python bench/prune.py --write-docs     # ... and writes it into docs/benchmarks.md (section prune)
    python bench/prune.py --model mlp=path/to/model.onnx --sparsities 0.9
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from _docs import machine, write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "prune"
VARIANTS = ("pruned dense", "compact float", "global scope", "+ int8 storage", "+ int4 storage", "+ k-means 16")


def _steps(variant: str, ratio: float) -> list:
    """The recipe steps of one variant (after the lossless prefix)."""
    from onnxcompress.encode.compact import CompactStorageConfig
    from onnxcompress.prune.sparsity import SparsifyConfig

    if variant == "lossless only":
        return []
    steps = [SparsifyConfig(ratio=ratio, scope="global" if variant == "global scope" else "layer")]
    if variant == "pruned dense":
        steps.append(CompactStorageConfig(enabled=False))
    elif variant == "+ int8 storage":
        from onnxcompress.quantize.config import StorageConfig

        steps.append(StorageConfig(bits="int8"))
    elif variant == "+ int4 storage":
        from onnxcompress.quantize.config import StorageConfig

        steps.append(StorageConfig(bits="int4"))
    elif variant == "+ k-means 16":
        from onnxcompress.fuse.weight_sharing import ShareWeightsConfig

        steps.append(ShareWeightsConfig(clusters=16))
    return steps


def compress_variant(model_path: Path, variant: str, ratio: float):
    from onnxcompress.api import compress
    from onnxcompress.recipe import VerifyConfig
    from onnxcompress.recipes import default_recipe

    recipe = default_recipe()
    for step in _steps(variant, ratio):
        recipe = recipe.with_step(step)
    recipe = recipe.replace(verify=VerifyConfig(enabled=False))
    result = compress(model_path, recipe)
    step = result.report.step("compact_storage")
    totals = step.details.get("totals", {}) if step is not None else {}
    return result.model, totals


def _session(model, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    t0 = time.perf_counter()
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return sess, time.perf_counter() - t0


def optimized_ops(model) -> list[str]:
    """The op types onnxruntime keeps after its load-time optimizations (ORT_ENABLE_EXTENDED)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def latency(models: dict, feed_one: dict, feed_batch: dict, rounds: int, reps: int) -> dict[str, tuple]:
    """Per model: batch 1 s, batch 64 s, session creation s — low percentiles of single-call times.

    Every call is timed on its own and the models are interleaved round by round; the 10th percentile
    of the calls (the minimum for the 5 session creations) is reported: on a shared machine other
    processes only ever add time, and a low percentile of many short calls drops those that were
    preempted while keeping the typical fast path."""
    sessions, create = {}, {k: [] for k in models}
    for _ in range(5):
        for k, m in models.items():
            sessions[k], t = _session(m)
            create[k].append(t)
    times = {k: ([], []) for k in models}
    for s in sessions.values():
        s.run(None, feed_one)
        s.run(None, feed_batch)
    for _ in range(rounds):
        for k, s in sessions.items():
            for j, (feed, n) in enumerate(((feed_one, reps), (feed_batch, max(1, reps // 8)))):
                for _ in range(n):
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times[k][j].append(time.perf_counter() - t0)
    return {k: (float(np.percentile(v[0], 10)), float(np.percentile(v[1], 10)), float(np.min(create[k])))
            for k, v in times.items()}


def bench_model(name: str, path: Path, sparsities: list[float], rounds: int, reps: int) -> list[dict]:
    import onnx
    from onnx import numpy_helper

    from onnxcompress.datasets import digits_accuracy, digits_feeds

    fp32 = onnx.load(str(path))
    fp32_bytes = len(fp32.SerializeToString())
    big = sum(numpy_helper.to_array(t).nbytes for t in fp32.graph.initializer if np.prod(t.dims) >= 1024)
    feeds = digits_feeds(fp32, "test")
    (inp, x), = feeds.items()
    lossless = compress_variant(path, "lossless only", 0.0)[0]
    rows = [{"model": name, "sparsity": 0.0, "variant": "fp32", "accuracy": digits_accuracy(fp32),
             "file": 1.0, "weights": 1.0, "identical": "", "lat": None},
            {"model": name, "sparsity": 0.0, "variant": "lossless only", "accuracy": digits_accuracy(lossless),
             "file": len(lossless.SerializeToString()) / fp32_bytes, "weights": 1.0, "identical": "", "lat": None}]
    for ratio in sparsities:
        built = {v: compress_variant(path, v, ratio) for v in VARIANTS}
        dense_out = _session(built["pruned dense"][0])[0].run(None, feeds)[0]
        lat = latency({"fp32": fp32, "pruned dense": built["pruned dense"][0], "compact float": built["compact float"][0]},
                      {inp: x[:1]}, {inp: x[:64]}, rounds, reps)
        for v, (model, totals) in built.items():
            onnx.checker.check_model(model)
            out = _session(model)[0].run(None, feeds)[0]
            row = {"model": name, "sparsity": ratio, "variant": v, "accuracy": digits_accuracy(model),
                   "file": len(model.SerializeToString()) / fp32_bytes,
                   "weights": totals.get("encoded_bytes", big) / big if big else 1.0,
                   "encoded": f"{totals.get('encoded', 0)}/{totals.get('tensors', 0)}" if totals else "",
                   "identical": "", "folded": "",
                   "lat": None}
            if v == "compact float":
                row["identical"] = "yes" if np.array_equal(out, dense_out) else "no"
                row["folded"] = "yes" if optimized_ops(model) == optimized_ops(built["pruned dense"][0]) else "no"
            if v in lat:
                row["lat"] = tuple(lat[v][i] / lat["fp32"][i] for i in range(3))
                row["load_ms"] = (lat["fp32"][2] * 1e3, lat[v][2] * 1e3)
            rows.append(row)
        print("\n".join(_fmt(r) for r in rows[-len(VARIANTS):]), flush=True)
    return rows


def _fmt(r: dict) -> str:
    lat = ""
    if r.get("lat"):
        lat = (f"{r['lat'][0]:.2f} / {r['lat'][1]:.2f} / {r['lat'][2]:.1f} "
               f"({r['load_ms'][0]:.1f} -> {r['load_ms'][1]:.1f} ms)")
    weights = f"{r['weights']:.3f}" if r["variant"] not in ("fp32", "lossless only", "pruned dense") else ""
    return (f"| {r['model']} | {r['sparsity']:.0%} | {r['variant']} | {r['accuracy']:.3f} | {r['file']:.3f} | "
            f"{weights} | {r.get('identical', '')} | {r.get('folded', '')} | {lat} |")


def render(rows: list[dict], command: str) -> str:
    head = [
        "### Unstructured sparsity and compact storage",
        "",
        f"Machine: {machine()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Command: `{command}`.",
        "",
        "Every variant runs the default lossless prefix first (cleanup, dedupe, folding, `fuse`: BatchNorm is "
        "folded into the convs before pruning), then magnitude pruning (`--prune R`, per layer unless *global "
        "scope*; biases, norms and embeddings left alone; **no fine-tuning**), then the storage variant; "
        "*lossless only* is that prefix alone. *file*: whole file vs the fp32 input; *weights*: the stored "
        "bytes of the weights with >= 1024 elements (compact_storage's per-tensor table) vs their fp32 bytes in "
        "the input; *identical*: compact float outputs bit-identical to the pruned dense model (test split, "
        "default optimizations); *folded*: after onnxruntime's load-time optimizations the compact model's "
        "graph has exactly the ops of the pruned dense model (no decode op left); *latency*: vs fp32, one "
        "thread, batch 1 / batch 64 / session creation (10th percentile of single calls, interleaved rounds; "
        "fastest of 5 creations, absolute times in brackets); *pruned dense* runs the same optimized graph as "
        "*compact float*, so its deviation from 1.00 shows the noise of the (shared) machine. The int8/int4/k-means rows are lossy on top of pruning.",
        "",
        "| model | sparsity | variant | accuracy | file ×fp32 | weights ×fp32 | identical | folded | "
        "latency ×fp32 (b1 / b64 / load) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [_fmt(r) for r in rows]) + "\n"


def write_docs(text: str) -> None:
    write_section(SECTION, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], metavar="NAME[=PATH]",
                    help="a bundled digits model (mlp, cnn) or NAME=PATH; default: mlp and cnn")
    ap.add_argument("--sparsities", nargs="*", type=float, default=[0.5, 0.75, 0.9])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=256)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    from onnxcompress.datasets import bundled_model_path

    rows = []
    for spec in args.model or ["mlp", "cnn"]:
        name, _, p = spec.partition("=")
        path = Path(p) if p else bundled_model_path(name)
        rows += bench_model(name, path, args.sparsities, args.rounds, args.reps)
    command = "python bench/prune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(rows, command.strip())
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
