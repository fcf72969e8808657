"""``sparsify``: unstructured magnitude pruning — ratio, keep-top-K, threshold and N:M patterns.

Every rule zeroes weights by magnitude and keeps the rest bit for bit; only the mask differs. For a
layer's weight ``W`` with ``n`` elements and magnitudes ``a = |W|`` (ties broken by position, so a
rule is deterministic):

* ratio ``R`` (``--prune R``): zero the ``floor(R · n)`` smallest ``a``. With ``--prune-scope
  global`` the ``floor(R · Σn)`` smallest magnitudes across all eligible layers are zeroed, so each
  layer's sparsity follows its own magnitude distribution.
* keep-top ``K`` (``--keep-top K``, the seed's clipping): zero all but the ``K`` largest ``a``.
* threshold ``T`` (``--sparsify-threshold T``): zero ``a < T`` (``--threshold-mode absolute``) or
  ``a < T · std(W)`` (``--threshold-mode std``).
* ``N:M`` (``--nm 2:4``): along the reduction axis, in each group of ``M`` consecutive weights keep
  the ``N`` largest ``a``. The reduction axis is ``K`` of ``MatMul`` ``B[..., K, N]`` (axis -2; -1
  when the constant is ``A``), axis 0 of ``Gemm`` ``B`` (1 with ``transB=1``), and the flattened
  input-channel × kernel axis of ``Conv`` ``W[Cout, Cin/g, kh, kw]``. ``K`` must be a multiple of ``M``.
  ``N:M`` combines with one of the magnitude rules (the zeros of both are kept).

Which weights: the weight inputs of MatMul, Gemm, Conv and ConvTranspose. Biases (Gemm/Conv ``C``/``B``,
``Add`` of a constant after them), normalization parameters and embedding tables (``Gather`` data)
are left alone unless ``include`` names their role (counted in ``details["left_alone"]``, as are
constants of rank < 2 read by other ops: scales, epsilons, shapes). A matrix read by any other op,
a weight that is a graph output, or one shared by uses of different roles is reported as a Skip and
left unchanged.

Per-layer overrides (``overrides``, ``--prune-override``): ``PATTERN=VALUE``, ``PATTERN`` an fnmatch
glob on the weight's name or any consumer node's name, ``VALUE`` one of ``skip``, a number (this
layer's ratio, ``K`` or ``T`` — whichever magnitude rule is active; the layer then leaves the global
pool) or ``N:M``. The first matching override wins. ``res.details["tensors"]`` (``{name: {...}}``, the plan format) records every layer's
rule, parameter and resulting sparsity, so the plan can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.errors import RecipeError
from onnxcompress.graph.query import WeightRef, is_graph_io, iter_weights, name_matches, producer
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.recipe import StepConfig, option

__all__ = ["SparsifyConfig", "SparsifyPass", "Override", "parse_nm", "parse_override", "weight_role",
           "magnitude_mask", "nm_mask"]

ROLES = ("bias", "norm", "embedding")
_NORM_OPS = {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
             "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization"}
_LINEAR_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}


def parse_nm(text: str, where: str = "recipe, sparsify") -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; RecipeError unless ``0 < N < M``."""
    parts = text.split(":")
    try:
        n, m = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        n, m = None, None
    if n is None or not 0 < n < m:
        raise RecipeError(f"N:M pattern {text!r} is not of the form N:M with 0 < N < M", where=where,
                          hint="write e.g. 2:4")
    return n, m


@dataclass(frozen=True)
class Override:
    """One per-layer override: ``pattern`` and either ``skip``, a ``value`` or an ``nm`` pattern."""

    pattern: str
    skip: bool = False
    value: float | None = None
    nm: tuple[int, int] | None = None

    def matches(self, names: list[str]) -> bool:
        return any(name_matches(n, self.pattern) for n in names)


def parse_override(text: str, where: str = "recipe, sparsify, overrides") -> Override:
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern or not value:
        raise RecipeError(f"override {text!r} is not PATTERN=VALUE", where=where,
                          hint="e.g. 'fc1*=0.5', 'head*=skip' or 'attn*=2:4'")
    value = value.strip()
    if value == "skip":
        return Override(pattern, skip=True)
    if ":" in value:
        return Override(pattern, nm=parse_nm(value, where))
    try:
        number = float(value)
    except ValueError:
        raise RecipeError(f"override value {value!r} is not skip, a number or N:M", where=where) from None
    if number < 0:
        raise RecipeError(f"override value {value!r} is negative", where=where)
    return Override(pattern, value=number)


