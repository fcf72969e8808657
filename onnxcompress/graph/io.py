"""Model I/O: load, check external data, convert to and from onnx-graphsurgeon, save atomically.

Rules
-----
* **Load** from a path, ``bytes`` or an ``onnx.ModelProto``. The caller's ModelProto is copied, never
  mutated. Tensors stored in external data stay on disk (``load_external_data=False``); they become
  :class:`ExternalValues` in the graph and are read only when a pass asks for their values.
* **External data safety.** Before a single byte of external data is read, every ``location`` is
  checked: it must be relative, must not contain ``..``, and must resolve (symlinks followed) to a file
  inside the model's folder; the file must exist and hold ``offset + length`` bytes. Anything else is a
  :class:`~onnxcompress.errors.ModelError`.
* **Save** writes ``path`` atomically: everything goes to temporary files in the destination folder,
  is flushed and fsynced, then renamed into place (the external data file first, the model last), so a
  reader never sees a torn file and an interrupted save leaves nothing behind. External data is used
  when asked, or automatically when the serialized model would pass the 2 GB protobuf limit; tensors
  are streamed into the data file one at a time, so the whole model is never held as one protobuf.
* **Round trip.** :func:`graph_to_model` restores what onnx-graphsurgeon does not carry
  (metadata_props, model doc string, domain, model_version, original producer, opset imports of
  custom domains) from the model the graph was imported from.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcompress.errors import ModelError, OnnxCompressError

__all__ = [
    "ModelSource",
    "ExternalValues",
    "open_model",
    "load",
    "save",
    "model_to_graph",
    "graph_to_model",
    "iter_tensor_protos",
    "iter_graph_protos",
    "check_external_data",
    "PROTOBUF_LIMIT",
    "write_text_atomic",
    "spill",
    "external_path",
    "SPILL_KEY",
]

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]

#: Protobuf refuses to serialize a message of 2 GiB or more; keep a margin for the graph itself.
PROTOBUF_LIMIT = 2**31 - 64 * 2**20
#: external-data key marking a tensor spilled to onnxcompress's own scratch folder (see :func:`spill`)
SPILL_KEY = "basepath"
_ALIGN = 4096


@dataclass
class ModelSource:
    """A loaded model plus where its external data lives.

    ``model`` is onnxcompress's own copy; ``base_dir`` is the folder that external data locations are
    relative to (None for models without external data given as bytes or a ModelProto); ``path`` is
    the file it came from, if any (used to refuse writing over the input).
    """

    model: onnx.ModelProto
    base_dir: Path | None = None
    path: Path | None = None

    @property
    def has_external_data(self) -> bool:
        return any(_is_external(t) for t, _ in iter_tensor_protos(self.model.graph))

    @property
    def data_files(self) -> tuple[Path, ...]:
        """The files the model's external tensors live in: with :attr:`path`, what a save must not
        overwrite (whatever the output is called: ``a.onnx`` may keep its weights in ``b.onnx.data``)."""
        if self.base_dir is None:
            return ()
        return tuple(sorted({self.base_dir / _external_info(t)["location"]
                             for t, _ in iter_tensor_protos(self.model.graph) if _is_external(t)}))


class ExternalValues(LazyValues):
    """LazyValues whose data sits in an external file relative to ``base_dir``.

    onnx-graphsurgeon's exporter passes a LazyValues' TensorProto through untouched, so tensors that
    no pass reads are never loaded.
    """

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        return np.array(onnx.numpy_helper.to_array(self.tensor, base_dir=str(self.base_dir)))


# ----------------------------------------------------------------------------------------------
# Walking tensors


def iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, onnx.GraphProto]]:
    """Yield ``(tensor, graph)`` for every TensorProto in ``graph`` and its subgraphs.

    Covers initializers, sparse initializers' values and indices, tensor attributes (``Constant``
    nodes and others) and tensors inside If/Loop/Scan bodies, at any depth.
    """
    for t in graph.initializer:
        yield t, graph
    for st in graph.sparse_initializer:
        yield st.values, graph
        yield st.indices, graph
    for node in graph.node:
        yield from iter_node_tensors(node, graph)


def iter_node_tensors(node: onnx.NodeProto, graph: onnx.GraphProto | None = None
                      ) -> Iterator[tuple[onnx.TensorProto, onnx.GraphProto | None]]:
    """:func:`iter_tensor_protos` for one node: its tensor attributes and its subgraphs' tensors."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            yield attr.t, graph
        elif attr.type == onnx.AttributeProto.TENSORS:
            for t in attr.tensors:
                yield t, graph
        elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            yield attr.sparse_tensor.values, graph
            yield attr.sparse_tensor.indices, graph
        elif attr.type == onnx.AttributeProto.GRAPH:
            yield from iter_tensor_protos(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                yield from iter_tensor_protos(g)


def iter_graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If branches, Loop/Scan bodies) at any depth."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graph_protos(g)


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _external_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes the tensor's data occupies (raw, typed fields or external length)."""
    if _is_external(t):
        info = _external_info(t)
        if "length" in info:
            return int(info["length"])
        return _expected_nbytes(t)
    if t.HasField("raw_data"):
        return len(t.raw_data)
    return t.ByteSize()


