"""int4 across block sizes: onnxruntime's RTN against our data-free ``--int4`` and its alternatives.

``bench/quantize_lowbit.py`` compares at block size 32. This script repeats the comparison at block
sizes 32, 64 and 128 and accuracy levels 0 and 4 on the three bundled digits models: onnxruntime
``MatMulNBitsQuantizer`` (RTN, asymmetric) against our ``--int4`` preset without calibration data
(``rtn``, ``hqq`` and ``search``, with the input layer in 8 bits — the default — and rtn also in 4
bits; the default method is rtn at block 32 and hqq from 64), against ``--int4`` restricted to the layers onnxruntime quantizes (``ort layers``: its
MatMuls only, the input layer in 4 bits; Gemm nodes excluded by name), and against ``--int4`` with the
256 calibration samples (``with data``: the default method then is GPTQ).

Per model, block size and level it reports, for onnxruntime, the default and ``with data``:

* accuracy on the fixed 450-sample test split (the task metric), and for the default the paired
  comparison with onnxruntime on that split: ``b/c`` = test samples only onnxruntime / only ours
  gets right, and the exact two-sided McNemar p-value (binomial on the b + c discordant samples);
* the logit mean squared error against the fp32 model on the train split (1091 samples that neither
  the test split nor the calibration data holds; how close each is to the model it compresses);
* the held-out and the test samples whose top-1 class differs from fp32's, and the file size in bytes;
* which test samples change class, with fp32's margin there;
* accuracy, agreement with fp32 and the paired comparison on a larger, harder population: the test
  split and 60 noisy copies of it (27,450 samples, ``datasets.noisy_test_feeds``), with the rows where
  either of ours differs significantly from onnxruntime (exact McNemar, p < 0.05) listed;
* on the transformer, CPU latency against fp32 (one thread; batch 1 and 64) of onnxruntime's RTN,
  rtn and hqq: what hqq's shift ops cost.

    python bench/int4_block_sizes.py                 # prints the tables
    python bench/int4_block_sizes.py --write-docs    # ... and writes them into docs/benchmarks.md
"""

from __future__ import annotations

import dataclasses
import datetime
import logging

import numpy as np
import onnx

from _docs import docs_main, load_bench, machine  # noqa: E402  (bench/ is on sys.path when run as a script)
from onnxcompress.quantize.int4 import HQQ_MIN_BLOCK
from onnxcompress.verify.metrics import mcnemar_p

SECTION = "int4-block-sizes"
MODELS = ("mlp", "cnn", "transformer")
VARIANTS = (("rtn", 8), ("rtn", 4), ("hqq", 8), ("search", 8))
HELD_OUT = "train"  # neither the test split nor the calibration data
NOISY = "noisy"  # the test split and NOISY_COPIES noisy copies (datasets.noisy_test_feeds)
NOISY_COPIES = 60  # 27,450 samples: 10 copies (4,950) could not tell a 0.2-point difference from noise


