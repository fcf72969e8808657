"""Why hqq's off-grid zero points are not stored as float zero points: onnxruntime's MatMulNBits speed
with packed uint4 zero points against float32 zero points (the same type as the scales).

``com.microsoft::MatMulNBits`` accepts either. One MatMulNBits node per shape (4-bit, random weights),
both forms side by side in one process, one thread: batch 1 and 64, accuracy levels 0 and 4, block 32
and 128, K x N from a digits-transformer layer to an LLM projection. ``rel. error``: the largest
deviation from ``x @ dequantized W`` over the largest output, which shows whether the kernel quantized
the activations to int8 (level 4, ~1e-2) or computed in float (~1e-7). The int4 pass therefore keeps
the integer zero point and adds the fractional part after the layer (``QuantizeInt4Pass._add_shift``).

    python bench/int4_zero_points.py                 # prints the table
    python bench/int4_zero_points.py --write-docs    # ... and writes it into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import time

import numpy as np

from _docs import machine, write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

SECTION = "int4-zero-points"
SHAPES = ((64, 64), (512, 512), (1024, 4096))


def _session(k: int, n: int, bs: int, level: int, float_zero: bool, rng):
    """One MatMulNBits model and its dequantized weight [K, N]."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nb = k // bs
    w = rng.standard_normal((n, nb, bs)).astype(np.float32)
    lo, hi = np.minimum(w.min(-1), 0), np.maximum(w.max(-1), 0)
    s = (hi - lo) / 15
    z = np.round(-lo / s) + (0.3 if float_zero else 0.0)  # an off-grid zero point for the float form
    q = np.clip(np.round(w / s[..., None] + z[..., None]), 0, 15).astype(np.uint8)
    codes = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    if float_zero:
        zp = z.astype(np.float32)
    else:
        zi = np.concatenate([z.astype(np.uint8), np.zeros((n, nb % 2), np.uint8)], axis=1)
        zp = (zi[:, 0::2] | (zi[:, 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=bs, accuracy_level=level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                          [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(s.astype(np.float32), "s"),
                           numpy_helper.from_array(zp, "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    deq = ((q - z[..., None]) * s[..., None]).reshape(n, k).T
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]), deq


def _time(sess, x, reps: int, rounds: int = 5) -> float:
    sess.run(None, {"x": x})
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            sess.run(None, {"x": x})
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def run() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for k, n in SHAPES:
        for bs in (32, 128):
            if bs > k:
                continue
            for level in (0, 4):
                for batch in (1, 64):
                    x = rng.standard_normal((batch, k)).astype(np.float32)
                    row = {"K": k, "N": n, "block": bs, "level": level, "batch": batch}
                    for form in ("uint4", "float"):
                        sess, deq = _session(k, n, bs, level, form == "float", rng)
                        ref = x @ deq
                        err = float(np.abs(sess.run(None, {"x": x})[0] - ref).max() / np.abs(ref).max())
                        reps = max(3, int(2e5 // (k * n * batch) * 10) or 3)
                        row[form] = (_time(sess, x, min(reps, 500)), err)
                    rows.append(row)
                    print(row, flush=True)
    return rows


def render(rows: list[dict], command: str) -> str:
    out = ["### int4 zero points: packed uint4 against float", "",
           f"Machine: {machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
           f"Command: `{command}`.", "",
           "One `MatMulNBits` (4-bit, random weights), one thread, fastest of 5 rounds; time per call and the "
           "relative error against `x @ dequantized W` (level 4 with uint4 zero points quantizes the activations "
           "to int8: ~1e-2; ~1e-7 means the kernel computed in float).", "",
           "| K x N | block | level | batch | uint4 zero points | float zero points | float / uint4 |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        (tu, eu), (tf, ef) = r["uint4"], r["float"]
        out.append(f"| {r['K']} x {r['N']} | {r['block']} | {r['level']} | {r['batch']} | {tu * 1e6:,.1f} µs "
                   f"({eu:.0e}) | {tf * 1e6:,.1f} µs ({ef:.0e}) | {tf / tu:.2f} |")
    big = [r["float"][0] / r["uint4"][0] for r in rows if r["K"] >= 512]
    out += ["", f"From K, N = 512 on, float zero points are {min(big):.1f}–{max(big):.0f}× slower than uint4 ones."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    command = "python bench/int4_zero_points.py" + (" --write-docs" if args.write_docs else "")
    text = render(run(), command)
    print(text)
    if args.write_docs:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
