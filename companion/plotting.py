"""One look for every figure of the book.

Imports matplotlib (``import companion`` does not).

Colours come from matplotlib's ``tableau-colorblind10`` style, which stays
distinguishable for the common colour-vision deficiencies.
"""

from __future__ import annotations

import warnings
from typing import Any

try:
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
except ImportError as error:  # pragma: no cover - tests/test_wheel.py
    raise ImportError(
        "companion.plotting needs matplotlib: "
        'pip install "batchnorm-companion[plot]"'
    ) from error

__all__ = ["COLORS", "use_book_style"]

COLORS: dict[str, str] = {
    "with_bn": "#006BA4",
    "without_bn": "#FF800E",
    "reference": "#595959",
    "accent": "#C85200",
    "light": "#A2C8EC",
}
"""The same colour means the same thing in every chapter."""

FIGURE_TEXT = "[figure]"
"""Plain-text stand-in stored next to each figure's PNG in a notebook."""


def _configure_notebook() -> None:
    """In a Jupyter kernel: inline 2x figures, a fixed plain-text fallback.

    Inline figures are stored as "retina" PNGs: rendered at twice
    ``figure.dpi`` (a 7.0 x 3.6 in figure at 100 dpi is 1400 x 720 pixels)
    and displayed at half that size, so lines and text stay sharp on
    high-resolution screens.  An inline figure also gets a ``text/plain``
    fallback, by default the repr ``<Figure size 700x360 with 1 Axes>``; a
    fixed caption keeps object reprs out of stored outputs.  Outside
    IPython: nothing.
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with Jupyter
        return
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return
    shell.run_line_magic("matplotlib", "inline")
    # The inline backend's own setting (what `%config InlineBackend.
    # figure_formats` sets), so a later `%matplotlib inline` keeps it.
    from matplotlib_inline.config import InlineBackend

    with warnings.catch_warnings():
        # matplotlib-inline 0.2 still declares an old-style traitlets
        # observer, which warns (DeprecationWarning) when it is notified.
        warnings.simplefilter("ignore", DeprecationWarning)
        InlineBackend.instance().figure_formats = {"retina"}
    shell.display_formatter.formatters["text/plain"].for_type(
        Figure, lambda figure, printer, cycle: printer.text(FIGURE_TEXT)
    )


def use_book_style(**overrides: Any) -> None:
    """Apply the book's figure style.

    A colour-blind-safe cycle, page-sized figures, a light grid.

    In a Jupyter kernel it also selects inline figures, stored at twice
    their displayed resolution, with the plain-text fallback ``[figure]``
    instead of a ``<Figure ...>`` repr. ``overrides`` are ``rcParams``
    entries, e.g. ``use_book_style(**{"axes.grid": False})``.
    """
    _configure_notebook()
    style: dict[str, Any] = {
        "figure.figsize": (7.0, 3.6),
        "figure.dpi": 100,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "legend.frameon": False,
    }
    style.update(overrides)
    plt.style.use(["tableau-colorblind10", style])
