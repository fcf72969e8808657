"""The fixed digits split that every model, test, README example and benchmark evaluates with.

The data is scikit-learn's bundled ``load_digits()``: 1797 grey-scale 8x8 images of the digits 0..9,
pixel values 0..16. It ships with scikit-learn, so nothing is downloaded.

One permutation, ``numpy.random.default_rng(0).permutation(1797)``, cuts it into three disjoint
splits that never change:

=========  =======  ===========================================
split      samples  used for
=========  =======  ===========================================
``test``   450      accuracy numbers (README, tests, benchmarks)
``calib``  256      calibration of quantizers
``train``  1091     training the bundled models
=========  =======  ===========================================

The bundled models (``models/<name>.onnx``, built by ``tools/build_models.py``) read the images in
one of three layouts, told apart by the rank and element type of the model's single input:

* ``flat``:   float [N, 64], pixel / 16 in [0, 1]          (``mlp``, input ``x``)
* ``image``:  float [N, 1, 8, 8], pixel / 16 in [0, 1]     (``cnn``, input ``x``)
* ``tokens``: int64 [N, 64], the raw pixel values 0..16    (``transformer``, input ``tokens``)

Every model's first output is the logits, [N, 10].
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Union

import numpy as np
import onnx

__all__ = [
    "BUNDLED_MODELS",
    "SPLITS",
    "bundled_model_path",
    "calibration_npz",
    "digits_accuracy",
    "digits_feeds",
    "digits_predictions",
    "digits_split",
    "noisy_test_feeds",
]

BUNDLED_MODELS = ("mlp", "cnn", "transformer")
SPLITS = ("train", "calib", "test")

_SEED = 0
_N_TEST = 450
_N_CALIB = 256
_PIXEL_MAX = 16
_N_PIXELS = 64
_N_CLASSES = 10

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}
_INT_TYPES = {
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}

ModelLike = Union[str, os.PathLike, bytes, onnx.ModelProto]


@functools.lru_cache(maxsize=1)
def _split_indices() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    n = len(load_digits().target)
    perm = np.random.default_rng(_SEED).permutation(n)
    return {
        "test": perm[:_N_TEST],
        "calib": perm[_N_TEST : _N_TEST + _N_CALIB],
        "train": perm[_N_TEST + _N_CALIB :],
    }


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float32), digits.target.astype(np.int64)


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x, y)`` for one split of the fixed digits split.

    ``x`` is float32 [N, 64] with the pixels scaled to [0, 1] (pixel / 16); ``y`` is int64 [N] with the
    digit 0..9. ``split`` is one of ``"train"`` (1091 samples), ``"calib"`` (256) or ``"test"`` (450).
    Fresh arrays are returned on each call, so callers may modify them.

    Raises ``ValueError`` for an unknown split name.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {', '.join(SPLITS)}")
    pixels, labels = _raw_digits()
    idx = _split_indices()[split]
    return pixels[idx] / np.float32(_PIXEL_MAX), labels[idx].copy()


def bundled_model_path(name: str) -> pathlib.Path:
    """Return the path of a bundled model, ``<repo>/models/<name>.onnx``.

    Raises ``ValueError`` for a name that is not in ``BUNDLED_MODELS`` and ``FileNotFoundError`` when
    the file has not been built (``python tools/build_models.py --out models/`` rebuilds it).
    """
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; expected one of {', '.join(BUNDLED_MODELS)}")
    path = pathlib.Path(__file__).resolve().parent.parent / "models" / f"{name}.onnx"
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled model {name!r} not found at {path}; rebuild it with "
            "'python tools/build_models.py --out models/' (needs PyTorch)"
        )
    return path


def _resolve(model: ModelLike) -> Union[str, bytes, onnx.ModelProto]:
    """Turn a bundled name into its path; pass paths (as str), bytes and ModelProtos through."""
    if isinstance(model, str) and model in BUNDLED_MODELS and not os.path.exists(model):
        return str(bundled_model_path(model))
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if isinstance(model, (bytes, onnx.ModelProto)):
        return model
    raise TypeError(
        f"expected a bundled model name, a path, bytes or an onnx.ModelProto, got {type(model).__name__}"
    )


def _fits(dims: list, expected: list) -> bool:
    """Same rank, and every static dimension after the batch one equals the expected size."""
    return len(dims) == len(expected) and all(d is None or d == e for d, e in zip(dims[1:], expected[1:]))


def _model_input(model: ModelLike) -> tuple[str, str, type]:
    """Return ``(input name, layout, numpy dtype)`` of the model's single graph input."""
    resolved = _resolve(model)
    if isinstance(resolved, str):
        proto = onnx.load(resolved, load_external_data=False)
    elif isinstance(resolved, bytes):
        proto = onnx.load_from_string(resolved)
    else:
        proto = resolved
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [inp for inp in proto.graph.input if inp.name not in initializers]
    if len(inputs) != 1:
        names = [inp.name for inp in inputs]
        raise ValueError(f"a digits model has exactly one input; this model has {len(inputs)}: {names}")
    inp = inputs[0]
    tensor_type = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    is_float = tensor_type.elem_type in _FLOAT_TYPES
    if is_float and _fits(dims, [None, _N_PIXELS]):
        return inp.name, "flat", _FLOAT_TYPES[tensor_type.elem_type]
    if is_float and _fits(dims, [None, 1, 8, 8]):
        return inp.name, "image", _FLOAT_TYPES[tensor_type.elem_type]
    if tensor_type.elem_type in _INT_TYPES and _fits(dims, [None, _N_PIXELS]):
        return inp.name, "tokens", _INT_TYPES[tensor_type.elem_type]
    elem = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
    raise ValueError(
        f"input {inp.name!r} ({elem}, shape {dims}) matches no digits layout; expected float [N,64], "
        "float [N,1,8,8] or int64 [N,64]"
    )


