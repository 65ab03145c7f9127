"""Client-side cost per round, in one process (no Flower engine): where (b)'s time goes vs (a)'s.

For the default federation's clients (digits, Dirichlet 0.5, MLP, 5 local epochs), one round of
train + evaluate messages handled three ways, side by side, plus centralized training:

1. quickstart style: build and compile a fresh Keras model per message, ``model.fit``/``evaluate``;
2. one reused compiled model, ``model.fit``/``model.evaluate`` per message;
3. this app's ``KerasClient`` (reused model, compiled per-epoch train loop, compiled evaluation);
4. centralized ``model.fit`` on the pooled client train data for the same sample-epochs;

and the train messages alone, per local epoch of one client, with and without Keras callbacks
(run config ``callbacks``): ``KerasClient`` with the compiled fast loop (no callbacks, the
default) vs ``KerasClient`` with a callback factory (``model.fit`` with an ``EarlyStopping`` that
never stops and a ``LearningRateScheduler``, so every epoch runs).

    uv run python scripts/client_cost.py --clients 10 --repeats 3
    uv run python scripts/client_cost.py --callbacks-only   # only the per-epoch comparison
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--callbacks-only", action="store_true", help="only fast loop vs fit with callbacks")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from fl_app.config.settings import Settings
    from fl_app.task.data import client_data
    from fl_app.task.keras_client import KerasClient, compile_model
    from fl_app.task.models import build_model, make_optimizer

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    s = Settings(num_partitions=args.clients)
    data = [client_data(s, i) for i in range(args.clients)]
    epochs, batch = s.local_epochs, s.batch_size

    def fresh():
        model = build_model("mlp", (8, 8, 1), 10, s.seed)
        model.compile(
            optimizer=make_optimizer("adam", s.learning_rate),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            metrics=["accuracy"],
        )
        return model

    initial = fresh().get_weights()
    reused = fresh()
    ours, proximal = compile_model(fresh(), make_optimizer("adam", s.learning_rate))

    def quickstart():
        for d in data:
            m = fresh()
            m.set_weights(initial)
            m.fit(d.x_train, d.y_train, epochs=epochs, batch_size=batch, verbose=0)
        for d in data:
            m = fresh()
            m.set_weights(initial)
            m.evaluate(d.x_test, d.y_test, verbose=0)

    def keras_reused():
        for d in data:
            reused.set_weights(initial)
            reused.fit(d.x_train, d.y_train, epochs=epochs, batch_size=batch, verbose=0)
        for d in data:
            reused.set_weights(initial)
            reused.evaluate(d.x_test, d.y_test, verbose=0)

    def app():
        for i, d in enumerate(data):
            KerasClient(ours, d, local_epochs=epochs, batch_size=batch, seed=i, proximal=proximal).fit(
                initial, {"server-round": 1}
            )
        for i, d in enumerate(data):
            KerasClient(ours, d, local_epochs=epochs, batch_size=batch, seed=i, proximal=proximal).evaluate(initial, {})

    x = np.concatenate([d.x_train for d in data])
    y = np.concatenate([d.y_train for d in data])
    central = fresh()

    def centralized():
        central.fit(x, y, epochs=epochs, batch_size=batch, verbose=0)

    def callbacks(info):
        return [
            tf.keras.callbacks.EarlyStopping(monitor="loss", patience=info.local_epochs),
            tf.keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr),
        ]

    def train_only(factory):
        def run():
            for i, d in enumerate(data):
                client = KerasClient(
                    ours, d, local_epochs=epochs, batch_size=batch, seed=i, proximal=proximal, callbacks=factory
                )
                client.fit(initial, {"server-round": 1})

        return run

    results = {}

    def measure(name: str, fn, per: float = 1.0, unit: str = "s per round") -> float:
        fn()  # warm-up: imports, tracing
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) / per)
        results[name] = round(statistics.median(times), 5)
        print(f"{name:<44} {results[name]:9.5f} {unit} (median of {args.repeats})", flush=True)
        return results[name]

    if not args.callbacks_only:
        for name, fn in (
            ("quickstart style", quickstart),
            ("reused model, model.fit", keras_reused),
            ("this app (KerasClient)", app),
            ("centralized, same sample-epochs", centralized),
        ):
            measure(name, fn)
        results["quickstart / app"] = round(results["quickstart style"] / results["this app (KerasClient)"], 2)
        results["app / centralized"] = round(
            results["this app (KerasClient)"] / results["centralized, same sample-epochs"], 2
        )
    client_epochs = len(data) * epochs
    fast = measure("train, fast loop (no callbacks)", train_only(None), client_epochs, "s per client-epoch")
    fit = measure("train, model.fit with 2 callbacks", train_only(callbacks), client_epochs, "s per client-epoch")
    results["callbacks / fast loop, per epoch"] = round(fit / fast, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
