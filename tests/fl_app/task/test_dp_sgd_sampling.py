"""DP-SGD's Poisson batches (``dp-sgd-sampling='poisson'``, the default): secret, variable in size,
as many steps as the accountant composes, and normalised by the expected batch size.

The noise tests take one step of plain SGD with learning rate 1 from the same weights on the same
examples, twice: the two results differ only by their noise, ``w1 - w2 = (n2 - n1) / D`` with
``n_i ~ N(0, (z C)^2 I)`` on the summed clipped gradient and ``D`` the divisor, so every coordinate
of the difference has std ``sqrt(2) z C / D``.
"""

from __future__ import annotations

import numpy as np
import pytest

from fl_app.client import node_client
from fl_app.config.settings import Settings
from fl_app.simulation.local_grid import LocalGrid
from fl_app.task.compiled_loop import loop_for
from fl_app.task.keras_client import KerasClient, reset_optimizer
from strategies.private.accounting import dpsgd_steps

Z, CLIP = 1.1, 1.0
INPUT_SHAPE = (8, 8, 1)  # digits-shaped; logreg has 64 x 10 + 10 = 650 parameters


def compiled_dp_logreg(sampling: str, noise: float = Z, fresh: bool = True):
    args = ("logreg", INPUT_SHAPE, 10, "sgd", 1.0, 42, 1, (noise, CLIP, 0, True, sampling))
    compile_ = node_client.compiled_model.__wrapped__ if fresh else node_client.compiled_model
    model, _ = compile_(*args)
    return model


