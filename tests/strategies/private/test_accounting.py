"""Tests of strategies.private.accounting: epsilon equals an independent dp_accounting computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from strategies.private.accounting import (
    DpFedAvgRound,
    LocalGaussianRound,
    LocalLaplaceRound,
    PrivacyAccountant,
    adaptive_clipping_update_noise_multiplier,
    calibrate_noise_multiplier,
    dpsgd_epsilon,
    dpsgd_event,
    dpsgd_steps,
)

DELTA = 1e-5
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def independent_poisson_epsilon(q: float, z: float, rounds: int, method: str) -> float:
    """Poisson-sampled Gaussian with dp_accounting's own defaults (PLD grid 1e-4, not ours)."""
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant = rdp.RdpAccountant() if method == "rdp" else pld.PLDAccountant()
    return accountant.compose(event, rounds).get_epsilon(DELTA)


def accountant_with(spec, rounds: int) -> PrivacyAccountant:
    accountant = PrivacyAccountant()
    accountant.add_round(spec, rounds)
    return accountant


@pytest.mark.parametrize("method", ["rdp", "pld"])
@pytest.mark.parametrize("z, num_clients, m, rounds", [(1.0, 1000, 100, 50), (0.7, 200, 10, 120)])
def test_poisson_epsilon_matches_dp_accounting(method, z, num_clients, m, rounds):
    spec = DpFedAvgRound(z, num_clients, m, "poisson")
    ours = accountant_with(spec, rounds).epsilon(DELTA, method)
    expected = independent_poisson_epsilon(m / num_clients, z, rounds, method)
    assert ours == pytest.approx(expected, rel=2e-3)
    assert spec == DpFedAvgRound.poisson(z, num_clients, m / num_clients)


def test_fixed_size_epsilon_is_replace_one_without_replacement_with_half_noise_multiplier():
    # Replacing one client moves the clipped sum by up to 2C, so noise / sensitivity = z / 2.
    z, num_clients, m, rounds = 2.0, 500, 50, 40
    ours = accountant_with(DpFedAvgRound(z, num_clients, m, "fixed-size"), rounds)
    event = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, m, dp_accounting.GaussianDpEvent(z / 2))
    expected = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE).compose(event, rounds)
    assert ours.epsilon(DELTA, "rdp") == pytest.approx(expected.get_epsilon(DELTA), rel=1e-9)
    assert ours.neighboring_relation is REPLACE_ONE
    with pytest.raises(ValueError, match="fixed-size sampling"):
        ours.epsilon(DELTA, "pld")


@pytest.mark.parametrize("method", ["rdp", "pld"])
@pytest.mark.parametrize("sampling", ["poisson", "fixed-size"])
def test_full_participation_is_the_gaussian_mechanism(method, sampling):
    z, rounds = 3.0, 30
    ours = accountant_with(DpFedAvgRound(z, 20, 20, sampling), rounds).epsilon(DELTA, method)
    # fixed-size sampling is always accounted under replace-one (sensitivity 2C: z / 2)
    relation = REPLACE_ONE if sampling == "fixed-size" else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    event = dp_accounting.GaussianDpEvent(z / 2 if sampling == "fixed-size" else z)
    accountant = rdp.RdpAccountant(neighboring_relation=relation) if method == "rdp" else pld.PLDAccountant(relation)
    expected = accountant.compose(event, rounds).get_epsilon(DELTA)
    assert ours == pytest.approx(expected, rel=2e-3)


def test_a_fixed_size_run_composes_rounds_with_and_without_sampling_under_one_relation():
    accountant = accountant_with(DpFedAvgRound(1.0, 3, 3, "fixed-size"), 2)  # 3 connected, m = 5: all train
    accountant.add_round(DpFedAvgRound(1.0, 10, 5, "fixed-size"), 3)  # then 10 connected: 5 of 10
    expected = (
        rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
        .compose(dp_accounting.GaussianDpEvent(0.5), 2)
        .compose(dp_accounting.SampledWithoutReplacementDpEvent(10, 5, dp_accounting.GaussianDpEvent(0.5)), 3)
        .get_epsilon(DELTA)
    )
    assert accountant.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "spec, rounds",
    [
        (DpFedAvgRound(0.8, 1000, 100, "poisson"), 50),
        (DpFedAvgRound(1.2, 1000, 10, "poisson"), 500),
        (DpFedAvgRound(5.0, 30, 30, "poisson"), 20),
        (LocalGaussianRound(clip_norm=1.0, noise_std=10.0), 10),
        (LocalLaplaceRound(epsilon=0.5), 10),
    ],
)
def test_pld_is_no_looser_than_rdp(spec, rounds):
    accountant = accountant_with(spec, rounds)
    assert accountant.epsilon(DELTA, "pld") <= accountant.epsilon(DELTA, "rdp") * 1.001 + 1e-3


