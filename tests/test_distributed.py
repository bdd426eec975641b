"""companion.distributed (chapter 17): batch norm across two replicas.

The logical CPU devices must be configured before TensorFlow initializes
its runtime, and other test files initialize it in this process; so the
MirroredStrategy checks run in ONE subprocess that runs this file as a
script (:func:`mirrored_worker`) and writes an ``.npz``.  The multi-worker
check starts two more processes (companion.distributed.run_workers), on
127.0.0.1 only, killed after a timeout.  Every comparison is against
single-device batch norm on the whole batch
(companion.functional.batchnorm_forward/backward).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import companion
from companion import distributed

ROOT = Path(__file__).resolve().parents[1]
HAVE_TF = importlib.util.find_spec("tensorflow") is not None
TIMEOUT = 900  # seconds; a loaded 2-core machine starts TensorFlow slowly


def batch(seed, shape, dtype):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(2.0, 3.0, size=shape).astype(dtype),
        rng.normal(size=shape).astype(dtype),
    )


def mirrored_worker(out: str) -> None:
    """Run in a fresh process: two logical CPUs, Keras batch norm with and
    without synchronized=True, float32 and float64, per-replica batches of
    2 and 16; NCHW too."""
    strategy = distributed.mirrored_strategy(2)
    import keras

    results = {"replicas": np.array(strategy.num_replicas_in_sync)}
    cases = [
        ("f64_m2", np.float64, (4, 3), -1),
        ("f64_m16", np.float64, (32, 3), -1),
        ("f32_m16", np.float32, (32, 3), -1),
        ("f64_nchw", np.float64, (4, 3, 2, 2), 1),
    ]
    for key, dtype, shape, axis in cases:
        x, dy = batch(len(key), shape, dtype)
        for sync in (True, False):
            with strategy.scope():
                layer = keras.layers.BatchNormalization(
                    axis=axis,
                    synchronized=sync,
                    momentum=0.5,
                    dtype=np.dtype(dtype).name,
                )
                layer.build(shape)
            out_step = distributed.batchnorm_step(strategy, layer, x, dy)
            name = f"{key}_{'sync' if sync else 'local'}"
            for part, value in out_step.items():
                results[f"{name}_{part}"] = value
            results[f"{name}_moving_mean"] = np.asarray(layer.moving_mean)
            results[f"{name}_moving_variance"] = np.asarray(
                layer.moving_variance
            )
    np.savez(out, **results)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    if not HAVE_TF:
        pytest.skip("TensorFlow is not installed")
    out = tmp_path_factory.mktemp("mirrored") / "mirrored.npz"
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    process = subprocess.run(
        [sys.executable, __file__, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


CASES = {
    "f64_m2": (np.float64, (4, 3), -1, 1e-12),
    "f64_m16": (np.float64, (32, 3), -1, 1e-12),
    "f32_m16": (np.float32, (32, 3), -1, 1e-5),
    "f64_nchw": (np.float64, (4, 3, 2, 2), 1, 1e-12),
}


def single_device(key):
    dtype, shape, axis, _ = CASES[key]
    x, dy = batch(len(key), shape, dtype)
    channels = shape[axis]
    one, zero = np.ones(channels, dtype), np.zeros(channels, dtype)
    y, cache = companion.batchnorm_forward(x, one, zero, axis=axis)
    dx, dgamma, dbeta = companion.batchnorm_backward(dy, cache)
    return x, dy, y, dx, dgamma, dbeta, cache


@pytest.mark.tf
@pytest.mark.parametrize("key", sorted(CASES))
def test_synchronized_equals_single_device_batch_norm(mirrored, key):
    assert int(mirrored["replicas"]) == 2
    tol = CASES[key][3]
    _, _, y, dx, dgamma, dbeta, cache = single_device(key)
    for part, expected in (
        ("y", y),
        ("dx", dx),
        ("dgamma", dgamma),
        ("dbeta", dbeta),
        ("moving_mean", 0.5 * cache.mean),
        ("moving_variance", 0.5 + 0.5 * cache.var),
    ):
        actual = mirrored[f"{key}_sync_{part}"]
        scale = np.abs(expected).max()
        np.testing.assert_allclose(
            actual, expected, rtol=tol, atol=tol * scale, err_msg=part
        )


@pytest.mark.tf
@pytest.mark.parametrize("key", sorted(CASES))
def test_per_replica_batch_norm_is_batch_norm_of_each_half(mirrored, key):
    """Without synchronized=True each replica normalizes its own half, as
    ghost batch norm with consecutive ghost batches; Keras keeps the
    moving statistics of the first replica's half."""
    dtype, _, axis, tol = CASES[key]
    x, dy, y, *_ = single_device(key)
    channels = x.shape[axis]
    one, zero = np.ones(channels, dtype), np.zeros(channels, dtype)
    halves = [
        companion.batchnorm_forward(h, one, zero, axis=axis)
        for h in np.split(x, 2)
    ]
    dxs = [
        companion.batchnorm_backward(g, c)[0]
        for g, (_, c) in zip(np.split(dy, 2), halves, strict=True)
    ]
    local_y = mirrored[f"{key}_local_y"]
    np.testing.assert_allclose(
        local_y, np.concatenate([h[0] for h in halves]), rtol=tol, atol=tol
    )
    np.testing.assert_allclose(
        mirrored[f"{key}_local_dx"],
        np.concatenate(dxs),
        rtol=tol,
        atol=tol * np.abs(dxs[0]).max(),
    )
    assert np.abs(local_y - y).max() > 0.01  # not the whole batch's
    first = halves[0][1]
    np.testing.assert_allclose(
        mirrored[f"{key}_local_moving_mean"], 0.5 * first.mean, rtol=tol
    )
    np.testing.assert_allclose(
        mirrored[f"{key}_local_moving_variance"],
        0.5 + 0.5 * first.var,
        rtol=tol,
    )


