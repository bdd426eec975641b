"""Print the requirements of one of pyproject.toml's extras, flattened.

    python tests/extra_requirements.py test --without tf

References to the package's own extras (``batchnorm-companion[data,tf]``)
are replaced by those extras' requirements, except for the extras named
after ``--without``.  ``make test-no-tf`` installs ``[test]`` without
``[tf]`` this way; tests/test_project.py compares environment.yml with the
flattened extras.  Needs Python >= 3.11 (tomllib) or tomli.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def project() -> dict:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["project"]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def flatten(
    requirements: Iterable[str],
    extras: dict[str, list[str]],
    name: str,
    without: frozenset[str] = frozenset(),
) -> list[str]:
    """``requirements`` with ``name[extra,...]`` replaced by the extras."""
    own = re.compile(rf"^{re.escape(name)}\s*\[([^\]]*)\]\s*$", re.I)
    flat = []
    for text in requirements:
        match = own.match(_normalized(text.split(";")[0]).strip())
        if match is None:
            flat.append(text)
            continue
        for extra in sorted(e.strip() for e in match.group(1).split(",")):
            if extra not in extras:
                raise ValueError(f"{text} names no extra {extra!r}")
            if extra not in without:
                flat += flatten(extras[extra], extras, name, without)
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra")
    parser.add_argument("--without", nargs="*", default=[])
    args = parser.parse_args()
    meta = project()
    extras = meta["optional-dependencies"]
    lines = flatten(
        extras[args.extra], extras, meta["name"], frozenset(args.without)
    )
    print("\n".join(dict.fromkeys(lines)))


if __name__ == "__main__":
    main()
