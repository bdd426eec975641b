"""The claims of Part III as one table (chapter 14) and as text (chapters
8-13).

Everything here formats what :func:`companion.experiments.common.verdicts`
stored in a result; nothing is recomputed and nothing is typed by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["CHAPTERS", "claim_rows", "claims_table", "format_verdict"]

CHAPTERS = {
    "gradient_flow": (8, "08_gradient_flow"),
    "learning_rates": (9, "09_learning_rates"),
    "initialization": (10, "10_initialization"),
    "regularization": (11, "11_regularization"),
    "sigmoid_paper": (12, "12_sigmoid_and_the_paper"),
    "placement": (13, "13_before_or_after_activation"),
}
"""Experiment name -> (chapter number, the chapter's file name)."""


def _number(value: float) -> str:
    """Three significant digits, a sign, no exponent for book-sized numbers."""
    if value == 0:
        return "0"
    text = f"{value:+.3g}"
    if "e" in text:  # 1e+03 -> +1000
        text = f"{value:+.0f}"
    return text.replace("-", "−")


def format_verdict(verdict: Mapping[str, Any]) -> str:
    """``+10 layers [+8.2, +12]``: the mean effect and its interval."""
    unit = verdict["unit"]
    sep = "" if unit == "%" else " "
    return (
        f"{_number(verdict['effect'])}{sep}{unit} "
        f"[{_number(verdict['low'])}, {_number(verdict['high'])}]"
    )


def _margin(verdict: Mapping[str, Any], sep: str) -> str:
    """The margin used, and the stated one when the noise replaced it."""
    used = f"{verdict['margin']:.3g}{sep}{verdict['unit']}"
    stated = verdict.get("stated_margin", verdict["margin"])
    if stated == verdict["margin"]:
        return used
    return f"{used} (noise; stated {stated:g})"


def claim_rows(
    results: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One row per claim and control of every result, in chapter order.

    Each row: ``chapter``, ``document``, ``key``, ``role``, ``statement``,
    ``effect`` (the effect's definition), ``estimate``
    (:func:`format_verdict`), ``margin`` (with its unit), ``noise`` (the
    one-ulp twins' RMS change of the effect, or None), ``outcome`` and
    ``seeds``.
    """
    rows = []
    ordered = sorted(results, key=lambda name: CHAPTERS[name][0])
    for name in ordered:
        chapter, document = CHAPTERS[name]
        res = results[name]["results"]
        noise = res.get("noise") or {}
        for key, verdict in res["verdicts"].items():
            unit = verdict["unit"]
            sep = "" if unit == "%" else " "
            twin = noise.get(key) or {}
            rows.append(
                {
                    "chapter": chapter,
                    "document": document,
                    "key": key,
                    "role": verdict["role"],
                    "statement": verdict["statement"],
                    "effect": verdict["definition"],
                    "estimate": format_verdict(verdict),
                    "margin": _margin(verdict, sep),
                    "noise": None
                    if twin.get("rms") is None
                    else f"{twin['rms']:.2g}{sep}{unit}",
                    "outcome": verdict["outcome"],
                    "seeds": len(verdict["effects"]),
                }
            )
    return rows


def claims_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The claims as a Markdown table (MyST renders it as a ``<table>``).

    Columns: chapter (a link), claim or control, effect with its 95 %
    confidence interval, margin, noise, verdict.
    """
    lines = [
        "| ch. | claim | effect [95 % CI] | margin | noise | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in claim_rows(results):
        statement = row["statement"].replace("|", "/")
        if row["role"] == "control":
            statement = f"*control:* {statement}"
        noise = "–" if row["noise"] is None else row["noise"]
        lines.append(
            f"| [{row['chapter']}]({row['document']}.ipynb) | {statement} "
            f"| {row['estimate']} | {row['margin']} | {noise} "
            f"| **{row['outcome']}** |"
        )
    return "\n".join(lines)
