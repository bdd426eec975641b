"""Sphinx extension: each inline ``<script>`` once per page.

Sphinx 7.4 (the newest that Jupyter Book 1.x accepts) registers an inline
script that an extension adds after the builder starts (``add_js_file(None,
body=...)``) twice: once as it is added (file name ``None``) and again when
``prepare_writing`` re-adds the registry's scripts (file name ``''``), and
the two do not compare equal. sphinx-thebe adds ``const THEBE_JS_URL = ...``
that way, so every page threw "Identifier 'THEBE_JS_URL' has already been
declared"; sphinx-togglebutton's ``var togglebuttonSelector`` was doubled
too (harmless, being ``var``). This extension drops the second copy of any
script with the same source, body and attributes, keeping the first.
"""

from __future__ import annotations

from typing import Any

__all__ = ["setup"]


def _key(script: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    attributes = getattr(script, "attributes", {})
    return (
        getattr(script, "filename", script) or "",
        tuple(sorted((str(k), str(v)) for k, v in attributes.items())),
    )


def drop_duplicate_scripts(
    app: Any, pagename: str, templatename: str, context: dict, doctree: Any
) -> None:
    """Remove repeated scripts from the page's ``script_files`` in place."""
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    unique = []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def setup(app: Any) -> dict[str, Any]:
    # Late (priority 900): after the themes have added their page scripts.
    app.connect("html-page-context", drop_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
