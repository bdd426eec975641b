"""The project's contracts: import cost, packaging metadata, the version,
environment.yml agreement, what [test] installs, CI and release files."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import companion

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def run_python(code: str) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    return result.stdout.strip()


def test_import_companion_imports_neither_tensorflow_nor_matplotlib():
    out = run_python(
        "import sys, companion; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'matplotlib') "
        "if m in sys.modules))"
    )
    assert out == "[]"


@pytest.mark.tf
def test_tf_env_imports_tensorflow_without_writing_to_stderr():
    """The OS-level stderr of the import is silenced; TF_CPP_MIN_LOG_LEVEL
    alone does not do it."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    code = (
        "from companion.tf_env import import_tensorflow; "
        "tf = import_tensorflow(); print(tf.__version__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    assert result.stdout.startswith("2.21")
    assert result.stderr == ""


@pytest.mark.tf
def test_legacy_keras_must_be_chosen_before_the_first_import():
    code = (
        "import os; os.environ.pop('TF_USE_LEGACY_KERAS', None)\n"
        "from companion.tf_env import import_tensorflow\n"
        "import_tensorflow()\n"
        "try:\n"
        "    import_tensorflow(legacy_keras=True)\n"
        "except RuntimeError as error:\n"
        "    print('refused:', error)\n"
    )
    assert run_python(code).startswith(
        "refused: legacy_keras=True must be requested before TensorFlow"
    )


@pytest.mark.tf
def test_legacy_keras_makes_tf1_layers_available():
    code = (
        "from companion.tf_env import import_tensorflow\n"
        "tf = import_tensorflow(legacy_keras=True)\n"
        "with tf.Graph().as_default():\n"
        "    x = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 2])\n"
        "    y = tf.compat.v1.layers.batch_normalization(\n"
        "        x, training=True, name='bn')\n"
        "    print(len(tf.compat.v1.get_collection(\n"
        "        tf.compat.v1.GraphKeys.UPDATE_OPS)))\n"
    )
    # The moving-mean and moving-variance updates.
    assert run_python(code) == "2"


def test_tf_env_without_tensorflow_names_the_extra(monkeypatch):
    from companion.tf_env import import_tensorflow

    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(
        ImportError,
        match=r"TensorFlow could not be imported .*companion.tf_env and "
        r"companion.tf_models need it: pip install "
        r"\"batchnorm-companion\[tf\]\"",
    ):
        import_tensorflow()


def test_legacy_keras_needs_tf_keras_and_must_come_first(monkeypatch):
    import importlib.util

    from companion import tf_env

    monkeypatch.delenv("TF_USE_LEGACY_KERAS", raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow", object())  # imported
    with pytest.raises(
        RuntimeError, match=r"legacy_keras=True must be requested before"
    ):
        tf_env.import_tensorflow(legacy_keras=True)
    monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ImportError,
        match=r"legacy_keras=True needs the tf-keras package .*pip install "
        r"\"batchnorm-companion\[tf\]\"",
    ):
        tf_env.import_tensorflow(legacy_keras=True)


def test_plotting_style_is_colour_blind_safe():
    import matplotlib.pyplot as plt

    from companion.plotting import COLORS, use_book_style

    with plt.rc_context():
        use_book_style(**{"axes.grid": False})
        cycle = [c["color"] for c in plt.rcParams["axes.prop_cycle"]]
        assert cycle[0] == "#006BA4" and plt.rcParams["axes.grid"] is False
        assert COLORS["with_bn"] in cycle and COLORS["without_bn"] in cycle


def test_plotting_in_a_kernel_uses_inline_figures_with_a_fixed_text_fallback(
    monkeypatch,
):
    import IPython
    from matplotlib.figure import Figure

    import companion.plotting as plotting

    class Formatter:
        def __init__(self):
            self.registered = {}

        def for_type(self, cls, function):
            self.registered[cls] = function

    class Printer:
        def text(self, value):
            self.value = value

    class Shell:
        kernel = object()

        def __init__(self):
            self.magics = []
            formatters = {"text/plain": Formatter()}
            self.display_formatter = type(
                "D", (), {"formatters": formatters}
            )()

        def run_line_magic(self, name, line):
            self.magics.append((name, line))

    shell = Shell()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    plotting._configure_notebook()
    assert shell.magics == [("matplotlib", "inline")]
    printer = Printer()
    formatter = shell.display_formatter.formatters["text/plain"]
    formatter.registered[Figure](None, printer, False)
    assert printer.value == "[figure]"
    # Plain Python: nothing happens.
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    plotting._configure_notebook()


