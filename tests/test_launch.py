"""The reader's ways in: JupyterLab locally, Colab, Binder, the Pages site.

- The repository URL lives in pyproject.toml's ``[project.urls]``;
  ``_config.yml`` and every chapter's install cell repeat it, and these
  tests check that they agree.
- Every chapter's first code cell is :data:`INSTALL_CELL`: in Colab (or any
  environment without ``companion``) it pip-installs the package from the
  repository; in the project environment it does nothing and prints nothing.
  It is tagged ``remove-cell``, so the rendered page does not show it.
- A kernel started from the project environment in ``book/`` (what
  ``make lab`` and nbval do) runs chapter 1's first cells and stores
  figures at twice their displayed resolution.
- The built pages' Colab and Binder buttons point at this repository, its
  branch and the page's notebook; each page offers its .ipynb for download.
"""

from __future__ import annotations

import base64
import os
import queue
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
BOOK_HTML = Path(os.environ.get("BOOK_HTML", ROOT / "_build" / "html"))
BUILD_REQUIRED = os.environ.get("REQUIRE_BOOK_BUILD") == "1"
CHAPTERS = sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
URLS = PROJECT["project"]["urls"]
REPOSITORY = URLS["Repository"]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text("utf-8"))

INSTALL_CELL_TEMPLATE = """\
# Colab and Binder: install the companion package when it is missing.
import importlib.util

if importlib.util.find_spec("companion") is None:
    url = "git+{repository}"
    %pip install --quiet "batchnorm-companion[book] @ {{url}}"\
"""
INSTALL_CELL = INSTALL_CELL_TEMPLATE.format(repository=REPOSITORY)
"""The first code cell of every chapter, character for character."""

# What the cell asks pip for when companion is missing.
PIP_LINE = f'install --quiet "batchnorm-companion[book] @ git+{REPOSITORY}"'


def _notebook(path: Path) -> dict[str, Any]:
    import nbformat

    return nbformat.read(path, as_version=4)


def _code_cells(path: Path) -> list[Any]:
    return [c for c in _notebook(path).cells if c.cell_type == "code"]


# -- one URL ------------------------------------------------------------------


def test_the_repository_url_is_the_same_everywhere():
    match = re.fullmatch(
        r"https://github\.com/([\w.-]+)/([\w.-]+)", REPOSITORY
    )
    assert match, (
        f"[project.urls] Repository is not a GitHub URL: {REPOSITORY}"
    )
    org, repo = match.groups()
    assert CONFIG["repository"]["url"] == REPOSITORY
    assert CONFIG["repository"]["branch"] == "main"
    assert URLS["Issues"] == f"{REPOSITORY}/issues"
    # GitHub Pages serves a project's site at https://ORG.github.io/REPO/.
    assert URLS["Homepage"] == f"https://{org}.github.io/{repo}/"
    assert CONFIG["html"]["baseurl"] == URLS["Homepage"]
    assert f"git+{REPOSITORY}" in INSTALL_CELL
    readme = (ROOT / "README.md").read_text("utf-8")
    assert URLS["Homepage"] in readme, "README: say where the book is"


def test_launch_buttons_are_configured_for_colab_and_binder():
    launch = CONFIG["launch_buttons"]
    assert launch["colab_url"] == "https://colab.research.google.com"
    assert launch["binderhub_url"] == "https://mybinder.org"
    assert launch["notebook_interface"] == "jupyterlab"
    assert launch.get("thebe", False) is False


def test_binder_installs_the_project_with_the_book_extra():
    # repo2docker reads binder/ (and then ignores the root environment.yml):
    # requirements.txt is pip-installed from the repository root, after the
    # repository is copied in, because it names a local path.
    lines = [
        line.split("#", 1)[0].strip()
        for line in (ROOT / "binder" / "requirements.txt")
        .read_text()
        .splitlines()
    ]
    assert [line for line in lines if line] == [".[book]"]
    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    version = tuple(int(p) for p in runtime.removeprefix("python-").split("."))
    requires = PROJECT["project"]["requires-python"]
    assert requires.startswith(">=")
    minimum = tuple(int(p) for p in requires[2:].split("."))
    assert version >= minimum
    start = ROOT / "binder" / "start"
    assert os.access(start, os.X_OK)
    assert start.read_text().rstrip().endswith('exec "$@"')


# -- the install cell ---------------------------------------------------------


