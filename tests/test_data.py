"""Feeds: input specs, seeded random feeds that the model can run on, feed sources, validation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxcompress.data import (
    FeedSource,
    as_feed_source,
    input_specs,
    load_feeds,
    parse_shape_args,
    random_feeds,
    resolve_shapes,
    validate_feed,
)
from onnxcompress.errors import CalibrationError, RecipeError

VOCAB = 10


def embedding_model(vocab: int = VOCAB) -> onnx.ModelProto:
    """token ids (batch, seq) -> Gather on a vocab-row table, masked by an int64 attention mask."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[batch, sequence] input_ids, int64[batch, sequence] attention_mask) => (float[batch, sequence, 4] y) {
          ids32 = Cast<to=6>(input_ids)
          e = Gather<axis=0>(table, ids32)
          m = Cast<to=1>(attention_mask)
          mu = Unsqueeze(m, axes)
          y = Mul(e, mu)
        }
        """
    )
    table = np.arange(vocab * 4, dtype=np.float32).reshape(vocab, 4)
    model.graph.initializer.extend(
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    )
    return model


def image_model() -> onnx.ModelProto:
    return onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, H, W] x, bool[N] flag, float[1] bias) => (float[N, 3, H, W] y) {
          y = Add(x, bias)
        }
        """
    )


def with_bias_initializer(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "bias"))
    return model


# ------------------------------------------------------------------------------------------ specs


def test_input_specs_skip_initializers_and_keep_dynamic_dims():
    specs = input_specs(with_bias_initializer(image_model()))
    assert [s.name for s in specs] == ["x", "flag"]
    assert specs[0].dtype == np.float32 and specs[0].shape == ("N", 3, "H", "W")
    assert specs[1].dtype == np.bool_ and specs[1].shape == ("N",)


def test_input_specs_from_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(embedding_model(), path)
    assert [s.name for s in input_specs(str(path))] == ["input_ids", "attention_mask"]


# ------------------------------------------------------------------------------------------ shapes


def test_resolve_shapes_rule():
    specs = input_specs(with_bias_initializer(image_model()))
    # first dynamic dim = batch, other unnamed-rule dims 1; N bound across inputs
    assert resolve_shapes(specs, batch=4) == {"x": (4, 3, 1, 1), "flag": (4,)}
    # a shape given for x binds N, H, W for every input
    assert resolve_shapes(specs, shapes={"x": (2, 3, 8, 8)}) == {"x": (2, 3, 8, 8), "flag": (2,)}
    emb = input_specs(embedding_model())
    assert resolve_shapes(emb, batch=3) == {"input_ids": (3, 16), "attention_mask": (3, 16)}


def test_resolve_shapes_errors():
    specs = input_specs(with_bias_initializer(image_model()))
    with pytest.raises(CalibrationError, match="did you mean 'x'"):
        resolve_shapes(specs, shapes={"xx": (1, 3, 2, 2)})
    with pytest.raises(CalibrationError, match="rank"):
        resolve_shapes(specs, shapes={"x": (1, 3, 2)})
    with pytest.raises(CalibrationError, match="fixes it to 3"):
        resolve_shapes(specs, shapes={"x": (1, 4, 2, 2)})


def test_parse_shape_args():
    assert parse_shape_args(["x:1x3x224x224", "input:0:2,16", "s:"]) == {
        "x": (1, 3, 224, 224),
        "input:0": (2, 16),
        "s": (),
    }
    for bad in (["x1x3"], ["x:1xa"], ["x:0x3"], ["x:1", "x:2"]):
        with pytest.raises(RecipeError):
            parse_shape_args(bad)


# ------------------------------------------------------------------------------------------ random


def test_random_feeds_give_valid_token_ids_and_masks():
    model = embedding_model()
    feed = random_feeds(model, batch=2, seed=1)
    ids, mask = feed["input_ids"], feed["attention_mask"]
    assert ids.shape == (2, 16) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < VOCAB and len(np.unique(ids)) > 1
    assert mask.dtype == np.int64 and (mask == 1).all()
    # onnxruntime raises on an out-of-range Gather index: the random feed runs
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, feed)
    assert y.shape == (2, 16, 4)
    bad = dict(feed, input_ids=np.full((2, 16), VOCAB + 5, np.int64))
    with pytest.raises(Exception):
        session.run(None, bad)


