"""Batch norm with small batches: chapter 15's batch-size sweep.

Writes book/data/small_batches.json next to this script.  For each seed
(its MNIST split, initial kernels and batch order, companion.seeding) and
each batch size B in (2, 4, 8, 16, 64), two networks of two hidden layers
of 100 ReLU units are trained for two epochs of the seed's 4,000 training
digits: with batch norm before each ReLU (momentum 0.9, so that every run,
even the 125 steps at B = 64, has forgotten the initial moving statistics)
and without.  The learning rate follows the linear scaling rule,
0.1 * B / 64 (Goyal et al. 2017), so that every run takes the same total
step per example.  Stored per run, on the seed's 1,000 test digits
(hex, companion.stats.pack_correct):

* ``moving``: inference mode with the moving statistics;
* ``recalibrated``: inference mode after companion.recalibrate over the
  training digits in batches of B (the paper's Algorithm 2);
* ``batch``: training mode, the test digits in batches of B;

and, for the first batch norm layer (whose input does not depend on
other batch statistics), the moving statistics against the population
statistics of its input over the 4,000 training digits: the mean over
channels of moving_variance / population variance, and of |moving_mean -
population mean| / population standard deviation.  About 10 minutes on
2 cores.

Run from the repository root:

    PYTHONHASHSEED=0 .venv/bin/python book/data/small_batches.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from companion import recalibrate
from companion.data import batches
from companion.experiments.common import mnist, one_blas_thread
from companion.layers import batchnorm_layers
from companion.provenance import provenance
from companion.seeding import PERTURB, derive_seed
from companion.stats import pack_correct
from companion.training import evaluate, mlp, train

CONFIG = {
    "seeds": list(range(5)),
    "batch_sizes": [2, 4, 8, 16, 64],
    "hidden": [100, 100],
    "epochs": 2,
    "base_learning_rate": 0.1,
    "base_batch_size": 64,
    "momentum": 0.9,
    "test_size": 1000,
}
COMMAND = "PYTHONHASHSEED=0 python book/data/small_batches.py"


def first_layer_statistics(model, x_train):
    """Moving against population statistics of the first BatchNorm.

    Its input is the first Dense layer's output, which no batch statistic
    touches: the population statistics are those of all training digits.
    """
    dense = model.layers[1]
    z = x_train.reshape(len(x_train), -1).astype(np.float64) @ dense.kernel
    bn = batchnorm_layers(model)[0]
    mean, std = z.mean(axis=0), z.std(axis=0)
    return {
        "variance_ratio": float(np.mean(bn.moving_variance / std**2)),
        "mean_error": float(np.mean(np.abs(bn.moving_mean - mean) / std)),
    }


def run(seed, batch_size, batch_norm):
    data = mnist(seed, CONFIG["test_size"])
    x_train, y_train, x_test, y_test = data
    model = mlp(
        CONFIG["hidden"],
        batch_norm=batch_norm,
        momentum=CONFIG["momentum"],
        seed=seed,
    )
    steps = CONFIG["epochs"] * len(x_train) // batch_size
    rate = CONFIG["base_learning_rate"] * batch_size
    rate /= CONFIG["base_batch_size"]
    history = train(
        model,
        *data,
        steps=steps,
        batch_size=batch_size,
        learning_rate=rate,
        seed=seed,
        eval_every=steps,
    )
    out = {
        "seed": seed,
        "batch_size": batch_size,
        "batch_norm": batch_norm,
        "steps": steps,
        "learning_rate": rate,
        "diverged": bool(history["diverged"]),
        "correct": {"moving": pack_correct(history["final_test_correct"])},
    }
    if batch_norm == "none" or history["diverged"]:
        return out
    out.update(first_layer_statistics(model, x_train))
    batch = evaluate(model, x_test, y_test, training=True, chunk=batch_size)
    out["correct"]["batch"] = pack_correct(batch.correct)
    stream = batches(
        x_train,
        y_train,
        batch_size,
        seed=derive_seed(seed, PERTURB),
        drop_last=True,
    )
    recalibrate(model, stream)
    out["correct"]["recalibrated"] = pack_correct(
        evaluate(model, x_test, y_test).correct
    )
    return out


def main():
    start = time.perf_counter()
    runs = []
    with one_blas_thread():
        for seed in CONFIG["seeds"]:
            for batch_size in CONFIG["batch_sizes"]:
                for batch_norm in ("before", "none"):
                    runs.append(run(seed, batch_size, batch_norm))
                    print(seed, batch_size, batch_norm, flush=True)
    result = {
        "config": CONFIG,
        "runs": runs,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "provenance": provenance(COMMAND),
    }
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} in {result['wall_time_s']} s")


if __name__ == "__main__":
    main()
