"""The project's contracts: import cost, packaging metadata, environment.yml agreement, CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


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
        "print(sorted(m for m in ('tensorflow', 'keras', 'matplotlib') if m in sys.modules))"
    )
    assert out == "[]"


def test_tf_env_imports_tensorflow_without_writing_to_stderr():
    """The OS-level stderr of the import is silenced; TF_CPP_MIN_LOG_LEVEL alone does not do it."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    code = "from companion.tf_env import import_tensorflow; tf = import_tensorflow(); print(tf.__version__)"
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


def test_legacy_keras_makes_tf1_layers_available():
    code = (
        "from companion.tf_env import import_tensorflow\n"
        "tf = import_tensorflow(legacy_keras=True)\n"
        "with tf.Graph().as_default():\n"
        "    x = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 2])\n"
        "    y = tf.compat.v1.layers.batch_normalization(x, training=True, name='bn')\n"
        "    print(len(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)))\n"
    )
    assert (
        run_python(code) == "2"
    )  # the moving-mean and moving-variance updates


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
            self.display_formatter = type(
                "D", (), {"formatters": {"text/plain": Formatter()}}
            )()

        def run_line_magic(self, name, line):
            self.magics.append((name, line))

    shell = Shell()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    plotting._configure_notebook()
    assert shell.magics == [("matplotlib", "inline")]
    printer = Printer()
    shell.display_formatter.formatters["text/plain"].registered[Figure](
        None, printer, False
    )
    assert printer.value == "[figure]"
    monkeypatch.setattr(
        IPython, "get_ipython", lambda: None
    )  # plain Python: nothing happens
    plotting._configure_notebook()


def _requirements(strings):
    reqs = {}
    for text in strings:
        req = Requirement(text)
        if (
            req.name == "batchnorm-companion"
        ):  # the extras' reference to the package itself
            continue
        if req.name in reqs:
            assert str(req.specifier) == str(reqs[req.name].specifier), (
                f"{req.name} pinned twice differently"
            )
        reqs[req.name] = req
    return {name: str(req.specifier) for name, req in reqs.items()}


def test_environment_yml_lists_the_same_packages_and_bounds_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [
        *project["dependencies"],
        *(
            r
            for extra in project["optional-dependencies"].values()
            for r in extra
        ),
    ]
    from_pyproject = _requirements(declared)

    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    from_environment = _requirements(p for p in pip if not p.startswith("-e"))

    assert from_environment == from_pyproject
    assert "-e ." in pip, (
        "environment.yml must install the companion package itself"
    )
    python = next(d for d in conda if d.startswith("python"))
    assert (
        python.split("=")[1] == "3.11"
        and project["requires-python"] == ">=3.10"
    )


def test_drift_is_detected():
    """The comparison above is not vacuous: a changed bound or a missing package differ."""
    assert _requirements(["numpy>=1.26,<3"]) != _requirements(
        ["numpy>=1.26,<2"]
    )
    assert _requirements(["numpy>=1.26,<3", "nbval"]) != _requirements(
        ["numpy>=1.26,<3"]
    )


def test_pytest_runs_notebooks_with_strict_nbval():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
        "pytest"
    ]["ini_options"]
    addopts = options["addopts"]
    assert "--nbval" in addopts and "--nbval-current-env" in addopts
    assert "--nbval-lax" not in addopts
    assert (
        addopts[addopts.index("--nbval-sanitize-with") + 1]
        == "tests/nbval_sanitize.cfg"
    )
    assert "book" in options["testpaths"]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in ci.splitlines()[-1]
    first_block = readme.split("```")[1]
    assert "make book" in first_block and "make test" in first_block


@pytest.mark.parametrize("name", [".venv", ".pytest_cache", "_build"])
def test_book_excludes_folders_that_are_not_pages(name):
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert name in config["exclude_patterns"]
    assert config["execute"]["execute_notebooks"] == "off"
    assert "sphinx-mathjax-offline" in config["sphinx"]["extra_extensions"]