def _expected_nbytes(t: onnx.TensorProto) -> int:
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    bits = {
        onnx.TensorProto.INT4: 4,
        onnx.TensorProto.UINT4: 4,
    }.get(t.data_type)
    if bits is not None:
        return (n * bits + 7) // 8
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # exotic dtypes: best effort
        itemsize = 1
    return n * itemsize


# ----------------------------------------------------------------------------------------------
# External data safety


def check_external_data(model: onnx.ModelProto, base_dir: Path | None) -> None:
    """Refuse unsafe or broken external data references before anything is read.

    A location is accepted only if it is relative, has no ``..`` component, resolves (following
    symlinks) inside ``base_dir``, exists as a regular file and holds ``offset + length`` bytes.
    """
    root = Path(os.path.realpath(base_dir)) if base_dir is not None else None
    for t, _ in iter_tensor_protos(model.graph):
        if not _is_external(t):
            continue
        info = _external_info(t)
        where = f"load, tensor {t.name!r}"
        loc = info.get("location", "")
        if not loc:
            raise ModelError("external data reference has no location", where=where,
                             hint="the model file is corrupt; re-export it")
        if SPILL_KEY in info:
            raise ModelError(f"external data reference carries a {SPILL_KEY!r} entry, which could point anywhere",
                             where=where, hint="store the data next to the model with a relative location only")
        if root is None:
            raise ModelError(f"tensor refers to external data file {loc!r} but the model was not given as a path",
                             where=where, hint="load the model from its .onnx path so its data file can be found")
        p = Path(loc)
        if p.is_absolute() or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
            raise ModelError(f"external data location {loc!r} is an absolute path", where=where,
                             hint="external data must be stored next to the model with a relative location")
        if ".." in Path(loc.replace("\\", "/")).parts:
            raise ModelError(f"external data location {loc!r} leaves the model's folder", where=where,
                             hint="external data must be stored next to the model with a relative location")
        target = Path(os.path.realpath(root / loc))
        if root != target and root not in target.parents:
            raise ModelError(f"external data location {loc!r} resolves to {str(target)!r}, outside the model's folder "
                             "(a symlink?)", where=where,
                             hint="copy the data file into the model's folder instead of linking to it")
        if target.is_dir():
            raise ModelError(f"external data location {loc!r} is a folder, not a file", where=where,
                             hint="the location must name the data file itself; re-save the model")
        if not target.is_file():
            raise ModelError(f"external data file {loc!r} is missing", where=where,
                             hint=f"put {loc!r} next to the model in {str(root)!r}")
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if "length" in info else _expected_nbytes(t)
        size = target.stat().st_size
        if offset < 0 or length < 0 or offset + length > size:
            raise ModelError(f"external data file {loc!r} is too short: tensor needs bytes {offset}..{offset + length}, "
                             f"file has {size}", where=where, hint="the data file is truncated; copy it again")


# ----------------------------------------------------------------------------------------------
# Loading


