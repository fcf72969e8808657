"""Feeds: the input dictionaries a model is run on, for calibration and for verification.

Three things live here:

* **Input specs** — :func:`input_specs` lists a model's real graph inputs (an input that is also an
  initializer is a constant with a default value, not something to feed) with their numpy dtype and
  shape; a dynamic dimension is ``None`` (unnamed) or its ``dim_param`` string.
* **Random feeds** — :func:`random_feeds` makes one seeded feed dict that the model can actually run on
  (valid token ids, masks of ones), using the shape rule of :func:`resolve_shapes`.
* **Feed sources** — :func:`as_feed_source` turns an ``.npz`` file, a folder, a list or iterable of
  dicts or an onnxruntime-style ``CalibrationDataReader`` into a :class:`FeedSource`: an iterable of
  feed dicts that streams (a folder or a reader is never held in memory all at once).
  :func:`validate_feed` checks one feed against the specs and raises :class:`CalibrationError` with a
  one-line message.

Random values, per input (``rng = numpy.random.default_rng(seed)``, inputs drawn in graph order):

* an input whose name contains ``mask`` (any case, any dtype): all ones (nothing masked);
* float (float16/32/64, bfloat16, float8): standard normal ``N(0, 1)`` drawn in float32, then cast;
* bool: fair coin flips;
* integer: uniform in ``[0, high)`` where ``high`` is the number of rows of the smallest constant table
  the input indexes — the input (possibly through Cast / Reshape / Squeeze / Unsqueeze / Flatten /
  Identity / Expand) reaches ``Gather(table, indices)`` as the indices, with ``table`` an initializer or
  a ``Constant``; ``high = table.shape[axis]``. com.microsoft ``EmbedLayerNormalization`` counts too
  (input_ids index the word table, segment_ids the segment table). Otherwise ``high = 10``.
  ``high`` is clipped to the dtype's range.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from onnxcompress.errors import CalibrationError, ModelError, RecipeError, did_you_mean

__all__ = [
    "InputSpec",
    "FeedSource",
    "read_model",
    "input_specs",
    "resolve_shapes",
    "random_feeds",
    "parse_shape_args",
    "as_feed_source",
    "validate_feed",
    "checked_source",
    "load_feeds",
    "is_float_dtype",
]

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]
Dim = int | str | None

#: Default number of rows for an integer input whose table size cannot be read from the graph.
DEFAULT_INT_HIGH = 10
#: Default value of a sequence-like dynamic dimension (see :func:`resolve_shapes`).
DEFAULT_SEQUENCE = 16
#: A stacked ``.npz`` with at most this many samples is one batch; a larger one is cut into batches
#: of :data:`DEFAULT_BATCH`.
ONE_BATCH_MAX = 64
DEFAULT_BATCH = 32

_SEQUENCE_LIKE = re.compile(r"seq|len|token|time|frame|sentence|word|pos", re.IGNORECASE)
_BATCH_LIKE = re.compile(r"batch|^n$|^b$|^bs$", re.IGNORECASE)
# Ops through which an integer input keeps its values (only its shape or type changes): followed
# from the input to find the Gather that uses it as indices. Values: the input positions followed.
_VALUE_PRESERVING = {
    "Cast": (0,),
    "Reshape": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Flatten": (0,),
    "Identity": (0,),
    "Expand": (0,),
}


# --------------------------------------------------------------------------------------------- model


def read_model(model: onnx.ModelProto | str | os.PathLike | bytes) -> tuple[onnx.ModelProto, str | None]:
    """Return ``(ModelProto, base_dir)`` for a ModelProto, a path or serialized bytes.

    External data is never loaded (tensors keep their references); ``base_dir`` is the folder the
    references are relative to: the file's folder for a path, ``None`` otherwise. Raises
    :class:`ModelError` for a missing file or bytes that are not an ONNX model.
    """
    if isinstance(model, onnx.ModelProto):
        return model, None
    if isinstance(model, (bytes, bytearray)):
        try:
            return onnx.load_from_string(bytes(model)), None
        except Exception as exc:  # protobuf DecodeError and friends
            raise ModelError(
                f"the bytes given are not an ONNX model ({type(exc).__name__}: {exc})",
                where="load",
                hint="pass a path, an onnx.ModelProto or model.SerializeToString()",
            ) from exc
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(
                f"model file {str(path)!r} does not exist",
                where="load",
                hint="check the path" + (" (it is a folder)" if path.is_dir() else ""),
            )
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise ModelError(
                f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__}: {_first_line(exc)})",
                where="load",
                hint="the file may be truncated or not ONNX; check it with onnx.checker.check_model",
            ) from exc
        return proto, str(path.resolve().parent)
    raise ModelError(
        f"cannot read a model from a {type(model).__name__}",
        where="load",
        hint="pass a path, bytes or an onnx.ModelProto",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class InputSpec:
    """One real graph input: ``shape`` is ``None`` when the rank is unknown; a dynamic dimension is
    ``None`` (unnamed) or its symbolic name (``"batch"``)."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None

    @property
    def is_float(self) -> bool:
        return is_float_dtype(self.dtype)


