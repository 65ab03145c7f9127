"""Settings: every bad value fails before training with a message naming key, value and rule."""

import dataclasses
import tomllib

import numpy as np
import pytest

from fl_app.config.settings import Settings, SettingsError


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
        ("num-server-rounds", 0, "num-server-rounds must be >= 1, got 0"),
        ("dirichlet-alpha", 0.0, "dirichlet-alpha must be > 0, got 0.0"),
        ("dirichlet-alpha", -1.0, "dirichlet-alpha must be > 0, got -1.0"),
        ("fraction-train", 0.0, "fraction-train must be in (0, 1], got 0.0"),
        ("fraction-train", 1.5, "fraction-train must be in (0, 1], got 1.5"),
        ("fraction-evaluate", -0.1, "fraction-evaluate must be in (0, 1], got -0.1"),
        ("learning-rate", 0.0, "learning-rate must be > 0, got 0.0"),
        ("batch-size", 0, "batch-size must be >= 1, got 0"),
        ("test-fraction", 1.0, "test-fraction must be in [0, 1), got 1.0"),
        ("num-server-rounds", "ten", "num-server-rounds must be of type int, got 'ten' (str)"),
        ("input-shape", "8,x", "input-shape must be positive integers separated by commas"),
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


def test_readme_documents_every_key(project_root):
    readme = (project_root / "README.md").read_text()
    for field in dataclasses.fields(Settings):
        key = field.name.replace("_", "-")
        assert f"| `{key}` |" in readme, f"README.md does not document run-config key {key}"