def test_zero_noise_is_infinite_epsilon():
    for method in ("rdp", "pld"):
        assert accountant_with(DpFedAvgRound(0.0, 100, 10), 1).epsilon(DELTA, method) == math.inf
    assert PrivacyAccountant().epsilon(DELTA) == 0.0


def test_local_laplace_is_pure_epsilon_per_round_and_composes():
    spec = LocalLaplaceRound(epsilon=0.3)
    assert spec.to_dp_event() == dp_accounting.LaplaceDpEvent(1 / 0.3)
    one = accountant_with(spec, 1).epsilon(1e-12, "pld")
    assert one == pytest.approx(0.3, abs=2e-3)
    ten = accountant_with(spec, 10).epsilon(DELTA, "pld")
    assert 0.3 < ten <= 3.0 + 2e-3  # never worse than basic composition


def test_local_gaussian_uses_replace_one_sensitivity_two_c():
    spec = LocalGaussianRound(clip_norm=0.5, noise_std=4.0)
    assert spec.to_dp_event() == dp_accounting.GaussianDpEvent(4.0 / (2 * 0.5))
    expected = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(4.0), 7)
    assert accountant_with(spec, 7).epsilon(DELTA) == pytest.approx(expected.get_epsilon(DELTA))


def test_state_dict_round_trip_continues_epsilon():
    first = DpFedAvgRound(1.0, 1000, 100, "poisson")
    second = DpFedAvgRound(1.3, 1000, 100, "poisson")  # e.g. noise changed mid-run
    uninterrupted = PrivacyAccountant()
    uninterrupted.add_round(first, 30)
    uninterrupted.add_round(second, 20)

    interrupted = PrivacyAccountant()
    interrupted.add_round(first, 30)
    saved = json.dumps(interrupted.state_dict())
    resumed = PrivacyAccountant.from_state_dict(json.loads(saved))
    assert resumed.rounds == 30
    assert resumed.epsilon(DELTA) == interrupted.epsilon(DELTA) > 0
    resumed.add_round(second, 20)
    for method in ("rdp", "pld"):
        assert resumed.epsilon(DELTA, method) == uninterrupted.epsilon(DELTA, method)


def test_epsilon_if_added_stops_at_last_round_within_budget():
    spec, target = DpFedAvgRound(1.0, 1000, 100, "poisson"), 3.0
    accountant = PrivacyAccountant()
    while accountant.epsilon_if_added(spec, delta=DELTA) <= target:
        accountant.add_round(spec)
    rounds = accountant.rounds
    assert accountant.epsilon(DELTA) <= target
    assert accountant.epsilon_if_added(spec, delta=DELTA) > target
    assert accountant.rounds == rounds  # asking did not compose anything
    assert independent_poisson_epsilon(0.1, 1.0, rounds, "rdp") <= target
    assert independent_poisson_epsilon(0.1, 1.0, rounds + 1, "rdp") > target


def test_thousand_rounds_are_one_compact_entry():
    spec = DpFedAvgRound(1.1, 1000, 100, "poisson")
    accountant = PrivacyAccountant()
    for _ in range(1000):
        accountant.add_round(spec)
    assert accountant.state_dict()["rounds"] == [
        {
            "spec": {
                "kind": "dp-fedavg",
                "noise_multiplier": 1.1,
                "num_clients": 1000,
                "clients_per_round": 100.0,
                "sampling": "poisson",
            },
            "count": 1000,
        }
    ]
    assert accountant.ledger == dp_accounting.ComposedDpEvent(
        [dp_accounting.SelfComposedDpEvent(spec.to_dp_event(), 1000)]
    )
    expected = independent_poisson_epsilon(0.1, 1.1, 1000, "rdp")
    assert accountant.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)


