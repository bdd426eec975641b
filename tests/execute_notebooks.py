"""Re-execute notebooks in place, in the current Python environment
(`make execute`).

    python tests/execute_notebooks.py [NOTEBOOK_OR_FOLDER ...]

(default: book/)

Each notebook runs in a fresh kernel started with this interpreter (as nbval's
``--nbval-current-env`` does), with the notebook's folder as working
directory, and is written back with its new outputs.  Execution-time
metadata is not recorded, so re-running an unchanged notebook changes
nothing but what its code prints.  The environment is the caller's: the
Makefile sets TF_CPP_MIN_LOG_LEVEL=3 and PYTHONHASHSEED=0.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient


class _CurrentEnvironment(KernelSpecManager):
    """Every kernel name resolves to an ipykernel run by this interpreter."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[
                sys.executable,
                "-m",
                "ipykernel_launcher",
                "-f",
                "{connection_file}",
            ],
            display_name="Python 3 (ipykernel)",
            language="python",
        )


def execute(path: Path, timeout: int = 900) -> float:
    """Execute one notebook in place; return its wall time in seconds."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    manager = KernelManager(
        kernel_name="python3", kernel_spec_manager=_CurrentEnvironment()
    )
    client = NotebookClient(
        nb,
        km=manager,
        timeout=timeout,
        record_timing=False,
        resources={"metadata": {"path": str(path.parent.resolve())}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> int:
    targets = [Path(a) for a in argv] or [Path("book")]
    notebooks = sorted(
        p
        for t in targets
        for p in ([t] if t.suffix == ".ipynb" else t.glob("*.ipynb"))
        if ".ipynb_checkpoints" not in p.parts
    )
    if not notebooks:
        print("no notebooks found in", ", ".join(map(str, targets)))
        return 0
    for path in notebooks:
        print(f"{path}: {execute(path):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
