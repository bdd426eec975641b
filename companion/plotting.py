"""One look for every figure of the book (imports matplotlib; ``import companion`` does not).

Colours come from matplotlib's ``tableau-colorblind10`` style, which stays
distinguishable for the common colour-vision deficiencies.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

__all__ = ["COLORS", "use_book_style"]

COLORS: dict[str, str] = {
    "with_bn": "#006BA4",
    "without_bn": "#FF800E",
    "reference": "#595959",
    "accent": "#C85200",
    "light": "#A2C8EC",
}
"""Fixed roles: the same colour means the same thing in every chapter."""


def use_book_style(**overrides: Any) -> None:
    """Apply the book's figure style: colour-blind-safe cycle, page-sized figures, grid.

    ``overrides`` are ``rcParams`` entries, e.g. ``use_book_style(**{"axes.grid": False})``.
    """
    plt.style.use("tableau-colorblind10")
    plt.rcParams.update(
        {
            "figure.figsize": (7.0, 3.6),
            "figure.dpi": 100,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
            **overrides,
        }
    )
