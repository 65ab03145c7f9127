"""Reconstruct the final global model of an encrypted run (needs the clients' secret key).

With ``homomorphic-encryption`` the server never holds the trained model: it writes the initial
model ``G_0`` and the chain of encrypted sums to ``<run dir>/encrypted-model.npz``. A key holder
(any client, or the operator who generated the keys) rebuilds ``G_v = G_{v-1} + Dec(S_v) / W_v``
exactly as every client does, and saves it as a Keras model::

    python scripts/decrypt_model.py outputs/latest --secret-key keys/secret.key
    python scripts/decrypt_model.py outputs/<run>/ --secret-key keys/secret.key --evaluate

The model is built from the run's ``config.json``; ``--evaluate`` reports the accuracy on the
server's held-out test set (the figure the server cannot compute itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fl_app  # noqa: F401  (loads TenSEAL before TensorFlow)
from fl_app.server.run_directory import latest_run
from strategies.core.update_matrix import ModelLayout
from strategies.encrypted.keys import load_client_scheme
from strategies.encrypted.strategy import load_encrypted_model, reconstruct


def run_directory(path: Path) -> Path:
    """A run directory, or the one that ``<output-dir>/latest`` names."""
    if (path / "encrypted-model.npz").is_file():
        return path
    named = latest_run(path.parent) if path.name == "latest" else latest_run(path)
    if named is not None:
        return named
    raise FileNotFoundError(f"{path} holds no encrypted-model.npz")


def decrypt_weights(model_file: Path, secret_key: Path) -> tuple[dict, list]:
    """(meta, the final global weights as arrays of the model's shapes)."""

    meta, initial, chain = load_encrypted_model(model_file)
    scheme = load_client_scheme(secret_key.read_bytes())
    layout = ModelLayout.of_arrays(initial)
    final = reconstruct(scheme, layout.flatten_arrays(initial), chain)
    return meta, layout.unflatten_arrays(final)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run directory, or the output directory (uses its 'latest')")
    parser.add_argument("--secret-key", type=Path, required=True, help="the clients' secret.key")
    parser.add_argument("--out", type=Path, default=None, help="default: <run dir>/model.keras")
    parser.add_argument("--evaluate", action="store_true", help="report accuracy on the server test set")
    args = parser.parse_args(argv)

    run_dir = run_directory(args.run)
    meta, weights = decrypt_weights(run_dir / "encrypted-model.npz", args.secret_key)

    from flwr.app import ArrayRecord

    from fl_app.config.settings import Settings
    from fl_app.server.evaluation import CentralEvaluator, model_spec
    from fl_app.task.models import build_model

    settings = Settings.from_run_config(json.loads((run_dir / "config.json").read_text()))
    input_shape, num_classes, test_set = model_spec(settings)
    model = build_model(settings.model, input_shape, num_classes, settings.seed)
    model.set_weights(weights)
    out = args.out or run_dir / "model.keras"
    model.save(out)
    print(f"decrypted global version {meta['version']} ({meta['scheme']}) -> {out}")
    if args.evaluate and test_set is not None:
        result = CentralEvaluator(model, *test_set)(meta["version"], ArrayRecord(weights))
        print(f"server test set: accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
