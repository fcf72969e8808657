"""``compress()``: the one entry point the CLI and export pipelines share.

``compress(model, recipe, data=...)`` loads (a copy of) the model, runs the recipe's passes through
the :class:`~onnxcompress.passes.base.Pipeline`, exports the result, verifies it with onnxruntime
against the original (unless the recipe turns verification off) and returns a
:class:`CompressResult`. It never mutates the caller's ModelProto and never writes files;
:meth:`CompressResult.save` does, atomically, and refuses to save a result that failed parity
unless told to.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxcompress.context import Context
from onnxcompress.errors import CalibrationError, ParityError, RecipeError, did_you_mean
from onnxcompress.graph.io import ModelLike, ModelSource, graph_to_model, model_to_graph, open_model, save
from onnxcompress.passes.base import Pipeline
from onnxcompress.recipe import Recipe
from onnxcompress.report import ModelStats, Report

__all__ = ["compress", "CompressResult", "resolve_recipe", "plan_of", "embed_plan"]


@dataclass
class CompressResult:
    """The compressed model, the report and the parity result (None when verification was off).

    Tensors no pass touched may still refer to the input's external data (``base_dir``);
    :meth:`save` copies them into the output.
    """

    model: onnx.ModelProto
    report: Report
    parity: Any = None
    base_dir: Path | None = None
    source_path: Path | None = None
    external_data: bool | None = None
    _spill: Any = field(default=None, repr=False)
    #: the input model's external data files (ModelSource.data_files): never written to
    source_files: tuple = ()

    @property
    def passed(self) -> bool:
        return self.parity is None or bool(self.parity.passed)

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None, force: bool = False) -> Path:
        """Write the model atomically; refuse when parity failed unless ``force``."""
        if not self.passed and not force:
            raise ParityError("the compressed model failed verification; not saved", parity=self.parity,
                              where=f"save {str(path)!r}",
                              hint="inspect the parity report, relax the recipe, or save with force=True")
        ext = external_data if external_data is not None else self.external_data
        data = save(self.model, path, base_dir=self.base_dir, external_data=ext,
                    protected=(self.source_path, *self.source_files))
        if self.report.output is not None:  # the files just written (not a stale <out>.data of an earlier run)
            self.report.output.size_bytes = Path(path).stat().st_size + (data.stat().st_size if data else 0)
        return Path(path)


def resolve_recipe(recipe: Recipe | dict | str | os.PathLike | list[str] | tuple[str, ...] | None) -> Recipe:
    """A Recipe from a Recipe, a dict, a recipe file path, a preset name or a list of them (``"int8"``,
    ``["int4", "fp16"]``: the CLI's ``--int8`` ... switches, after the lossless prefix), or None (the
    lossless default). A string that names an existing file is read as a recipe file."""
    if recipe is None:
        from onnxcompress.recipes import default_recipe

        return default_recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, str) and not Path(recipe).is_file() and not recipe.lower().endswith(
            (".json", ".yaml", ".yml", ".toml")):
        return _preset_names([recipe])
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.from_file(recipe)
    if isinstance(recipe, (list, tuple)) and all(isinstance(n, str) for n in recipe):
        return _preset_names(list(recipe))
    raise RecipeError(f"cannot use a {type(recipe).__name__} as a recipe", where="compress",
                      hint="pass a Recipe, a dict, a recipe file path, or preset names such as \"int8\"")


def _preset_names(names: list[str]) -> Recipe:
    from onnxcompress.recipes import PRESETS, preset_recipe

    known = [p.name for p in PRESETS]
    keys = [n.replace("-", "_").lower() for n in names]
    for given, key in zip(names, keys):
        if key not in known:
            raise RecipeError(f"{given!r} is neither a recipe file nor a preset{did_you_mean(key, known)}",
                              where="compress", hint=f"presets: {', '.join(known)}; or pass a recipe file path")
    return preset_recipe(keys)


def compress(
    model: ModelLike | ModelSource,
    recipe: Recipe | dict | str | os.PathLike | list[str] | None = None,
    *,
    data: Any = None,
    source: Any = None,
    context: Context | None = None,
    progress: bool = False,
) -> CompressResult:
    """Compress ``model`` with ``recipe`` and verify the result.

    ``model``: a path, bytes or ModelProto (copied; the caller's object is never modified).
    ``recipe``: a Recipe, a dict, a recipe file, a preset name or list of names (``"int8"``), or None
    for the lossless passes only.
    ``data``: calibration data (an ``.npz`` path, a folder of ``.npz`` files, an iterable of feed
    dicts or a CalibrationDataReader); also used as the verification feed.
    ``source``: a second model for transfer passes. ``context``: a prepared Context (advanced).
    """
    t0 = time.perf_counter()
    recipe = resolve_recipe(recipe)
    from onnxcompress.passes.registry import make_pass

    passes = [make_pass(step) for step in recipe.steps]  # unknown passes fail before loading
    src = open_model(model)
    ctx = context if context is not None else Context(data=data, seed=recipe.seed, progress=progress,
                                                      providers=recipe.verify.providers, source=source)
    ctx.original = src
    spill_dir = None
    if src.has_external_data and ctx.spill_dir is None:
        # a large model: new weights go to a private folder between passes instead of staying in memory
        spill_dir = tempfile.TemporaryDirectory(prefix="onnxcompress-spill-")
        ctx.spill_dir = Path(spill_dir.name)
    report = Report(recipe=recipe.to_dict(), seed=recipe.seed)
    try:
        report.input = ModelStats.of_model(src.model, src.base_dir)
        graph = model_to_graph(src)  # shares src.model's tensors; graph_to_model never writes into them
        Pipeline(passes).run(graph, ctx, report)
        custom = _custom_ops(src.model)
        if custom:
            ctx.note(f"{sum(custom.values())} node(s) of custom domains passed through unchanged "
                     f"({', '.join(sorted(custom))})")
        out = graph_to_model(graph, src.model)
        if recipe.output.embed_plan:
            embed_plan(out, plan_of(report))
        else:
            ctx.note("plan: not embedded in the model (--embed-plan embeds it, --report FILE saves it)")
        report.output = ModelStats.of_model(out, src.base_dir)
        parity = None
        if recipe.verify.enabled:
            lossless = all(p.lossless for p in passes)
            parity = _verify(src, out, recipe, ctx, lossless)
            report.parity = {"passed": parity.passed, "summary": parity.summary(), **parity.to_dict()}
        report.notes = list(ctx.notes)
    finally:
        if context is None:
            ctx.close()
    report.seconds = time.perf_counter() - t0
    result = CompressResult(out, report, parity, src.base_dir, src.path, recipe.output.external_data,
                            source_files=src.data_files)
    result._spill = spill_dir  # spilled weights live as long as the result
    return result


def plan_of(report: Report) -> dict[str, Any]:
    """The replayable plan: the resolved recipe and every pass's per-tensor choices.

    Passes put per-tensor records in ``PassResult.details["tensors"]`` (``{tensor: {...}}``, e.g.
    ``{"keep": {axis: [indices]}}`` for structured pruning); later steps update earlier records.
    """
    tensors: dict[str, dict[str, Any]] = {}
    for step in report.steps:
        for name, rec in (step.details.get("tensors") or {}).items():
            tensors.setdefault(name, {}).update(rec if isinstance(rec, dict) else {"value": rec})
    return {"format": 1, "recipe": report.recipe, "tensors": tensors,
            "steps": [{"pass": s.name, "details": {k: v for k, v in s.details.items() if k != "tensors"}}
                      for s in report.steps]}


def embed_plan(model: onnx.ModelProto, plan: dict[str, Any]) -> None:
    """Write ``plan`` (JSON) into ``model.metadata_props[PLAN_KEY]``, replacing an older one."""
    import json

    from onnxcompress.report import _json_default
    from onnxcompress.transfer.transplant import PLAN_KEY

    plan = _lean(plan)
    keep = [p for p in model.metadata_props if p.key != PLAN_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    entry = model.metadata_props.add()
    entry.key, entry.value = PLAN_KEY, json.dumps(plan, separators=(",", ":"), default=_json_default)


def _lean(obj: Any) -> Any:
    """The plan as embedded in a model: measurements (lists of floats such as codebooks and
    per-channel scales, which replay recomputes from the new weights) are dropped, floats are
    rounded to 6 significant digits; integer lists (kept channel indices) stay whole. The report
    keeps the full plan."""
    if isinstance(obj, dict):
        return {k: _lean(v) for k, v in obj.items()
                if not (isinstance(v, list) and v and any(isinstance(x, float) or
                                                          (isinstance(x, list) and x and isinstance(x[0], float))
                                                          for x in v))}
    if isinstance(obj, list):
        return [_lean(v) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    return obj


#: op domains onnx and onnxruntime define; any other is a custom op, passed through unchanged
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training")


def _custom_ops(model: onnx.ModelProto) -> dict[str, int]:
    """``{"domain:Op": count}`` of the nodes (subgraphs and functions included) of custom domains; a
    model-local function is not a custom op."""
    from onnxcompress.graph.io import iter_graph_protos

    local = {(f.domain, f.name) for f in model.functions}
    nodes = [n for g in iter_graph_protos(model.graph) for n in g.node] + [n for f in model.functions for n in f.node]
    return dict(Counter(f"{n.domain}:{n.op_type}" for n in nodes
                        if n.domain not in KNOWN_DOMAINS and (n.domain, n.op_type) not in local))


def _verify(src: ModelSource, out: onnx.ModelProto, recipe: Recipe, ctx: Context, lossless: bool):
    from onnxcompress.verify import LOSSY_RANDOM, compare_models, policy_for
    from onnxcompress.verify.tolerance import overridden

    v = recipe.verify
    tol = policy_for("lossless" if lossless else "lossy")
    feeds = None
    source = ctx.feeds(src.model)  # re-readable: a one-shot source was spooled as calibration read it
    if source is not None:
        feeds = [f for _, f in zip(range(2), source)]
        if not feeds:
            raise CalibrationError("the calibration data holds no feeds", where="verify",
                                   hint="check that the --calib-data file has samples stacked on the first axis")
    elif not lossless:
        tol = LOSSY_RANDOM
    tol = overridden(tol, atol=v.atol, rtol=v.rtol, min_cosine=v.min_cosine, min_top1=v.min_top1)
    if source is None and not lossless and v.min_top1 is None and tol.min_top1 == 0:
        ctx.note("verification ran on seeded random inputs, so top-1 agreement was reported, not enforced "
                 "(random inputs sit near class boundaries); give --calib-data to check it on real data")
    return compare_models(src.model, out, feeds=feeds, providers=v.providers, tolerance=tol, seed=recipe.seed,
                          batch=v.batch, ref_base_dir=src.base_dir, cand_base_dir=src.base_dir)
