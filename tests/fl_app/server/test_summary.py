"""The run's closing privacy figures."""

from __future__ import annotations

from fl_app.config.settings import Settings
from fl_app.server.run_directory import RoundRecord
from fl_app.server.summary import largest_example_epsilon, privacy_summary


def test_the_largest_dp_sgd_epsilon_is_over_every_round_not_the_last():
    # round 2's small client (epsilon 9.5) did not take part in round 3
    history = [
        RoundRecord(round=0),
        RoundRecord(round=1, extra={"dp-sgd-epsilon-max": 4.0}),
        RoundRecord(round=2, extra={"dp-sgd-epsilon-max": 9.5}),
        RoundRecord(round=3, extra={"dp-sgd-epsilon-max": 6.0}),
    ]
    assert largest_example_epsilon(history) == 9.5
    summary = privacy_summary(Settings(dp_sgd_noise_multiplier=1.1), history, None)
    assert summary["epsilon (example level, DP-SGD, largest client over all rounds)"] == 9.5
    assert largest_example_epsilon([RoundRecord(round=1)]) is None
