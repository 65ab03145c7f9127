"""scripts/bench_deploy.py's round breakdown, on an executor log as the warm executor writes it."""

from __future__ import annotations

from tests.helpers import load_script

LOG = """\x1b[92mINFO \x1b[0m:      [warm executor] ClientApp and TensorFlow imported in 53.4 s
\x1b[92mINFO \x1b[0m:      [warm executor] task 1 done in 28.202 s (completed)
\x1b[92mINFO \x1b[0m:      [warm executor] task 2 done in 2.394 s (completed)
\x1b[92mINFO \x1b[0m:      [warm executor] task 3 done in 0.700 s (completed)
\x1b[92mINFO \x1b[0m:      [warm executor] task 4 done in 0.300 s (failed)
"""


def test_the_later_rounds_split_into_the_slowest_nodes_messages_and_the_rest():
    bench = load_script("bench_deploy")
    tasks = bench.task_seconds(LOG)
    assert tasks == [28.202, 2.394, 0.7, 0.3]
    other = [1.0, 1.0, 0.2, 0.2]
    split = bench.round_breakdown([31.0, 1.5], [tasks, other])
    assert split == {
        "later rounds mean s": 1.5,
        "in the executor (slowest node, train + evaluate) s": 1.0,  # node 0's 0.7 + 0.3 (node 1: 0.4)
        "outside it (polls, hops, ServerApp) s": 0.5,
    }