def test_random_feeds_table_bound_follows_the_table_and_seed():
    small = random_feeds(embedding_model(vocab=3), seed=0)["input_ids"]
    assert small.max() < 3
    a, b = random_feeds(embedding_model(), seed=7), random_feeds(embedding_model(), seed=7)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["input_ids"], random_feeds(embedding_model(), seed=8)["input_ids"])


def test_random_feeds_float_bool_and_dtypes():
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float16[2, 64] h, bool[2, 3] b, int32[4] k, float[N, 32] x) => (float[N, 32] y) {
          y = Identity(x)
        }
        """
    )
    feed = random_feeds(model, shapes={"x": (5, 32)}, seed=0)
    assert feed["h"].dtype == np.float16 and feed["h"].shape == (2, 64)
    assert feed["b"].dtype == np.bool_ and feed["b"].any() and not feed["b"].all()
    assert feed["k"].dtype == np.int32 and 0 <= feed["k"].min() and feed["k"].max() < 10
    x = feed["x"]
    assert x.shape == (5, 32) and abs(float(x.mean())) < 0.5 and 0.6 < float(x.std()) < 1.4


def test_random_feeds_for_scalar_inputs_are_arrays_the_feed_check_accepts():
    """A rank-0 bool input (a flag) got a numpy scalar, which validate_feed then refused: every run
    without data failed with exit 2."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (bool flag, float s, int64 i, float[N, 4] x) => (float[N, 4] y) {
          y = Identity(x)
        }
        """
    )
    feed = random_feeds(model, seed=0)
    assert all(isinstance(v, np.ndarray) and v.shape == () for k, v in feed.items() if k != "x")
    validate_feed(input_specs(model), feed, where="random feed")


# ------------------------------------------------------------------------------------------ sources


def _stack(n: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2)}


def test_npz_stacked_batches(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, **_stack(10))
    source = as_feed_source(path, batch_size=4)
    assert len(source) == 3
    batches = list(source)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert list(source)[0]["x"][0, 1] == 1.0  # re-iterable
    assert len(as_feed_source(path)) == 1  # <= 64 samples: one batch
    np.savez(path, **_stack(100))
    assert [len(b["x"]) for b in as_feed_source(path)] == [32, 32, 32, 4]
    labels = [label for label, _ in as_feed_source(path).labeled()]
    assert labels[1].endswith("[32:64]")


def test_npz_default_batch_follows_a_fixed_model_batch(tmp_path):
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2] x) => (float[1, 2] y) { y = Identity(x) }
        """
    )
    path = tmp_path / "data.npz"
    np.savez(path, **_stack(3))
    assert [b["x"].shape for b in as_feed_source(path, model=model)] == [(1, 2)] * 3


def test_npz_without_shared_sample_axis_is_refused(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((3, 2), np.float32), y=np.zeros((4, 2), np.float32))
    with pytest.raises(CalibrationError, match="sample axis"):
        as_feed_source(path)


def test_directory_of_npz_streams_sorted_files_with_varying_shapes(tmp_path):
    for i, seq in enumerate((5, 7, 3)):
        np.savez(tmp_path / f"{i:03d}.npz", ids=np.zeros((1, seq), np.int64))
    source = as_feed_source(tmp_path)
    assert len(source) == 3
    assert [f["ids"].shape[1] for f in source] == [5, 7, 3]
    assert [f["ids"].shape[1] for f in load_feeds(tmp_path)] == [5, 7, 3]


def test_directory_of_npy_is_one_stacked_set(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((6, 2), np.float32))
    np.save(tmp_path / "m.npy", np.ones((6, 3), np.int64))
    batches = list(as_feed_source(tmp_path, batch_size=4))
    assert [b["x"].shape for b in batches] == [(4, 2), (2, 2)]
    assert set(batches[0]) == {"x", "m"}


