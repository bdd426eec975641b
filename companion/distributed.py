"""Batch norm across devices with ``tf.distribute`` (chapter 17).

A global batch is split across replicas -- here two *logical* CPU devices
of one machine (:func:`mirrored_strategy`), or two worker processes on
localhost (:func:`run_workers`) -- and every replica runs the same Keras
``BatchNormalization`` layer on its share.  With ``synchronized=True``
the replicas all-reduce their statistics and normalize with those of the
whole batch; without it each uses its own.  :func:`batchnorm_step` runs
one training-mode call with its gradients on every replica and gathers
the results in the order of the global batch, for comparison with
single-device batch norm (:func:`companion.functional.batchnorm_forward`).

TensorFlow is imported lazily (``companion.tf_env``): importing this
module needs numpy only.  The logical devices must be configured before
TensorFlow initializes its runtime, so :func:`mirrored_strategy` is the
first TensorFlow call of a process (a notebook kernel, a test worker).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from companion._validation import check_int, describe

__all__ = [
    "batchnorm_step",
    "distribute",
    "gather",
    "mirrored_strategy",
    "replica_values",
    "run_workers",
    "tf_config",
    "worker_batch",
]


def mirrored_strategy(replicas: int = 2) -> Any:
    """A ``MirroredStrategy`` over ``replicas`` logical CPU devices.

    Splits the machine's first physical CPU into ``replicas`` logical
    devices (``tf.config.set_logical_device_configuration``) and mirrors
    over ``/cpu:0``, ``/cpu:1``, ...  Call it before anything else runs
    TensorFlow in the process; a second call with the same count reuses
    the configuration.

    Raises
    ------
    RuntimeError
        TensorFlow's runtime is already initialized with another number of
        logical CPUs (restart the kernel and call this first).
    """
    replicas = check_int(replicas, "replicas", low=1)
    from companion.tf_env import import_tensorflow

    tf = import_tensorflow()
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as error:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != replicas:
            raise RuntimeError(
                f"mirrored_strategy({replicas}) must configure the logical "
                "CPUs before TensorFlow initializes its runtime; this "
                f"process already has {have} (restart and call it first)"
            ) from error
    devices = [f"/cpu:{i}" for i in range(replicas)]
    return tf.distribute.MirroredStrategy(devices)


def distribute(strategy: Any, array: np.ndarray) -> Any:
    """Split ``array`` along axis 0 into equal consecutive shares, one per
    replica (replica k gets rows k*n/R to (k+1)*n/R)."""
    array = np.asarray(array)
    replicas = strategy.num_replicas_in_sync
    if array.ndim == 0 or array.shape[0] % replicas:
        raise ValueError(
            f"array must have a first axis divisible by the {replicas} "
            f"replicas; received {describe(array)}"
        )
    share = array.shape[0] // replicas
    from companion.tf_env import import_tensorflow

    tf = import_tensorflow()

    def piece(context: Any) -> Any:
        k = context.replica_id_in_sync_group
        return tf.constant(array[k * share : (k + 1) * share])

    return strategy.experimental_distribute_values_from_function(piece)


def replica_values(strategy: Any, values: Any) -> list[np.ndarray]:
    """The per-replica values of a distributed result, as numpy arrays."""
    return [np.asarray(v) for v in strategy.experimental_local_results(values)]


def gather(strategy: Any, values: Any) -> np.ndarray:
    """Per-replica shares concatenated in replica order (the global batch)."""
    return np.concatenate(replica_values(strategy, values))


def batchnorm_step(
    strategy: Any, layer: Any, x: np.ndarray, dy: np.ndarray
) -> dict[str, np.ndarray]:
    r"""One training-mode call of ``layer`` on every replica, with gradients.

    Replica k computes :math:`y_k` = ``layer(x_k, training=True)`` and,
    with a ``GradientTape``, the gradients of :math:`L_k = \sum y_k \odot
    dy_k` with respect to :math:`x_k`, ``gamma`` and ``beta``.  With
    ``synchronized=True`` the all-reduce is differentiated too, so
    ``dx`` is the gradient of the total :math:`\sum_k L_k`, as on one
    device.  Returns ``y`` and ``dx`` in global-batch order and
    ``dgamma``, ``dbeta`` summed over the replicas.
    """
    from companion.tf_env import import_tensorflow

    tf = import_tensorflow()

    @tf.function
    def step(x_k: Any, dy_k: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x_k)
            y_k = layer(x_k, training=True)
            loss = tf.reduce_sum(y_k * dy_k)
        grads = tape.gradient(loss, [x_k, layer.gamma, layer.beta])
        return y_k, *grads

    y, dx, dgamma, dbeta = strategy.run(
        step, args=(distribute(strategy, x), distribute(strategy, dy))
    )
    return {
        "y": gather(strategy, y),
        "dx": gather(strategy, dx),
        "dgamma": np.sum(replica_values(strategy, dgamma), axis=0),
        "dbeta": np.sum(replica_values(strategy, dbeta), axis=0),
    }


# ------------------------------------------------------------ multi-worker
def tf_config(ports: Sequence[int], index: int) -> dict[str, Any]:
    """``TF_CONFIG`` of worker ``index`` in a cluster on 127.0.0.1 ports.

    Loopback only: the workers are processes of this machine.
    """
    hosts = [f"127.0.0.1:{check_int(p, 'port', 1, 65535)}" for p in ports]
    index = check_int(index, "index", low=0, high=len(hosts) - 1)
    return {
        "cluster": {"worker": hosts},
        "task": {"type": "worker", "index": index},
    }


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now on 127.0.0.1 (released at once)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_batch(seed: int, rows: int = 8, channels: int = 3) -> np.ndarray:
    """The global batch and upstream gradient the workers share, float64:
    ``(x, dy)`` stacked, shape (2, rows, channels)."""
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            rng.normal(2.0, 3.0, size=(rows, channels)),
            rng.normal(size=(rows, channels)),
        ]
    )


def _worker(index: int, ports: list[int], seed: int, out: str) -> None:
    """One worker: synchronized batch norm on its share of the batch."""
    os.environ["TF_CONFIG"] = json.dumps(tf_config(ports, index))
    from companion.tf_env import import_tensorflow

    tf = import_tensorflow()
    import keras

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, dy = worker_batch(seed)
    share = len(x) // strategy.num_replicas_in_sync
    rows = slice(index * share, (index + 1) * share)
    with strategy.scope():
        layer = keras.layers.BatchNormalization(
            synchronized=True, momentum=0.5, dtype="float64"
        )
        layer.build((None, x.shape[1]))

    @tf.function
    def step(x_k: Any, dy_k: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x_k)
            y_k = layer(x_k, training=True)
            loss = tf.reduce_sum(y_k * dy_k)
        return y_k, tape.gradient(loss, x_k)

    y, dx = strategy.run(
        step, args=(tf.constant(x[rows]), tf.constant(dy[rows]))
    )
    np.savez(
        out,
        y=np.asarray(y),
        dx=np.asarray(dx),
        moving_mean=np.asarray(layer.moving_mean),
        moving_variance=np.asarray(layer.moving_variance),
        replicas=np.array(strategy.num_replicas_in_sync),
    )


def run_workers(
    workers: int = 2, *, seed: int = 0, timeout: float = 300.0
) -> list[dict[str, np.ndarray]]:
    """Run ``workers`` processes of ``MultiWorkerMirroredStrategy`` here.

    Each is ``python -m companion.distributed WORKER_INDEX PORTS SEED
    OUT``, with its own ``TF_CONFIG`` (:func:`tf_config`, ports on
    127.0.0.1 picked free at the start); each normalizes its consecutive
    share of :func:`worker_batch` with a synchronized Keras batch norm and
    returns its ``y``, ``dx`` and moving statistics.  The processes are
    killed after ``timeout`` seconds, and on any failure.

    Raises
    ------
    RuntimeError
        A worker failed or timed out (its standard error is in the
        message).
    """
    workers = check_int(workers, "workers", low=1)
    ports = _free_ports(workers)
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tempfile.TemporaryDirectory() as folder:
        outs = [str(Path(folder) / f"worker{i}.npz") for i in range(workers)]
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "companion.distributed",
                    str(i),
                    ",".join(map(str, ports)),
                    str(seed),
                    outs[i],
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(workers)
        ]
        errors = []
        try:
            for i, process in enumerate(processes):
                _, stderr = process.communicate(timeout=timeout)
                if process.returncode != 0:
                    errors.append(f"worker {i}: {stderr[-2000:]}")
        except subprocess.TimeoutExpired:
            errors.append(f"the workers did not finish in {timeout:g} s")
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
        if errors:
            raise RuntimeError("; ".join(errors))
        results = []
        for out in outs:
            with np.load(out) as data:
                results.append({k: data[k] for k in data.files})
    return results


if __name__ == "__main__":  # a worker of run_workers
    _worker(
        int(sys.argv[1]),
        [int(p) for p in sys.argv[2].split(",")],
        int(sys.argv[3]),
        sys.argv[4],
    )
