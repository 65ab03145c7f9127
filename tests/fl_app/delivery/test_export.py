"""Export for on-device inference and the check before shipping (no Flower processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fl_app.config.settings import Settings, SettingsError
from fl_app.task.data import load_digits_arrays, stratified_split
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def digits():
    x, y, _ = load_digits_arrays()
    keep, held = stratified_split(y, 0.2, seed=0)
    return x[keep], y[keep], x[held], y[held]


@pytest.fixture(scope="module")
def trained_cnn(digits):
    """The app's CNN trained centrally on digits for a few epochs (~97% test accuracy)."""
    import tensorflow as tf

    from fl_app.task.models import build_model

    x, y, _, _ = digits
    tf.keras.utils.set_random_seed(0)
    model = build_model("cnn", (8, 8, 1), 10, seed=0)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="module")
def tflite_models(trained_cnn, digits):
    from fl_app.delivery.export import to_tflite

    x, _, _, _ = digits
    calibration = x[np.random.default_rng(0).permutation(len(x))[:200]]
    return {"float32": to_tflite(trained_cnn, "float32"), "int8": to_tflite(trained_cnn, "int8", calibration)}


@pytest.fixture
def task_identity():
    """Flower builds instruction messages from the process's task identity; fake one."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_float32_tflite_matches_keras(trained_cnn, tflite_models, digits):
    from fl_app.delivery.tflite import TFLitePredictor

    _, _, x_test, _y_test = digits
    keras_prob = trained_cnn.predict(x_test, verbose=0)
    predictor = TFLitePredictor(tflite_models["float32"])
    tflite_prob = predictor.predict(x_test)
    agreement = np.mean(np.argmax(tflite_prob, -1) == np.argmax(keras_prob, -1))
    assert agreement >= 0.999
    np.testing.assert_allclose(tflite_prob, keras_prob, atol=1e-4)
    assert predictor.input_dtype == "float32"


def test_int8_is_integer_small_and_within_one_point(trained_cnn, tflite_models, digits):
    from fl_app.delivery.tflite import TFLitePredictor

    _, _, x_test, y_test = digits
    keras_acc = float(np.mean(np.argmax(trained_cnn.predict(x_test, verbose=0), -1) == y_test))
    predictor = TFLitePredictor(tflite_models["int8"])
    assert predictor.input_dtype == "int8"
    assert predictor.accuracy(x_test, y_test) >= keras_acc - 0.01
    assert keras_acc > 0.9
    assert len(tflite_models["int8"]) < 0.35 * len(tflite_models["float32"])
    latency = predictor.latency(x_test[:20])
    assert latency["examples_timed"] == 20 and 0 < latency["median_seconds"] < 0.5


def test_int8_needs_a_representative_sample(trained_cnn):
    from fl_app.delivery.export import ExportError, to_tflite

    with pytest.raises(ExportError, match="representative sample"):
        to_tflite(trained_cnn, "int8", None)


def test_export_model_writes_every_format(trained_cnn, digits, tmp_path):
    import tensorflow as tf

    from fl_app.delivery.export import export_model

    x, _, x_test, _ = digits
    result = export_model(
        trained_cnn, "final", tmp_path, ("keras", "savedmodel", "tflite"), ("float32", "int8"), x[:50]
    )
    assert result.errors == []
    assert set(result.files) == {"keras", "savedmodel", "tflite-float32", "tflite-int8"}
    assert (tmp_path / "final_int8.tflite").read_bytes() == result.tflite["int8"]
    loaded = tf.saved_model.load(str(tmp_path / "final_savedmodel"))
    serve = loaded.signatures["serving_default"]
    out = next(iter(serve(tf.constant(x_test[:4])).values())).numpy()
    np.testing.assert_allclose(out, trained_cnn.predict(x_test[:4], verbose=0), atol=1e-5)


class FakeGrid:
    """A Grid whose nodes answer evaluate messages in-process with the app's export-check handler."""

    def __init__(self, clients: dict[int, object]) -> None:
        self.clients = clients
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.clients)

    def send_and_receive(self, messages, *, timeout=None):
        from fl_app.delivery.shipping import answer_export_check, is_export_check

        replies = []
        for msg in messages:
            self.sent.append(msg)
            assert is_export_check(msg)
            replies.append(answer_export_check(msg, self.clients[msg.metadata.dst_node_id]))
        return replies


