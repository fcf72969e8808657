"""``merge_neurons``: cluster a layer's neurons and keep one representative per cluster.

Rule
----
Take a layer whose output channels ``j`` are ``y_j = f_j(w_j · x + b_j)`` (``w_j`` the incoming
weight row of a Gemm/MatMul/Conv, ``b_j`` its bias, ``f_j`` the chain of per-channel ops up to the
next layers — BatchNormalization, Relu, pools, Add/Mul of per-channel constants, Flatten) and the
next layers ``z = Σ_j V[:, j] y_j`` (every reader of the channels, found with the channel dependency
groups of :mod:`onnxcompress.prune.dependency`).

1. Describe neuron ``j`` by ``u_j = [w_j, b_j, every per-channel parameter of its chain]``.
2. Cluster the ``u_j`` with k-means (scikit-learn, fixed seed; exact duplicates are collapsed
   first, so identical neurons always land in one cluster), ``k = n - floor(R · n)``. Neurons with
   more than 256 features are clustered on a seeded Gaussian random projection to 256 dimensions
   (Johnson–Lindenstrauss: distances kept up to a small factor), which keeps AlexNet-sized layers fast.
   When a layer has fewer distinct neurons than ``k``, only identical ones are merged — all of them,
   which can remove more than ``R`` (exactly, so it costs nothing).
3. In each cluster ``C`` keep the member ``r`` nearest to the centroid and fold the others into it::

       V'[:, r] = Σ_{j ∈ C} α_j V[:, j]          then remove the neurons j ≠ r (structured pruning)

   with ``α_j = 1``. **Exact** when the members are identical (``u_j = u_r`` ⇒ ``y_j = y_r`` for
   *any* chain of per-channel ops ``f``), approximate otherwise (error ≤ Lip(f)·|u_j − u_r|·|x|·|V_j|).
4. ``scaled`` (default on): when every op of the chain is positively homogeneous
   (``f(α z) = α f(z)`` for ``α > 0``: Relu, LeakyRelu, Identity, Dropout, Max/Average pools,
   Flatten/Reshape/Squeeze/Unsqueeze/Transpose, and an Add of a per-channel bias straight after the
   layer, whose bias is part of ``u``), neurons are clustered by direction ``u_j / |u_j|`` and
   ``α_j = <u_j, u_r> / <u_r, u_r>`` (kept only when > 0, else 1): a neuron that is a positive
   multiple of another (``u_j = α u_r``) then merges exactly too. ReLU is not homogeneous for
   ``α < 0`` and BatchNormalization/Sigmoid/Tanh are not homogeneous at all, so those chains use
   ``α = 1`` and cluster the raw ``u``.

Merging is offered only where it holds: one layer writes the channels (no residual Add or Concat of
several layers), no grouped or depthwise convolution and no Split in the chain; other groups are
skipped with the reason. The graph shrinks like structured pruning (same dependency groups, same
kept-index plan in ``details``), and the neurons removed are recorded per cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcompress.graph.query import consumers, name_matches, producer
from onnxcompress.passes.base import Pass, PassResult
from onnxcompress.prune.channels import group_skip_reason, keep_count
from onnxcompress.prune.dependency import Group, Param, ParamWriter, apply_keep, build_dependency_graph, eval_const
from onnxcompress.recipe import StepConfig, option

__all__ = ["MergeNeuronsConfig", "MergeNeuronsPass", "cluster_neurons", "merge_check"]

#: k-means runs on a random projection to this many dimensions for wider neurons
_MAX_DIMS = 256

_HOMOGENEOUS = {"Relu", "LeakyRelu", "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
                "GlobalMaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"}


@dataclass(frozen=True)
class MergeNeuronsConfig(StepConfig):
    name = "merge_neurons"
    order = 31

    ratio: float = option(0.25, "fraction of the neurons / channels of each layer merged into others "
                                "(k-means over incoming weights and bias; outgoing weights are added)",
                          flag="--merge-neurons", minimum=0.0, maximum=0.99, metavar="R")
    scaled: bool = option(True, "through positively homogeneous chains (Relu, pools), also merge neurons that "
                                "are positive multiples of each other (cluster by direction)")
    exclude: tuple[str, ...] = option((), "layer (node) names or fnmatch patterns whose neurons are "
                                           "left alone")


def _layer(group: Group) -> str:
    """The layer whose neurons form ``group``: what ``exclude`` names."""
    return next((p.node.name for p in group.params if p.role == "out"), group.name)


def _rows(value: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.asarray(value, dtype=np.float64), axis, 0).reshape(value.shape[axis], -1)


def _chain_nodes(group: Group) -> list[gs.Node]:
    """The ops between the layer and its readers (every node touching a space, minus the layers)."""
    layers = {id(p.node) for p in group.params if p.role in ("out", "in")}
    seen, out = set(), []
    for s in group.spaces:
        for n in [producer(s.tensor), *consumers(s.tensor)]:
            if n is not None and id(n) not in layers and id(n) not in seen:
                seen.add(id(n))
                out.append(n)
    return out


def merge_check(group: Group) -> str | None:
    """None when the group's neurons may be merged, else the reason."""
    if group.blocked:
        return group_skip_reason(group)
    writers = {p.node.name for p in group.params if p.role == "out"}
    if len(writers) != 1:
        return f"several layers write these channels ({', '.join(sorted(writers))}): residual or concat"
    if any(p.role == "dw" for p in group.params):
        return "a depthwise convolution is in the chain"
    if any(s.chunks > 1 for s in group.spaces):
        return "a grouped convolution writes or reads these channels"
    if any(f.kind == "split" for f in group.fixups):
        return "a Split divides these channels"
    if not any(p.role == "in" for p in group.params):
        return "no next layer reads these channels"
    return None


