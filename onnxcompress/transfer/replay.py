"""Structure transfer: replay a recorded compression plan on another model, and ``--width``.

``apply_plan`` (``--apply-plan PLAN``)
    ``PLAN`` is a plan JSON (``{"format": 1, "recipe": ..., "tensors": ..., "steps": ...}``, what
    :func:`onnxcompress.api.plan_of` writes), an ``.onnx`` model whose
    ``metadata_props["onnxcompress.plan"]`` holds one, or a report JSON (``--report``). Its steps are
    replayed in order on this model — another checkpoint of the same architecture, say a fine-tuned
    one — so that the result has the **same structure**, with values from the new weights:

    ======================  ===================================================================
    recorded step           replayed as
    ======================  ===================================================================
    ``prune_channels``,     the recorded kept channel indices per tensor (``details["groups"]
    ``width``,              [i]["keep"]``), applied through ``prune_channels``' dependency groups
    ``drop_dead_channels``  (every coupled tensor shrinks the same way); nothing is re-ranked
    ``sparsify``            each recorded tensor gets its recorded sparsity again
                            (``tensors[name]["sparsity"]``, ``"rule"``), pinned per layer; the
                            mask is re-derived by magnitude from the new weights (the plan
                            records no masks), N:M patterns re-applied as N:M
    ``apply_plan``          its own recorded steps, recursively
    any other pass          run again with its recorded config: codebook sizes, quantization
                            types, bits and block sizes come from the config; scales, ranges and
                            centres are recomputed from the new weights (and data, when given)
    ======================  ===================================================================

    Every replayed step is recorded in ``details["steps"]`` with its config and mode (``pinned``
    or ``recomputed``), so the plan of a replayed model is itself replayable. A step whose pass is
    not registered here is a Skip. A plan is read and checked when the pass is built, before the
    model is loaded.

``width`` (``--width W``)
    Derive a narrower student from a teacher: structured pruning by weight importance that keeps
    the fraction ``W`` of the channels of every prunable dependency group —
    ``prune_channels`` with ``ratio = 1 − W`` and importance ``l1`` (filter norm), so no data is
    needed. ``n_keep = max(1, n − floor((1 − W)·n))``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxcompress.errors import RecipeError
from onnxcompress.graph.query import iter_weights
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.recipe import StepConfig, config_from_dict, option

__all__ = ["ApplyPlanConfig", "ApplyPlanPass", "WidthConfig", "WidthPass", "load_plan", "plan_steps",
           "PlannedStep"]

log = logging.getLogger("onnxcompress")

#: passes that record kept channel indices per dependency group (``details["groups"][i]["keep"]``)
CHANNEL_STEPS = ("prune_channels", "width", "drop_dead_channels")
#: passes whose recorded per-layer choices are applied as they are (not recomputed)
PINNED = (*CHANNEL_STEPS, "sparsify")


# ----------------------------------------------------------------------------------------------
# reading plans


def load_plan(source: str | Path | dict) -> dict[str, Any]:
    """A plan dict from a plan JSON, a report JSON, an ``.onnx`` file with an embedded plan, or a dict.

    Raises RecipeError (before any model is loaded) when the file is missing or holds no plan.
    """
    from onnxcompress.transfer.transplant import PLAN_KEY

    if isinstance(source, dict):
        data = source
        where = "plan"
    else:
        p = Path(source)
        where = f"plan {str(p)!r}"
        if not p.is_file():
            raise RecipeError("file not found", where=where, hint="give a plan .json or a compressed .onnx model")
        if p.suffix.lower() == ".onnx":
            try:
                model = onnx.load(str(p), load_external_data=False)
            except Exception as e:  # protobuf decode errors
                raise RecipeError(f"cannot read the model: {type(e).__name__}", where=where) from e
            raw = next((x.value for x in model.metadata_props if x.key == PLAN_KEY), None)
            if raw is None:
                raise RecipeError(f"the model has no {PLAN_KEY!r} metadata", where=where,
                                  hint="compress it with onnxcompress (plans are embedded by default)")
            text = raw
        else:
            text = p.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"not valid JSON: {e}", where=where) from e
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        raise RecipeError("no 'steps' list: this is not a plan or a report", where=where,
                          hint="use the plan embedded in a compressed model, or a --report JSON")
    return data


@dataclass(frozen=True)
class PlannedStep:
    """One recorded step: its config (a StepConfig) and what the pass recorded (``details``)."""

    config: StepConfig
    details: dict[str, Any]


def _step_config(raw: dict[str, Any], where: str) -> StepConfig:
    from onnxcompress.passes.registry import step_config_class

    if not isinstance(raw, dict) or "pass" not in raw:
        raise RecipeError("a step without a 'pass' key", where=where)
    body = dict(raw)
    name = body.pop("pass")
    return config_from_dict(step_config_class(name), body, where=f"{where} ({name})")


def plan_steps(plan: dict[str, Any], *, where: str = "plan") -> list[PlannedStep]:
    """The plan's steps as ``PlannedStep`` objects, in the order they ran, ``apply_plan`` expanded.

    A plan (``format`` 1) pairs ``recipe.steps[i]`` (configs) with ``steps[i]`` (details, its
    per-tensor records moved to ``plan["tensors"]``); a report's steps carry both.
    """
    tensors = plan.get("tensors") or {}
    recorded = plan["steps"]
    if "format" in plan:
        configs = (plan.get("recipe") or {}).get("steps") or []
        if len(configs) != len(recorded):
            raise RecipeError(f"the plan has {len(recorded)} steps but its recipe {len(configs)}", where=where,
                              hint="the plan is corrupt; re-export it")
        pairs = [(c, {**(s.get("details") or {})}) for c, s in zip(configs, recorded)]
        for c, s in zip(configs, recorded):
            if c.get("pass") != s.get("pass"):
                raise RecipeError(f"step {s.get('pass')!r} does not match recipe step {c.get('pass')!r}",
                                  where=where)
    else:  # a report
        pairs = [(s.get("config") or {"pass": s.get("name")}, dict(s.get("details") or {})) for s in recorded]
    out: list[PlannedStep] = []
    for i, (cfg, details) in enumerate(pairs):
        if cfg.get("pass") == ApplyPlanConfig.name:
            out += plan_steps({"steps": details.get("steps") or []}, where=f"{where}, step {i} (apply_plan)")
            continue
        if "tensors" not in details and cfg.get("pass") == "sparsify":
            details["tensors"] = {k: v for k, v in tensors.items() if isinstance(v, dict) and "sparsity" in v
                                  and "rule" in v}
        out.append(PlannedStep(_step_config(cfg, f"{where}, step {i}"), details))
    return out


# ----------------------------------------------------------------------------------------------
# apply_plan


@dataclass(frozen=True)
class ApplyPlanConfig(StepConfig):
    name = "apply_plan"
    order = 5

    plan: str = option("", "replay a recorded compression plan (a plan .json, a --report .json, or a compressed "
                           ".onnx with an embedded plan) on this model: same kept channels, sparsity per layer, "
                           "codebook sizes and quantization types, values from this model's weights",
                       flag="--apply-plan", metavar="FILE")


def _escape_glob(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _sparsify_config(step: PlannedStep) -> StepConfig | None:
    """The recorded sparsify step, with each recorded tensor's sparsity pinned by an override."""
    rows = step.details.get("tensors") or {}
    cfg = step.config
    overrides = []
    for name, rec in rows.items():
        n = 1
        for d in rec.get("shape") or []:
            n *= int(d)
        zeros = round(float(rec.get("sparsity", 0.0)) * n)
        rule = str(rec.get("rule", ""))
        value = (zeros + 0.5) / n if n else 0.0
        overrides.append(f"{_escape_glob(name)}={min(value, 0.999999):.9f}" if zeros and "nm" not in rule
                         else f"{_escape_glob(name)}={rule.split('nm ')[-1].split(',')[0]}" if "nm" in rule
                         else f"{_escape_glob(name)}=skip")
    overrides.append("*=skip")
    return cfg.replace(ratio=0.5 if cfg.ratio is None else cfg.ratio, keep_top=None, threshold=None,
                       scope="layer", overrides=tuple(overrides))


