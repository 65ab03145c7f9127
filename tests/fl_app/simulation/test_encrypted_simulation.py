"""Integration: an encrypted (CKKS) federation through ``flwr run`` matches plaintext FedAvg."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from strategies.encrypted.keys import generate_keys
from tests.helpers import ROOT, run_to_completion

pytestmark = pytest.mark.integration

CONFIG = {
    "num-server-rounds": 3,
    "local-epochs": 1,
    "num-partitions": 4,
    "partitioner": "iid",
    "min-train-clients": 4,
    "min-evaluate-clients": 4,
    "min-available-clients": 4,
}


def test_ckks_federation_of_four_clients_matches_plaintext_fedavg(tmp_path):
    secret, public = generate_keys("ckks", max_clients=16)
    (tmp_path / "secret.key").write_bytes(secret)
    (tmp_path / "public.key").write_bytes(public)
    run_config = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in CONFIG.items())
    run = run_to_completion(
        tmp_path / "outputs",
        4,
        f"{run_config} homomorphic-encryption='ckks' he-public-key-path='{tmp_path / 'public.key'}' "
        f"he-secret-key-path='{tmp_path / 'secret.key'}'",
    )
    run_dir, history = run.run_dir, run.history
    assert [r["round"] for r in history] == [1, 2, 3]  # no round 0: the server cannot evaluate
    for record in history:
        assert record["clients_replied"] == 4 and record["clients_failed"] == 0, record["failures"]
        assert record["centralized_accuracy"] is None and record["federated_accuracy"] is not None
        extra = record["extra"]
        assert extra["he-aggregation-seconds"] > 0 and extra["he-encrypt-seconds-mean"] > 0
        assert record["bytes_received"] >= extra["he-ciphertext-bytes"] > 4 * 17_226 * 4  # > plaintext
    assert history[1]["extra"]["he-decrypt-seconds-mean"] > 0 and history[2]["extra"]["he-chain-bytes-sent"] > 0
    assert not (run_dir / "model.keras").exists()  # the server never had the trained model
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model file"].endswith("encrypted-model.npz")

    decrypted = tmp_path / "decrypted.keras"
    script = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "decrypt_model.py"),
            str(run_dir),
            "--secret-key",
            str(tmp_path / "secret.key"),
            "--out",
            str(decrypted),
            "--evaluate",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert script.returncode == 0, script.stderr[-3000:]
    assert "decrypted global version 3 (ckks)" in script.stdout and "server test set: accuracy" in script.stdout

    import tensorflow as tf

    from fl_app.simulation.local_grid import run_local_federation

    encrypted = tf.keras.models.load_model(decrypted).get_weights()
    plain, _ = run_local_federation({**CONFIG, "strategy": "fedavg"}, evaluate_centrally=False)
    difference = max(float(np.max(np.abs(a - b))) for a, b in zip(encrypted, plain.to_numpy_ndarrays()))
    print(f"max |encrypted - plaintext| over all weights after 3 rounds: {difference:.3g}")
    assert difference < 1e-4