def make_clients(trained_cnn, digits, node_ids):
    import tensorflow as tf

    from fl_app.task.data import ClientData
    from fl_app.task.keras_client import KerasClient, compile_model

    x, y, _, _ = digits
    model = tf.keras.models.clone_model(trained_cnn)
    compile_model(model, tf.keras.optimizers.SGD(0.01), with_proximal_term=False)
    clients = {}
    for i, node in enumerate(node_ids):
        part = slice(100 * i, 100 * (i + 1))
        clients[node] = KerasClient(model, ClientData(x[part], y[part], x[part][:60], y[part][:60], 10))
    return clients


def test_deliver_checks_on_clients_that_did_not_train(trained_cnn, digits, tmp_path, task_identity):
    from fl_app.delivery.shipping import CheckInputs, TrainReplyRecorder, deliver

    _, _, x_test, y_test = digits
    grid = FakeGrid(make_clients(trained_cnn, digits, [11, 22, 33]))
    recorder = TrainReplyRecorder(grid)
    recorder.last_train_nodes = {22}
    report = deliver(
        grid=recorder,
        recorder=recorder,
        model=trained_cnn,
        weights={"final": trained_cnn.get_weights()},
        directory=tmp_path,
        formats=("tflite",),
        tflite_types=("float32", "int8"),
        calibration_samples=100,
        inputs=CheckInputs(tolerance=0.02, test_set=(x_test, y_test), seed=1),
    )
    assert report["ready"], report["reasons"]
    fed = report["federated_check"]
    assert fed["nodes"] == [11, 33] and fed["trained_in_last_round"] == [22]
    assert fed["replied"] == 2 and fed["num_examples"] == 120
    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [11, 33]
    final = report["models"]["final"]
    for variant in ("float32", "int8"):
        result = final["tflite"][variant]
        assert result["ready"] and result["reasons"] == []
        assert 0.9 < result["centralized_accuracy"] <= 1 and 0.9 < result["federated_accuracy"] <= 1
        assert result["latency_per_example"]["examples_timed"] == min(200, len(y_test))
    assert final["tflite"]["float32"]["argmax_agreement_with_keras"] >= 0.999
    assert report["calibration"]["samples"] == 100
    json.dumps(report)  # the report is JSON-able as it is


def test_impossible_tolerance_marks_not_ready_and_keeps_the_model(trained_cnn, digits, tmp_path, task_identity):
    """finish_run with a tolerance no model can meet: not ready, with reasons; nothing lost."""
    from fl_app.delivery.shipping import BestWeights, TrainReplyRecorder, finish_run
    from fl_app.server.run_directory import RoundRecord, RunDirectory

    _, _, x_test, y_test = digits
    run_dir = RunDirectory(tmp_path, "fedavg")
    trained_cnn.save(run_dir.file("model.keras"))
    keras_bytes = run_dir.file("model.keras").read_bytes()
    settings = dataclasses.replace(
        Settings(),
        export="tflite",
        export_tflite_types="float32",
        export_best=True,
        model="cnn",
        export_tolerance=-0.5,  # TFLite would have to beat Keras by 50 points: impossible
    )
    grid = FakeGrid(make_clients(trained_cnn, digits, [1, 2]))
    recorder = TrainReplyRecorder(grid)
    recorder.last_train_nodes = {1, 2}  # everyone trained: the check falls back to all clients
    history = [RoundRecord(round=0, centralized_accuracy=0.1), RoundRecord(round=1, centralized_accuracy=0.95)]
    best = BestWeights()
    from flwr.app import ArrayRecord

    for record in history:
        best.update(record, ArrayRecord(trained_cnn.get_weights()))
    assert best.round == 1
    report = finish_run(
        grid=recorder,
        recorder=recorder,
        settings=settings,
        model=trained_cnn,
        final_weights=trained_cnn.get_weights(),
        best=best,
        history=history,
        run_dir=run_dir,
        test_set=(x_test, y_test),
    )
    assert report["ready"] is False
    assert any("final float32: centralized accuracy" in r and "below the Keras model's" in r for r in report["reasons"])
    assert any("best float32: federated accuracy" in r for r in report["reasons"])
    assert "falls back to all clients" in report["federated_check"]["selection"]
    written = json.loads(run_dir.file("export_check.json").read_text())
    assert written["ready"] is False and written["reasons"] == report["reasons"]
    assert run_dir.file("model.keras").read_bytes() == keras_bytes
    assert run_dir.file("export/final_float32.tflite").stat().st_size > 1000
    assert run_dir.file("export/best_float32.tflite").is_file()
    card = run_dir.file("model_card.md").read_text()
    assert "**NOT ready**" in card and "TFLite float32, final (export-check round clients)" in card
    assert "no differential privacy" in card


