"""A user's model (factory or saved file) and data (loader, multi-column files): loading, compiling,
the losses and metrics an uncompiled model gets, DP-SGD's per-example loss and the error messages."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from fl_app.config.settings import Settings, SettingsError
from fl_app.task.data import DataFileError, client_data
from fl_app.task.keras_client import KerasClient, compile_model
from fl_app.task.losses import default_loss, default_metrics, per_example_loss
from fl_app.task.models import build_model
from fl_app.task.output_spec import OutputSpec

BINARY = "examples.breast_cancer.model:build"
BINARY_DATA = "examples.breast_cancer.data:load"
SETTINGS = Settings(model=BINARY, dataset=BINARY_DATA, num_partitions=3, partitioner="iid", local_epochs=1)


def keras3_build(input_shape, output_spec):
    """A factory that builds with standalone Keras 3 (what the app refuses)."""
    import keras

    return keras.Sequential([keras.layers.Input(shape=input_shape), keras.layers.Dense(1)])


def not_a_pool():
    return [1, 2, 3]


def string_pool():
    return np.array([["a"], ["b"]]), np.array([0, 1])


def node_loader(partition_id, num_partitions):
    """A per-node loader: each node's own rows (here every num_partitions-th breast-cancer example)."""
    from examples.breast_cancer.data import load

    x, y = load()
    return x[partition_id::num_partitions], y[partition_id::num_partitions]


def test_factory_is_seeded_and_its_compile_kept():
    first = build_model(BINARY, (30,), OutputSpec("binary", 1, 2), seed=3)
    again = build_model(BINARY, (30,), OutputSpec("binary", 1, 2), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), again.get_weights()))
    model, proximal = compile_model(first, spec=OutputSpec("binary", 1, 2))
    assert model.loss == "binary_crossentropy" and float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    assert proximal is not None