@dataclass(frozen=True)
class SparsifyConfig(StepConfig):
    name = "sparsify"
    order = 30

    ratio: float | None = option(None, "zero this fraction of the smallest-magnitude weights of each layer "
                                       "(of all layers together with --prune-scope global)",
                                 flag="--prune", minimum=0, maximum=1, metavar="R")
    scope: str = option("layer", "where --prune ranks magnitudes: per layer or across all layers",
                        flag="--prune-scope", choices=("layer", "global"))
    keep_top: int | None = option(None, "keep only the K largest-magnitude weights of each layer",
                                  flag="--keep-top", minimum=0, metavar="K")
    threshold: float | None = option(None, "zero weights whose magnitude is below T", flag="--sparsify-threshold",
                                     minimum=0, metavar="T")
    threshold_mode: str = option("absolute", "T is absolute, or in units of each layer's standard deviation",
                                 flag="--threshold-mode", choices=("absolute", "std"))
    nm: str | None = option(None, "keep N of every M consecutive weights along the reduction axis, e.g. 2:4",
                            flag="--nm", metavar="N:M")
    include: tuple[str, ...] = option((), "also prune these weight roles (left alone by default)",
                                      flag="--prune-include", choices=ROLES, metavar="LIST")
    overrides: tuple[str, ...] = option((), "per-layer settings PATTERN=VALUE (VALUE: skip, a number for the "
                                            "active rule, or N:M), first match wins",
                                        flag="--prune-override", metavar="LIST")

    def validate(self) -> None:
        rules = [n for n, v in (("ratio", self.ratio), ("keep_top", self.keep_top), ("threshold", self.threshold))
                 if v is not None]
        if len(rules) > 1:
            raise RecipeError(f"choose one magnitude rule, got {', '.join(rules)}", where="recipe, sparsify",
                              hint="--prune, --keep-top and --sparsify-threshold exclude each other; --nm combines "
                                   "with any one of them")
        if self.nm is not None:
            parse_nm(self.nm)
        for o in self.parsed_overrides():
            if o.value is not None and not rules:
                raise RecipeError(f"override {o.pattern!r} gives a number but no magnitude rule is active",
                                  where="recipe, sparsify", hint="use skip or N:M, or add --prune/--keep-top")
            if o.value is not None and self.ratio is not None and o.value > 1:
                raise RecipeError(f"override {o.pattern!r}: ratio {o.value} is above 1", where="recipe, sparsify")

    def parsed_overrides(self) -> tuple[Override, ...]:
        return tuple(parse_override(t) for t in self.overrides)

    @property
    def rule(self) -> str | None:
        """The active magnitude rule: ratio, keep_top, threshold or None."""
        for n in ("ratio", "keep_top", "threshold"):
            if getattr(self, n) is not None:
                return n
        return None


# ----------------------------------------------------------------------------------------------
# roles: what a weight is to the nodes that read it


@dataclass(frozen=True)
class Use:
    """One read of a weight: the role and, for linear weights, the reduction axes (None: no N:M rule)."""

    role: str  # weight, bias, norm, embedding, or unknown
    node: str
    reduction: tuple[int, ...] | None = None
    why: str = ""


def weight_role(node: gs.Node, index: int, rank: int) -> Use:
    """The role of input ``index`` (a constant of rank ``rank``) of ``node``."""
    op, name = node.op, node.name or node.op
    if op == "MatMul":
        return Use("weight", name, (rank - 2,) if index == 1 and rank >= 2 else (rank - 1,))
    if op == "Gemm":
        if index == 2:
            return Use("bias", name)
        trans = int(node.attrs.get("transB" if index == 1 else "transA", 0))
        axis = (1 - trans) if index == 0 else trans
        return Use("weight", name, (axis,))
    if op == "Conv":
        return Use("bias", name) if index == 2 else Use("weight", name, tuple(range(1, rank)))
    if op == "ConvTranspose":
        return Use("bias", name) if index == 2 else Use("weight", name, None, "ConvTranspose has no N:M rule")
    if op in _NORM_OPS:
        return Use("norm", name)
    if op == "Gather" and index == 0:
        return Use("embedding", name)
    if op == "Add" and rank <= 1:
        other = node.inputs[1 - index] if len(node.inputs) == 2 else None
        p = producer(other) if other is not None else None
        if p is not None and p.op in _LINEAR_OPS:
            return Use("bias", name)
    return Use("unknown", name, None, f"read by {op} input {index}, which has no pruning rule")


