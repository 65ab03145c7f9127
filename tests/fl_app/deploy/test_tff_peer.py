"""scripts/tff_peer.py (which runs in TFF's own virtualenv) trains and evaluates on the app's very
arrays and batches: its NumPy copy of the data split, checked against ``fl_app.task.data`` (no TFF)."""

from __future__ import annotations

import dataclasses

import numpy as np

from tests.helpers import load_script


def test_the_peer_trains_and_evaluates_on_exactly_the_apps_arrays():
    from fl_app.config.settings import Settings
    from fl_app.task.data import client_data, federated_data

    peer = load_script("tff_peer")
    settings = dataclasses.replace(Settings(), partitioner="iid", num_partitions=10)
    clients, (x_test, y_test) = peer.federated_digits(10)
    data = federated_data(settings)
    assert np.array_equal(x_test, data.x_server_test) and np.array_equal(y_test, data.y_server_test)
    for partition, (x_train, y_train) in enumerate(clients):
        mine = client_data(settings, partition)
        assert np.array_equal(x_train, mine.x_train) and np.array_equal(y_train, mine.y_train)
    # the same batches: the app's compiled loop's default order for a fit of round 3, partition 2
    from fl_app.task.compiled_loop import shuffled_batches

    seed = peer.client_seed(2, 3)
    expected = shuffled_batches(np.random.Generator(np.random.PCG64(seed)))(len(clients[2][1]), 32)
    assert np.array_equal(np.concatenate(expected), peer.epoch_orders(len(clients[2][1]), 1, seed)[0])