def test_the_install_cell_fits_the_page_and_is_python_for_ipython():
    from IPython.core.inputtransformer2 import TransformerManager

    assert max(len(line) for line in INSTALL_CELL.splitlines()) <= 79
    code = TransformerManager().transform_cell(INSTALL_CELL)
    compile(code, "<install cell>", "exec")
    assert "get_ipython().run_line_magic('pip', " in code


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_starts_with_the_install_cell(path: Path):
    first = _code_cells(path)[0]
    assert first.source == INSTALL_CELL, (
        f"{path.name}: the first code cell must be tests/test_launch.py's "
        f"INSTALL_CELL exactly (see /tmp/notes/notebook-conventions.md); "
        f"it is:\n{first.source}"
    )
    assert "remove-cell" in first.metadata.get("tags", []), (
        f"{path.name}: tag the install cell `remove-cell`"
    )
    assert first.outputs == [], f"{path.name}: the install cell printed"


# -- a kernel from the project environment -----------------------------------


class Kernel:
    """A kernel started as JupyterLab starts one: python3, in book/."""

    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        env = dict(os.environ)
        self.manager, self.client = start_new_kernel(
            kernel_name="python3", cwd=str(BOOK), env=env
        )

    def run(self, code: str, timeout: float = 120) -> dict[str, Any]:
        """Execute code; its status, streams, displays and errors."""
        msg_id = self.client.execute(code, store_history=False)
        result: dict[str, Any] = {"stdout": "", "stderr": "", "data": []}
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(code) from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                result[content["name"]] += content["text"]
            elif kind in ("display_data", "execute_result"):
                result["data"].append(content)
            elif kind == "error":
                result["error"] = "\n".join(content["traceback"])
            elif kind == "status" and content["execution_state"] == "idle":
                break
        reply = self.client.get_shell_msg(timeout=timeout)
        result["status"] = reply["content"]["status"]
        return result

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    started = Kernel()
    try:
        yield started
    finally:
        started.close()


def _quiet(result: dict[str, Any]) -> bool:
    return (
        result["status"] == "ok"
        and not result["stdout"]
        and not result["stderr"]
        and not result["data"]
    )


def test_the_kernel_is_the_project_environment_in_the_notebooks_folder(
    kernel: Kernel,
):
    out = kernel.run("import os, sys; print(sys.prefix); print(os.getcwd())")
    prefix, cwd = out["stdout"].splitlines()
    assert Path(prefix).resolve() == Path(sys.prefix).resolve()
    assert Path(cwd).resolve() == BOOK.resolve()


def test_the_install_cell_does_nothing_where_companion_is_installed(
    kernel: Kernel,
):
    result = kernel.run(INSTALL_CELL)
    assert _quiet(result), result


def test_the_install_cell_installs_from_the_repository_when_missing(
    kernel: Kernel,
):
    # A kernel without companion, as Colab's: find_spec says it is missing,
    # and a stand-in %pip magic prints the line IPython would run pip with
    # (after expanding {url}).
    result = kernel.run(
        "import importlib.util as _util\n"
        "_find = _util.find_spec\n"
        "_util.find_spec = lambda name, *a: (\n"
        "    None if name == 'companion' else _find(name, *a))\n"
        "get_ipython().register_magic_function(\n"
        "    lambda line: print('PIP', line), 'line', 'pip')\n"
        "try:\n"
        f"    get_ipython().run_cell({INSTALL_CELL!r})\n"
        "finally:\n"
        "    _util.find_spec = _find\n"
    )
    assert result["status"] == "ok", result
    assert result["stdout"].splitlines() == [f"PIP {PIP_LINE}"]


def _stored_text(cell: Any) -> str:
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif "text/plain" in output.get("data", {}):
            parts.append(output.data["text/plain"])
    return "".join(parts)