# ----------------------------------------------------------------------------------------------
# masks (True = zero this weight)


def magnitude_mask(a: np.ndarray, count: int) -> np.ndarray:
    """Zero the ``count`` smallest magnitudes of ``a`` (ties by position)."""
    flat = a.ravel()
    out = np.zeros(flat.size, dtype=bool)
    if count > 0:
        out[np.argsort(flat, kind="stable")[:count]] = True
    return out.reshape(a.shape)


def nm_mask(a: np.ndarray, n: int, m: int, reduction: tuple[int, ...]) -> np.ndarray:
    """Zero all but the ``n`` largest of every ``m`` consecutive magnitudes along ``reduction``.

    The reduction axes (contiguous, in order) are moved last and flattened; their size must be a
    multiple of ``m`` (callers check).
    """
    keep_axes = [i for i in range(a.ndim) if i not in reduction]
    moved = np.transpose(a, keep_axes + list(reduction))
    groups = moved.reshape(-1, m)
    order = np.argsort(groups, axis=1, kind="stable")
    zero = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(zero, order[:, : m - n], True, axis=1)
    zero = zero.reshape(moved.shape)
    return np.transpose(zero, np.argsort(keep_axes + list(reduction)))


# ----------------------------------------------------------------------------------------------
# the pass


@dataclass
class _Layer:
    ref: WeightRef
    uses: list[Use]
    override: Override | None

    @property
    def reduction(self) -> tuple[int, ...] | None:
        axes = {u.reduction for u in self.uses}
        return axes.pop() if len(axes) == 1 else None


