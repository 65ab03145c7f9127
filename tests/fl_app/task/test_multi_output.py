"""A user's model with two outputs (a classification head and a regression head) and a loader that
gives a dict of targets: it trains through the clients, and its metrics keep Keras' names
(``kind_accuracy``, ``size_mae``) in replies and history; what cannot take it is refused."""

from __future__ import annotations

import numpy as np
import pytest

from fl_app.task.output_spec import MULTI_OUTPUT, OutputSpec, headline_metric, infer_output_spec, strata
from fl_app.task.targets import check_output_names, is_multi_target, keras_targets, pack_targets

HERE = "tests.fl_app.task.test_multi_output"


def load():
    """The pool: 8 features; 'kind' a class of 3 from the first two features, 'size' their sum."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype("float32")
    kind = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    return x, {"kind": kind, "size": x[:, :4].sum(axis=1, keepdims=True)}


def build(input_shape, output_spec):
    import tensorflow as tf

    assert output_spec.task == MULTI_OUTPUT
    specs = dict(output_spec.outputs)
    inputs = tf.keras.layers.Input(input_shape)
    hidden = tf.keras.layers.Dense(16, "relu")(inputs)
    kind = tf.keras.layers.Dense(specs["kind"].units, "softmax", name="kind")(hidden)
    size = tf.keras.layers.Dense(specs["size"].units, name="size")(hidden)
    model = tf.keras.Model(inputs, {"kind": kind, "size": size})
    model.compile(
        "adam",
        loss={"kind": "sparse_categorical_crossentropy", "size": "mse"},
        metrics={"kind": ["accuracy"], "size": ["mae"]},
    )
    return model


def test_targets_pack_into_one_structured_array_and_back():
    _, targets = load()
    y = pack_targets(targets)
    assert is_multi_target(y) and y.dtype.names == ("kind", "size") and len(y) == 400
    assert y["kind"].dtype == np.int64 and y["size"].dtype == np.float32 and y["size"].shape == (400,)
    rows = y[[3, 1]]  # what partitioning and splits do
    back = keras_targets(rows)
    assert set(back) == {"kind", "size"} and back["kind"].tolist() == [targets["kind"][3], targets["kind"][1]]
    assert keras_targets(np.arange(3)) is not None and not is_multi_target(np.arange(3))
    with pytest.raises(ValueError, match="output 'size' has 2 rows of targets, the first output 400"):
        pack_targets({"kind": targets["kind"], "size": np.zeros(2)}, "dataset 'x:y'")
    with pytest.raises(ValueError, match="targets of output 'size' hold NaN"):
        pack_targets({"size": np.array([1.0, np.nan])})


def test_each_output_has_its_own_task():
    y = pack_targets(load()[1])
    spec = infer_output_spec(y)
    assert spec.multi_output and spec.units == 2
    assert dict(spec.outputs) == {"kind": OutputSpec("multiclass", 3, 3), "size": OutputSpec("regression", 1)}
    assert np.array_equal(strata(y, spec), y["kind"])  # stratified by the first output
    with pytest.raises(ValueError, match="leave task='auto'"):
        infer_output_spec(y, task="regression")
    assert headline_metric(["loss", "kind_loss", "size_loss", "kind_accuracy", "size_mae"]) == "kind_accuracy"


def test_a_two_output_model_trains_through_the_clients_under_keras_names():
    from fl_app.simulation.local_grid import run_local_federation

    _, history = run_local_federation(
        {
            "num-partitions": 2,
            "min-train-clients": 2,
            "min-evaluate-clients": 2,
            "min-available-clients": 2,
            "partitioner": "iid",
            "local-epochs": 3,
            "model": f"{HERE}:build",
            "dataset": f"{HERE}:load",
        },
        num_rounds=2,
    )
    first, last = history[0], history[-1]
    assert last.clients_replied == 2 and not last.failures
    for scope in ("centralized", "federated", "train"):
        for name in ("kind_accuracy", "size_mae", "kind_loss", "size_loss"):
            assert last.value(scope, name) is not None, (scope, name)
    assert last.value("centralized", "size_mae") < first.value("centralized", "size_mae")
    from fl_app.server.run_directory import headline

    assert headline(history) == "kind_accuracy"


def test_dp_sgd_export_wrong_names_and_an_uncompiled_model_are_refused():
    import tensorflow as tf

    from fl_app.client.node_client import compiled_model
    from fl_app.delivery.shipping import check_exportable

    spec = infer_output_spec(pack_targets(load()[1]))
    with pytest.raises(ValueError, match="DP-SGD .* needs a single per-example loss; the model has several"):
        compiled_model(f"{HERE}:build", (8,), spec, "sgd", 0.1, 0, 1, (1.0, 1.0, 0, True, "poisson"))
    with pytest.raises(
        ValueError, match=r"export='tflite' supports models with one output; this model has 2 \(kind, size\)"
    ):
        check_exportable(spec, ("tflite",))
    check_exportable(OutputSpec.classes(3), ("tflite",))  # one output: fine
    model = build((8,), spec)
    y = pack_targets({"kind": np.zeros(4, int), "weight": np.zeros(4)})
    with pytest.raises(ValueError, match=r"targets for outputs \['kind', 'weight'\] but model .* has outputs"):
        check_output_names(model, y)
    inputs = tf.keras.layers.Input((8,))
    two = tf.keras.Model(
        inputs, [tf.keras.layers.Dense(3, name="kind")(inputs), tf.keras.layers.Dense(1, name="size")(inputs)]
    )
    from fl_app.task.keras_client import compile_model

    with pytest.raises(ValueError, match="an uncompiled model must have one output"):
        compile_model(two, "adam", spec=spec)


def test_the_server_refuses_to_export_a_multi_output_model_before_training(monkeypatch, tmp_path):
    from tests.helpers import run_server_app_in_process

    config = {
        "model": f"{HERE}:build",
        "dataset": f"{HERE}:load",
        "num-partitions": 2,
        "min-available-clients": 2,
        "min-train-clients": 2,
        "min-evaluate-clients": 2,
        "centralized-evaluation": False,
        "export": "tflite",
        "output-dir": str(tmp_path / "out"),
    }
    with pytest.raises(ValueError, match=r"export='tflite' supports models with one output"):
        run_server_app_in_process(monkeypatch, config, nodes=2)
    assert not (tmp_path / "out").exists()  # refused before the run directory, before any round
