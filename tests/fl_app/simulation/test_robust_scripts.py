"""scripts/robustness.py and scripts/bench_aggregation.py: cell configs, tables, equality with Flower."""

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from strategies.core.update_matrix import ModelLayout
from tests.helpers import load_script

robustness = load_script("robustness")
bench = load_script("bench_aggregation")


def test_cell_config_takes_rule_parameters_from_byzantine_fraction():
    from fl_app.config.settings import Settings, SettingsError

    base = robustness.BASE_CONFIG
    config, note = robustness.cell_config("bulyan", "sign-flip", 0.2, base, partition="dir0.3", seed=1)
    assert config["byzantine-fraction"] == 0.2 and "bulyan-f" not in config and note == "f=4"
    assert config["partitioner"] == "dirichlet" and config["dirichlet-alpha"] == 0.3 and config["seed"] == 1
    assert config["attack"] == "sign-flip" and config["attack-fraction"] == 0.2
    settings = Settings.from_run_config(config)
    assert settings.rule_params().bulyan_f == 4  # the project derives it, not the script
    config, note = robustness.cell_config("trimmed-mean+nnm", "none", 0.1, base)
    settings = Settings.from_run_config(config)
    assert "attack" not in config and config["pre-aggregation"] == "nnm" and note == "beta=0.1 pre-f=2"
    assert settings.rule_params().trimmed_mean_beta == pytest.approx(0.1)
    assert settings.aggregation_params().pre_aggregation_f == 2
    config, _ = robustness.cell_config("mean", "backdoor", 0.1, base)
    assert config["client-weighting"] == "num-examples" and config["backdoor-boost-rounds"] == "20"
    config, _ = robustness.cell_config("multi-krum+nnm", "ipm", 0.2, base)
    assert config["client-weighting"] == "uniform" and Settings.from_run_config(config).rule_params().krum_f == 4
    for name in robustness.all_configs():  # every configuration of the matrix is a valid run config
        Settings.from_run_config(robustness.cell_config(name, "label-flip", 0.2, base)[0])
    with pytest.raises(SettingsError, match="krum-f"):  # why the matrix leaves krum+bucketing out
        Settings.from_run_config(robustness.cell_config("krum+bucketing", "none", 0.2, base)[0])


def test_attacks_are_the_catalogues():
    from fl_app.attacks.catalogue import ATTACKS

    assert ("none", *ATTACKS) == robustness.ATTACKS


def _results(cells):
    return {"config": {"num-server-rounds": 20, "local-epochs": 1}, "cells": cells}


def test_tables_give_seed_spreads_and_the_worst_case_over_attacks():
    key = robustness.key_of
    results = _results(
        {
            key("dir0.3", 0.2, "median", "none", 0): {"accuracy": 0.90},
            key("dir0.3", 0.2, "median", "none", 1): {"accuracy": 0.92},
            key("dir0.3", 0.2, "median", "ipm", 0): {"accuracy": 0.80},
            key("dir0.3", 0.2, "median", "ipm", 1): {"accuracy": 0.84},
            key("dir0.3", 0.2, "median", "alie", 0): {"accuracy": 0.78},
            key("dir0.3", 0.2, "median", "alie", 1): {"accuracy": float("nan")},  # diverged: counts as 0
            key("dir0.3", 0.2, "median", "backdoor", 0): {"accuracy": 0.1, "backdoor-success": 0.5},
            key("dir0.3", 0.2, "mean+nnm", "sign-flip", 0): {"accuracy": 0.5},
            key("iid", 0.2, "median", "none", 0): {"accuracy": 0.95},
        }
    )
    worst = robustness.worst_cases(results, "dir0.3", 0.2)
    assert [w.name for w in worst] == ["mean+nnm", "median"]
    median = worst[1]
    assert median.worst_attack == "alie" and median.worst.mean == pytest.approx(0.39)  # backdoor excluded
    assert median.worst_run == 0.0 and median.attacks == 2 and median.clean.mean == pytest.approx(0.91)
    table = robustness.worst_case_table(results, "dir0.3", 0.2).splitlines()
    assert table[3].startswith("| median | 0.910 ± 0.014 (0.900–0.920) | alie | 0.390 ± 0.552 (0.000–0.780) | +0.520 |")
    grid = robustness.markdown_table(results, "dir0.3", 0.2).splitlines()
    assert grid[0].endswith("| none | sign-flip | alie | ipm | backdoor |")
    assert grid[2] == "| mean+nnm | … | 0.500 | … | … | … |"
    assert grid[3].startswith("| median | 0.910 ± 0.014 (0.900–0.920) | … |")
    assert (
        robustness.backdoor_table(results, "dir0.3", 0.2).splitlines()[2]
        == "| median | 0.910 ± 0.014 (0.900–0.920) | 0.100 | 0.500 | … |"
    )
    assert "### iid, attacker fraction 0.2" in robustness.report(results, Path("."), draw=False)


