"""How fast is it?  The companion's batch norm against TensorFlow.

``python -m companion.bench [--quick] [--json OUT]`` (needs
``batchnorm-companion[tf]``) times, in one run and interleaved (medians of
at least 10 rounds after warm-up):

* batch norm's training-mode forward and backward, the forward alone and
  inference (:mod:`companion.bench.kernels`), float32 and float64, on
  (N, D) 256×1024, NHWC 64×32×32×64 and 32×56×56×128 and NCHW
  64×64×32×32: the companion's closed form, its staged backward, its
  blocked path and its layer, TensorFlow's fused kernel and Keras's layer,
  with a numpy copy of the same tensor as the memory roofline;
* one training step of the experiments' MLP and of the source text's CNN
  (:mod:`companion.bench.steps`): the companion against Keras's compiled
  ``train_on_batch``;

and prints the tables (:mod:`companion.bench.report`) with the machine:
CPU, numpy's BLAS (threadpoolctl), TensorFlow's version, the load.
Nothing here is asserted: timings vary between machines and runs, and a
busy machine slows everything (the load average is recorded).  Chapter 19,
*How fast is it?*, shows a stored run, ``book/data/bench.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from companion import _fast_bn
from companion.bench._timing import interleaved, quartiles
from companion.bench.kernels import (
    COPY_PASSES,
    KERNELS,
    MATMUL_SIZE,
    Case,
    matmul_kernel,
    numpy_kernels,
    tensorflow_kernels,
)
from companion.bench.report import render
from companion.bench.steps import STEPS, step_kernels
from companion.provenance import provenance

__all__ = ["CASES", "QUICK_CASES", "Case", "main", "parse_cases", "run"]

_SHAPES = (
    ("ND", (256, 1024)),
    ("NHWC", (64, 32, 32, 64)),
    ("NHWC", (32, 56, 56, 128)),
    ("NCHW", (64, 64, 32, 32)),
)
CASES = tuple(
    Case(layout, shape, dtype)
    for dtype in ("float32", "float64")
    for layout, shape in _SHAPES
)
"""The full run: every shape of issue 13, float32 and float64."""
QUICK_CASES = tuple(c for c in CASES if c.dtype == "float32")
"""``--quick``: float32 only."""
REPEATS, QUICK_REPEATS, WARMUP = 15, 10, 2
_ENVIRONMENT = (
    "TF_DETERMINISTIC_OPS",
    "TF_ENABLE_ONEDNN_OPTS",
    "ONEDNN_MAX_CPU_ISA",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
)
"""Environment variables that change the kernels or their threads."""


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not available on this platform
        return None


def _blas_threads() -> int | None:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover - threadpoolctl is in [data]
        return None
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            return int(info["num_threads"])
    return None  # pragma: no cover - numpy always links a BLAS


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return None


def _summary(seconds: list[float]) -> dict[str, Any]:
    q1, median, q3 = quartiles(seconds)
    return {"seconds": seconds, "median": median, "q1": q1, "q3": q3}


def run(
    cases: Sequence[Case] = CASES,
    steps: Sequence[str] = tuple(STEPS),
    *,
    repeats: int = REPEATS,
    warmup: int = WARMUP,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every case and step; return the result (JSON-ready).

    Keys: ``provenance``, ``machine``, ``settings``, ``kernels`` (one
    record per case, kernel and implementation: ``layout``, ``shape``,
    ``dtype``, ``kernel``, ``implementation``, ``passes``, ``bytes``,
    ``seconds`` per round, ``median``, ``q1``, ``q3``), ``matmul`` (per
    dtype, a matrix product: the compute roof, ``flops`` per call) and
    ``steps`` (one per step and implementation: ``step``,
    ``implementation`` and the times).  The kernels of a case are timed
    together, interleaved, and so are the implementations of a step.
    """
    from companion.tf_env import import_tensorflow

    tf = import_tensorflow()
    say = log or (lambda text: None)
    load_before = _load()
    records: list[dict[str, Any]] = []
    for case in cases:
        say(f"timing {case.label()} {case.dtype}")
        kernels = {**numpy_kernels(case), **tensorflow_kernels(case)}
        times = interleaved(kernels, repeats, warmup)
        for (kernel, implementation), seconds in times.items():
            records.append(
                {
                    "layout": case.layout,
                    "shape": list(case.shape),
                    "dtype": case.dtype,
                    "kernel": kernel,
                    "implementation": implementation,
                    "passes": KERNELS.get(kernel, COPY_PASSES),
                    "bytes": case.nbytes,
                    **_summary(seconds),
                }
            )
        del kernels, times
        gc.collect()
    say("timing the compute roof (matrix product)")
    dtypes = list(dict.fromkeys(case.dtype for case in cases))
    matmul_times = interleaved(
        {dtype: matmul_kernel(dtype) for dtype in dtypes}, repeats, warmup
    )
    roofs = [
        {
            "dtype": dtype,
            "size": MATMUL_SIZE,
            "flops": 2 * MATMUL_SIZE**3,
            **_summary(seconds),
        }
        for dtype, seconds in matmul_times.items()
    ]
    step_records = []
    for name in steps:
        say(f"timing the {name} training step")
        step_times = interleaved(step_kernels(name), repeats, warmup)
        for implementation, seconds in step_times.items():
            step_records.append(
                {
                    "step": name,
                    "implementation": implementation,
                    **_summary(seconds),
                }
            )
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    origin = provenance(command)
    machine = {
        "cpu": origin["cpu"],
        "cpus": _fast_bn._available_cpus(),
        "numpy": _version("numpy"),
        "blas": origin["blas"],
        "blas_threads": _blas_threads(),
        "tensorflow": tf.__version__,
        "keras": _version("keras"),
        "tf_threads": intra or "all CPUs",
        "blocked_threads": _fast_bn.threads(),
        "load_before": load_before,
        "load_after": _load(),
        "environment": {
            k: os.environ[k] for k in _ENVIRONMENT if k in os.environ
        },
    }
    return {
        "provenance": origin,
        "machine": machine,
        "settings": {"repeats": repeats, "warmup": warmup},
        "kernels": records,
        "matmul": roofs,
        "steps": step_records,
    }


