"""python -m companion.bench on tiny shapes: it runs, and its report and
JSON hold every column.  No timing is asserted anywhere (CONTRIBUTING.md:
timings are shown, never asserted)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from companion.bench import CASES, QUICK_CASES, Case, main, parse_cases
from companion.bench import report as bench_report
from companion.bench.kernels import (
    IMPLEMENTATIONS,
    KERNELS,
    _arrays,
    numpy_kernels,
)
from companion.bench.steps import STEP_IMPLEMENTATIONS, STEPS

# (N, D) runs TF's fused kernel as (N, 1, 1, D); NCHW float64 has Keras only
TINY = "ND:16x5:float32,NCHW:4x3x5x5:float64"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of the command line on tiny shapes, 2 rounds."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(
            [
                "--cases",
                TINY,
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--steps",
                "mlp_bn,cnn",
                "--json",
                str(out),
            ]
        )
    return status, printed.getvalue(), json.loads(out.read_text())


@pytest.mark.tf
def test_the_command_line_runs_and_writes_its_json(tiny_run):
    status, _, result = tiny_run
    assert status == 0
    assert set(result) == {
        "provenance",
        "machine",
        "settings",
        "kernels",
        "matmul",
        "steps",
    }
    assert result["settings"] == {"repeats": 2, "warmup": 1, "quick": False}
    assert result["provenance"]["command"].startswith(
        "python -m companion.bench --cases"
    )
    machine = result["machine"]
    for key in (
        "cpu",
        "cpus",
        "numpy",
        "blas",
        "blas_threads",
        "tensorflow",
        "keras",
        "tf_threads",
        "blocked_threads",
        "load_before",
        "load_after",
        "environment",
    ):
        assert machine[key] not in (None, ""), key
    assert [r["dtype"] for r in result["matmul"]] == ["float32", "float64"]
    for r in result["matmul"]:
        assert r["flops"] == 2 * r["size"] ** 3 and len(r["seconds"]) == 2


@pytest.mark.tf
def test_every_kernel_and_implementation_is_timed(tiny_run):
    _, _, result = tiny_run
    found = {
        (r["layout"], r["dtype"], r["kernel"], r["implementation"])
        for r in result["kernels"]
    }
    for case in parse_cases(TINY):
        expected = {("copy", "numpy")}
        expected |= {("train", i) for i in IMPLEMENTATIONS}
        expected |= {
            (k, i)
            for k in ("forward", "inference")
            for i in ("reference", "layer", "tf_fused", "keras")
        }
        expected.add(("forward", "blocked"))
        if case.dtype == "float64":  # TensorFlow's fused kernel: float32
            expected = {e for e in expected if e[1] != "tf_fused"}
        assert {
            (k, i)
            for lay, d, k, i in found
            if (lay, d) == (case.layout, case.dtype)
        } == expected
    for r in result["kernels"]:
        assert len(r["seconds"]) == 2
        assert r["q1"] <= r["median"] <= r["q3"]
        assert r["passes"] == KERNELS.get(r["kernel"], 2)
    steps = {(r["step"], r["implementation"]) for r in result["steps"]}
    assert steps == {
        (s, i) for s in ("mlp_bn", "cnn") for i in STEP_IMPLEMENTATIONS
    }


@pytest.mark.tf
def test_the_report_prints_every_column(tiny_run):
    _, text, result = tiny_run
    assert text == bench_report.render(result)
    for line in bench_report.machine_lines(result):
        assert line in text
    summary = bench_report.summary_table(result, "float32", "train")
    header = summary.splitlines()[0]
    for impl in IMPLEMENTATIONS:
        assert bench_report.LABELS[impl] in header
    for column in (
        "numpy copy",
        "companion / TF",
        "blocked / TF",
        "BatchNorm layer / TF",
        "roofline: companion",
        "roofline: blocked",
        "roofline: TF fused",
    ):
        assert column in header
    assert "| ND 16×5 |" in summary
    assert "| NCHW 4×3×5×5 |" in bench_report.summary_table(result, "float64")
    for dtype in ("float32", "float64"):
        for kernel in KERNELS:
            assert bench_report.summary_table(result, dtype, kernel) in text
    steps = bench_report.steps_table(result)
    for label in bench_report.STEP_LABELS.values():
        assert label in steps.splitlines()[0]
    for name in ("mlp_bn", "cnn"):
        assert STEPS[name] in steps
    detail = bench_report.case_table(result, ("ND", (16, 5), "float32"))
    assert detail in text
    for column in ("median ms", "quartiles ms", "GB/s", "roofline"):
        assert column in detail.splitlines()[0]
    tables = [b for b in text.split("\n\n") if b.startswith("|")]
    assert len(tables) == 1 + 2 * 3 + 1 + 2  # roofs, summaries, steps, cases
    roofs = bench_report.roofs_table(result)
    assert roofs in text and "| ND 16×5 float32 |" in roofs
    assert "ridge flop/byte" in roofs.splitlines()[0]
    for table in tables:
        widths = {line.count("|") for line in table.splitlines()}
        assert len(widths) == 1, table


def test_derived_columns_from_a_hand_made_result():
    """Roofline fraction, bandwidth and the paired ratio on numbers chosen
    by hand: copy 1 ms (2 passes), a train kernel 8 ms (8 passes) is at
    1/2 of the roofline; per-round ratios 2, 4, 3 to TF have median 3."""

    def record(kernel, impl, seconds, passes):
        return {
            "layout": "NHWC",
            "shape": [2, 2, 2, 1000],
            "dtype": "float32",
            "kernel": kernel,
            "implementation": impl,
            "passes": passes,
            "bytes": 32_000,
            "seconds": seconds,
            "median": sorted(seconds)[1],
            "q1": min(seconds),
            "q3": max(seconds),
        }

    result = {
        "kernels": [
            record("copy", "numpy", [1e-3, 1e-3, 1e-3], 2),
            record("train", "reference", [8e-3, 8e-3, 6e-3], 8),
            record("train", "tf_fused", [4e-3, 2e-3, 2e-3], 8),
        ]
    }
    rows = {r["implementation"]: r for r in bench_report.kernel_rows(result)}
    assert rows["reference"]["roofline"] == pytest.approx(0.5)
    assert rows["tf_fused"]["roofline"] == pytest.approx(2.0)
    assert rows["reference"]["vs_tf"] == pytest.approx(3.0)
    assert rows["reference"]["gbps"] == pytest.approx(8 * 32_000 / 8e-3 / 1e9)
    # 8,000 float32 values, 14 flops each, in 8 ms; over 8 passes of 32 kB
    assert rows["reference"]["gflops"] == pytest.approx(14 * 8000 / 8e-3 / 1e9)
    assert rows["reference"]["intensity"] == pytest.approx(14 / 32)
    assert rows["numpy"]["gflops"] is None
    assert rows["numpy"]["vs_tf"] is None


def test_cases_parse_and_are_checked():
    assert parse_cases("NHWC:64x32x32x64:float32,ND:256x1024:float64") == [
        Case("NHWC", (64, 32, 32, 64), "float32"),
        Case("ND", (256, 1024), "float64"),
    ]
    for bad in ("NHWC:64x32:float32", "NHWC:8x4x4x3", "XY:8x4:float32"):
        with pytest.raises(ValueError):
            parse_cases(bad)
    with pytest.raises(ValueError, match="dtype"):
        Case("ND", (4, 4), "float16")
    with pytest.raises(ValueError, match="sizes"):
        parse_cases("ND:4xa:float32")
    assert {c.dtype for c in QUICK_CASES} == {"float32"}
    assert (
        len(CASES) == 8 and Case("NCHW", (64, 64, 32, 32), "float64") in CASES
    )


def test_the_numpy_kernels_compute_batch_norm():
    """The timed callables do the work they are named for (no stub): each
    output has the batch statistics gamma and beta say, and the layer and
    the blocked path agree with the reference."""
    for shape, exact in [((16, 8, 8, 4), True), ((64, 8, 8, 4), False)]:
        case = Case("NHWC", shape, "float32")
        kernels = numpy_kernels(case)
        arrays = _arrays(case, 0)
        y, _ = kernels[("forward", "reference")]()
        np.testing.assert_allclose(
            y.mean(axis=(0, 1, 2)), arrays["beta"], atol=1e-5
        )
        np.testing.assert_allclose(
            y.std(axis=(0, 1, 2)), abs(arrays["gamma"]), rtol=1e-3
        )
        y_layer = kernels[("forward", "layer")]()
        y_blocked, _ = kernels[("forward", "blocked")]()
        for other in (y_layer, y_blocked):
            if exact:  # below the threshold: the reference's numbers
                assert np.array_equal(other, y)
            else:
                np.testing.assert_allclose(other, y, rtol=1e-5, atol=1e-5)
        inference = kernels[("inference", "reference")]()
        expected = (
            arrays["gamma"]
            * (arrays["x"] - arrays["mean"])
            / np.sqrt(arrays["var"] + 1e-3)
            + arrays["beta"]
        )
        np.testing.assert_allclose(inference, expected, rtol=1e-5, atol=1e-5)


def test_the_command_line_refuses_unknown_steps(capsys):
    with pytest.raises(SystemExit):
        main(["--steps", "resnet"])
    assert "unknown steps" in capsys.readouterr().err