# ----------------------------------------------------------- the version
def test_the_version_has_one_source():
    assert "version" not in PROJECT.get("dynamic", [])
    assert companion.__version__ == PROJECT["version"]
    assert companion.__version__ == importlib.metadata.version(
        "batchnorm-companion"
    )
    init = (ROOT / "companion" / "__init__.py").read_text()
    assert PROJECT["version"] not in init  # not written twice


def test_the_version_without_install_metadata(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    # A source tree: the pyproject.toml beside the package.
    assert companion._version() == PROJECT["version"]
    # Anywhere else (no pyproject, or another project's): "0+unknown".
    fake = tmp_path / "companion" / "__init__.py"
    fake.parent.mkdir()
    monkeypatch.setattr(companion, "__file__", str(fake))
    assert companion._version() == "0+unknown"
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "other"\nversion = "9.9"\n'
    )
    assert companion._version() == "0+unknown"
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "batchnorm-companion"\nversion = "1.2.3"\n'
    )
    assert companion._version() == "1.2.3"


# ------------------------------------------------------ license, typing
def test_license_file_is_mit_as_declared():
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) ")
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_package_is_typed_and_ships_the_marker():
    assert (ROOT / "companion" / "py.typed").exists()
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert package_data["companion"] == ["py.typed"]
    found = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    assert found["include"] == ["companion", "companion.*"]


# -------------------------------------------- requirements, flattened
def flatten(requirements, extras, without=frozenset()):
    """Requirements with the package's own extras expanded
    (tests/extra_requirements.py, which ``make test-no-tf`` uses)."""
    from extra_requirements import flatten as expand

    texts = expand(requirements, extras, PROJECT["name"], without)
    return [Requirement(text) for text in texts]


def by_name(requirements):
    """{name: "specifier; marker"}, refusing one package bounded twice
    differently."""
    found = {}
    for req in requirements:
        marker = f"; {req.marker}" if req.marker else ""
        value = f"{req.specifier}{marker}"
        name = canonicalize_name(req.name)
        assert found.setdefault(name, value) == value, (
            f"{name} bounded twice: {found[name]} and {value}"
        )
    return found


def declared(extra=None):
    extras = PROJECT["optional-dependencies"]
    if extra is not None:
        return by_name(flatten(extras[extra], extras))
    every = [text for texts in extras.values() for text in texts]
    return by_name(flatten([*PROJECT["dependencies"], *every], extras))


def test_environment_yml_lists_the_same_packages_and_bounds_as_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = [p for p in pip if not p.startswith("-e")]
    assert by_name(map(Requirement, listed)) == declared()
    assert "-e ." in pip, "environment.yml must install the package itself"
    python = next(d for d in conda if d.startswith("python"))
    assert python.split("=")[1] == "3.11"
    assert PROJECT["requires-python"] == ">=3.10"


def test_the_comparison_can_fail():
    """Flattening and comparing are not vacuous: a changed bound, a missing
    package, a package bounded twice, an unknown extra all show."""
    extras = {"a": ["numpy>=1.26,<3"], "b": ["batchnorm-companion[a]"]}
    assert by_name(flatten(extras["b"], extras)) == {"numpy": "<3,>=1.26"}
    assert by_name(flatten(["numpy>=1.26,<3"], extras)) != by_name(
        flatten(["numpy>=1.26,<2"], extras)
    )
    assert by_name(flatten(["numpy", "nbval"], extras)) != by_name(
        flatten(["numpy"], extras)
    )
    with pytest.raises(AssertionError, match="bounded twice"):
        by_name(flatten(["numpy<3", "batchnorm-companion[a]"], extras))
    with pytest.raises(ValueError, match="names no extra 'c'"):
        flatten(["batchnorm-companion[c]"], extras)
    without_a = flatten(extras["b"], extras, without=frozenset({"a"}))
    assert without_a == []


def test_each_extra_stands_alone():
    assert set(declared("data")) == {"mlxtend", "threadpoolctl"}
    assert set(declared("tf")) == {"tensorflow", "tf-keras"}
    assert set(declared("plot")) == {"matplotlib"}
    for extra in ("test", "book"):
        assert set(declared("data")) | set(declared("plot")) <= set(
            declared(extra)
        )
        assert "tensorflow" in declared(extra)
    assert "jupyter-book" in declared("book")
    assert {"pytest", "hypothesis", "nbval"} <= set(declared("test"))


