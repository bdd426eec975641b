"""Companion package of the book *Batch Normalization, Executable*.

Everything the book derives, as importable, tested code:

* :mod:`companion.functional` -- the stateless math: ``batchnorm_forward``,
  ``batchnorm_backward`` (closed form), ``batchnorm_backward_staged`` (node by
  node), ``batchnorm_inference``;
* :mod:`companion.layers` -- ``BatchNorm``, a layer with Keras's semantics;
* :mod:`companion.gradcheck` -- ``numerical_gradient`` and ``rel_error``.

Importing the package imports numpy only; TensorFlow and matplotlib are
imported lazily by the modules that need them.
"""

from companion.functional import (
    BatchNormCache,
    batchnorm_backward,
    batchnorm_backward_staged,
    batchnorm_forward,
    batchnorm_inference,
)
from companion.gradcheck import numerical_gradient, rel_error
from companion.layers import BatchNorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormCache",
    "batchnorm_backward",
    "batchnorm_backward_staged",
    "batchnorm_forward",
    "batchnorm_inference",
    "numerical_gradient",
    "rel_error",
]
