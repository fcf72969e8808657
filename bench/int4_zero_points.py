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

import datetime

import numpy as np

from _docs import docs_main, load_bench, machine  # noqa: E402  (bench/ is on sys.path when run as a script)

SECTION = "int4-zero-points"
SHAPES = ((64, 64), (512, 512), (1024, 4096))


def _model(bq, float_zero: bool, level: int):
    """One MatMulNBits over the blocks of ``bq`` (``hqq_blocks``: a real zero point z₀ − shift/s per block),
    its zero points packed as uint4 (z₀; the shift dropped) or stored as float32 (z₀ − shift/s)."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = bq.q.shape[0], bq.cols
    zp = (bq.zero - bq.shift / bq.scale).astype(np.float32) if float_zero else bq.pack_zero_points()
    node = helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=bq.block_size, accuracy_level=level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                          [numpy_helper.from_array(bq.pack_nibbles(), "B"), numpy_helper.from_array(bq.scale, "s"),
                           numpy_helper.from_array(zp, "z")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def run() -> list[dict]:
    import dataclasses
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    from onnxcompress.quantize.int4 import hqq_blocks

    latency = load_bench("quantize").latency
    rng = np.random.default_rng(0)
    rows = []
    for k, n in SHAPES:
        for bs in (32, 128):
            if bs > k:
                continue
            bq = hqq_blocks(rng.standard_normal((n, k)).astype(np.float32), bs)
            deq = {"uint4": dataclasses.replace(bq, shift=None).dequant().T, "float": bq.dequant().T}
            x = rng.standard_normal((64, k)).astype(np.float32)
            for level in (0, 4):
                with tempfile.TemporaryDirectory() as tmp:
                    paths, err = {}, {}
                    for form in ("uint4", "float"):
                        model = _model(bq, form == "float", level)
                        paths[form] = os.path.join(tmp, f"{form}.onnx")
                        onnx.save(model, paths[form])
                        y = ort.InferenceSession(paths[form], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                        ref = x @ deq[form]
                        err[form] = float(np.abs(y - ref).max() / np.abs(ref).max())
                    reps = max(8, min(400, int(4e6 // (k * n))))
                    t = latency(paths, {"x": x[:1]}, {"x": x}, rounds=5, reps=reps)
                for j, batch in enumerate((1, 64)):
                    row = {"K": k, "N": n, "block": bs, "level": level, "batch": batch,
                           **{form: (t[form][j], err[form]) for form in ("uint4", "float")}}
                    rows.append(row)
                    print(row, flush=True)
    return rows


def render(rows: list[dict], command: str) -> str:
    out = ["### int4 zero points: packed uint4 against float", "",
           f"Machine: {machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
           f"Command: `{command}`.", "",
           "One `MatMulNBits` (4-bit `hqq_blocks` of random weights; uint4: the integer zero points, float: the real "
           "ones), one thread, bench/quantize.py's latency (interleaved rounds, fastest kept); time per call and "
           "the relative error against `x @ dequantized W` at batch 64 (level 4 with uint4 zero points quantizes "
           "the activations to int8: ~1e-2; ~1e-7 means the kernel computed in float).", "",
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
    return docs_main("int4_zero_points", SECTION, __doc__, lambda command: render(run(), command), argv)


if __name__ == "__main__":
    raise SystemExit(main())