def test_empty_or_missing_paths(tmp_path):
    with pytest.raises(CalibrationError, match="no .npz"):
        as_feed_source(tmp_path)
    with pytest.raises(CalibrationError, match="does not exist"):
        as_feed_source(tmp_path / "nope.npz")


def test_iterables_lists_and_generators():
    feeds = [{"x": np.zeros((1, 2), np.float32)} for _ in range(3)]
    source = as_feed_source(feeds)
    assert len(source) == 3 and len(list(source)) == 3 and len(list(source)) == 3
    once = as_feed_source(iter(feeds))
    assert len(list(once)) == 3
    with pytest.raises(CalibrationError, match="only once"):
        list(once)
    with pytest.raises(TypeError):
        len(once)
    assert len(as_feed_source(feeds[0])) == 1
    with pytest.raises(CalibrationError, match="feed 1"):
        list(as_feed_source([feeds[0], 3]))
    assert as_feed_source(source) is source and isinstance(source, FeedSource)


class Reader:
    """onnxruntime CalibrationDataReader protocol: get_next() until None."""

    def __init__(self, n: int, rewind: bool = False):
        self.n, self.served = n, 0
        if rewind:
            self.rewind = self._rewind

    def get_next(self):
        if self.served >= self.n:
            return None
        self.served += 1
        return {"x": np.full((1, 2), self.served, np.float32)}

    def _rewind(self):
        self.served = 0


def test_reader_is_streamed_and_one_shot():
    reader = Reader(3)
    source = as_feed_source(reader)
    iterator = iter(source)
    first = next(iterator)
    assert reader.served == 1 and first["x"][0, 0] == 1  # streamed, not read ahead
    assert len(list(iterator)) == 2
    with pytest.raises(CalibrationError, match="only once"):
        list(source)


def test_reader_with_rewind_is_reiterable():
    source = as_feed_source(Reader(2, rewind=True))
    assert [f["x"][0, 0] for f in source] == [1, 2]
    assert [f["x"][0, 0] for f in source] == [1, 2]


def test_unusable_object():
    with pytest.raises(CalibrationError, match="cannot use a int"):
        as_feed_source(3)


# ------------------------------------------------------------------------------------------ validation


@pytest.fixture
def specs():
    return input_specs(embedding_model())


