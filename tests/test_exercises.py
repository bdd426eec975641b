"""Every exercise has a solution, and every solution's code is executed code.

The book's promise is that every number comes from code that CI re-executes.
For exercise solutions this means:

- a solution with code uses sphinx-exercise's gated form: a markdown cell with
  ``{solution-start} ex-label`` (``:class: dropdown``), then ordinary code
  cells, then a markdown cell with ``{solution-end}``. Those cells are
  executed with the notebook, their outputs are stored and nbval compares
  them; the built book shows code and outputs inside the dropdown;
- no code fence (python, ipython or no language) inside a solution, since
  nothing runs it; no output typed by hand into a comment (``# 459``);
- every exercise has a solution, every solution names an exercise of its
  notebook, and labels are unique in the whole book;
- every chapter of Part I has at least one exercise whose solution runs code
  (an "implement it yourself" exercise with a check the reader runs).

The checks run on every ``book/*.ipynb``, including chapters added later.
"""

from __future__ import annotations

import io
import json
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))

# Languages of fences that hold code a reader would run (and nothing runs).
CODE_LANGUAGES = {
    "",
    "python",
    "python3",
    "py",
    "ipython",
    "ipython3",
    "pycon",
}
CODE_DIRECTIVES = {"code-cell", "code-block", "code", "sourcecode"}
FORBIDDEN_TAGS = {"remove-cell", "remove-input", "nbval-skip"}

OPEN_FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,}|:{3,})(?P<info>.*)$")
DIRECTIVE = re.compile(r"^\{(?P<name>[\w-]+)\}\s*(?P<arg>.*)$")
OPTION = re.compile(r"^\s*:(?P<key>[\w-]+):\s*(?P<value>.*)$")
# A comment that is only a value: a number, an array, True/False, possibly
# after an arrow or "prints"/"output:" — what a printed result looks like.
TYPED_OUTPUT = re.compile(
    r"^(?:(?:->|=>|→|≈|~|=|prints?|output:?|out:?|gives|returns)\s*)?"
    r"(?:array\()?[\[\(]*\s*(?:[-+]?(?:\d|\.\d)[\d\s.,eE+\-\[\]\(\)]*|True|False)"
    r"\)?\s*$",
    re.IGNORECASE,
)


@dataclass
class Directive:
    """One MyST directive (or code fence) found in a markdown cell."""

    name: str  # directive name, or "" for a plain code fence
    arg: str  # directive argument, or the fence's language
    options: dict[str, str] = field(default_factory=dict)
    body: list[str] = field(default_factory=list)
    children: list[Directive] = field(default_factory=list)


def parse_fences(text: str) -> list[Directive]:
    """The top-level fenced blocks of a markdown cell, with nested ones.

    Directive bodies are parsed recursively (exercise and solution bodies
    are markdown); plain code fences are not, as in CommonMark.
    """
    root = Directive("root", "")
    stack: list[tuple[Directive, str, int]] = [(root, "", 0)]
    for line in text.splitlines():
        block, char, length = stack[-1]
        match = OPEN_FENCE.match(line)
        if match and len(stack) > 1:
            fence, info = match["fence"], match["info"].strip()
            if fence[0] == char and len(fence) >= length and not info:
                stack.pop()  # closes the innermost open block
                continue
        if block.name == "" and block is not root:  # inside a code fence
            block.body.append(line)
            continue
        if match:
            fence, info = match["fence"], match["info"].strip()
            directive = DIRECTIVE.match(info)
            if directive:
                new = Directive(directive["name"], directive["arg"].strip())
            else:
                new = Directive("", info.split()[0] if info else "")
            block.children.append(new)
            stack.append((new, fence[0], len(fence)))
            continue
        option = OPTION.match(line)
        if option and block is not root and block.name and not block.body:
            block.options[option["key"]] = option["value"].strip()
        else:
            block.body.append(line)
    return root.children


def walk(blocks: list[Directive]):
    for block in blocks:
        yield block
        yield from walk(block.children)


def is_code(block: Directive) -> bool:
    if block.name == "":
        return block.arg.lower() in CODE_LANGUAGES
    return block.name in CODE_DIRECTIVES


