r"""``Conv2D``: a 2-D convolution (stride 1, NHWC) by im2col and a product.

For a kernel K of shape (kh, kw, C_in, C_out), the output at pixel (h, w) is

.. math::

    y_{n,h,w,o} = b_o + \sum_{i<k_h} \sum_{j<k_w} \sum_{c}
        x^{pad}_{n,h+i,w+j,c} K_{i,j,c,o}

(a cross-correlation, as in every deep-learning framework).  im2col
gathers, for every output pixel, the kh*kw*C_in input values it sees into
one row, so the whole layer is a single matrix product.  Chapter 5 derives
it and draws the picture.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from companion._validation import check_bool, check_int, describe
from companion.base import Layer
from companion.nn.init import glorot_uniform

__all__ = ["Conv2D", "im2col", "same_padding"]


def same_padding(kernel: int) -> tuple[int, int]:
    """Padding (before, after) that keeps the size with stride 1.

    TensorFlow's rule: for an even kernel the extra row/column goes after
    (bottom/right), as in ``padding="SAME"``.

    >>> same_padding(5), same_padding(4)
    ((2, 2), (1, 2))
    """
    total = kernel - 1
    return total // 2, total - total // 2


def im2col(x: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Patches of a padded NHWC batch, a strided view (no copy).

    Shape (N, H', W', kh, kw, C) with H' = H - kh + 1:
    ``patches[n, h, w, i, j, c] == x[n, h + i, w + j, c]``.
    """
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))
    patches: np.ndarray = windows.transpose(0, 1, 2, 4, 5, 3)
    return patches


class _ConvCache(NamedTuple):
    patches: np.ndarray
    """(N, H', W', kh, kw, C_in) view of the padded input."""
    output_shape: tuple[int, ...]


class Conv2D(Layer):
    """2-D convolution, stride 1, NHWC, Keras's names and layouts.

    Parameters
    ----------
    filters : int
        C_out, the number of output channels.
    kernel_size : int or (int, int)
    padding : "same" or "valid"
        "same" pads so that the output has the input's height and width
        (TensorFlow's rule for even kernels); "valid" does not pad.
    use_bias : bool
    seed : int >= 0 or None
        Seed of the Glorot-uniform initialization of ``kernel`` (``bias``
        starts at 0).

    Attributes
    ----------
    kernel
        Shape (kh, kw, C_in, C_out), as ``keras.layers.Conv2D.kernel``.
    bias
        Shape (C_out,), or None with ``use_bias=False``.
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int],
        padding: str = "valid",
        use_bias: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.filters = check_int(filters, "filters", low=1)
        if isinstance(kernel_size, (tuple, list)):
            sizes = tuple(kernel_size)
        else:
            sizes = (kernel_size, kernel_size)
        if len(sizes) != 2:
            raise ValueError(
                "kernel_size must be an int or a pair of ints; received "
                f"{describe(kernel_size)}"
            )
        self.kernel_size = (
            check_int(sizes[0], "kernel_size", low=1),
            check_int(sizes[1], "kernel_size", low=1),
        )
        if padding not in ("same", "valid"):
            raise ValueError(
                'padding must be "same" or "valid"; received '
                f"{describe(padding)}"
            )
        self.padding = padding
        self.use_bias = check_bool(use_bias, "use_bias")
        self.seed = None if seed is None else check_int(seed, "seed", low=0)
        self.kernel: np.ndarray | None = None
        self.bias: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"Conv2D(filters={self.filters}, kernel_size={self.kernel_size}, "
            f"padding={self.padding!r})"
        )

    def weight_names(self) -> list[str]:
        return ["kernel", "bias"] if self.use_bias else ["kernel"]

    def _check_input(self, x: np.ndarray, training: bool = False) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"x must be an NHWC batch of rank 4; received shape {x.shape}"
            )
        if self.kernel is not None and x.shape[3] != self.kernel.shape[2]:
            raise ValueError(
                f"x has {x.shape[3]} channels (shape {x.shape}); this Conv2D "
                f"was built for {self.kernel.shape[2]} input channels"
            )
        kh, kw = self.kernel_size
        if self.padding == "valid" and (x.shape[1] < kh or x.shape[2] < kw):
            raise ValueError(
                f"x of height x width {x.shape[1]} x {x.shape[2]} is smaller "
                f"than the {kh} x {kw} kernel with padding='valid'; use "
                "padding='same' or a larger input"
            )

    def _build(self, input_shape: tuple[int, ...], dtype: np.dtype) -> None:
        kh, kw = self.kernel_size
        channels = input_shape[3]
        self.kernel = glorot_uniform(
            (kh, kw, channels, self.filters),
            kh * kw * channels,
            kh * kw * self.filters,
            self.seed,
            dtype,
        )
        self.bias = np.zeros(self.filters, dtype) if self.use_bias else None

    def _pad(self, x: np.ndarray) -> np.ndarray:
        if self.padding == "valid":
            return x
        top, bottom = same_padding(self.kernel_size[0])
        left, right = same_padding(self.kernel_size[1])
        return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))

    def _forward(
        self, x: np.ndarray, training: bool
    ) -> tuple[np.ndarray, _ConvCache]:
        kh, kw = self.kernel_size
        kernel = self._array("kernel")
        patches = im2col(self._pad(x), kh, kw)  # (N, H', W', kh, kw, C_in)
        n, h, w = patches.shape[:3]
        rows = patches.reshape(n * h * w, -1)  # the im2col matrix (one copy)
        y = rows @ kernel.reshape(-1, self.filters)
        y = y.reshape(n, h, w, self.filters)
        if self.bias is not None:
            y = y + self.bias
        return y, _ConvCache(patches=patches, output_shape=y.shape)

    def _backward(
        self, dy: np.ndarray, cache: _ConvCache
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """dK = im2col(x)^T dy; dx = dy convolved with the flipped kernel."""
        kh, kw = self.kernel_size
        kernel = self._array("kernel")
        patches = cache.patches
        n, h, w = patches.shape[:3]
        dy_rows = dy.reshape(n * h * w, self.filters)
        dkernel = patches.reshape(n * h * w, -1).T @ dy_rows
        grads = {"kernel": dkernel.reshape(kernel.shape)}
        if self.bias is not None:
            grads["bias"] = dy_rows.sum(axis=0)
        # Every input pixel collects dy from the kh*kw outputs that saw it:
        # a stride-1 convolution of dy, padded by (kh-1, kw-1) ("full"),
        # with the kernel flipped in space and transposed in channels.
        dy_full = np.pad(
            dy, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0))
        )
        dy_patches = im2col(dy_full, kh, kw)
        dy_patches = dy_patches.reshape(-1, kh * kw * self.filters)
        flipped = kernel[::-1, ::-1].transpose(0, 1, 3, 2)
        flipped = flipped.reshape(-1, kernel.shape[2])
        dx_padded = (dy_patches @ flipped).reshape(
            n, h + kh - 1, w + kw - 1, -1
        )
        if self.padding == "same":
            (top, _), (left, _) = same_padding(kh), same_padding(kw)
            height, width = h, w  # "same" keeps the input's size
            dx_padded = dx_padded[:, top : top + height, left : left + width]
        return dx_padded.astype(dy.dtype, copy=False), grads
