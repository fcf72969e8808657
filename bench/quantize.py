"""int8 benchmark: onnxcompress against onnxruntime.quantization, side by side in one run.

For each model: fp32; onnxcompress ``--int8`` with calibration data (static QDQ; its default
calibration method, plus the other methods for the digits models); onnxcompress ``--int8`` without data
(dynamic MatMul/Gemm + int8 Conv storage); ``--storage int8``; onnxruntime ``quantize_static`` (QDQ,
uint8 activations, int8 per-channel weights) with the MinMax, Entropy and Percentile calibrators, and
``quantize_dynamic``. Columns: file size, task metric (digits accuracy on the fixed test split; for
corpus models the cosine and top-1 agreement against fp32 on seeded feeds), CPU latency against fp32
(one thread, batch 1 and batch 64, interleaved, fastest of several rounds), quantization wall time and
the peak RSS of the quantizing process (each quantization runs in its own subprocess; peak RSS from
``/proc/self/status`` VmHWM, and the growth over the process's RSS just before quantizing).

Both tools start from compiled bytecode and imported modules. pip compiled onnxruntime's ``.pyc``
files at install; an editable install of onnxcompress has none where ``PYTHONDONTWRITEBYTECODE`` is
set (as on CI machines and here), and compiling its modules from source added about 4 MiB to the
child's peak on the CNN (growth 20 → 16 MiB once compiled, 2026-12-06), the interpreter's cost and
not the quantizer's. So the parent compiles the package's bytecode (``compileall``, into its
git-ignored ``__pycache__`` folders) before any child runs. Each child then imports the modules its
tool quantizes with before it reads its baseline: ``onnxruntime.quantization``, and the onnxcompress
modules that ``--int8`` imports.

A second table: calibration memory with 32 and 512 samples (onnxcompress streams; onnxruntime's
Entropy calibrator keeps every intermediate output).

Every produced model is checked with ``onnx.checker`` and loaded in stock onnxruntime (CPU EP).

    python bench/quantize.py                       # everything, prints the tables
    python bench/quantize.py --write-docs          # ... and writes them into docs/benchmarks.md (quantize)
    python bench/quantize.py --models mlp cnn --quick
    python bench/quantize.py --models mlp=/tmp/mlp.onnx      # a stand-in file for a digits model

Metric column: digits accuracy in bold where the model is a digits model, then the cosine and top-1
agreement of the logits against fp32 on the same feeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _docs import machine, write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DIGITS = ("mlp", "cnn", "transformer")
CORPUS = ("pytorch-converted/test_Conv2d", "pytorch-converted/test_Linear")
SECTION = "quantize"


# ---------------------------------------------------------------------------------------------- child


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM). ``ru_maxrss`` is no good here: it survives fork + exec, so a
    child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _npz_reader(path: str, input_names: list[str], batch: int):
    """An onnxruntime CalibrationDataReader over a stacked .npz."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            data = np.load(path)
            self.arrays = {k: data[k] for k in input_names}
            self.n = len(next(iter(self.arrays.values())))
            self.i = 0

        def get_next(self):
            if self.i >= self.n:
                return None
            feed = {k: v[self.i:self.i + batch] for k, v in self.arrays.items()}
            self.i += batch
            return feed

        def rewind(self):
            self.i = 0

    return Reader()