def _to_layout(pixels: np.ndarray, layout: str, dtype: type) -> np.ndarray:
    """Convert raw pixel values 0..16, [N, 64], to one model layout."""
    if layout == "tokens":
        return np.clip(np.rint(pixels), 0, _PIXEL_MAX).astype(dtype)
    scaled = (pixels / _PIXEL_MAX).astype(dtype)
    return scaled.reshape(-1, 1, 8, 8) if layout == "image" else scaled


def digits_feeds(name_or_model: ModelLike, split: str = "test") -> dict[str, np.ndarray]:
    """Return the onnxruntime feed dict ``{input name: array}`` of one split for a digits model.

    ``name_or_model`` is a bundled model name (``"mlp"``, ``"cnn"``, ``"transformer"``), a path, the
    serialized bytes or an ``onnx.ModelProto``. The layout follows the model's single input: float
    rank 2 -> [N, 64] in [0, 1]; float rank 4 -> [N, 1, 8, 8] in [0, 1]; integer rank 2 -> the raw
    pixel values 0..16 as token ids. The array has the input's element type (float32, float16,
    float64, int64 or int32), so the feeds also fit a model whose input was converted to float16.
    """
    name, layout, dtype = _model_input(name_or_model)
    x, _ = digits_split(split)
    return {name: _to_layout(x * _PIXEL_MAX, layout, dtype)}


