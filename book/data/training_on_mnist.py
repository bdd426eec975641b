"""Full-scale run for chapter 7: writes book/data/training_on_mnist.json next to this script.

Three placements x 5 seeds x 1,000 steps (batch 64, SGD momentum 0.9, lr 0.05), test accuracy every 25 steps,
same setup as the notebook's CI-scale run (300 steps, 3 seeds).

Run from the repository root:  TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0 python book/data/training_on_mnist.py
"""

import json
import platform
import time
from pathlib import Path

import numpy as np

from companion.tf_env import import_tensorflow

tf = import_tensorflow()
import keras

tf.config.experimental.enable_op_determinism()

from companion import tf_models
from companion.data import batches, load_mnist_subset

CONFIG = {"placements": ["conv3", "all", "none"], "seeds": [0, 1, 2, 3, 4], "steps": 1000, "eval_every": 25,
          "batch_size": 64, "learning_rate": 0.05, "momentum": 0.9, "test_size": 1000, "split_seed": 0,
          "conv1_filters": 8, "conv2_filters": 16, "dense_units": 64}


def main() -> None:
    data = load_mnist_subset(test_size=CONFIG["test_size"], seed=CONFIG["split_seed"])
    runs = []
    start_all = time.time()
    for seed in CONFIG["seeds"]:
        for placement in CONFIG["placements"]:
            keras.utils.set_random_seed(seed)
            model = tf_models.build_keras_model(bn_after=placement, seed=seed)
            model.compile(optimizer=keras.optimizers.SGD(CONFIG["learning_rate"], momentum=CONFIG["momentum"]),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            stream = batches(data.x_train, data.y_train, CONFIG["batch_size"], seed=seed, epochs=None,
                             drop_last=True)

            def test_accuracy() -> float:
                return float(np.mean(model.predict_on_batch(data.x_test).argmax(axis=1) == data.y_test))

            steps, accs, losses = [0], [test_accuracy()], []
            for step in range(1, CONFIG["steps"] + 1):
                xb, yb = next(stream)
                losses.append(float(model.train_on_batch(xb, yb)))
                if step % CONFIG["eval_every"] == 0:
                    steps.append(step)
                    accs.append(test_accuracy())
            runs.append({"placement": placement, "seed": seed, "steps": steps, "test_accuracy": accs,
                         "train_loss_per_step": [round(v, 5) for v in losses]})
            print(placement, seed, [round(a, 3) for a in accs[::8]], flush=True)
    result = {"name": "training_on_mnist", "config": CONFIG, "runs": runs,
              "wall_time_s": round(time.time() - start_all, 1),
              "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
                           "python": platform.python_version()}}
    with open(Path(__file__).with_suffix(".json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
