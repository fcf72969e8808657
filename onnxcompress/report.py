"""The report: sizes, parameter and byte counts by dtype, sparsity, op changes, steps, parity.

Sizes are measured on the ModelProto: ``size_bytes`` is what the model occupies serialized (the
protobuf plus external data); ``tensor_bytes`` is the part that is tensor payload. ``params`` counts
the stored elements of every tensor (initializers, Constant nodes, subgraphs). ``sparsity`` is the
fraction of exact zeros among stored float weight elements (tensors of at least 16 elements, inline
or external). The report also records the resolved recipe, the seed and the versions of
onnxcompress, onnx and onnxruntime, so a run can be replayed.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxcompress.graph.io import (
    _external_info,
    _is_external,
    _tensor_nbytes,
    external_path,
    iter_graph_protos,
    iter_tensor_protos,
)

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs

    from onnxcompress.passes.base import Pass, PassResult

__all__ = ["ModelStats", "StepRecord", "Report", "versions"]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                onnx.TensorProto.DOUBLE: np.float64}


def versions() -> dict[str, str]:
    import onnxruntime

    from onnxcompress import __version__

    return {"onnxcompress": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _op_counts(graph: onnx.GraphProto, counts: Counter) -> Counter:
    for g in iter_graph_protos(graph):
        for n in g.node:
            counts[n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"] += 1
    return counts


@dataclass
class ModelStats:
    size_bytes: int
    tensor_bytes: int
    params: int
    bytes_by_dtype: dict[str, int]
    sparsity: float | None
    nodes: int
    op_counts: dict[str, int]

    @classmethod
    def of_model(cls, model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> "ModelStats":
        by_dtype: Counter = Counter()
        params = 0
        tensor_bytes = 0
        external = 0
        zeros = floats = 0
        for t, _ in iter_tensor_protos(model.graph):
            nbytes = _tensor_nbytes(t)
            tensor_bytes += nbytes
            if _is_external(t):
                external += nbytes
            by_dtype[onnx.TensorProto.DataType.Name(t.data_type).lower()] += nbytes
            n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
            params += n
            if t.data_type in _FLOAT_TYPES and n >= 16:
                arr = _float_payload(t, base_dir)
                if arr is not None:
                    zeros += int(np.count_nonzero(arr == 0))
                    floats += arr.size
        counts = _op_counts(model.graph, Counter())
        return cls(
            size_bytes=model.ByteSize() + external,
            tensor_bytes=tensor_bytes,
            params=params,
            bytes_by_dtype=dict(sorted(by_dtype.items(), key=lambda kv: -kv[1])),
            sparsity=(zeros / floats) if floats else None,
            nodes=sum(counts.values()),
            op_counts=dict(sorted(counts.items())),
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _float_payload(t: onnx.TensorProto, base_dir) -> np.ndarray | None:
    dtype = _FLOAT_TYPES[t.data_type]
    if _is_external(t):
        if base_dir is None and "basepath" not in {e.key for e in t.external_data}:
            return None
        info = _external_info(t)
        path = external_path(t, base_dir)
        try:
            return np.fromfile(path, dtype=dtype, count=int(info.get("length", 0)) // np.dtype(dtype).itemsize,
                               offset=int(info.get("offset", 0) or 0))
        except (OSError, ValueError):
            return None
    if t.HasField("raw_data"):
        return np.frombuffer(t.raw_data, dtype=dtype)
    if t.data_type == onnx.TensorProto.FLOAT16:
        return np.array(t.int32_data, dtype=np.uint16).view(np.float16)
    return np.asarray(t.double_data if t.data_type == onnx.TensorProto.DOUBLE else t.float_data, dtype=dtype)


@dataclass
class StepRecord:
    name: str
    config: dict[str, Any]
    modified: bool
    changes: list[str]
    skipped: list[dict[str, str]]
    details: dict[str, Any]
    seconds: float
    nodes_after: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Report:
    recipe: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    versions: dict[str, str] = field(default_factory=versions)
    input: ModelStats | None = None
    output: ModelStats | None = None
    steps: list[StepRecord] = field(default_factory=list)
    parity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add_step(self, p: "Pass", result: "PassResult", graph: "gs.Graph", seconds: float) -> None:
        from onnxcompress.graph.query import iter_graphs

        self.steps.append(StepRecord(
            name=p.name,
            config=p.config.to_dict(),
            modified=result.modified,
            changes=list(result.changes),
            skipped=[s.to_dict() for s in result.skipped],
            details=result.details,
            seconds=round(seconds, 4),
            nodes_after=sum(len(g.nodes) for g in iter_graphs(graph)),
        ))

    # -- views ----------------------------------------------------------------------------------

    @property
    def ratio(self) -> float | None:
        if self.input and self.output and self.output.size_bytes:
            return self.input.size_bytes / self.output.size_bytes
        return None

    def op_changes(self) -> dict[str, int]:
        if not (self.input and self.output):
            return {}
        a, b = Counter(self.input.op_counts), Counter(self.output.op_counts)
        return {k: b[k] - a[k] for k in sorted(set(a) | set(b)) if b[k] != a[k]}

    def decoded_sparsity(self) -> float | None:
        """Zeros among the weights compact storage examined, as they decode at load (None if it did not run
        or encoded nothing)."""
        rec = self.step("compact_storage")
        table = (rec.details.get("tensors") or {}) if rec is not None else {}
        encoded = [r for r in table.values() if r.get("encoding", "dense") != "dense"]
        if not encoded:
            return None
        total = sum(int(np.prod(r["shape"])) for r in table.values())
        nonzero = sum(int(r["nonzero"]) for r in table.values())
        return 1 - nonzero / total if total else None

    def step(self, name: str) -> StepRecord | None:
        return next((s for s in self.steps if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "seed": self.seed,
            "versions": self.versions,
            "input": self.input.to_dict() if self.input else None,
            "output": self.output.to_dict() if self.output else None,
            "ratio": self.ratio,
            "op_changes": self.op_changes(),
            "steps": [s.to_dict() for s in self.steps],
            "parity": self.parity,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=_json_default)
        if path is not None:
            from onnxcompress.graph.io import write_text_atomic

            write_text_atomic(Path(path), text + "\n")
        return text

    def summary(self) -> str:
        """A short human-readable summary (what the CLI prints)."""
        lines = []
        i, o = self.input, self.output
        if i and o:
            ratio = self.ratio or 0.0
            lines.append(f"size      {_human(i.size_bytes)} -> {_human(o.size_bytes)}  ({ratio:.2f}x smaller)"
                         if ratio >= 1 else
                         f"size      {_human(i.size_bytes)} -> {_human(o.size_bytes)}  ({1 / ratio:.2f}x larger)")
            lines.append(f"params    {i.params:,} -> {o.params:,}")
            lines.append("by dtype  " + ", ".join(f"{k} {_human(v)}" for k, v in o.bytes_by_dtype.items()))
            decoded = self.decoded_sparsity()
            if decoded is not None:
                lines.append(f"sparsity  {100 * (i.sparsity or 0):.1f}% -> {100 * decoded:.1f}% zeros in the weights "
                             "(as decoded at load; compact storage keeps only the non-zeros)")
            elif o.sparsity is not None:
                lines.append(f"sparsity  {100 * (i.sparsity or 0):.1f}% -> {100 * o.sparsity:.1f}% zeros in float weights")
            lines.append(f"nodes     {i.nodes} -> {o.nodes}")
            changes = self.op_changes()
            if changes:
                lines.append("ops       " + ", ".join(f"{k} {v:+d}" for k, v in changes.items()))
        for s in self.steps:
            status = f"{len(s.changes)} changes" if s.modified else "no change"
            skipped = f", {len(s.skipped)} skipped" if s.skipped else ""
            lines.append(f"step      {s.name}: {status}{skipped} ({s.seconds:.2f}s)")
        if self.parity is not None:
            lines.append(f"parity    {'PASSED' if self.parity.get('passed') else 'FAILED'}")
            for line in self.parity.get("summary", "").splitlines():
                lines.append(f"          {line}")
        for n in self.notes:
            lines.append(f"note      {n}")
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        v = float(o)
        return v if np.isfinite(v) else str(v)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)
