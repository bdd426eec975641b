"""``companion.nn``: numpy layers of the source text's CNN, Keras's names.

Every layer has ``__call__(x, training=False)``, ``backward(dy) -> dx``,
``params`` / ``grads`` dicts of numpy arrays, and ``get_weights()`` /
``set_weights()`` in Keras's order.  Chapter 5 builds them up one by one;
chapter 16 adds ``LayerNorm`` and ``GroupNorm``.
"""

from companion.folding import fold
from companion.nn.activations import ReLU, Sigmoid
from companion.nn.conv import Conv2D
from companion.nn.dense import Dense, Flatten
from companion.nn.losses import softmax_cross_entropy
from companion.nn.normalization import BatchNorm, GroupNorm, LayerNorm
from companion.nn.optimizers import SGD
from companion.nn.pooling import MaxPool2D
from companion.nn.sequential import Sequential

__all__ = [
    "SGD",
    "BatchNorm",
    "Conv2D",
    "Dense",
    "Flatten",
    "GroupNorm",
    "LayerNorm",
    "MaxPool2D",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "fold",
    "softmax_cross_entropy",
]
