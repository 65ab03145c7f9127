"""Defences for heterogeneous clients: NNM, bucketing, ARC, DnC, centered clipping with a
relative radius, weak-DP noise. Each against a slow reference, under permutation, under attack,
and with bad parameters."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.robust import preaggregation as pre
from strategies.robust import rules
from strategies.robust.weak_dp import WeakDpNoise

SEEDS = st.integers(0, 2**32 - 1)


def matrix(seed, rows=11, cols=7):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Slow references: loops over rows, float64, straight from the papers
# ---------------------------------------------------------------------------------------------


def ref_nnm(x, f):
    x = x.astype(np.float64)
    n = len(x)
    out = np.empty_like(x)
    for i in range(n):
        distances = [np.linalg.norm(x[i] - x[j]) for j in range(n)]
        nearest = np.argsort(distances, kind="stable")[: n - f]
        out[i] = x[nearest].mean(axis=0)
    return out


def ref_arc(x, f):
    x = x.astype(np.float64).copy()
    n = len(x)
    k = math.floor(2 * f / n * (n - f) + 1e-9)
    order = sorted(range(n), key=lambda i: np.linalg.norm(x[i]), reverse=True)
    if k == 0:
        return x
    threshold = np.linalg.norm(x[order[k]])
    for i in order[:k]:
        norm = np.linalg.norm(x[i])
        if norm > threshold:
            x[i] *= threshold / norm
    return x


def ref_dnc(x, f, iterations, c):
    """Algorithm 2 of Shejwalkar & Houmansadr 2021 on all coordinates, with an SVD."""
    x = x.astype(np.float64)
    n = len(x)
    good = set(range(n))
    for _ in range(iterations):
        centred = x - x.mean(axis=0)
        top = np.linalg.svd(centred)[2][0]
        scores = [(centred[i] @ top) ** 2 for i in range(n)]
        good &= set(np.argsort(scores, kind="stable")[: n - math.floor(c * f + 1e-9)].tolist())
    return x[sorted(good)].mean(axis=0)


# ---------------------------------------------------------------------------------------------
# Nearest-neighbour mixing
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, f=st.integers(0, 5))
def test_nnm_matches_the_reference(seed, f):
    x = matrix(seed)
    mixed, weights, measured = pre.NearestNeighbourMixing(f)(x.copy(), np.ones(11))
    np.testing.assert_allclose(mixed, ref_nnm(x, f), rtol=1e-5, atol=1e-5)
    assert measured == {"nnm-f": f} and weights.tolist() == [1.0] * 11


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS)
def test_nnm_commutes_with_permutations(seed):
    x = matrix(seed)
    permutation = np.random.default_rng(seed).permutation(11)
    np.testing.assert_allclose(
        pre.nearest_neighbour_mixing(x[permutation], 3), pre.nearest_neighbour_mixing(x, 3)[permutation], atol=1e-5
    )


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, f=st.integers(1, 5), scale=st.floats(1e2, 1e6))
def test_nnm_gives_honest_rows_the_honest_mean_when_the_attackers_are_far(seed, f, scale):
    x = matrix(seed)
    rng = np.random.default_rng(seed + 1)
    x[:f] = rng.standard_normal((f, 7)).astype(np.float32) * np.float32(scale) + np.float32(scale)
    mixed = pre.nearest_neighbour_mixing(x, f)
    honest_mean = x[f:].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(mixed[f:], np.broadcast_to(honest_mean, mixed[f:].shape), atol=1e-4)


def test_nnm_with_f_0_is_the_mean_and_rejects_a_dishonest_majority():
    x = matrix(0, rows=4)
    mixed, _, _ = pre.NearestNeighbourMixing(0)(x, np.ones(4))
    np.testing.assert_allclose(mixed, np.broadcast_to(x.mean(axis=0), x.shape), rtol=1e-6)
    step = pre.NearestNeighbourMixing(2)
    assert "pre-aggregation-f=2 requires at least 5, got 4" in step.cannot_run(4)
    assert step.cannot_run(4, faults=1) == ""  # a rejected reply was one of the f faulty
    with pytest.raises(ValueError, match="pre-aggregation-f"):
        step(x, np.ones(4))


# ---------------------------------------------------------------------------------------------
# Bucketing
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, rows=st.integers(1, 13), size=st.integers(1, 5))
def test_bucketing_averages_buckets_of_a_random_permutation(seed, rows, size):
    x = matrix(seed, rows=rows)
    weights = np.random.default_rng(seed).uniform(1, 5, rows)
    step = pre.Bucketing(size, rng=np.random.default_rng(seed))
    means, bucket_weights, measured = step(x, weights)
    permutation = np.random.default_rng(seed).permutation(rows)  # the same draw
    buckets = [permutation[start : start + size] for start in range(0, rows, size)]
    expected = np.stack([x[b].astype(np.float64).mean(axis=0) for b in buckets])
    np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bucket_weights, [weights[b].sum() for b in buckets])
    assert len(means) == step.output_rows(rows) == measured["buckets"] == math.ceil(rows / size)


def test_bucketing_draws_a_fresh_permutation_every_round():
    x = np.arange(8, dtype=np.float32)[:, None]
    step = pre.Bucketing(2)  # CSPRNG-seeded
    draws = {tuple(step(x, np.ones(8))[0].ravel()) for _ in range(20)}
    assert len(draws) > 1


# ---------------------------------------------------------------------------------------------
# Adaptive robust clipping
# ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(seed=SEEDS, rows=st.integers(1, 12), f=st.integers(0, 5))
def test_arc_matches_the_reference(seed, rows, f):
    if rows <= 2 * f:
        f = (rows - 1) // 2
    x = matrix(seed, rows=rows) * np.random.default_rng(seed).uniform(0.1, 10, (rows, 1)).astype(np.float32)
    expected = ref_arc(x, f)
    clipped, _, measured = pre.AdaptiveRobustClipping(f)(x, np.ones(rows))
    np.testing.assert_allclose(clipped, expected, rtol=1e-5, atol=1e-6)
    assert measured["arc-clipped-replies"] == (2 * f * (rows - f)) // rows


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, f=st.integers(1, 5), scale=st.floats(1.0, 1e6))
def test_arc_leaves_no_row_longer_than_every_honest_one(seed, f, scale):
    x = matrix(seed)
    x[:f] *= np.float32(scale)  # f arbitrary, long rows
    honest_max = np.linalg.norm(x[f:].astype(np.float64), axis=1).max()
    permutation = np.random.default_rng(seed).permutation(11)
    clipped = x[permutation].copy()
    pre.adaptive_robust_clipping(clipped, f)
    assert np.linalg.norm(clipped.astype(np.float64), axis=1).max() <= honest_max * (1 + 1e-6)
    reference = x.copy()
    pre.adaptive_robust_clipping(reference, f)
    np.testing.assert_array_equal(clipped, reference[permutation])  # commutes with permutations


def test_arc_with_a_zero_threshold_zeroes_the_clipped_rows():
    x = np.zeros((5, 3), np.float32)
    x[0] = 7.0
    threshold, clipped = pre.adaptive_robust_clipping(x, 1)  # k = floor(2 * 4 / 5) = 1
    assert (threshold, clipped) == (0.0, 1) and not x.any()


# ---------------------------------------------------------------------------------------------
# Divide-and-conquer
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, f=st.integers(0, 4), iterations=st.integers(1, 3), c=st.sampled_from([0.5, 1.0, 1.5]))
def test_dnc_on_all_coordinates_matches_the_reference(seed, f, iterations, c):
    x = matrix(seed, rows=12, cols=5)
    result = rules.divide_and_conquer(x, np.ones(12), f, iterations=iterations, dimension=5, filter_fraction=c)
    np.testing.assert_allclose(result, ref_dnc(x, f, iterations, c), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, f=st.integers(1, 4), shift=st.floats(200.0, 1e4))
def test_dnc_removes_a_colluding_shift(seed, f, shift):
    """Attackers who all send the honest mean moved along one direction (as min-max and min-sum
    do) are the top singular direction: DnC removes them and returns the mean of honest rows."""
    x = matrix(seed, rows=15, cols=400)
    honest = x[f:].astype(np.float64)
    direction = np.random.default_rng(seed + 1).standard_normal(400)
    x[:f] = (honest.mean(axis=0) + shift * direction / np.linalg.norm(direction)).astype(np.float32)
    result = rules.divide_and_conquer(x, np.ones(15), f, iterations=3, dimension=100, seed=seed)
    spread = np.linalg.norm(honest - honest.mean(axis=0), axis=1).max()
    assert np.linalg.norm(result - honest.mean(axis=0)) <= spread


def test_dnc_keeps_the_rows_kept_most_often_when_no_row_is_kept_every_time():
    x = matrix(3, rows=4, cols=50)
    result = rules.divide_and_conquer(x, np.ones(4), 3, iterations=8, dimension=3, seed=1)
    assert result.shape == (50,) and np.isfinite(result).all()


# ---------------------------------------------------------------------------------------------
# Centered clipping with a radius relative to the distances
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, q=st.floats(0.05, 1.0), tau=st.floats(0.1, 3.0))
def test_centered_clipping_relative_radius_is_tau_times_the_quantile(seed, q, tau):
    x = matrix(seed)
    center = np.random.default_rng(seed).standard_normal(7).astype(np.float32)
    radius = tau * np.quantile(np.linalg.norm(x.astype(np.float64) - center, axis=1), q)
    relative = rules.centered_clipping(x, np.ones(11), tau, 3, center=center, tau_quantile=q)
    absolute = rules.centered_clipping(x, np.ones(11), radius, 3, center=center)
    np.testing.assert_allclose(relative, absolute, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=SEEDS, f=st.integers(1, 5), scale=st.floats(1.0, 1e6))
def test_centered_clipping_relative_radius_bounds_the_attackers_pull(seed, f, scale):
    """With the median distance as radius and f < n/2, r is at most the largest honest distance
    to the centre, and each iteration lets the f attackers move v by at most f r / n."""
    x = matrix(seed)
    x[:f] = np.float32(scale)
    center = np.zeros(7, np.float32)
    honest = np.linalg.norm(x[f:].astype(np.float64), axis=1).max()
    result = rules.centered_clipping(x, np.ones(11), 1.0, 1, center=center, tau_quantile=0.5)
    honest_only = np.zeros(7)
    radius = np.quantile(np.linalg.norm(x.astype(np.float64), axis=1), 0.5)
    for row in x[f:].astype(np.float64):
        honest_only += row * min(1.0, radius / max(np.linalg.norm(row), 1e-300)) / 11
    assert radius <= honest * (1 + 1e-6)
    assert np.linalg.norm(result - honest_only) <= f * radius / 11 * (1 + 1e-5) + 1e-6


def test_centered_clipping_validates_its_radius_quantile():
    x = matrix(0)
    with pytest.raises(ValueError, match=r"tau_quantile must be a number in \[0, 1\], got 1.5"):
        rules.centered_clipping(x, np.ones(11), 1.0, 1, tau_quantile=1.5)
    with pytest.raises(ValueError, match="centered-clipping-tau-quantile"):
        rules.check_rule_conditions("centered-clipping", 3, {"tau": 1.0, "iterations": 1, "tau_quantile": -0.1})


# ---------------------------------------------------------------------------------------------
# Weak-DP noise and parameter validation
# ---------------------------------------------------------------------------------------------


def test_weak_dp_noise_has_the_configured_std():
    aggregate = np.ones(200_000, np.float32)
    noised, measured = WeakDpNoise(0.025, rng=np.random.default_rng(0))(aggregate)
    assert abs(float(np.std(noised - aggregate)) - 0.025) < 1e-3 and measured == {"weak-dp-noise-std": 0.025}
    assert (aggregate == 1).all()  # the input is not modified


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: pre.NearestNeighbourMixing(-1), "pre-aggregation-f must be an integer >= 0, got -1"),
        (lambda: pre.AdaptiveRobustClipping(1.5), "pre-aggregation-f must be an integer >= 0, got 1.5"),
        (lambda: pre.Bucketing(0), "bucketing-size must be an integer >= 1, got 0"),
        (lambda: WeakDpNoise(0.0), "weak-dp-noise-std must be a positive number, got 0.0"),
        (lambda: pre.parse_pre_aggregation("nnm,foo"), "pre-aggregation must be a comma-separated list of nnm"),
        (lambda: pre.parse_pre_aggregation("nnm, nnm"), "pre-aggregation names a step twice"),
        (
            lambda: rules.check_rule_conditions("dnc", 3, {"f": 3}),
            r"floor\(dnc-filter-fraction \* dnc-f\) = floor\(1 \* 3\) = 3",
        ),
        (lambda: rules.check_rule_conditions("dnc", 5, {"f": 1, "iterations": 0}), "dnc-iterations must be"),
        (lambda: rules.check_rule_conditions("dnc", 5, {"f": 1, "dimension": 0}), "dnc-dimension must be"),
        (
            lambda: rules.check_rule_conditions("dnc", 5, {"f": 1, "filter_fraction": 0.0}),
            r"dnc-filter-fraction must be a number in \(0, inf\), got 0.0",
        ),
    ],
)
def test_parameters_are_validated_with_their_run_config_key(build, fragment):
    with pytest.raises(ValueError, match=fragment):
        build()


def test_pre_aggregation_names_in_order():
    steps = pre.build_pre_aggregation(" nnm , bucketing,arc", 2, 3)
    assert [type(step) for step in steps] == [pre.NearestNeighbourMixing, pre.Bucketing, pre.AdaptiveRobustClipping]
    assert pre.parse_pre_aggregation("") == ()
