"""Recipes: frozen, strictly validated, serializable compression plans.

A :class:`Recipe` is plain data: an ordered tuple of step configs (one per pass) plus verification
and output settings and a seed. It never holds data or live objects (calibration data, a teacher
model, providers in use), so it can always be printed (``--print-recipe``), saved, diffed and replayed.

Every option is a typed field of a frozen dataclass declared with :func:`option`; the field's
metadata carries its help text, its CLI flag and its allowed range, so the CLI flags, the recipe file
keys and the Python keyword arguments are the same thing (one config object, three spellings).
Validation happens in ``__post_init__``, before any model is loaded. Unknown keys raise
:class:`~onnxcompress.errors.RecipeError` listing the valid ones with a "did you mean".

Recipe files are JSON, YAML or TOML::

    {"steps": [{"pass": "fold_constants", "max_growth": 1.0},
               {"pass": "quantize_int8", "per_channel": true}],
     "verify": {"providers": ["cpu"]}, "seed": 0}
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from onnxcompress.errors import RecipeError, did_you_mean

__all__ = [
    "option",
    "StepConfig",
    "VerifyConfig",
    "OutputConfig",
    "Recipe",
    "config_from_dict",
]

_MISSING = object()


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
           minimum: float | None = None, maximum: float | None = None, metavar: str | None = None):
    """Declare a config field: default, help text, optional CLI flag and allowed values.

    ``flag`` is the long CLI option (``"--per-channel"``); giving it on the command line sets the
    field and, for a step config, adds the step to the recipe.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "minimum": minimum, "maximum": maximum,
            "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a JSON/YAML/TOML/CLI value to the field type ``tp`` or raise RecipeError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except RecipeError as e:
                last = e
        raise last if last else RecipeError(f"bad value {value!r}", where=where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"expected a list, got {value!r}", where=where, hint="write a JSON list")
        item = args[0] if args else str
        return tuple(_coerce(v, item, where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise RecipeError(f"expected true or false, got {value!r}", where=where)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise RecipeError(f"expected an integer, got {value!r}", where=where)
        try:
            f = float(value)
        except ValueError:
            raise RecipeError(f"expected an integer, got {value!r}", where=where) from None
        if f != int(f):
            raise RecipeError(f"expected an integer, got {value!r}", where=where)
        return int(f)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RecipeError(f"expected a number, got {value!r}", where=where)
        try:
            return float(value)
        except ValueError:
            raise RecipeError(f"expected a number, got {value!r}", where=where) from None
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"expected a string, got {value!r}", where=where)
        return value
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, where=where)
    return value


def _validate_fields(obj) -> None:
    """Check every field's choices and range (shared by all config dataclasses)."""
    where = getattr(obj, "name", "") or type(obj).__name__
    for f in fields(obj):
        v = getattr(obj, f.name)
        m = f.metadata
        if not m:
            continue
        vals = v if isinstance(v, tuple) else (v,)
        for x in vals:
            if x is None:
                continue
            if m.get("choices") is not None and x not in m["choices"]:
                raise RecipeError(f"{f.name}={x!r} is not one of {list(m['choices'])}{did_you_mean(str(x), map(str, m['choices']))}",
                                  where=f"recipe, {where}", hint=m.get("help"))
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                if isinstance(x, float) and not math.isfinite(x):
                    raise RecipeError(f"{f.name}={x!r} is not a finite number", where=f"recipe, {where}",
                                      hint=m.get("help"))
                if m.get("minimum") is not None and x < m["minimum"]:
                    raise RecipeError(f"{f.name}={x!r} is below the minimum {m['minimum']}", where=f"recipe, {where}",
                                      hint=m.get("help"))
                if m.get("maximum") is not None and x > m["maximum"]:
                    raise RecipeError(f"{f.name}={x!r} is above the maximum {m['maximum']}", where=f"recipe, {where}",
                                      hint=m.get("help"))