@pytest.mark.tf
@pytest.mark.skipif(not HAVE_TF, reason="TensorFlow is not installed")
def test_two_worker_processes_equal_single_device_batch_norm():
    """MultiWorkerMirroredStrategy: two processes on 127.0.0.1, TF_CONFIG
    per worker, a synchronized float64 batch norm on each half."""
    results = distributed.run_workers(2, seed=3, timeout=TIMEOUT)
    x, dy = distributed.worker_batch(3)
    y, cache = companion.batchnorm_forward(x, np.ones(3), np.zeros(3))
    dx = companion.batchnorm_backward(dy, cache)[0]
    assert [int(r["replicas"]) for r in results] == [2, 2]
    np.testing.assert_allclose(
        np.concatenate([r["y"] for r in results]), y, rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        np.concatenate([r["dx"] for r in results]), dx, rtol=1e-12, atol=1e-12
    )
    for r in results:
        np.testing.assert_allclose(r["moving_mean"], 0.5 * cache.mean)
        np.testing.assert_allclose(r["moving_variance"], 0.5 + 0.5 * cache.var)


def test_tf_config_names_loopback_workers_and_checks_its_arguments():
    config = distributed.tf_config([4001, 4002], 1)
    assert config == {
        "cluster": {"worker": ["127.0.0.1:4001", "127.0.0.1:4002"]},
        "task": {"type": "worker", "index": 1},
    }
    with pytest.raises(ValueError, match="index=2 is out of range"):
        distributed.tf_config([4001, 4002], 2)
    with pytest.raises(ValueError, match="port=0 is out of range"):
        distributed.tf_config([0], 0)
    ports = distributed._free_ports(3)
    assert len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)
    with pytest.raises(ValueError, match="workers=0"):
        distributed.run_workers(0)


if __name__ == "__main__":
    mirrored_worker(sys.argv[1])