def is_float_dtype(dtype: np.dtype) -> bool:
    """True for numpy floats and the ml_dtypes floats onnx uses (bfloat16, float8 ...)."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name.startswith(("float", "bfloat")))


def input_specs(model: onnx.ModelProto | str | os.PathLike | bytes) -> list[InputSpec]:
    """The graph inputs that are not initializers, in graph order.

    A dimension with ``dim_value > 0`` is fixed; one with a ``dim_param`` is that name; anything else is
    ``None``. Raises :class:`ModelError` for a non-tensor input (sequence, map, optional).
    """
    proto, _ = read_model(model)
    graph = proto.graph
    constant = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    specs = []
    for value in graph.input:
        if value.name in constant:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise ModelError(
                f"input {value.name!r} is a {value.type.WhichOneof('value')}, not a tensor",
                where="input specs",
                hint="only tensor inputs are supported",
            )
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape: tuple[Dim, ...] | None = None
        if tensor_type.HasField("shape"):
            shape = tuple(_dim(d) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param:
        return d.dim_param
    return None


# --------------------------------------------------------------------------------------------- shapes


def resolve_shapes(
    specs: Sequence[InputSpec],
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every input.

    Rule: an input named in ``shapes`` takes that shape (its rank and fixed dimensions must match the
    model); the values it gives to named dimensions bind those names everywhere. Every other dynamic
    dimension, in order:

    1. a name already bound (by ``shapes`` or an earlier input) keeps its value, so ``batch`` and
       ``sequence`` agree across inputs;
    2. a batch-like name (``batch``, ``N``, ``B``, ``bs``) → ``batch``;
    3. a sequence-like name (containing ``seq``, ``len``, ``token``, ``time``, ``frame``, ``sentence``,
       ``word``, ``pos``) → 16;
    4. the first dynamic dimension of the input → ``batch``;
    5. an unnamed dimension at axis 1 of a rank-2 integer input (token ids ``(batch, seq)``) → 16;
    6. otherwise → 1.

    Raises :class:`CalibrationError` for an unknown name in ``shapes``, a shape that contradicts the
    model, or an input of unknown rank that ``shapes`` does not cover.
    """
    if batch < 1:
        raise CalibrationError(f"batch must be at least 1, got {batch}", where="shapes", hint="use --batch 1 or more")
    shapes = dict(shapes or {})
    by_name = {s.name: s for s in specs}
    for name in shapes:
        if name not in by_name:
            raise CalibrationError(
                f"--shape names unknown input {name!r}{did_you_mean(name, by_name)}",
                where="shapes",
                hint=f"the model's inputs are {sorted(by_name)}",
            )
    bound: dict[str, int] = {}
    resolved: dict[str, tuple[int, ...]] = {}
    for name, given in shapes.items():
        spec = by_name[name]
        shape = tuple(int(v) for v in given)
        _check_shape(spec, shape, where=f"--shape {name}")
        for dim, value in zip(spec.shape or (), shape):
            if isinstance(dim, str):
                bound.setdefault(dim, value)
        resolved[name] = shape
    for spec in specs:
        if spec.name in resolved:
            continue
        if spec.shape is None:
            raise CalibrationError(
                f"input {spec.name!r} has no shape in the model",
                where="shapes",
                hint=f"give one with --shape {spec.name}:1x3x224x224 (shapes={{{spec.name!r}: (...)}})",
            )
        resolved[spec.name] = _default_shape(spec, bound, batch)
    return {s.name: resolved[s.name] for s in specs}