def open_model(source: ModelLike | ModelSource, *, base_dir: str | os.PathLike | None = None) -> ModelSource:
    """Load ``source`` into a :class:`ModelSource` without reading external data.

    Accepts a path, serialized bytes, a ModelProto (deep-copied) or a ModelSource (returned as is).
    Raises :class:`ModelError` for anything that is not a usable ONNX model.
    """
    if isinstance(source, ModelSource):
        return source
    path: Path | None = None
    if isinstance(source, onnx.ModelProto):
        model = copy.deepcopy(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        model = _parse(bytes(source), "<bytes>")
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ModelError(f"model file {str(path)!r} does not exist", where="load",
                             hint="check the path")
        if path.is_dir():
            raise ModelError(f"{str(path)!r} is a folder, not a model file", where="load",
                             hint="pass the .onnx file inside it")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ModelError(f"cannot read {str(path)!r}: {e.strerror}", where="load",
                             hint="check the file's permissions") from e
        model = _parse(data, str(path))
        if base_dir is None:
            base_dir = path.parent
    else:
        raise ModelError(f"cannot load a model from a {type(source).__name__}", where="load",
                         hint="pass a path, bytes or an onnx.ModelProto")
    _check_model_shape(model, str(path) if path else "<model>")
    _check_graph_structure(model.graph, set(), str(path) if path else "<model>")
    _check_tensor_sizes(model, str(path) if path else "<model>")
    src = ModelSource(model, Path(base_dir) if base_dir is not None else None, path)
    check_external_data(model, src.base_dir)
    return src


def _parse(data: bytes, name: str) -> onnx.ModelProto:
    if not data:
        raise ModelError(f"{name} is empty (0 bytes)", where="load", hint="the file is not an ONNX model; re-export it")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(f"{name} is not an ONNX model or is truncated ({type(e).__name__})", where="load",
                         hint="re-export the model, or check that the download finished") from e
    # Protobuf parses many random byte strings "successfully" into an empty message.
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelError(f"{name} holds no ONNX graph", where="load",
                         hint="the file is not an ONNX model, or it is truncated; re-export it")
    try:
        _decode_strings(model)
    except UnicodeDecodeError as e:
        raise ModelError(f"{name} holds a name or text field that is not valid UTF-8 (corrupt file)", where="load",
                         hint="re-export the model, or check that the download finished") from e
    return model


def _decode_strings(msg) -> None:
    """Check every string field once. Protobuf (proto2) does not validate UTF-8 when parsing: a corrupt
    name comes back as ``bytes`` (or fails when read), and would only break later, deep inside a pass
    or the exporter. Raises UnicodeDecodeError; bytes fields (tensor payloads) are not looked at."""
    from google.protobuf.descriptor import FieldDescriptor

    for fd, value in msg.ListFields():
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for m in (value if fd.is_repeated else (value,)):
                _decode_strings(m)
        elif fd.type == FieldDescriptor.TYPE_STRING:
            for v in (value if fd.is_repeated else (value,)):
                if not isinstance(v, str):
                    raise UnicodeDecodeError("utf-8", bytes(v), 0, len(v), f"field {fd.name!r}")


def _check_model_shape(model: onnx.ModelProto, name: str) -> None:
    if model.ir_version < 3:
        raise ModelError(f"{name} has IR version {model.ir_version}; onnxcompress needs IR version 3 or newer",
                         where="load", hint="convert it with onnx.version_converter or re-export it")
    if model.ir_version > onnx.IR_VERSION:
        raise ModelError(f"{name} has IR version {model.ir_version}, newer than this onnx package supports "
                         f"({onnx.IR_VERSION})", where="load", hint="upgrade the onnx package")
    if not model.graph.output:
        raise ModelError(f"{name} has no graph outputs", where="load",
                         hint="a model without outputs computes nothing; re-export it with its outputs")
    if not any(imp.domain in ("", "ai.onnx") for imp in model.opset_import) and any(
            n.domain in ("", "ai.onnx") for g in iter_graph_protos(model.graph) for n in g.node):
        raise ModelError(f"{name} declares no opset for the default ONNX domain", where="load",
                         hint="add one: model.opset_import.append(onnx.helper.make_opsetid('', 17)) (the opset "
                              "it was exported with)")
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            if imp.version < 7:
                raise ModelError(f"{name} uses default-domain opset {imp.version}; onnxcompress needs opset 7 or newer",
                                 where="load", hint="upgrade it with onnx.version_converter.convert_version(model, 13)")
            if imp.version > onnx.defs.onnx_opset_version():
                raise ModelError(f"{name} uses opset {imp.version}, newer than this onnx package knows "
                                 f"({onnx.defs.onnx_opset_version()})", where="load", hint="upgrade the onnx package")


def _check_graph_structure(graph: onnx.GraphProto, outer: set[str], name: str) -> None:
    """Refuse graphs no tool can run: a tensor written twice, a read of nothing, a cycle, a missing output.

    ``outer`` holds the names visible from enclosing graphs (for If/Loop/Scan bodies). Nodes need not
    be listed in topological order; a node is runnable once everything it reads exists.
    """
    where = f"load, graph {graph.name!r}" if graph.name else "load"
    hint = "the model is malformed; re-export it, or run onnx.checker.check_model(path, full_check=True)"
    known = set(outer) | {v.name for v in graph.input}
    writer: dict[str, str] = {}
    for t in list(graph.initializer) + [st.values for st in graph.sparse_initializer]:
        if t.name in writer:
            raise ModelError(f"{name}: initializer {t.name!r} is defined twice", where=where, hint=hint)
        writer[t.name] = "an initializer"
    known |= set(writer)
    for v in graph.input:
        writer.setdefault(v.name, "a graph input")
    label = {}
    for i, n in enumerate(graph.node):
        label[i] = f"node {n.name or '#' + str(i)!r} ({n.op_type})"
        for o in n.output:
            if not o:
                continue
            if o in writer:
                raise ModelError(f"{name}: tensor {o!r} is written by both {writer[o]} and {label[i]}",
                                 where=where, hint=hint)
            writer[o] = label[i]
    # Kahn's algorithm over explicit inputs: what never becomes ready is dangling or on a cycle
    waiting: dict[str, list[int]] = {}
    missing = {}
    for i, n in enumerate(graph.node):
        need = {x for x in n.input if x and x not in known}
        missing[i] = len(need)
        for x in need:
            waiting.setdefault(x, []).append(i)
    ready = [i for i, k in missing.items() if k == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for o in graph.node[i].output:
            for j in waiting.pop(o, ()):
                missing[j] -= 1
                if missing[j] == 0:
                    ready.append(j)
    if done < len(graph.node):
        stuck = [i for i, k in missing.items() if k > 0]
        for i in stuck:
            for x in graph.node[i].input:
                if x and x not in known and x not in writer:
                    raise ModelError(f"{name}: {label[i]} reads {x!r}, which no node, input or initializer provides",
                                     where=where, hint=hint)
        raise ModelError(f"{name}: the graph has a cycle through {', '.join(label[i] for i in stuck[:4])}"
                         + (f" and {len(stuck) - 4} more" if len(stuck) > 4 else ""), where=where, hint=hint)
    for v in graph.output:
        if v.name not in writer and v.name not in known:
            raise ModelError(f"{name}: graph output {v.name!r} is never computed", where=where, hint=hint)
    visible = known | set(writer)
    for n in graph.node:
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                      list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                _check_graph_structure(g, visible, name)


_TYPED_FIELD = {  # data_type -> (field, values per element); 4-bit types are packed two per value
    onnx.TensorProto.FLOAT: ("float_data", 1), onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1), onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1), onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1), onnx.TensorProto.STRING: ("string_data", 1),
    **{dt: ("int32_data", 1) for dt in (onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
                                        onnx.TensorProto.UINT16, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL,
                                        onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)},
}


