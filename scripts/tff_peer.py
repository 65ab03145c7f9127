"""TensorFlow Federated's whole run on this app's default start-up task (issue 17's peer).

Runs in its own virtualenv (TFF pins TensorFlow 2.14; keep it out of the project's dependencies):

    python3 -m uv venv --python 3.11 /work/tff-venv
    echo "jaxlib==0.4.13" > /tmp/tff-overrides.txt
    python3 -m uv pip install --python /work/tff-venv/bin/python --override /tmp/tff-overrides.txt \\
        tensorflow-federated==0.87.0 scikit-learn numpy
    /work/tff-venv/bin/python scripts/tff_peer.py

It imports only NumPy, scikit-learn, TensorFlow and TFF (never ``fl_app``) and prints one JSON line
on stdout: per-round seconds (training and centralized evaluation apart), the final centralized
accuracy and loss, and the seconds from the process's start (``/proc/self/stat``, so the
interpreter's own start counts) to the end. ``scripts/startup_vs_tff.py`` runs it against
``fl-keras-run``.

The task, and what matches the app's run
``fl-keras-run --clients 10 -- -c "partitioner='iid' local-epochs=1 learning-rate=0.005 batch-size=32
num-server-rounds=5 fraction-evaluate=0.01 min-evaluate-clients=0"``:

* data, identical arrays: scikit-learn's ``load_digits`` as (n, 8, 8, 1) float32 in [0, 1]
  (``images / 16``); the server's test set is 20% of every class held out with NumPy's
  ``default_rng(42)`` (``fl_app.task.data.stratified_split``: 359 examples); the rest is shuffled
  with ``default_rng(42)`` and cut into 10 equal contiguous parts (flwr-datasets'
  ``IidPartitioner``, as ``partition_indices``); each client keeps 80% of its part to train on
  (``split_train_test`` with seed ``42 + 1000 * (partition + 1)``), as the app's clients do;
* batches, identical: each round, client ``p`` trains on a permutation of its train split drawn
  from ``PCG64(42 + 7919 * p + round)`` cut into batches of 32, the last one partial (the app's
  compiled loop), one epoch;
* model: ``mlp``, Flatten, Dense 128 ReLU, Dense 64 ReLU, Dense 10 softmax, Glorot-uniform kernels
  seeded 42, 43, 44, zero biases; the initial global model is this Keras model's weights, set into
  TFF's state (TF 2.14 draws the same seeded initial weights as the app's TF 2.21: checked);
* training: sparse categorical cross-entropy on probabilities, a fresh Adam (learning rate 0.005,
  betas 0.9/0.999, epsilon 1e-7) per client per round, FedAvg weighted by training examples,
  server learning rate 1 (``build_weighted_fed_avg``, ``build_sgdm(1.0)``); all 10 clients every
  round;
* evaluation: centralized only, on the 359 held-out examples, before round 1 (the app's round 0)
  and after every round; the app's federated evaluation is off in that command
  (``fraction-evaluate=0.01`` samples no client).

What differs: TFF's own Adam (``tff.learning.optimizers.build_adam``), not Keras' (same update
rule and defaults); TensorFlow 2.14 and Keras 2.14 instead of 2.21 and tf-keras 2.21; TFF runs
all clients in its C++ executor (a ``worker_binary`` child process) with TensorFlow's default
thread pools, where the app runs them in two Ray actors of one thread each; the evaluation is a traced function on the
Keras model (the app's server evaluates the same way with its compiled loop); nothing is written
to disk (the app writes its run directory, model, history, plot, checkpoints and TensorBoard
events). TFF leaves its C++ ``worker_binary`` running after the script exits unless its
execution context is dropped; this script drops it at the end, so its whole run includes stopping
the worker.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

SEED = 42
SERVER_TEST_FRACTION = 0.2
CLIENT_TEST_FRACTION = 0.2


def process_age_s() -> float | None:
    """Seconds since this process started (``/proc``), or None off Linux."""
    try:
        with open("/proc/self/stat") as stat_file:
            stat = stat_file.read()
        with open("/proc/uptime") as uptime_file:
            uptime = float(uptime_file.read().split()[0])
    except OSError:
        return None
    start_ticks = int(stat[stat.rfind(")") + 2 :].split()[19])  # field 22, starttime
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- data (NumPy only)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """``fl_app.task.data.load_digits_arrays``: (n, 8, 8, 1) float32 in [0, 1], int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images.astype(np.float32) / 16.0)[..., np.newaxis], data.target.astype(np.int64)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``fl_app.task.data.stratified_split``: (keep, held_out) indices, ``fraction`` of each class held out."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        held.append(members[: int(round(fraction * len(members)))])
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(y)), held_out, assume_unique=True), held_out