def imported_modules(paths):
    """Top-level modules imported by Python files and notebook cells."""
    found = set()
    for path in paths:
        if path.suffix == ".ipynb":
            cells = json.loads(path.read_text())["cells"]
            sources = [
                "\n".join(
                    line
                    for line in "".join(cell["source"]).splitlines()
                    if not line.lstrip().startswith(("%", "!"))
                )
                for cell in cells
                if cell["cell_type"] == "code"
            ]
        else:
            sources = [path.read_text()]
        for source in sources:
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    found.add(str(node.module).split(".")[0])
    return found - set(sys.stdlib_module_names) - {"companion"}


def installed_closure(names):
    """The distributions ``names`` bring with them here (their installed
    requirements, recursively, markers evaluated, no extras)."""
    seen, todo = set(), [canonicalize_name(n) for n in names]
    environment = default_environment()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # e.g. tomli on Python >= 3.11
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(
                {**environment, "extra": ""}
            ):
                todo.append(canonicalize_name(req.name))
    return seen


@pytest.mark.tf  # reads the installed [test] environment, TensorFlow's too
def test_the_test_extra_provides_every_import_of_the_suite():
    """`pip install ".[test]"` alone runs the tests and the notebooks."""
    paths = [
        *(ROOT / "tests").glob("test_*.py"),
        ROOT / "conftest.py",
        *(ROOT / "book").glob("*.ipynb"),
    ]
    local = {path.stem for path in (ROOT / "tests").glob("*.py")}
    modules = imported_modules(paths) - local
    assert {"pytest", "hypothesis", "yaml", "mlxtend"} <= modules
    provided = installed_closure(declared("test"))
    distributions = importlib.metadata.packages_distributions()
    missing = {
        module: distributions.get(module, [module])
        for module in modules
        if not {
            canonicalize_name(d) for d in distributions.get(module, [module])
        }
        & provided
    }
    assert missing == {}


# --------------------------------------------------- test configuration
def test_pytest_runs_notebooks_with_strict_nbval():
    options = PYPROJECT["tool"]["pytest"]["ini_options"]
    addopts = options["addopts"]
    assert "--nbval" in addopts and "--nbval-current-env" in addopts
    assert "--nbval-lax" not in addopts
    index = addopts.index("--nbval-sanitize-with")
    assert addopts[index + 1] == "tests/nbval_sanitize.cfg"
    assert "book" in options["testpaths"]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci.splitlines()[-1]
    first_block = readme.split("```")[1]
    assert "make book" in first_block and "make test" in first_block


def make_dry_run(target):
    result = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", target],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return result.stdout


def test_make_test_lints_first_and_lint_runs_every_checker():
    lint = make_dry_run("lint")
    for tool in ("ruff check", "ruff format --check", "mypy", "actionlint"):
        assert tool in lint, tool
    assert "book" in lint and "tests" in lint and "companion" in lint
    test = make_dry_run("test")
    assert test.index("ruff check") < test.index("-m pytest")


def test_make_test_no_tf_runs_the_suite_without_tensorflow():
    commands = make_dry_run("test-no-tf")
    assert "-m 'not tf'" in commands
    assert "extra_requirements.py test --without tf" in commands
    assert '-e ".[data,plot]"' in commands
    assert "import tensorflow" in commands  # it checks TF is absent
    extras = PROJECT["optional-dependencies"]
    names = {r.name for r in flatten(extras["test"], extras, {"tf"})}
    assert "tensorflow" not in names and "pytest" in names


def test_release_workflow_builds_and_publishes_on_version_tags():
    path = ROOT / ".github" / "workflows" / "release.yml"
    workflow = yaml.safe_load(path.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert triggers["push"]["tags"] == ["v*"]
    jobs = workflow["jobs"]
    build_steps = " ".join(
        str(step.get("run", "")) for step in jobs["build"]["steps"]
    )
    assert "python -m build" in build_steps
    publish = jobs["publish"]
    assert publish["needs"] == "build"
    assert publish["permissions"] == {"id-token": "write"}
    assert re.search(r"refs/tags/v", publish["if"])
    uses = [step.get("uses", "") for step in publish["steps"]]
    assert any(u.startswith("pypa/gh-action-pypi-publish@") for u in uses)


@pytest.mark.parametrize("name", [".venv", ".pytest_cache", "_build"])
def test_book_excludes_folders_that_are_not_pages(name):
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert name in config["exclude_patterns"]
    assert config["execute"]["execute_notebooks"] == "off"
    assert "sphinx-mathjax-offline" in config["sphinx"]["extra_extensions"]
