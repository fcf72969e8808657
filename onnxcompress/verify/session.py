"""onnxruntime sessions for verification: providers by short name, sessions from any model form, runs.

Providers are named by a short name (``cpu``, ``cuda``, ``tensorrt``, ``dml``, ``coreml``,
``openvino``, ``rocm``, ``migraphx``, ``qnn``, ``webgpu``, ``xnnpack``) or by onnxruntime's own name
(``CUDAExecutionProvider``), case-insensitively. A session for a GPU or NPU provider lists the CPU
provider after it, so that nodes without a kernel there fall back to the CPU the way users run them.

A model is a path, serialized bytes or an ``onnx.ModelProto``:

* a path is handed to onnxruntime as it is (external data next to it, models over 2 GB);
* bytes and protos are loaded from memory. A proto whose tensors still reference external data (loaded
  with ``load_external_data=False``) needs ``base_dir``, the folder the references are relative to: the
  session config entry ``session.model_external_initializers_file_folder_path`` tells onnxruntime
  (checked with onnxruntime 1.32). If that fails (an older onnxruntime) or the proto is too large to
  serialize, the model is saved with its external data into a temporary folder (never the current
  directory), the session is made from that path and the folder is removed.

Optimization: ``optimize=False`` is ``ORT_DISABLE_ALL`` (the reference); ``optimize=True`` keeps
onnxruntime's default (``ORT_ENABLE_ALL``), the way users run a model.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, helper

from onnxcompress.errors import ModelError, RecipeError, did_you_mean

__all__ = [
    "ProviderChoice",
    "available_providers",
    "resolve_providers",
    "make_session",
    "run_session",
    "run_on_data",
    "feed_shapes",
    "one_line",
    "DATA_FIT_HINT",
    "uses_external_data",
    "EXTERNAL_FOLDER_KEY",
]

log = logging.getLogger(__name__)

EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_CPU = "CPUExecutionProvider"
_TWO_GB = 2**31 - 1

SHORT_NAMES = {
    "cpu": _CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}
# The package that brings each provider, for the hint when it is missing.
_PACKAGE = {
    "CUDAExecutionProvider": "onnxruntime-gpu",
    "TensorrtExecutionProvider": "onnxruntime-gpu (with TensorRT installed)",
    "DmlExecutionProvider": "onnxruntime-directml",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
    "QNNExecutionProvider": "onnxruntime-qnn",
    "ROCMExecutionProvider": "onnxruntime-rocm",
    "MIGraphXExecutionProvider": "onnxruntime-migraphx",
}


class ProviderChoice(NamedTuple):
    """A requested provider: ``short`` name, onnxruntime's ``ort_name``, whether this onnxruntime
    build has it, and why not (``""`` when available)."""

    short: str
    ort_name: str
    available: bool
    reason: str


def available_providers() -> list[str]:
    """onnxruntime's names of the providers this build has (``onnxruntime.get_available_providers()``)."""
    return list(ort.get_available_providers())


def _short_name(ort_name: str) -> str:
    return next((short for short, full in SHORT_NAMES.items() if full == ort_name), ort_name)


