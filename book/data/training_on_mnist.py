"""Full-scale runs of chapter 7: writes book/data/training_on_mnist.json.

The source text's CNN in Keras 3 with batch norm after conv3 (the source
text), after every conv, or nowhere; 3 learning rates x 10 seeds x 1,000
steps of SGD with momentum 0.9 on batches of 64
(:func:`companion.tf_training.train_keras`, the code the chapter runs at
CI scale).  Each seed fixes its MNIST split (4,000 training and 1,000 test
images), its initial weights (identical for the three placements) and its
batch order.  Every 25 steps the 1,000 test images are classified in
inference mode; stored per evaluation: the accuracy and, for the runs the
claims are judged on, which images were right (hex,
companion.stats.pack_correct).  At learning rate 0.05 the runs of seeds 0-4 are
repeated from weights moved by one ulp (the twin; accuracies only): the
noise the chapter's margins must exceed.  About 20 minutes on 2 cores.

Run from the repository root:

    TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0 TF_DETERMINISTIC_OPS=1 \\
        .venv/bin/python book/data/training_on_mnist.py
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from companion.tf_env import import_tensorflow

tf = import_tensorflow()
tf.config.experimental.enable_op_determinism()

from companion.data import load_mnist_subset  # noqa: E402
from companion.provenance import provenance  # noqa: E402
from companion.stats import pack_correct  # noqa: E402
from companion.tf_training import (  # noqa: E402
    MNIST_CLAIMS,
    keras_model,
    train_keras,
)

CONFIG = {
    "placements": ["conv3", "all", "none"],
    "learning_rates": [0.01, 0.05, 0.2],
    "twin_learning_rates": [0.05],
    "twin_seeds": list(range(5)),
    "seeds": list(range(10)),
    "steps": 1000,
    "eval_every": 25,
    "batch_size": 64,
    "momentum": 0.9,
    "test_size": 1000,
}
COMMAND = (
    "TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0 TF_DETERMINISTIC_OPS=1 "
    "python book/data/training_on_mnist.py"
)


def accuracy(flags):
    return 0.1 if flags is None else round(float(flags.mean()), 4)


def main() -> None:
    start = time.time()
    info = provenance(COMMAND)
    models = {p: keras_model(p) for p in CONFIG["placements"]}
    runs = []
    for seed in CONFIG["seeds"]:
        data = load_mnist_subset(test_size=CONFIG["test_size"], seed=seed)
        for lr in CONFIG["learning_rates"]:
            twin_lr = lr in CONFIG["twin_learning_rates"]
            twins = (
                [False, True]
                if twin_lr and seed in CONFIG["twin_seeds"]
                else [False]
            )
            for twin in twins:
                for placement in CONFIG["placements"]:
                    run = train_keras(
                        data,
                        bn_after=placement,
                        seed=seed,
                        learning_rate=lr,
                        steps=CONFIG["steps"],
                        eval_every=CONFIG["eval_every"],
                        batch_size=CONFIG["batch_size"],
                        perturb=twin,
                        model=models[placement],
                    )
                    entry = {
                        "placement": placement,
                        "learning_rate": lr,
                        "seed": seed,
                        "twin": twin,
                        "steps": run.steps,
                        "test_accuracy": [accuracy(c) for c in run.correct],
                        "seconds_per_step": round(run.seconds_per_step, 4),
                    }
                    if not twin:
                        entry["correct"] = [
                            pack_correct(c) for c in run.correct
                        ]
                        entry["train_loss"] = [
                            float(f"{v:.4g}") for v in run.losses
                        ]
                    runs.append(entry)
                    print(
                        seed,
                        lr,
                        placement,
                        "twin" if twin else "    ",
                        entry["test_accuracy"][1::8],
                        f"{time.time() - start:.0f} s",
                        flush=True,
                    )
    result = {
        "name": "training_on_mnist",
        "config": CONFIG,
        "claims": {k: dataclasses.asdict(c) for k, c in MNIST_CLAIMS.items()},
        "provenance": info,
        "wall_time_s": round(time.time() - start, 1),
        "runs": runs,
    }
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(result, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