def noisy_test_feeds(name_or_model: ModelLike, *, copies: int = 10, sigma: float = 2.0,
                     seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The test split followed by ``copies`` noisy copies of it, as ``(feeds, labels)``: a larger,
    harder test population for comparisons that the 450 clean samples cannot tell apart.

    Each copy adds seeded Gaussian noise of ``sigma`` pixel levels (of 0..16) to every pixel, rounds to
    the integer levels and clips to 0..16, so every layout (tokens included) sees valid values. The
    labels are the test labels, repeated. ``seed`` fixes the noise."""
    name, layout, dtype = _model_input(name_or_model)
    x, y = digits_split("test")
    pixels = x * _PIXEL_MAX
    rng = np.random.default_rng(seed)
    noisy = [pixels] + [np.clip(np.rint(pixels + rng.normal(0.0, sigma, pixels.shape)), 0, _PIXEL_MAX)
                        for _ in range(copies)]
    return {name: _to_layout(np.concatenate(noisy).astype(np.float32), layout, dtype)}, np.tile(y, copies + 1)


def digits_predictions(
    model: ModelLike,
    feeds: dict[str, np.ndarray] | None = None,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    *,
    split: str = "test",
    batch_size: int = 256,
) -> np.ndarray:
    """The top-1 classes a digits model predicts, run with onnxruntime: on ``feeds`` (one input, samples
    stacked on the first axis, e.g. :func:`noisy_test_feeds`) or else on the ``split``.

    ``model`` is a bundled name, a path (external data next to it is found by onnxruntime), the
    serialized bytes or an ``onnx.ModelProto`` (with its weights inside). Its first output must be the
    logits [N, 10]. Samples are fed in batches of ``batch_size``; a model whose batch dimension is
    fixed is fed in batches of that size, the last one padded.
    """
    import onnxruntime as ort

    resolved = _resolve(model)
    if isinstance(resolved, onnx.ModelProto):
        resolved = resolved.SerializeToString()
    session = ort.InferenceSession(resolved, providers=list(providers))
    (name, feed), = (feeds if feeds is not None else digits_feeds(resolved, split)).items()
    fixed_batch = session.get_inputs()[0].shape[0]
    step = fixed_batch if isinstance(fixed_batch, int) and fixed_batch > 0 else batch_size
    output = session.get_outputs()[0].name
    predictions = []
    for start in range(0, len(feed), step):
        chunk = feed[start : start + step]
        pad = step - len(chunk) if step == fixed_batch else 0
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        (logits,) = session.run([output], {name: chunk})
        if logits.ndim != 2 or logits.shape[1] != _N_CLASSES:
            raise ValueError(f"first output {output!r} has shape {logits.shape}; expected logits [N, 10]")
        predictions.append(np.argmax(logits[: len(logits) - pad], axis=1))
    return np.concatenate(predictions)


def digits_accuracy(
    model: ModelLike,
    split: str = "test",
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    *,
    batch_size: int = 256,
) -> float:
    """Return the top-1 accuracy in [0, 1] of a digits model on one split (:func:`digits_predictions`)."""
    predictions = digits_predictions(model, providers=providers, split=split, batch_size=batch_size)
    return float(np.mean(predictions == digits_split(split)[1]))


def calibration_npz(path: Union[str, os.PathLike], name_or_model: ModelLike, n: int = 256) -> pathlib.Path:
    """Write ``n`` calibration samples for a digits model to an ``.npz`` file and return its path.

    The file holds one array per model input, keyed by the input name, samples stacked on axis 0
    (the convention of ``--calib-data`` and of NVIDIA ModelOpt). The samples are the ``calib`` split
    in the model's layout (see :func:`digits_feeds`). For ``n`` up to 256 they are its first ``n``
    samples; beyond 256 the split is cycled and every repeated sample gets seeded Gaussian pixel
    noise (sigma 0.5 on the 0..16 scale, clipped to 0..16; token ids are rounded), so that 512-sample
    calibration runs see distinct inputs. The result is the same on every call.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    name, layout, dtype = _model_input(name_or_model)
    x, _ = digits_split("calib")
    pixels = x[np.arange(n) % len(x)] * _PIXEL_MAX
    if n > len(x):
        rng = np.random.default_rng(_SEED)
        noise = rng.normal(0.0, 0.5, size=pixels[len(x) :].shape).astype(np.float32)
        pixels[len(x) :] = np.clip(pixels[len(x) :] + noise, 0, _PIXEL_MAX)
    out = pathlib.Path(path)
    with open(out, "wb") as f:
        np.savez(f, **{name: _to_layout(pixels, layout, dtype)})
    return out
