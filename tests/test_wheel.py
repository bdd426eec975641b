"""The package as users install it: the sdist and the wheel built from the
source, the wheel installed into a fresh virtual environment with numpy
and nothing else, every numpy-only module imported there, the README's
example run there, and the modules that need an extra failing with an
ImportError that names it.

No network: ``python -m build --no-isolation`` uses the build backend of
this environment ([test] lists setuptools), pip installs the wheel with
``--no-index --no-deps``, and the fresh environment sees this
environment's numpy (and nothing else) through a ``.pth`` file.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NAME = "batchnorm_companion"
VERSION = PROJECT["version"]

# Modules that need an extra, the ImportError they raise, and how.
NEEDS_EXTRA = {
    "tf": "import companion.tf_env as m; m.import_tensorflow()",
    "tf_models": (
        "import companion.tf_models as m; m.build_keras_model(seed=0)"
    ),
    "plot": "import companion.plotting",
    "data": "import companion.data as m; m.load_mnist_subset()",
    "experiments": (
        "import companion.experiments as m; "
        "name = sorted(m.available())[0]; "
        "module = m._module(name); "
        "m.run_experiment(name, config=module.CONFIG_TEST, seeds=1)"
    ),
}
EXTRA_OF = {
    "tf": "tf",
    "tf_models": "tf",
    "plot": "plot",
    "data": "data",
    "experiments": "data",
}


def run(command, **kwargs):
    env = {
        **os.environ,
        "PIP_NO_INPUT": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        env=env,
        **kwargs,
    )
    assert result.returncode == 0, (
        f"{command} failed:\n{result.stdout}\n{result.stderr}"
    )
    return result


def source_files():
    """The package as it is in the repository: modules and py.typed."""
    package = ROOT / "companion"
    found = {
        path.relative_to(ROOT).as_posix()
        for path in package.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    return found | {"companion/py.typed"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """sdist and wheel, built as `python -m build` builds them (the wheel
    from the sdist), from a copy of the source (the tree is not touched)."""
    base = tmp_path_factory.mktemp("build")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "companion",
        source / "companion",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    out = base / "dist"
    run(
        [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--outdir",
            out,
            source,
        ]
    )
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    return {"wheel": wheels[0], "sdist": sdists[0]}


def numpy_only_path(base):
    """A folder that holds links to this environment's numpy (its package,
    its bundled libraries and its metadata) and nothing else."""
    folder = base / "numpy-only"
    folder.mkdir()
    distribution = importlib.metadata.distribution("numpy")
    package = Path(np.__file__).parent
    metadata = Path(str(distribution.locate_file(""))) / (
        f"numpy-{distribution.version}.dist-info"
    )
    for path in (package, package.with_name("numpy.libs"), metadata):
        if path.exists():
            (folder / path.name).symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def user_python(tmp_path_factory, dist):
    """A fresh venv with the wheel installed (no extras) and numpy."""
    base = tmp_path_factory.mktemp("user")
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--no-index",
            "--no-deps",
            "--quiet",
            dist["wheel"],
        ]
    )
    site = run(
        [
            python,
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ]
    ).stdout.strip()
    Path(site, "numpy-only.pth").write_text(f"{numpy_only_path(base)}\n")
    return python


def run_user(python, code, cwd):
    return run([python, "-W", "error", "-c", code], cwd=cwd)


# ------------------------------------------------------------- contents
def test_the_wheel_holds_every_module_and_nothing_else(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = wheel.namelist()
        info = f"{NAME}-{VERSION}.dist-info"
        metadata = email.parser.Parser().parsestr(
            wheel.read(f"{info}/METADATA").decode()
        )
        license_text = wheel.read(f"{info}/licenses/LICENSE").decode()
    package = {name for name in names if name.startswith("companion/")}
    assert package == source_files()
    assert "companion/nn/__init__.py" in package
    assert "companion/experiments/__init__.py" in package
    assert {
        n for n in names if not n.startswith(("companion/", info))
    } == set()
    assert metadata["Name"] == "batchnorm-companion"
    assert metadata["Version"] == VERSION
    assert metadata["License-Expression"] == "MIT"
    assert license_text == (ROOT / "LICENSE").read_text()
    assert set(metadata.get_all("Provides-Extra")) == set(
        PROJECT["optional-dependencies"]
    )
    plain = [
        Requirement(r)
        for r in metadata.get_all("Requires-Dist")
        if "extra ==" not in r
    ]
    assert plain == [Requirement(r) for r in PROJECT["dependencies"]]


def test_the_sdist_holds_the_package_and_what_builds_it(dist):
    prefix = f"{NAME}-{VERSION}/"
    with tarfile.open(dist["sdist"]) as sdist:
        names = {
            member.name.removeprefix(prefix)
            for member in sdist.getmembers()
            if member.isfile()
        }
    package = {name for name in names if name.startswith("companion/")}
    assert package == source_files()
    assert {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO"} <= names


# ------------------------------------------------------ installed, numpy
def test_every_numpy_only_module_imports_from_the_installed_wheel(
    user_python, tmp_path
):
    code = textwrap.dedent(
        """
        import importlib, json, pkgutil, sys
        import companion
        names = sorted(
            info.name
            for info in pkgutil.walk_packages(
                companion.__path__, "companion."
            )
            if not info.name.endswith("__main__")
        )
        imported, failed = [], {}
        for name in names:
            try:
                importlib.import_module(name)
                imported.append(name)
            except ImportError as error:
                failed[name] = str(error)
        heavy = ("tensorflow", "keras", "matplotlib", "mlxtend", "scipy")
        print(json.dumps({
            "file": companion.__file__,
            "version": companion.__version__,
            "imported": imported,
            "failed": failed,
            "heavy": [m for m in heavy if m in sys.modules],
            "numpy": importlib.import_module("numpy").__version__,
        }))
        """
    )
    report = json.loads(run_user(user_python, code, tmp_path).stdout)
    assert "site-packages" in report["file"]
    assert not report["file"].startswith(str(ROOT))
    assert report["version"] == VERSION
    assert report["numpy"] == np.__version__
    assert report["heavy"] == []  # the environment has numpy only
    expected = {
        path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for path in source_files()
        if path.endswith(".py") and not path.endswith("__main__.py")
    } - {"companion"}  # imported first, to walk the others
    assert set(report["imported"]) | set(report["failed"]) == expected
    assert set(report["failed"]) == {"companion.plotting"}
    for name in (
        "companion.functional",
        "companion.layers",
        "companion.gradcheck",
        "companion.nn",
        "companion.training",
        "companion.data",
    ):
        assert name in report["imported"]


@pytest.mark.parametrize("what", list(NEEDS_EXTRA))
def test_a_missing_extra_is_named(user_python, tmp_path, what):
    code = textwrap.dedent(
        f"""
        try:
            {NEEDS_EXTRA[what]}
        except ImportError as error:
            print(error)
        else:
            print("no ImportError")
        """
    )
    message = run_user(user_python, code, tmp_path).stdout
    extra = EXTRA_OF[what]
    assert f'pip install "batchnorm-companion[{extra}]"' in message, message


def test_the_readme_example_runs_in_the_users_environment(
    user_python, tmp_path
):
    text = (ROOT / "README.md").read_text()
    program = "\n".join(
        re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    )
    result = run_user(user_python, program, tmp_path)
    assert result.stderr == ""
    assert result.stdout == "(16,) (16,)\n"