def child(variant: str, model: str, calib: str, out: str) -> None:
    """Quantize ``model`` one way in this process; print JSON with wall time and memory."""
    import onnx

    import onnxruntime.quantization as oq  # imports counted in the baseline for both tools

    from onnxcompress.api import compress
    from onnxcompress.quantize.config import QuantizeInt8Config, StorageConfig
    from onnxcompress.recipe import VerifyConfig
    from onnxcompress.recipes import preset_recipe
    _import_quantize_path()

    inputs = onnx.load(model, load_external_data=False).graph.input
    names = [i.name for i in inputs]
    dims = [i.type.tensor_type.shape.dim for i in inputs]
    fixed = [d[0].dim_value for d in dims if d and d[0].dim_value > 0]
    batch = min(fixed) if fixed else 32  # a model with a fixed batch is fed batches of that size
    base = _rss_mb()
    t0 = time.perf_counter()
    if variant.startswith("ours"):
        recipe = preset_recipe([])
        data = calib
        if variant == "ours-dynamic":
            step, data = QuantizeInt8Config(mode="dynamic"), None
        elif variant == "ours-storage":
            step, data = StorageConfig(), None
        else:
            method = variant.split("-", 1)[1] if "-" in variant else None
            step = QuantizeInt8Config(mode="static", **({"calib_method": method} if method else {}))
        recipe = recipe.with_step(step).replace(verify=VerifyConfig(enabled=False))
        res = compress(model, recipe, data=data)
        res.save(out)
    elif variant == "ort-dynamic":
        oq.quantize_dynamic(model, out, weight_type=oq.QuantType.QInt8)
    else:
        method = {"ort-minmax": oq.CalibrationMethod.MinMax, "ort-entropy": oq.CalibrationMethod.Entropy,
                  "ort-percentile": oq.CalibrationMethod.Percentile}[variant]
        oq.quantize_static(model, out, _npz_reader(calib, names, batch), quant_format=oq.QuantFormat.QDQ,
                           per_channel=True, activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8,
                           calibrate_method=method)
    wall = time.perf_counter() - t0
    peak = _peak_mb()
    print(json.dumps({"wall_s": wall, "peak_mb": peak, "base_mb": base, "growth_mb": peak - base}))


def _import_quantize_path() -> None:
    """Import the onnxcompress modules a ``--int8`` run imports lazily (pass registry, calibration,
    verification, data readers), so that neither tool's baseline leaves out its own modules."""
    import importlib

    for name in ("onnxcompress.passes.registry", "onnxcompress.quantize.static", "onnxcompress.quantize.dynamic",
                 "onnxcompress.quantize.storage", "onnxcompress.quantize.calibrate", "onnxcompress.data",
                 "onnxcompress.verify.session", "onnxcompress.encode"):
        importlib.import_module(name)


_COMPILED: list[bool] = []


def _compile_package() -> None:
    """Write onnxcompress's ``.pyc`` files next to its sources once (``__pycache__``, git-ignored), as pip
    does for onnxruntime's at install; the children read them even under ``PYTHONDONTWRITEBYTECODE``."""
    if not _COMPILED:
        import compileall

        compileall.compile_dir(str(ROOT / "onnxcompress"), quiet=1)
        _COMPILED.append(True)


