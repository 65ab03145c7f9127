"""Tests of fl_app.task.dp_sgd: DP-SGD trains, clips per example, and reports an honest epsilon."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf  # tf.keras resolves lazily, after fl_app has set TF_USE_LEGACY_KERAS
from sklearn.datasets import load_digits

from fl_app.task.dp_sgd import dp_loss, example_level_epsilon, make_dp_optimizer


@pytest.fixture(scope="module")
def digits():
    features, labels = load_digits(return_X_y=True)
    features = (features / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(labels))
    features, labels = features[order], labels[order].astype(np.int32)
    return (features[:1400], labels[:1400]), (features[1400:], labels[1400:])


def tiny_mlp(seed: int = 0) -> tf.keras.Model:
    init = tf.keras.initializers.GlorotUniform
    return tf.keras.Sequential(
        [
            tf.keras.layers.Input(shape=(64,)),
            tf.keras.layers.Dense(32, activation="relu", kernel_initializer=init(seed)),
            tf.keras.layers.Dense(10, activation="softmax", kernel_initializer=init(seed + 1)),
        ]
    )


def flat_weights(model: tf.keras.Model) -> np.ndarray:
    return np.concatenate([w.ravel() for w in model.get_weights()]).astype(np.float64)


def test_dp_sgd_learns_digits_and_reports_the_accounted_epsilon(digits):
    (x_train, y_train), (x_test, y_test) = digits
    tf.random.set_seed(0)
    model = tiny_mlp()
    model.compile(
        optimizer=make_dp_optimizer("adam", 0.01, l2_norm_clip=1.0, noise_multiplier=1.1),
        loss=dp_loss(),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=32, epochs=5, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy > 0.6  # chance is 0.1; the noise is secret, so this varies: 0.81-0.90 in 10 runs

    epsilon = example_level_epsilon(len(x_train), 32, 1.1, 5, 1e-5)
    steps = 5 * math.ceil(len(x_train) / 32)
    q = 32 / len(x_train)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1))
    expected = dp_accounting.rdp.RdpAccountant().compose(event, steps).get_epsilon(1e-5)
    assert epsilon == pytest.approx(expected, rel=1e-12)
    assert 0 < epsilon < 10


@pytest.mark.parametrize("vectorized", [True, False])
def test_per_example_clipping_bounds_each_step(digits, vectorized):
    (x_train, y_train), _ = digits
    lr, clip = 0.5, 1e-3
    batch_x, batch_y = x_train[:32], y_train[:32]

    plain = tiny_mlp()
    plain.compile(optimizer=tf.keras.optimizers.SGD(lr), loss=dp_loss())
    start = flat_weights(plain)
    plain.train_on_batch(batch_x, batch_y)
    unclipped_step = np.linalg.norm(flat_weights(plain) - start)

    model = tiny_mlp()
    model.compile(optimizer=make_dp_optimizer("sgd", lr, clip, 0.0, vectorized=vectorized), loss=dp_loss())
    model.train_on_batch(batch_x, batch_y)
    clipped_step = np.linalg.norm(flat_weights(model) - start)

    assert unclipped_step > 100 * lr * clip  # without clipping the bound would be violated
    assert 0 < clipped_step <= lr * clip * (1 + 1e-4)


def test_microbatches_of_several_examples_are_accounted_with_double_sensitivity():
    per_example = example_level_epsilon(1024, 32, 1.0, 1, 1e-5)
    microbatched = example_level_epsilon(1024, 32, 1.0, 1, 1e-5, num_microbatches=8)
    assert example_level_epsilon(1024, 32, 1.0, 1, 1e-5, num_microbatches=32) == per_example
    assert microbatched == example_level_epsilon(1024, 32, 0.5, 1, 1e-5)
    assert microbatched > per_example


def test_bad_optimizer_settings_are_clear_errors():
    with pytest.raises(ValueError, match="optimizer must be sgd or adam"):
        make_dp_optimizer("rmsprop", 0.1, 1.0, 1.0)
    with pytest.raises(ValueError, match="l2_norm_clip must be > 0"):
        make_dp_optimizer("sgd", 0.1, 0.0, 1.0)
