"""Integration: a user's own strategy gets only screened replies in a real run (``flwr run``).

Three of six simulated clients send NaN, float64 arrays and ``num-examples = -5`` every round;
under a FedAvg subclass loaded by dotted path from outside the package, each bad reply is recorded
with its node id in every round and the final model stays finite. The same guard wraps Flower's
built-in strategies (``fedavg``, ``fedadam``, ...) by the same code path (``make_strategy``): the
reply fuzzer (tests/strategies/aggregation/test_guard.py) drives every one of them with hostile
replies, and a whole real run costs about 70 s, so only the user's strategy, which adds the
dotted-path import, runs end to end here.
"""

import re

import numpy as np
import pytest

from tests.helpers import run_to_completion

pytestmark = pytest.mark.integration

USER_MODULE = '''
from flwr.serverapp.strategy import FedAvg


class PlainFedAvg(FedAvg):
    """A user's FedAvg subclass that trusts its replies."""
'''

REASONS = {
    "nan": r"array '\S+' holds NaN or infinite values",
    "float64": r"array '\S+' is float64\[.*\], expected float32",
    "negative-examples": r"num-examples must be a positive number \(a whole count of examples\), got -5",
}


def test_bad_replies_never_reach_a_users_strategy(tmp_path, monkeypatch):
    strategy = "users_strategy:PlainFedAvg"
    (tmp_path / "users_strategy.py").write_text(USER_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the ServerApp imports the user's module from there
    run = run_to_completion(
        tmp_path / "outputs",
        6,
        f"num-server-rounds=3 local-epochs=1 model='logreg' partitioner='iid' strategy='{strategy}' "
        "min-train-clients=6 min-available-clients=6 attack='nan,float64,negative-examples' attack-ids='0,1,2'",
    )
    nodes_of: dict[str, set[str]] = {name: set() for name in REASONS}
    for record in run.history[1:]:
        assert record["clients_replied"] == 6
        rejected = [f for f in record["failures"] if ": rejected: " in f]
        assert len(rejected) == 3, record["failures"]
        for name, reason in REASONS.items():
            [line] = [f for f in rejected if re.search(reason, f)]
            nodes_of[name].add(re.fullmatch(r"node (\d+): rejected: .*", line).group(1))
        assert isinstance(record["centralized_accuracy"], float) and np.isfinite(record["centralized_accuracy"])
    assert all(len(nodes) == 1 for nodes in nodes_of.values()), nodes_of  # the same attacker every round
    assert len(set.union(*nodes_of.values())) == 3
    with np.load(run.run_dir / "checkpoint" / "weights.npz") as final:
        assert all(np.isfinite(final[name]).all() for name in final.files)