def test_mixing_neighbouring_relations_is_refused():
    accountant = accountant_with(DpFedAvgRound(1.0, 100, 10, "poisson"), 3)
    with pytest.raises(ValueError, match="REPLACE_ONE"):
        accountant.add_round(DpFedAvgRound(1.0, 100, 10, "fixed-size"))


@pytest.mark.parametrize("sampling, method", [("poisson", "rdp"), ("poisson", "pld"), ("fixed-size", "rdp")])
def test_calibrated_noise_multiplier_is_the_smallest_that_fits(sampling, method):
    target, rounds, num_clients, m = 4.0, 40, 1000, 50

    def epsilon(z: float) -> float:
        spec = DpFedAvgRound(z, num_clients, m, sampling)
        return accountant_with(spec, rounds).epsilon(DELTA, method)

    z = calibrate_noise_multiplier(
        target,
        DELTA,
        rounds,
        num_clients=num_clients,
        clients_per_round=m,
        sampling=sampling,
        method=method,
    )
    assert epsilon(z) <= target
    assert epsilon(0.98 * z) > target


def test_adaptive_clipping_noise_split_composes_to_the_total():
    z, sigma_b = 1.0, 5.0
    z_update = adaptive_clipping_update_noise_multiplier(z, sigma_b)
    assert z_update == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    assert z < z_update < 1.01  # the count costs little when sigma_b = m / 20 is large
    # Update sum (noise multiplier z_update) and centred count (sensitivity 1/2, noise sigma_b)
    # released together cost exactly one Gaussian round at the total z.
    both = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_update), dp_accounting.GaussianDpEvent(2 * sigma_b)]
    )
    split = rdp.RdpAccountant().compose(both, 10).get_epsilon(DELTA)
    total = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(z), 10).get_epsilon(DELTA)
    assert split == pytest.approx(total, rel=1e-9)
    assert adaptive_clipping_update_noise_multiplier(z, 0.0) == z
    with pytest.raises(ValueError, match="count_noise_std must be > noise_multiplier / 2"):
        adaptive_clipping_update_noise_multiplier(1.0, 0.5)


@pytest.mark.parametrize("used_microbatching", [False, True])
def test_dpsgd_epsilon_matches_tensorflow_privacy(used_microbatching):
    sys.skip_tf_privacy_import = True
    from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib as tfp_lib

    n, batch, z, epochs = 1792, 32, 1.1, 3  # n divisible by batch: both count 168 steps
    ours = dpsgd_epsilon(n, batch, z, epochs, DELTA, used_microbatching=used_microbatching)
    theirs = tfp_lib._compute_dp_sgd_example_privacy(
        epochs, z, DELTA, used_microbatching, poisson_subsampling_probability=batch / n
    )
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_pure_modules_do_not_import_tensorflow():
    code = (
        "import sys, strategies.private.accounting, strategies.private.mechanisms; "
        "sys.exit('tensorflow' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])


def test_dpsgd_counts_partial_last_batch_as_a_step():
    n, batch = 1797, 32  # 57 steps per epoch, the last one of 5 examples
    event = dp_accounting.PoissonSampledDpEvent(batch / n, dp_accounting.GaussianDpEvent(1.1))
    expected = rdp.RdpAccountant().compose(event, 2 * 57).get_epsilon(DELTA)
    assert dpsgd_epsilon(n, batch, 1.1, 2, DELTA) == pytest.approx(expected, rel=1e-12)


def test_dpsgd_steps_are_epochs_times_ceil_n_over_b():
    assert dpsgd_steps(143, 16, 10) == 10 * 9
    assert dpsgd_steps(144, 16, 1) == 9
    assert dpsgd_steps(10, 10, 3) == 3
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, num_examples = 10\], got 11"):
        dpsgd_steps(10, 11, 1)


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_shuffled_fixed_size_batches_are_accounted_without_amplification_under_replace_one(method):
    """The README recipe (n = 143, B = 16, z = 1.1, 10 epochs): Poisson sampling reports 7.06 (RDP)
    / 6.32 (PLD); shuffled batches of a public permutation are ten unamplified Gaussians of
    multiplier z / 2 (sensitivity 2C under replace-one): 42.6 / 40.3."""
    n, batch, z, epochs = 143, 16, 1.1, 10
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z / 2), epochs)
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    if method == "rdp":
        accountant = rdp.RdpAccountant(neighboring_relation=relation)
    else:
        accountant = pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=1e-3)
    expected = accountant.compose(event).get_epsilon(DELTA)
    shuffled = dpsgd_epsilon(n, batch, z, epochs, DELTA, method=method, sampling="shuffle")
    poisson = dpsgd_epsilon(n, batch, z, epochs, DELTA, method=method, sampling="poisson")
    assert shuffled == pytest.approx(expected, rel=1e-9)
    assert shuffled == pytest.approx({"rdp": 42.60, "pld": 40.30}[method], abs=0.01)
    assert poisson == pytest.approx({"rdp": 7.06, "pld": 6.32}[method], abs=0.01)
    # microbatches do not change it: the one microbatch holding the replaced example moves by <= 2C
    assert dpsgd_epsilon(n, batch, z, epochs, DELTA, method=method, sampling="shuffle", used_microbatching=True) == (
        shuffled
    )
    # a partial epoch still touches each example once
    assert dpsgd_epsilon(n, batch, z, 9.5, DELTA, method=method, sampling="shuffle") == shuffled
    assert dpsgd_event(n, batch, z, epochs, sampling="shuffle")[1] is relation


