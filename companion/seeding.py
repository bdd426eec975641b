"""The one seeding convention of the package and the book.

A run of an experiment is identified by one integer, its *seed*.
Everything random in the run is drawn from a stream derived from that
seed and a fixed *path* of integers naming what the stream is for::

    rng(seed, KERNELS, i)    the initial kernel of layer i
    rng(seed, BATCHES)       the order of the mini-batches
    rng(seed, DROPOUT, i)    the dropout masks of layer i

:func:`rng` hands the seed and the path to numpy's ``SeedSequence``, which
mixes them into independent streams: two different paths, or two
different seeds, never share a stream (``seed + i`` would: seed 0's layer
1 is seed 1's layer 0).  The MNIST split of a run is
``load_mnist_subset(seed=seed)``, so that the test set, too, changes with
the seed (chapter 8 explains why the verdicts need that).
"""

from __future__ import annotations

import numpy as np

from companion._validation import check_int

__all__ = [
    "BATCHES",
    "DROPOUT",
    "KERNELS",
    "PERTURB",
    "derive_seed",
    "rng",
]

KERNELS = 0
"""Path element of the streams that draw initial kernels."""
BATCHES = 1
"""Path element of the stream that orders the mini-batches."""
DROPOUT = 2
"""Path element of the streams that draw dropout masks."""
PERTURB = 3
"""Path element of any other stream an experiment needs."""


def _entropy(seed: int, path: tuple[int, ...]) -> list[int]:
    values = [check_int(seed, "seed", low=0)]
    values += [check_int(p, f"path[{i}]", low=0) for i, p in enumerate(path)]
    return values


def rng(seed: int, *path: int) -> np.random.Generator:
    """A generator for the stream ``path`` of run ``seed``.

    ``rng(seed, *path)`` is ``np.random.default_rng(SeedSequence([seed,
    *path]))``: the same arguments always give the same numbers, on every
    machine and numpy version that keeps PCG64.

    Raises
    ------
    TypeError, ValueError
        ``seed`` or a path element is not an int >= 0.
    """
    return np.random.default_rng(np.random.SeedSequence(_entropy(seed, path)))


def derive_seed(seed: int, *path: int) -> int:
    """An int seed in [0, 2**31) for the stream ``path`` of run ``seed``.

    For libraries that take an integer seed rather than a generator
    (Keras's initializers, ``companion.data.batches``).  Derived like
    :func:`rng`, so it is independent of every other path.
    """
    state = np.random.SeedSequence(_entropy(seed, path)).generate_state(1)
    return int(state[0] >> 1)