def logits(model: onnx.ModelProto, feeds: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The model's logits on every named population of ``feeds``, from one onnxruntime session."""
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = {}
    for split, feed in feeds.items():
        (name, x), = feed.items()
        out[split] = np.concatenate([s.run(None, {name: x[i:i + 512]})[0] for i in range(0, len(x), 512)])
    return out


def ort_model(path: str, block: int, level: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(path), block_size=block, is_symmetric=False, accuracy_level=level)
    q.process()
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer turns on INFO logging for everything
    return q.model.model


def our_model(path: str, block: int, level: int, method: str, first_bits: int,
              exclude: tuple[str, ...] = (), data=None) -> onnx.ModelProto:
    from onnxcompress.api import compress
    from onnxcompress.recipe import VerifyConfig
    from onnxcompress.recipes import preset_recipe

    recipe = preset_recipe(["int4"]).replace(verify=VerifyConfig(enabled=False))
    steps = tuple(dataclasses.replace(s, block_size=block, accuracy_level=level, method=method, first_bits=first_bits,
                                      exclude=exclude)
                  if s.name == "quantize_int4" else s for s in recipe.steps)
    return compress(path, recipe.replace(steps=steps), data=data).model


def timings(models: dict[str, onnx.ModelProto]) -> dict[str, tuple[float, float]]:
    """Latency against ``models["fp32"]`` (batch 1, batch 64) of the others, timed side by side."""
    import os
    import tempfile

    from onnxcompress.datasets import digits_feeds

    (name, x), = digits_feeds(models["fp32"], "test").items()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for k, m in models.items():
            paths[k] = os.path.join(tmp, k.replace("/", "_") + ".onnx")
            onnx.save(m, paths[k])
        t = load_bench("quantize").latency(paths, {name: x[:1]}, {name: x[:64]}, rounds=7, reps=200)
    return {k: (v[0] / t["fp32"][0], v[1] / t["fp32"][1]) for k, v in t.items() if k != "fp32"}


class Scorer:
    """Test predictions and held-out logits of the fp32 model, to score its compressed versions against."""

    def __init__(self, fp32: onnx.ModelProto):
        from onnxcompress.datasets import digits_feeds, digits_split, noisy_test_feeds

        self.labels = digits_split("test")[1]
        noisy, self.noisy_labels = noisy_test_feeds(fp32, copies=NOISY_COPIES)
        self.feeds = {"test": digits_feeds(fp32, "test"), HELD_OUT: digits_feeds(fp32, HELD_OUT), NOISY: noisy}
        self.ref = logits(fp32, self.feeds)
        top2 = np.sort(self.ref["test"], axis=1)[:, -2:]
        self.margin = top2[:, 1] - top2[:, 0]  # fp32's top-1 logit minus its runner-up, per test sample
        self.rank = np.empty(len(self.margin), dtype=int)  # 1 = the test sample closest to a class boundary
        self.rank[np.argsort(self.margin, kind="stable")] = np.arange(1, len(self.margin) + 1)

    def __call__(self, model: onnx.ModelProto) -> dict:
        out = logits(model, self.feeds)
        pred, val, ref_val = out["test"].argmax(axis=1), out[HELD_OUT], self.ref[HELD_OUT]
        noisy = out[NOISY].argmax(axis=1)
        flipped = np.flatnonzero(pred != self.ref["test"].argmax(axis=1))
        return {"correct": pred == self.labels, "acc": float(np.mean(pred == self.labels)),
                "val_mse": float(np.mean((val - ref_val) ** 2)),
                "flips": len(flipped),
                "flipped": [(int(i), float(self.margin[i]), int(self.rank[i])) for i in flipped],
                "val_flips": int(np.sum(val.argmax(axis=1) != ref_val.argmax(axis=1))), "bytes": model.ByteSize(),
                "noisy_correct": noisy == self.noisy_labels, "noisy_acc": float(np.mean(noisy == self.noisy_labels)),
                "noisy_agree": float(np.mean(noisy == self.ref[NOISY].argmax(axis=1)))}


def run() -> list[dict]:
    from onnxcompress.datasets import bundled_model_path, digits_feeds

    rows = []
    for name in MODELS:
        path = str(bundled_model_path(name))
        fp32 = onnx.load(path)
        score = Scorer(fp32)
        gemms = tuple(n.name for n in fp32.graph.node if n.op_type == "Gemm")  # onnxruntime quantizes MatMul only
        calib = digits_feeds(fp32, "calib")
        for block in (32, 64, 128):
            for level in (0, 4):
                ort_m = ort_model(path, block, level)
                ort_s = score(ort_m)
                row = {"model": name, "block": block, "level": level, "ort": ort_s,
                       "fp32_noisy_acc": float(np.mean(score.ref[NOISY].argmax(axis=1) == score.noisy_labels))}
                built = {f"{m}/{b}": our_model(path, block, level, m, b) for m, b in VARIANTS}
                for key, model in built.items():
                    row[key] = score(model)
                row["ort layers"] = score(our_model(path, block, level, "rtn", 4, exclude=gemms))
                row["with data"] = score(our_model(path, block, level, "auto", 8, data=calib))
                row["default"] = d = row["rtn/8" if block < HQQ_MIN_BLOCK else "hqq/8"]
                if name == "transformer":
                    row["latency"] = timings({"fp32": fp32, "ort": ort_m, "rtn/8": built["rtn/8"],
                                              "hqq/8": built["hqq/8"]})
                row["b"] = int(np.sum(ort_s["correct"] & ~d["correct"]))
                row["c"] = int(np.sum(~ort_s["correct"] & d["correct"]))
                rows.append(row)
                print({k: (v["acc"] if isinstance(v, dict) and "acc" in v else v) for k, v in row.items()}, flush=True)
    return rows


def render(rows: list[dict], command: str) -> str:
    cols = [f"{m}/{b}" for m, b in VARIANTS] + ["ort layers", "with data"]
    out = ["### int4 across block sizes", "",
           f"Machine: {machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
           f"Command: `{command}`.", "",
           "Accuracy on the fixed 450-sample test split. `--int4` without calibration data, the input layer in 8 "
           "bits (`/8`, the default) or 4 (`/4`): `rtn` rounds to nearest (the default at block 32), `hqq` "
           "optimizes the zero points (half-quadratic, the default from block 64), `search` is the per-block "
           "clipping search; `ort layers`: `rtn/4` on only the layers onnxruntime quantizes (MatMul; "
           "its quantizer leaves Gemm in float, so on the MLP, whose layers are all Gemm, its output is the fp32 "
           "model); `with data`: the default `--int4` given the 256 calibration samples (GPTQ). **Bold**: below "
           "onnxruntime.", "",
           "| model | block | accuracy level | onnxruntime RTN | " + " | ".join(cols) + " |",
           "|---|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"**{r[c]['acc']:.4f}**" if r[c]["acc"] < r["ort"]["acc"] - 1e-9 else f"{r[c]['acc']:.4f}"
                 for c in cols]
        out.append(f"| {r['model']} | {r['block']} | {r['level']} | {r['ort']['acc']:.4f} | " + " | ".join(cells) + " |")
    out += ["", "Against fp32, onnxruntime RTN / the default (`rtn/8` at block 32, `hqq/8` from 64) / `with data`: logit mean squared error on the "
            "train split (1091 samples held out from both the test split and the calibration data), samples whose "
            "top-1 class differs from fp32's (train; test), file bytes; "
            "and the paired test comparison of the default with onnxruntime (`b/c`: samples only onnxruntime / "
            "only ours gets right; exact two-sided McNemar p); and the held-out logit MSE and file bytes of `rtn/8` "
            "(the default at block 32; what hqq replaced from 64).", "",
            "| model | block | level | held-out logit MSE | top-1 changed vs fp32: held-out; test | file bytes | b/c "
            "| McNemar p | rtn/8 MSE; bytes |",
            "|---|---|---|---|---|---|---|---|---|"]
    misses, data_misses = [], []
    for r in rows:
        o, d, g = r["ort"], r["default"], r["with data"]
        p = mcnemar_p(r["b"], r["c"])
        out.append(f"| {r['model']} | {r['block']} | {r['level']} | {o['val_mse']:.4f} / {d['val_mse']:.4f} / "
                   f"{g['val_mse']:.4f} | {o['val_flips']} / {d['val_flips']} / {g['val_flips']}; {o['flips']} / "
                   f"{d['flips']} / {g['flips']} | {o['bytes']:,} / {d['bytes']:,} / {g['bytes']:,} | {r['b']}/{r['c']} "
                   f"| {p:.2f} | {r['rtn/8']['val_mse']:.4f}; {r['rtn/8']['bytes']:,} |")
        if d["acc"] < o["acc"] - 1e-9:
            misses.append(f"{r['model']} block {r['block']} level {r['level']} ({d['acc']:.4f} vs {o['acc']:.4f}, "
                          f"{r['b']}/{r['c']} discordant, p = {p:.2f}; logit MSE {d['val_mse']:.4f} vs "
                          f"{o['val_mse']:.4f})")
        if g["acc"] < o["acc"] - 1e-9:
            data_misses.append(f"{r['model']} block {r['block']} level {r['level']} ({g['acc']:.4f} vs {o['acc']:.4f}; "
                               f"logit MSE {g['val_mse']:.4f} vs {o['val_mse']:.4f})")
    out += ["", "The default is below onnxruntime's RTN on the test split at: "
            + ("; ".join(misses) if misses else "none") + ".",
            "", "With calibration data (`with data`) it is below at: "
            + ("; ".join(data_misses) if data_misses else "none") + "."]
    return "\n".join(out + render_flips(rows) + render_noisy(rows) + render_latency(rows)) + "\n"


def render_noisy(rows: list[dict]) -> list[str]:
    """Accuracy on the noisy population, where 27,450 samples can tell apart what 450 cannot."""
    n = 450 * (NOISY_COPIES + 1)
    out = ["", f"The test split and {NOISY_COPIES} noisy copies of it (`datasets.noisy_test_feeds`: every pixel + "
           f"N(0, 2²) levels, rounded, clipped to 0..16; {n:,} samples): accuracy and top-1 agreement with fp32 for "
           "onnxruntime RTN / the default / with data, and the paired comparison with onnxruntime of the default, "
           "of `rtn/8` (the default at block 32; what hqq replaced from 64) and of with data "
           "(`b/c`: samples only onnxruntime / only ours gets right; exact McNemar p).", "",
           "| model | block | level | fp32 | accuracy | agreement with fp32 | default vs onnxruntime | rtn/8 vs "
           "onnxruntime | with data vs onnxruntime |", "|---|---|---|---|---|---|---|---|---|"]
    significant = {(k, side): [] for k in ("default", "rtn/8", "with data") for side in ("below", "above")}
    for r in rows:
        o, d, g = r["ort"], r["default"], r["with data"]
        pairs = []
        for name, s in (("default", d), ("rtn/8", r["rtn/8"]), ("with data", g)):
            b, c = int(np.sum(o["noisy_correct"] & ~s["noisy_correct"])), int(np.sum(~o["noisy_correct"] & s["noisy_correct"]))
            p = mcnemar_p(b, c)
            pairs.append(f"{b}/{c}, p = {p:.3f}")
            if p < 0.05:
                significant[(name, "below" if b > c else "above")].append(
                    f"{r['model']} block {r['block']} level {r['level']} ({s['noisy_acc']:.4f} vs {o['noisy_acc']:.4f}, "
                    f"p = {p:.3f})")
        out.append(f"| {r['model']} | {r['block']} | {r['level']} | {r['fp32_noisy_acc']:.4f} | {o['noisy_acc']:.4f} / "
                   f"{d['noisy_acc']:.4f} / {g['noisy_acc']:.4f} | {o['noisy_agree']:.4f} / {d['noisy_agree']:.4f} / "
                   f"{g['noisy_agree']:.4f} | {pairs[0]} | {pairs[1]} | {pairs[2]} |")
    out.append("")
    for (name, side), where in significant.items():
        out.append(f"- `{name}` significantly {side} onnxruntime (p < 0.05): {'; '.join(where) if where else 'nowhere'}.")
    return out


def render_flips(rows: list[dict]) -> list[str]:
    """Which test samples each tool moves off fp32's class, and how close to a class boundary they were.

    A sample's margin is fp32's top-1 logit minus its runner-up; its rank orders the 450 test samples
    by margin (#1: the smallest). A small error can only flip a sample of small margin, so the margins
    of the flipped samples show how far each tool moves the logits where it matters."""
    def cell(s: dict) -> str:
        return ", ".join(f"{i} ({m:.2f}, #{k})" for i, m, k in s["flipped"]) or "none"

    out = ["", "Test samples whose top-1 class differs from fp32's: `index (fp32 margin, rank)`, where the margin "
           "is fp32's top-1 logit minus its runner-up and the rank orders the 450 test samples by margin (#1: the "
           "one closest to a class boundary).", "",
           "| model | block | level | onnxruntime RTN | default | with data |", "|---|---|---|---|---|---|"]
    worst = {c: 0 for c in ("ort", "default", "with data")}
    for r in rows:
        if not any(r[c]["flipped"] for c in worst):
            continue
        out.append(f"| {r['model']} | {r['block']} | {r['level']} | " + " | ".join(cell(r[c]) for c in worst) + " |")
        for c in worst:
            worst[c] = max([worst[c]] + [k for _, _, k in r[c]["flipped"]])
    out += ["", "Largest margin rank of a flipped test sample over all rows: onnxruntime RTN #{}, default #{}, with "
            "data #{}.".format(*worst.values())]
    return out


def render_latency(rows: list[dict]) -> list[str]:
    out = ["", "Transformer latency against fp32 (one thread; batch 1 / batch 64; interleaved rounds, fastest kept): "
           "onnxruntime RTN, `rtn/8` and `hqq/8` (hqq adds ReduceSum (after a Reshape, and a Pad for a ragged block, "
           "when a column has several blocks), FusedMatMul and Add per layer).", "",
           "| block | level | onnxruntime RTN | rtn/8 | hqq/8 |", "|---|---|---|---|---|"]
    for r in rows:
        if "latency" in r:
            lat = r["latency"]
            out.append(f"| {r['block']} | {r['level']} | " + " | ".join(
                f"{lat[k][0]:.2f} / {lat[k][1]:.2f}" for k in ("ort", "rtn/8", "hqq/8")) + " |")
    return out


def main(argv=None) -> int:
    return docs_main("int4_block_sizes", SECTION, __doc__, lambda command: render(run(), command), argv)


if __name__ == "__main__":
    raise SystemExit(main())
