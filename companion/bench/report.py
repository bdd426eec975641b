"""Tables from a benchmark result (the dict :func:`companion.bench.run`
returns and ``--json`` writes; chapter 19 reads ``book/data/bench.json``).

Every table is GitHub markdown.  Times are medians over the rounds;
ratios are medians of the per-round ratios (both kernels timed in the same
round, under the same load); a kernel's *roofline fraction* is its least
memory traffic (:data:`companion.bench.kernels.KERNELS`) moved at its
speed, as a fraction of what ``np.copyto`` moves in the same time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from companion.bench._timing import paired_ratio
from companion.bench.kernels import (
    COPY_PASSES,
    FLOPS,
    IMPLEMENTATIONS,
    KERNELS,
)
from companion.bench.steps import STEP_IMPLEMENTATIONS, STEPS

__all__ = [
    "KERNEL_LABELS",
    "LABELS",
    "STEP_LABELS",
    "case_table",
    "kernel_rows",
    "machine_lines",
    "render",
    "roofs_table",
    "steps_table",
    "summary_table",
]

LABELS = {
    "reference": "companion",
    "staged": "staged",
    "blocked": "blocked",
    "layer": "BatchNorm layer",
    "tf_fused": "TF fused",
    "keras": "Keras layer",
}
STEP_LABELS = {
    "companion": "companion",
    "companion_1t": "companion, 1 BLAS thread",
    "keras": "Keras train_on_batch",
}
KERNEL_LABELS = {
    "train": "training fwd+bwd",
    "forward": "training fwd",
    "inference": "inference",
}


def _key(record: Mapping[str, Any]) -> tuple[str, tuple[int, ...], str]:
    return record["layout"], tuple(record["shape"]), record["dtype"]


def _shape_label(key: tuple[str, tuple[int, ...], str]) -> str:
    layout, shape, _ = key
    return f"{layout} {'×'.join(map(str, shape))}"


def _case_label(key: tuple[str, tuple[int, ...], str]) -> str:
    return f"{_shape_label(key)} {key[2]}"


def kernel_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every kernel record with ``roofline`` (fraction of the copy's
    bandwidth), ``gbps`` (least traffic / median time), ``gflops``
    (arithmetic / median time; None for the copy), ``intensity`` (flops
    per byte of least traffic; None for the copy) and ``vs_tf`` (paired
    ratio to TF's fused kernel, None where it did not run)."""
    records = result["kernels"]
    copies = {
        _key(r): r for r in records if r["kernel"] == "copy"
    }  # one per case
    fused = {
        (_key(r), r["kernel"]): r
        for r in records
        if r["implementation"] == "tf_fused"
    }
    rows = []
    for r in records:
        row = dict(r)
        copy = copies.get(_key(r))
        row["gbps"] = r["passes"] * r["bytes"] / r["median"] / 1e9
        flops = FLOPS.get(r["kernel"])
        values = r["bytes"] // (4 if r["dtype"] == "float32" else 8)
        row["gflops"] = (
            None if flops is None else flops * values / r["median"] / 1e9
        )
        row["intensity"] = (
            None
            if flops is None
            else flops * values / (r["passes"] * r["bytes"])
        )
        row["roofline"] = (
            None
            if copy is None
            else r["passes"] * copy["median"] / (COPY_PASSES * r["median"])
        )
        tf = fused.get((_key(r), r["kernel"]))
        row["vs_tf"] = (
            None if tf is None else paired_ratio(r["seconds"], tf["seconds"])
        )
        rows.append(row)
    return rows


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _maybe(value: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def summary_table(
    result: Mapping[str, Any], dtype: str = "float32", kernel: str = "train"
) -> str:
    """One row per shape: milliseconds of every implementation, the copy,
    the ratios to TF's fused kernel and the roofline fractions."""
    rows = [r for r in kernel_rows(result) if r["dtype"] == dtype]
    cases = list(dict.fromkeys(_key(r) for r in rows))
    present = [
        impl
        for impl in IMPLEMENTATIONS
        if any(r["implementation"] == impl for r in rows)
    ]
    ratios = [i for i in ("reference", "blocked", "layer") if i in present]
    ratios = ratios if "tf_fused" in present else []
    roofs = [i for i in ("reference", "blocked", "tf_fused") if i in present]
    header = [
        f"{dtype}, {KERNEL_LABELS[kernel]} (ms)",
        "numpy copy",
        *(LABELS[i] for i in present),
        *(f"{LABELS[i]} / TF" for i in ratios),
        *(f"roofline: {LABELS[i]}" for i in roofs),
    ]
    body = []
    for case in cases:
        found = {
            r["implementation"]: r
            for r in rows
            if _key(r) == case and r["kernel"] in (kernel, "copy")
        }
        copy = found.get("numpy")
        body.append(
            [
                _shape_label(case),
                _ms(copy["median"]) if copy else "n/a",
                *(
                    _ms(found[i]["median"]) if i in found else "n/a"
                    for i in present
                ),
                *(
                    _maybe(found[i]["vs_tf"]) if i in found else "n/a"
                    for i in ratios
                ),
                *(
                    _maybe(found[i]["roofline"]) if i in found else "n/a"
                    for i in roofs
                ),
            ]
        )
    return _table(header, body)


def case_table(
    result: Mapping[str, Any], key: tuple[str, tuple[int, ...], str]
) -> str:
    """Every kernel and implementation of one case: median and quartiles,
    effective bandwidth, roofline fraction, ratio to TF's fused kernel."""
    rows = [r for r in kernel_rows(result) if _key(r) == key]
    order = ["copy", *KERNELS]
    rows.sort(
        key=lambda r: (
            order.index(r["kernel"]),
            (["numpy", *IMPLEMENTATIONS]).index(r["implementation"]),
        )
    )
    header = [
        _case_label(key),
        "implementation",
        "median ms",
        "quartiles ms",
        "GB/s",
        "roofline",
        "/ TF fused",
    ]
    body = [
        [
            KERNEL_LABELS.get(r["kernel"], "numpy copy"),
            LABELS.get(r["implementation"], r["implementation"]),
            _ms(r["median"]),
            f"{_ms(r['q1'])}–{_ms(r['q3'])}",
            f"{r['gbps']:.1f}",
            _maybe(r["roofline"]),
            _maybe(r["vs_tf"]),
        ]
        for r in rows
    ]
    return _table(header, body)


def steps_table(result: Mapping[str, Any]) -> str:
    """One row per network: milliseconds per training step and the
    companion's ratio to Keras's compiled ``train_on_batch``."""
    records = result["steps"]
    header = [
        "training step (ms)",
        *(STEP_LABELS[i] for i in STEP_IMPLEMENTATIONS),
        "companion / Keras",
        "companion, 1 thread / Keras",
    ]
    body = []
    for name in STEPS:
        found = {r["implementation"]: r for r in records if r["step"] == name}
        if not found:
            continue
        keras = found.get("keras")
        ratios = [
            "n/a"
            if keras is None or impl not in found
            else _maybe(paired_ratio(found[impl]["seconds"], keras["seconds"]))
            for impl in ("companion", "companion_1t")
        ]
        body.append(
            [
                STEPS[name],
                *(
                    _ms(found[i]["median"]) if i in found else "n/a"
                    for i in STEP_IMPLEMENTATIONS
                ),
                *ratios,
            ]
        )
    return _table(header, body)


def machine_lines(result: Mapping[str, Any]) -> list[str]:
    """The machine and the settings, one fact per line."""
    m = result["machine"]
    s = result["settings"]
    environment = ", ".join(
        f"{k}={v}" for k, v in m.get("environment", {}).items()
    )
    return [
        f"CPU: {m['cpu']} ({m['cpus']} CPUs usable)",
        f"numpy {m['numpy']}, BLAS: {m['blas']} ({m['blas_threads']} threads)",
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']} "
        f"(intra-op threads: {m['tf_threads']})",
        f"blocked path threads: {m['blocked_threads']}",
        "load average before/after: "
        + " / ".join(
            "-" if v is None else f"{v:.2f}"
            for v in (m["load_before"], m["load_after"])
        ),
        f"environment: {environment or 'no kernel settings'}",
        f"medians of {s['repeats']} interleaved rounds after "
        f"{s['warmup']} warm-up calls",
    ]


def roofs_table(result: Mapping[str, Any]) -> str:
    """The two roofs: the copy's bandwidth per case (memory) and a matrix
    product's arithmetic rate per dtype (compute), with the ridge point
    (the arithmetic intensity where the two meet)."""
    compute = {
        r["dtype"]: r["flops"] / r["median"] / 1e9 for r in result["matmul"]
    }
    body = []
    for r in result["kernels"]:
        if r["kernel"] != "copy":
            continue
        gbps = COPY_PASSES * r["bytes"] / r["median"] / 1e9
        gflops = compute.get(r["dtype"])
        body.append(
            [
                _case_label(_key(r)),
                f"{gbps:.1f}",
                _maybe(gflops, "{:.0f}"),
                _maybe(None if gflops is None else gflops / gbps, "{:.0f}"),
            ]
        )
    header = [
        "roofs",
        "memory: numpy copy GB/s",
        "compute: matrix product GFLOP/s",
        "ridge flop/byte",
    ]
    return _table(header, body)


def render(result: Mapping[str, Any]) -> str:
    """The whole report as text: machine, roofs, summaries, per-case
    tables."""
    parts = ["\n".join(machine_lines(result)), roofs_table(result)]
    dtypes = list(dict.fromkeys(r["dtype"] for r in result["kernels"]))
    for dtype in dtypes:
        for kernel in KERNELS:
            parts.append(summary_table(result, dtype, kernel))
    if result["steps"]:
        parts.append(steps_table(result))
    for key in dict.fromkeys(_key(r) for r in result["kernels"]):
        parts.append(case_table(result, key))
    return "\n\n".join(parts) + "\n"