def typed_outputs(source: str) -> list[str]:
    """Comments of a code cell that look like a result typed by hand."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []  # IPython syntax (magics); nbval reports real errors
    found = []
    for token in tokens:
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if text and TYPED_OUTPUT.match(text):
                found.append(token.string)
    return found


@dataclass
class Exercises:
    """What one notebook declares: labels, solutions, and the problems."""

    exercises: dict[str, int] = field(default_factory=dict)  # label -> cell
    solved: dict[str, int] = field(default_factory=dict)  # label -> cell
    with_code: set[str] = field(default_factory=set)  # solutions that run
    problems: list[str] = field(default_factory=list)


def check_notebook(nb: dict) -> Exercises:
    """Collect a notebook's exercises and solutions, and what is wrong."""
    found = Exercises()
    problems = found.problems
    gated: tuple[str, int] | None = None  # (solution target, start cell)
    gated_code = 0

    def close_gated(cell: int, reason: str) -> None:
        nonlocal gated
        if gated is not None:
            problems.append(
                f"cell {gated[1]}: solution-start for {gated[0]!r} has no "
                f"solution-end before {reason} (cell {cell})"
            )
            gated = None

    for index, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] == "code":
            if gated is None:
                continue
            gated_code += 1
            where = f"cell {index} (solution of {gated[0]!r})"
            if cell.get("execution_count") is None:
                problems.append(f"{where}: code cell was not executed")
            tags = set(cell.get("metadata", {}).get("tags", []))
            for tag in sorted(tags & FORBIDDEN_TAGS):
                problems.append(f"{where}: tag {tag!r} hides or skips it")
            for output in cell.get("outputs", []):
                if output.get("output_type") == "error":
                    problems.append(f"{where}: stored output is an error")
            for comment in typed_outputs(source):
                problems.append(
                    f"{where}: output typed by hand in a comment: "
                    f"{comment!r}; print it instead"
                )
            continue
        if cell["cell_type"] != "markdown":
            continue
        blocks = parse_fences(source)
        for block in blocks:
            where = f"cell {index}"
            if block.name in ("exercise", "exercise-start"):
                close_gated(index, "the next exercise")
                label = block.options.get("label", "")
                if not label:
                    problems.append(f"{where}: exercise without :label:")
                elif label in found.exercises:
                    problems.append(f"{where}: exercise label {label!r} twice")
                else:
                    found.exercises[label] = index
            elif block.name in ("solution", "solution-start"):
                close_gated(index, "the next solution")
                target = block.arg
                if not target:
                    problems.append(f"{where}: solution names no exercise")
                elif target in found.solved:
                    problems.append(f"{where}: second solution of {target!r}")
                found.solved[target] = index
                for inner in walk(block.children):
                    if is_code(inner):
                        kind = inner.name or inner.arg or "no language"
                        problems.append(
                            f"{where}: solution of {target!r} has a code "
                            f"fence ({kind}): put the code in executed code "
                            "cells between solution-start and solution-end"
                        )
                if block.name == "solution-start":
                    gated, gated_code = (target, index), 0
            elif block.name == "solution-end":
                if gated is None:
                    problems.append(f"{where}: solution-end without start")
                else:
                    if gated_code:
                        found.with_code.add(gated[0])
                    gated = None
            elif gated is not None and is_code(block):
                problems.append(
                    f"{where}: solution of {gated[0]!r} has a code fence: "
                    "put the code in an executed code cell"
                )
    close_gated(len(nb["cells"]), "the end of the notebook")
    for label, index in found.exercises.items():
        if label not in found.solved:
            problems.append(
                f"cell {index}: exercise {label!r} has no solution"
            )
    for target, index in found.solved.items():
        if target and target not in found.exercises:
            problems.append(
                f"cell {index}: solution of {target!r}, which is not an "
                "exercise of this notebook"
            )
    return found


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def part_one_chapters() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    for part in toc["parts"]:
        if part.get("caption", "").startswith("Part I:"):
            return [Path(ch["file"]).name for ch in part["chapters"]]
    raise AssertionError("_toc.yml has no part captioned 'Part I: ...'")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_solution_is_executed_code(path):
    problems = check_notebook(load(path)).problems
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_exercise_labels_are_unique_in_the_book():
    owner: dict[str, str] = {}
    clashes = []
    for path in NOTEBOOKS:
        for label in check_notebook(load(path)).exercises:
            if label in owner:
                clashes.append(f"{label!r} in {owner[label]} and {path.name}")
            owner[label] = path.name
    assert not clashes, "exercise labels used twice: " + "; ".join(clashes)


@pytest.mark.parametrize("name", part_one_chapters())
def test_part_one_chapters_have_an_exercise_that_runs_code(name):
    found = check_notebook(load(ROOT / "book" / f"{name}.ipynb"))
    assert found.with_code, (
        f"{name}: no exercise has a solution with executed code cells "
        "(Part I chapters have an 'implement it yourself' exercise)"
    )


# --- the checker itself finds what it must find ------------------------------


