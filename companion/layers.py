"""``companion.layers``: the batch norm layer and its helpers, by their old
path.

The layers live in :mod:`companion.nn.normalization` (``BatchNorm``,
``LayerNorm``, ``GroupNorm``); this module re-exports what chapters 4-15
and the tests import from here: ``BatchNorm``, :func:`batchnorm_layers`
and :func:`keep_moving_statistics`.
"""

from __future__ import annotations

from companion.nn.normalization import (
    BatchNorm,
    batchnorm_layers,
    keep_moving_statistics,
)

__all__ = ["BatchNorm", "batchnorm_layers", "keep_moving_statistics"]
