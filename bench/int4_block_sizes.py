"""int4 across block sizes: onnxruntime's RTN against our data-free ``--int4`` and its alternatives.

``bench/quantize_lowbit.py`` compares at block size 32. This script repeats the accuracy comparison at
block sizes 32, 64 and 128 and accuracy levels 0 and 4 on the three bundled digits models (fixed
450-sample test split): onnxruntime ``MatMulNBitsQuantizer`` (RTN, asymmetric) against our
``--int4`` preset without calibration data (``rtn``, the default, and ``search``, each with the input
layer in 8 bits — the default — or in 4 bits). Accuracy only: sizes and latencies are in the main
int4 table.

    python bench/int4_block_sizes.py                 # prints the table
    python bench/int4_block_sizes.py --write-docs    # ... and writes it into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging

import onnx

from _docs import machine, write_section  # noqa: E402  (bench/ is on sys.path when run as a script)

SECTION = "int4-block-sizes"
MODELS = ("mlp", "cnn", "transformer")
VARIANTS = (("rtn", 8), ("rtn", 4), ("search", 8), ("search", 4))


def ort_accuracy(path: str, block: int, level: int) -> float:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from onnxcompress.datasets import digits_accuracy

    q = MatMulNBitsQuantizer(onnx.load(path), block_size=block, is_symmetric=False, accuracy_level=level)
    q.process()
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer turns on INFO logging for everything
    return digits_accuracy(q.model.model)


def our_accuracy(path: str, block: int, level: int, method: str, first_bits: int) -> float:
    from onnxcompress.api import compress
    from onnxcompress.datasets import digits_accuracy
    from onnxcompress.recipe import VerifyConfig
    from onnxcompress.recipes import preset_recipe

    recipe = preset_recipe(["int4"]).replace(verify=VerifyConfig(enabled=False))
    steps = tuple(dataclasses.replace(s, block_size=block, accuracy_level=level, method=method, first_bits=first_bits)
                  if s.name == "quantize_int4" else s for s in recipe.steps)
    return digits_accuracy(compress(path, recipe.replace(steps=steps)).model)


def run() -> list[dict]:
    from onnxcompress.datasets import bundled_model_path

    rows = []
    for name in MODELS:
        path = str(bundled_model_path(name))
        for block in (32, 64, 128):
            for level in (0, 4):
                row = {"model": name, "block": block, "level": level, "ort": ort_accuracy(path, block, level)}
                for method, bits in VARIANTS:
                    row[f"{method}/{bits}"] = our_accuracy(path, block, level, method, bits)
                rows.append(row)
                print(row, flush=True)
    return rows


def render(rows: list[dict], command: str) -> str:
    cols = [f"{m}/{b}" for m, b in VARIANTS]
    out = ["### int4 across block sizes (accuracy, data-free)", "",
           f"Machine: {machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
           f"Command: `{command}`. Digits accuracy on the fixed 450-sample test split. `rtn/8` is the default "
           "`--int4` without calibration data (round to nearest, input layer in 8 bits); `search` is the "
           "per-block clipping search; `/4`: the input layer in 4 bits too. **Bold**: below onnxruntime.", "",
           "| model | block | accuracy level | onnxruntime RTN | " + " | ".join(cols) + " |",
           "|---|---|---|---|" + "---|" * len(cols)]
    misses = []
    for r in rows:
        cells = []
        for c in cols:
            below = r[c] < r["ort"] - 1e-9
            cells.append(f"**{r[c]:.4f}**" if below else f"{r[c]:.4f}")
            if below and c == "rtn/8":
                misses.append(f"{r['model']} block {r['block']} level {r['level']} ({r[c]:.4f} vs {r['ort']:.4f})")
        out.append(f"| {r['model']} | {r['block']} | {r['level']} | {r['ort']:.4f} | " + " | ".join(cells) + " |")
    out += ["", "The default (`rtn/8`) is below onnxruntime's RTN at: " + ("; ".join(misses) if misses else "none") + "."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    command = "python bench/int4_block_sizes.py" + (" --write-docs" if args.write_docs else "")
    text = render(run(), command)
    print(text)
    if args.write_docs:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
