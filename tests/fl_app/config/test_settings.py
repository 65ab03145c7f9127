"""Settings: every bad value fails before training with a message naming key, value and rule."""

import dataclasses
import tomllib

import numpy as np
import pytest

from fl_app.config.reference import reference_markdown
from fl_app.config.settings import Settings, SettingsError, allowed_of
from strategies import registry


def make(**overrides):
    return Settings.from_run_config({k.replace("_", "-"): v for k, v in overrides.items()})


def test_defaults_match_pyproject(project_root):
    config = tomllib.loads((project_root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fields = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(Settings)}
    assert set(config) == set(fields), "pyproject run config and Settings must list the same keys"
    for key, value in config.items():
        assert fields[key] == value, f"default of {key} differs: pyproject {value!r}, Settings {fields[key]!r}"
    Settings.from_run_config(config)  # the shipped defaults are valid


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("strategy", "fedbogus", "unknown strategy 'fedbogus'"),
        ("strategy", "no_such_module:Thing", "cannot import module 'no_such_module'"),
        ("strategy", "strategies.registry:Nope", "has no attribute 'Nope'"),
        ("model", "resnet9000", "model must be one of logreg, mlp, cnn; got 'resnet9000'"),
        ("dataset", "imagenet", "dataset must be one of digits, synthetic, local-file, huggingface; got 'imagenet'"),
        ("partitioner", "random", "partitioner must be one of iid, dirichlet, shards; got 'random'"),
        ("num-server-rounds", 0, "num-server-rounds must be in [1, 100000], got 0"),
        ("dirichlet-alpha", 0.0, "dirichlet-alpha must be in [0.001, 1000], got 0.0"),
        ("dirichlet-alpha", -1.0, "dirichlet-alpha must be in [0.001, 1000], got -1.0"),
        ("fraction-train", 0.0, "fraction-train must be in (0, 1], got 0.0"),
        ("fraction-train", 1.5, "fraction-train must be in (0, 1], got 1.5"),
        ("fraction-evaluate", -0.1, "fraction-evaluate must be in (0, 1], got -0.1"),
        ("learning-rate", 0.0, "learning-rate must be in (0, 1000], got 0.0"),
        ("batch-size", 0, "batch-size must be in [1, 65536], got 0"),
        ("test-fraction", 1.0, "test-fraction must be in [0, 1), got 1.0"),
        ("num-server-rounds", "ten", "num-server-rounds must be of type int, got 'ten' (str)"),
        ("input-shape", "8,x", "input-shape must be positive integers separated by commas"),
        ("dp-sgd-sampling", "uniform", "dp-sgd-sampling must be one of poisson, shuffle; got 'uniform'"),
    ],
)
def test_bad_value_names_key_value_and_rule(key, value, fragment):
    with pytest.raises(SettingsError) as err:
        Settings.from_run_config({key: value})
    assert fragment in str(err.value)


def test_unknown_key_is_named():
    with pytest.raises(SettingsError, match="unknown run-config key 'num-rounds'"):
        Settings.from_run_config({"num-rounds": 3})


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(SettingsError, match=f"data-path '{missing}' does not exist"):
        make(dataset="local-file", data_path=str(missing), num_classes=10, input_shape="64")


def test_local_file_needs_model_shape(tmp_path):
    path = tmp_path / "node.npz"
    np.savez(path, x=np.zeros((4, 64)), y=np.zeros(4))
    with pytest.raises(SettingsError, match="needs num-classes"):
        make(dataset="local-file", data_path=str(path))
    settings = make(dataset="local-file", data_path=str(path), num_classes=10, input_shape="8,8,1")
    assert settings.parsed_input_shape() == (8, 8, 1)


def test_round_trip_and_coercion():
    settings = make(num_server_rounds=3.0, dirichlet_alpha=1)
    assert settings.num_server_rounds == 3 and isinstance(settings.num_server_rounds, int)
    assert settings.dirichlet_alpha == 1.0 and isinstance(settings.dirichlet_alpha, float)
    assert Settings.from_run_config(settings.to_run_config()) == settings


def test_the_run_config_reference_documents_every_key(project_root):
    reference = (project_root / "docs" / "run-config.md").read_text()
    for field in dataclasses.fields(Settings):
        key = field.name.replace("_", "-")
        assert f"| `{key}` |" in reference, f"docs/run-config.md does not document run-config key {key}"