def _default_shape(spec: InputSpec, bound: dict[str, int], batch: int) -> tuple[int, ...]:
    shape = []
    seen_dynamic = False
    for axis, dim in enumerate(spec.shape or ()):
        if isinstance(dim, int):
            shape.append(dim)
            continue
        if isinstance(dim, str) and dim in bound:
            value = bound[dim]
        elif isinstance(dim, str) and _BATCH_LIKE.search(dim):
            value = batch
        elif isinstance(dim, str) and _SEQUENCE_LIKE.search(dim):
            value = DEFAULT_SEQUENCE
        elif not seen_dynamic:
            value = batch
        elif dim is None and axis == 1 and len(spec.shape or ()) == 2 and spec.dtype.kind in "iu":
            value = DEFAULT_SEQUENCE
        else:
            value = 1
        seen_dynamic = True
        if isinstance(dim, str):
            bound[dim] = value
        shape.append(value)
    return tuple(shape)


def _check_shape(spec: InputSpec, shape: tuple[int, ...], *, where: str) -> None:
    """Raise CalibrationError when ``shape`` contradicts the rank or a fixed dimension of ``spec``."""
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape):
        raise CalibrationError(
            f"input {spec.name!r} has rank {len(shape)} {shape}, expected rank {len(spec.shape)} {_fmt_shape(spec.shape)}",
            where=where,
            hint="give one value per dimension of the model's input",
        )
    for axis, (dim, value) in enumerate(zip(spec.shape, shape)):
        if isinstance(dim, int) and dim != value:
            raise CalibrationError(
                f"input {spec.name!r} has {value} at axis {axis}, the model fixes it to {dim} "
                f"(shape {shape}, expected {_fmt_shape(spec.shape)})",
                where=where,
                hint="only dynamic dimensions may vary",
            )


def _fmt_shape(shape: Sequence[Dim] | None) -> str:
    if shape is None:
        return "(unknown rank)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def parse_shape_args(args: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``["name:1x3x224x224", "ids:2,16", "scalar:"]`` into ``{name: shape}``.

    The name is everything before the LAST colon (names like ``input:0`` work); dimensions are
    separated by ``x`` or ``,``; an empty shape is a scalar. Raises :class:`RecipeError` on a bad form,
    a non-positive dimension or a name given twice.
    """
    result: dict[str, tuple[int, ...]] = {}
    for arg in args:
        name, sep, dims = arg.rpartition(":")
        if not sep or not name:
            raise RecipeError(
                f"bad --shape {arg!r}: expected NAME:DIMS",
                where="--shape",
                hint="write it as input_name:1x3x224x224",
            )
        parts = [p for p in re.split(r"[x,]", dims.strip().lower())] if dims.strip() else []
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            raise RecipeError(
                f"bad --shape {arg!r}: {dims!r} is not a list of integers",
                where="--shape",
                hint="write it as input_name:1x3x224x224",
            ) from None
        if any(v < 1 for v in shape):
            raise RecipeError(f"bad --shape {arg!r}: dimensions must be positive", where="--shape", hint="use 1 or more")
        if name in result:
            raise RecipeError(f"--shape gives {name!r} twice", where="--shape", hint="give each input once")
        result[name] = shape
    return result


# --------------------------------------------------------------------------------------------- random


#: a random verification feed larger than this (elements per input) is refused as absurd
MAX_RANDOM_ELEMENTS = 2**28


def random_feeds(
    model: onnx.ModelProto | str | os.PathLike | bytes,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One seeded feed dict the model can run on; see the module docstring for the value rule and
    :func:`resolve_shapes` for the shape rule."""
    proto, _ = read_model(model)
    specs = input_specs(proto)
    concrete = resolve_shapes(specs, shapes=shapes, batch=batch)
    highs = _index_highs(proto.graph, {s.name for s in specs if s.dtype.kind in "iu"})
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = concrete[spec.name]
        elements = int(np.prod(shape, dtype=np.float64))
        if elements > MAX_RANDOM_ELEMENTS:
            raise ModelError(
                f"input {spec.name!r} declares shape {tuple(shape)} ({elements:.3g} elements); a random feed that "
                "large cannot be built", where="random feeds",
                hint=f"give real data (--calib-data for onnxcompress, --inputs for tools/compare.py), or a realistic "
                     f"shape with tools/compare.py --shape {spec.name}:1x...")
        if "mask" in spec.name.lower():
            value = np.ones(shape, dtype=spec.dtype)
        elif spec.is_float:
            value = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            value = np.asarray(rng.random(shape) < 0.5)  # a 0-d draw is a numpy scalar
        elif spec.dtype.kind in "iu":
            high = min(highs.get(spec.name, DEFAULT_INT_HIGH), int(np.iinfo(spec.dtype).max) + 1)
            value = rng.integers(0, high, size=shape, dtype=np.int64).astype(spec.dtype)
        else:
            raise CalibrationError(
                f"cannot make random values for input {spec.name!r} of dtype {spec.dtype}",
                where="random feeds",
                hint="pass real feeds: --calib-data data.npz (onnxcompress), --inputs data.npz (tools/compare.py)",
            )
        feed[spec.name] = value
    log.debug("random feeds (seed %d): %s", seed, {k: (v.shape, str(v.dtype)) for k, v in feed.items()})
    return feed


