"""Tests for onnxcompress.datasets and the bundled models in models/ (no PyTorch needed)."""

from __future__ import annotations

import collections
import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxcompress import datasets

MODELS_DIR = pathlib.Path(__file__).resolve().parent.parent / "models"
# The floors the brief sets; manifest.json (written by tools/build_models.py) holds what was measured.
ACCURACY_FLOOR = {"mlp": 0.96, "cnn": 0.97, "transformer": 0.93}
REQUIRED_OPS = {
    "mlp": {"Gemm", "Relu"},
    "cnn": {"Conv", "BatchNormalization", "Relu", "Add"},
    "transformer": {"Gather", "MatMul", "Add", "Softmax", "LayerNormalization", "Erf", "Transpose", "Reshape"},
}
INPUTS = {"mlp": "x", "cnn": "x", "transformer": "tokens"}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((MODELS_DIR / "manifest.json").read_text())


def tiny_model(input_type: str, body: str = "logits = Identity(x)", output_type: str | None = None) -> onnx.ModelProto:
    """A one-input model from ONNX text; ``input_type`` like ``float[N, 64]``."""
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g ({input_type} x) => ({output_type or input_type} logits) {{
        {body}
    }}
    """
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


# --- the split -------------------------------------------------------------------------------------


def test_split_sizes_types_and_ranges():
    sizes = {}
    for split in datasets.SPLITS:
        x, y = datasets.digits_split(split)
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(y), 64)
        assert x.min() == 0.0 and x.max() == 1.0
        np.testing.assert_array_equal(x * 16, np.rint(x * 16))  # pixel / 16 exactly
        assert set(np.unique(y)) == set(range(10))
        sizes[split] = len(y)
    assert sizes == {"train": 1091, "calib": 256, "test": 450}


def test_split_is_the_documented_permutation():
    from sklearn.datasets import load_digits

    digits = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    x, y = datasets.digits_split("test")
    np.testing.assert_array_equal(x, (digits.data[perm[:450]] / 16).astype(np.float32))
    np.testing.assert_array_equal(y, digits.target[perm[:450]])
    x, y = datasets.digits_split("calib")
    np.testing.assert_array_equal(y, digits.target[perm[450:706]])


def test_splits_are_deterministic_and_fresh():
    x1, y1 = datasets.digits_split("train")
    x1[:] = -1
    x2, y2 = datasets.digits_split("train")
    assert x2.min() == 0.0  # the caller's edit did not leak into the cache
    np.testing.assert_array_equal(y1, y2)


def test_fresh_process_gives_the_same_split_and_imports_no_torch():
    code = (
        "import json, sys, onnxcompress.datasets as d; d.digits_accuracy('mlp');"
        "print(json.dumps([d.digits_split('test')[1][:20].tolist(), 'torch' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    labels, torch_imported = json.loads(out)
    assert labels == datasets.digits_split("test")[1][:20].tolist()
    assert not torch_imported


def test_splits_are_disjoint_and_cover_the_data():
    idx = datasets._split_indices()
    sets = {name: set(arr.tolist()) for name, arr in idx.items()}
    assert all(len(sets[n]) == len(idx[n]) for n in sets)
    assert not sets["train"] & sets["test"]
    assert not sets["train"] & sets["calib"]
    assert not sets["calib"] & sets["test"]
    assert sets["train"] | sets["calib"] | sets["test"] == set(range(1797))


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown digits split 'validation'.*train, calib, test"):
        datasets.digits_split("validation")


def test_unknown_bundled_model():
    with pytest.raises(ValueError, match="unknown bundled model 'resnet'.*mlp, cnn, transformer"):
        datasets.bundled_model_path("resnet")


# --- the bundled models ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", datasets.BUNDLED_MODELS)
def test_bundled_model_file(name, manifest):
    path = datasets.bundled_model_path(name)
    assert path == MODELS_DIR / f"{name}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert path.stat().st_size < 2_000_000
    # manifest.json and the README were written by the run that wrote this very file
    assert path.stat().st_size == manifest[name]["bytes"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest[name]["sha256"]
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    known = (".onnx", ".md", ".json")
    sidecars = [f for f in MODELS_DIR.iterdir()
                if f.suffix not in known and f.name != ".gitattributes" and not f.name.endswith(".calib.npz")]
    assert not sidecars  # no external data files next to the models
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) >= 17
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert dict(sorted(ops.items())) == manifest[name]["op_histogram"]
    assert REQUIRED_OPS[name] <= set(ops)
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert (inp.name, out.name) == (INPUTS[name], "logits")
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert out.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert out.type.tensor_type.shape.dim[1].dim_value == 10


@pytest.mark.parametrize("name", datasets.BUNDLED_MODELS)
def test_bundled_model_accuracy(name, manifest):
    accuracy = datasets.digits_accuracy(datasets.bundled_model_path(name))
    assert accuracy >= ACCURACY_FLOOR[name]
    assert manifest[name]["target_accuracy"] >= ACCURACY_FLOOR[name]
    # What the README documents, within one test sample (onnxruntime builds may round differently).
    assert abs(accuracy - manifest[name]["test_accuracy"]) <= 1 / 450 + 1e-9


def test_bn_is_not_folded_in_cnn():
    model = onnx.load(str(datasets.bundled_model_path("cnn")))
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    conv = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(bn) == len(conv) == 4
    producers = {o: n for n in model.graph.node for o in n.output}
    assert all(producers[n.input[0]].op_type == "Conv" for n in bn)


# --- feeds -----------------------------------------------------------------------------------------


def test_feed_layouts():
    x, _ = datasets.digits_split("test")
    (mlp,) = datasets.digits_feeds("mlp").items()
    assert mlp[0] == "x" and mlp[1].dtype == np.float32 and mlp[1].shape == (450, 64)
    np.testing.assert_array_equal(mlp[1], x)
    (cnn,) = datasets.digits_feeds("cnn").items()
    assert cnn[0] == "x" and cnn[1].dtype == np.float32 and cnn[1].shape == (450, 1, 8, 8)
    np.testing.assert_array_equal(cnn[1].reshape(450, 64), x)
    (tf,) = datasets.digits_feeds("transformer").items()
    assert tf[0] == "tokens" and tf[1].dtype == np.int64 and tf[1].shape == (450, 64)
    assert tf[1].min() == 0 and tf[1].max() == 16
    np.testing.assert_array_equal(tf[1], x * 16)
    assert datasets.digits_feeds("mlp", "calib")["x"].shape == (256, 64)


@pytest.mark.parametrize("name", datasets.BUNDLED_MODELS)
def test_feeds_accept_path_bytes_and_proto(name):
    path = datasets.bundled_model_path(name)
    expected = datasets.digits_feeds(name, "calib")
    for model in (path, str(path), path.read_bytes(), onnx.load(str(path))):
        feeds = datasets.digits_feeds(model, "calib")
        assert feeds.keys() == expected.keys()
        np.testing.assert_array_equal(next(iter(feeds.values())), next(iter(expected.values())))


def test_feeds_follow_the_input_dtype_and_name():
    fp16 = tiny_model("float16[N, 1, 8, 8]")
    fp16.graph.input[0].name = "image"
    fp16.graph.node[0].input[0] = "image"
    (name, arr), = datasets.digits_feeds(fp16).items()
    assert name == "image" and arr.dtype == np.float16 and arr.shape == (450, 1, 8, 8)
    (name, arr), = datasets.digits_feeds(tiny_model("int32[N, 64]")).items()
    assert arr.dtype == np.int32 and arr.max() == 16


@pytest.mark.parametrize("input_type", ["float[N, 3]", "float[N, 64, 1]", "float[N, 3, 8, 8]", "bool[N, 64]"])
def test_feeds_reject_other_layouts(input_type):
    with pytest.raises(ValueError, match="matches no digits layout"):
        datasets.digits_feeds(tiny_model(input_type))


def test_feeds_reject_two_inputs():
    model = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 64] a, float[N, 64] b) => (float[N, 64] c) { c = Add(a, b) }"""
    )
    with pytest.raises(ValueError, match="exactly one input.*2"):
        datasets.digits_feeds(model)