def _check_tensor_sizes(model: onnx.ModelProto, name: str) -> None:
    """Every tensor's payload must hold exactly what its dims and dtype say (a corrupt or hand-edited
    file otherwise fails later, inside a pass, with a reshape error)."""
    for t, _ in iter_tensor_protos(model.graph):
        if any(d < 0 for d in t.dims):
            raise ModelError(f"{name}: tensor {t.name!r} has a negative dimension {list(t.dims)}", where="load",
                             hint="the model is corrupt; re-export it")
        n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        found = expected = None
        if _is_external(t):
            info = _external_info(t)
            if "length" in info and t.data_type != onnx.TensorProto.STRING:
                found, expected = int(info["length"]), _expected_nbytes(t)
            unit = "bytes"
        elif t.HasField("raw_data"):
            found, expected, unit = len(t.raw_data), _expected_nbytes(t), "bytes"
        elif t.data_type in _TYPED_FIELD:
            field, per = _TYPED_FIELD[t.data_type]
            found, expected, unit = len(getattr(t, field)), n * per, "values"
        if found is not None and found != expected:
            raise ModelError(f"{name}: tensor {t.name!r} with dims {list(t.dims)} should hold {expected} {unit} "
                             f"of data but holds {found}", where="load", hint="the model is corrupt; re-export it")