def resolve_providers(names: Sequence[str] | str) -> list[ProviderChoice]:
    """Map short or full provider names to :class:`ProviderChoice`, in order, without duplicates.

    ``names`` may be a comma-separated string. Raises :class:`RecipeError` for a name onnxruntime
    does not know at all; a known provider missing from this build is returned with
    ``available=False`` and the reason (``"CUDAExecutionProvider is not available in this onnxruntime
    build (CPU only); install onnxruntime-gpu"``).
    """
    if isinstance(names, str):
        names = [n for n in (p.strip() for p in names.split(",")) if n]
    available = available_providers()
    known = set(ort.get_all_providers()) | set(SHORT_NAMES.values())
    by_lower = {n.lower(): n for n in known} | {s: full for s, full in SHORT_NAMES.items()}
    build = "CPU only" if set(available) <= {_CPU, "AzureExecutionProvider"} else "has " + ", ".join(available)
    choices: list[ProviderChoice] = []
    for name in names:
        ort_name = by_lower.get(name.strip().lower())
        if ort_name is None:
            raise RecipeError(
                f"unknown execution provider {name!r}{did_you_mean(name.lower(), SHORT_NAMES)}",
                where="providers",
                hint=f"use one of {sorted(SHORT_NAMES)} or onnxruntime's full names",
            )
        if any(c.ort_name == ort_name for c in choices):
            continue
        if ort_name in available:
            choices.append(ProviderChoice(_short_name(ort_name), ort_name, True, ""))
        else:
            package = _PACKAGE.get(ort_name, f"an onnxruntime build with {ort_name}")
            reason = f"{ort_name} is not available in this onnxruntime build ({build}); install {package}"
            choices.append(ProviderChoice(_short_name(ort_name), ort_name, False, reason))
    return choices


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True when any tensor of the model (initializers, Constant attributes, subgraphs) still
    references external data."""
    return any(
        external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)
    )


def make_session(
    model: onnx.ModelProto | str | os.PathLike | bytes,
    provider: str = "cpu",
    *,
    optimize: bool = True,
    base_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` for ``model`` on ``provider`` (see the module docstring).

    ``threads`` sets the intra-op thread count (``None``: onnxruntime's default). Raises
    :class:`RecipeError` for an unknown or unavailable provider and :class:`ModelError` when
    onnxruntime cannot load the model (with the first line of its message and a hint).
    """
    (choice,) = resolve_providers([provider])
    if not choice.available:
        raise RecipeError(choice.reason, where="session", hint="choose an available provider")
    providers = [choice.ort_name] + ([_CPU] if choice.ort_name != _CPU else [])
    options = _options(optimize, threads)
    where = f"session ({choice.short})"

    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise ModelError(f"model file {str(model)!r} does not exist", where=where, hint="check the path")
        return _create(str(model), options, providers, where=where)
    if isinstance(model, (bytes, bytearray)):
        if base_dir is not None:
            options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(Path(base_dir).resolve()))
        return _create(bytes(model), options, providers, where=where)
    if not isinstance(model, onnx.ModelProto):
        raise ModelError(
            f"cannot make a session from a {type(model).__name__}",
            where=where,
            hint="pass a path, bytes or an onnx.ModelProto",
        )
    external = uses_external_data(model)
    if external and base_dir is None:
        raise ModelError(
            "the model references external data but no base_dir was given",
            where=where,
            hint="pass base_dir= (the folder of the .onnx file), or load it with load_external_data=True",
        )
    spilled = external and any(e.key == "basepath" for t in external_data_helper._get_all_tensors(model)
                                for e in t.external_data)
    if model.ByteSize() <= _TWO_GB and not spilled:
        if external:
            options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(Path(base_dir).resolve()))
        try:
            return _create(model.SerializeToString(), options, providers, where=where)
        except ModelError:
            if not external:
                raise
            log.info("%s: loading external data through the config entry failed; using a temporary folder", where)
    return _via_temporary_folder(model, base_dir, _options(optimize, threads), providers, where=where)


