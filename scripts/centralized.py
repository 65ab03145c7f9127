"""Centralized reference: the same Keras model trained on the pooled client training data.

The federated run trains ``num-server-rounds x local-epochs`` epochs over each client's train split;
this script pools those same train splits, trains the same model for the same number of epochs
(same optimizer, learning rate, batch size) and evaluates on the same server test set, so that the
federated accuracy has an upper reference and a time to compare with.

    uv run python scripts/centralized.py                 # the default run config
    uv run python scripts/centralized.py -c "model='cnn'" --epochs 20
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

import numpy as np

import fl_app  # noqa: F401
from fl_app.config.settings import Settings
from fl_app.task.data import client_data, federated_data

ROOT = Path(__file__).resolve().parents[1]


def parse_overrides(text: str) -> dict:
    """``"k=v k2=v2"`` in TOML value syntax, as ``flwr run -c`` takes it."""
    return tomllib.loads("\n".join(text.split())) if text else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--run-config", default="", help="overrides, as for flwr run -c")
    parser.add_argument("--epochs", type=int, default=None, help="default: num-server-rounds x local-epochs")
    args = parser.parse_args()

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config.update(parse_overrides(args.run_config))
    settings = Settings.from_run_config(config)

    import tensorflow as tf

    from fl_app.task.keras_client import compile_model
    from fl_app.task.models import build_model, make_optimizer

    data = federated_data(settings)
    parts = [client_data(settings, i) for i in range(settings.num_partitions)]
    x = np.concatenate([p.x_train for p in parts])
    y = np.concatenate([p.y_train for p in parts])
    epochs = args.epochs or settings.num_server_rounds * settings.local_epochs

    tf.keras.utils.set_random_seed(settings.seed)
    model, _ = compile_model(
        build_model(settings.model, data.input_shape, data.num_classes, settings.seed),
        make_optimizer(settings.optimizer, settings.learning_rate),
        with_proximal_term=False,
    )
    started = time.perf_counter()
    model.fit(x, y, epochs=epochs, batch_size=settings.batch_size, shuffle=True, verbose=0)
    seconds = time.perf_counter() - started
    loss, accuracy = model.evaluate(data.x_server_test, data.y_server_test, verbose=0)
    result = {
        "model": settings.model,
        "train examples": int(len(y)),
        "epochs": epochs,
        "test examples": int(len(data.y_server_test)),
        "test accuracy": round(float(accuracy), 4),
        "test loss": round(float(loss), 4),
        "training seconds": round(seconds, 2),
        "seconds per epoch": round(seconds / epochs, 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
