"""The UPDATE_OPS pitfall at three learning rates: chapter 6's lr x seed table.

Writes book/data/update_ops_pitfall.json next to this script.  For each
learning rate and seed, :func:`companion.tf_training.pitfall_run` trains
the source text's TF1 graph with and without the control dependency on
UPDATE_OPS (150 steps, batches of 32, momentum 0.9, the seed's MNIST split,
initial weights and batch order), and once more from weights moved by one
ulp (the twin that measures the noise).  Stored per run: per-image
correctness of the 1,000 test images in training mode and in inference mode
with and without the update ops (hex, companion.stats.pack_correct), and
what happened to the moving statistics.  About 3 minutes on 2 idle cores.

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0 TF_DETERMINISTIC_OPS=1 \\
        .venv/bin/python book/data/update_ops_pitfall.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from companion.tf_env import import_tensorflow

import_tensorflow(legacy_keras=True)  # the first TensorFlow import

from companion.data import load_mnist_subset  # noqa: E402
from companion.provenance import provenance  # noqa: E402
from companion.stats import pack_correct  # noqa: E402
from companion.tf_training import (  # noqa: E402
    PITFALL_BATCH,
    PITFALL_STEPS,
    pitfall_graphs,
    pitfall_run,
)

CONFIG = {
    "learning_rates": [0.01, 0.03, 0.05],
    "seeds": list(range(20)),
    "steps": PITFALL_STEPS,
    "batch_size": PITFALL_BATCH,
    "momentum": 0.9,
    "test_size": 1000,
}
COMMAND = (
    "TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0 TF_DETERMINISTIC_OPS=1 "
    "python book/data/update_ops_pitfall.py"
)


def record(run, **labels):
    return {
        **labels,
        "correct": {k: pack_correct(v) for k, v in run.correct.items()},
        "same_training": run.same_training,
        "untouched": run.untouched,
        "diverged": run.diverged,
        "max_abs_moving_mean": float(np.abs(run.moving_mean).max()),
        "max_moving_variance": float(np.max(run.moving_variance)),
    }


def main() -> None:
    start = time.time()
    info = provenance(COMMAND)
    splits = {s: load_mnist_subset(seed=s) for s in CONFIG["seeds"]}
    runs = []
    for lr in CONFIG["learning_rates"]:
        fixed, bug = pitfall_graphs(
            learning_rate=lr, momentum=CONFIG["momentum"]
        )
        for seed in CONFIG["seeds"]:
            for twin in (False, True):
                run = pitfall_run(
                    fixed, splits[seed], seed, bug=bug, perturb=twin
                )
                runs.append(
                    record(run, learning_rate=lr, seed=seed, twin=twin)
                )
                acc = {
                    k: None if v is None else round(float(v.mean()), 3)
                    for k, v in run.correct.items()
                }
                print(lr, seed, "twin" if twin else "    ", acc, flush=True)
        fixed.close()
        bug.close()
    result = {
        "name": "update_ops_pitfall",
        "config": CONFIG,
        "provenance": info,
        "wall_time_s": round(time.time() - start, 1),
        "runs": runs,
    }
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