def _index_highs(graph: onnx.GraphProto, names: set[str]) -> dict[str, int]:
    """For each integer input in ``names`` that indexes a constant table, the table's row count."""
    tables = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tables[node.output[0]] = tuple(attr.t.dims)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    highs = {}
    for name in names:
        found = []
        frontier, seen = [name], {name}
        while frontier:
            tensor = frontier.pop()
            for node, index in consumers.get(tensor, ()):
                rows = _table_rows(node, index, tables)
                if rows:
                    found.append(rows)
                elif index in _VALUE_PRESERVING.get(node.op_type, ()) and node.output:
                    if node.output[0] not in seen:
                        seen.add(node.output[0])
                        frontier.append(node.output[0])
        if found:
            highs[name] = min(found)
    return highs


def _table_rows(node: onnx.NodeProto, index: int, tables: dict[str, tuple[int, ...]]) -> int | None:
    """Rows of the constant table ``node`` indexes with its input ``index``, or None."""
    if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 1:
        table = tables.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table and -len(table) <= axis < len(table):
            return int(table[axis])
    if node.op_type == "EmbedLayerNormalization" and node.domain == "com.microsoft" and index in (0, 1):
        position = {0: 2, 1: 4}[index]  # input_ids -> word_embedding, segment_ids -> segment_embedding
        table = tables.get(node.input[position]) if len(node.input) > position else None
        if table:
            return int(table[0])
    return None


# --------------------------------------------------------------------------------------------- sources


class FeedSource:
    """An iterable of feed dicts.

    Iterating twice gives the same feeds again, except for a source made from a one-shot iterator or a
    ``CalibrationDataReader`` without ``rewind()``: iterating that a second time raises
    :class:`CalibrationError`. ``len()`` works when the number of feeds is known (otherwise it raises
    ``TypeError``, as ``len`` does). :meth:`labeled` yields ``(label, feed)`` pairs, where the label
    says where the feed came from (``"calib.npz[32:64]"``, ``"feeds/0003.npz"``, ``"feed 2"``).
    """

    def __init__(
        self,
        make: Callable[[], Iterator[tuple[str, Feed]]],
        *,
        description: str,
        length: int | None = None,
        one_shot: bool = False,
    ) -> None:
        self._make = make
        self.description = description
        self.length = length
        self._one_shot = one_shot
        self._used = False

    def labeled(self) -> Iterator[tuple[str, Feed]]:
        if self._one_shot and self._used:
            raise CalibrationError(
                f"{self.description} can be read only once and was already read",
                where="feeds",
                hint="pass a list, a file or a folder, or a reader with a rewind() method",
            )
        self._used = True
        return self._make()

    def __iter__(self) -> Iterator[Feed]:
        return (feed for _, feed in self.labeled())

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError(f"the number of feeds in {self.description} is not known")
        return self.length

    def __repr__(self) -> str:
        return f"FeedSource({self.description}, length={self.length})"


