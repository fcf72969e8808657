"""int4 and fp16/bf16 benchmark: onnxcompress against onnxruntime's own tools, side by side in one run.

int4 (block 32, per model): onnxruntime ``MatMulNBitsQuantizer`` (RTN, asymmetric, the same block
size; it quantizes MatMul nodes only) and onnxcompress ``quantize_int4`` with ``rtn``, ``search`` and
(with the calibration split / seeded calibration feeds) ``gptq``, each at accuracy_level 4 and 0 — by
default the output layer stays float (``keep_last``) and a small input layer gets 8 bits
(``first_bits``); the ``all-layers`` rows quantize every MatMul/Gemm in 4 bits, the ``4-bit input``
rows only turn the input-layer rule off. ``ours rtn alN`` is what the preset does without calibration
data at that accuracy level; then the whole ``--int4`` preset (embeddings included, a small table in 8
bits) with and without calibration data. fp16: onnxruntime's ``convert_float_to_float16(keep_io_types=True)`` against onnxcompress
``--fp16``, ``--fp16 --half-compute float`` and ``--bf16``. Columns: file size, task metric (digits
accuracy on the fixed test split; for the synthetic models — a 512-1024-512 MLP and a BERT-shaped
one-layer encoder with an exported-style attention mask, seeded random weights — cosine and top-1
agreement against fp32 on seeded feeds), CPU latency against fp32 (one thread, batch 1 and batch 64, variants interleaved,
median), conversion wall time, and whether the model passes ``onnx.checker`` and loads in stock
onnxruntime (CPU EP). A last table runs both fp16 converters alone (no lossless prefix) on the traps (an If subgraph,
Resize).

    python bench/quantize_lowbit.py                   # everything, prints the tables
    python bench/quantize_lowbit.py --write-docs      # ... and writes them into docs/benchmarks.md
    python bench/quantize_lowbit.py --models mlp --quick
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from _docs import load_bench, write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SECTION = "quantize-int4-fp16"
DIGITS = ("mlp", "transformer", "cnn")
SYNTHETIC = "mlp512"  # 512-1024-512 MLP with seeded random weights (the shape the notes measured)
ENCODER = "encoder"  # tests/lowbit_helpers.tiny_encoder: BERT-shaped, exported-style attention mask


# ---------------------------------------------------------------------------------------------- cases


def _synthetic(work: Path) -> dict:
    import builders

    path = work / f"{SYNTHETIC}.onnx"
    onnx.save(builders.mlp((512, 1024, 512), seed=0), path)
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((64, 512)).astype(np.float32)} for _ in range(4)]
    return {"name": SYNTHETIC, "path": str(path), "kind": "synthetic", "calib": calib,
            "eval": {"x": rng.standard_normal((256, 512)).astype(np.float32)}}


def _encoder(work: Path) -> dict:
    from lowbit_helpers import encoder_feeds, tiny_encoder

    path = work / f"{ENCODER}.onnx"
    onnx.save(tiny_encoder(seed=0, vocab=1000, seq=64, d=128, ff=512), path)
    calib = [encoder_feeds(32, seed=i, vocab=1000, seq=64) for i in range(4)]
    return {"name": ENCODER, "path": str(path), "kind": "synthetic", "calib": calib,
            "eval": encoder_feeds(256, seed=100, vocab=1000, seq=64)}


def _digits(name: str) -> dict | None:
    from onnxcompress import datasets

    try:
        path = datasets.bundled_model_path(name)
    except Exception as e:  # the bundled models are built by tools/build_models.py
        logging.warning("skipping %s: %s", name, e)
        return None
    feeds = datasets.digits_feeds(path, "calib")
    (inp, arr), = feeds.items()
    calib = [{inp: arr[i:i + 64]} for i in range(0, len(arr), 64)]
    return {"name": name, "path": str(path), "kind": "digits", "calib": calib,
            "eval": datasets.digits_feeds(path, "test")}


def metric(case: dict, model_path: str, ref: np.ndarray | None) -> dict:
    """Task metric, and whether the model passes the checker and loads in stock onnxruntime."""
    row: dict = {}
    try:
        onnx.checker.check_model(model_path, full_check=True)
        row["checker"] = "ok"
    except Exception as e:
        row["checker"] = f"FAIL ({_msg(e, 80)})"
    try:
        sess = BQ._session(model_path)
    except Exception as e:
        row["loads"] = f"FAIL ({_msg(e, 80)})"
        return row
    row["loads"] = "ok"
    if case["kind"] == "digits":
        from onnxcompress import datasets

        row["acc"] = datasets.digits_accuracy(model_path)
        return row
    out = sess.run(None, case["eval"])[0]
    if ref is None:
        row["out"] = out
        return row
    a, b = ref.ravel().astype(np.float64), out.ravel().astype(np.float64)
    row["cos"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    row["top1"] = float(np.mean(ref.argmax(1) == out.argmax(1)))
    return row


# ---------------------------------------------------------------------------------------------- makers


def _ours(steps, *, data=None, prefix: bool = True):
    """A maker running onnxcompress's lossless prefix (as the CLI does) + ``steps``; no verification
    (we measure here)."""
    def make(src: str, dst: str, case: dict) -> None:
        from onnxcompress.api import compress
        from onnxcompress.recipe import Recipe, VerifyConfig
        from onnxcompress.recipes import lossless_steps

        recipe = Recipe(steps=tuple(lossless_steps()) if prefix else (), verify=VerifyConfig(enabled=False))
        for s in steps:
            recipe = recipe.with_step(s)
        compress(src, recipe, data=case["calib"] if data else None).save(dst)
    return make


def _ort_rtn(accuracy_level: int):
    def make(src: str, dst: str, case: dict) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=False, accuracy_level=accuracy_level)
        q.process()
        onnx.save(q.model.model, dst)
    return make


def _ort_fp16(src: str, dst: str, case: dict) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(src), keep_io_types=True), dst)


def int4_variants(case: dict) -> dict:
    from onnxcompress.quantize.embed import QuantizeEmbeddingConfig
    from onnxcompress.quantize.int4 import QuantizeInt4Config as C

    v = {}
    for al in (4, 0):
        v[f"ort-rtn al{al}"] = _ort_rtn(al)
        every = dict(accuracy_level=al, keep_last=False, first_bits=4)
        v[f"ours rtn all-layers al{al}"] = _ours([C(method="rtn", **every)])
        v[f"ours search all-layers al{al}"] = _ours([C(method="search", **every)])
        v[f"ours rtn 4-bit input al{al}"] = _ours([C(method="rtn", accuracy_level=al, first_bits=4)])
        v[f"ours rtn al{al}"] = _ours([C(method="rtn", accuracy_level=al)])
        v[f"ours search al{al}"] = _ours([C(method="search", accuracy_level=al)])
        v[f"ours gptq al{al}"] = _ours([C(method="gptq", accuracy_level=al)], data=True)
    v["ours --int4 data-free (+embed)"] = _ours([C(), QuantizeEmbeddingConfig()])
    v["ours --int4 (+embed)"] = _ours([C(), QuantizeEmbeddingConfig()], data=True)
    return v


def fp16_variants(case: dict) -> dict:
    from onnxcompress.quantize.fp16 import ConvertFp16Config as C

    return {"ort fp16": _ort_fp16, "ours --fp16": _ours([C()]),
            "ours --fp16 compute=float": _ours([C(compute="float")]), "ours --bf16": _ours([C(dtype="bfloat16")])}


# ---------------------------------------------------------------------------------------------- runs


def bench(case: dict, variants: dict, work: Path, rounds: int, reps: int) -> list[dict]:
    ref = metric(case, case["path"], None).get("out")
    rows = [{"variant": "fp32", "size": os.path.getsize(case["path"]),
             **{k: v for k, v in metric(case, case["path"], ref).items()}}]
    paths = {"fp32": case["path"]}
    for name, make in variants.items():
        dst = str(work / f"{case['name']}-{name.replace(' ', '_').replace('/', '_')}.onnx")
        t0 = time.perf_counter()
        try:
            make(case["path"], dst, case)
        except Exception as e:
            rows.append({"variant": name, "error": _msg(e, 120)})
            continue
        row = {"variant": name, "seconds": time.perf_counter() - t0, "size": os.path.getsize(dst),
               **metric(case, dst, ref)}
        rows.append(row)
        if row.get("loads") == "ok":
            paths[name] = dst
    ev = case["eval"]
    one = {k: v[:1] for k, v in ev.items()}
    batch = {k: v[:64] for k, v in ev.items()}
    lat = BQ.latency(paths, one, batch, rounds, reps)
    f1, f64 = lat["fp32"]
    for r in rows:
        if r["variant"] in lat:
            r["lat1"], r["lat64"] = lat[r["variant"]][0] / f1, lat[r["variant"]][1] / f64
    rows[0]["lat_ms"] = (f1 * 1e3, f64 * 1e3)
    return rows


def trap_models() -> dict[str, onnx.ModelProto]:
    """Small graphs where fp16 converters go wrong: weights in an If, a Resize with float scales."""
    import builders
    from onnx import TensorProto, helper, numpy_helper

    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]),
                           helper.make_node("Resize", ["c", "", "scales"], ["y"], mode="nearest")], "resize",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [scales, w])
    resize = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    resize.ir_version = 8
    return {"mlp in If": builders.with_if_subgraph(builders.mlp((16, 32, 8))), "Conv+Resize": resize}


def trap_table(work: Path) -> list[dict]:
    import builders

    from onnxcompress.quantize.fp16 import ConvertFp16Config

    rows = []
    for name, model in trap_models().items():
        src = work / f"trap-{name.replace(' ', '_')}.onnx"
        onnx.save(model, src)
        feeds = {i.name: np.random.default_rng(0).standard_normal(
            [d.dim_value or 4 for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}
        ref = builders.run(model, feeds)[0]
        for tool, make in (("onnxruntime", _ort_fp16), ("onnxcompress", _ours([ConvertFp16Config()], prefix=False))):
            dst = str(work / f"trap-{tool}-{src.stem}.onnx")
            row = {"model": name, "tool": tool}
            try:
                make(str(src), dst, {"calib": None})
                row.update(metric({"kind": "synthetic", "eval": feeds}, dst, ref))
            except Exception as e:
                row["error"] = _msg(e)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- output


def _msg(e: BaseException, n: int = 100) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:n]}" if text else type(e).__name__


def _f(v, fmt):
    return "" if v is None else format(v, fmt)


def render(results: dict, traps: list[dict], command: str, seconds: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import onnxruntime as ort

    lines = [f"Measured {now} on {platform.machine()} ({os.cpu_count()} cores, shared; {platform.processor() or 'cpu'}), "
             f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, one intra-op thread; {seconds:.0f} s. "
             f"Command: `{command}`.", ""]
    for (kind, case), rows in results.items():
        base = rows[0]
        metric_head = "accuracy" if "acc" in base else "cosine / top-1 vs fp32"
        lines += [f"### {kind}: {case}", "",
                  f"fp32: {base['size'] / 1024:.1f} KiB, {metric_head} "
                  + (f"{base['acc']:.4f}" if "acc" in base else "1 / 1")
                  + f", {base['lat_ms'][0]:.3f} ms (batch 1), {base['lat_ms'][1]:.3f} ms (batch 64)", "",
                  f"| variant | size vs fp32 | {metric_head} | latency b1 | latency b64 | time s | checker | loads |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        for r in rows[1:]:
            if "error" in r:
                lines.append(f"| {r['variant']} | | | | | | error: {r['error']} | |")
                continue
            m = f"{r['acc']:.4f}" if "acc" in r else (f"{r['cos']:.5f} / {r['top1']:.3f}" if "cos" in r else "")
            lines.append(f"| {r['variant']} | {r['size'] / base['size']:.3f} | {m} | {_f(r.get('lat1'), '.2f')} | "
                         f"{_f(r.get('lat64'), '.2f')} | {r['seconds']:.2f} | {r.get('checker', '')} | {r.get('loads', '')} |")
        lines.append("")
    if traps:
        lines += ["### fp16 converters on the traps", "", "| model | tool | checker | loads | cosine vs fp32 |",
                  "|---|---|---|---|---:|"]
        for r in traps:
            lines.append(f"| {r['model']} | {r['tool']} | {r.get('checker', r.get('error', ''))} | {r.get('loads', '')} | "
                         f"{_f(r.get('cos'), '.6f')} |")
        lines.append("")
    return "\n".join(lines)


def write_docs(text: str) -> None:
    write_section(SECTION, text, heading='int4 and fp16 / bf16')


BQ = None


def main(argv=None) -> int:
    global BQ
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=[*DIGITS, SYNTHETIC, ENCODER],
                    help="mlp transformer cnn mlp512 encoder")
    ap.add_argument("--tables", nargs="*", default=["int4", "fp16", "traps"], choices=["int4", "fp16", "traps"])
    ap.add_argument("--quick", action="store_true", help="fewer latency rounds")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("onnx_graphsurgeon", "onnxruntime.quantization.matmul_nbits_quantizer", "onnxcompress"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    BQ = load_bench("quantize")
    rounds, reps = (3, 20) if args.quick else (7, 60)
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-lowbit-") as tmp:
        work = Path(tmp)
        for name in args.models:
            case = {SYNTHETIC: _synthetic, ENCODER: _encoder}.get(name, lambda w: _digits(name))(work)
            if case is None:
                continue
            if "int4" in args.tables:
                results[("int4", name)] = bench(case, int4_variants(case), work, rounds, reps)
            if "fp16" in args.tables:
                results[("fp16", name)] = bench(case, fp16_variants(case), work, rounds, reps)
        traps = trap_table(work) if "traps" in args.tables else []
    command = "python bench/quantize_lowbit.py" + ("".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])
                                                         if a != "--write-docs"))
    text = render(results, traps, command, time.perf_counter() - t0)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
