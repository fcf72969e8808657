"""Where the channels come from: one structured-pruning budget spent on different layers of the digits CNN.

``--prune-channels 0.5`` removes half of the channels of every dependency group. On the bundled
digits CNN (groups: the 16-channel stem + residual stream, the residual block's 16-channel inner
conv, the strided 32-channel conv) that is 32 of 64 channels, and onnxruntime runs it only ~1.55x
faster at batch 64 (``bench/prune_structured.py``): its NCHWc convolutions compute output channels in
blocks of 16 (AVX-512), so an 8-channel layer costs what a 16-channel one does on its output side,
and a conv reading fewer than 16 channels takes NCHW input behind a ReorderOutput.

This script spends the same budget — 32 of the 64 channels — in other ways with
``--prune-channels-override`` (per-group ratios; L1 importance inside each group) and measures, side by
side in one run against fp32: the channels kept per group, FLOPs, what onnxruntime's layout pass makes
of the convs (output channels computed for those declared, ReorderOutput nodes), the CPU speed-up at
batch 64 (``prune_structured.speedups``: 1 thread, 10th percentile of single calls over shuffled
rounds), and digits test accuracy, without repair and after the ``distill`` repair on the 256
calibration samples. No fine-tuning.

    python bench/prune_allocation.py                 # prints the table
    python bench/prune_allocation.py --write-docs    # ... and writes it into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime

import onnx

from _docs import machine, write_section  # noqa: E402  (bench/ is on sys.path when run as a script)
from prune_structured import digits_data, make, nchwc_layout, speedups  # noqa: E402

SECTION = "prune-allocation"
# ratios of the three groups (stream, inner, strided): each removes 32 of the 64 channels
ALLOCATIONS = ((0.5, 0.5, 0.5), (0.75, 0.25, 0.5), (0.25, 0.75, 0.5), (0.5, 0.75, 0.375), (0.75, 0.5, 0.375),
               (0.75, 0.75, 0.25), (0.0, 0.5, 0.75))


def writer_names(model: onnx.ModelProto) -> list[str]:
    """One node writing each prunable group's channels, in the dependency graph's group order."""
    import onnx_graphsurgeon as gs

    from onnxcompress.prune import channels
    from onnxcompress.prune.dependency import build_dependency_graph

    dg = build_dependency_graph(gs.import_onnx(model), model)
    return [channels.writer_names(g)[0] for g in dg.groups if g.prunable and not g.blocked]


def run(args) -> tuple[list[dict], float]:
    from onnxcompress.datasets import bundled_model_path, digits_accuracy
    from onnxcompress.prune.channels import PruneChannelsConfig as Prune
    from onnxcompress.prune.channels import model_cost
    from onnxcompress.transfer.reconstruct import DistillConfig

    model = onnx.load(bundled_model_path("cnn"))
    writers = writer_names(model)
    assert len(writers) == 3, f"expected the digits CNN's three prunable groups, found {writers}"
    calib, feed = digits_data(model, args.batch)
    base = model_cost(model)
    built, rows = {"fp32": model}, []
    for ratios in ALLOCATIONS:
        overrides = tuple(f"{w}={r}" for w, r in zip(writers, ratios))
        prune = Prune(ratio=0.5, overrides=overrides)
        plain, repaired = make(model, (prune,), calib), make(model, (prune, DistillConfig()), calib)
        label = "uniform 0.5" if ratios == (0.5, 0.5, 0.5) else " / ".join(f"{r:g}" for r in ratios)
        built[label] = repaired
        widths = {t.name: t.dims[0] for t in repaired.graph.initializer}
        kept = [widths[n.input[1]] for w in writers for n in repaired.graph.node if n.name == w]
        rows.append({"label": label, "kept": kept, "flops": model_cost(repaired)["flops"] / base["flops"],
                     "layout": nchwc_layout(repaired), "acc": digits_accuracy(plain),
                     "acc_repaired": digits_accuracy(repaired)})
    speed, base_s = speedups(built, feed, rounds=args.rounds, reps=args.reps, threads=1, seconds=args.seconds)
    for r in rows:
        r["speedup"] = speed[r["label"]]
    rows.insert(0, {"label": "fp32", "kept": [16, 16, 32], "flops": 1.0, "layout": nchwc_layout(model),
                    "acc": digits_accuracy(model), "acc_repaired": None, "speedup": 1.0})
    return rows, base_s


def render(rows: list[dict], base_s: float, command: str, args) -> str:
    out = ["### Where the channels come from (digits CNN, one 50% budget)", "",
           f"Machine: {machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
           f"Command: `{command}`.", "",
           "Every row removes 32 of the CNN's 64 prunable channels (`--prune-channels 0.5` with "
           "`--prune-channels-override` per group: the ratios of the stream (stem + residual), the block's inner "
           "conv and the strided conv). NCHWc: output channels onnxruntime's optimized graph computes for those the "
           "Convs declare, and its ReorderOutput nodes. Speed-up: fp32 latency "
           f"({base_s * 1e3:.2f} ms) / variant latency at batch {args.batch}, 1 thread, 10th percentile of single "
           f"calls in shuffled rounds (at least {args.rounds} rounds of {args.reps} calls and {args.seconds:g} s). "
           "Accuracy on the 450-sample test split, without repair and after `distill` on the 256 calibration "
           "samples.", "",
           "| ratios (stream / inner / strided) | channels kept | FLOPs | NCHWc computed / declared, reorders | "
           "speed-up | accuracy | accuracy after distill |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        lay = r["layout"]
        rep = "n/a" if r["acc_repaired"] is None else f"{r['acc_repaired']:.3f}"
        out.append(f"| {r['label']} | {' / '.join(map(str, r['kept']))} | {r['flops']:.3f} | "
                   f"{lay['computed']} / {lay['declared']}, {lay['reorders']} | {r['speedup']:.2f}x | "
                   f"{r['acc']:.3f} | {rep} |")
    fast = [f"{r['label']} ({r['speedup']:.2f}x, {r['acc_repaired']:.3f} after distill)" for r in rows[1:]
            if r["speedup"] >= 1.6]
    uniform = next(r for r in rows if r["label"] == "uniform 0.5")
    out += ["", f"At or above 1.6x with 50% of the channels removed: {'; '.join(fast) or 'none'}. The uniform rule: "
            f"{uniform['speedup']:.2f}x, {uniform['acc_repaired']:.3f} after distill. Channels of the stream and the "
            "inner conv are read and written on the 8x8 maps (the strided conv's output is 4x4), so removing them "
            "saves the most time, and costs the most accuracy."]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    command = "python bench/prune_allocation.py" + (" --write-docs" if args.write_docs else "")
    rows, base_s = run(args)
    text = render(rows, base_s, command, args)
    print(text)
    if args.write_docs:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