def as_feed_source(
    obj: Any,
    *,
    model: onnx.ModelProto | str | os.PathLike | bytes | None = None,
    batch_size: int | None = None,
) -> FeedSource:
    """Turn ``obj`` into a :class:`FeedSource`.

    Accepted:

    * a :class:`FeedSource` (returned as is) or one feed dict;
    * a path to an ``.npz`` keyed by input name, samples stacked on axis 0: cut into batches of
      ``batch_size``. Default batch size: the smallest fixed first dimension among ``model``'s inputs
      if there is one (a model with batch fixed to 1 gets batches of 1, a remainder that does not fill a
      batch is dropped with a warning); otherwise the whole file as one batch when it holds at most 64
      samples, else batches of 32 (the last one may be smaller);
    * a folder of ``.npz`` files, each one feed dict (sorted by file name, read one at a time, shapes
      may differ between files); a folder with only ``.npy`` files is one stacked set keyed by file
      stem, batched like an ``.npz``;
    * an object with ``get_next()`` returning a dict or None (onnxruntime's ``CalibrationDataReader``):
      streamed, one-shot unless it has ``rewind()``;
    * any other iterable of feed dicts (a list is re-iterable; a generator is one-shot).
    """
    if isinstance(obj, FeedSource):
        return obj
    if isinstance(obj, Mapping):
        feed = dict(obj)
        return FeedSource(lambda: iter([("feed", feed)]), description="one feed dict", length=1)
    if isinstance(obj, (str, os.PathLike)):
        return _path_source(Path(obj), model=model, batch_size=batch_size)
    if hasattr(obj, "get_next"):
        return _reader_source(obj)
    if isinstance(obj, Iterable) and not isinstance(obj, (bytes, bytearray)):
        if isinstance(obj, Iterator):
            return FeedSource(lambda: _labeled_items(obj), description="an iterator of feeds", one_shot=True)
        length = len(obj) if hasattr(obj, "__len__") else None
        return FeedSource(lambda: _labeled_items(obj), description=f"a {type(obj).__name__} of feeds", length=length)
    raise CalibrationError(
        f"cannot use a {type(obj).__name__} as feeds",
        where="feeds",
        hint="pass a dict, a list of dicts, an .npz file, a folder of .npz files or a CalibrationDataReader",
    )


def spooled(source: FeedSource, folder: Path) -> FeedSource:
    """A re-readable version of a one-shot ``source`` (a generator, a reader without ``rewind()``).

    Each feed is written to ``folder`` (one ``.npz`` per feed) as it is first read; every later read
    gets the written feeds back from disk, then goes on pulling from ``source`` where the first read
    stopped. So a run whose passes each read the data (SmoothQuant, calibration, verification) works
    on a generator, and memory holds one feed at a time. A re-readable source is returned as is."""
    if not source._one_shot:
        return source
    files: list[tuple[str, Path]] = []
    state: dict[str, Any] = {"it": None, "done": False, "error": None}

    def make() -> Iterator[tuple[str, Feed]]:
        i = 0
        while True:
            if i < len(files):
                label, path = files[i]
                yield label, _read_spooled(path)
            elif state["done"]:
                return
            else:
                if state["error"] is not None:  # a later read must not end quietly where that one failed
                    raise CalibrationError(f"{source.description} failed while it was first read: {state['error']}",
                                           where="feeds", hint="fix the data source") from state["error"]
                if state["it"] is None:
                    state["it"] = source.labeled()
                try:
                    label, feed = next(state["it"])
                except StopIteration:
                    state["done"] = True
                    return
                except Exception as exc:
                    state["error"] = exc
                    raise
                path = folder / f"feed{len(files):06d}.npz"
                _write_spooled(path, feed)
                files.append((label, path))
                yield label, feed
            i += 1

    folder.mkdir(parents=True, exist_ok=True)
    return FeedSource(make, description=source.description, length=source.length)


def _write_spooled(path: Path, feed: Feed) -> None:
    """``feed`` as an ``.npz`` of arrays ``a0, a1, ...`` and a JSON header of their input names and
    dtypes (input names are any strings: ``file`` or ``allow_pickle`` cannot be savez keywords);
    ml_dtypes arrays (bfloat16, float8, int4) are stored as their bits."""
    arrays, header = {}, []
    for i, (name, value) in enumerate(feed.items()):
        v = np.asarray(value)
        exotic = v.dtype.type.__module__.startswith("ml_dtypes")
        header.append([name, v.dtype.name if exotic else ""])
        arrays[f"a{i}"] = v.view(f"u{v.dtype.itemsize}") if exotic else v
    np.savez(path, header=np.array(json.dumps(header)), **arrays)


