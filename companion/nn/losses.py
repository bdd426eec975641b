r"""Softmax cross-entropy, the loss of the source text's classifier.

For logits :math:`z` (N, K) and integer labels :math:`t`:

.. math::

    L = -\frac{1}{N}\sum_n \log \operatorname{softmax}(z_n)_{t_n}, \qquad
    \frac{\partial L}{\partial z_n}
        = \frac{\operatorname{softmax}(z_n) - \operatorname{onehot}(t_n)}{N}

the mean over the batch, as Keras's
``SparseCategoricalCrossentropy(from_logits=True)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from companion._validation import as_float_array, describe

__all__ = ["log_softmax", "softmax_cross_entropy"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(z)) along the last axis.

    Shifted by the row maximum first, so that ``exp`` never overflows.

    >>> log_softmax(np.array([[1000.0, 1000.0]]))
    array([[-0.69314718, -0.69314718]])
    """
    shifted = logits - logits.max(axis=-1, keepdims=True)
    result: np.ndarray = shifted - np.log(
        np.exp(shifted).sum(axis=-1, keepdims=True)
    )
    return result


def softmax_cross_entropy(
    logits: Any, labels: Any
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``logits`` (N, K) against integer ``labels``.

    Returns
    -------
    loss : float
    dlogits : ndarray (N, K)
        The gradient of the loss with respect to the logits.

    Examples
    --------
    >>> loss, dlogits = softmax_cross_entropy(np.zeros((2, 4)), [0, 3])
    >>> round(loss, 6), dlogits[0]  # ln 4; (1/4 - onehot) / N
    (1.386294, array([-0.375,  0.125,  0.125,  0.125]))
    """
    z = as_float_array(logits, "logits")
    t = np.asarray(labels)
    if z.ndim != 2:
        raise ValueError(
            f"logits must have shape (N, classes); received shape {z.shape}"
        )
    if t.dtype.kind not in "iu":
        raise TypeError(
            f"labels must be integers (class indices); received {describe(t)}"
        )
    if t.shape != (z.shape[0],):
        raise ValueError(
            f"labels must have shape ({z.shape[0]},); received shape {t.shape}"
        )
    if z.shape[0] == 0:
        raise ValueError(
            f"logits must hold at least one example; received shape {z.shape}"
        )
    if t.min() < 0 or t.max() >= z.shape[1]:
        raise ValueError(
            f"labels must be in [0, {z.shape[1] - 1}]; received values "
            f"from {t.min()} to {t.max()}"
        )
    log_p = log_softmax(z)
    rows = np.arange(z.shape[0])
    loss = -float(log_p[rows, t].mean())
    dlogits = np.exp(log_p)
    dlogits[rows, t] -= 1.0
    return loss, dlogits / z.shape[0]