def config_from_dict(cls, data: Any, *, where: str = "recipe"):
    """Build the frozen config ``cls`` from a mapping, strictly: unknown keys are errors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping for {getattr(cls, 'name', cls.__name__)}, got {type(data).__name__}",
                          where=where)
    hints = _hints(cls)
    valid = [f.name for f in fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise RecipeError(f"unknown option {key!r}{did_you_mean(key, valid)}", where=where,
                              hint=f"valid options: {', '.join(valid) or '(none)'}")
        kwargs[key] = _coerce(value, hints[key], f"{where}, option {key!r}")
    try:
        return cls(**kwargs)
    except RecipeError as e:
        raise e
    except (TypeError, ValueError) as e:
        raise RecipeError(str(e), where=where) from e


def _to_plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_to_plain(x) for x in v]
    if dataclasses.is_dataclass(v):
        return {f.name: _to_plain(getattr(v, f.name)) for f in fields(v)}
    return v


@dataclass(frozen=True)
class StepConfig:
    """Base class of every pass's options. Subclasses set ``name`` (the pass name in recipes).

    ``order`` places a step when it is added by a CLI flag (lower runs earlier); ``flag`` is an
    optional CLI switch that adds the step with its defaults.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 50
    flag: ClassVar[str | None] = None
    flag_help: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _validate_fields(self)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise RecipeError. Override in subclasses."""

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, **{f.name: _to_plain(getattr(self, f.name)) for f in fields(self)}}

    def replace(self, **changes: Any) -> "StepConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class VerifyConfig:
    """How the result is checked with onnxruntime after compressing."""

    enabled: bool = option(True, "verify the result with onnxruntime after compressing", flag="--verify")
    providers: tuple[str, ...] = option(("cpu",), "execution providers to verify on, comma separated "
                                        "(cpu, cuda); unavailable ones are reported as skipped",
                                        flag="--providers", choices=("cpu", "cuda"), metavar="LIST")
    batch: int = option(8, "batch size of the random verification feed when no data is given",
                        flag="--verify-batch", minimum=1)
    # each replaces its own criterion of the technique's policy and keeps the others of its family
    # (bound: atol, rtol; task: min_cosine, min_top1); the policy's families none of whose values are
    # given are dropped (verify.tolerance.overridden)
    atol: float | None = option(None, "absolute tolerance (replaces the policy's; with rtol, the bound family)",
                                flag="--atol", minimum=0)
    rtol: float | None = option(None, "tolerance relative to the output's largest magnitude (replaces the "
                                "policy's)", flag="--rtol", minimum=0)
    min_cosine: float | None = option(None, "minimum cosine similarity per output (replaces the policy's; with "
                                      "min_top1, the task family)", flag="--min-cosine", minimum=-1, maximum=1)
    min_top1: float | None = option(None, "minimum top-1 agreement for classifier outputs (replaces the policy's)",
                                    flag="--min-top1", minimum=0, maximum=1)

    def __post_init__(self) -> None:
        _validate_fields(self)


@dataclass(frozen=True)
class OutputConfig:
    """How the result is written."""

    external_data: bool | None = option(None, "store tensors in a <out>.data file next to the model "
                                        "(default: only when the model would pass 2 GB)", flag="--external-data")
    embed_plan: bool = option(True, "record the compression plan (steps and per-tensor choices) in the model's "
                              "metadata_props['onnxcompress.plan'] so it can be replayed or transplanted through",
                              flag="--embed-plan")

    def __post_init__(self) -> None:
        _validate_fields(self)


@dataclass(frozen=True)
class Recipe:
    """An ordered list of steps plus verification and output settings."""

    steps: tuple[StepConfig, ...] = ()
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        for s in self.steps:
            if not isinstance(s, StepConfig):
                raise RecipeError(f"recipe step {s!r} is not a step config", where="recipe",
                                  hint="build steps with the pass config classes or Recipe.from_dict")

    # -- serialization --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [s.to_dict() for s in self.steps],
            "verify": _to_plain(self.verify),
            "output": _to_plain(self.output),
            "seed": self.seed,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        from onnxcompress.passes.registry import step_config_class

        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping, got {type(data).__name__}", where="recipe")
        valid = ["steps", "verify", "output", "seed"]
        for key in data:
            if key not in valid:
                raise RecipeError(f"unknown recipe key {key!r}{did_you_mean(key, valid)}", where="recipe",
                                  hint=f"valid keys: {', '.join(valid)}")
        steps = []
        raw_steps = data.get("steps", [])
        if not isinstance(raw_steps, list):
            raise RecipeError("'steps' must be a list", where="recipe")
        for i, raw in enumerate(raw_steps):
            if not isinstance(raw, dict) or "pass" not in raw:
                raise RecipeError(f"step {i} has no 'pass' key", where="recipe",
                                  hint='write each step as {"pass": "<name>", ...options}')
            body = dict(raw)
            name = body.pop("pass")
            steps.append(config_from_dict(step_config_class(name), body, where=f"recipe, step {i} ({name})"))
        verify = config_from_dict(VerifyConfig, data.get("verify", {}), where="recipe, verify")
        output = config_from_dict(OutputConfig, data.get("output", {}), where="recipe, output")
        seed = _coerce(data.get("seed", 0), int, "recipe, seed")
        return cls(tuple(steps), verify, output, seed)

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        where = f"recipe file {str(p)!r}"
        if not p.is_file():
            raise RecipeError("file not found", where=where, hint="check the --recipe path")
        text = p.read_text(encoding="utf-8")
        suffix = p.suffix.lower()
        try:
            if suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            elif suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except ImportError as e:
            raise RecipeError(f"cannot read {suffix} recipes: {e}", where=where,
                              hint="install PyYAML, or write the recipe as JSON") from e
        except Exception as e:  # parse errors of three libraries
            raise RecipeError(f"cannot parse: {type(e).__name__}: {' '.join(str(e).split())}", where=where,
                              hint="check the syntax") from e
        try:
            return cls.from_dict(data if data is not None else {})
        except RecipeError as e:
            raise e.with_where(where)

    @classmethod
    def from_cli(cls, argv: list[str]) -> "Recipe":
        """The recipe the ``onnxcompress`` command would run for these arguments (IN/OUT optional)."""
        from onnxcompress.cli import build_parser, recipe_from_args

        parser, targets, owners = build_parser()
        args = parser.parse_args(["-", *argv] if not argv or argv[0].startswith("-") else argv)
        return recipe_from_args(args, targets, owners)

    # -- editing --------------------------------------------------------------------------------

    def step(self, name: str) -> StepConfig | None:
        return next((s for s in self.steps if s.name == name), None)

    def with_step(self, step: StepConfig) -> "Recipe":
        """Replace the step of the same name, or insert ``step`` by its ``order``."""
        steps = list(self.steps)
        for i, s in enumerate(steps):
            if s.name == step.name:
                steps[i] = step
                return dataclasses.replace(self, steps=tuple(steps))
        pos = next((i for i, s in enumerate(steps) if s.order > step.order), len(steps))
        steps.insert(pos, step)
        return dataclasses.replace(self, steps=tuple(steps))

    def without_step(self, name: str) -> "Recipe":
        return dataclasses.replace(self, steps=tuple(s for s in self.steps if s.name != name))

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)