def load(source: ModelLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load a model for use outside onnxcompress (external data read into memory by default)."""
    src = open_model(source)
    if load_external_data and src.has_external_data:
        _inline_external(src.model, src.base_dir)
    return src.model


def external_path(t: onnx.TensorProto, base_dir: str | os.PathLike | None) -> Path:
    """The file holding an external tensor: ``base_dir/location``, or for a tensor onnxcompress
    spilled to its own scratch folder, that folder (``SPILL_KEY``; never accepted from an input)."""
    info = _external_info(t)
    root = info.get(SPILL_KEY) or base_dir
    return Path(root) / info["location"]


def spill(graph: gs.Graph, folder: Path, min_bytes: int) -> int:
    """Move large in-memory constants to files in ``folder``; return the bytes moved.

    After a pass computed new weights (int8 codes, pruned or shared values), they would stay in
    memory until the model is saved, so a multi-gigabyte model would be held whole. Spilled
    constants become :class:`ExternalValues` on one file each in ``folder`` (a private temporary
    folder), marked with ``SPILL_KEY`` so :func:`save` copies them into the output's data file
    tensor by tensor. Values with dtypes the ONNX file cannot take as they are in numpy are left.
    """
    moved = 0
    folder.mkdir(parents=True, exist_ok=True)
    for g in _all_graphs(graph):
        for t in list(g.tensors().values()):
            v = getattr(t, "_values", None)
            if isinstance(t, gs.Constant) and type(v) is LazyValues and not _is_external(v.tensor) \
                    and len(v.tensor.raw_data) >= min_bytes:
                # a packed tensor a pass built as a TensorProto (int4 codes, MatMulNBits blocks)
                moved += _spill_proto(t, v.tensor, folder)
                continue
            if not isinstance(t, gs.Constant) or not isinstance(v, np.ndarray) or v.nbytes < min_bytes:
                continue
            if getattr(t, "export_dtype", None) not in (None, v.dtype) or v.dtype.kind not in "fiub":
                continue
            try:
                dtype = onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
            except (KeyError, ValueError, TypeError):
                continue
            fd, path = tempfile.mkstemp(prefix="w", suffix=".bin", dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(np.ascontiguousarray(v).tobytes())
            proto = onnx.TensorProto()
            proto.name = t.name
            proto.data_type = dtype
            proto.dims.extend(v.shape)
            proto.data_location = onnx.TensorProto.EXTERNAL
            for k, val in (("location", Path(path).name), ("offset", "0"), ("length", str(v.nbytes)),
                           (SPILL_KEY, str(folder))):
                e = proto.external_data.add()
                e.key, e.value = k, val
            t._values = ExternalValues(proto, folder)
            moved += v.nbytes
    return moved


def _spill_proto(t: gs.Constant, tensor: onnx.TensorProto, folder: Path) -> int:
    """Move an in-memory TensorProto's raw bytes to a file in ``folder`` (see :func:`spill`)."""
    fd, path = tempfile.mkstemp(prefix="w", suffix=".bin", dir=folder)
    with os.fdopen(fd, "wb") as f:
        f.write(tensor.raw_data)
    proto = onnx.TensorProto()
    proto.name = tensor.name or t.name
    proto.data_type = tensor.data_type
    proto.dims.extend(tensor.dims)
    proto.data_location = onnx.TensorProto.EXTERNAL
    for k, val in (("location", Path(path).name), ("offset", "0"), ("length", str(len(tensor.raw_data))),
                   (SPILL_KEY, str(folder))):
        e = proto.external_data.add()
        e.key, e.value = k, val
    t._values = ExternalValues(proto, folder)
    return len(tensor.raw_data)


def _read_external(t: onnx.TensorProto, base_dir: Path | None) -> bytes:
    return b"".join(external_chunks(t, base_dir, chunk=None))


def external_chunks(t: onnx.TensorProto, base_dir: Path | None, chunk: int | None = 1 << 20) -> Iterator[bytes]:
    """The bytes of external tensor ``t``, ``chunk`` at a time (None: at once), so a multi-GB weight
    can be hashed or copied without being held whole. Its path was checked when the model was opened;
    a file shorter than the tensor is a ModelError."""
    info = _external_info(t)
    length = int(info["length"]) if "length" in info else _expected_nbytes(t)
    left = length
    with open(external_path(t, base_dir), "rb") as f:
        f.seek(int(info.get("offset", 0) or 0))
        while left > 0:
            data = f.read(left if chunk is None else min(chunk, left))
            if not data:
                raise ModelError(f"external data for {t.name!r} is short: read {length - left} of {length} bytes",
                                 where="load", hint="the data file is truncated; copy it again")
            left -= len(data)
            yield data


def _inline_external(model: onnx.ModelProto, base_dir: Path | None) -> None:
    for t, _ in iter_tensor_protos(model.graph):
        if _is_external(t):
            t.raw_data = _read_external(t, base_dir)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT


# ----------------------------------------------------------------------------------------------
# graphsurgeon round trip


def model_to_graph(src: ModelSource) -> gs.Graph:
    """Import into onnx-graphsurgeon; external tensors become lazy :class:`ExternalValues`."""
    try:
        graph = gs.import_onnx(src.model)
    except Exception as e:  # graphsurgeon raises plain exceptions on malformed graphs
        raise ModelError(f"the graph cannot be read: {type(e).__name__}: {e}", where="load",
                         hint="run onnx.checker.check_model on it to see what is wrong") from e
    if src.base_dir is not None:
        for g in _all_graphs(graph):
            for t in g.tensors().values():
                if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) \
                        and not isinstance(t._values, ExternalValues) and _is_external(t._values.tensor):
                    t._values = ExternalValues(t._values.tensor, src.base_dir)
                    t.data_location = None  # once loaded, the values are exported inline
            for node in g.nodes:
                for v in node.attrs.values():
                    if isinstance(v, gs.Constant) and isinstance(v._values, LazyValues) \
                            and _is_external(v._values.tensor):
                        v._values = ExternalValues(v._values.tensor, src.base_dir)
                        v.data_location = None
    _name_unnamed_nodes(graph)
    return graph


