"""quickstart-tensorflow's ServerApp: Flower's FedAvg and ``strategy.start``.

The only addition: an ``evaluate_fn`` that evaluates nothing and records the time at which each
round ends (Flower calls it after round 0 and after every round), written to
``<output-dir>/baseline-times.json`` for scripts/benchmark.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from quickstart_baseline.task import load_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    started = time.time()
    model = load_model(float(cfg["learning-rate"]), int(cfg["seed"]))
    arrays = ArrayRecord(model.get_weights())
    strategy = FedAvg(fraction_train=float(cfg["fraction-train"]),
                      fraction_evaluate=float(cfg["fraction-evaluate"]))
    out = Path(str(cfg["output-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    ends: list[float] = []

    def record_time(server_round: int, _arrays: ArrayRecord):
        ends.append(time.time())
        (out / "baseline-times.json").write_text(json.dumps({"started": started, "round_ends": ends}))
        return None

    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(cfg["num-server-rounds"]),
                   train_config=ConfigRecord({"lr": float(cfg["learning-rate"])}),
                   evaluate_fn=record_time)