class SparsifyPass(Pass):
    config_cls = SparsifyConfig
    lossless = False

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        cfg: SparsifyConfig = self.config
        overrides = cfg.parsed_overrides()
        if cfg.rule is None and cfg.nm is None:
            res.skip("*", "sparsify", "no rule given (ratio, keep_top, threshold or nm): nothing to prune")
            return res
        layers: list[_Layer] = []
        left_alone: dict[str, int] = {}
        selectable: list[str] = []  # what an override can name: a sparsified weight or its layers
        for ref in iter_weights(graph, float_only=True):
            uses = [weight_role(c, i, len(ref.shape)) for c in ref.consumers
                    for i, t in enumerate(c.inputs) if t is ref.tensor]
            quiet = all(u.role == "unknown" for u in uses) and len(ref.shape) < 2  # scalars, scales, shapes
            if not uses or quiet or all(u.role in ROLES and u.role not in cfg.include for u in uses):
                for role in {u.role for u in uses}:  # biases, norms, embeddings: left alone by default
                    left_alone[role] = left_alone.get(role, 0) + 1
                continue
            reason = self._refusal(ref, uses, cfg)
            if reason is not None:
                res.skip(ref.name, "sparsify", reason)
                continue
            names = [ref.name] + [u.node for u in uses]
            selectable += names
            override = next((o for o in overrides if o.matches(names)), None)
            if override is not None and override.skip:
                res.skip(ref.name, "sparsify", f"override {override.pattern!r} says skip")
                continue
            layers.append(_Layer(ref, uses, override))
        self.note_unmatched(ctx, graph, "overrides", [o.pattern for o in overrides], names=selectable,
                            what="weight that could be sparsified or layer reading one")
        zero, rules = self._magnitude_masks(layers, cfg, res)
        rows: dict[str, dict] = {}
        for layer in layers:
            mask = zero[id(layer)]
            rule = [rules.get(layer.ref.name, "")]
            nm = layer.override.nm if layer.override is not None and layer.override.nm else (
                parse_nm(cfg.nm) if cfg.nm else None)
            if nm is not None:
                nm_zero, why = self._nm(layer, nm)
                if nm_zero is None:
                    res.skip(layer.ref.name, "sparsify_nm", why)
                else:
                    mask = nm_zero if mask is None else (mask | nm_zero)
                    rule.append(f"nm {nm[0]}:{nm[1]}")
            if mask is None:
                continue
            w = layer.ref.values
            before = int(np.count_nonzero(w == 0))
            new = np.where(mask, np.zeros((), w.dtype), w).astype(w.dtype, copy=False)
            after = int(np.count_nonzero(new == 0))
            rows[layer.ref.name] = {"roles": sorted({u.role for u in layer.uses}), "shape": list(w.shape),
                                    "rule": ", ".join(r for r in rule if r), "zeroed": after - before,
                                    "sparsity_before": round(before / max(w.size, 1), 6),
                                    "sparsity": round(after / max(w.size, 1), 6)}
            if after != before:
                layer.ref.constant.values = new
                res.changed(f"{layer.ref.name}: sparsity {before / w.size:.3f} -> {after / w.size:.3f}")
        res.details["tensors"] = rows
        res.details["left_alone"] = left_alone
        total = sum(int(np.prod(r["shape"])) for r in rows.values())
        zeros = sum(round(r["sparsity"] * int(np.prod(r["shape"]))) for r in rows.values())
        res.details["sparsity"] = round(zeros / total, 6) if total else 0.0
        return res

    @staticmethod
    def _refusal(ref: WeightRef, uses: list[Use], cfg: SparsifyConfig) -> str | None:
        """Why this weight may not be pruned, or None."""
        if is_graph_io(ref.tensor, ref.graph):
            return "the weight is a graph output"
        unknown = [u for u in uses if u.role == "unknown"]
        if unknown:
            return unknown[0].why
        excluded = sorted({u.role for u in uses if u.role in ROLES and u.role not in cfg.include})
        if excluded:
            return f"shared with a use as {', '.join(excluded)}, which is left alone (see include)"
        return None

    @staticmethod
    def _magnitude_masks(layers: list[_Layer], cfg: SparsifyConfig,
                         res: PassResult) -> tuple[dict[int, np.ndarray | None], dict[str, str]]:
        """Masks of the active magnitude rule by layer (None: no magnitude rule) and each layer's rule."""
        out: dict[int, np.ndarray | None] = {id(layer): None for layer in layers}
        rules: dict[str, str] = {}
        rule = cfg.rule
        if rule is None:
            return out, rules
        pooled = []
        for layer in layers:
            a = np.abs(layer.ref.values.astype(np.float64))
            value = layer.override.value if layer.override is not None and layer.override.value is not None else None
            if rule == "ratio" and cfg.scope == "global" and value is None:
                pooled.append((layer, a))
                continue
            param = value if value is not None else getattr(cfg, rule)
            if rule == "ratio":
                out[id(layer)] = magnitude_mask(a, int(np.floor(param * a.size)))
                rules[layer.ref.name] = f"ratio {param:g}"
            elif rule == "keep_top":
                out[id(layer)] = magnitude_mask(a, max(a.size - int(param), 0))
                rules[layer.ref.name] = f"keep_top {int(param)}"
            else:
                t = param * float(layer.ref.values.astype(np.float64).std()) if cfg.threshold_mode == "std" else param
                out[id(layer)] = a < t
                rules[layer.ref.name] = f"threshold {t:.6g}"
        if pooled:
            flat = np.concatenate([a.ravel() for _, a in pooled])
            k = int(np.floor(cfg.ratio * flat.size))
            mask = magnitude_mask(flat, k)
            cut = float(np.sort(flat, kind="stable")[k - 1]) if k > 0 else 0.0
            res.details["global_threshold"] = cut
            start = 0
            for layer, a in pooled:
                out[id(layer)] = mask[start:start + a.size].reshape(a.shape)
                start += a.size
                rules[layer.ref.name] = f"ratio {cfg.ratio:g} global"
        return out, rules

    @staticmethod
    def _nm(layer: _Layer, nm: tuple[int, int]) -> tuple[np.ndarray | None, str]:
        reduction = layer.reduction
        if any(u.reduction is None for u in layer.uses) or reduction is None:
            why = next((u.why for u in layer.uses if u.why), "its uses disagree on the reduction axis")
            return None, why or "no reduction axis for this use"
        a = np.abs(layer.ref.values)
        size = int(np.prod([a.shape[i] for i in reduction], dtype=np.int64))
        if size % nm[1]:
            return None, f"reduction size {size} is not a multiple of M={nm[1]}"
        return nm_mask(a, nm[0], nm[1], reduction), ""