def parse_cases(text: str) -> list[Case]:
    """``"NHWC:8x4x4x3:float32,ND:16x5:float64"`` -> cases."""
    cases = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3:
            raise ValueError(
                "a case is LAYOUT:SHAPE:DTYPE, e.g. NHWC:64x32x32x64:float32; "
                f"received {item!r}"
            )
        layout, shape, dtype = parts
        try:
            sizes = tuple(int(size) for size in shape.split("x"))
        except ValueError:
            raise ValueError(
                f"a shape is sizes joined by x, e.g. 64x32x32x64; received "
                f"{shape!r}"
            ) from None
        cases.append(Case(layout, sizes, dtype))
    return cases


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m companion.bench",
        description="Time the companion's batch norm against TensorFlow's "
        "fused kernel, Keras and a numpy copy (the memory roofline), and "
        "one training step of the book's MLP and CNN against Keras.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"float32 only, {QUICK_REPEATS} rounds (about 2 minutes)",
    )
    parser.add_argument("--json", type=Path, help="also write the result")
    parser.add_argument(
        "--repeats", type=int, help=f"rounds (default {REPEATS})"
    )
    parser.add_argument(
        "--warmup", type=int, default=WARMUP, help="calls before timing"
    )
    parser.add_argument(
        "--cases",
        type=parse_cases,
        help="LAYOUT:SHAPE:DTYPE,... instead of the standard shapes",
    )
    parser.add_argument(
        "--steps",
        default=",".join(STEPS),
        help=f"training steps to time, of {','.join(STEPS)} ('' for none)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; prints the report, returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {list(STEPS)}")
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    if repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    cases = args.cases or (QUICK_CASES if args.quick else CASES)
    given = sys.argv[1:] if argv is None else list(argv)
    words = ["python -m companion.bench", *given]
    result = run(
        cases,
        steps,
        repeats=repeats,
        warmup=args.warmup,
        command=" ".join(words),
        log=lambda text: print(text, file=sys.stderr, flush=True),
    )
    result["settings"]["quick"] = bool(args.quick)
    sys.stdout.write(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0