def iid_partitions(n: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """``partition_indices(..., 'iid')``: a ``default_rng(seed)`` shuffle cut into contiguous parts,
    the first ``n % num_partitions`` one longer (``datasets.Dataset.shard(contiguous=True)``)."""
    return np.array_split(np.random.default_rng(seed).permutation(n), num_partitions)


def split_train_test(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """``fl_app.task.data.split_train_test``: a seeded shuffle, the last ``fraction`` as test."""
    order = np.random.default_rng(seed).permutation(len(y))
    num_test = min(int(round(fraction * len(y))), len(y) - 1)
    train, test = order[: len(y) - num_test], order[len(y) - num_test :]
    return x[train], y[train], x[test], y[test]


def federated_digits(num_clients: int, seed: int = SEED):
    """(clients' (x_train, y_train), server test (x, y)), as the app splits digits with ``iid``."""
    x, y = digits()
    keep, held_out = stratified_split(y, SERVER_TEST_FRACTION, seed)
    x_pool, y_pool = x[keep], y[keep]
    clients = []
    for pid, index in enumerate(iid_partitions(len(y_pool), num_clients, seed)):
        x_train, y_train, _, _ = split_train_test(
            x_pool[index], y_pool[index], CLIENT_TEST_FRACTION, seed + 1000 * (pid + 1)
        )
        clients.append((x_train, y_train))
    return clients, (x[held_out], y[held_out])


def epoch_orders(n: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The app's compiled loop's batch order: one ``PCG64(seed)`` permutation per epoch."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return [rng.permutation(n) for _ in range(epochs)]


def client_seed(partition: int, server_round: int, seed: int = SEED) -> int:
    """The app's per-fit shuffle seed (``node_client``: seed + 7919 * partition; + round per fit)."""
    return seed + 7919 * partition + server_round


# --------------------------------------------------------------------------- TFF


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.005)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tensorflow_federated as tff

    imported = time.perf_counter()
    clients, (x_test, y_test) = federated_digits(args.clients)
    layers = tf.keras.layers

    def mlp() -> tf.keras.Model:
        def init(offset: int):
            return tf.keras.initializers.GlorotUniform(seed=SEED + offset)

        return tf.keras.Sequential(
            [
                layers.Input(shape=(8, 8, 1)),
                layers.Flatten(),
                layers.Dense(128, activation="relu", kernel_initializer=init(0)),
                layers.Dense(64, activation="relu", kernel_initializer=init(1)),
                layers.Dense(10, activation="softmax", kernel_initializer=init(2)),
            ],
            name="mlp",
        )

    element_spec = (tf.TensorSpec([None, 8, 8, 1], tf.float32), tf.TensorSpec([None], tf.int64))

    def model_fn():
        return tff.learning.models.from_keras_model(
            mlp(),
            input_spec=element_spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )

    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_adam(learning_rate=args.learning_rate),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0),
    )
    tf.keras.utils.set_random_seed(SEED)
    evaluator = mlp()  # the seeded initial weights, and the server's evaluation model
    state = process.initialize()
    state = process.set_model_weights(
        state, tff.learning.models.ModelWeights(trainable=evaluator.get_weights(), non_trainable=[])
    )

    @tf.function
    def evaluate(x, y):
        probabilities = evaluator(x, training=False)
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, probabilities))
        accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(probabilities, axis=1), y), tf.float32))
        return loss, accuracy

    def centralized() -> tuple[float, float]:
        process.get_model_weights(state).assign_weights_to(evaluator)
        loss, accuracy = evaluate(x_test, y_test)
        return float(loss), float(accuracy)

    def round_data(server_round: int) -> list:
        datasets = []
        for pid, (x, y) in enumerate(clients):
            epochs = [
                tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(args.batch_size)
                for order in epoch_orders(len(y), args.local_epochs, client_seed(pid, server_round))
            ]
            dataset = epochs[0]
            for more in epochs[1:]:
                dataset = dataset.concatenate(more)
            datasets.append(dataset)
        return datasets

    ready = time.perf_counter()
    loss, accuracy = centralized()
    history = [{"round": 0, "loss": loss, "accuracy": accuracy}]
    round_s, train_s, eval_s = [], [], []
    first_round_started = time.perf_counter()
    for server_round in range(1, args.rounds + 1):
        began = time.perf_counter()
        state = process.next(state, round_data(server_round)).state
        trained = time.perf_counter()
        loss, accuracy = centralized()
        done = time.perf_counter()
        history.append({"round": server_round, "loss": loss, "accuracy": accuracy})
        round_s.append(round(done - began, 3))
        train_s.append(round(trained - began, 3))
        eval_s.append(round(done - trained, 3))
    age = process_age_s()
    # TFF runs the computations in a C++ `worker_binary` child that outlives this process (stopped
    # only by its service manager's __del__, which interpreter exit does not reliably call): drop
    # the default context and collect it, which stops the worker (SIGINT, then wait)
    from tensorflow_federated.python.core.impl.context_stack import set_default_context

    stopping = time.perf_counter()
    set_default_context.set_no_default_context()
    gc.collect()
    shutdown_s = time.perf_counter() - stopping
    print(
        json.dumps(
            {
                "tff": tff.__version__,
                "tensorflow": tf.__version__,
                "clients": args.clients,
                "rounds": args.rounds,
                "train_examples": [len(y) for _, y in clients],
                "test_examples": len(y_test),
                "round_s": round_s,
                "train_s": train_s,
                "eval_s": eval_s,
                "final_accuracy": history[-1]["accuracy"],
                "final_loss": history[-1]["loss"],
                "history": history,
                "imports_s": round(imported - STARTED, 2),
                "set_up_s": round(ready - imported, 2),  # data, process built and initialized, tracing
                "round_0_s": round(first_round_started - ready, 3),
                "script_s": round(time.perf_counter() - STARTED, 2),
                "process_s": None if age is None else round(age, 2),  # to the end of the last round
                "worker_shutdown_s": round(shutdown_s, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
