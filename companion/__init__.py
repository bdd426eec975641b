"""Companion package of the book *Batch Normalization, Executable*.

Everything the book derives, as importable, tested code:

* :mod:`companion.functional` -- the stateless math: ``batchnorm_forward``,
  ``batchnorm_backward`` (closed form), ``batchnorm_backward_staged`` (node
  by node), ``batchnorm_inference`` and ``batchnorm_inference_backward``;
* :mod:`companion.layers` -- ``BatchNorm``, a layer with Keras's semantics
  (defined in :mod:`companion.nn.normalization`, with ``LayerNorm`` and
  ``GroupNorm``); chapter 16's alternatives in :mod:`companion.per_example`
  and :mod:`companion.batch_renorm`, chapter 17's merge of per-device
  statistics in :mod:`companion.moments`;
* :mod:`companion.gradcheck` -- ``numerical_gradient`` and ``rel_error``;
* :mod:`companion.nn` -- the numpy layers, loss and optimizer of the book's
  networks; :mod:`companion.training` -- their training loop;
* ``recalibrate`` (:mod:`companion.recalibration`, the paper's Algorithm 2),
  ``fold_batchnorm`` (:mod:`companion.folding`) and
  :mod:`companion.conventions` (Keras <-> PyTorch) -- Part IV.

Importing the package imports numpy only.  The modules that need more say
what to install when it is missing: ``companion.tf_env`` and
``companion.tf_models`` need ``batchnorm-companion[tf]``,
``companion.plotting`` needs ``[plot]``, and the MNIST subset
(``companion.data.load_mnist_subset``, the experiments) needs ``[data]``.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from companion import conventions
from companion.folding import fold_batchnorm
from companion.functional import (
    BatchNormCache,
    batchnorm_backward,
    batchnorm_backward_staged,
    batchnorm_forward,
    batchnorm_inference,
    batchnorm_inference_backward,
)
from companion.gradcheck import numerical_gradient, rel_error
from companion.layers import BatchNorm
from companion.moments import merge_moments
from companion.nn.normalization import GroupNorm, LayerNorm
from companion.per_example import (
    groupnorm_backward,
    groupnorm_forward,
    layernorm_backward,
    layernorm_forward,
)
from companion.recalibration import recalibrate

DISTRIBUTION = "batchnorm-companion"
"""The name of the distribution on PyPI (``pip install`` it)."""


def _version() -> str:
    """The installed distribution's version, from its metadata.

    pyproject.toml is the one place the version is written; installing
    (also ``pip install -e``) copies it into the metadata.  Run from a
    source tree that was never installed (``PYTHONPATH=.``), the package
    reads it from the ``pyproject.toml`` beside it; anywhere else it is
    ``"0+unknown"``.
    """
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    project = re.search(r"^\[project\]$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    if project and re.search(
        rf'^name\s*=\s*"{DISTRIBUTION}"', project.group(1), re.M
    ):
        found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
        if found:
            return found.group(1)
    return "0+unknown"


__version__ = _version()

__all__ = [
    "BatchNorm",
    "BatchNormCache",
    "GroupNorm",
    "LayerNorm",
    "__version__",
    "batchnorm_backward",
    "batchnorm_backward_staged",
    "batchnorm_forward",
    "batchnorm_inference",
    "batchnorm_inference_backward",
    "conventions",
    "fold_batchnorm",
    "groupnorm_backward",
    "groupnorm_forward",
    "layernorm_backward",
    "layernorm_forward",
    "merge_moments",
    "numerical_gradient",
    "recalibrate",
    "rel_error",
]
