"""``prune_channels``: structured pruning of whole output channels / neurons, by dependency group.

Rule
----
For every dependency group (:mod:`onnxcompress.prune.dependency`) that no unknown op blocks, and for
each partition of its units (units touching the same tensors and grouped-conv chunks)::

    n_keep = max(1, n - floor(R * n))                  R = --prune-channels
    n_keep = min(n, ceil(n_keep / N) * N)              N = --round-to (a partition too small keeps all)
    keep   = the n_keep units of highest importance    (--prune-importance, ties -> lower index)

and every coupled tensor is shrunk to the kept units: producer weight rows and biases,
BatchNormalization parameters, per-channel constants of elementwise ops, every consumer's input
rows/columns (grouped Conv per group, depthwise Conv's ``group`` updated), Split sizes and explicit
Reshape sizes. A removed channel ``c`` of a layer ``y = f(W x + b)`` changes the next layer's input
by ``x_c`` exactly: pruning channels whose producer rows and biases are all zero (so ``f(0)`` feeds
zero weight columns, for ``f`` with ``f(0) = 0``) is lossless, and ``R = 0`` is the identity.

**Bias correction** (with calibration data, ``bias_correction``): a removed channel ``c`` read by a
next layer ``z = V x + d`` took ``V[:, c] x_c`` away; its mean part is put back into the bias,
``d' = d + Σ_removed E[x_c] V[:, c]`` (for a Conv reader ``d'_o = d_o + Σ_c E[x_c] Σ_k W[o, c, k]``, exact
away from the zero-padded borders). This needs a bias to add to: Gemm's C, Conv's bias, the
constant Add that follows a MatMul, or — for a reader without bias followed by BatchNormalization —
that BN's running mean (``BN(z + d; mean) = BN(z; mean - d)``); other readers are left as they are
(listed in the plan).
The statistics are measured once, on the unpruned model. Measured on the digits MLP (300-100): it
helps at 25% (l1 0.967 -> 0.976) and rescues activation importance at 50% (0.31 -> 0.84), but costs
a little with l1 at 50% (0.89 -> 0.88) and collapses the outputs toward their mean at 75%, so it is
off by default.

**Per-group overrides** (``overrides``, ``--prune-channels-override``): ``PATTERN=VALUE``, ``PATTERN`` an
fnmatch glob on the name of a layer that *writes* the group's channels (its node, e.g. ``conv3``, or its
weight), ``VALUE`` ``skip`` or that group's ``R``; the first matching override wins. A uniform ``R``
is the default because channel importance is not comparable across layers; but where the channels
are taken from decides the speed-up as much as how many (onnxruntime pads NCHWc convolutions to its
16-channel block: see docs/benchmarks.md, prune-allocation), so an engineer who knows the target
runtime can spend the budget where it pays. A pattern that matches no prunable group is reported, and
so are Convs whose output channels were a multiple of 16 and no longer are (``NCHWC_BLOCK``; the
speed-up they lose is measured there).

The plan (``details["groups"]``) lists, per group, the layers, the channel counts and the kept
element indices per tensor name (``keep``); :func:`replay_plan` applies it to a graph with the same
names (e.g. another checkpoint of the same architecture). ``details`` also gives parameters and
FLOPs (Conv/ConvTranspose/Gemm/MatMul multiply-adds × 2) before and after, from shape inference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcompress.errors import PreconditionError, RecipeError
from onnxcompress.passes.base import Pass, PassResult, cleanup_graph
from onnxcompress.graph.query import consumers, name_matches
from onnxcompress.prune.dependency import (
    DependencyGraph,
    Group,
    ParamWriter,
    apply_keep,
    build_dependency_graph,
    eval_const,
    infer_dims,
)
from onnxcompress.prune.importance import (
    IMPORTANCE_METHODS,
    ChannelStats,
    activation_inputs,
    activation_means,
    unit_scores,
)
from onnxcompress.prune.sparsity import Override, parse_override
from onnxcompress.recipe import StepConfig, option

__all__ = [
    "PruneChannelsConfig",
    "PruneChannelsPass",
    "keep_count",
    "select_units",
    "model_cost",
    "replay_plan",
    "group_skip_reason",
    "writer_names",
    "correct_biases",
]

log = logging.getLogger("onnxcompress")


@dataclass(frozen=True)
class PruneChannelsConfig(StepConfig):
    name = "prune_channels"
    order = 30

    ratio: float = option(0.3, "fraction of the channels of every dependency group to remove (structured "
                               "pruning: whole conv channels / neurons, with every coupled tensor)",
                          flag="--prune-channels", minimum=0.0, maximum=0.99, metavar="R")
    importance: str = option("l1", "channel importance: l1 / l2 filter norm, bn = |BatchNorm gamma|, "
                                   "activation = mean |activation| x next-layer weight norm on the calibration data",
                             flag="--prune-importance", choices=IMPORTANCE_METHODS)
    round_to: int = option(1, "keep channel counts multiples of N", flag="--round-to", minimum=1, metavar="N")
    bias_correction: bool = option(False, "with calibration data, add the mean contribution of the removed "
                                          "channels to the next layers' biases", flag="--prune-bias-correction")
    calib_batches: int = option(8, "calibration batches read for activation importance", minimum=1)
    exclude: tuple[str, ...] = option((), "layer (node) names or fnmatch patterns whose output "
                                           "channels are left alone, with every layer coupled to them")
    overrides: tuple[str, ...] = option((), "per-group settings PATTERN=VALUE: PATTERN matches a layer that writes "
                                            "the group's channels (node or weight name), VALUE is skip or that "
                                            "group's ratio; first match wins",
                                        flag="--prune-channels-override", metavar="LIST")

    def validate(self) -> None:
        for o in self.parsed_overrides():
            if o.nm is not None or (o.value is not None and o.value > 0.99):
                raise RecipeError(f"override {o.pattern!r}: a channel ratio is a number from 0 to 0.99, or skip",
                                  where="recipe, prune_channels, overrides", hint="e.g. 'conv3=0.75' or 'head*=skip'")

    def parsed_overrides(self) -> tuple[Override, ...]:
        return tuple(parse_override(t, "recipe, prune_channels, overrides") for t in self.overrides)


NCHWC_BLOCK = 16  # onnxruntime's NCHWc channel block on AVX-512 CPUs (8 on AVX2): conv outputs are padded to it


def keep_count(n: int, ratio: float, round_to: int = 1) -> int:
    """How many of ``n`` units stay: at least one, rounded up to a multiple of ``round_to``."""
    n_keep = max(1, n - int(np.floor(ratio * n + 1e-9)))
    if round_to > 1:
        n_keep = min(n, -(-n_keep // round_to) * round_to)
    return n_keep


def select_units(group: Group, scores: np.ndarray, ratio: float, round_to: int = 1) -> np.ndarray:
    """The kept unit ids: per partition, the ``keep_count`` highest-scoring (stable on ties)."""
    units = group.units()
    pos = {int(u): i for i, u in enumerate(units)}
    keep = []
    for part in group.partitions():
        k = keep_count(len(part), ratio, round_to)
        s = scores[[pos[int(u)] for u in part]]
        order = np.argsort(-s, kind="stable")[:k]
        keep.extend(part[np.sort(order)].tolist())
    return np.array(sorted(keep), dtype=np.int64)


def group_skip_reason(group: Group) -> str:
    """One line naming up to three distinct reasons a group is blocked."""
    seen: list[str] = []
    for node, reason in group.blocked:
        line = f"{node}: {reason}"
        if line not in seen:
            seen.append(line)
    more = f" (+{len(seen) - 3} more)" if len(seen) > 3 else ""
    return "; ".join(seen[:3]) + more


# ----------------------------------------------------------------------------------------------
# cost


def _known(dims: list | None) -> list[int] | None:
    if dims is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in dims]


def model_cost(model: onnx.ModelProto, dims: dict[str, list] | None = None) -> dict[str, int]:
    """``params``: elements of float constants (initializers, Constant and ConstantOfShape outputs);
    ``flops``: 2 × multiply-adds of Conv, ConvTranspose, Gemm and MatMul (symbolic dims count as 1)."""
    dims = infer_dims(model) if dims is None else dims
    g = model.graph
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                   onnx.TensorProto.BFLOAT16}
    params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in g.initializer if t.data_type in float_types)
    flops = 0
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in float_types:
                    params += int(np.prod(a.t.dims, dtype=np.int64))
        elif n.op_type == "ConstantOfShape":
            d = _known(dims.get(n.output[0]))
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if d is not None and (value is None or value.data_type in float_types):
                params += int(np.prod(d, dtype=np.int64))
        elif n.op_type in ("Conv", "ConvTranspose"):
            w, y = _known(dims.get(n.input[1])), _known(dims.get(n.output[0]))
            x = _known(dims.get(n.input[0]))
            if w is None or y is None or x is None:
                continue
            if n.op_type == "Conv":  # every output element: Cin/g * k multiply-adds
                flops += 2 * int(np.prod(y, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
            else:  # every input element spreads over Cout/g * k outputs
                flops += 2 * int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif n.op_type in ("Gemm", "MatMul"):
            a, y = _known(dims.get(n.input[0])), _known(dims.get(n.output[0]))
            if a is None or y is None or not a:
                continue
            trans_a = next((a_.i for a_ in n.attribute if a_.name == "transA"), 0)
            k = a[0] if (n.op_type == "Gemm" and trans_a) else a[-1]
            flops += 2 * int(np.prod(y, dtype=np.int64)) * k
    return {"params": int(params), "flops": int(flops)}


def _graph_cost(graph: gs.Graph, template: onnx.ModelProto | None) -> dict[str, int]:
    from onnxcompress.graph.io import graph_to_model

    g = cleanup_graph(graph.copy())
    return model_cost(graph_to_model(g, template))


# ----------------------------------------------------------------------------------------------
# the pass


class PruneChannelsPass(Pass):
    config_cls = PruneChannelsConfig
    lossless = False

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        cfg = self.config
        model = ctx.model_of(graph)
        dg = build_dependency_graph(graph, model)
        self.note_unmatched(ctx, graph, "exclude", names=[n for g in dg.groups if g.prunable for n in _layers(g)],
                            what="layer writing a prunable group's channels")
        before = model_cost(model, dg.dims)
        method, activations = self._importance(dg, model, ctx)
        writer = ParamWriter(graph)
        plan, fallback, unaligned = [], [], []
        overrides, matched = cfg.parsed_overrides(), set()
        writers = {id(g): writer_names(g) for g in dg.groups}  # before pruning one group renames another's weights
        for group in dg.groups:
            reason = self._may_prune(group)
            if reason is not None:
                if reason:
                    res.skip(group.name, "prune_channels", reason)
                continue
            override = next((o for o in overrides if o.matches(writers[id(group)])), None)
            if override is not None:
                matched.add(override.pattern)
                if override.skip:
                    res.skip(group.name, "prune_channels", f"override {override.pattern!r} says skip")
                    continue
            ratio = cfg.ratio if override is None else override.value
            scores = unit_scores(group, method, activations=activations)
            used = method
            if scores is None:
                used = "l1"
                scores = unit_scores(group, "l1")
                fallback.append(group.name)
            units = group.units()
            keep = select_units(group, scores, ratio, cfg.round_to)
            if len(keep) == len(units):
                if ratio > 0:
                    res.skip(group.name, "prune_channels",
                             f"{len(units)} channels: none to remove at ratio {ratio} (round-to {cfg.round_to})")
                continue
            corrected = correct_biases(group, keep, activations, writer) \
                if cfg.bias_correction and activations else None
            unaligned += _unaligned_convs(group, keep)
            kept = apply_keep(graph, group, keep, writer)
            res.changed(f"{group.name}: kept {len(keep)} of {len(units)} channels "
                        f"({', '.join(group.layers()[:4])}{', ...' if len(group.layers()) > 4 else ''})")
            plan.append({"group": group.name, "layers": group.layers(), "channels": int(len(units)),
                         "kept": int(len(keep)), "importance": used, "keep": kept,
                         **({"ratio": ratio, "override": override.pattern} if override is not None else {}),
                         **({"bias_corrected": corrected} if corrected is not None else {})})
        if unaligned:
            ctx.note(f"prune_channels: {len(unaligned)} Conv(s) ({', '.join(unaligned[:3])}"
                     f"{', ...' if len(unaligned) > 3 else ''}) had a multiple of {NCHWC_BLOCK} output channels and "
                     f"now do not: onnxruntime's CPU NCHWc convolutions compute such layers padded "
                     f"to their block (16 channels with AVX-512, 8 with AVX2), so they speed up less than their "
                     f"FLOPs fall; --round-to {NCHWC_BLOCK} keeps counts aligned")
        for o in overrides:
            if o.pattern not in matched:
                ctx.note(f"prune_channels: override {o.pattern!r} matches no layer that writes a prunable group's "
                         "channels (patterns match the producing node or its weight)")
        if fallback and method == "bn":
            ctx.note(f"prune_channels: {len(fallback)} group(s) have no BatchNormalization (folded by an earlier "
                     "pass such as fuse?), so they were scored by l1 instead of bn")
        after = _graph_cost(graph, ctx.original.model if ctx.original is not None else None) if plan else before
        log.info("prune_channels: %d group(s) pruned; params %d -> %d, FLOPs %d -> %d", len(plan), before["params"],
                 after["params"], before["flops"], after["flops"])
        res.details = {
            "ratio": cfg.ratio, "importance": method, "round_to": cfg.round_to,
            "groups": plan,
            "params_before": before["params"], "params_after": after["params"],
            "flops_before": before["flops"], "flops_after": after["flops"],
        }
        return res

    def _may_prune(self, group: Group) -> str | None:
        """None when the group may be pruned; '' to pass silently; else the reason."""
        if group.blocked:
            return group_skip_reason(group)
        if not group.prunable:
            return ""
        excluded = sorted({pat for pat in self.config.exclude for n in _layers(group) if name_matches(n, pat)})
        if excluded:
            return f"excluded by the recipe ({', '.join(excluded)})"
        return None

    def _importance(self, dg: DependencyGraph, model, ctx) -> tuple[str, dict[str, ChannelStats] | None]:
        """The importance actually used and, with calibration data, the channel statistics of
        every tensor a next layer reads (for activation importance and bias correction)."""
        cfg = self.config
        if cfg.importance != "activation" and not cfg.bias_correction:
            return cfg.importance, None
        feeds = ctx.feeds(model)
        if feeds is None:
            if cfg.importance == "activation":
                ctx.note("prune_channels: no calibration data, so channel importance is l1 instead of activation")
                return "l1", None
            return cfg.importance, None
        targets = {}
        for g in dg.groups:
            if g.prunable and not g.blocked:
                targets.update({s.name: s.axis for s in activation_inputs(g)})
        if not targets:
            return cfg.importance, {}
        return cfg.importance, activation_means(model, targets, feeds, max_batches=cfg.calib_batches,
                                                    base_dir=ctx.base_dir)


def _layers(group: Group) -> list[str]:
    """The layers (nodes) that write ``group``'s channels: what ``exclude`` names."""
    return [p.node.name for p in group.params if p.role in ("out", "dw") and p.node.name]