def good_feed():
    return {"input_ids": np.zeros((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64)}


def test_validate_accepts_a_good_feed(specs):
    validate_feed(specs, good_feed(), where="feed 0")


def test_validate_missing_and_unknown_names(specs):
    feed = good_feed()
    feed["input_idss"] = feed.pop("input_ids")
    with pytest.raises(CalibrationError, match="unknown input 'input_idss' \\(did you mean 'input_ids'\\?\\)") as err:
        validate_feed(specs, feed, where="calib.npz[0:2]")
    assert str(err.value).startswith("calib.npz[0:2]: ") and "hint:" in str(err.value)
    feed = good_feed()
    del feed["attention_mask"]
    with pytest.raises(CalibrationError, match="missing input 'attention_mask'"):
        validate_feed(specs, feed, where="feed 0")


def test_validate_dtype_rank_dims_empty(specs):
    with pytest.raises(CalibrationError, match="dtype int32, expected int64"):
        validate_feed(specs, dict(good_feed(), input_ids=np.zeros((2, 5), np.int32)), where="f")
    with pytest.raises(CalibrationError, match="rank 1"):
        validate_feed(specs, dict(good_feed(), input_ids=np.zeros(5, np.int64)), where="f")
    with pytest.raises(CalibrationError, match="has no samples"):
        validate_feed(specs, dict(good_feed(), input_ids=np.zeros((0, 5), np.int64)), where="f")
    with pytest.raises(CalibrationError, match="is a list"):
        validate_feed(specs, dict(good_feed(), input_ids=[[1, 2]]), where="f")
    fixed = input_specs(with_bias_initializer(image_model()))
    with pytest.raises(CalibrationError, match="axis 1"):
        validate_feed(fixed, {"x": np.zeros((1, 4, 2, 2), np.float32), "flag": np.ones(1, bool)}, where="f")


def test_validate_nan_and_inf():
    specs = input_specs(with_bias_initializer(image_model()))
    x = np.zeros((1, 3, 2, 2), np.float32)
    x[0, 0, 0, 0] = np.nan
    x[0, 1, 0, 0] = np.inf
    with pytest.raises(CalibrationError, match="2 NaN/Inf values"):
        validate_feed(specs, {"x": x, "flag": np.ones(1, bool)}, where="f")


def test_validate_keeps_float64_values_beyond_float32_range_and_checks_bfloat16():
    """1e300 is a finite float64 (it once went through float32 and was called Inf); bfloat16 Inf is caught."""
    import ml_dtypes

    from onnxcompress.data import InputSpec

    wide = [InputSpec("x", np.dtype(np.float64), (None, 2))]
    validate_feed(wide, {"x": np.array([[1e300, -1e300]])}, where="f")
    with pytest.raises(CalibrationError, match="1 NaN/Inf value of 2"):
        validate_feed(wide, {"x": np.array([[1e300, np.inf]])}, where="f")
    half = [InputSpec("x", np.dtype(ml_dtypes.bfloat16), (None, 2))]
    with pytest.raises(CalibrationError, match="1 NaN/Inf value of 2"):
        validate_feed(half, {"x": np.array([[1.0, np.inf]], ml_dtypes.bfloat16)}, where="f")


def test_a_one_shot_source_spooled_reads_the_same_feeds_every_time(tmp_path):
    """Two readers at once, a reader that stops early, exotic dtypes: every read gets every feed."""
    import ml_dtypes

    from onnxcompress.data import spooled

    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 3)).astype(np.float32),
              "h": rng.standard_normal((2,)).astype(ml_dtypes.bfloat16),
              "f8": rng.standard_normal((2,)).astype(ml_dtypes.float8_e5m2),
              "file": np.arange(2, dtype=np.int64), "allow_pickle": np.array([True, False]),
              "text": np.array(["a", "bc"], dtype=object)} for _ in range(4)]
    pulled = []

    def gen():
        for f in feeds:
            pulled.append(1)
            yield f

    src = spooled(as_feed_source(gen()), tmp_path / "spool")
    first = iter(src)
    next(first)  # a pass that stops after one feed
    a, b = list(src), list(src)
    assert len(pulled) == 4 and len(a) == len(b) == 4
    for got in (a, b):  # input names that are savez keywords, ml_dtypes and strings come back as they were
        for f, g in zip(feeds, got):
            assert list(g) == list(f)
            for k in f:
                assert g[k].dtype == f[k].dtype and np.array_equal(f[k], g[k]), k
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [f"feed{i:06d}.npz" for i in range(4)]
    lst = as_feed_source([feeds[0]])
    assert spooled(lst, tmp_path / "unused") is lst  # re-readable: as is

    def failing():
        yield feeds[0]
        raise OSError("disk gone")

    src = spooled(as_feed_source(failing()), tmp_path / "spool2")
    with pytest.raises(OSError):
        list(src)
    with pytest.raises(CalibrationError, match="failed while it was first read: disk gone"):
        list(src)  # not a quietly shorter source


def test_a_zero_length_free_axis_is_data_an_empty_sample_axis_is_not():
    """A decoder's first step feeds a KV cache of past length 0 ([B, H, 0, d]), which onnxruntime runs;
    such feeds were refused as 'empty'. An empty first (sample) axis is still no data."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[B, 2, P, 4] past, float[B, 2, S, 4] new) => (float[B, 2, T, 4] cat) {
          cat = Concat <axis = 2> (past, new)
        }
        """
    )
    specs = input_specs(model)
    validate_feed(specs, {"past": np.zeros((1, 2, 0, 4), np.float32), "new": np.ones((1, 2, 3, 4), np.float32)},
                  where="first step")
    with pytest.raises(CalibrationError, match="'past' has no samples"):
        validate_feed(specs, {"past": np.zeros((0, 2, 1, 4), np.float32), "new": np.ones((1, 2, 3, 4), np.float32)},
                      where="f")