class ApplyPlanPass(Pass):
    config_cls = ApplyPlanConfig
    lossless = False

    def __init__(self, config: StepConfig | None = None) -> None:
        super().__init__(config)
        if not self.config.plan:
            raise RecipeError("no plan given", where="apply_plan", hint="--apply-plan FILE (a plan .json or a "
                                                                         "compressed .onnx)")
        self.steps = plan_steps(load_plan(self.config.plan), where=f"plan {self.config.plan!r}")

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        from onnxcompress.passes.base import Pipeline
        from onnxcompress.passes.registry import make_pass

        res = PassResult()
        done: list[dict[str, Any]] = []
        tensors: dict[str, dict[str, Any]] = {}
        for i, step in enumerate(self.steps):
            name = step.config.name
            if name in CHANNEL_STEPS:
                p: Pass = _PinnedChannels(step)
                mode = "pinned"
            elif name == "sparsify":
                p = make_pass(_sparsify_config(step))
                mode = "pinned"
                present = {ref.name for ref in iter_weights(graph)}
                for t in sorted(set(step.details.get("tensors") or {}) - present):
                    res.skip(t, "apply_plan/sparsify", "the plan records this weight but this model has none "
                                                       "of that name: its sparsity is not replayed")
            else:
                p = make_pass(step.config)
                mode = "recomputed"
            (r,) = Pipeline([p]).run(graph, ctx)
            for line in r.changes:
                res.changed(f"{name}: {line}")
            for s in r.skipped:
                res.skip(s.node, f"{name}/{s.rule}", s.reason)
            for t, rec in (r.details.get("tensors") or {}).items():
                tensors.setdefault(t, {}).update(rec if isinstance(rec, dict) else {"value": rec})
            done.append({"pass": name, "mode": mode, "config": step.config.to_dict(), "details": r.details,
                         "changes": len(r.changes)})
        res.details = {"plan": str(self.config.plan), "steps": done, "tensors": tensors}
        if ctx is not None:
            ctx.note(f"apply_plan: replayed {len(done)} step(s) from {self.config.plan} "
                     f"({', '.join(d['pass'] + ' ' + d['mode'] for d in done)})")
        return res