def test_dpsgd_sampling_must_be_known():
    with pytest.raises(ValueError, match="DP-SGD sampling must be one of poisson, shuffle, got 'uniform'"):
        dpsgd_epsilon(100, 10, 1.0, 1, DELTA, sampling="uniform")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(noise_multiplier=1.0, num_clients=10, clients_per_round=11), "clients_per_round"),
        (
            dict(noise_multiplier=1.0, num_clients=10, clients_per_round=2.5, sampling="fixed-size"),
            "integer for fixed-size",
        ),
        (dict(noise_multiplier=-1.0, num_clients=10, clients_per_round=2), "noise_multiplier"),
        (
            dict(noise_multiplier=1.0, num_clients=10, clients_per_round=2, sampling="shuffle"),
            "sampling must be one of",
        ),
    ],
)
def test_invalid_round_specs_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DpFedAvgRound(**kwargs)


def test_invalid_queries_are_clear_errors():
    accountant = accountant_with(DpFedAvgRound(1.0, 100, 10), 1)
    with pytest.raises(ValueError, match="delta must be in"):
        accountant.epsilon(0.0)
    with pytest.raises(ValueError, match="accounting method"):
        accountant.epsilon(DELTA, "gdp")
    with pytest.raises(ValueError, match="round spec kind"):
        PrivacyAccountant.from_state_dict({"rounds": [{"spec": {"kind": "x"}, "count": 1}]})


def released_count_sensitivity(clip_norm: float, m: int, relation) -> float:
    """Largest change of the adaptive clipping statistic the mechanism releases (``m b~``, whose
    noise std is sigma_b), measured on the mechanism itself with the noise switched off: one
    client added / removed (add/remove), or one client's bit flipped (replace-one)."""
    from strategies.private.mechanisms import AdaptiveClipState, insecure_seeded_generator

    state = AdaptiveClipState(clip_norm, count_noise_std=0.0)
    rng = insecure_seeded_generator(0)
    within, above = 0.5 * clip_norm, 2.0 * clip_norm
    worst = 0.0
    for k in range(m):  # neighbours of every data set of m (or m - 1) clients
        base = [within] * k + [above] * (m - 1 - k)
        for extra in (within, above):
            if relation is REPLACE_ONE:
                other = above if extra == within else within
                a, b = [*base, extra], [*base, other]
            else:
                a, b = [*base, extra], base
            fa = state.noised_unclipped_fraction(np.array(a), m, rng)
            fb = state.noised_unclipped_fraction(np.array(b), m, rng)
            worst = max(worst, abs(m * fa - m * fb))
    return worst