def test_model_card_reads_privacy_and_robustness_fields():
    from fl_app.delivery.model_card import render
    from fl_app.server.run_directory import RoundRecord

    @dataclasses.dataclass(frozen=True)
    class WithDP(Settings):  # the keys other branches add, as they will look
        dp_noise_multiplier: float = 1.1
        dp_delta: float = 1e-5
        aggregation_rule: str = "trimmed-mean"
        clip_norm: float = 2.0

    history = [RoundRecord(round=0), RoundRecord(round=1, centralized_accuracy=0.9, extra={"epsilon": 3.25})]
    card = render(WithDP(), history, parameters=1234, keras_size=4096, export_report=None, num_server_test=360)
    assert "(epsilon = 3.2500, delta = 1e-05)-DP after 1 rounds" in card
    assert "`dp-noise-multiplier` = 1.1000" in card
    assert "`aggregation-rule` = trimmed-mean" in card and "`clip-norm` = 2.0000" in card
    assert "parameters: 1,234" in card and "360 examples" in card


@pytest.mark.parametrize(
    ("sampling", "fragment"),
    [
        ("poisson", "for Poisson sampling (q = batch-size / n per step, secret generator; add/remove-one example)"),
        ("shuffle", "for shuffled fixed-size batches of a public permutation (no amplification"),
    ],
)
def test_model_card_says_which_dp_sgd_accounting_is_reported(sampling, fragment):
    from fl_app.delivery.model_card import render
    from fl_app.server.run_directory import RoundRecord

    settings = Settings(dp_sgd_noise_multiplier=1.1, dp_sgd_sampling=sampling)
    history = [RoundRecord(round=0), RoundRecord(round=1, extra={"dp-sgd-epsilon-max": 7.06})]
    card = render(settings, history, parameters=None, keras_size=None, export_report=None, num_server_test=None)
    assert "largest client over all rounds epsilon = 7.0600, delta = 1e-05, accounted with RDP " + fragment in card


def test_check_node_selection():
    from fl_app.delivery.shipping import select_check_nodes

    nodes, why = select_check_nodes([5, 1, 3, 4], {1, 3}, 1.0, seed=0)
    assert nodes == [4, 5] and "2 of 4 clients did not reply" in why
    nodes, _ = select_check_nodes(range(10), {0}, 0.5, seed=0)
    assert len(nodes) == 4 and 0 not in nodes  # round(0.5 * 9)
    nodes, why = select_check_nodes([1, 2], {1, 2}, 1.0, seed=0)
    assert nodes == [1, 2] and "falls back to all clients" in why