def _name_unnamed_nodes(graph: gs.Graph) -> None:
    """Give every node without a name (onnx.helper's default; some converters) a unique one from its
    op type (``MatMul``, ``MatMul_1``, ...): every report line, skip and plan entry names a node, and
    ``--exclude-nodes`` can select it. Deterministic (graph order), so a plan recorded on one export
    replays on another."""
    from onnxcompress.graph.naming import Namer

    unnamed = [n for g in _all_graphs(graph) for n in g.nodes if not n.name]
    if unnamed:
        namer = Namer.for_graph(graph)
        for n in unnamed:
            n.name = namer.fresh(n.op)


def _all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    return [graph, *graph.subgraphs(recursive=True)]


def _detach_renamed_protos(graph: gs.Graph) -> None:
    """Give every lazily held constant whose name differs from its TensorProto's a private copy."""
    for g in _all_graphs(graph):
        consts = [t for t in g.tensors().values() if isinstance(t, gs.Constant)]
        consts += [v for n in g.nodes for v in n.attrs.values() if isinstance(v, gs.Constant)]
        for c in consts:
            v = c._values
            if type(v) not in (LazyValues, ExternalValues) or v.tensor.name == c.name:
                continue
            proto = onnx.TensorProto()
            proto.CopyFrom(v.tensor)
            c._values = ExternalValues(proto, v.base_dir) if isinstance(v, ExternalValues) else LazyValues(proto)