def _read_spooled(path: Path) -> Feed:
    # our own scratch file, written by _write_spooled: string inputs (object arrays) need pickle
    with np.load(path, allow_pickle=True) as z:
        header = json.loads(str(z["header"]))
        return {name: (z[f"a{i}"].view(getattr(ml_dtypes, kind)) if kind else z[f"a{i}"])
                for i, (name, kind) in enumerate(header)}


def checked_source(source: FeedSource, model: onnx.ModelProto | str | os.PathLike | bytes) -> FeedSource:
    """``source`` with every feed checked against ``model``'s inputs (:func:`validate_feed`) as it is
    read, so a feed of the wrong name, dtype or shape fails where it is named, before onnxruntime."""
    specs = input_specs(model)

    def make() -> Iterator[tuple[str, Feed]]:
        for label, feed in source.labeled():
            validate_feed(specs, feed, where=label)
            yield label, feed

    return FeedSource(make, description=source.description, length=source.length, one_shot=source._one_shot)


def _labeled_items(items: Iterable[Any]) -> Iterator[tuple[str, Feed]]:
    for index, feed in enumerate(items):
        label = f"feed {index}"
        if not isinstance(feed, Mapping):
            raise CalibrationError(
                f"feed {index} is a {type(feed).__name__}, expected a dict of input name -> array",
                where=label,
                hint="each item must be a dict like {'input': np.ndarray}",
            )
        yield label, dict(feed)


def _reader_source(reader: Any) -> FeedSource:
    rewind = getattr(reader, "rewind", None)
    state = {"first": True}

    def make() -> Iterator[tuple[str, Feed]]:
        if not state["first"] and callable(rewind):
            rewind()
        state["first"] = False
        index = 0
        while True:
            feed = reader.get_next()
            if feed is None:
                return
            if not isinstance(feed, Mapping):
                raise CalibrationError(
                    f"get_next() returned a {type(feed).__name__}, expected a dict or None",
                    where=f"reader batch {index}",
                    hint="a CalibrationDataReader returns {input name: array} and None at the end",
                )
            yield f"reader batch {index}", dict(feed)
            index += 1

    name = type(reader).__name__
    return FeedSource(make, description=f"reader {name}", one_shot=not callable(rewind))


def _path_source(path: Path, *, model: Any, batch_size: int | None) -> FeedSource:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if files:
            return FeedSource(lambda: _npz_files(files), description=f"folder {str(path)!r}", length=len(files))
        arrays = sorted(p for p in path.iterdir() if p.suffix == ".npy" and p.is_file())
        if not arrays:
            raise CalibrationError(
                f"folder {str(path)!r} holds no .npz or .npy files",
                where="feeds",
                hint="put one .npz per feed in it (np.savez(f, **feed)), or one .npy per input",
            )
        loaded = {p.stem: np.load(p, mmap_mode="r") for p in arrays}
        return _stacked_source(loaded, str(path), model=model, batch_size=batch_size)
    if not path.exists():
        raise CalibrationError(f"input data {str(path)!r} does not exist", where="feeds", hint="check the path")
    if path.suffix != ".npz":
        raise CalibrationError(
            f"input data {str(path)!r} is not an .npz file or a folder",
            where="feeds",
            hint="save feeds with np.savez(path, **{input_name: stacked_samples})",
        )
    arrays = _read_npz(path, hint="save feeds with np.savez(path, **{input_name: stacked_samples})")
    return _stacked_source(arrays, str(path), model=model, batch_size=batch_size)


