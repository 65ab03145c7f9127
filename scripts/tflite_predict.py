"""On-device inference: a ``.tflite`` model and a local data file, the TFLite interpreter only.

No Keras and no model code: the interpreter (``ai_edge_litert``, ``tflite_runtime`` or
``tensorflow.lite``, whichever is installed) runs the flatbuffer that the federated run exported.
Prints the model size, the predictions, the per-example latency (one example per ``invoke()``, as
an app on a phone would call it) and, when the file has labels, the accuracy.

    uv run python scripts/tflite_predict.py outputs/latest-run/export/final_int8.tflite data.npz
    uv run python scripts/tflite_predict.py model.tflite data.csv --label-column label --json

The data file is ``.npz`` with an array ``x`` (and optionally ``y``), or a CSV with a header (the
label column, when present, is left out of the features). On a device, copy this script,
``fl_app/delivery/tflite.py`` (into the same folder; the only module it takes from this project:
numpy and the interpreter, nothing else) and the ``.tflite`` file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np


def load_tflite_infer():
    """``tflite.py`` from beside this script (on a device) or from ``fl_app/delivery/``, loaded by
    path: importing the ``fl_app`` package would set ``TF_USE_LEGACY_KERAS=1``, and TensorFlow
    then loads ``tf_keras`` at import, which an interpreter-only program has no use for."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "tflite.py", here.parent / "fl_app" / "delivery" / "tflite.py"):
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("tflite_infer", candidate)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise SystemExit("tflite.py not found beside this script nor in ../fl_app/delivery/")


TFLitePredictor = load_tflite_infer().TFLitePredictor


def read_examples(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (float32) and labels (or None) from ``.npz`` (``x``, optional ``y``) or CSV."""
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise SystemExit(f"{path}: an .npz data file needs an array 'x' (it has {archive.files})")
            x = archive["x"].astype(np.float32)
            y = archive["y"].astype(np.int64).reshape(-1) if "y" in archive.files else None
        return x, y
    if path.suffix.lower() == ".csv":
        header = path.read_text(encoding="utf-8").splitlines()[0].split(",")
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
        if label_column in header:
            column = header.index(label_column)
            return np.delete(table, column, axis=1), table[:, column].astype(np.int64)
        return table, None
    raise SystemExit(f"{path}: the data file must be .npz or .csv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the .tflite file")
    parser.add_argument("data", type=Path, help=".npz (x, optional y) or .csv")
    parser.add_argument("--label-column", default="label", help="label column of a CSV file")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N examples")
    parser.add_argument("--show", type=int, default=10, help="print the first N predictions")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    predictor = TFLitePredictor.from_file(args.model, num_threads=args.threads)
    x, y = read_examples(args.data, args.label_column)
    if args.limit:
        x, y = x[: args.limit], (y[: args.limit] if y is not None else None)
    probabilities = predictor.predict(x)
    predicted = np.argmax(probabilities, axis=-1)
    latency = predictor.latency(x)
    result = {
        "model": str(args.model),
        "model_size_bytes": predictor.size_bytes,
        "input": {"shape": list(predictor.example_shape), "dtype": predictor.input_dtype},
        "interpreter": predictor.interpreter_package,
        "tf_keras_loaded": any(m.split(".")[0] == "tf_keras" for m in sys.modules),
        "examples": int(len(x)),
        "latency_per_example_ms": {
            "median": latency["median_seconds"] * 1e3,
            "p90": latency["p90_seconds"] * 1e3,
            "mean": latency["mean_seconds"] * 1e3,
        },
        "predictions": predicted.tolist(),
        "accuracy": float(np.mean(predicted == y)) if y is not None else None,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"model        {args.model} ({predictor.size_bytes / 1024:.1f} KiB, input "
        f"{predictor.input_dtype} {predictor.example_shape}, interpreter {predictor.interpreter_package})"
    )
    print(f"examples     {len(x)}")
    for i in range(min(args.show, len(x))):
        label = f" (label {y[i]})" if y is not None else ""
        print(f"  #{i}: class {predicted[i]} p={probabilities[i, predicted[i]]:.3f}{label}")
    ms = result["latency_per_example_ms"]
    print(
        f"latency      {ms['median']:.3f} ms per example (median; p90 {ms['p90']:.3f}, "
        f"mean {ms['mean']:.3f}; one example per invoke)"
    )
    if y is not None:
        print(f"accuracy     {result['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