class _PinnedChannels(Pass):
    """Applies recorded kept channel indices (a ``prune_channels`` or ``width`` step's groups)."""

    config_cls = None  # type: ignore[assignment]
    lossless = False

    def __init__(self, step: PlannedStep) -> None:
        self.config = step.config
        self.step = step

    @property
    def name(self) -> str:
        return self.step.config.name

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        from onnxcompress.prune.channels import replay_plan

        groups = self.step.details.get("groups") or []
        res = replay_plan(graph, groups) if groups else PassResult()
        res.details = {"groups": groups, "replayed": True}
        return res


# ----------------------------------------------------------------------------------------------
# width


@dataclass(frozen=True)
class WidthConfig(StepConfig):
    name = "width"
    order = 30

    width: float = option(0.5, "derive a narrower student: keep this fraction of the channels of every prunable "
                               "layer group (structured pruning by weight norm, no data needed)",
                          flag="--width", minimum=0.01, maximum=1.0, metavar="W")
    importance: str = option("l1", "weight importance used to choose the kept channels (filter norm)",
                             choices=("l1", "l2"))
    round_to: int = option(1, "keep channel counts multiples of N", minimum=1)


class WidthPass(Pass):
    config_cls = WidthConfig
    lossless = False

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        from onnxcompress.prune.channels import PruneChannelsConfig, PruneChannelsPass

        cfg: WidthConfig = self.config
        inner = PruneChannelsConfig(ratio=min(round(1.0 - cfg.width, 9), 0.99), importance=cfg.importance,
                                    round_to=cfg.round_to)
        res = PruneChannelsPass(inner).run(graph, ctx)
        res.details["width"] = cfg.width
        return res