def _homogeneous(group: Group) -> bool:
    layer = next(p.node for p in group.params if p.role == "out")
    for n in _chain_nodes(group):
        if n.op in _HOMOGENEOUS:
            continue
        if n.op == "Add" and any(t is layer.outputs[0] for t in n.inputs) \
                and all(eval_const(t) is not None for t in n.inputs if t is not layer.outputs[0]):
            continue
        return False
    return True


def _features(group: Group, units: np.ndarray) -> np.ndarray:
    """``u_j``: the concatenated per-channel parameters of every unit (rows of the same length)."""
    pos = {int(u): i for i, u in enumerate(units)}
    parts = []
    for p in group.params:
        if p.role not in ("out", "bn", "ew"):
            continue
        rows = _rows(eval_const(p.node.inputs[p.slot]), p.axis)
        block = np.zeros((len(units), rows.shape[1]))
        for e, u in enumerate(group.unit_ids(p.space)):
            block[pos[int(u)]] = rows[e]
        parts.append(block)
    return np.concatenate(parts, axis=1)


def cluster_neurons(features: np.ndarray, k: int, *, seed: int, by_direction: bool) -> list[tuple[int, list[int]]]:
    """``[(representative, members)]`` (row indices): exact duplicates first, then k-means into ``k``."""
    from sklearn.cluster import KMeans

    x = features
    if by_direction:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.where(norm > 0, x / np.where(norm > 0, norm, 1), 0)
    uniq, inverse, counts = np.unique(np.round(x, 7), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if len(uniq) <= k:
        labels = inverse
        centers = uniq
    else:
        if x.shape[1] > _MAX_DIMS:  # wide layers: cluster a seeded random projection (distances kept ~)
            proj = np.random.default_rng(seed).standard_normal((x.shape[1], _MAX_DIMS)) / np.sqrt(_MAX_DIMS)
            x, uniq = x @ proj, uniq @ proj
        km = KMeans(n_clusters=k, n_init=4 if len(uniq) <= 1024 else 1, random_state=seed)
        km.fit(uniq, sample_weight=counts)
        labels = km.labels_[inverse]
        centers = km.cluster_centers_
    clusters = []
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        d = np.linalg.norm(x[members] - centers[c], axis=1)
        rep = int(members[np.argmin(d)])
        clusters.append((rep, sorted(int(m) for m in members)))
    return sorted(clusters)


class MergeNeuronsPass(Pass):
    config_cls = MergeNeuronsConfig
    lossless = False

    def run(self, graph: gs.Graph, ctx) -> PassResult:
        res = PassResult()
        cfg = self.config
        dg = build_dependency_graph(graph, ctx.model_of(graph))
        self.note_unmatched(ctx, graph, "exclude", names=[_layer(g) for g in dg.groups if g.prunable or g.blocked],
                            what="layer whose neurons could merge")
        writer = ParamWriter(graph)
        plan = []
        for group in dg.groups:
            if not group.prunable and not group.blocked:
                continue
            reason = merge_check(group)
            layer = _layer(group)
            if reason is None and any(name_matches(layer, pat) for pat in cfg.exclude):
                reason = "excluded by the recipe"
            if reason is not None:
                res.skip(layer, "merge_neurons", reason)
                continue
            units = group.units()
            k = keep_count(len(units), cfg.ratio)
            if k == len(units):
                if cfg.ratio > 0:
                    res.skip(layer, "merge_neurons", f"{len(units)} neurons: none to merge at ratio {cfg.ratio}")
                continue
            scaled = cfg.scaled and _homogeneous(group)
            feats = _features(group, units)
            seed = int(ctx.rng(f"merge_neurons:{group.name}").integers(2**31 - 1))
            clusters = cluster_neurons(feats, k, seed=seed, by_direction=scaled)
            alpha = self._alphas(feats, clusters, scaled)
            keep = units[[rep for rep, _ in clusters]]
            merges = {int(units[rep]): [(int(units[j]), alpha[j]) for j in members if j != rep]
                      for rep, members in clusters}
            kept = apply_keep(graph, group, np.sort(keep), writer,
                              transform=lambda p, v, g=group, m=merges: _fold_outgoing(g, p, v, m))
            spread = max((float(np.linalg.norm(feats[j] - alpha[j] * feats[rep])) for rep, mem in clusters
                          for j in mem), default=0.0)
            res.changed(f"{layer}: {len(units)} -> {len(keep)} neurons ({'scaled' if scaled else 'equal'} merge, "
                        f"largest |u_j - a_j u_r| {spread:.3g})")
            producer_space = next(p.space for p in group.params if p.role == "out")
            plan.append({"group": group.name, "layer": layer, "neurons": int(len(units)), "kept": int(len(keep)),
                         "scaled": scaled, "max_distance": spread,
                         "clusters": [{"keep": int(group.kept_elements(producer_space, units[[rep]])[0]),
                                       "merged": [int(group.kept_elements(producer_space, units[[j]])[0])
                                                  for j in mem if j != rep],
                                       "alpha": [round(float(alpha[j]), 6) for j in mem if j != rep]}
                                      for rep, mem in clusters if len(mem) > 1],
                         "keep": kept})
        res.details = {"ratio": cfg.ratio, "scaled": cfg.scaled, "groups": plan}
        return res

    @staticmethod
    def _alphas(feats: np.ndarray, clusters, scaled: bool) -> np.ndarray:
        alpha = np.ones(len(feats))
        if not scaled:
            return alpha
        for rep, members in clusters:
            ur = feats[rep]
            denom = float(ur @ ur)
            for j in members:
                a = float(feats[j] @ ur) / denom if denom > 0 else 1.0
                alpha[j] = a if a > 0 else 1.0
        return alpha


def _fold_outgoing(group: Group, p: Param, value: np.ndarray, merges: dict[int, list[tuple[int, float]]]) -> np.ndarray:
    """Readers' weights: add α_j · (input rows of neuron j) into the representative's rows."""
    if p.role != "in":
        return value
    v = np.moveaxis(np.array(value, dtype=np.float64), p.axis, 0)
    uids = group.unit_ids(p.space)
    for rep, members in merges.items():
        rows_r = np.nonzero(uids == rep)[0]
        for j, a in members:
            rows_j = np.nonzero(uids == j)[0]
            v[rows_r] += a * v[rows_j]
    return np.moveaxis(v, 0, p.axis).astype(value.dtype)