def _read_npz(path: Path, *, hint: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file (no pickles); CalibrationError when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as exc:
        raise CalibrationError(
            f"cannot read {str(path)!r} ({type(exc).__name__}: {_first_line(exc)})", where="feeds", hint=hint
        ) from exc


def _npz_files(files: list[Path]) -> Iterator[tuple[str, Feed]]:
    for file in files:
        yield str(file), _read_npz(file, hint="each file must be np.savez(path, **feed)")


def _stacked_source(arrays: dict[str, np.ndarray], label: str, *, model: Any, batch_size: int | None) -> FeedSource:
    """Feeds cut along axis 0 of arrays that all hold the same number of samples."""
    if not arrays:
        raise CalibrationError(f"{label!r} holds no arrays", where="feeds", hint="save at least one input")
    counts = {key: (a.shape[0] if a.ndim else None) for key, a in arrays.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise CalibrationError(
            f"arrays in {label!r} do not share a sample axis: first dimensions {counts}",
            where="feeds",
            hint="stack samples on axis 0, the same number for every input",
        )
    total = next(iter(counts.values()))
    drop_remainder = False
    if batch_size is None:
        fixed = _fixed_batch(model) if model is not None else None
        if fixed is not None:
            batch_size, drop_remainder = fixed, True
        else:
            batch_size = total if total <= ONE_BATCH_MAX else DEFAULT_BATCH
    if batch_size < 1:
        raise CalibrationError(f"batch size must be at least 1, got {batch_size}", where="feeds", hint="use 1 or more")
    count = total // batch_size if drop_remainder else math.ceil(total / batch_size)
    if drop_remainder and total % batch_size:
        log.warning("%s: %d samples left over after batches of %d are not used", label, total % batch_size, batch_size)

    def make() -> Iterator[tuple[str, Feed]]:
        for index in range(count):
            start, stop = index * batch_size, min((index + 1) * batch_size, total)
            yield f"{label}[{start}:{stop}]", {key: np.asarray(a[start:stop]) for key, a in arrays.items()}

    return FeedSource(make, description=f"{label!r} ({total} samples)", length=count)


def _fixed_batch(model: Any) -> int | None:
    fixed = [s.shape[0] for s in input_specs(model) if s.shape and isinstance(s.shape[0], int)]
    return min(fixed) if fixed else None


def load_feeds(path: str | os.PathLike, *, model: Any = None, batch_size: int | None = None) -> list[Feed]:
    """All feeds of a small ``.npz`` file or folder, as a list (see :func:`as_feed_source`)."""
    return list(as_feed_source(path, model=model, batch_size=batch_size))


# --------------------------------------------------------------------------------------------- validation


def validate_feed(specs: Sequence[InputSpec], feed: Mapping[str, Any], *, where: str) -> None:
    """Raise :class:`CalibrationError` for the first problem in ``feed``, else return None.

    Checked, in order: ``feed`` is a mapping; no unknown names (with a did-you-mean); no missing
    inputs; each value is a numpy array of exactly the input's dtype (no implicit casts); its rank and
    fixed dimensions match the model; it is not empty; a float input holds no NaN or Inf.
    """
    if not isinstance(feed, Mapping):
        raise CalibrationError(
            f"feed is a {type(feed).__name__}, expected a dict of input name -> array",
            where=where,
            hint="pass {'input': np.ndarray, ...}",
        )
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in feed]
    for name in feed:
        if name not in expected:
            raise CalibrationError(
                f"unknown input {name!r}{did_you_mean(name, missing or expected)}",
                where=where,
                hint=f"the model's inputs are {expected}",
            )
    if missing:
        raise CalibrationError(
            f"missing input{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
            f"found {sorted(feed)}",
            where=where,
            hint=f"the model's inputs are {expected}",
        )
    for spec in specs:
        value = feed[spec.name]
        if not isinstance(value, np.ndarray):
            raise CalibrationError(
                f"input {spec.name!r} is a {type(value).__name__}, expected a numpy array of {spec.dtype}",
                where=where,
                hint=f"use np.asarray(value, dtype=np.{spec.dtype})",
            )
        if value.dtype != spec.dtype:
            raise CalibrationError(
                f"input {spec.name!r} has dtype {value.dtype}, expected {spec.dtype}",
                where=where,
                hint=f"cast it with .astype({spec.dtype.name!r})",
            )
        _check_shape(spec, tuple(value.shape), where=where)
        if value.size == 0 and (value.ndim == 0 or value.shape[0] == 0):
            # an empty sample axis is no data; a zero-length free axis is (a KV cache before the first step)
            raise CalibrationError(
                f"input {spec.name!r} has no samples (shape {value.shape})",
                where=where,
                hint="every input needs at least one sample on its first axis",
            )
        if spec.is_float:
            native = value.dtype in (np.float16, np.float32, np.float64)  # bfloat16 & co.: through float32
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value if native else value.astype(np.float32))))
            if bad:
                raise CalibrationError(
                    f"input {spec.name!r} holds {bad} NaN/Inf value{'s' if bad > 1 else ''} of {value.size}",
                    where=where,
                    hint="clean the data (np.nan_to_num) or drop those samples",
                )
