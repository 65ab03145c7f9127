"""The SuperNode's short polls (fl_app.deploy.supernode_entry) against Flower 1.41's loop."""

from __future__ import annotations

import inspect
import time
import types

import pytest

from fl_app.deploy import supernode_entry
from fl_app.deploy.supernode_entry import NodeSleeps


def _slept(sleeps: NodeSleeps, asked: list[float]) -> list[float]:
    return [round(sleeps.duration(seconds), 6) for seconds in asked]


def test_idle_pulls_back_off_to_flowers_three_seconds_and_restart_after_a_message():
    sleeps = NodeSleeps(initial=0.02, growth=2.0, maximum=3.0, reply_wait=0.01)
    idle = _slept(sleeps, [3] * 10)
    assert idle == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 3.0, 3.0]
    # a message arrived: Flower waits for the reply with sleep(0.5), then goes back to idle pulls
    assert _slept(sleeps, [0.5, 0.5, 3, 3]) == [0.01, 0.01, 0.02, 0.04]
    assert _slept(sleeps, [7.0]) == [7.0]  # any other sleep is kept


def test_the_stand_in_sleeps_and_the_rest_of_time_is_the_real_module():
    calls: list[float] = []
    module = types.ModuleType("fake_loop")
    module.time = time  # type: ignore[attr-defined]
    supernode_entry.install(module, NodeSleeps(initial=0.05, sleep=calls.append))
    module.time.sleep(3)
    module.time.sleep(0.5)
    assert calls == [0.05, supernode_entry.REPLY_WAIT_S]
    assert module.time.monotonic is time.monotonic and module.time.time is time.time


def test_a_module_without_time_is_refused():
    module = types.ModuleType("changed_loop")
    with pytest.raises(RuntimeError, match="does not use the time module"):
        supernode_entry.install(module)


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 5, "maximum": 3}, {"growth": 0.5}, {"reply_wait": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="need 0 < initial"):
        NodeSleeps(**kwargs)


def test_flowers_supernode_loop_still_sleeps_what_the_stand_in_replaces():
    """The pinned Flower's SuperNode loop sleeps exactly 3 s when idle and 0.5 s while it waits for
    a reply, through its module's ``time``: if an upgrade changes that, this fails first."""
    import flwr.supernode.start_client_internal as loop

    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    assert loop.time is time or isinstance(loop.time, types.ModuleType)


def test_the_node_heartbeat_is_announced_and_sent_at_the_interval_set(monkeypatch):
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    from fl_app.deploy.supernode_entry import FLOWER_HEARTBEAT_S, set_node_heartbeat

    for module in (fleet_http_connection, heartbeat):  # restored after the test
        assert module.HEARTBEAT_DEFAULT_INTERVAL == FLOWER_HEARTBEAT_S
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", FLOWER_HEARTBEAT_S)
    with pytest.raises(ValueError, match=r"FL_KERAS_NODE_HEARTBEAT_S=5 is outside .* \[10, 1800\] s"):
        set_node_heartbeat(5)
    set_node_heartbeat(10)
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 10

    # Flower's sender waits (interval - call timeout) x 0.7-0.9 between heartbeats: 3.5-4.5 s now
    waits = []
    sender = heartbeat.HeartbeatSender(lambda: True)
    stop = sender._stop_event

    def wait(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            stop.set()

    monkeypatch.setattr(stop, "wait", wait)
    sender._run()
    assert len(waits) == 3 and all(3.5 <= w <= 4.5 for w in waits), waits