def run_child(variant: str, model: str, calib: str, out: str) -> dict:
    _compile_package()
    proc = subprocess.run([sys.executable, __file__, "--child", variant, model, calib, out],
                          capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- parent


def _session(path_or_bytes, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def _corpus_path(name: str) -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / name / "model.onnx"


def _modernize(src: Path, dst: Path) -> Path:
    """The corpus's opset-6 / IR-3 exports in a form both tools take: opset 13, initializers not inputs."""
    import onnx
    import onnx.version_converter

    m = onnx.load(str(src))
    inits = {t.name for t in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m.ir_version = 8
    m = onnx.version_converter.convert_version(m, 13)
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return dst


def _random_feeds(model_path: str, n: int, seed: int) -> dict[str, np.ndarray]:
    from onnxcompress.data import input_specs

    rng = np.random.default_rng(seed)
    feeds = {}
    for s in input_specs(model_path):
        shape = [d if isinstance(d, int) else n for d in s.shape]
        if shape and isinstance(s.shape[0], int):
            shape[0] = s.shape[0]
        feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return feeds


def prepare(name: str, work: Path, n_calib: int) -> dict:
    from onnxcompress import datasets

    if name in DIGITS or "=" in name:
        name, _, given = name.partition("=")
        path = given or str(datasets.bundled_model_path(name))
        calib = str(datasets.calibration_npz(work / f"{name}-calib.npz", path, n=n_calib))
        return {"name": name, "path": path, "calib": calib, "kind": "digits",
                "eval": datasets.digits_feeds(path, "test")}
    short = name.split("/")[-1]
    path = str(_modernize(_corpus_path(name), work / f"{short}.onnx"))
    calib = work / f"{short}-calib.npz"
    feeds = _random_feeds(path, 64, seed=0)
    fixed = any(v.shape[0] != 64 for v in feeds.values())
    if fixed:  # a fixed batch: one calibration sample per batch, stacked
        samples = [_random_feeds(path, 1, seed=i) for i in range(32)]
        feeds = {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}
    np.savez(calib, **feeds)
    ev = [_random_feeds(path, 1, seed=1000 + i) for i in range(16)] if fixed else _random_feeds(path, 64, seed=1)
    return {"name": short, "path": path, "calib": str(calib), "kind": "corpus", "eval": ev}


def _outputs(sess, feeds) -> np.ndarray:
    if isinstance(feeds, list):
        return np.concatenate([sess.run(None, f)[0] for f in feeds])
    return sess.run(None, feeds)[0]


def metric(case: dict, path: str, ref: np.ndarray | None) -> dict:
    import onnx

    onnx.checker.check_model(path)
    sess = _session(path)
    extra = {}
    if case["kind"] == "digits":
        from onnxcompress import datasets

        extra["acc"] = datasets.digits_accuracy(path)
    out = _outputs(sess, case["eval"])
    if ref is None:
        return {"out": out, **extra}
    a, b = ref.ravel().astype(np.float64), out.ravel().astype(np.float64)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    r2, o2 = ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1)
    top1 = float(np.mean(r2.argmax(1) == o2.argmax(1)))
    return {"cos": cos, "top1": top1, "max_err": float(np.abs(ref - out).max()), **extra}


def latency(paths: dict[str, str], feed_one: dict, feed_batch: dict, rounds: int, reps: int) -> dict[str, tuple]:
    """Seconds per run at batch 1 and batch 64: variants interleaved round by round, each round the mean of
    ``reps`` runs, the fastest round kept (the machine is shared: the minimum is the least disturbed).

    A model whose batch is fixed gets the same feed for both; it is timed once, the batch-1 way (a
    second, shorter timing of the same ~10 µs call only added noise: 0.94× against 1.37× for one file)."""
    same = all(feed_one[k].shape == feed_batch[k].shape for k in feed_one)
    feeds = (feed_one,) if same else (feed_one, feed_batch)
    sessions = {k: _session(p) for k, p in paths.items()}
    times = {k: ([], []) for k in paths}
    for k, s in sessions.items():  # warm up
        for feed in feeds:
            s.run(None, feed)
    for _ in range(rounds):
        for k, s in sessions.items():
            for j, feed in enumerate(feeds):
                n = reps if j == 0 else max(1, reps // 8)
                t0 = time.perf_counter()
                for _ in range(n):
                    s.run(None, feed)
                times[k][j].append((time.perf_counter() - t0) / n)
    return {k: (float(np.min(v[0])), float(np.min(v[1] if not same else v[0]))) for k, v in times.items()}


def _first_feeds(case: dict, n: int) -> dict:
    ev = case["eval"]
    if isinstance(ev, list):
        return ev[0]
    return {k: v[:n] for k, v in ev.items()}


def bench_model(case: dict, work: Path, variants: list[str], rounds: int, reps: int) -> list[dict]:
    rows = []
    paths = {"fp32": case["path"]}
    fp32 = metric(case, case["path"], None)
    ref = fp32.get("out")
    base = {"variant": "fp32", "size": os.path.getsize(case["path"]), "cos": 1.0, "top1": 1.0, "max_err": 0.0,
            **({"acc": fp32["acc"]} if "acc" in fp32 else {})}
    rows.append(base)
    for v in variants:
        out = str(work / f"{case['name']}-{v}.onnx")
        info = run_child(v, case["path"], case["calib"], out)
        row = {"variant": v, **info}
        if "error" not in info:
            try:
                row.update(metric(case, out, ref))
                row["size"] = os.path.getsize(out)
                paths[v] = out
            except Exception as e:  # a model that fails the checker or does not load is a result too
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
        rows.append(row)
    one = _first_feeds(case, 1)
    batch = _first_feeds(case, 64)
    lat = latency(paths, one, batch, rounds, reps)
    f1, f64 = lat["fp32"]
    for r in rows:
        if r["variant"] in lat:
            r["lat1"], r["lat64"] = lat[r["variant"]][0] / f1, lat[r["variant"]][1] / f64
    rows[0]["lat1_ms"], rows[0]["lat64_ms"] = f1 * 1e3, f64 * 1e3
    return rows


def memory_table(case_name: str, work: Path) -> list[dict]:
    from onnxcompress import datasets

    case_name, _, given = case_name.partition("=")
    path = given or str(datasets.bundled_model_path(case_name))
    rows = []
    for variant, n in (("ours", 32), ("ours", 512), ("ort-entropy", 32), ("ort-entropy", 512)):
        calib = str(datasets.calibration_npz(work / f"{case_name}-calib{n}.npz", path, n=n))
        v = "ours-entropy" if variant == "ours" else variant
        info = run_child(v, path, calib, str(work / f"{case_name}-mem-{variant}-{n}.onnx"))
        rows.append({"model": case_name, "tool": v, "samples": n, **info})
    return rows


def _fmt_rows(case: str, rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {case} | {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        m = f"cos {r['cos']:.5f}, top-1 {100 * r['top1']:.1f}%"
        if "acc" in r:
            m = f"**{100 * r['acc']:.2f}%** ({m})"
        size = f"{r['size'] / 1024:.1f} KiB"
        lat = (f"{r['lat1']:.2f}× / {r['lat64']:.2f}×" if "lat1" in r else "")
        if r["variant"] == "fp32":
            lat = f"1 ({r['lat1_ms']:.3f} ms / {r['lat64_ms']:.2f} ms)"
        wall = f"{r['wall_s']:.2f}" if "wall_s" in r else ""
        rss = f"{r['peak_mb']:.0f} (+{r['growth_mb']:.0f})" if "peak_mb" in r else ""
        lines.append(f"| {case} | {r['variant']} | {m} | {size} | {lat} | {wall} | {rss} |")
    return lines


def render(results: dict, mem: list[dict], command: str) -> str:
    head = [
        "### int8: onnxcompress vs onnxruntime.quantization",
        "",
        f"Machine: {machine()}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Command: `{command}`.",
        "",
        "Variants: `ours` = `--int8` with `--calib-data` (static QDQ, default calibration), `ours-<method>` = "
        "the same with `--calib-method <method>`, `ours-dynamic` = `--int8` without data, `ours-storage` = "
        "`--storage int8`; `ort-*` = onnxruntime `quantize_static` (QDQ, u8 activations, s8 per-channel "
        "weights) with that calibrator, `ort-dynamic` = `quantize_dynamic` (s8). Digits models: 256 "
        "calibration samples, accuracy on the 450-sample test split. Corpus models: seeded normal feeds, "
        "parity against fp32. Latency: one thread, fastest of the interleaved rounds, relative to fp32 at "
        "batch 1 / batch 64 (or the model's fixed batch). "
        "Peak RSS of the quantizing subprocess in MiB (growth over its RSS just before quantizing).",
        "",
        "| model | variant | metric | size | latency vs fp32 (b1 / b64) | quantize s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    body = []
    for case, rows in results.items():
        body += _fmt_rows(case, rows)
    mem_lines = []
    if mem:
        mem_lines = ["", "Calibration memory (entropy calibration, each in a fresh subprocess; MiB):", "",
                     "| model | tool | samples | peak RSS | growth while quantizing | wall s |", "|---|---|---|---|---|---|"]
        for r in mem:
            if "error" in r:
                mem_lines.append(f"| {r['model']} | {r['tool']} | {r['samples']} | failed: {r['error']} | | |")
            else:
                mem_lines.append(f"| {r['model']} | {r['tool']} | {r['samples']} | {r['peak_mb']:.0f} | "
                                 f"{r['growth_mb']:.0f} | {r['wall_s']:.2f} |")
    return "\n".join(head + body + mem_lines + targets(results, mem)) + "\n"


def targets(results: dict, mem: list[dict]) -> list[str]:
    """The issue's targets, checked on the numbers above (met / tie / NOT met, never hidden).

    The three onnxruntime static calibrators produce the same graph, so their latency is taken as the
    median of the three; "tie" means within 3% (latency; the machine is shared, ±10% noise) or within
    1e-5 (cosine)."""
    out = ["", "Targets (checked on the numbers above):", ""]

    def verdict(good: bool, tie: bool) -> str:
        return "met" if good else ("tie (within noise)" if tie else "**NOT met**")

    def ok(good: bool) -> str:
        return verdict(good, False)

    for case, rows in results.items():
        by = {r["variant"]: r for r in rows if "error" not in r}
        ours = by.get("ours")
        ort_static = [by[k] for k in ("ort-minmax", "ort-entropy", "ort-percentile") if k in by]
        if not ours or not ort_static:
            out.append(f"- {case}: not comparable (a variant failed)")
            continue
        key = "acc" if "acc" in ours else "cos"
        best = max(r[key] for r in ort_static)
        tol = 0.0 if key == "acc" else 1e-5
        line = (f"- {case}: {key} {ours[key]:.6f} vs best onnxruntime calibrator {best:.6f}: "
                f"{verdict(ours[key] >= best, ours[key] >= best - tol)}")
        if key == "acc" and case in ("mlp", "cnn"):
            line += (f"; within 0.5 points of fp32 ({by['fp32']['acc']:.4f}): "
                     f"{verdict(ours['acc'] >= by['fp32']['acc'] - 0.005, False)}")
        for b in ("lat1", "lat64"):
            ref = float(np.median([r.get(b, np.inf) for r in ort_static]))
            mine = ours.get(b, np.inf)
            line += f"; latency {b[3:]}: {mine:.2f}× vs {ref:.2f}× {verdict(mine <= ref, mine <= 1.03 * ref)}"
        out.append(line)
    by_model: dict[str, dict] = {}
    for r in mem:
        if "error" not in r:
            by_model.setdefault(r["model"], {})[(r["tool"], r["samples"])] = r
    for model, d in by_model.items():
        a, b, e = d.get(("ours-entropy", 32)), d.get(("ours-entropy", 512)), d.get(("ort-entropy", 512))
        if a and b and e:
            out.append(f"- {model} calibration memory: 512 vs 32 samples {b['peak_mb']:.0f} / {a['peak_mb']:.0f} MiB "
                       f"= {b['peak_mb'] / a['peak_mb']:.2f}× (≤ 1.1×: {ok(b['peak_mb'] <= 1.1 * a['peak_mb'])}); "
                       f"vs onnxruntime Entropy at 512: peak {b['peak_mb']:.0f} / {e['peak_mb']:.0f} MiB "
                       f"(≤ half: {ok(b['peak_mb'] <= 0.5 * e['peak_mb'])}), growth {b['growth_mb']:.0f} / "
                       f"{e['growth_mb']:.0f} MiB (≤ half: {ok(b['growth_mb'] <= 0.5 * e['growth_mb'])})")
    return out


def write_docs(text: str) -> None:
    write_section(SECTION, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=4, metavar=("VARIANT", "MODEL", "CALIB", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", default=list(DIGITS) + list(CORPUS))
    ap.add_argument("--quick", action="store_true", help="fewer variants and timing rounds")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=64)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    import logging

    logging.disable(logging.WARNING)
    results, mem = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        work = Path(tmp)
        for name in args.models:
            case = prepare(name, work, 256)
            variants = ["ours", "ours-dynamic", "ours-storage", "ort-minmax", "ort-entropy", "ort-percentile",
                        "ort-dynamic"]
            if case["kind"] == "digits" and not args.quick:
                variants[1:1] = ["ours-percentile", "ours-entropy", "ours-mse"]
            rows = bench_model(case, work, variants, 3 if args.quick else args.rounds, args.reps)
            results[case["name"]] = rows
            print("\n".join(_fmt_rows(case["name"], rows)), flush=True)
        if not args.no_memory:
            for name in args.models:
                if name.partition("=")[0] in ("cnn", "transformer"):
                    mem += memory_table(name, work)
    command = "python bench/quantize.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    text = render(results, mem, command.strip())
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "memory": mem}, indent=1, default=str))
    if args.write_docs:
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
