"""What produced a result file: command, commit, library versions, CPU, date.

Every results file under ``book/data/`` carries a ``provenance`` entry
made by :func:`provenance`, so that a reader can tell which code, which
libraries and which machine produced the numbers a chapter plots (training
trajectories differ between CPUs; chapter 8 measures how much).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "git_commit", "provenance"]

_LIBRARIES = ("numpy", "tensorflow", "keras", "tf-keras", "mlxtend")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else platform's."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit(folder: str | os.PathLike[str] | None = None) -> str | None:
    """The commit checked out in ``folder`` (default: the package's
    repository), with ``+dirty`` when files differ from it; None outside
    a git checkout."""
    where = Path(folder) if folder else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _blas() -> str | None:
    """numpy's BLAS library and the kernel set it chose (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover - threadpoolctl is in [data]
        return None
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            return (
                f"{info.get('internal_api')} {info.get('version')} "
                f"({info.get('architecture')})"
            )
    return None  # pragma: no cover - numpy always links a BLAS


def provenance(command: str | None = None) -> dict[str, Any]:
    """A dict describing how and where a result is being produced.

    Keys: ``command`` (default: this process's command line), ``commit``
    (:func:`git_commit`), ``versions`` (Python and the libraries that
    shape the numbers), ``cpu`` (:func:`cpu_model`), ``blas``, the
    environment variables that change kernels (``ONEDNN_MAX_CPU_ISA``,
    ``OPENBLAS_CORETYPE``, ``TF_ENABLE_ONEDNN_OPTS``) and ``date`` (UTC,
    ISO 8601).
    """
    kernel_env = (
        "ONEDNN_MAX_CPU_ISA",
        "OPENBLAS_CORETYPE",
        "TF_ENABLE_ONEDNN_OPTS",
    )
    return {
        "command": command
        or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": git_commit(),
        "versions": _versions(),
        "cpu": cpu_model(),
        "blas": _blas(),
        "environment": {
            k: os.environ[k] for k in kernel_env if k in os.environ
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
    }
