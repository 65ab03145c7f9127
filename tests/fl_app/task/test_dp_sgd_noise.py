"""DP-SGD as the ClientApp compiles it for shuffled batches (``dp-sgd-sampling='shuffle'``): noise
of std z C / B on the mean gradient, unpredictable. (Poisson batches: ``test_dp_sgd_sampling.py``.)

The tests train through the app's own path (``node_client.compiled_model`` with a DP-SGD key,
then :class:`fl_app.task.compiled_loop.CompiledLoop`), one step of plain SGD with learning rate 1 on a
batch of ``B`` examples. Two steps from the same weights on the same batch differ only by their
noise: ``w1 - w2 = (n2 - n1) / B`` with ``n_i ~ N(0, (z C)^2 I)``, so every coordinate of the
difference has std ``sqrt(2) z C / B``.
"""

from __future__ import annotations

import numpy as np
import pytest

from fl_app.client import node_client
from fl_app.task.compiled_loop import loop_for
from fl_app.task.keras_client import reset_optimizer

Z, CLIP = 1.1, 1.0
INPUT_SHAPE = (8, 8, 1)  # digits-shaped; logreg has 64 x 10 + 10 = 650 parameters


def compiled_dp_logreg(vectorized: bool, fresh: bool = False):
    args = ("logreg", INPUT_SHAPE, 10, "sgd", 1.0, 42, 1, (Z, CLIP, 0, vectorized, "shuffle"))
    compile_ = node_client.compiled_model.__wrapped__ if fresh else node_client.compiled_model
    model, _ = compile_(*args)
    return model


def one_step(model, weights, x, y) -> np.ndarray:
    model.set_weights(weights)
    reset_optimizer(model.optimizer)
    loop_for(model).fit(x, y, epochs=1, batch_size=len(y), seed=0)
    return np.concatenate([w.ravel() for w in model.get_weights()])


def batch(size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(size)
    return rng.random((size, *INPUT_SHAPE), dtype=np.float32), rng.integers(0, 10, size).astype(np.int64)


@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("batch_size", [32, 7])
def test_noise_on_the_mean_gradient_has_std_z_clip_over_batch(vectorized, batch_size):
    model = compiled_dp_logreg(vectorized)
    weights = model.get_weights()
    x, y = batch(batch_size)
    differences = np.concatenate(
        [one_step(model, weights, x, y) - one_step(model, weights, x, y) for _ in range(8)]
    )  # 8 x 650 draws: the std estimate is within ~2% (one sigma)
    expected = np.sqrt(2.0) * Z * CLIP / batch_size
    assert np.std(differences) == pytest.approx(expected, rel=0.08)
    assert abs(np.mean(differences)) < 4 * expected / np.sqrt(differences.size)


@pytest.mark.parametrize("vectorized", [True, False])
def test_noise_is_not_reproducible_from_the_run_config(vectorized):
    """Two workers compiled from the same run config (same seed) draw different noise: the DP
    optimizer's random ops are not seeded from the public run-config seed."""
    first, second = compiled_dp_logreg(vectorized, fresh=True), compiled_dp_logreg(vectorized, fresh=True)
    weights = first.get_weights()
    x, y = batch(32)
    step_first, step_second = one_step(first, weights, x, y), one_step(second, weights, x, y)
    assert np.std(step_first - step_second) > 0.5 * np.sqrt(2.0) * Z * CLIP / 32


@pytest.mark.parametrize("vectorized", [True, False])
def test_noise_does_not_repeat_after_tensorflow_is_reseeded(vectorized):
    """``tf.random.set_seed`` (which Keras' ``set_random_seed`` calls, as the app does whenever a
    worker builds a model) re-instantiates compiled functions and so resets TensorFlow's stateful
    random kernels: noise from seeded ``tf.random.normal`` ops would then repeat step for step."""
    import tensorflow as tf

    model = compiled_dp_logreg(vectorized, fresh=True)
    weights = model.get_weights()
    x, y = batch(32)
    before = one_step(model, weights, x, y)
    tf.random.set_seed(0)
    after = one_step(model, weights, x, y)
    assert np.std(after - before) > 0.5 * np.sqrt(2.0) * Z * CLIP / 32