def test_flatten_minus_is_one_pass_subtraction():
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    layout = ModelLayout.of(ArrayRecord(arrays))
    minus = rng.standard_normal(layout.size).astype(np.float32)
    out = layout.flatten(ArrayRecord(arrays), minus=minus)
    np.testing.assert_array_equal(out, np.concatenate([a.ravel() for a in arrays]) - minus)


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed-mean", "krum", "multi-krum"])
def test_our_strategies_equal_flowers_where_definitions_agree(rule):
    payloads = bench.Payloads(12, 3000, seed=3)
    strategy_times, _ = bench.time_calls(
        (lambda: bench.flower_strategy(rule, 12), lambda: bench.our_strategy(rule, 12, payloads)), payloads, 1
    )
    theirs, ours = (times[-1] for times in strategy_times)
    assert bench.max_difference(ours, theirs) <= 1e-6
    assert math.isfinite(bench.max_difference(ours, theirs))


def test_floors_compute_what_the_rules_must():
    """Each floor pass computes what its rule needs (so that it cannot time less work than that):
    the weighted mean, the Gram matrix of the rows read block by block, the sorted coordinates;
    and the bare calls are timed in the same turns as the strategies."""
    payloads = bench.Payloads(9, 2000, seed=1)
    inputs = bench.FloorInputs(payloads)
    x = inputs.matrix
    raw = x + ModelLayout.of(ArrayRecord(payloads.global_arrays)).flatten(ArrayRecord(payloads.global_arrays))
    np.testing.assert_allclose(bench.read_pass(inputs)(), raw.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(bench.read_pass(inputs, 4)(), raw[:4].mean(axis=0), rtol=1e-5)
    exact = x.astype(np.float64) @ x.T.astype(np.float64)
    upper = np.triu_indices(9)
    np.testing.assert_allclose(bench.read_gram_pass(inputs)()[upper], exact[upper], rtol=1e-4)
    np.testing.assert_allclose(np.triu(bench.gram_alone_pass(inputs)())[upper], exact[upper], rtol=1e-4)
    np.testing.assert_array_equal(bench.sort_pass(inputs, 5)(), np.sort(x[:5].T, axis=1))  # one block: 2000 columns
    assert inputs.multi_krum_m == 9 - bench.byzantine_f(9) and inputs.bulyan_theta == 9 - 2 * bench.byzantine_f(9)
    for rule, (_, passes) in bench.FLOORS.items():
        strategy_times, bare = bench.time_calls(
            (lambda rule=rule: bench.our_strategy(rule, 9, payloads),), payloads, 2, tuple(p(inputs) for p in passes)
        )
        assert len(bare) == len(passes) and all(0 <= cpu < 1 for cpu in bare)
        assert strategy_times[0][-1] is not None


def test_distance_precision_script_shows_the_centred_blur_and_ours_without_it(capsys):
    precision = load_script("distance_precision")
    x = (np.random.default_rng(1).standard_normal((6, 3000)) * 0.01).astype(np.float32)
    x[0] = np.float32(0.01 * 1e4)
    kept = x.copy()
    exact = precision.exact_distances(x)
    assert precision.honest_error(precision.mean_centred_distances(x), exact) > 1e-3
    np.testing.assert_array_equal(x, kept)  # the centred reference works on copies
    precision.huge_row_table([1e4, 1e8])
    lines = capsys.readouterr().out.strip().splitlines()[2:]
    assert len(lines) == 2
    for line in lines:
        _, _, centred, ours, _ = line.split("|")
        assert float(centred) > 1e-3 and float(ours) < 1e-5, line
