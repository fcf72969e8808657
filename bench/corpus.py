"""Corpus sweep: every model that ships with the onnx wheel (and the bundled models) through every
lossless pass, the lossless prefix as a whole, and every lossy preset registered in
``onnxcompress.recipes.PRESETS`` when this runs.

For each (model, recipe) the outcome is one of

* ``ok``       the output passes ``onnx.checker.check_model``, loads in stock onnxruntime (CPU EP,
               default optimizations) and meets the budget: lossless recipes within
               ``max|ref - out| <= 1e-7 + 1e-4 * max|ref|`` per output against the original model run
               by onnxruntime with optimizations off, on the model's own test inputs (``.pb`` test data)
               or seeded random feeds; lossy presets within their own parity policy (compress()'s
               verification, fed the same inputs);
* ``n/a``      the pass had nothing to do here (graph unchanged, no skip);
* ``declined`` the pass refused with a reason (a PreconditionError, or unchanged with skips), or a
               lossy preset refused the model's own test inputs as calibration data (NaN, empty);
* ``parity``   a lossy preset's result missed its parity budget: compress() refuses to save it (the CLI
               exits 1 and writes nothing) — the safety net working, the technique not fitting the model;
* ``FAIL``     anything else: an exception, an invalid model, a load failure, a lossless parity failure.

Separately, ``matches .pb`` says whether the compressed model also reproduces the test data's
expected outputs (rtol 1e-3, atol 1e-7 as the onnx backend tests use) where the original does.

    python bench/corpus.py                  # the whole sweep, prints the table
    python bench/corpus.py --write-docs     # ... and writes it into docs/benchmarks.md (corpus section)
    python bench/corpus.py --models light_squeezenet test_gru_basic --recipes lossless

``tests/test_corpus.py`` imports this module (a fast subset in CI, everything behind ``-m slow``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnxcompress as oc  # noqa: E402
from onnxcompress.errors import CalibrationError, OnnxCompressError, PreconditionError  # noqa: E402
from onnxcompress.recipe import Recipe, VerifyConfig  # noqa: E402

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
SUITES = ("light", "pytorch-converted", "pytorch-operator", "simple", "real")
ATOL, RTOL = 1e-7, 1e-4
MIN_OPSET = 7


# ----------------------------------------------------------------------------------------------
# the corpus


@dataclass
class Case:
    """One corpus model: where it is, what to feed it, and what it should answer (if known)."""

    name: str
    suite: str
    path: Path
    feeds: list[dict[str, Any]] = field(default_factory=list)  # empty: seeded random feeds
    expected: list[list[Any]] = field(default_factory=list)    # per feed, per output (may be empty)
    converted: bytes | None = None  # opset < 7: the model after onnx.version_converter (what we compress)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # per-case results shared by all recipes

    @property
    def source(self) -> str | bytes:
        return self.converted if self.converted is not None else str(self.path)


def _read_value(path: Path, type_proto: onnx.TypeProto) -> Any:
    """A ``.pb`` test value as numpy (tensor), list (sequence) or None/array (optional)."""
    data = path.read_bytes()
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return onnx.numpy_helper.to_list(seq)
    if kind == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return onnx.numpy_helper.to_optional(opt)
    t = onnx.TensorProto()
    t.ParseFromString(data)
    return onnx.numpy_helper.to_array(t)


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _index(p: Path) -> int:
    return int(re.findall(r"\d+", p.stem)[-1])


def _dir_case(folder: Path, suite: str) -> Case | None:
    path = folder / "model.onnx"
    if not path.exists():
        return None
    model = onnx.load(str(path), load_external_data=False)
    ins, outs = _real_inputs(model), list(model.graph.output)
    case = Case(folder.name, suite, path)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        # onnxcompress refuses opset < 7 with the hint to convert (onnxruntime only guarantees 7+); follow it
        case.converted = onnx.version_converter.convert_version(onnx.load(str(path)), MIN_OPSET).SerializeToString()
    for ds in sorted(folder.glob("test_data_set_*")):
        in_files = sorted(ds.glob("input_*.pb"), key=_index)
        out_files = sorted(ds.glob("output_*.pb"), key=_index)
        if len(in_files) != len(ins):
            continue
        case.feeds.append({v.name: _read_value(f, v.type) for v, f in zip(ins, in_files)})
        case.expected.append([_read_value(f, v.type) for v, f in zip(outs, out_files)]
                             if len(out_files) == len(outs) else [])
    return case


def discover(suites: tuple[str, ...] = SUITES, *, bundled: bool = True) -> tuple[list[Case], list[str]]:
    """Every corpus model present, and notes about what is absent."""
    cases, notes = [], []
    for suite in suites:
        root = DATA / suite
        if not root.is_dir():
            notes.append(f"{suite}/: not in this onnx wheel")
            continue
        if suite == "light":
            cases += [Case(p.stem, suite, p) for p in sorted(root.glob("*.onnx"))]
            continue
        absent = 0
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            c = _dir_case(folder, suite)
            if c is None:
                absent += 1
            else:
                cases.append(c)
        if absent:
            notes.append(f"{suite}/: {absent} model folders hold no model.onnx (downloaded on demand; "
                         "the light/ models stand in for them)")
    if bundled:
        for p in sorted((ROOT / "models").glob("*.onnx")):
            cases.append(Case(p.stem, "bundled", p))
    return cases, notes


# ----------------------------------------------------------------------------------------------
# recipes


def recipes() -> dict[str, Callable[[], Recipe]]:
    """Each lossless pass alone, the lossless prefix, and each registered preset (lossy ones)."""
    from onnxcompress.passes.registry import pass_classes
    from onnxcompress.recipes import PRESETS, default_recipe, preset_recipe

    out: dict[str, Callable[[], Recipe]] = {}
    for cls in pass_classes():
        if cls.lossless:
            out[cls.config_cls.name] = (lambda c=cls.config_cls: Recipe(steps=(c(),)))
    out["lossless"] = default_recipe
    for pre in PRESETS:
        out[f"--{pre.flag.lstrip('-')}"] = (lambda n=pre.name: preset_recipe([n]))
    return out


def is_lossless(recipe: Recipe) -> bool:
    from onnxcompress.passes.registry import make_pass

    return all(make_pass(s).lossless for s in recipe.steps)


# ----------------------------------------------------------------------------------------------
# one run


@dataclass
class Outcome:
    status: str            # ok | n/a | declined | parity | FAIL | skip (the original itself does not run here)
    reason: str = ""
    matches_pb: bool | None = None
    seconds: float = 0.0


def _session(model: str | bytes, optimize: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def feeds_for(case: Case) -> list[dict[str, Any]]:
    if case.feeds:
        return case.feeds
    if "random" not in case.cache:
        from onnxcompress.data import random_feeds

        case.cache["random"] = [random_feeds(case.source, seed=0, batch=2)]
    return case.cache["random"]


def original_runs(case: Case) -> str | None:
    """None when onnxruntime runs the original model on its feeds here, else why not (computed once;
    the reference outputs, unoptimized CPU, are kept for every recipe)."""
    if "why" not in case.cache:
        try:
            sess = _session(case.source, optimize=False)
            case.cache["reference"] = [sess.run(None, feed) for feed in feeds_for(case)]
            case.cache["why"] = None
        except Exception as e:
            case.cache["why"] = "the original does not run in onnxruntime here: " + " ".join(str(e).split())[:160]
    return case.cache["why"]


def _flat(v: Any) -> list[np.ndarray]:
    if v is None:
        return []
    if isinstance(v, list):
        return [np.asarray(x) for x in v]
    return [np.asarray(v)]


def close(ref: Any, out: Any, *, atol: float = ATOL, rtol: float = RTOL) -> str | None:
    """None when ``out`` matches ``ref`` (``max|ref-out| <= atol + rtol*max|ref|``), else why not."""
    a, b = _flat(ref), _flat(out)
    if len(a) != len(b):
        return f"{len(b)} values instead of {len(a)}"
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return f"shape {y.shape} instead of {x.shape}"
        if x.dtype.kind in "OSU" or y.dtype.kind in "OSU":
            if not np.array_equal(x, y):
                return "string values differ"
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        if not np.array_equal(np.isnan(x64), np.isnan(y64)):
            return "NaN positions differ"
        fin = ~np.isnan(x64)
        err = float(np.max(np.abs(x64[fin] - y64[fin]), initial=0)) if fin.any() else 0.0
        bound = atol + rtol * float(np.max(np.abs(x64[fin & np.isfinite(x64)]), initial=0))
        if not err <= bound:
            return f"max abs error {err:.3g} > {bound:.3g}"
    return None


def run_case(case: Case, recipe: Recipe, tmp: Path) -> Outcome:
    """Compress ``case`` with ``recipe``, save, check, reload in stock onnxruntime and compare."""
    t0 = time.perf_counter()
    lossless = is_lossless(recipe)
    why = original_runs(case)
    if why:
        return Outcome("skip", why, seconds=time.perf_counter() - t0)
    feeds = feeds_for(case)
    try:
        if lossless:
            result = oc.compress(case.source, recipe.replace(verify=VerifyConfig(enabled=False)))
        else:
            result = oc.compress(case.source, recipe, data=feeds)
    except PreconditionError as e:
        return Outcome("declined", str(e), seconds=time.perf_counter() - t0)
    except CalibrationError as e:  # the model's own test inputs are not usable calibration data (NaN, empty)
        return Outcome("declined", f"calibration data refused: {e}", seconds=time.perf_counter() - t0)
    except OnnxCompressError as e:
        return Outcome("FAIL", f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
    except Exception as e:  # a crash is what this sweep exists to find
        return Outcome("FAIL", f"crash {type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
    steps = result.report.steps
    modified = any(s.modified for s in steps)
    skips = [sk for s in steps for sk in s.skipped]
    if not result.passed:  # lossless: a bug; lossy: the technique does not fit here, nothing would be written
        return Outcome("FAIL" if lossless else "parity", f"parity: {result.parity.summary()}",
                       seconds=time.perf_counter() - t0)
    out = tmp / f"{case.name}.onnx"
    try:
        result.save(out)
        onnx.checker.check_model(str(out))
        cand = _session(str(out), optimize=True)
    except Exception as e:
        return Outcome("FAIL", f"output invalid: {type(e).__name__}: {' '.join(str(e).split())[:200]}",
                       seconds=time.perf_counter() - t0)
    matches = None
    for i, feed in enumerate(feeds):
        try:
            got = cand.run(None, feed)
        except Exception as e:
            return Outcome("FAIL", f"output does not run: {' '.join(str(e).split())[:200]}",
                           seconds=time.perf_counter() - t0)
        if lossless:
            want = case.cache["reference"][i]
            for name, w, g in zip([o.name for o in cand.get_outputs()], want, got):
                why = close(w, g)
                if why:
                    return Outcome("FAIL", f"output {name!r}: {why}", seconds=time.perf_counter() - t0)
            expected = case.expected[i] if i < len(case.expected) else []
            if expected and all(close(e, w, atol=1e-7, rtol=1e-3) is None for e, w in zip(expected, want)):
                ok = all(close(e, g, atol=1e-7, rtol=1e-3) is None for e, g in zip(expected, got))
                matches = ok if matches is None else (matches and ok)
    if not modified:
        status = "declined" if skips else "n/a"
        reason = f"{skips[0]['rule']}: {skips[0]['reason']}" if skips else ""
        return Outcome(status, reason, matches, time.perf_counter() - t0)
    return Outcome("ok", "; ".join(c for s in steps for c in s.changes)[:200], matches, time.perf_counter() - t0)


def sweep(cases: list[Case], names: list[str] | None = None, *, progress: bool = False
          ) -> dict[tuple[str, str], Outcome]:
    table = recipes()
    chosen = {k: v for k, v in table.items() if names is None or k in names}
    results: dict[tuple[str, str], Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="onnxcompress-corpus-") as d:
        for case in cases:
            for rname, make in chosen.items():
                with contextlib.ExitStack():
                    results[(case.name, rname)] = run_case(case, make(), Path(d))
                if progress:
                    o = results[(case.name, rname)]
                    print(f"{case.suite:18s} {case.name:40s} {rname:22s} {o.status:8s} {o.seconds:6.2f}s "
                          f"{o.reason[:120] if o.status == 'FAIL' else ''}", file=sys.stderr, flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# the table


def markdown(cases: list[Case], results: dict[tuple[str, str], Outcome], notes: list[str], command: str,
             seconds: float) -> str:
    names = list(dict.fromkeys(r for _, r in results))
    counts = Counter(o.status for o in results.values())
    lines = [
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}, "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, onnxcompress {oc.__version__}. "
        f"Date: {datetime.date.today().isoformat()}. Command: `{command}` ({seconds:.0f} s).",
        "",
        f"{len(cases)} models × {len(names)} recipes = {len(results)} runs: "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "n/a", "declined", "parity", "FAIL", "skip")) + ".",
        "`ok`: changed, valid, loads in stock onnxruntime, within budget (lossless: 1e-4 relative against the "
        "original); `n/a`: nothing to do; `declined`: refused with a reason; `parity`: a lossy preset missed its "
        "budget, so compress() refuses to save it (exit 1, nothing written); `FAIL`: a crash, an invalid model or "
        "a lossless mismatch; `skip`: the original model itself does not run in onnxruntime here.",
    ]
    if "lossless" in names:
        ll = [o.status for (_, r), o in results.items() if r == "lossless"]
        good = sum(st in ("ok", "n/a", "declined") for st in ll)
        lines.append(f"Lossless prefix (all lossless passes): {good} of {len(ll)} models load, pass, save, reload in "
                     f"stock onnxruntime and match the original within 1e-4 relative; {ll.count('skip')} cannot be "
                     f"checked here (the original does not run); {ll.count('FAIL')} FAIL.")
    conv = sum(1 for c in cases if c.converted is not None)
    if conv:
        lines.append(f"{conv} opset-6 models were first converted to opset {MIN_OPSET} with "
                     "onnx.version_converter (onnxcompress refuses opset < 7 with that hint).")
    skips = sorted({o.reason for o in results.values() if o.status == "skip"})
    lines += [f"Skip reason: {r}" for r in skips[:5]]
    pb = [o.matches_pb for o in results.values() if o.matches_pb is not None]
    if pb:
        lines.append(f"Where the original reproduces its `.pb` test outputs, the compressed model does too in "
                     f"{sum(pb)} of {len(pb)} runs.")
    lines += [f"Note: {n}." for n in notes]
    lines += ["", "| suite | model | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for c in cases:
        cells = [results[(c.name, n)].status for n in names if (c.name, n) in results]
        lines.append(f"| {c.suite} | {c.name} | " + " | ".join(cells) + " |")
    fails = [(k, o) for k, o in results.items() if o.status == "FAIL"]
    if fails:
        lines += ["", "Failures:", ""] + [f"- {m} × {r}: {' '.join(o.reason.split())[:300]}" for (m, r), o in fails]
    by_recipe = Counter(r for (_, r), o in results.items() if o.status == "parity")
    if by_recipe:
        lines += ["", "Parity refusals by preset: " + ", ".join(f"{r} {n}" for r, n in by_recipe.items()) + "."]
    return "\n".join(lines) + "\n"


def write_docs(text: str, section: str = "corpus") -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    s = doc.read_text()
    start, end = f"<!-- section: {section} -->", f"<!-- end: {section} -->"
    i, j = s.index(start) + len(start), s.index(end)
    doc.write_text(s[:i] + "\n## Corpus sweep\n\n" + text + s[j:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="only these model names")
    ap.add_argument("--recipes", nargs="*", help=f"only these recipes (of: {', '.join(recipes())})")
    ap.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = ap.parse_args(argv)
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    cases, notes = discover()
    if args.models:
        cases = [c for c in cases if c.name in set(args.models)]
    t0 = time.perf_counter()
    results = sweep(cases, args.recipes, progress=True)
    command = "python bench/corpus.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = markdown(cases, results, notes, command.replace(" --write-docs", ""), time.perf_counter() - t0)
    print(text)
    if args.write_docs:
        write_docs(text)
    return 1 if any(o.status == "FAIL" for o in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
