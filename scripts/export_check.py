"""Measure a run's exported model: float32 and int8 TFLite against Keras on the server test set.

Loads ``model.keras`` from a run directory (default: the newest, ``outputs/latest``), rebuilds the
run's server held-out test set from its ``config.json``, converts the model to float32 TFLite and
to int8 TFLite (calibrated, as the app does, on a random sample of the held-out set; repeated for
``--calibration-seeds`` different samples), and prints one JSON object: Keras accuracy, TFLite
accuracy, argmax agreement with Keras, size and per-example latency (one example per ``invoke``).

    uv run fl-keras-run -- -c "model='cnn' export='tflite'"
    uv run python scripts/export_check.py                      # measures outputs/latest
    uv run python scripts/export_check.py --run-dir outputs/<run> --calibration-seeds 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import fl_app  # noqa: F401  (Keras 2, before TensorFlow loads)
from fl_app.server.run_directory import latest_run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="default: the path in outputs/latest")
    parser.add_argument(
        "--calibration-samples", type=int, default=None, help="default: the run's export-calibration-samples"
    )
    parser.add_argument("--calibration-seeds", type=int, default=3, help="int8 conversions to measure")
    args = parser.parse_args()
    run_dir = args.run_dir or latest_run(ROOT / "outputs")
    if run_dir is None:
        raise SystemExit("no run directory: outputs/latest does not exist (pass --run-dir)")

    import tensorflow as tf

    from fl_app.config.settings import Settings
    from fl_app.delivery.export import to_tflite
    from fl_app.delivery.tflite import TFLitePredictor
    from fl_app.server.evaluation import model_spec

    settings = Settings.from_run_config(json.loads((run_dir / "config.json").read_text()))
    _, _, test_set = model_spec(settings)
    if test_set is None:
        raise SystemExit("the run has no server test set (dataset='local-file'): nothing to measure on")
    x, y = test_set
    model = tf.keras.models.load_model(run_dir / "model.keras")
    keras_pred = np.argmax(model.predict(x, batch_size=512, verbose=0), axis=-1)
    keras_acc = float(np.mean(keras_pred == y))
    samples = args.calibration_samples or settings.export_calibration_samples

    def measure(blob: bytes) -> dict:
        predictor = TFLitePredictor(blob)
        pred = np.argmax(predictor.predict(x), axis=-1)
        latency = predictor.latency(x, repeats=3)
        return {
            "size_bytes": len(blob),
            "accuracy": round(float(np.mean(pred == y)), 4),
            "accuracy_minus_keras_points": round(100 * (float(np.mean(pred == y)) - keras_acc), 2),
            "argmax_agreement_with_keras": round(float(np.mean(pred == keras_pred)), 5),
            "latency_ms_per_example": {
                "median": round(latency["median_seconds"] * 1e3, 4),
                "p90": round(latency["p90_seconds"] * 1e3, 4),
            },
        }

    started = time.perf_counter()
    result = {
        "run directory": str(run_dir),
        "model": settings.model,
        "dataset": settings.dataset,
        "strategy": settings.strategy,
        "rounds": settings.num_server_rounds,
        "test examples": int(len(y)),
        "keras": {
            "accuracy": round(keras_acc, 4),
            "parameters": int(model.count_params()),
            "model.keras bytes": (run_dir / "model.keras").stat().st_size,
        },
        "tflite float32": measure(to_tflite(model, "float32")),
        "tflite int8": [],
    }
    for seed in range(args.calibration_seeds):
        take = np.random.default_rng(seed).permutation(len(x))[:samples]
        entry = measure(to_tflite(model, "int8", x[take]))
        result["tflite int8"].append({"calibration seed": seed, "calibration samples": len(take), **entry})
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