def notebook(*cells: tuple[str, str], executed: bool = True) -> dict:
    out = []
    for kind, source in cells:
        cell = {"cell_type": kind, "metadata": {}, "source": source}
        if kind == "code":
            cell["execution_count"] = 1 if executed else None
            cell["outputs"] = []
        out.append(cell)
    return {"cells": out}


EXERCISE = ("markdown", "```{exercise}\n:label: ex-x\nDo it.\n```")
GATED = [
    ("markdown", "```{solution-start} ex-x\n:class: dropdown\n```\nLike so:"),
    ("code", "y = 2 * 3\nprint(y)"),
    ("markdown", "Done.\n\n```{solution-end}\n```"),
]


def test_checker_accepts_a_gated_solution_with_executed_code():
    found = check_notebook(notebook(EXERCISE, *GATED))
    assert found.problems == []
    assert found.with_code == {"ex-x"} and set(found.solved) == {"ex-x"}


def test_checker_accepts_a_prose_solution():
    prose = "```{solution} ex-x\n:class: dropdown\nBecause $a = b$.\n```"
    found = check_notebook(notebook(EXERCISE, ("markdown", prose)))
    assert found.problems == [] and found.with_code == set()


@pytest.mark.parametrize("language", ["python", "ipython3", ""])
def test_checker_rejects_a_code_fence_in_a_solution(language):
    solution = (
        f"````{{solution}} ex-x\n:class: dropdown\nText\n\n```{language}\n"
        "x = 1\n```\n````"
    )
    problems = check_notebook(
        notebook(EXERCISE, ("markdown", solution))
    ).problems
    assert len(problems) == 1 and "code fence" in problems[0]


def test_checker_rejects_a_code_fence_in_a_gated_solution_cell():
    cells = [GATED[0], ("markdown", "```python\nx = 1\n```"), *GATED[1:]]
    problems = check_notebook(notebook(EXERCISE, *cells)).problems
    assert len(problems) == 1 and "code fence" in problems[0]


def test_checker_allows_math_and_text_fences_in_a_solution():
    solution = (
        "````{solution} ex-x\n```{math}\na = b\n```\n```text\n"
        "a table\n```\n````"
    )
    assert (
        check_notebook(notebook(EXERCISE, ("markdown", solution))).problems
        == []
    )


@pytest.mark.parametrize(
    "comment",
    [
        "# [-0.9998  0.9998]",
        "# 459",
        "# 0.8886",
        "# -> 1.5e-3",
        "# True",
        "# prints 12",
        "# array([1, 2])",
    ],
)
def test_checker_rejects_hand_typed_outputs(comment):
    cells = [GATED[0], ("code", f"print(x)  {comment}"), GATED[2]]
    problems = check_notebook(notebook(EXERCISE, *cells)).problems
    assert len(problems) == 1 and "typed by hand" in problems[0]


@pytest.mark.parametrize(
    "comment",
    [
        "# 3 seeds x 20 steps",
        "# float64, random upstream gradient",
        "# step 11 of Algorithm 2",
    ],
)
def test_checker_allows_explanatory_comments(comment):
    cells = [GATED[0], ("code", f"x = 1  {comment}"), GATED[2]]
    assert check_notebook(notebook(EXERCISE, *cells)).problems == []


def test_checker_rejects_unexecuted_or_hidden_solution_cells():
    found = check_notebook(notebook(EXERCISE, *GATED, executed=False))
    assert ["not executed" in p for p in found.problems] == [True]
    nb = notebook(EXERCISE, *GATED)
    nb["cells"][2]["metadata"]["tags"] = ["remove-input", "nbval-skip"]
    assert len(check_notebook(nb).problems) == 2


def test_checker_rejects_missing_unclosed_and_orphan_solutions():
    assert "has no solution" in check_notebook(notebook(EXERCISE)).problems[0]
    unclosed = check_notebook(notebook(EXERCISE, *GATED[:2])).problems
    assert len(unclosed) == 1 and "no solution-end" in unclosed[0]
    orphan = ("markdown", "```{solution} ex-y\nText\n```")
    problems = check_notebook(notebook(EXERCISE, *GATED, orphan)).problems
    assert len(problems) == 1 and "not an exercise" in problems[0]
    twice = check_notebook(notebook(EXERCISE, EXERCISE, *GATED)).problems
    assert len(twice) == 1 and "twice" in twice[0]


def test_checker_reads_gated_exercises_with_code():
    cells = [
        ("markdown", "```{exercise-start}\n:label: ex-x\n```\nCheck with:"),
        ("code", "def check(fn):\n    assert fn(2) == 4"),
        ("markdown", "```{exercise-end}\n```"),
        *GATED,
    ]
    found = check_notebook(notebook(*cells))
    assert found.problems == [] and set(found.exercises) == {"ex-x"}
