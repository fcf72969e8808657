"""``onnxcompress transfer SRC DST OUT``: transplant SRC's trained weights into DST.

Exit codes as for the main command; with ``--strict`` any destination weight left unmatched is an
error (exit 3). After writing, OUT is verified against SRC (same outputs within float rounding)
when every destination weight was matched, unless ``--no-verify``.
"""

from __future__ import annotations

import argparse
import json
import sys

from onnxcompress.errors import ParityError, PreconditionError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from onnxcompress.cli import Parser

    p = Parser(
        prog="onnxcompress transfer",
        description="Copy trained weights from SRC into DST (by name, then by graph position and shape; "
                    "through DST's recorded plan when DST was compressed) and write OUT.",
    )
    p.add_argument("source", help="the model whose weights are copied (SRC)")
    p.add_argument("destination", help="the model that receives them (DST)")
    p.add_argument("output", help="where to write the result (OUT)")
    p.add_argument("--no-position", dest="by_position", action="store_false",
                   help="match by name only (no graph-position matching)")
    p.add_argument("--strict", action="store_true", help="fail when a destination weight is not matched")
    p.add_argument("--calib-data", metavar="FILE|DIR",
                   help="feeds (.npz, samples stacked on axis 0, or a folder of .npz): recalibrate a quantized DST's "
                        "activation ranges for the new weights, and run the check on them instead of random inputs")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check OUT against SRC with onnxruntime when every weight matched (default: on): within float "
                        "rounding, or, when DST was compressed lossily (re-quantized weights, a replayed pruning "
                        "plan), within the lossy budget (cosine >= 0.98; with --calib-data also top-1 >= 0.9)")
    p.add_argument("--report", metavar="FILE", help="write the transfer report (JSON) here")
    p.add_argument("-v", "--verbose", action="count", default=0, help="tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def main(argv: list[str]) -> int:
    from onnxcompress.cli import _setup_logging, run_guarded

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return run_guarded(lambda: _run(args), bool(args.verbose))


def lossy_reason(rep) -> str:
    """Why OUT cannot reproduce SRC within float rounding (DST was compressed lossily), or ''."""
    parts = [f"{len(rep.requantized)} weight(s) re-quantized on DST's grid" if rep.requantized else "",
             f"{len(rep.plan_replayed)} channel group(s) of DST's pruning plan replayed" if rep.plan_replayed else "",
             f"{len(rep.by_plan)} weight(s) sliced through DST's plan" if rep.by_plan and not rep.plan_replayed else ""]
    return "; ".join(p for p in parts if p)


def _run(args) -> int:
    from onnxcompress.graph.io import open_model, save, write_text_atomic
    from onnxcompress.transfer.transplant import transplant

    from onnxcompress.cli import check_side_file

    data_paths = [args.calib_data] if args.calib_data else []
    check_side_file("OUT", args.output, data_paths, overlap_only=True)
    check_side_file("--report", args.report, [args.source, args.destination, args.output, *data_paths])
    src = open_model(args.source)
    dst = open_model(args.destination)
    check_side_file("--report", args.report, [*src.data_files, *dst.data_files])
    model, rep = transplant(src, dst, by_position=args.by_position, data=args.calib_data)
    unmatched = rep.unmatched_dst + rep.ambiguous + [m["tensor"] for m in rep.mismatched] + rep.encoded
    if args.strict and unmatched:
        raise PreconditionError(f"{len(unmatched)} destination weights were not matched: "
                                f"{', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''}",
                                where="transfer", hint="see --report for details, or drop --strict")
    parity = None
    lossy = lossy_reason(rep)
    if args.verify and not unmatched:
        from onnxcompress.verify import LOSSLESS, LOSSY, LOSSY_RANDOM, compare_models

        budget = LOSSLESS if not lossy else (LOSSY if args.calib_data else LOSSY_RANDOM)
        parity = compare_models(src.model, model, tolerance=budget, inputs=args.calib_data,
                                ref_base_dir=src.base_dir, cand_base_dir=dst.base_dir)
    if args.report:  # written whether or not the check passes: the hint below points to it
        d = rep.to_dict()
        d["parity"] = parity.to_dict() if parity is not None else None
        write_text_atomic(args.report, json.dumps(d, indent=2) + "\n")
    if parity is not None and not parity.passed:
        if lossy:
            raise ParityError(f"the result is further from SRC's outputs than the lossy budget allows ({lossy})",
                              parity=parity, where="transfer",
                              hint="check --report; give --calib-data to recalibrate a quantized DST for the new "
                                   "weights and to check on real data, or judge OUT with tools/compare.py SRC OUT "
                                   "--inputs data.npz and your own budget")
        raise ParityError("the result does not reproduce SRC's outputs", parity=parity, where="transfer",
                          hint="the two graphs compute different functions (check --report); if DST was compressed "
                               "lossily in a way not recorded in it, its result cannot match SRC exactly: use "
                               "--no-verify and check it with tools/compare.py SRC OUT --min-cosine 0.98")
    save(model, args.output, base_dir=dst.base_dir,
         protected=(args.source, args.destination, *src.data_files, *dst.data_files))
    if not args.quiet:
        print(f"{args.source} -> {args.destination} -> {args.output}")
        print(rep.summary())
        if parity is not None:
            if lossy:
                print(f"checked within the lossy budget: {lossy}")
            print(parity.summary())
        elif unmatched:
            print("not verified: some destination weights kept their own values", file=sys.stdout)
    return 0