def graph_to_model(graph: gs.Graph, template: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """Export ``graph`` and restore the model-level fields graphsurgeon drops, from ``template``.

    The model the graph was imported from is left as it was, so a graph may be imported straight from
    a caller's (or the reference) model without copying it first: graphsurgeon's exporter writes the
    constant's name into the TensorProto of a tensor still held lazily, which would rename the
    source's initializer when a pass renamed the constant; such protos are copied before export.
    """
    _detach_renamed_protos(graph)
    model = gs.export_onnx(graph, do_type_check=False)
    if template is None:
        return model
    model.ir_version = max(template.ir_version, model.ir_version if graph.ir_version is None else 0)
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    # Opset imports: keep every domain the template declared (custom ones included), add new ones.
    have = {imp.domain: imp.version for imp in model.opset_import}
    merged = {imp.domain: imp.version for imp in template.opset_import}
    for dom, ver in have.items():
        merged[dom] = max(ver, merged.get(dom, 0))
    del model.opset_import[:]
    for dom, ver in merged.items():
        model.opset_import.append(onnx.helper.make_opsetid(dom, ver))
    _restore_doc_strings(model.graph, template.graph)
    if model.ir_version < 4:
        _list_initializers_as_inputs(model.graph)
    return model


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR version 3 requires every initializer to be a graph input too; graphsurgeon drops them."""
    have = {v.name for v in graph.input}
    for t in graph.initializer:
        if t.name not in have:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))


def _restore_doc_strings(graph: onnx.GraphProto, template: onnx.GraphProto) -> None:
    """graphsurgeon drops the doc strings of nodes and graph inputs/outputs: copy them back by name.

    A node keeps its doc string when a node of the same name and op type exists in the template
    (subgraphs matched by their attribute path); inputs and outputs are matched by tensor name.
    """
    docs = {(n.name, n.op_type): n.doc_string for n in template.node if n.name and n.doc_string}
    sub = {(n.name, a.name): a.g for n in template.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH}
    for n in graph.node:
        if not n.doc_string and (n.name, n.op_type) in docs:
            n.doc_string = docs[(n.name, n.op_type)]
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH and (n.name, a.name) in sub:
                _restore_doc_strings(a.g, sub[(n.name, a.name)])
    for mine, theirs in ((graph.input, template.input), (graph.output, template.output)):
        io_docs = {v.name: v.doc_string for v in theirs if v.doc_string}
        for v in mine:
            if not v.doc_string and v.name in io_docs:
                v.doc_string = io_docs[v.name]


# ----------------------------------------------------------------------------------------------
# Saving


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None = None,
    external_data: bool | None = None,
    size_threshold: int = 1024,
    protected: tuple[str | os.PathLike, ...] = (),
) -> Path | None:
    """Write ``model`` to ``path`` atomically; return the path of the external data file or None.

    ``base_dir``: the folder that the model's current external data locations are relative to.
    ``external_data``: True forces a ``<name>.data`` file next to the model for tensors of at least
    ``size_threshold`` bytes; None chooses it automatically when the model would exceed the protobuf
    limit; False keeps everything inline (an error if that cannot fit).
    ``protected``: paths that must not be overwritten (the input model and its data files).
    The caller's ``model`` is not modified.
    """
    out = Path(path)
    where = f"save {str(out)!r}"
    _check_destination(out, protected, where)
    total = sum(_tensor_nbytes(t) for t, _ in iter_tensor_protos(model.graph))
    graph_overhead = model.ByteSize() - sum(
        0 if _is_external(t) else _tensor_nbytes(t) for t, _ in iter_tensor_protos(model.graph))
    if external_data is None:
        external_data = total + graph_overhead >= PROTOBUF_LIMIT
    if not external_data and total + graph_overhead >= PROTOBUF_LIMIT:
        raise ModelError(f"the model holds {total / 2**30:.2f} GiB of tensors, over protobuf's 2 GiB limit",
                         where=where, hint="save with external data (--external-data)")
    data_name = out.name + ".data"
    data_path = out.with_name(data_name)
    if external_data:
        _check_destination(data_path, protected, where)
    # Work on a copy of the message tree but without copying large payloads twice: we swap the
    # payloads of the copy as we stream them.
    # An inline save of a model with no external tensors serializes the caller's model as it is.
    if external_data:
        work = _copy_without_payloads(model)
    elif any(_is_external(t) for t, _ in iter_tensor_protos(model.graph)):
        work = copy.deepcopy(model)
    else:
        work = model
    tmp_files: list[Path] = []
    try:
        if external_data:
            tmp_data = _mkstemp(out.parent, data_name)
            tmp_files.append(tmp_data)
            _stream_external(model, work, tmp_data, data_name, base_dir, size_threshold)
        else:
            src_dir = Path(base_dir) if base_dir is not None else None
            for t, _ in iter_tensor_protos(work.graph):
                if _is_external(t):
                    t.raw_data = _read_external(t, src_dir)
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
        tmp_model = _mkstemp(out.parent, out.name)
        tmp_files.append(tmp_model)
        with open(tmp_model, "wb") as f:
            f.write(work.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        with _publishing(out.parent):
            if external_data:
                os.replace(tmp_files[0], data_path)
            os.replace(tmp_model, out)
            tmp_files.clear()
    except OnnxCompressError:
        raise
    except OSError as e:
        raise ModelError(f"cannot write the output: {e.strerror or e}", where=where,
                         hint="check that the folder exists, is writable and has free space") from e
    finally:
        for p in tmp_files:
            with contextlib.suppress(OSError):
                p.unlink()
    return data_path if external_data else None


@contextlib.contextmanager
def _publishing(folder: Path):
    """Make the final renames one step: a SIGINT/SIGTERM arriving between them is held and handled
    right after both (the Python handlers are swapped for a recorder meanwhile), and two onnxcompress
    processes saving into the same folder take turns (an advisory lock on the folder), so the model
    and its data file always come from the same save."""
    import signal
    import threading

    pending: list[int] = []
    old: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    fd = None
    try:
        try:
            import fcntl

            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock here (Windows, some network filesystems): renames only
            pass
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if pending:  # now deliver what arrived, as it would have been
            handler = old[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])


def _check_destination(out: Path, protected: tuple, where: str) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ModelError(f"output folder {str(parent)!r} does not exist", where=where, hint="create it first")
    if not os.access(parent, os.W_OK):
        raise ModelError(f"output folder {str(parent)!r} is not writable", where=where,
                         hint="choose a folder you can write to")
    if out.is_dir():
        raise ModelError(f"output {str(out)!r} is a folder", where=where, hint="give a file name ending in .onnx")
    real = os.path.realpath(out)
    for p in protected:
        if p is not None and os.path.realpath(p) == real:
            raise ModelError(f"refusing to write over the input {str(p)!r}", where=where,
                             hint="choose a different output path")


def _mkstemp(folder: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a saved model gets the usual permissions
    return Path(tmp)


def _copy_without_payloads(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large raw payloads are cleared (the streamer writes them from ``model``).

    Copying in C and clearing costs one transient copy of the payloads; the caller's model is never
    touched (writing its fields back would grow its protobuf arena by another copy).
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for t, _ in iter_tensor_protos(work.graph):
        if t.HasField("raw_data") and t.ByteSize() > 4096:
            t.ClearField("raw_data")
    return work


def _stream_external(src: onnx.ModelProto, work: onnx.ModelProto, data_file: Path, data_name: str,
                     base_dir, size_threshold: int) -> None:
    """Write every large tensor of ``src`` into ``data_file`` and point ``work``'s copy at it."""
    src_dir = Path(base_dir) if base_dir is not None else None
    pairs = zip(iter_tensor_protos(src.graph), iter_tensor_protos(work.graph))
    with open(data_file, "wb") as f:
        for (s, _), (w, _) in pairs:
            if _is_external(s):
                payload = _read_external(s, src_dir)
            elif s.HasField("raw_data"):
                payload = s.raw_data
            else:
                if s.ByteSize() < size_threshold or s.data_type == onnx.TensorProto.STRING:
                    continue
                payload = onnx.numpy_helper.to_array(s).tobytes()  # typed fields -> raw little-endian
                w.ClearField(onnx.helper.tensor_dtype_to_field(s.data_type))
            if len(payload) < size_threshold:
                if _is_external(s):
                    w.raw_data = payload
                    del w.external_data[:]
                    w.data_location = onnx.TensorProto.DEFAULT
                else:
                    w.raw_data = payload
                continue
            pad = (-f.tell()) % _ALIGN
            if pad:
                f.write(b"\0" * pad)
            offset = f.tell()
            f.write(payload)
            w.ClearField("raw_data")
            del w.external_data[:]
            w.data_location = onnx.TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(payload)))):
                e = w.external_data.add()
                e.key, e.value = k, v
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file (report, cache) atomically: temporary file, fsync, rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ModelError(f"folder {str(path.parent)!r} does not exist", where=f"write {str(path)!r}",
                         hint="create it first")
    tmp = _mkstemp(path.parent, path.name)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ModelError(f"cannot write: {e.strerror or e}", where=f"write {str(path)!r}",
                         hint="check that the folder is writable") from e
