"""Numerical gradients by central differences, to check backward passes.

Chapter 3, *The backward pass*, uses these to check
:func:`companion.functional.batchnorm_backward`; the tests use them for every
layer of the package.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from companion._validation import check_positive_real

__all__ = ["numerical_gradient", "rel_error"]


def numerical_gradient(
    f: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    dy: np.ndarray,
    h: float = 1e-5,
) -> np.ndarray:
    r"""Gradient of :math:`L(x) = \sum f(x) \odot dy` by central differences.

    .. math::

        \frac{\partial L}{\partial x_i} \approx
        \frac{L(x + h e_i) - L(x - h e_i)}{2h}

    The error is :math:`O(h^2)` from truncation plus about
    :math:`\varepsilon_{mach} |L| / h` from rounding; with float64 and
    ``h = 1e-5`` both are near 1e-10, which is why ``x`` must be float64.

    Use a random ``dy``: for batch norm, ``dy = ones`` gives ``dx = 0``
    (the output's per-channel sum does not depend on x), and a check against
    zero proves nothing.

    Parameters
    ----------
    f : callable
        Maps an array shaped like ``x`` to an array shaped like ``dy``.  It
        must not keep a reference to its argument: ``x`` is perturbed in a
        private copy that is reused between evaluations.
    x : float64 array
        The point at which to differentiate; not modified.
    dy : array
        The upstream gradient, the shape of ``f(x)``.
    h : float > 0
        The step.

    Returns
    -------
    ndarray, float64, shape of ``x``.

    Examples
    --------
    >>> x = np.array([[0.0, 1.0]])
    >>> numerical_gradient(np.sin, x, np.ones((1, 2))).round(8)  # cos(x)
    array([[1.        , 0.54030231]])
    """
    x = np.asarray(x)
    if x.dtype != np.float64:
        raise TypeError(
            "x must be float64 for a meaningful numerical gradient; "
            f"received dtype {x.dtype} (in float32 the rounding error of a "
            "central difference is about 1e-2)"
        )
    h = check_positive_real(h, "h")
    dy = np.asarray(dy, dtype=np.float64)
    point = x.astype(np.float64, copy=True)
    out_shape = np.shape(f(point))
    if out_shape != dy.shape:
        raise ValueError(
            f"dy must have the shape of f(x), {out_shape}; received shape "
            f"{dy.shape}"
        )

    def loss() -> float:
        return float(np.sum(np.asarray(f(point), dtype=np.float64) * dy))

    grad = np.empty_like(point)
    flat_point, flat_grad = point.reshape(-1), grad.reshape(-1)
    for i in range(flat_point.size):
        original = flat_point[i]
        flat_point[i] = original + h
        plus = loss()
        flat_point[i] = original - h
        minus = loss()
        flat_point[i] = original
        flat_grad[i] = (plus - minus) / (2.0 * h)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    r"""Relative error of two arrays, norm-wise.

    .. math::

        \frac{\lVert a - b \rVert_2}{\lVert a \rVert_2 + \lVert b \rVert_2}

    Unlike the element-wise maximum of :math:`|a_i - b_i| / (|a_i| +
    |b_i|)`, it does not blow up on entries that are zero up to rounding
    (batch-norm gradients have many).  0 when both are zero; 1 when one of
    them is zero and the other is not.

    >>> a = np.array([3.0, 4.0])  # norm 5
    >>> round(rel_error(a, a + [0.0, 1e-6]), 12)  # 1e-6 / (5 + 5)
    1e-07

    Raises
    ------
    ValueError
        When the shapes differ.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(
            "a and b must have the same shape; received "
            f"{a.shape} and {b.shape}"
        )
    scale = np.linalg.norm(a) + np.linalg.norm(b)
    if scale == 0:
        return 0.0
    return float(np.linalg.norm(a - b) / scale)
