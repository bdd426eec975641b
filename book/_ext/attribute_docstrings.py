"""Sphinx extension: attribute docstrings stay prose under napoleon.

Napoleon reads the first line of an attribute's, a constant's or a
property's docstring Google-style, as ``type: description``: "Learning rate
of the pitfall runs: 0.5 ..." becomes an attribute of type "Learning rate
of the pitfall runs", which ``-n`` reports as a missing cross-reference (an
error under ``-W``). The package writes NumPy-style docstrings, whose
attribute docstrings are prose, so this extension keeps them as written
whenever napoleon would have turned their first words into a type.
"""

from __future__ import annotations

from typing import Any

__all__ = ["setup"]

KINDS = ("attribute", "data", "property")
_written: dict[tuple[str, str], list[str]] = {}


def keep_as_written(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Before napoleon: remember the docstring of an attribute."""
    if what in KINDS:
        _written[(what, name)] = list(lines)


def restore_prose(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """After napoleon: undo a ``:type:`` it read off the first line."""
    written = _written.pop((what, name), None)
    if written is None:
        return
    if any(line.lstrip().startswith(":type:") for line in lines):
        lines[:] = written


def setup(app: Any) -> dict[str, Any]:
    # Napoleon listens at the default priority, 500.
    app.connect("autodoc-process-docstring", keep_as_written, priority=400)
    app.connect("autodoc-process-docstring", restore_prose, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