def writer_names(group: Group) -> list[str]:
    """The nodes writing the group's channels, each followed by its weight's name: what an override pattern
    is matched against."""
    names = []
    for p in group.params:
        if p.role in ("out", "dw"):
            names += [p.node.name, p.node.inputs[p.slot].name]
    return names


def _unaligned_convs(group: Group, keep: np.ndarray) -> list[str]:
    """Convs writing the group whose output channels were a multiple of ``NCHWC_BLOCK`` and with ``keep``
    no longer are (onnxruntime computes them padded back to the block)."""
    return [p.node.name for p in group.params
            if p.role == "out" and p.slot == 1 and p.node.op == "Conv" and p.space.size % NCHWC_BLOCK == 0
            and len(group.kept_elements(p.space, keep)) % NCHWC_BLOCK]


def correct_biases(group: Group, keep_units: np.ndarray, stats: dict[str, ChannelStats],
                   writer: ParamWriter) -> dict[str, str]:
    """Add ``Σ_removed E[x_c] V[:, c]`` to the bias of every next layer; ``{layer: "ok" | reason}``."""
    done: dict[str, str] = {}
    for p in group.params:
        if p.role != "in" or p.space.name not in stats:
            continue
        node = p.node
        if p.chunks > 1 or node.op not in ("Gemm", "MatMul", "Conv"):
            done[node.name] = f"not for a {'grouped ' if p.chunks > 1 else ''}{node.op}"
            continue
        removed = np.setdiff1d(np.arange(p.space.size), group.kept_elements(p.space, keep_units))
        if not len(removed):
            continue
        v = np.asarray(eval_const(node.inputs[p.slot]), dtype=np.float64)
        rows = np.moveaxis(np.take(v, removed, axis=p.axis), p.axis, 0)
        delta = np.tensordot(stats[p.space.name].mean[removed], rows, axes=(0, 0))
        if node.op == "Conv":
            delta = delta.reshape(delta.shape[0], -1).sum(axis=1)
        done[node.name] = _add_to_bias(node, delta, writer)
    return done


