"""CUDA execution provider: do the bundled models' compressed forms load, agree and run fast there?

Issue 3 item 10. For each bundled digits model, its fp32 file and every output form onnxcompress
writes (static QDQ int8, dynamic int8, int8 and int4 size-only storage, int4 MatMulNBits, fp16, bf16)
are run with onnxruntime on each requested execution provider. Per form and provider:

* where its nodes ran: the provider and op type of every kernel, read from an onnxruntime profile (a
  form whose nodes fall back to the CPU provider copies tensors between devices at every inference;
  the table names the op types that did);
* digits accuracy on the fixed 450-sample test split, the cosine of its logits against fp32's (same
  provider) and its top-1 agreement with fp32, and its top-1 agreement with the same file on the CPU
  provider (the form computes on this provider what it computes on the CPU: cosine ≥ 0.999 and top-1
  agreement ≥ 0.99 pass);
* latency relative to fp32 on the same provider, batch 1 and batch 64: median of ``--rounds`` rounds,
  each the mean of ``--reps`` calls after a warm-up (outputs are copied back to the host on each call);
* where onnxcompress imports (it needs onnx and onnx-graphsurgeon), the verdict of
  ``tools/compare.py fp32 form --providers <provider> --inputs <test split> --min-cosine 0.98
  --min-top1 0.9`` (the lossy policy of ``compress``'s own verification).

Three steps, so that the GPU machine needs nothing but numpy and onnxruntime-gpu for the numbers::

    python bench/cuda.py build   --out bench/cuda-work           # here: the files and feeds (onnxcompress)
    python bench/cuda.py measure --out bench/cuda-work --providers cpu,cuda   # there: numpy + onnxruntime
    python bench/cuda.py render  --out bench/cuda-work --write-docs           # here: docs/benchmarks.md

On the GPU machine (``../shared/gpu/README.md``): the five ``run`` calls that carry
``.ortgpu/part0N`` install onnxruntime-gpu into ``/tmp/site``; then one call that carries
``bench/cuda-work`` runs ``PYTHONPATH=/tmp/site:$PYTHONPATH python bench/cuda.py measure --results
$OUT/results.json``, and ``python bench/cuda.py render --results <fetched results.json> --write-docs``
writes the table here.

``all`` runs the three in one process (``python bench/cuda.py all --providers cpu --models mlp`` is
what the test runs on machines without a GPU). A requested provider that onnxruntime does not offer
is recorded with the reason, never silently replaced by the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SECTION = "cuda"
MODELS = ("mlp", "cnn", "transformer")
#: form -> the CLI flags that write it (``{calib}``: the model's calibration .npz)
FORMS = {
    "int8 static QDQ": ["--int8", "--calib-data", "{calib}"],
    "int8 dynamic": ["--int8"],
    "int8 storage": ["--storage", "int8"],
    "int4 storage": ["--storage", "int4"],
    "int4 MatMulNBits": ["--int4"],
    "fp16": ["--fp16"],
    "bf16": ["--bf16"],
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: the same file on this provider and on the CPU provider: what counts as computing the same thing
SAME_MIN_COSINE, SAME_MIN_TOP1 = 0.999, 0.99


# ---------------------------------------------------------------------------------------------- build


def build(out: Path, models: list[str]) -> None:
    """Write ``out/<model>/fp32.onnx``, one file per form, the test feeds and labels (needs onnxcompress)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from onnxcompress.datasets import bundled_model_path, calibration_npz, digits_feeds, digits_split

    for name in models:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        src = bundled_model_path(name)
        (folder / "fp32.onnx").write_bytes(src.read_bytes())
        np.savez(folder / "test.npz", **digits_feeds(str(src), "test"))
        np.save(folder / "labels.npy", digits_split("test")[1])
        calib = calibration_npz(folder / "calib.npz", str(src))
        for form, flags in FORMS.items():
            dst = folder / f"{_slug(form)}.onnx"
            cmd = [sys.executable, "-m", "onnxcompress", str(src), str(dst), *[f.format(calib=calib) for f in flags],
                   "--no-verify", "-q"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
            if proc.returncode != 0:
                raise SystemExit(f"build: {name} {form}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        print(f"built {name}: fp32 + {len(FORMS)} forms in {folder}", flush=True)


def _slug(form: str) -> str:
    return form.lower().replace(" ", "-")


# -------------------------------------------------------------------------------------------- measure


def _session(path: Path, provider: str, *, profile: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    return ort.InferenceSession(str(path), so, providers=providers)


def _logits(sess, x: np.ndarray) -> np.ndarray:
    """Logits of every sample, in batches of 64 (or the model's fixed batch, the last one padded)."""
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    step = fixed or 64
    out = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        pad = step - len(chunk) if fixed else 0
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(sess.run(None, {inp.name: chunk})[0][:len(chunk) - pad])
    return np.concatenate(out).astype(np.float64)


def _placement(path: Path, provider: str, x: np.ndarray, work: Path) -> dict[str, dict[str, int]]:
    """Per execution provider, the op types of the kernels it ran and how many, in one profiled run
    (from onnxruntime's profile events, which name each kernel's provider and op)."""
    sess = _session(path, provider, profile=str(work / "profile"))
    batch = 1 if _batch_free(sess) else sess.get_inputs()[0].shape[0]
    sess.run(None, {sess.get_inputs()[0].name: x[:batch]})
    prof = Path(sess.end_profiling())
    try:
        events = json.loads(prof.read_text())
    finally:
        prof.unlink(missing_ok=True)
    kernels: dict[str, tuple[str, str]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and "provider" in args:
            kernels[e["name"]] = (args["provider"].replace("ExecutionProvider", ""), args.get("op_name", "?"))
    out: dict[str, dict[str, int]] = {}
    for prov, op in kernels.values():
        ops = out.setdefault(prov, {})
        ops[op] = ops.get(op, 0) + 1
    return out


def _batch_free(sess) -> bool:
    b = sess.get_inputs()[0].shape[0]
    return not (isinstance(b, int) and b > 0)


def _latency(sess, x: np.ndarray, batch: int, rounds: int, reps: int) -> float:
    """Median over ``rounds`` of the mean seconds of ``reps`` calls on ``batch`` samples."""
    if not _batch_free(sess):
        batch = sess.get_inputs()[0].shape[0]
    feed = {sess.get_inputs()[0].name: np.ascontiguousarray(x[:batch])}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            sess.run(None, feed)
        times.append((time.perf_counter() - t0) / reps)
    return float(np.median(times))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-sample cosine of two logit matrices."""
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def _compare_tool(ref: Path, cand: Path, provider: str, feeds: Path) -> str:
    """The verdict line of tools/compare.py under the lossy policy of ``compress``'s verification
    (cosine ≥ 0.98, top-1 ≥ 0.9: every form here is lossy), or why it could not run here."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import onnxcompress.verify  # noqa: F401  (onnx, onnx-graphsurgeon: maybe not on a GPU machine)
    except Exception as exc:
        return f"not run: onnxcompress does not import here ({type(exc).__name__}: {exc})"[:200]
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare.py"), str(ref), str(cand), "--providers",
                               provider, "--inputs", str(feeds), "--min-cosine", "0.98", "--min-top1", "0.9", "-q"],
                              capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    except subprocess.TimeoutExpired:
        return "not finished in 300 s"
    lines = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return f"rc {proc.returncode}: {lines[-1] if lines else ''}"[:200]


def measure(out: Path, models: list[str], providers: list[str], rounds: int, reps: int,
            results_path: Path | None = None) -> dict:
    """Run every built file on every provider; write the results (``out/results.json`` unless
    ``results_path``) and return them."""
    import onnxruntime as ort

    if "cuda" in providers and hasattr(ort, "preload_dlls"):
        try:  # onnxruntime-gpu finds CUDA/cuDNN from the nvidia-* wheels (PyTorch's) only when preloaded
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001  (recorded: the sessions below then show what happened)
            print(f"preload_dlls: {type(exc).__name__}: {exc}", flush=True)
    available = set(ort.get_available_providers())
    results: dict = {"onnxruntime": ort.__version__, "machine": _machine(), "date": _now(), "providers": {},
                     "rows": []}
    for p in providers:
        results["providers"][p] = ("" if PROVIDERS[p] in available else
                                   f"onnxruntime {ort.__version__} here offers {sorted(available)}, not {PROVIDERS[p]}")
    for name in models:
        folder = out / name
        x = next(iter(np.load(folder / "test.npz").values()))
        labels = np.load(folder / "labels.npy")
        files = {"fp32": folder / "fp32.onnx", **{f: folder / f"{_slug(f)}.onnx" for f in FORMS}}
        cpu_logits = {form: _logits(_session(path, "cpu"), x) for form, path in files.items()}
        for p in providers:
            if results["providers"][p]:
                continue
            ref_logits, ref_lat = None, None
            for form, path in files.items():
                row = {"model": name, "form": form, "provider": p, "bytes": path.stat().st_size}
                try:
                    sess = _session(path, p)
                except Exception as exc:  # a form this provider cannot load: a finding, not a crash
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    results["rows"].append(row)
                    continue
                if sess.get_providers()[0] != PROVIDERS[p]:  # the provider failed to start: onnxruntime fell back
                    row["error"] = f"{PROVIDERS[p]} not active in the session (it runs on {sess.get_providers()})"
                    results["rows"].append(row)
                    continue
                logits = cpu_logits[form] if p == "cpu" else _logits(sess, x)
                if form == "fp32":
                    ref_logits = logits
                    ref_lat = (_latency(sess, x, 1, rounds, reps), _latency(sess, x, 64, rounds, reps))
                lat = ref_lat if form == "fp32" else (_latency(sess, x, 1, rounds, reps),
                                                      _latency(sess, x, 64, rounds, reps))
                same_cos, same_top1 = _cosine(logits, cpu_logits[form]), float(np.mean(
                    logits.argmax(1) == cpu_logits[form].argmax(1)))
                row.update({
                    "nodes": _placement(path, p, x, folder),
                    "accuracy": float(np.mean(logits.argmax(1) == labels)),
                    "cpu_accuracy": float(np.mean(cpu_logits[form].argmax(1) == labels)),
                    "cosine": _cosine(logits, ref_logits), "top1": float(np.mean(logits.argmax(1) == ref_logits.argmax(1))),
                    "same_cosine": same_cos, "same_top1": same_top1,
                    "same_ok": same_cos >= SAME_MIN_COSINE and same_top1 >= SAME_MIN_TOP1,
                    "ms": [t * 1e3 for t in lat], "vs_fp32": [t / r for t, r in zip(lat, ref_lat)],
                    "compare": None if form == "fp32" else _compare_tool(files["fp32"], path, p, folder / "test.npz"),
                })
                results["rows"].append(row)
                print(json.dumps({k: row[k] for k in ("model", "form", "provider", "accuracy", "same_ok", "vs_fp32")}),
                      flush=True)
    (results_path or out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _machine() -> str:
    gpu = ""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores" + (f", {gpu}" if gpu else ", no GPU")


def _now() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


# --------------------------------------------------------------------------------------------- render


def render(results: dict, command: str) -> str:
    out = ["### CUDA execution provider", "",
           f"Machine: {results['machine']}; onnxruntime {results['onnxruntime']}; {results['date']}. "
           f"Command: `{command}` (built with `python bench/cuda.py build`).", ""]
    for p, reason in results["providers"].items():
        if reason:
            out += [f"Not measured on {p}: {reason}.", ""]
    out += ["Accuracy: digits test split (450 samples). `vs fp32`: cosine of the logits and top-1 agreement "
            "with the fp32 file on the same provider. `same on CPU`: top-1 agreement and cosine with the same "
            "file on the CPU provider (pass: cosine ≥ 0.999, agreement ≥ 0.99). Latency: relative to fp32 on "
            "the same provider, batch 1 / batch 64. `nodes`: kernels per execution provider in a profiled run (on "
            "CUDA, the op types left on the CPU).", "",
            "| model | provider | form | bytes | nodes | accuracy | vs fp32 (cos, top-1) | same on CPU | latency b1 / "
            "b64 | tools/compare.py |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        head = f"| {r['model']} | {r['provider']} | {r['form']} | {r['bytes']:,} | "
        if "error" in r:
            out.append(head + f"does not load: {r['error']} | | | | | |")
            continue
        nodes = "; ".join(f"{prov} {sum(ops.values())}" + (f" ({', '.join(sorted(ops))})" if prov == "CPU" and
                                                               r["provider"] != "cpu" else "")
                          for prov, ops in sorted(r["nodes"].items()))
        same = f"{'ok' if r['same_ok'] else '**differs**'} ({r['same_top1']:.3f}, {r['same_cosine']:.5f})"
        lat = ("1 ({:.3f} ms / {:.3f} ms)".format(*r["ms"]) if r["form"] == "fp32"
               else "{:.2f}× / {:.2f}×".format(*r["vs_fp32"]))
        out.append(head + f"{nodes} | {r['accuracy']:.4f} | {r['cosine']:.5f}, {r['top1']:.3f} | {same} | {lat} | "
                   f"{r['compare'] or ''} |")  # fp32: nothing to compare
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("build", "measure", "render", "all"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "cuda-work", help="folder of the built files")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    ap.add_argument("--providers", default="cpu,cuda", help="comma separated: cpu, cuda")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--results", type=Path, help="measure: where to write the results; render: where to read them "
                    "(default: <out>/results.json)")
    ap.add_argument("--write-docs", action="store_true", help="render: write the table into docs/benchmarks.md")
    args = ap.parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        ap.error(f"unknown provider(s) {unknown}; choose from {', '.join(PROVIDERS)}")
    if args.step in ("build", "all"):
        build(args.out, args.models)
    if args.step in ("measure", "all"):
        results = measure(args.out, args.models, providers, args.rounds, args.reps, args.results)
    if args.step in ("render", "all"):
        if args.step == "render":
            results = json.loads((args.results or args.out / "results.json").read_text())
        text = render(results, "python bench/cuda.py measure --providers " + ",".join(results["providers"]))
        print(text)
        if args.write_docs:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from _docs import write_section

            write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