def _options(optimize: bool, threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # fatal only: optimizer warnings are noise for a parity check, and an error is raised as an exception
    # (which we report in one line) besides being logged to stderr in colour
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    return options


def _via_temporary_folder(
    model: onnx.ModelProto,
    base_dir: str | os.PathLike | None,
    options: ort.SessionOptions,
    providers: list[str],
    *,
    where: str,
) -> ort.InferenceSession:
    """Save ``model`` (its external data read from ``base_dir``, tensor by tensor) to a temporary
    folder with one external data file; load the path."""
    from onnxcompress.graph.io import save as save_model

    with tempfile.TemporaryDirectory(prefix="onnxcompress-session-") as folder:
        path = os.path.join(folder, "model.onnx")
        save_model(model, path, base_dir=base_dir, external_data=True)
        return _create(path, options, providers, where=where)


def _create(model: str | bytes, options: ort.SessionOptions, providers: list[str], *, where: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as exc:
        message = " ".join(str(exc).split())
        raise ModelError(
            f"onnxruntime cannot load the model: {message[:400]}",
            where=where,
            hint=_load_hint(message),
        ) from exc


def _load_hint(message: str) -> str:
    lower = message.lower()
    if "external data" in lower or "external_data" in lower:
        return "keep the external data file next to the .onnx file (or pass base_dir); its location must stay inside that folder"
    if "is not a registered function/op" in lower:
        return ("a custom op that this onnxruntime has no kernel for: onnxcompress needs onnxruntime to run the "
                "model to verify or calibrate it; use --no-verify and data-free techniques")
    if "not_implemented" in lower or "could not find an implementation" in lower:
        return "an op or type has no kernel in this onnxruntime build and provider; try another provider or a newer onnxruntime"
    if "opset" in lower:
        return "the model's opset may be newer than this onnxruntime supports; upgrade onnxruntime"
    return "check the model with onnx.checker.check_model(path, full_check=True)"


def run_session(
    session: ort.InferenceSession,
    feed: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``session`` on ``feed`` and return ``{output name: array}``.

    Only the feed entries the session takes are passed. Types numpy cannot hand to onnxruntime
    directly (bfloat16, float8: ml_dtypes arrays) go through ``OrtValue``; outputs of those types are
    read back as ml_dtypes arrays from CPU memory. onnxruntime errors propagate unchanged (the caller
    decides whether a failed run is a model error or a parity failure).
    """
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    names = list(output_names) if output_names is not None else list(outputs)
    feed = {k: v for k, v in feed.items() if k in inputs}
    exotic = any(_is_exotic(v.dtype) for v in feed.values()) or any(
        _is_exotic_type(outputs[n].type) for n in names if n in outputs
    )
    if not exotic:
        return dict(zip(names, session.run(names, feed)))
    values = {k: _to_ort_value(v) for k, v in feed.items()}
    results = session.run_with_ort_values(names, values)
    return {name: _from_ort_value(value) for name, value in zip(names, results)}


def run_on_data(session: ort.InferenceSession, feed: Mapping[str, np.ndarray], names: Sequence[str] | None = None, *,
                where: str, batch: int) -> dict[str, np.ndarray]:
    """:func:`run_session` on a batch of the user's data; a failure there (a shape the
    model cannot take, a token id out of range) is the data's, not a bug: it becomes a
    :class:`~onnxcompress.errors.CalibrationError` naming the batch (1-based) and its shapes."""
    try:
        return run_session(session, feed, names)
    except Exception as exc:  # onnxruntime's Fail / InvalidArgument / RuntimeException
        from onnxcompress.errors import CalibrationError

        raise CalibrationError(f"onnxruntime failed on calibration batch {batch} ({feed_shapes(feed)}): "
                               f"{one_line(exc)}", where=where, hint=DATA_FIT_HINT) from exc


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most 300 characters (onnxruntime's span several)."""
    return " ".join(str(exc).split())[:300] or type(exc).__name__


#: the hint of every error raised when onnxruntime cannot run the model on the user's data
DATA_FIT_HINT = ("the data must fit the model: check the feeds' shapes and dtypes against the model's inputs, "
                 "and values such as token ids against their tables")


def feed_shapes(feed: Mapping[str, np.ndarray]) -> str:
    """``x: float32[4, 7], ids: int64[4, 16]``: a feed as an error message names it."""
    return ", ".join(f"{k}: {np.asarray(v).dtype}{list(np.shape(v))}" for k, v in feed.items())


def _is_exotic(dtype: np.dtype) -> bool:
    return dtype.kind == "V"


def _is_exotic_type(ort_type: str) -> bool:
    return any(t in ort_type for t in ("bfloat16", "float8", "int4", "float4"))


def _to_ort_value(array: np.ndarray) -> ort.OrtValue:
    if not _is_exotic(array.dtype):
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    elem = helper.np_dtype_to_tensor_dtype(array.dtype)
    raw = np.ascontiguousarray(array).view(np.uint8 if array.dtype.itemsize == 1 else np.uint16)
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, elem)


def _from_ort_value(value: Any) -> np.ndarray:
    try:
        return value.numpy()
    except Exception:
        elem = value.element_type() if hasattr(value, "element_type") else None
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem)) if elem else None
        shape = tuple(value.shape())
        nbytes = value.tensor_size_in_bytes()
        if dtype is None or value.device_name().lower() != "cpu" or nbytes != dtype.itemsize * int(np.prod(shape)):
            raise
        buffer = (ctypes.c_uint8 * nbytes).from_address(value.data_ptr())
        return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape)
