"""Client-side cost per round, in one process (no Flower engine): where (b)'s time goes vs (a)'s.

For the default federation's clients (digits, Dirichlet 0.5, MLP, 5 local epochs), one round of
train + evaluate messages handled three ways, side by side, plus centralized training:

1. quickstart style: build and compile a fresh Keras model per message, ``model.fit``/``evaluate``;
2. one reused compiled model, ``model.fit``/``model.evaluate`` per message;
3. this app's ``KerasClient`` (reused model, compiled per-epoch train loop, compiled evaluation);
4. centralized ``model.fit`` on the pooled client train data for the same sample-epochs.

    uv run python scripts/client_cost.py --clients 10 --repeats 3
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

    results = {}
    for name, fn in (
        ("quickstart style", quickstart),
        ("reused model, model.fit", keras_reused),
        ("this app (KerasClient)", app),
        ("centralized, same sample-epochs", centralized),
    ):
        fn()  # warm-up: imports, tracing
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        results[name] = round(statistics.median(times), 3)
        print(f"{name:<34} {results[name]:8.3f} s per round (median of {args.repeats})", flush=True)
    results["quickstart / app"] = round(results["quickstart style"] / results["this app (KerasClient)"], 2)
    results["app / centralized"] = round(
        results["this app (KerasClient)"] / results["centralized, same sample-epochs"], 2
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