def test_recorder_remembers_train_replies_only(task_identity):
    from flwr.app import ConfigRecord, MessageType

    from fl_app.delivery.shipping import TrainReplyRecorder

    class EchoGrid:
        def get_node_ids(self):
            return [1, 2, 3]

        def send_and_receive(self, messages, *, timeout=None):
            return [Message(content=RecordDict(), reply_to=m) for m in messages]

    recorder = TrainReplyRecorder(EchoGrid())
    train = [
        Message(content=RecordDict({"config": ConfigRecord()}), message_type=MessageType.TRAIN, dst_node_id=n)
        for n in (1, 3)
    ]
    recorder.send_and_receive(train, timeout=1)
    evaluate = [Message(content=RecordDict(), message_type=MessageType.EVALUATE, dst_node_id=2)]
    recorder.send_and_receive(evaluate, timeout=1)
    assert recorder.last_train_nodes == {1, 3} and recorder.get_node_ids() == [1, 2, 3]


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("export", "onnx", "export must be a comma-separated list of keras, savedmodel, tflite, or 'all'"),
        ("export-tflite-types", "int4", "export-tflite-types must be a comma-separated list of float32, int8"),
        ("export-tolerance", 1.5, "export-tolerance must be in [0, 1]"),
        ("export-calibration-samples", 0, "export-calibration-samples must be in [1, 100000], got 0"),
        ("export-check-fraction", 0.0, "export-check-fraction must be in (0, 1], got 0.0"),
    ],
)
def test_bad_export_settings(key, value, fragment):
    with pytest.raises(SettingsError) as err:
        Settings.from_run_config({key: value})
    assert fragment in str(err.value)


def test_export_settings_parse():
    settings = Settings.from_run_config({"export": "tflite, keras", "export-tflite-types": "int8"})
    assert settings.export_formats() == ("keras", "tflite")
    assert settings.export_tflite_variants() == ("int8",)
    assert Settings.from_run_config({"export": "all"}).export_formats() == ("keras", "savedmodel", "tflite")
    with pytest.raises(SettingsError, match="must name float32, int8 or both"):
        Settings.from_run_config({"export": "tflite", "export-tflite-types": ""})


def test_inference_script_runs_without_keras(tflite_models, digits, tmp_path):
    _, _, x_test, y_test = digits
    model = tmp_path / "model_int8.tflite"
    model.write_bytes(tflite_models["int8"])
    data = tmp_path / "local.npz"
    np.savez(data, x=x_test[:30].reshape(30, -1), y=y_test[:30])  # flat rows: reshaped to (8, 8, 1)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}  # as on a device
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tflite_predict.py"), str(model), str(data), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tf_keras_loaded"] is False
    assert result["model_size_bytes"] == len(tflite_models["int8"])
    assert result["examples"] == 30 and len(result["predictions"]) == 30
    assert result["accuracy"] > 0.85 and result["latency_per_example_ms"]["median"] > 0
    assert result["input"] == {"shape": [8, 8, 1], "dtype": "int8"}


def test_inference_script_text_output(tflite_models, digits, tmp_path, capsys):
    import importlib.util

    _, _, x_test, _ = digits
    model = tmp_path / "model.tflite"
    model.write_bytes(tflite_models["float32"])
    data = tmp_path / "unlabelled.npz"
    np.savez(data, x=x_test[:5])
    spec = importlib.util.spec_from_file_location("tflite_predict", ROOT / "scripts" / "tflite_predict.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(model), str(data), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "ms per example" in out and "KiB" in out and "#1: class" in out and "accuracy" not in out


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({}, "adding or removing one client's data; each client sampled per round with probability"),
        ({"dp_sampling": "fixed-size"}, "replacing one client's data; m clients sampled per round without"),
        ({"dp_mode": "local-laplace"}, "local DP: each client's update is private against everyone"),
    ],
)
def test_model_card_states_the_neighbouring_relation_of_the_mode(overrides, fragment):
    from fl_app.delivery.model_card import render
    from fl_app.server.run_directory import RoundRecord

    settings = Settings(strategy="dp-fedavg", **overrides)
    history = [RoundRecord(round=1, extra={"epsilon": 2.0})]
    card = render(settings, history, parameters=10, keras_size=40, export_report=None, num_server_test=1)
    assert fragment in card
    assert ("Poisson" in card) == (not overrides)  # no sampling amplification claimed for the other modes