def test_feeds_reject_unsupported_argument():
    with pytest.raises(TypeError, match="got int"):
        datasets.digits_feeds(3)


# --- accuracy --------------------------------------------------------------------------------------


def constant_class_model(cls: int, batch: str = "N") -> onnx.ModelProto:
    """Logits that always pick ``cls``: accuracy is exactly that class's share of the split."""
    body = f"""
        zeros = Constant <value = float[64, 10] {{{', '.join(['0.0'] * 640)}}}> ()
        bias = Constant <value = float[10] {{{', '.join('1.0' if i == cls else '0.0' for i in range(10))}}}> ()
        prod = MatMul(x, zeros)
        logits = Add(prod, bias)
    """
    return tiny_model(f"float[{batch}, 64]", body, f"float[{batch}, 10]")


def test_accuracy_is_exact_on_a_known_model():
    _, y = datasets.digits_split("test")
    for cls in (0, 3):
        assert datasets.digits_accuracy(constant_class_model(cls)) == pytest.approx(np.mean(y == cls))
    _, y = datasets.digits_split("calib")
    assert datasets.digits_accuracy(constant_class_model(7), "calib") == pytest.approx(np.mean(y == 7))


def test_accuracy_with_a_fixed_batch_pads_the_last_batch():
    _, y = datasets.digits_split("test")
    assert datasets.digits_accuracy(constant_class_model(5, batch="7")) == pytest.approx(np.mean(y == 5))
    mlp = onnx.load(str(datasets.bundled_model_path("mlp")))
    for value in (mlp.graph.input[0], mlp.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 7
    assert datasets.digits_accuracy(mlp) == datasets.digits_accuracy("mlp")


def test_accuracy_accepts_bytes_proto_and_external_data(tmp_path):
    path = datasets.bundled_model_path("cnn")
    expected = datasets.digits_accuracy(path)
    assert datasets.digits_accuracy(path.read_bytes()) == expected
    assert datasets.digits_accuracy(onnx.load(str(path))) == expected
    assert datasets.digits_accuracy("cnn", batch_size=17) == expected
    external = tmp_path / "cnn_ext.onnx"
    onnx.save_model(
        onnx.load(str(path)), str(external), save_as_external_data=True, location="cnn_ext.data", size_threshold=1024
    )
    stub = onnx.load(str(external), load_external_data=False)
    assert sum(init.data_location == onnx.TensorProto.EXTERNAL for init in stub.graph.initializer) >= 4
    assert (tmp_path / "cnn_ext.data").stat().st_size > 30_000
    assert datasets.digits_accuracy(external) == expected
    assert datasets.digits_feeds(external).keys() == {"x"}


def test_accuracy_rejects_non_logits_output():
    with pytest.raises(ValueError, match=r"expected logits \[N, 10\]"):
        datasets.digits_accuracy(tiny_model("float[N, 64]"))


# --- calibration files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", datasets.BUNDLED_MODELS)
def test_calibration_npz_round_trip(name, tmp_path):
    path = datasets.calibration_npz(tmp_path / "calib.npz", name)
    assert path == tmp_path / "calib.npz"
    calib = datasets.digits_feeds(name, "calib")
    with np.load(path) as data:
        assert sorted(data.files) == [INPUTS[name]]
        np.testing.assert_array_equal(data[INPUTS[name]], calib[INPUTS[name]])
        assert data[INPUTS[name]].dtype == calib[INPUTS[name]].dtype
    with np.load(datasets.calibration_npz(tmp_path / "few.npz", name, n=10)) as data:
        np.testing.assert_array_equal(data[INPUTS[name]], calib[INPUTS[name]][:10])


@pytest.mark.parametrize("name", datasets.BUNDLED_MODELS)
def test_calibration_npz_beyond_256_cycles_with_noise(name, tmp_path):
    key = INPUTS[name]
    calib = datasets.digits_feeds(name, "calib")[key]
    with np.load(datasets.calibration_npz(tmp_path / "a.npz", name, n=600)) as data:
        big = data[key]
    with np.load(datasets.calibration_npz(tmp_path / "b.npz", name, n=600)) as data:
        np.testing.assert_array_equal(data[key], big)  # seeded: the same every time
    assert big.shape == (600, *calib.shape[1:]) and big.dtype == calib.dtype
    np.testing.assert_array_equal(big[:256], calib)
    scale = 16 if name == "transformer" else 1
    assert big.min() >= 0 and big.max() <= scale
    for start in (256, 512):
        repeat = big[start : start + 256].reshape(-1, 64).astype(np.float64)
        base = calib[: len(repeat)].reshape(-1, 64).astype(np.float64)
        assert (repeat != base).any(axis=1).all()  # every repeated sample is perturbed...
        assert np.abs(repeat - base).mean() < 0.05 * scale  # ...but stays close to the original digit
    assert not np.array_equal(big[512:600], big[256:344])  # each cycle gets its own noise


def test_calibration_npz_rejects_bad_n(tmp_path):
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            datasets.calibration_npz(tmp_path / "c.npz", "mlp", n=n)


@pytest.mark.parametrize("name", datasets.BUNDLED_MODELS)
def test_bundled_calibration_file_is_the_calib_split(name):
    data = np.load(MODELS_DIR / f"{name}.calib.npz")
    (key,) = data.files
    assert key == INPUTS[name]
    expected = datasets.digits_feeds(name, "calib")[key]
    np.testing.assert_array_equal(data[key], expected)


def test_noisy_test_feeds_are_valid_seeded_and_start_with_the_clean_split():
    from onnxcompress.datasets import digits_feeds, digits_split, noisy_test_feeds

    for name in datasets.BUNDLED_MODELS:
        feeds, labels = noisy_test_feeds(name, copies=3)
        ((key, x),) = feeds.items()
        ((_, clean),) = digits_feeds(name, "test").items()
        assert key == next(iter(digits_feeds(name, "test"))) and x.dtype == clean.dtype
        assert len(x) == 4 * len(clean) and np.array_equal(labels, np.tile(digits_split("test")[1], 4))
        assert np.array_equal(x[:len(clean)], clean)              # the clean split first, unchanged
        flat = x.reshape(len(x), -1).astype(np.float64) * (1 if name == "transformer" else 16)
        assert flat.min() >= 0 and flat.max() <= 16 and np.allclose(flat, np.rint(flat), atol=1e-4)  # valid levels
        assert not np.array_equal(x[len(clean):2 * len(clean)], clean)  # the copies really are noisy
        again, _ = noisy_test_feeds(name, copies=3)
        assert np.array_equal(again[key], x)
        other, _ = noisy_test_feeds(name, copies=3, seed=1)
        assert not np.array_equal(other[key], x)


def test_digits_predictions_on_given_feeds_and_on_a_split():
    """On the noisy population the first 450 predictions are the test split's, and the split's
    predictions give digits_accuracy; noise moves some predictions."""
    feeds, labels = datasets.noisy_test_feeds("mlp", copies=1)
    on_feeds = datasets.digits_predictions("mlp", feeds, batch_size=100)
    on_split = datasets.digits_predictions("mlp")
    assert on_feeds.shape == (900,) and np.array_equal(on_feeds[:450], on_split)
    assert datasets.digits_accuracy("mlp") == float(np.mean(on_split == labels[:450]))
    assert not np.array_equal(on_feeds[450:], on_split)