def examples(size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(size)
    return rng.random((size, *INPUT_SHAPE), dtype=np.float32), rng.integers(0, 10, size).astype(np.int64)


def step_on(model, weights, x, y, batch: np.ndarray) -> np.ndarray:
    """One step on exactly ``batch`` (indices into x), from ``weights``; the new weights, flat."""
    model.set_weights(weights)
    reset_optimizer(model.optimizer)
    loop_for(model).fit(x, y, epochs=1, batch_size=len(y), seed=0, epoch_batches=lambda n, b: [batch])
    return np.concatenate([w.ravel() for w in model.get_weights()])


def test_poisson_batches_vary_in_size_around_q_n_and_count_the_accounted_steps():
    model = compiled_dp_logreg("poisson")
    n, batch_size = 144, 16
    epochs = [model.optimizer.poisson_batches(n, batch_size) for _ in range(300)]
    assert {len(batches) for batches in epochs} == {dpsgd_steps(n, batch_size, 1)}  # ceil(144 / 16) = 9
    sizes = np.array([len(b) for batches in epochs for b in batches])
    # Binomial(144, 1/9): mean 16, std 3.77; the mean of 2,700 sizes has std 0.07
    assert sizes.mean() == pytest.approx(16.0, abs=0.4)
    assert 3.2 < sizes.std() < 4.4
    members = np.concatenate([b for batches in epochs for b in batches])
    assert members.min() >= 0 and members.max() < n
    assert all(len(np.unique(b)) == len(b) for batches in epochs for b in batches)
    # each example in each step with probability q = 1/9, independently of the others
    assert np.bincount(members, minlength=n).mean() / 2700 == pytest.approx(1 / 9, rel=0.03)
    assert float(model.optimizer.dp_sampler.expected_batch_size.numpy()) == batch_size
    # a batch size above n samples everything: q = 1, one step per epoch, divisor n
    assert [len(b) for b in model.optimizer.poisson_batches(10, 16)] == [10]
    assert float(model.optimizer.dp_sampler.expected_batch_size.numpy()) == 10


def clients_of(run_config: dict, count: int = 2) -> list[KerasClient]:
    """``count`` clients of partition 0 as separate workers would build them from ``run_config``
    (the compiled model's cache cleared in between, as in a new process)."""
    context = LocalGrid(Settings.from_run_config(run_config).to_run_config(), 3).contexts[1]
    clients = []
    for _ in range(count):
        node_client.compiled_model.cache_clear()
        clients.append(node_client.make_client(context))
    node_client.compiled_model.cache_clear()
    return clients


def test_the_client_s_batches_are_not_reproducible_from_the_run_config():
    """Two workers of one run config (same public seed, same partition) draw different batches;
    with ``shuffle`` the seeded permutation is what they use, and it is the same."""
    config = {"num-partitions": 3, "partitioner": "iid", "dp-sgd-noise-multiplier": Z, "batch-size": 16}
    first, second = clients_of(config)
    n = len(first.data.y_train)
    assert first.epoch_batches is not None and second.epoch_batches is not None
    draws = [first.epoch_batches(n, 16), second.epoch_batches(n, 16)]
    assert [b.tolist() for b in draws[0]] != [b.tolist() for b in draws[1]]
    shuffled = clients_of({**config, "dp-sgd-sampling": "shuffle"})
    assert all(client.epoch_batches is None for client in shuffled)


def test_a_fit_runs_as_many_steps_as_the_accountant_composes():
    (client,) = clients_of(
        {"num-partitions": 3, "partitioner": "iid", "dp-sgd-noise-multiplier": Z, "batch-size": 16, "local-epochs": 3},
        count=1,
    )
    client.fit(client.get_parameters({}), {"server-round": 1})
    n = len(client.data.y_train)
    assert int(client.model.optimizer.iterations.numpy()) == dpsgd_steps(n, 16, 3) == 3 * -(-n // 16)


def test_noise_on_the_summed_gradient_has_std_z_clip_before_dividing_by_the_expected_batch_size():
    """A realised batch of 7 examples where 16 are expected: the noise is N(0, (z C)^2) on the sum,
    divided by 16 (not 7); an empty batch releases that noise alone."""
    model = compiled_dp_logreg("poisson")
    x, y = examples(64)
    model.optimizer.poisson_batches(64, 16)  # sets the divisor to the expected size q n = 16
    weights = model.get_weights()
    for batch in (np.arange(7, dtype=np.int32), np.zeros(0, np.int32)):
        differences = np.concatenate(
            [step_on(model, weights, x, y, batch) - step_on(model, weights, x, y, batch) for _ in range(8)]
        )  # 8 x 650 draws: the std estimate is within ~2% (one sigma)
        expected = np.sqrt(2.0) * Z * CLIP / 16
        assert np.std(differences) == pytest.approx(expected, rel=0.08)
        assert abs(np.mean(differences)) < 4 * expected / np.sqrt(differences.size)


def test_the_clipped_sum_is_divided_by_the_expected_batch_size():
    """Without noise, a Poisson step on 7 examples is the clipped sum / 16, that is 7 / 16 of the
    step that divides by the realised size (shuffle, TF Privacy's own); an empty batch does not move."""
    poisson, shuffle = compiled_dp_logreg("poisson", noise=0.0), compiled_dp_logreg("shuffle", noise=0.0)
    x, y = examples(64)
    poisson.optimizer.poisson_batches(64, 16)
    weights = poisson.get_weights()
    start = np.concatenate([w.ravel() for w in weights])
    batch = np.arange(7, dtype=np.int32)
    by_expected = step_on(poisson, weights, x, y, batch) - start
    by_realised = step_on(shuffle, weights, x, y, batch) - start
    assert np.linalg.norm(by_realised) > 0
    np.testing.assert_allclose(by_expected, by_realised * 7 / 16, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(step_on(poisson, weights, x, y, np.zeros(0, np.int32)), start)


def test_a_poisson_optimizer_refuses_to_step_before_its_sampler_set_the_divisor():
    import tensorflow as tf

    model = compiled_dp_logreg("poisson")
    x, y = examples(8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="poisson_batches sets the expected batch size"):
        step_on(model, model.get_weights(), x, y, np.arange(8, dtype=np.int32))
    shuffle = compiled_dp_logreg("shuffle")
    with pytest.raises(ValueError, match="needs an optimizer built with sampling='poisson', not 'shuffle'"):
        shuffle.optimizer.poisson_batches(8, 4)
