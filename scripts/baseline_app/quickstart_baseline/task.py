"""Model and data, as quickstart-tensorflow's task.py: ``load_model()`` builds and compiles a new
Keras model on every call; ``load_data()`` returns one partition (cached per process, as the
example caches its FederatedDataset). The data, partitioning and model are the main app's defaults
(digits, Dirichlet 0.5, the 128-64 MLP, Adam), so the benchmark compares like with like."""

from __future__ import annotations

import functools

import quickstart_baseline  # noqa: F401  (Keras 2, as the main app)


def settings(num_partitions: int, seed: int):
    from fl_app.config.settings import Settings

    return Settings(num_partitions=num_partitions, seed=seed)


def load_model(learning_rate: float, seed: int):
    import tensorflow as tf

    from fl_app.task.models import build_model

    model = build_model("mlp", (8, 8, 1), 10, seed)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    return model


@functools.lru_cache(maxsize=None)
def load_data(partition_id: int, num_partitions: int, seed: int):
    from fl_app.task.data import client_data

    data = client_data(settings(num_partitions, seed), partition_id)
    return data.x_train, data.y_train, data.x_test, data.y_test
