"""DP over SecAgg+'s quantised sum: client noise shares, sensitivity with quantisation, the clamp
bound, and accounting with dropouts recomputed independently with dp_accounting."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from strategies.private import secure_sum
from strategies.private.mechanisms import insecure_seeded_generator
from strategies.private.secure_sum import (
    SecureSumMechanism,
    clamp_probability,
    client_noise_share,
    client_noise_std,
    discrete_gaussian,
    distributed_noise_multiplier,
    quantisation_step,
    quantised_sensitivity,
)

R, L = 8.0, 2**22  # SecAgg+'s defaults
H = 2 * R / L


def mechanism(placement: str, *, params: int = 1000, z: float = 1.0, clip: float = 0.5, **kwargs) -> SecureSumMechanism:
    return SecureSumMechanism(
        num_params=params,
        clipping_range=kwargs.pop("clipping_range", R),
        quantization_range=kwargs.pop("quantization_range", L),
        placement=placement,
        noise_multiplier=z,
        clip_norm=clip,
        num_clients=kwargs.pop("num_clients", 10),
        clients_per_round=kwargs.pop("clients_per_round", 5),
        rng=insecure_seeded_generator(0),
        **kwargs,
    )


def independent_epsilon(events: list[tuple[int, int, float]], delta: float = 1e-5) -> float:
    """RDP of rounds (N, m, z_eff) composed by dp_accounting directly (replace-one)."""
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for population, m, z in events:
        inner = dp_accounting.GaussianDpEvent(z)
        accountant.compose(
            inner if m == population else dp_accounting.SampledWithoutReplacementDpEvent(population, m, inner)
        )
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("sigma", [0.6, 3.0, 40.0, 2.5e4])
def test_discrete_gaussian_has_mean_zero_and_variance_sigma_squared(sigma):
    draws = discrete_gaussian(200_000, sigma, insecure_seeded_generator(1))
    assert draws.dtype == np.int64
    # the exact variance of N_Z(0, sigma^2) (below sigma^2 for small sigma, Canonne et al. 2020)
    support = np.arange(-int(12 * sigma) - 2, int(12 * sigma) + 3, dtype=np.float64)
    mass = np.exp(-(support**2) / (2 * sigma**2))
    variance = float(np.sum(support**2 * mass) / np.sum(mass))
    assert variance == pytest.approx(sigma**2, rel=0.05)
    assert draws.var() == pytest.approx(variance, rel=0.02)
    assert abs(draws.mean()) < 5 * sigma / math.sqrt(draws.size)


def test_client_share_is_on_secagg_grid_quantised_exactly_and_sums_with_the_noise_variance():
    rng = insecure_seeded_generator(2)
    clip, m_min, z, clients = 0.5, 4, 1.0, 6
    s = client_noise_std(z, clip, R, L, m_min)
    assert s == pytest.approx(z * clip / (H * math.sqrt(m_min)))
    updates = [rng.normal(size=5000) for _ in range(clients)]
    updates = [u * clip / np.linalg.norm(u) for u in updates]
    shares = [client_noise_share(u, clipping_range=R, quantization_range=L, local_std=s, rng=rng) for u in updates]
    for share in shares:
        units = share / H
        assert np.array_equal(units, np.round(units))  # on the grid
        # SecAgg+'s stochastic quantisation of a grid value is exact: v + L/2, whatever its coins
        (quantised,) = quantize([share], R, L)
        assert np.array_equal(quantised, units.astype(np.int64) + L // 2)
    # the sum the server unmasks (SecAgg+'s dequantisation of the integer sum) = sum of updates + noise
    total = np.sum([quantize([share], R, L)[0].astype(np.int64) for share in shares], axis=0)
    (unmasked,) = dequantize([total], R, L)
    unmasked = unmasked - (clients - 1) * R
    noise = unmasked - np.sum(updates, axis=0)
    assert noise.std() == pytest.approx(math.sqrt(clients / m_min) * z * clip, rel=0.03)


def test_distributed_client_share_draws_from_the_secure_generator(monkeypatch):
    from fl_app.config.settings import Settings
    from fl_app.secagg import client as secure_client
    from strategies.private import mechanisms

    calls = []

    def spy():
        calls.append(1)
        return insecure_seeded_generator(3)

    monkeypatch.setattr(mechanisms, "secure_generator", spy)
    settings = Settings.parse(
        {"strategy": "dp-fedavg", "secure-aggregation": True, "secagg-dp": "distributed", "num-partitions": 5}
    )
    global_weights = [np.zeros((3, 4), np.float32), np.zeros(4, np.float32)]
    weights = [np.full((3, 4), 2.0, np.float32), np.ones(4, np.float32)]
    share = secure_client.distributed_noise_share(settings, global_weights, weights, {"dp-clip-norm": 1.0})
    assert calls == [1]
    assert [a.shape for a in share] == [(3, 4), (4,)] and all(a.dtype == np.float64 for a in share)


def test_quantisation_sensitivity_bounds_two_coupled_roundings():
    """floor(x/h + U) and floor(x'/h + U) with the same U differ by less than ||x - x'|| + sqrt(P) h."""
    rng = insecure_seeded_generator(4)
    clip, params, r, levels = 0.5, 400, 1.0, 2**10
    h = quantisation_step(r, levels)
    bound = quantised_sensitivity(clip, params, r, levels)
    assert bound == 2 * clip + math.sqrt(params) * h
    worst = 0.0
    for _ in range(200):
        x = rng.normal(size=params)
        x *= clip / np.linalg.norm(x)
        y = -x  # the farthest pair: ||x - y|| = 2C, and rounding can add up to a step per value
        coins = rng.random(params)
        diff = (np.floor(x / h + coins) - np.floor(y / h + coins)) * h
        worst = max(worst, float(np.linalg.norm(diff)))
    assert 2 * clip < worst <= bound


@pytest.mark.parametrize("placement", ["central", "distributed"])
def test_both_modes_account_the_quantisation_term(placement):
    params = 17226
    mech = mechanism(placement, params=params)
    delta = 2 * 0.5 + math.sqrt(params) * H
    assert mech.sensitivity_with_quantisation == pytest.approx(delta, rel=1e-15)
    # zC / Delta: the central noise, or m_min = m survivors' discrete Gaussians (tau underflows to 0 here)
    assert mech.effective_noise_multiplier() == pytest.approx(0.5 / delta, rel=1e-12)
    spec = mech.check_budget(1, 10)
    assert spec.to_dp_event() == dp_accounting.SampledWithoutReplacementDpEvent(
        10, 5, dp_accounting.GaussianDpEvent(pytest.approx(0.5 / delta, rel=1e-12))
    )


def test_tau_term_counts_when_the_client_noise_is_a_few_grid_steps():
    """Prop. 14: eps = Delta_2 / (sqrt(k) s) + sqrt(P) tau; with s of a grid step tau is not negligible."""
    clip, params, r, levels, s, k = 0.01, 10, 1.0, 2**8, 0.6, 3
    tau = 10 * sum(math.exp(-2 * math.pi**2 * s**2 * j / (j + 1)) for j in (1, 2))
    delta_2 = quantised_sensitivity(clip, params, r, levels) / quantisation_step(r, levels)
    expected = 1 / (delta_2 / (math.sqrt(k) * s) + math.sqrt(params) * tau)
    assert distributed_noise_multiplier(clip, params, r, levels, s, k) == pytest.approx(expected, rel=1e-12)
    assert tau > 1e-3
    with pytest.raises(ValueError, match="std >= 1/2"):
        distributed_noise_multiplier(clip, params, r, levels, 0.4, k)


def test_dropouts_are_accounted_with_the_survivors_noise_and_more_dropouts_cost_more():
    histories = {}
    for dropped in (0, 1, 2):
        # m of N = 7 without replacement; 2 rounds, the second with `dropped` dropouts
        mech = mechanism("distributed", params=17226, num_clients=7)
        events = []
        for server_round in (1, 2):
            mech.check_budget(server_round, 7)
            k = 5 - (dropped if server_round == 2 else 0)
            spec = mech.round_spec(7, survivors=k)
            mech.release(np.zeros(17226, np.float32), spec)
            mech.account_survivors(k)
            z_eff = math.sqrt(k) * client_noise_std(1.0, 0.5, R, L, 5) * H / mech.sensitivity_with_quantisation
            events.append((7, 5, z_eff))
        metrics = mech.metrics()
        assert "epsilon-pld" not in metrics  # the discrete sum is bounded in RDP only
        assert metrics["epsilon"] == pytest.approx(independent_epsilon(events), rel=1e-12)
        assert 0 < metrics["secagg-clamp-delta"] < 1e-100
        histories[dropped] = metrics["epsilon"]
    assert histories[0] < histories[1] < histories[2]


def test_distributed_server_adds_no_noise_and_central_server_does():
    assert mechanism("distributed").noise_std() == 0.0
    assert mechanism("central").noise_std() == pytest.approx(1.0 * 0.5 / 5)


def test_clamp_bound_holds_empirically_and_bad_ranges_are_refused():
    # a coarse grid where clamping is frequent: t = L/2 - ceil(C/h) = 32 - 8 grid steps, s = 10
    r, levels, clip, s = 1.0, 64, 0.25, 10.0
    rng = insecure_seeded_generator(5)
    values = np.floor(clip / quantisation_step(r, levels) + rng.random(200_000)) + discrete_gaussian(200_000, s, rng)
    frequency = float(np.mean(np.abs(values) > levels // 2))
    per_value = clamp_probability(clip, 1, r, levels, s, 1)
    assert per_value == pytest.approx(2 * math.exp(-(24**2) / (2 * s**2)))
    assert 0 < frequency <= per_value
    assert clamp_probability(clip, 100, r, levels, s, 5) == min(1.0, 1000 * per_value)
    with pytest.raises(ValueError, match="raise secagg-clipping-range"):
        mechanism("distributed", clipping_range=1.0, quantization_range=2**12, z=20.0)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"z": 0.0}, "needs dp-noise-multiplier > 0"),
        ({"min_survivors": 6}, "secagg-dp-min-clients must be in"),
        ({"quantization_range": 2**4}, "grid steps"),
    ],
)
def test_impossible_distributed_settings_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        mechanism("distributed", **kwargs)


def test_state_dict_round_trip_keeps_epsilon_and_clamp_probability():
    mech = mechanism("distributed", params=17226, num_clients=5)
    for k in (5, 4):
        mech.release(np.zeros(17226, np.float32), mech.round_spec(5, survivors=k))
        mech.account_survivors(k)
    resumed = mechanism("distributed", params=17226, num_clients=5)
    resumed.load_state_dict(mech.state_dict())
    assert resumed.metrics() == mech.metrics()
    assert secure_sum.PLACEMENTS == ("central", "distributed")