def test_saved_model_is_the_initial_model(tmp_path):
    model = build_model(BINARY, (30,), OutputSpec("binary", 1, 2), seed=0)
    model.save(tmp_path / "m.keras")
    loaded = build_model(str(tmp_path / "m.keras"), (30,), OutputSpec("binary", 1, 2), seed=99)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights()))
    assert loaded.loss == "binary_crossentropy"
    with pytest.raises(ValueError, match=r"takes inputs of shape \(30,\), but the data's examples have shape \(4,\)"):
        build_model(str(tmp_path / "m.keras"), (4,), 2, seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        build_model(str(tmp_path / "missing.keras"), (30,), 2, seed=0)


@pytest.mark.parametrize(
    ("name", "error", "fragment"),
    [
        (f"{__name__}:keras3_build", TypeError, "returned a Keras 3 model"),
        ("no_such_package.models:build", ValueError, "model 'no_such_package.models:build': cannot import module"),
        ("mlpp", ValueError, "model must be one of logreg, mlp, cnn, 'package.module:build' or a saved"),
    ],
)
def test_model_errors_say_what_to_change(name, error, fragment):
    with pytest.raises(error) as err:
        build_model(name, (4,), 2, seed=0)
    assert fragment in str(err.value)
    if error is TypeError:
        assert "tf.keras" in str(err.value) and "import tf_keras" in str(err.value)


def test_keras3_file_is_refused_with_what_to_change(tmp_path):
    import keras

    keras3_build((4,), None).save(tmp_path / "k3.keras")
    with pytest.raises(ValueError) as err:
        build_model(str(tmp_path / "k3.keras"), (4,), 2, seed=0)
    assert "a model saved by standalone Keras 3 is not readable: build it with tf.keras" in str(err.value)
    assert keras.__version__.startswith("3.")


def _dense(units, activation=None):
    return tf.keras.Sequential([tf.keras.layers.Input((4,)), tf.keras.layers.Dense(units, activation=activation)])


@pytest.mark.parametrize(
    ("model", "spec", "loss_class", "logits", "metric"),
    [
        (lambda: _dense(1, "sigmoid"), OutputSpec("binary", 1, 2), "BinaryCrossentropy", False, "accuracy"),
        (lambda: _dense(3), OutputSpec("multiclass", 3, 3), "SparseCategoricalCrossentropy", True, "accuracy"),
        (
            lambda: _dense(3, "softmax"),
            OutputSpec("multiclass", 3, 3, one_hot=True),
            "CategoricalCrossentropy",
            False,
            "accuracy",
        ),
        (lambda: _dense(2, "sigmoid"), OutputSpec("multilabel", 2, 2), "BinaryCrossentropy", False, "binary_accuracy"),
        (lambda: _dense(1), OutputSpec("regression", 1), "MeanSquaredError", None, "mae"),
    ],
)
def test_uncompiled_model_gets_the_tasks_loss_and_metrics(model, spec, loss_class, logits, metric):
    built = model()
    loss = default_loss(built, spec)
    assert type(loss).__name__ == loss_class
    if logits is not None:
        assert loss.get_config()["from_logits"] is logits
    names = [m if isinstance(m, str) else m.name for m in default_metrics(built, spec)]
    assert names == [metric]


def test_output_width_that_does_not_fit_the_classes_is_refused():
    with pytest.raises(ValueError, match="has 4 output units but the data has 3 classes"):
        default_loss(_dense(4, "softmax"), OutputSpec("multiclass", 3, 3))


def test_user_model_trains_and_reports_its_keras_metrics():
    data = client_data(SETTINGS, 0)
    assert data.spec == OutputSpec("binary", 1, 2)
    model, proximal = compile_model(build_model(BINARY, (30,), data.spec, seed=0), spec=data.spec)
    client = KerasClient(model, data, local_epochs=2, batch_size=16, seed=0, proximal=proximal)
    weights, n, train = client.fit(model.get_weights(), {})
    assert {"train-loss", "train-accuracy", "train-auc", "fit-seconds"} <= set(train) and n == len(data.y_train)
    loss, _, metrics = client.evaluate(weights, {})
    assert set(metrics) == {"accuracy", "auc"} and 0.0 <= metrics["auc"] <= 1.0 and loss > 0


def _reducing_loss(y_true, y_pred):
    return tf.reduce_mean(tf.square(tf.cast(y_true, tf.float32) - y_pred))


@pytest.mark.parametrize(
    "loss", ["binary_crossentropy", tf.keras.losses.BinaryCrossentropy(), tf.keras.losses.MeanAbsoluteError()]
)
def test_per_example_loss_for_dp_sgd(loss):
    rebuilt = per_example_loss(loss, _dense(1, "sigmoid"), (4,), OutputSpec("binary", 1, 2))
    values = rebuilt(tf.constant([[0.0], [1.0], [1.0]]), tf.constant([[0.2], [0.7], [0.9]]))
    assert values.shape == (3,)


def test_dp_sgd_refuses_a_loss_that_averages_the_batch():
    with pytest.raises(ValueError, match="DP-SGD needs one loss value per example; the model's loss '_reducing_loss'"):
        per_example_loss(_reducing_loss, _dense(1), (4,), OutputSpec("regression", 1))


def test_dp_sgd_trains_a_users_compiled_model():
    from fl_app.client.node_client import compiled_model

    data = client_data(SETTINGS, 1)
    model, proximal = compiled_model(BINARY, (30,), data.spec, "sgd", 0.05, 0, 1, (1.0, 1.0, 0, True, "shuffle"))
    assert proximal is None and "DP" in type(model.optimizer).__name__ and model.loss.reduction == "none"
    client = KerasClient(model, data, local_epochs=1, batch_size=16, seed=0)
    _, _, metrics = client.fit(model.get_weights(), {})
    assert np.isfinite(metrics["train-loss"]) and "train-auc" in metrics


def test_loader_pool_is_partitioned_with_a_server_test_set():
    from fl_app.task.data import federated_data

    data = federated_data(SETTINGS)
    assert data.spec.task == "binary" and data.x.shape[1:] == (30,)
    assert len(data.x) + len(data.x_server_test) == 569 and len(data.partitions) == 3
    assert abs(data.y_server_test.mean() - data.y.mean()) < 0.05  # stratified


@pytest.mark.parametrize(
    ("loader", "fragment"),
    [
        (f"{__name__}:not_a_pool", "must return a tuple (x, y) of numpy arrays; got list"),
        (f"{__name__}:string_pool", "x and y must be numeric"),
        (f"{__name__}:missing", "has no attribute 'missing'"),
    ],
)
def test_loader_errors_name_the_loader(loader, fragment):
    with pytest.raises(DataFileError) as err:
        client_data(dataclasses.replace(SETTINGS, dataset=loader), 0)
    assert f"dataset '{loader}'" in str(err.value) and fragment in str(err.value)


def test_per_node_loader_gives_each_node_its_own_data():
    from fl_app.server.evaluation import model_spec

    settings = dataclasses.replace(SETTINGS, dataset=f"{__name__}:node_loader", input_shape="30", num_classes=2)
    data = client_data(settings, 1)
    assert data.spec == OutputSpec("binary", 1, 2) and len(data.y_train) + len(data.y_test) == 190
    assert model_spec(settings) == ((30,), OutputSpec("binary", 1, 2), None)  # no server test set
    with pytest.raises(ValueError, match="builds the nodes' model from input-shape and num-classes"):
        model_spec(dataclasses.replace(settings, input_shape=""))


def test_csv_with_several_real_targets(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(30, 2))
    header = "a,b,t1,c,t2"
    np.savetxt(
        tmp_path / "n0.csv",
        np.column_stack([x[:, :2], y[:, 0], x[:, 2], y[:, 1]]),
        delimiter=",",
        header=header,
        comments="",
    )
    settings = Settings(
        dataset="local-file",
        data_path=str(tmp_path / "n{partition-id}.csv"),
        label_column="t1,t2",
        task="regression",
        num_classes=2,
        input_shape="3",
    )
    data = client_data(settings, 0)
    assert data.spec == OutputSpec("regression", 2) and data.y_train.shape[1] == 2
    assert np.allclose(np.sort(np.concatenate([data.y_train, data.y_test])[:, 0]), np.sort(y[:, 0]), atol=1e-6)
    with pytest.raises(DataFileError, match="its targets make a regression task with 2 output"):
        client_data(dataclasses.replace(settings, task="auto"), 0)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"task": "ranking"}, "task must be one of auto, multiclass, binary, multilabel, regression; got 'ranking'"),
        ({"model": "resnet"}, "model must be one of logreg, mlp, cnn; got 'resnet'"),
        ({"dataset": "mnist"}, "dataset must be one of digits, synthetic, local-file, huggingface; got 'mnist'"),
    ],
)
def test_settings_name_the_key_and_the_choices(changes, fragment):
    with pytest.raises(SettingsError) as err:
        dataclasses.replace(Settings(), **changes).validate_client()
    assert fragment in str(err.value)


def test_settings_accept_user_objects_and_model_files():
    dataclasses.replace(Settings(), model="pkg.mod:build", dataset="pkg.data:load").validate_client()
    dataclasses.replace(Settings(), model="models/mine.keras").validate_client()