def _add_to_bias(node: gs.Node, delta: np.ndarray, writer: ParamWriter) -> str:
    """Add ``delta`` (one value per output channel) to the layer's bias, or subtract it from the
    running mean of the BatchNormalization that follows a layer without bias."""
    readers = consumers(node.outputs[0])
    has_bias = node.op != "MatMul" and len(node.inputs) > 2 and bool(node.inputs[2].name)
    if not has_bias and len(readers) == 1 and readers[0].op == "BatchNormalization" \
            and readers[0].inputs[0] is node.outputs[0]:
        # BN(z + d) with running mean m is BN(z) with running mean m - d
        bn = readers[0]
        mean = eval_const(bn.inputs[3])
        if mean is None or mean.shape != delta.shape:
            return "the BatchNormalization after it has no per-channel constant mean"
        writer.write(bn, 3, (mean - delta).astype(mean.dtype), ("bias_correction", id(bn), len(writer.cache)))
        return "ok"
    if node.op == "MatMul":
        if len(readers) != 1 or readers[0].op != "Add":
            return "no bias Add after the MatMul"
        target = readers[0]
        slot = next((i for i, t in enumerate(target.inputs) if t is not node.outputs[0]), None)
    else:
        target, slot = node, 2
    if slot is None or len(target.inputs) <= slot or not target.inputs[slot].name:
        return "the layer has no bias"
    bias = eval_const(target.inputs[slot])
    if bias is None or (bias.ndim and bias.shape[-1] not in (1, len(delta))) or (node.op == "Conv" and bias.ndim != 1):
        return "the bias is not a per-channel constant"
    new = (bias + delta).astype(bias.dtype)
    if new.shape != bias.shape:
        return "the bias would change shape"
    writer.write(target, slot, new, ("bias_correction", id(node), len(writer.cache)))
    return "ok"


