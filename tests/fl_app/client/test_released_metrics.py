"""What a client's train reply releases under each privacy setting (fl_app.config.privacy_scope)."""

import pytest

from fl_app.client.update_privacy import released_train_metrics
from fl_app.config.privacy_scope import privacy_scope
from fl_app.config.settings import Settings

METRICS = {"train-loss": 0.3, "train-accuracy": 0.9, "fit-seconds": 1.2, "dp-sgd-epsilon": 4.0}


def test_without_dp_everything_is_sent():
    released = released_train_metrics(Settings(), METRICS, 57, 3)
    assert released == {**METRICS, "partition-id": 3, "num-examples": 57}
    assert privacy_scope(Settings()) == {}


@pytest.mark.parametrize("mode", ["central", "client-clipping", "local-gaussian", "local-laplace"])
def test_user_level_dp_sends_one_example_and_nothing_else(mode):
    settings = Settings(strategy="dp-fedavg", dp_mode=mode)
    assert released_train_metrics(settings, METRICS, 57, 3) == {"num-examples": 1}
    assert "partition id" in privacy_scope(settings)["user level"]["not sent"]


def test_a_simulated_attack_under_dp_keeps_the_partition_id_for_the_simulation():
    settings = Settings(strategy="dp-fedavg", attack="negative-examples", attack_ids="3")
    assert released_train_metrics(settings, METRICS, 57, 3) == {"num-examples": -5, "partition-id": 3}


def test_dp_sgd_sends_its_report_and_the_count_but_no_train_metric():
    settings = Settings(dp_sgd_noise_multiplier=1.1)
    assert released_train_metrics(settings, METRICS, 57, 3) == {
        "dp-sgd-epsilon": 4.0,
        "partition-id": 3,
        "num-examples": 57,
    }
    scope = privacy_scope(settings)["example level"]
    assert "num-examples" in scope["outside the guarantee"] and "train loss" in scope["not sent"]
