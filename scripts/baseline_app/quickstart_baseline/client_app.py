"""quickstart-tensorflow's ClientApp: a fresh compiled model per message, model.fit/evaluate."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart_baseline.task import load_data, load_model

app = ClientApp()


def _partition(context: Context):
    cfg = context.run_config
    return load_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                     int(cfg["seed"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    model = load_model(float(cfg["learning-rate"]), int(cfg["seed"]))
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    x_train, y_train, _, _ = _partition(context)
    history = model.fit(x_train, y_train, epochs=int(cfg["local-epochs"]),
                        batch_size=int(cfg["batch-size"]), verbose=0)
    metrics = {"train_loss": float(history.history["loss"][-1]),
               "train_acc": float(history.history["accuracy"][-1]),
               "num-examples": len(x_train)}
    content = RecordDict({"arrays": ArrayRecord(model.get_weights()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    model = load_model(float(cfg["learning-rate"]), int(cfg["seed"]))
    model.set_weights(msg.content["arrays"].to_numpy_ndarrays())
    _, _, x_test, y_test = _partition(context)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    metrics = {"eval_loss": float(loss), "eval_acc": float(accuracy), "num-examples": len(x_test)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
