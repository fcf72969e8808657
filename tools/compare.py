#!/usr/bin/env python3
"""Compare two ONNX models' outputs with onnxruntime: a thin wrapper over ``onnxcompress.verify``.

    python tools/compare.py REF CAND [--inputs data.npz|dir] [--shape name:1x3x224x224 ...]
        [--providers cpu,cuda] [--atol A --rtol R --min-cosine C --min-top1 T --max-steps K --step S]
        [--layers] [--json F] [--seed N] [--batch N] [-q] [-v]

The reference is REF on the CPU provider with graph optimizations off; CAND runs on each provider
with default optimizations. Without tolerance flags the LOSSLESS policy applies
(``max|r - c| ≤ 1e-5 + 1e-4 · max|r|``); a flag replaces its own criterion of it, as in
``onnxcompress`` (``onnxcompress.verify.tolerance.overridden``): ``--min-cosine``/``--min-top1``
check the task metrics instead of the bound, ``--max-steps`` the quantization-step bound, ``--atol``
or ``--rtol`` one side of the bound. A failure
under that default budget, or on seeded random inputs, ends with a hint on stderr (a lossy budget;
``--inputs`` with data like the model's own).

Exit codes: 0 parity passed; 1 parity failed; 2 usage error (bad flags, missing files, bad inputs);
3 a model onnxruntime cannot load; 4 internal error. Errors are one line on stderr with a hint; ``-v``
adds the traceback and info logging.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

try:
    import onnxcompress  # noqa: F401
except ImportError:  # a checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxcompress.data import parse_shape_args  # noqa: E402
from onnxcompress.errors import OnnxCompressError  # noqa: E402
from onnxcompress.verify import LOSSLESS, Tolerance, compare_models  # noqa: E402
from onnxcompress.verify.tolerance import overridden  # noqa: E402

EXIT_USAGE = 2
EXIT_INTERNAL = 4
_TOLERANCE_FLAGS = ("atol", "rtol", "min_cosine", "min_top1", "max_steps", "step")


class _UsageError(Exception):
    """A command-line mistake: exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit 2 itself, with the usage block
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="compare.py",
        description="Compare a candidate ONNX model against a reference with onnxruntime.",
    )
    parser.add_argument("ref", metavar="REF", help="reference model (.onnx)")
    parser.add_argument("cand", metavar="CAND", help="candidate model (.onnx)")
    parser.add_argument("--inputs", metavar="PATH", help=".npz (samples stacked on axis 0) or a folder of .npz feeds")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS",
                        help="shape of a random input, e.g. input:1x3x224x224 (repeatable)")
    parser.add_argument("--providers", default="cpu", metavar="LIST", help="comma separated, e.g. cpu,cuda")
    parser.add_argument("--atol", type=float, help="absolute tolerance")
    parser.add_argument("--rtol", type=float, help="tolerance relative to max|reference|")
    parser.add_argument("--min-cosine", type=float, help="minimum cosine similarity per output")
    parser.add_argument("--min-top1", type=float, help="minimum top-1 agreement for classifier outputs")
    parser.add_argument("--max-steps", type=float, help="maximum error in output quantization steps")
    parser.add_argument("--step", type=float, help="the output quantization step (default: read from CAND)")
    parser.add_argument("--layers", action="store_true", help="compare shared intermediate tensors too")
    parser.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random feed (default 0)")
    parser.add_argument("--batch", type=int, default=1, help="batch of the random feed (default 1)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the verdict")
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks and info logging")
    return parser


def _tolerance(args: argparse.Namespace) -> Tolerance:
    given = {name: getattr(args, name) for name in _TOLERANCE_FLAGS if getattr(args, name) is not None}
    return overridden(LOSSLESS, **given)


def _check_paths(args: argparse.Namespace) -> None:
    for label, path in (("REF", args.ref), ("CAND", args.cand)):
        if not Path(path).is_file():
            raise _UsageError(f"{label} model {path!r} does not exist (hint: check the path)")
    if args.inputs is not None and not Path(args.inputs).exists():
        raise _UsageError(f"--inputs {args.inputs!r} does not exist (hint: an .npz file or a folder of .npz files)")


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        _check_paths(args)
        report = compare_models(
            args.ref,
            args.cand,
            inputs=args.inputs,
            shapes=parse_shape_args(args.shape) or None,
            providers=args.providers,
            tolerance=_tolerance(args),
            seed=args.seed,
            batch=args.batch,
            layers=args.layers,
        )
    except _UsageError as exc:
        print(f"compare.py: error: {exc}", file=sys.stderr)
        if "hint" not in str(exc):
            print("usage: " + parser.format_usage().split("usage: ", 1)[-1].strip(), file=sys.stderr)
        return EXIT_USAGE
    except OnnxCompressError as exc:
        if verbose:
            traceback.print_exc()
        print(f"compare.py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug: say so in one line, the traceback with -v
        if verbose:
            traceback.print_exc()
        print(f"compare.py: internal error: {type(exc).__name__}: {exc} (hint: rerun with -v and report it)", file=sys.stderr)
        return EXIT_INTERNAL

    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        except OSError as exc:
            print(f"compare.py: error: cannot write --json {args.json!r}: {exc.strerror} (hint: check the folder)", file=sys.stderr)
            return EXIT_USAGE
    if args.quiet:
        print(report.summary().splitlines()[0])
    else:
        print(report.summary())
        if not report.passed:
            for hint in _failure_hints(args):
                print(f"hint: {hint}", file=sys.stderr)
    return 0 if report.passed else 1


def _failure_hints(args) -> list[str]:
    """What to try when parity failed under a setting that only suits some candidates."""
    hints = []
    if not any(getattr(args, f) is not None for f in _TOLERANCE_FLAGS):
        hints.append("the budget was lossless (no tolerance flag); a quantized, pruned or shared candidate is judged "
                     "by a lossy one, e.g. --min-cosine 0.98 --min-top1 0.9")
    if not args.inputs:
        hints.append("the inputs were seeded random values, out of distribution for a model calibrated or pruned on "
                     "real data; compare on data like its own with --inputs DATA.npz")
    return hints


if __name__ == "__main__":
    sys.exit(run())
