"""README.md as a user reads it: its Python runs as written, in order, in
an empty folder; its install commands name the package and real extras."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def readme_program():
    """Every ```python block, in order, as one program (one session)."""
    return "\n".join(blocks("python"))


def test_every_python_block_runs_as_written(tmp_path):
    assert blocks("python"), "README.md has no Python to run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", readme_program()],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == "(16,) (16,)\n"
    # save("bn") wrote bn.npz, which from_file("bn") found.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.npz"]


def test_the_package_example_uses_inference_mode_backward():
    """The example a user copies trains through a frozen layer."""
    program = readme_program()
    infer = program.index("y_infer = layer(x)")
    assert "layer.backward(dy)" in program[infer:]


def test_install_commands_name_the_package_and_its_extras():
    commands = [
        line
        for block in blocks("bash")
        for line in block.splitlines()
        if "pip install" in line
    ]
    assert commands
    extras = set(PROJECT["optional-dependencies"])
    mentioned = set()
    for line in commands:
        for group in re.findall(r"\[([a-z,]+)\]", line):
            mentioned |= set(group.split(","))
    mentioned |= set(re.findall(r"`\[([a-z]+)\]`", README))
    assert mentioned <= extras
    assert extras <= mentioned, "every extra is described"
    assert any(PROJECT["name"] in line for line in commands)
