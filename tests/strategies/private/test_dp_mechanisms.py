"""The DP mechanisms: the one clip, the central Gaussian mechanism, noise scales, secure randomness."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from strategies.core.clipping import clip_rows, row_norms
from strategies.core.errors import PrivacyBudgetExhausted
from strategies.private.central_mechanism import CentralGaussianMechanism, fixed_size_sample, poisson_sample
from strategies.private.mechanisms import (
    AdaptiveClipState,
    clip_l1,
    gaussian_noise,
    insecure_seeded_generator,
    laplace_noise,
    local_dp_gaussian,
    local_dp_laplace,
    secure_generator,
)


@st.composite
def update_matrices(draw):
    """K x P float32 matrices whose rows span many orders of magnitude (some under C, some over)."""
    k = draw(st.integers(1, 6))
    p = draw(st.integers(1, 40))
    base = draw(hnp.arrays(np.float32, (k, p), elements=st.floats(-1, 1, width=32, allow_subnormal=False)))
    row_scale = draw(hnp.arrays(np.float32, (k, 1), elements=st.sampled_from([0.0, 1e-3, 0.1, 1.0, 10.0, 1e3])))
    return base * row_scale


def reference_clip(updates: np.ndarray, clip_norm: float) -> np.ndarray:
    """Slow, obvious reference: one row at a time, in float64."""
    out = updates.astype(np.float64)
    for i, row in enumerate(out):
        norm = np.sqrt(np.sum(row * row))
        if norm > clip_norm:
            out[i] = row * (clip_norm / norm)
    return out


def central(z: float, clip: float, m: int, rng=None, **kwargs) -> CentralGaussianMechanism:
    """The central mechanism with fixed-size sampling of ``m`` of ``kwargs.get('num_clients', m)``."""
    kwargs.setdefault("num_clients", m)
    return CentralGaussianMechanism(
        noise_multiplier=z,
        clip_norm=clip,
        sampling="fixed-size",
        clients_per_round=m,
        rng=rng or secure_generator(),
        **kwargs,
    )


def release_mean(mechanism: CentralGaussianMechanism, updates: np.ndarray, server_round: int = 1) -> np.ndarray:
    """One round of the mechanism on ``updates`` (left untouched): clip, fixed-denominator mean, noise."""
    spec = mechanism.check_budget(server_round)
    rows = updates.copy()
    norms = mechanism.clip(rows)
    return mechanism.release(mechanism.mean(rows), spec, norms)


@settings(max_examples=60, deadline=None)
@given(updates=update_matrices(), clip_norm=st.floats(1e-3, 1e3))
def test_clipped_rows_are_within_clip_norm_and_small_rows_unchanged(updates, clip_norm):
    clipped = updates.copy()
    address = clipped.__array_interface__["data"][0]
    norms = clip_rows(clipped, clip_norm)
    assert clipped.__array_interface__["data"][0] == address  # in place, on the caller's buffer
    exact_norms = np.linalg.norm(updates.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, exact_norms, rtol=1e-12)
    assert clipped.dtype == np.float32
    assert np.all(np.linalg.norm(clipped.astype(np.float64), axis=1) <= clip_norm)
    small = exact_norms <= clip_norm
    np.testing.assert_array_equal(clipped[small], updates[small])
    np.testing.assert_allclose(clipped, reference_clip(updates, clip_norm), rtol=1e-6, atol=1e-30)


def test_row_norms_are_exact_for_a_million_parameters():
    rng = insecure_seeded_generator(0)
    updates = rng.standard_normal((3, 1_000_000), dtype=np.float32) + np.float32(0.01)
    exact = np.sqrt(np.sum(updates.astype(np.float64) ** 2, axis=1))
    np.testing.assert_allclose(row_norms(updates), exact, rtol=1e-12)


def test_clip_refuses_non_finite_rows_and_wrong_dtype():
    updates = np.ones((3, 4), dtype=np.float32)
    updates[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"rows \[1\] are not finite"):
        clip_rows(updates, 1.0)
    with pytest.raises(ValueError, match="float32"):
        clip_rows(np.ones((2, 2)), 1.0)
    with pytest.raises(ValueError, match="max_norm must be a positive number"):
        clip_rows(np.ones((2, 2), dtype=np.float32), 0.0)


def test_a_single_vector_is_clipped_as_a_1_by_p_matrix_and_keeps_direction():
    vector = np.array([3.0, 4.0], dtype=np.float32)
    norms = clip_rows(vector[None, :], 1.0)
    assert norms.tolist() == [5.0]
    np.testing.assert_allclose(vector, [0.6, 0.8], rtol=1e-6)


def test_central_mechanism_without_noise_and_with_a_huge_clip_is_the_mean():
    updates = insecure_seeded_generator(1).standard_normal((9, 1000), dtype=np.float32)
    result = release_mean(central(0.0, 1e9, 9), updates)
    assert result.dtype == np.float32 and result.shape == (1000,)
    exact_mean = updates.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(result, exact_mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result, updates.mean(axis=0), rtol=1e-6, atol=1e-7)


def test_central_mechanism_clips_each_row_and_divides_by_expected_clients():
    updates = insecure_seeded_generator(2).standard_normal((5, 50), dtype=np.float32) * 3
    mechanism = central(0.0, 0.5, 8)
    assert mechanism.expected_clients == 8.0
    result = release_mean(mechanism, updates)
    expected = reference_clip(updates, 0.5).sum(axis=0) / 8.0
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-7)
    assert updates.max() > 1  # input untouched


def test_central_mechanism_noise_std_is_z_times_the_sensitivity():
    z, clip, m = 1.3, 0.7, 6
    mechanism = central(z, clip, m)
    assert mechanism.sensitivity == pytest.approx(clip / m)  # the mean with a fixed denominator
    assert mechanism.noise_std() == pytest.approx(z * clip / m)
    updates = np.zeros((4, 100_000), dtype=np.float32)
    draws = np.stack([release_mean(mechanism, updates, r) for r in range(1, 4)])
    assert draws.std() == pytest.approx(z * clip / m, rel=0.05)
    assert abs(draws.mean()) < 0.01 * z * clip / m
    assert not np.array_equal(draws[0], draws[1])
    assert mechanism.accountant.rounds == 3
    ball = central(z, clip, m, mean=False)  # any other rule, output clipped to the ball of radius C
    assert ball.sensitivity == pytest.approx(2 * clip) and ball.noise_std() == pytest.approx(2 * z * clip)


def test_central_mechanism_stops_before_the_budget_and_resumes_from_its_state():
    updates = np.ones((5, 10), dtype=np.float32)
    probe = central(1.0, 1.0, 5, num_clients=20)
    for server_round in (1, 2, 3):
        release_mean(probe, updates, server_round)
    target = probe.epsilons()["epsilon"] * (1 + 1e-9)  # rounds 1..3 fit, round 4 would not
    mechanism = central(1.0, 1.0, 5, num_clients=20, target_epsilon=target, rng=insecure_seeded_generator(3))
    rounds = 0
    with pytest.raises(PrivacyBudgetExhausted, match="would take epsilon"):
        while True:
            release_mean(mechanism, updates, rounds + 1)
            rounds += 1
    assert rounds == mechanism.accountant.rounds == 3
    assert mechanism.epsilons()["epsilon"] <= target
    assert "round 4 would take epsilon" in mechanism.stop_reason and "dp-target-epsilon" in mechanism.stop_reason
    resumed = central(1.0, 1.0, 5, num_clients=20, target_epsilon=target)
    resumed.load_state_dict(mechanism.state_dict())
    assert resumed.epsilons() == mechanism.epsilons()
    with pytest.raises(PrivacyBudgetExhausted):
        resumed.check_budget(rounds + 1)


def test_sampling_fixed_size_and_poisson():
    rng = insecure_seeded_generator(4)
    items = list(range(100, 150))
    chosen = fixed_size_sample(items, 7, rng)
    assert len(chosen) == len(set(chosen)) == 7 and chosen == sorted(chosen) and set(chosen) <= set(items)
    assert fixed_size_sample(items[:3], 7, rng) == items[:3]
    sizes = [len(poisson_sample(items, 0.2, rng)) for _ in range(400)]
    assert np.mean(sizes) == pytest.approx(10, rel=0.05) and len(set(sizes)) > 5


def test_noise_samplers():
    rng = secure_generator()
    gauss = gaussian_noise((400, 500), 2.0, rng)
    lap = laplace_noise(200_000, 3.0, rng)
    assert gauss.dtype == lap.dtype == np.float32
    assert gauss.std() == pytest.approx(2.0, rel=0.02)
    assert np.mean(np.abs(lap)) == pytest.approx(3.0, rel=0.02)  # E|X| = b for Laplace(0, b)
    np.testing.assert_array_equal(gaussian_noise(5, 0.0, rng), np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="noise std must be a finite number >= 0"):
        gaussian_noise(5, -1.0, rng)


def test_secure_generators_are_independent_and_leave_numpy_global_state_alone():
    before = np.random.get_state()
    a, b = secure_generator(), secure_generator()
    assert not np.array_equal(a.standard_normal(16), b.standard_normal(16))
    updates = np.ones((3, 8), dtype=np.float32)
    release_mean(central(1.0, 1.0, 3, rng=a), updates)
    local_dp_gaussian(updates[0], 1.0, 1.0, a)
    local_dp_laplace(updates[0], 1.0, 1.0, a)
    AdaptiveClipState(1.0, count_noise_std=1.0).update(np.ones(3), 3, a)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    seeded = insecure_seeded_generator(7), insecure_seeded_generator(7)
    assert np.array_equal(seeded[0].standard_normal(4), seeded[1].standard_normal(4))


def test_adaptive_clip_step_follows_the_formula():
    state = AdaptiveClipState(clip_norm=2.0, target_quantile=0.5, learning_rate=0.2)
    norms = np.array([1.0, 1.5, 3.0, 4.0, 5.0])  # 2 of 5 within C = 2
    new = state.update(norms, expected_clients=5, rng=secure_generator())
    assert new == state.clip_norm == pytest.approx(2.0 * np.exp(-0.2 * (2 / 5 - 0.5)))


def test_adaptive_clip_converges_to_the_target_quantile():
    rng = insecure_seeded_generator(3)
    state = AdaptiveClipState(clip_norm=0.01, target_quantile=0.7, learning_rate=0.2, count_noise_std=2.0)
    for _ in range(400):
        state.update(rng.lognormal(0.0, 0.5, size=100), 100, rng)
    true_quantile = float(np.exp(0.5 * 0.5244))  # 0.7 quantile of lognormal(0, 0.5)
    assert state.clip_norm == pytest.approx(true_quantile, rel=0.1)


def test_adaptive_clip_state_dict_round_trip_and_validation():
    state = AdaptiveClipState(1.5, 0.6, 0.1, 4.0)
    restored = AdaptiveClipState(9.0)
    restored.load_state_dict(state.state_dict())
    assert restored == state
    with pytest.raises(ValueError, match="target_quantile must be in"):
        AdaptiveClipState(1.0, target_quantile=1.5)
    with pytest.raises(ValueError, match="clip_norm"):
        AdaptiveClipState(-1.0)


def test_local_dp_laplace_clips_in_l1_and_uses_scale_2c_over_epsilon():
    update = np.full(10, 5.0, dtype=np.float32)
    assert np.abs(clip_l1(update, 2.0)).sum() == pytest.approx(2.0, rel=1e-6)
    np.testing.assert_array_equal(clip_l1(update[:1] * 0.1, 2.0), update[:1] * 0.1)
    clip, epsilon = 2.0, 0.5
    zeros = np.zeros(200_000, dtype=np.float32)
    noised = local_dp_laplace(zeros, clip, epsilon, secure_generator())
    assert np.mean(np.abs(noised)) == pytest.approx(2 * clip / epsilon, rel=0.02)


def test_local_dp_gaussian_clips_in_l2_then_adds_noise():
    update = np.full(100_000, 1.0, dtype=np.float32)
    noised = local_dp_gaussian(update, 3.0, 0.5, secure_generator())
    clipped_value = 3.0 / np.sqrt(100_000)
    assert noised.mean() == pytest.approx(clipped_value, abs=0.01)
    assert noised.std() == pytest.approx(0.5, rel=0.02)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000), st.floats(1e-3, 1e3), st.floats(-6, 6), st.integers(0, 2**31))
def test_l1_clipped_vectors_never_exceed_c_in_float64(p, clip, log_scale, seed):
    vector = (np.random.default_rng(seed).standard_normal(p) * 10.0**log_scale).astype(np.float32)
    clipped = clip_l1(vector, clip)
    assert float(np.sum(np.abs(clipped), dtype=np.float64)) <= clip
