"""Model I/O cost: load + save time and peak RSS, onnxcompress against plain ``onnx.load`` + ``onnx.save``,
side by side in one run.

The model is an MLP of 1024x1024 float32 layers with about 100 MB of weights, written once into a
temporary folder (inline, and a copy with external data). Every variant runs in a fresh subprocess so
that its peak resident set size is its own: after the imports the child resets its peak (``5`` into
``/proc/self/clear_refs``, Linux) and reports ``VmHWM - VmRSS``, the peak above its RSS at that point;
the table gives the median of ``--reps`` runs.

Variants:

* ``onnx``          ``onnx.load(path)`` then ``onnx.save(model, out)``;
* ``onnxcompress``  ``open_model`` -> ``model_to_graph`` -> ``graph_to_model`` -> ``save`` (the I/O path
                    that ``compress()`` takes, without passes or verification);
* ``compress``      ``onnxcompress.compress(path, lossless passes, no verification).save(out)``;
* ``... ext``       the same with the weights in an external data file, saved with external data
                    (``onnx.save(..., save_as_external_data=True)`` for plain onnx).

    python bench/io.py [--mb 100] [--reps 3] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent('''
    import json, sys, time
    variant, src, out = sys.argv[1:4]
    import numpy as np, onnx
    import onnxcompress as oc
    from onnxcompress.graph import io as gio
    from onnxcompress.recipe import Recipe, VerifyConfig
    from onnxcompress.recipes import default_recipe
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS: the imports' peak does not count
    base = status("VmRSS")
    ext = variant.endswith("ext")
    t0 = time.perf_counter()
    if variant.startswith("onnx "):
        model = onnx.load(src)
        t1 = time.perf_counter()
        if ext:
            onnx.save(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=out.rsplit("/", 1)[-1] + ".data")
        else:
            onnx.save(model, out)
    elif variant.startswith("onnxcompress "):
        src_ = gio.open_model(src)
        graph = gio.model_to_graph(src_)
        t1 = time.perf_counter()
        gio.save(gio.graph_to_model(graph, src_.model), out, base_dir=src_.base_dir, external_data=ext or None)
    else:
        recipe = default_recipe().replace(verify=VerifyConfig(enabled=False))
        res = oc.compress(src, recipe)
        t1 = time.perf_counter()
        res.save(out, external_data=ext or None)
    t2 = time.perf_counter()
    peak = status("VmHWM")
    print(json.dumps({"load": t1 - t0, "save": t2 - t1, "base_mb": base / 1024, "peak_mb": (peak - base) / 1024}))
''')


def make_model(folder: Path, mb: int) -> tuple[Path, Path, float]:
    """An MLP of 1024x1024 layers holding about ``mb`` MB of float32 weights; inline and external copies."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = max(1, round(mb * 2**20 / (1024 * 1024 * 4)))
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        w = (rng.standard_normal((1024, 1024), dtype=np.float32) / 32).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    nodes[-1].output[0] = "y"
    g = helper.make_graph(nodes, "io_bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench/io.py")
    m.ir_version = 8
    inline = folder / "inline" / "model.onnx"
    ext = folder / "ext" / "model.onnx"
    inline.parent.mkdir()
    ext.parent.mkdir()
    onnx.save(m, str(inline))
    onnx.save(m, str(ext), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    return inline, ext, n * 4.0


def make_transformer(folder: Path, *, layers: int = 16, d_model: int = 2048, seq: int = 8) -> tuple[Path, int]:
    """A synthetic transformer encoder whose weights (``12 * d_model**2`` per layer; 16 x 2048: 3.2 GB)
    are written straight into ``model.onnx.data``, one tensor at a time: the generator never holds more
    than one weight in memory, and the graph proto only refers to the data file.

    Per layer: Q/K/V projections, ``Softmax(Q K^T / sqrt(d))``, the output projection, a residual Add and
    LayerNormalization, then a ReLU feed-forward block (d -> 4d -> d) with its residual Add.
    Returns the model path and the bytes of weights.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    d, f = d_model, 4 * d_model
    base = np.random.default_rng(0).standard_normal(d * f, dtype=np.float32) / np.float32(np.sqrt(d))
    inits, nodes = [], []
    offset = 0

    with open(folder / data_name, "wb") as out:
        def weight(name: str, shape: tuple[int, ...], k: int) -> str:
            nonlocal offset
            n = int(np.prod(shape))
            arr = base[:n] * np.float32(1 + 1e-3 * k)  # distinct tensors (no dedupe), cheap to make
            out.write(arr.tobytes())
            t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for key, val in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                e = t.external_data.add()
                e.key, e.value = key, val
            offset += arr.nbytes
            inits.append(t)
            return name

        small = lambda name, arr: inits.append(numpy_helper.from_array(arr, name)) or name  # noqa: E731
        scale = small("attn_scale", np.array(1 / np.sqrt(d), np.float32))
        x, k = "x", 0
        for i in range(layers):
            def mm(a, name, shape):
                nonlocal k
                k += 1
                out_name = f"l{i}_{name}_out"
                nodes.append(helper.make_node("MatMul", [a, weight(f"l{i}.{name}", shape, k)], [out_name],
                                              name=f"l{i}/{name}"))
                return out_name

            q, kk, v = mm(x, "q", (d, d)), mm(x, "k", (d, d)), mm(x, "v", (d, d))
            nodes += [
                helper.make_node("Transpose", [kk], [f"l{i}_kt"], perm=[0, 2, 1], name=f"l{i}/kt"),
                helper.make_node("MatMul", [q, f"l{i}_kt"], [f"l{i}_s"], name=f"l{i}/qk"),
                helper.make_node("Mul", [f"l{i}_s", scale], [f"l{i}_ss"], name=f"l{i}/scale"),
                helper.make_node("Softmax", [f"l{i}_ss"], [f"l{i}_p"], axis=-1, name=f"l{i}/softmax"),
                helper.make_node("MatMul", [f"l{i}_p", v], [f"l{i}_a"], name=f"l{i}/av"),
            ]
            o = mm(f"l{i}_a", "o", (d, d))
            g = small(f"l{i}.ln.g", np.ones(d, np.float32))
            b = small(f"l{i}.ln.b", np.zeros(d, np.float32))
            nodes += [helper.make_node("Add", [x, o], [f"l{i}_r1"], name=f"l{i}/res1"),
                      helper.make_node("LayerNormalization", [f"l{i}_r1", g, b], [f"l{i}_h"], axis=-1,
                                       name=f"l{i}/ln")]
            up = mm(f"l{i}_h", "up", (d, f))
            nodes.append(helper.make_node("Relu", [up], [f"l{i}_act"], name=f"l{i}/relu"))
            down = mm(f"l{i}_act", "down", (f, d))
            x = f"l{i}_y" if i < layers - 1 else "y"
            nodes.append(helper.make_node("Add", [f"l{i}_h", down], [x], name=f"l{i}/res2"))
        out.flush()
        os.fsync(out.fileno())
    graph = helper.make_graph(nodes, "synthetic_transformer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench/io.py")
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, offset


def _hwm_bytes(pid: int) -> int | None:
    """The process's peak RSS so far (VmHWM of ``/proc/<pid>/status``; None where unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration, ValueError):
        return None


def run_limited(cmd: list[str], *, max_rss_gb: float, timeout: float) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, seconds, peak RSS in GiB, stderr tail). A watchdog kills the
    process if its RSS passes ``max_rss_gb`` (so a non-streaming implementation cannot take the machine
    down) or it runs past ``timeout``.

    The peak is the child's VmHWM, read every 20 ms while it runs: the high-water mark of the memory
    the command itself touched since its exec. ``ru_maxrss`` from wait4 is not used where VmHWM can be
    read: it also holds the RSS the child inherited from this process at fork, so it reports this
    process's size whenever that is larger (a 2 GiB parent makes ``python -c pass`` "peak" at 2 GiB),
    and a test would pass or fail by what ran before it."""
    import time

    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(p.pid)
    killed = ""
    hwm = None
    while True:
        try:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            break
        seen = _hwm_bytes(p.pid)
        if seen is not None:
            hwm = max(hwm or 0, seen)
        try:
            if proc.memory_info().rss > max_rss_gb * 2**30:
                killed = f"killed: RSS over {max_rss_gb} GiB"
                p.kill()
        except psutil.NoSuchProcess:
            pass
        if time.perf_counter() - t0 > timeout:
            killed = f"killed: over {timeout:.0f} s"
            p.kill()
        time.sleep(0.02)
    seconds = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    err = p.stderr.read()[-2000:] + killed
    peak = hwm / 2**30 if hwm is not None else usage.ru_maxrss / 2**20
    return rc, seconds, peak, err


def run_variant(variant: str, src: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, variant, str(src), str(out)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise RuntimeError(f"{variant} failed: {r.stderr[-2000:]}")
    for p in out.parent.glob(out.name + "*"):
        p.unlink()
    return json.loads(r.stdout.strip().splitlines()[-1])


SCALE_RUNS = {  # label -> extra CLI flags; verification is off: onnxruntime itself must hold the weights
    "weight-only int8 (--storage int8)": ["--storage", "int8"],
    "weight-only int8, --no-lossless": ["--storage", "int8", "--no-lossless"],
    "--int4 --int4-method rtn": ["--int4", "--int4-method", "rtn"],
    "--int4 --int4-method rtn, --no-lossless": ["--int4", "--int4-method", "rtn", "--no-lossless"],
    "--int4 --int4-block-size 64 (hqq)": ["--int4", "--int4-block-size", "64"],
}


def scale_command(model: Path, out: Path, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "onnxcompress", str(model), str(out), *flags, "--external-data", "--no-verify", "-q"]


def scale(args) -> int:
    import time

    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxcompress-scale-") as d:
        t0 = time.perf_counter()
        model, nbytes = make_transformer(Path(d) / "in", layers=args.layers)
        gen = time.perf_counter() - t0
        plain = textwrap.dedent("""
            import sys, onnx
            m = onnx.load(sys.argv[1])
            onnx.save(m, sys.argv[2], save_as_external_data=True, location="plain.onnx.data")
        """)
        runs = [("plain onnx.load + onnx.save (external data)", [sys.executable, "-c", plain, str(model),
                                                                 str(Path(d) / "plain.onnx")])]
        runs += [(label, scale_command(model, Path(d) / f"out{i}.onnx", flags))
                 for i, (label, flags) in enumerate(SCALE_RUNS.items())]
        for label, cmd in runs:
            rc, sec, peak, err = run_limited(cmd, max_rss_gb=12, timeout=3000)
            out_bytes = sum(p.stat().st_size for p in Path(d).glob("out*")) + sum(
                p.stat().st_size for p in Path(d).glob("plain*"))
            for p in list(Path(d).glob("out*")) + list(Path(d).glob("plain*")):
                p.unlink()
            rows.append((label, rc, sec, peak, out_bytes, err.strip().splitlines()[-1:] if rc else []))
            print(rows[-1], flush=True)
    lines = [
        f"Scale (issue 7 item 4). Machine: {platform.machine()}, {os.cpu_count()} cores (shared). "
        f"Date: {datetime.date.today().isoformat()}. Command: `python bench/io.py --scale --layers {args.layers}`.",
        "",
        f"A synthetic transformer encoder ({args.layers} layers, d_model 2048) with {nbytes / 1e9:.2f} GB "
        f"({nbytes / 2**30:.2f} GiB) of float32 weights in external data, generated tensor by tensor in "
        f"{gen:.0f} s. Each run in its own process; peak RSS: its VmHWM, read every 20 ms while it runs.",
        "",
        "| run | exit | time s | peak RSS GiB | peak RSS / model size | output bytes |",
        "|---|---|---|---|---|---|",
    ]
    for label, rc, sec, peak, out_bytes, err in rows:
        lines.append(f"| {label} | {rc} | {sec:.0f} | {peak:.2f} | {peak * 2**30 / nbytes:.2f} | "
                     f"{out_bytes / 1e9:.2f} GB |" + (f" {err}" if err else ""))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        write_section(scale_text=text)
    return 0


SCALE_HEADING = "### Scale: a 3 GB model, streamed"


def write_section(*, io_text: str | None = None, scale_text: str | None = None) -> None:
    """Replace the io section of docs/benchmarks.md, keeping whichever of its two parts is not given."""
    doc = ROOT / "docs" / "benchmarks.md"
    s = doc.read_text()
    start, end = "<!-- section: io -->", "<!-- end: io -->"
    i, j = s.index(start) + len(start), s.index(end)
    body = s[i:j]
    old_io, _, old_scale = body.partition(SCALE_HEADING)
    io_part = ("\n## Model I/O: load + save\n\n" + io_text) if io_text is not None else old_io
    scale_part = scale_text if scale_text is not None else old_scale.lstrip("\n")
    new = io_part.rstrip("\n") + "\n" + (f"\n{SCALE_HEADING}\n\n{scale_part.rstrip()}\n" if scale_part.strip() else "")
    doc.write_text(s[:i] + new + s[j:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=100, help="weights in MB (default 100)")
    ap.add_argument("--reps", type=int, default=3, help="runs per variant; the median is reported")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md (io section)")
    ap.add_argument("--scale", action="store_true", help="instead: the >= 3 GB synthetic transformer, compressed "
                    "with --storage int8 and --int4 (peak RSS and time; needs ~5 GB of disk)")
    ap.add_argument("--layers", type=int, default=16, help="--scale: layers of d_model 2048 (16: 3.2 GB)")
    args = ap.parse_args(argv)
    if args.scale:
        return scale(args)
    variants = ["onnx inline", "onnxcompress inline", "compress inline", "onnx ext", "onnxcompress ext",
                "compress ext"]
    with tempfile.TemporaryDirectory(prefix="onnxcompress-io-") as d:
        inline, ext, weights_mb = make_model(Path(d), args.mb)
        outdir = Path(d) / "out"
        outdir.mkdir()
        rows = {v: [] for v in variants}
        for _ in range(args.reps):  # interleaved, so drifting machine load hits every variant alike
            for v in variants:
                rows[v].append(run_variant(v, ext if v.endswith("ext") else inline, outdir / "o.onnx"))
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in rows.items()}
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), Python {platform.python_version()}. "
        f"Date: {datetime.date.today().isoformat()}. Command: `python bench/io.py --mb {args.mb} --reps {args.reps}`.",
        "",
        f"A {weights_mb:.0f} MiB float32 MLP (1024x1024 MatMul layers); each variant in a fresh process, median of "
        f"{args.reps}; peak RSS is the peak above the process's RSS after its imports; ratios against plain onnx "
        "in the same run (same storage).",
        "",
        "| variant | load (+passes) s | save s | total s | × onnx time | peak RSS MiB | × onnx RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        ref = med["onnx ext" if v.endswith("ext") else "onnx inline"]
        m = med[v]
        total, ref_total = m["load"] + m["save"], ref["load"] + ref["save"]
        lines.append(f"| {v} | {m['load']:.2f} | {m['save']:.2f} | {total:.2f} | {total / ref_total:.2f} | "
                     f"{m['peak_mb']:.0f} | {m['peak_mb'] / max(ref['peak_mb'], 1e-9):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_docs:
        write_section(io_text=text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