def replay_plan(graph: gs.Graph, plan: dict[str, Any] | list, *, dims: dict | None = None) -> PassResult:
    """Apply the kept indices of a ``prune_channels`` plan (its ``details`` or ``details["groups"]``)
    to ``graph``, matched by tensor name. A plan entry whose tensors are missing or whose group
    differs here raises PreconditionError."""
    entries = plan["groups"] if isinstance(plan, dict) else plan
    dg = build_dependency_graph(graph, dims=dims)
    by_tensor = {s.name: (g, s) for g in dg.groups for s in g.spaces}
    writer = ParamWriter(graph)
    res = PassResult()
    for entry in entries:
        name = entry["group"]
        found = [(by_tensor[t], idx) for t, idx in entry["keep"].items() if t in by_tensor]
        if not found:
            raise PreconditionError(f"plan group {name!r}: none of its tensors is in this graph",
                                    where="replay_plan", hint="replay plans on models with the same tensor names")
        group = found[0][0][0]
        if group.blocked:
            raise PreconditionError(f"plan group {name!r} is blocked here: {group_skip_reason(group)}",
                                    where="replay_plan")
        keep_sets = []
        for (g, s), idx in found:
            if g is not group:
                raise PreconditionError(f"plan group {name!r} spans several groups in this graph", where="replay_plan")
            if idx and max(idx) >= s.size:
                raise PreconditionError(f"plan group {name!r}: {s.name} has {s.size} channels here, "
                                        f"the plan keeps index {max(idx)}", where="replay_plan")
            keep_sets.append(set(np.unique(group.unit_ids(s)[np.array(idx, dtype=np.int64)]).tolist()))
        keep = np.array(sorted(set.union(*keep_sets)), dtype=np.int64)
        apply_keep(graph, group, keep, writer)
        res.changed(f"{name}: kept {len(keep)} of {len(group.units())} channels (replayed)")
    return res
