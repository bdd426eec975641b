"""Chapter 14 as a reader sees it: the claims table is a real table.

Reads the built page (``make test`` builds the book first) with the
standard library's HTML parser: one ``<table>`` whose body has one row per
claim and control of the full-scale files under ``book/data/``, each with
its chapter link and verdict.  Without a build the test skips, unless
``REQUIRE_BOOK_BUILD=1`` (as under ``make test``) makes a missing build a
failure.
"""

from __future__ import annotations

import os
from html.parser import HTMLParser
from pathlib import Path

import pytest

from companion.experiments import load_results
from companion.experiments.report import CHAPTERS, claim_rows

ROOT = Path(__file__).resolve().parent.parent
BOOK_HTML = Path(os.environ.get("BOOK_HTML", ROOT / "_build" / "html"))
PAGE = BOOK_HTML / "book" / "14_claims.html"


class _Tables(HTMLParser):
    """Every <table> of a page: its body rows as lists of (text, links)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, list[str]]]]] = []
        self._depth = 0
        self._in_body = False
        self._row: list[tuple[str, list[str]]] | None = None
        self._cell: list[str] | None = None
        self._links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append([])
            self._depth += 1
        elif tag == "tbody" and self._depth:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell, self._links = [], []
        elif tag == "a" and self._cell is not None:
            self._links.append(dict(attrs).get("href", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._depth -= 1
        elif tag == "tbody":
            self._in_body = False
        elif tag in ("td", "th") and self._cell is not None:
            assert self._row is not None
            self._row.append(("".join(self._cell).strip(), self._links))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _page() -> str:
    if not PAGE.exists():
        message = f"the book is not built ({PAGE} does not exist)"
        if os.environ.get("REQUIRE_BOOK_BUILD") == "1":
            pytest.fail(message)
        pytest.skip(message + "; make book builds it")
    return PAGE.read_text(encoding="utf-8")


def test_the_claims_table_is_a_table_with_one_row_per_claim():
    parser = _Tables()
    parser.feed(_page())
    results = {
        name: load_results(ROOT / "book" / "data" / f"{name}.json")
        for name in CHAPTERS
    }
    expected = claim_rows(results)
    # The claims table: the one whose rows end with a verdict.
    outcomes = ("supported", "contradicted", "inconclusive")
    tables = [
        rows
        for rows in parser.tables
        if rows and rows[0] and rows[0][-1][0] in outcomes
    ]
    assert len(tables) == 1, f"{len(parser.tables)} tables on the page"
    rows = tables[0]
    assert len(rows) == len(expected)
    for cells, row in zip(rows, expected, strict=True):
        chapter, links = cells[0]
        assert chapter == str(row["chapter"])
        assert any(row["document"] in link for link in links), links
        assert cells[-1][0] == row["outcome"]
        assert row["estimate"] in " ".join(text for text, _ in cells)
    # No table source left as text anywhere on the page.
    assert "| --- |" not in _page()
