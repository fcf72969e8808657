"""The ``onnxcompress`` command: argparse -> Recipe -> compress -> verify -> save -> summary.

Flags are generated from the config dataclasses (one config object, three spellings: CLI flag,
recipe key, Python keyword). Precedence: a ``--recipe`` file first, then presets (``--int8`` ...),
then explicit flags. A field flag that belongs to one step adds that step; a flag shared by several
steps sets the field on those of them that are in the recipe.

Exit codes: 0 ok; 1 parity failed (nothing written unless ``--keep-failed``); 2 usage, recipe or
data error; 3 model or precondition error; 4 internal error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from onnxcompress.errors import OnnxCompressError, RecipeError

__all__ = ["main", "build_parser", "recipe_from_args", "SUBCOMMANDS", "Parser"]

log = logging.getLogger("onnxcompress")

#: ``onnxcompress NAME ...`` runs ``SUBCOMMANDS[NAME](argv)`` (lazy imports: name -> "module:function").
SUBCOMMANDS: dict[str, str] = {"transfer": "onnxcompress.transfer.cli:main"}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: ``prog: error: what (see prog --help)``, exit 2.

    argparse prints the whole usage block (some sixty lines for this command) above the error,
    which buries the one line that says what went wrong."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclasses.dataclass
class _Target:
    cls: type
    field: str


def _field_type(cls, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return tp


def _add_config_flags(group, cls, targets: dict[str, list[_Target]], owners: dict[str, type]) -> None:
    for f in fields(cls):
        flag = f.metadata.get("flag") if f.metadata else None
        if not flag:
            continue
        dest = flag.lstrip("-").replace("-", "_")
        if dest in targets:  # shared flag: one argparse option, several targets
            targets[dest].append(_Target(cls, f.name))
            owner = owners.get(dest)
            # a config derived from the owner's (refit_pruned from distill) shares its flags; the flag
            # still adds the owner's step, as before; flags shared by unrelated configs add none
            if not (owner is not None and issubclass(cls, owner)):
                owners[dest] = None
            continue
        targets[dest] = [_Target(cls, f.name)]
        owners[dest] = cls
        tp = _base_type(_field_type(cls, f.name))
        help_text = f.metadata.get("help", "")
        default_txt = f.default if not isinstance(f.default, tuple) else ",".join(map(str, f.default))
        help_text = f"{help_text} (default: {default_txt})"
        kw: dict[str, Any] = {"dest": dest, "default": None, "help": help_text}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is tuple:
            group.add_argument(flag, type=str, **kw)
        else:
            if f.metadata.get("choices") is not None:
                kw["choices"] = list(f.metadata["choices"])
            group.add_argument(flag, type={int: int, float: float}.get(tp, str), **kw)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, list[_Target]], dict[str, type]]:
    from onnxcompress import __version__
    from onnxcompress.passes.registry import pass_classes
    from onnxcompress.recipe import OutputConfig, VerifyConfig
    from onnxcompress.recipes import PRESETS

    p = Parser(
        prog="onnxcompress",
        description="Compress an ONNX model (quantize, prune, share, merge) and prove the result with onnxruntime. "
                    "With no technique flag only the lossless passes run.",
        epilog="examples:\n"
               "  onnxcompress models/mlp.onnx mlp-int8.onnx --int8 --calib-data calib.npz\n"
               "  onnxcompress in.onnx out.onnx --recipe recipe.json --report report.json\n"
               "  onnxcompress in.onnx --int8 --print-recipe > recipe.json\n"
               "exit codes: 0 ok, 1 parity failed, 2 usage/recipe/data error, 3 model error, 4 internal error",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="the model to compress (.onnx)")
    p.add_argument("output", nargs="?", help="where to write the compressed model (.onnx)")
    p.add_argument("--version", action="version", version=f"onnxcompress {__version__}")
    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", metavar="FILE", help="a recipe file (JSON, YAML or TOML); flags given too override it")
    g.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as JSON and exit")
    g.add_argument("--no-lossless", dest="lossless", action="store_false",
                   help="do not add the lossless passes (cleanup, dedupe, folding, merges) in front of presets")
    g.add_argument("--seed", type=int, default=None, help="random seed for every randomized step (default: 0)")
    pg = p.add_argument_group("presets")
    for pre in PRESETS:
        pg.add_argument(pre.flag, dest=f"preset_{pre.name}", action="store_true", help=pre.help)
    targets: dict[str, list[_Target]] = {}
    owners: dict[str, type] = {}
    for pcls in pass_classes():
        cfg = pcls.config_cls
        sg = p.add_argument_group(f"pass {cfg.name}")
        if cfg.flag:
            sg.add_argument(cfg.flag, dest=f"step_{cfg.name}", action="store_true",
                            help=cfg.flag_help or f"add the {cfg.name} pass")
        _add_config_flags(sg, cfg, targets, owners)
    d = p.add_argument_group("data")
    d.add_argument("--calib-data", metavar="FILE|DIR", help="calibration data: an .npz keyed by input name with samples "
                   "stacked on axis 0, or a folder of .npz files with one feed each")
    vg = p.add_argument_group("verification")
    _add_config_flags(vg, VerifyConfig, targets, owners)
    og = p.add_argument_group("output")
    _add_config_flags(og, OutputConfig, targets, owners)
    og.add_argument("--report", metavar="FILE", help="write the full report (JSON) here")
    og.add_argument("--keep-failed", action="store_true", help="write the output even when verification fails")
    lg = p.add_argument_group("logging")
    lg.add_argument("-v", "--verbose", action="count", default=0, help="more logging; tracebacks on errors")
    lg.add_argument("-q", "--quiet", action="store_true", help="no summary, no progress bars")
    return p, targets, owners


def recipe_from_args(args: argparse.Namespace, targets: dict[str, list[_Target]], owners: dict[str, type]):
    """Build the Recipe: ``--recipe`` file, then presets, then explicit flags."""
    from onnxcompress.passes.registry import pass_classes
    from onnxcompress.recipe import OutputConfig, Recipe, VerifyConfig, config_from_dict
    from onnxcompress.recipes import PRESETS, lossless_steps, with_preset_output, with_preset_steps

    chosen = [pre for pre in PRESETS if getattr(args, f"preset_{pre.name}", False)]
    base = Recipe.from_file(args.recipe) if args.recipe else Recipe()
    recipe = base
    step_flags = [c.config_cls for c in pass_classes()
                  if c.config_cls.flag and getattr(args, f"step_{c.config_cls.name}", False)]
    given = {dest: getattr(args, dest) for dest in targets if getattr(args, dest, None) is not None}
    enabling = {owners[d] for d in given if owners.get(d) not in (None, VerifyConfig, OutputConfig)}
    if not args.recipe and args.lossless:
        for s in lossless_steps():
            recipe = recipe.with_step(s)
    recipe = with_preset_steps(recipe, chosen)
    if not args.recipe:  # a recipe file's output settings win over a preset's
        recipe = with_preset_output(recipe, chosen)
    for cls in [*step_flags, *[c for c in enabling if c not in step_flags]]:
        if recipe.step(cls.name) is None:
            recipe = recipe.with_step(cls())
    # explicit field values
    steps = list(recipe.steps)
    verify, output = dict(), dict()
    for dest, value in given.items():
        for t in targets[dest]:
            if t.cls is VerifyConfig:
                verify[t.field] = value
            elif t.cls is OutputConfig:
                output[t.field] = value
            else:
                for i, s in enumerate(steps):
                    if type(s) is t.cls:
                        data = {k: v for k, v in s.to_dict().items() if k != "pass"}
                        data[t.field] = value
                        steps[i] = config_from_dict(t.cls, data, where=f"flag --{dest.replace('_', '-')}")
    if verify:
        merged = {**dataclasses.asdict(recipe.verify), **verify}
        recipe = recipe.replace(verify=config_from_dict(VerifyConfig, merged, where="verification flags"))
    if output:
        merged = {**dataclasses.asdict(recipe.output), **output}
        recipe = recipe.replace(output=config_from_dict(OutputConfig, merged, where="output flags"))
    recipe = recipe.replace(steps=tuple(steps))
    if args.seed is not None:
        recipe = recipe.replace(seed=args.seed)
    return recipe


def check_side_file(flag: str, path, protected, *, overlap_only: bool = False) -> None:
    """Refuse a path given for a side file (``--report``, ``--calib-cache``) that would overwrite one
    of the run's own files (the input, its data files, the output, the calibration data) or cannot
    be written; checked before anything is written."""
    if not path:
        return
    p = Path(path)
    real = os.path.realpath(p)
    for q in protected:
        if q is not None and os.path.realpath(q) == real:
            raise RecipeError(f"{flag} {str(path)!r} is {str(q)!r}, one of this run's own files", where="command line",
                              hint=f"give {flag} a path of its own")
    if overlap_only:  # the output: save() checks its folder itself
        return
    if p.is_dir() or not p.parent.is_dir():
        raise RecipeError(f"{flag} {str(path)!r} is a folder or its folder does not exist", where="command line",
                          hint=f"give a file path in an existing folder, e.g. {flag} report.json")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise RecipeError(f"{flag} {str(path)!r} cannot be written", where="command line",
                          hint="choose a file in a folder you can write to")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet or not verbose else (logging.INFO if verbose == 1 else logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("onnxcompress")
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    # graphsurgeon logs through its own logger, to stdout ("[W] Could not convert: BFLOAT16 ..."): its
    # warnings are about its own type mapping, noise in our summary and in -q's silence
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.WARNING if verbose >= 2 else G_LOGGER.ERROR


def _raise_interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: finally blocks remove temp files
    raise KeyboardInterrupt


def run_guarded(fn: Callable[[], int], verbose: bool) -> int:
    """Run ``fn`` mapping errors to one line on stderr and the documented exit code."""
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return fn()
    except OnnxCompressError as e:
        if verbose:
            log.exception("failed")
        print(f"onnxcompress: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnxcompress: interrupted; no output written", file=sys.stderr)
        return 130
    except MemoryError:
        print("onnxcompress: error: out of memory (hint: use --external-data or a machine with more memory)",
              file=sys.stderr)
        return 4
    except Exception as e:  # an internal error: one line unless -v
        if verbose:
            log.exception("internal error")
        print(f"onnxcompress: internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
              "(hint: re-run with -v for the traceback and report it)", file=sys.stderr)
        return 4
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        mod, fn = SUBCOMMANDS[argv[0]].split(":")
        return getattr(importlib.import_module(mod), fn)(argv[1:])
    parser, targets, owners = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return run_guarded(lambda: _run(args, parser, targets, owners), bool(args.verbose))


#: steps that change weights by approximation and that the teacher-guided repair (distill) can correct
_REPAIRABLE = ("sparsify", "prune_channels", "width", "share_weights", "low_rank", "merge_neurons")


def _repair_hint(recipe, calib_data) -> str:
    """What to try after a failed check: the layer-by-layer repair when the recipe prunes or shares
    without it, else a milder setting."""
    names = [s.name for s in recipe.steps]
    lossy = [n for n in names if n in _REPAIRABLE]
    if not lossy:
        return ""
    if "distill" in names:
        return (f"try a milder {lossy[0]} setting; " if calib_data else
                "give --calib-data DATA: the repair (distill) needs it and was skipped; ")
    return (f"repair {', '.join(lossy)} from the original with --distill"
            + ("" if calib_data else " --calib-data DATA") + " or try a milder setting; ")


def _run(args, parser, targets, owners) -> int:
    from onnxcompress.api import compress

    recipe = recipe_from_args(args, targets, owners)
    if args.print_recipe:
        print(recipe.to_json())
        return 0
    if not args.output:
        raise RecipeError("no output path given", where="command line",
                          hint="usage: onnxcompress IN.onnx OUT.onnx [flags]")
    inp, out = Path(args.input), Path(args.output)
    if inp.exists() and os.path.realpath(inp) == os.path.realpath(out):
        raise RecipeError(f"the output {str(out)!r} is the input", where="command line",
                          hint="choose a different output path; onnxcompress never overwrites its input")
    if not out.parent.is_dir():
        raise RecipeError(f"output folder {str(out.parent)!r} does not exist", where="command line",
                          hint="create it first")
    data_paths = [args.calib_data] if args.calib_data else []
    check_side_file("the output", out, data_paths, overlap_only=True)
    files_ours = [inp, out, out.with_name(out.name + ".data"), *data_paths]
    check_side_file("--report", args.report, files_ours)
    for step in recipe.steps:
        check_side_file("--calib-cache", getattr(step, "calib_cache", None), [inp, out, *data_paths])
    result = compress(inp, recipe, data=args.calib_data, progress=not args.quiet)
    check_side_file("--report", args.report, result.source_files)  # the input's external data files
    if result.passed or args.keep_failed:
        result.save(out, force=args.keep_failed)
    if args.report:
        result.report.to_json(args.report)
    if not args.quiet:
        print(f"{inp} -> {out if (result.passed or args.keep_failed) else '(not written)'}")
        print(result.report.summary())
    if not result.passed:
        print("onnxcompress: error: verification failed; "
              + ("output written anyway because of --keep-failed" if args.keep_failed else "output not written")
              + ("" if args.keep_failed else
                 f" (hint: see the parity table; {_repair_hint(recipe, args.calib_data)}--keep-failed writes it "
                 "anyway)"), file=sys.stderr)
        return 1
    return 0
