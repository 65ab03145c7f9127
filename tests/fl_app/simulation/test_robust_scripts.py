"""scripts/robustness.py and scripts/bench_aggregation.py: cell configs, tables, equality with Flower."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord

from strategies.core.update_matrix import ModelLayout

ROOT = Path(__file__).resolve().parents[3]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


robustness = load_script("robustness")
bench = load_script("bench_aggregation")


def test_cell_config_follows_the_attacker_count_and_caps_bulyan():
    base = robustness.BASE_CONFIG
    config, note = robustness.cell_config("bulyan", "sign-flip", 0.3, base)
    assert config["bulyan-f"] == 4 and "capped from 6" in note
    assert config["attack"] == "sign-flip" and config["attack-fraction"] == 0.3
    config, _ = robustness.cell_config("trimmed-mean", "none", 0.2, base)
    assert config["trimmed-mean-beta"] == pytest.approx(0.2) and "attack" not in config
    config, _ = robustness.cell_config("mean", "alie", 0.1, base)
    assert config["client-weighting"] == "num-examples" and config["aggregation-rule"] == "mean"
    config, _ = robustness.cell_config("multi-krum", "ipm", 0.2, base)
    assert config["krum-f"] == 4 and config["client-weighting"] == "uniform"
    from fl_app.config.settings import Settings

    for rule in robustness.RULES:  # every cell of the matrix is a valid run config
        for fraction in robustness.FRACTIONS:
            Settings.from_run_config(robustness.cell_config(rule, "label-flip", fraction, base)[0])


def test_markdown_table_marks_missing_diverged_and_capped_cells():
    results = {
        "cells": {
            "0.3|mean|none": {"accuracy": 0.93, "note": ""},
            "0.3|mean|sign-flip": {"accuracy": float("nan"), "note": ""},
            "0.3|bulyan|none": {"accuracy": 0.91, "note": "f=4 (capped from 6: n >= 4f+3)"},
        }
    }
    table = robustness.markdown_table(results, 0.3).splitlines()
    assert table[0].endswith("| none | sign-flip |")
    assert table[2] == "| mean | 0.930 | diverged |"
    assert table[3] == "| bulyan | 0.910* | … |"


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
    theirs, ours = (
        times[-1]
        for times in bench.time_calls(
            (lambda: bench.flower_strategy(rule, 12), lambda: bench.our_strategy(rule, 12, payloads)), payloads, 1
        )
    )
    assert bench.max_difference(ours, theirs) <= 1e-6
    assert math.isfinite(bench.max_difference(ours, theirs))


def test_floors_time_the_bare_passes():
    payloads = bench.Payloads(6, 2000, seed=1)
    for measure in {measure for _, passes in bench.FLOORS.values() for measure in passes}:
        wall, cpu = measure(payloads, 2)
        assert 0 <= cpu < 1 and 0 <= wall < 1