def test_pyproject_defaults_have_the_settings_types(project_root):
    config = tomllib.loads((project_root / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for field in dataclasses.fields(Settings):
        value = config[field.name.replace("_", "-")]
        assert type(value).__name__ == field.type, f"{field.name}: pyproject {value!r} is not {field.type}"
        assert field.metadata["help"] and allowed_of(field), f"{field.name} needs a meaning and what it allows"


def test_committed_reference_is_generated(project_root):
    committed = (project_root / "docs" / "run-config.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), "docs/run-config.md is stale: run python -m fl_app.config.reference"
    for field in dataclasses.fields(Settings):
        assert f"| `{field.name.replace('_', '-')}` |" in committed


def test_client_parse_builds_no_strategy(monkeypatch):
    from strategies.aggregation import strategy as aggregation
    from strategies.encrypted import strategy as encrypted
    from strategies.private import dp_fedavg

    def refuse(*args, **kwargs):
        raise AssertionError("the client path built a server strategy")

    for module, name in (
        (registry, "build_strategy"),
        (registry, "check_strategy_name"),
        (aggregation, "build_aggregation_strategy"),
        (dp_fedavg, "build_dp_strategy"),
        (dp_fedavg, "calibrated_noise_multiplier"),
        (encrypted, "check_encryption_compatible"),
    ):
        monkeypatch.setattr(module, name, refuse)
    for config in (
        {"strategy": "krum", "num-partitions": 20, "min-train-clients": 20},
        {"strategy": "dp-fedavg", "dp-noise-multiplier": 0.0, "dp-target-epsilon": 3.0},
        {"homomorphic-encryption": "ckks", "he-client-weighting": "uniform"},
    ):
        settings = Settings.client_from_run_config(config)
        assert settings.strategy == config.get("strategy", "fedavg")
    with pytest.raises(AssertionError, match="built a server strategy"):
        Settings.from_run_config({"strategy": "krum", "num-partitions": 20, "min-train-clients": 20})


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"learning-rate": 0.0}, "learning-rate must be in (0, 1000], got 0.0"),
        ({"dp-clip-norm": 0.0}, "dp-clip-norm must be in (0, 1000000], got 0.0"),
        ({"he-client-weighting": "capped"}, "he-client-weighting must be one of num-examples, uniform"),
        ({"compression-topk-fraction": 0.0}, "compression-topk-fraction"),
        ({"attack": "bogus"}, "attack must be one of"),
        ({"dp-sgd-sampling": "uniform"}, "dp-sgd-sampling must be one of poisson, shuffle; got 'uniform'"),
        (
            {"dp-sgd-microbatches": 8},
            "dp-sgd-microbatches (8) needs dp-sgd-sampling='shuffle': Poisson batches vary in size",
        ),
    ],
)
def test_client_parse_checks_the_client_keys(config, fragment):
    with pytest.raises(SettingsError) as err:
        Settings.client_from_run_config(config)
    assert fragment in str(err.value)


def test_client_parse_leaves_server_only_checks_to_the_server():
    # the server refuses these (Krum's n > 2f + 2, a bad rule name, encryption with Krum); the client
    # does not use them and does not check them
    for config in (
        {"strategy": "krum", "num-partitions": 3, "krum-f": 1},
        {"strategy": "robust", "aggregation-rule": "avg"},
        {"homomorphic-encryption": "ckks", "strategy": "krum"},
    ):
        Settings.client_from_run_config(config)
        with pytest.raises(SettingsError):
            Settings.from_run_config(config)


def test_clients_per_round_is_one_definition():
    sampling = make(fraction_train=0.35, num_partitions=10, min_train_clients=2).sampling_params()
    assert sampling.clients_per_round() == 3  # floor(0.35 * 10)
    few = make(fraction_train=0.1, num_partitions=10, min_train_clients=4).sampling_params()
    assert few.clients_per_round() == 4  # min-train-clients
    over = Settings.parse({"num-partitions": 3, "min-train-clients": 5}).sampling_params()
    assert over.clients_per_round() == 3 and over.clients_per_round(capped=False) == 5


def test_only_the_config_reads_the_run_config_mapping(project_root):
    # the run config is read once, into Settings; everything else gets Settings or typed parameters
    needle = "run_config" + ".get("  # split, so that this file is no reader either
    readers = [
        str(path.relative_to(project_root))
        for folder in ("fl_app", "strategies", "scripts")
        for path in (project_root / folder).rglob("*.py")
        if needle in path.read_text(encoding="utf-8") and "fl_app/config" not in path.as_posix()
    ]
    assert readers == []


def test_a_privacy_budget_without_dp_fedavg_is_refused_not_ignored():
    with pytest.raises(SettingsError, match="dp-target-epsilon=3 is the privacy budget of strategy='dp-fedavg'"):
        Settings.from_run_config({"strategy": "fedavg", "dp-target-epsilon": 3.0})
    Settings.from_run_config({"strategy": "dp-fedavg", "dp-target-epsilon": 3.0})
