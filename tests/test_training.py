"""companion.training: model builder, training loop, evaluation, progress
bars."""

from __future__ import annotations

import numpy as np
import pytest

from companion.layers import BatchNorm
from companion.nn import Dense, Flatten, ReLU, Sigmoid
from companion.training import accuracy, mlp, progress, train


def toy_data(seed=0, n=600):
    """Two well-separated Gaussian blobs per class in 6-D (3 classes):
    learnable in a few steps."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(3, 6))
    y = rng.integers(0, 3, size=n)
    x = centres[y] + rng.normal(size=(n, 6))
    return x[:400], y[:400], x[400:], y[400:]


@pytest.mark.parametrize(
    ("batch_norm", "kinds"),
    [
        ("none", [Flatten, Dense, ReLU, Dense, ReLU, Dense]),
        (
            "before",
            [Flatten, Dense, BatchNorm, ReLU, Dense, BatchNorm, ReLU, Dense],
        ),
        (
            "after",
            [Flatten, Dense, ReLU, BatchNorm, Dense, ReLU, BatchNorm, Dense],
        ),
    ],
)
def test_mlp_places_batch_norm(batch_norm, kinds):
    model = mlp([5, 4], classes=3, batch_norm=batch_norm)
    assert [type(layer) for layer in model] == kinds
    dense = [layer for layer in model if isinstance(layer, Dense)]
    assert [d.use_bias for d in dense] == [batch_norm != "before"] * 2 + [True]
    assert isinstance(mlp([3], activation="sigmoid").layers[2], Sigmoid)


def test_mlp_rejects_unknown_options():
    with pytest.raises(
        ValueError,
        match=r"activation must be one of \['relu', 'sigmoid'\]; "
        r"received 'tanh'",
    ):
        mlp([3], activation="tanh")
    with pytest.raises(
        ValueError,
        match=r"batch_norm must be one of \['none', 'before', 'after'\]; "
        r"received 'middle'",
    ):
        mlp([3], batch_norm="middle")
    with pytest.raises(
        ValueError,
        match=r"hidden width=0 is out of range; expected an int >= 1",
    ):
        mlp([0])


@pytest.mark.parametrize("batch_norm", ["none", "before"])
def test_training_learns_and_is_deterministic(batch_norm):
    data = toy_data()
    runs = [
        train(
            mlp([16], classes=3, batch_norm=batch_norm, seed=1),
            *data,
            steps=60,
            batch_size=20,
            learning_rate=0.1,
            momentum=0.9,
            seed=2,
            eval_every=20,
        )
        for _ in range(2)
    ]
    first, second = runs
    np.testing.assert_array_equal(
        first.pop("final_test_correct"), second.pop("final_test_correct")
    )
    assert first == second  # same seeds, same numbers, bit for bit
    assert first["steps"] == [0, 20, 40, 60] and len(first["losses"]) == 60
    assert not first["diverged"]
    assert first["final_test_accuracy"] > 0.9 > first["test_accuracy"][0]
    assert (
        np.isnan(first["train_loss"][0])
        and first["train_loss"][-1] < first["losses"][0]
    )


def test_divergence_is_detected_and_stops_training():
    data = toy_data()
    history = train(
        mlp([16], classes=3, seed=1),
        *data,
        steps=200,
        learning_rate=1e4,
        eval_every=50,
    )
    assert history["diverged"] and np.isnan(history["final_test_accuracy"])
    assert len(history["losses"]) < 200


def test_on_step_sees_every_update():
    data = toy_data()
    seen = []
    train(
        mlp([4], classes=3),
        *data,
        steps=5,
        eval_every=5,
        on_step=lambda step, model: seen.append(step),
    )
    assert seen == [1, 2, 3, 4, 5]


def test_accuracy_in_training_mode_leaves_moving_statistics_alone():
    x, y, _, _ = toy_data()
    model = mlp([8], classes=3, batch_norm="before")
    model(x, training=True)
    bn = model.layers[2]
    before = (bn.moving_mean.copy(), bn.moving_variance.copy())
    batch_stats = accuracy(model, x, y, training=True, chunk=100)
    np.testing.assert_array_equal(bn.moving_mean, before[0])
    np.testing.assert_array_equal(bn.moving_variance, before[1])
    assert 0.0 <= batch_stats <= 1.0
    assert accuracy(model, x, y) == np.mean(model(x).argmax(axis=1) == y)


def test_progress_bar_only_when_enabled(monkeypatch, capsys):
    monkeypatch.setenv("COMPANION_NO_PROGRESS", "1")
    assert list(progress(range(3), total=3)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("COMPANION_NO_PROGRESS")
    assert list(progress(range(3), total=3, desc="steps")) == [0, 1, 2]
    assert "steps" in capsys.readouterr().err