@pytest.mark.tf  # chapter 1's setup cell imports TensorFlow
def test_chapter_one_runs_its_first_cells_in_the_project_kernel(
    kernel: Kernel,
):
    # The first code cell, and the setup cell after it when the first is
    # the install cell: what a reader runs first after `make lab`.
    cells = _code_cells(BOOK / "01_why_normalize.ipynb")
    first = cells[: 2 if cells[0].source == INSTALL_CELL else 1]
    for cell in first:
        result = kernel.run(cell.source, timeout=300)
        assert result["status"] == "ok", result.get("error")
        if "nbval-ignore-output" not in cell.metadata.get("tags", []):
            produced = result["stdout"] + "".join(
                d["data"].get("text/plain", "") for d in result["data"]
            )
            assert produced == _stored_text(cell)


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def test_figures_are_stored_at_twice_their_displayed_size(kernel: Kernel):
    result = kernel.run(
        "import matplotlib.pyplot as plt\n"
        "from companion.plotting import use_book_style\n"
        "use_book_style()\n"
        "fig, ax = plt.subplots()\n"
        "ax.plot([0, 1], [0, 1])\n"
        "plt.show()\n"
    )
    assert result["status"] == "ok", result.get("error")
    (figure,) = result["data"]
    assert figure["data"]["text/plain"] == "[figure]"
    shown = figure["metadata"]["image/png"]
    width, height = _png_size(base64.b64decode(figure["data"]["image/png"]))
    # Rendered at 2 x 100 dpi; displayed at half its pixels (rounded down).
    assert (width // 2, height // 2) == (shown["width"], shown["height"])
    # 7.0 x 3.6 inches at 100 dpi, cropped to the drawing by bbox "tight".
    assert 500 < shown["width"] <= 700 and 250 < shown["height"] <= 360


# -- JupyterLab ---------------------------------------------------------------


def test_jupyterlab_runs_from_the_project_environment():
    import jupyterlab

    jupyter = Path(sys.executable).parent / "jupyter"
    out = subprocess.run(
        [str(jupyter), "lab", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == jupyterlab.__version__


def test_make_lab_opens_the_books_notebooks_from_the_project_environment():
    out = subprocess.run(
        ["make", "-n", "lab"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ".venv/bin/jupyter lab book/" in out.stdout.splitlines()


# -- the built pages ----------------------------------------------------------


def _built(page: str) -> str:
    path = BOOK_HTML / page
    if not path.exists():
        reason = f"{path} not built (`make book`)"
        if BUILD_REQUIRED:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return path.read_text("utf-8")


def _hrefs(html: str, needle: str) -> set[str]:
    import html as entities

    return {
        entities.unescape(href)
        for href in re.findall(r'href="([^"]+)"', html)
        if needle in href
    }


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_each_page_launches_its_own_notebook(path: Path):
    html = _built(f"book/{path.stem}.html")
    org_repo = REPOSITORY.removeprefix("https://github.com/")
    branch = CONFIG["repository"]["branch"]
    notebook = path.relative_to(ROOT).as_posix()
    assert (ROOT / notebook).is_file()
    assert _hrefs(html, "colab.research.google.com") == {
        f"https://colab.research.google.com/github/{org_repo}/blob/"
        f"{branch}/{notebook}"
    }
    assert _hrefs(html, "mybinder.org") == {
        f"https://mybinder.org/v2/gh/{org_repo}/{branch}"
        f"?urlpath=lab/tree/{notebook}"
    }
    download = f"../_sources/{notebook}"
    assert download in _hrefs(html, "_sources/")
    assert (BOOK_HTML / "_sources" / notebook).is_file()


def test_pages_have_favicon_logo_last_updated_date_and_issues_link():
    html = _built("book/intro.html")
    assert '<link rel="icon" href="../_static/favicon.svg"' in html
    assert (BOOK_HTML / "_static" / "favicon.svg").is_file()
    assert re.search(r'<img src="../_static/logo.svg"', html)
    assert re.search(r"Last updated on \d{4}-\d{2}-\d{2}\.", html)
    assert URLS["Issues"] + "/new" in "".join(_hrefs(html, "/issues"))


# -- CI ----------------------------------------------------------------------


def _fake_machine(tmp_path: Path, with_apt: bool) -> tuple[Path, Path]:
    """A PATH with bash and coreutils but no browser, a fake make and apt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "id", "dirname", "chmod"):
        real = subprocess.run(
            ["bash", "-c", f"command -v {tool}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (bin_dir / tool).symlink_to(real)
    log = tmp_path / "log"
    scripts = {
        "make": (
            f'echo "make $* REQUIRE=${{REQUIRE_BROWSER_TESTS:-}}" >> {log}'
        ),
    }
    if with_apt:
        # Installing chromium puts it on PATH, as Debian's package does.
        scripts["apt-get"] = (
            f'echo "apt-get $*" >> {log}\n'
            f'if [ "$1" = install ]; then printf "#!/bin/sh\\n" '
            f"> {bin_dir}/chromium; chmod +x {bin_dir}/chromium; fi"
        )
    for name, body in scripts.items():
        script = bin_dir / name
        script.write_text(f"#!{bin_dir}/bash\n{body}\n")
        script.chmod(0o755)
    return bin_dir, log


@pytest.mark.skipif(
    Path("/Applications/Google Chrome.app").exists() or os.getuid() != 0,
    reason="needs root (no sudo in the fake PATH) and no system-wide Chrome",
)
@pytest.mark.parametrize("with_apt", [True, False])
def test_ci_run_installs_chromium_when_missing_then_runs_make_test(
    tmp_path: Path, with_apt: bool
):
    bin_dir, log = _fake_machine(tmp_path, with_apt)
    out = subprocess.run(
        [str(bin_dir / "bash"), str(ROOT / ".ci" / "run")],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    calls = log.read_text().splitlines()
    if with_apt:
        assert calls == [
            "apt-get update -qq",
            "apt-get install -y -qq chromium",
            "make test REQUIRE=1",
        ]
    else:
        assert calls == ["make test REQUIRE="]
        assert "browser tests will skip" in out.stdout