@pytest.mark.parametrize(
    ("num_clients", "sampling", "rate_or_m", "z", "rounds"),
    [
        (10, "poisson", 1.0, 0.9, 10),  # the case: reported 21.84, true 50.80 before the fix
        (100, "poisson", 0.1, 0.95, 100),  # reported 8.72, true 36.45 before the fix
        (20, "fixed-size", 10, 0.9, 10),
    ],
)
def test_adaptive_clipping_epsilon_equals_the_composition_of_update_and_count(
    num_clients, sampling, rate_or_m, z, rounds
):
    """The round releases the update (noise multiplier z_Delta on its sensitivity) and the noised
    count (std sigma_b on the sensitivity the mechanism really has, measured above): epsilon is
    recomputed from those two Gaussians under the same sampling, without our accountant."""
    from strategies.private.central_mechanism import CentralGaussianMechanism
    from strategies.private.mechanisms import insecure_seeded_generator

    kwargs = {"sampling_rate": rate_or_m} if sampling == "poisson" else {"clients_per_round": rate_or_m}
    mechanism = CentralGaussianMechanism(
        noise_multiplier=z,
        clip_norm=1.0,
        num_clients=num_clients,
        sampling=sampling,
        clip_quantile=0.5,
        delta=DELTA,
        rng=insecure_seeded_generator(1),
        **kwargs,
    )
    rng = np.random.default_rng(2)
    m = mechanism.expected_clients
    sigma_b = m / 20.0  # Andrew et al.'s default, which the mechanism uses
    assert mechanism.adaptive is not None and mechanism.adaptive.count_noise_std == sigma_b
    z_update = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert mechanism.update_noise_multiplier == pytest.approx(z_update, rel=1e-12)
    for r in range(1, rounds + 1):
        spec = mechanism.check_budget(r, num_clients)
        sampled = mechanism.sample(list(range(num_clients)))
        updates = rng.normal(size=(len(sampled), 4)).astype(np.float32)
        # the update noise really is z_Delta times the sensitivity of the mean, C / m
        assert mechanism.noise_std() == pytest.approx(z_update * mechanism.clip_norm / m, rel=1e-12)
        norms = mechanism.clip(updates)
        mechanism.release(mechanism.mean(updates), spec, norms)

    if sampling == "poisson":
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        update_z, count_z = z_update, sigma_b / released_count_sensitivity(1.0, int(m), relation)
    else:
        relation = REPLACE_ONE  # replace-one: the clipped sum moves by 2C, so z_Delta / 2
        update_z, count_z = z_update / 2, sigma_b / released_count_sensitivity(1.0, int(m), relation)
    both = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(update_z), dp_accounting.GaussianDpEvent(count_z)]
    )
    if sampling == "poisson" and rate_or_m < 1:
        event = dp_accounting.PoissonSampledDpEvent(rate_or_m, both)
    elif sampling == "fixed-size":
        event = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, rate_or_m, both)
    else:
        event = both
    independent = rdp.RdpAccountant(neighboring_relation=relation).compose(event, rounds).get_epsilon(DELTA)
    reported = mechanism.epsilons()
    # equal up to floating-point rounding (the ledger composes in another order: ~1e-15)
    assert reported["epsilon-rdp"] == pytest.approx(independent, rel=1e-12), (reported, independent)
    if sampling == "poisson":  # PLD: the two Gaussians on one sample are one Gaussian (z^-2 adds)
        merged = dp_accounting.GaussianDpEvent((update_z**-2 + count_z**-2) ** -0.5)
        if rate_or_m < 1:
            merged = dp_accounting.PoissonSampledDpEvent(rate_or_m, merged)
        pld_independent = pld.PLDAccountant().compose(merged, rounds).get_epsilon(DELTA)
        assert reported["epsilon-pld"] == pytest.approx(pld_independent, rel=2e-3)


def test_pld_refuses_noise_so_small_that_its_grid_would_not_fit_in_memory():
    from strategies.private.central_mechanism import CentralGaussianMechanism

    accountant = accountant_with(DpFedAvgRound(1e-4, 100, 50, "poisson"), 3)
    with pytest.raises(ValueError, match="PLD accounting of a Gaussian with noise multiplier 0.0001 < 0.1"):
        accountant.epsilon(DELTA, "pld")
    assert accountant.epsilon(DELTA, "rdp") > 100  # RDP has no grid: it still answers
    with pytest.raises(ValueError, match="dp-accounting='pld' needs every Gaussian's noise multiplier >= 0.1"):
        CentralGaussianMechanism(
            noise_multiplier=1e-4, clip_norm=1.0, num_clients=10, sampling_rate=0.5, accounting="pld"
        )
    mechanism = CentralGaussianMechanism(noise_multiplier=1e-4, clip_norm=1.0, num_clients=10, sampling_rate=0.5)
    mechanism.accountant.add_round(mechanism.round_spec())
    assert "epsilon-pld" not in mechanism.epsilons() and mechanism.epsilons()["epsilon"] > 100
