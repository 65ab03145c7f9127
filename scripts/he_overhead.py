"""Overhead of encrypted aggregation against plaintext FedAvg, per scheme and model.

For each model (its parameter count P on the digits data) and scheme, with the keys' default
parameters unless told otherwise (CKKS: N = 8192, moduli (60, 40, 60), scale 2^40, 128-bit;
Paillier: 3072-bit modulus, 128-bit, 20 fraction bits, 71 values per plaintext), this measures:

* client encrypt seconds: one client encrypts its length-P update;
* server aggregation seconds: validate and add the ciphertexts of K clients;
* client decrypt seconds: one client decrypts the encrypted sum;
* bytes: one client's upload, the encrypted sum broadcast to each client, and per round
  (K uploads + K downloads), against float32 plaintext (4 P bytes each way).

The K summands are the same client's ciphertexts added K times: the cost of a homomorphic addition
does not depend on the plaintexts, and encrypting K distinct updates with Paillier at 3072 bits
would take K times as long without changing the figure. The decrypted sum is checked against
``K * x`` (max absolute error reported). Plaintext FedAvg's aggregation is timed on a K x P float32
matrix (``np.average`` with example weights). Nothing is extrapolated: every figure is measured on
the full parameter vector.

    python scripts/he_overhead.py --out outputs/he_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from strategies.homomorphic import generate_keys, load_client_scheme, load_server_scheme  # noqa: E402

MODEL_INPUTS = {"logreg": (64,), "mlp": (64,), "cnn": (8, 8, 1)}


def parameter_count(model: str) -> int:
    """Parameters of ``model`` on digits (8x8 images, 10 classes)."""
    from fl_app.models import build_model

    built = build_model(model, MODEL_INPUTS[model], 10, 0)
    return int(sum(np.prod(w.shape) for w in built.get_weights()))


def plaintext_aggregation_seconds(size: int, clients: int, repeats: int = 3) -> float:
    """Median seconds of FedAvg's weighted mean over a K x P float32 matrix."""
    rng = np.random.default_rng(0)
    updates = rng.standard_normal((clients, size), dtype=np.float32)
    weights = rng.integers(50, 200, clients).astype(np.float64)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.average(updates, axis=0, weights=weights)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def measure(scheme: str, size: int, clients: int, key_params: dict) -> dict:
    started = time.perf_counter()
    secret, public = generate_keys(scheme, **key_params)
    keygen = time.perf_counter() - started
    client, server = load_client_scheme(secret), load_server_scheme(public)
    x = np.random.default_rng(1).uniform(-1.0, 1.0, size)

    started = time.perf_counter()
    ciphertexts = client.encrypt(x)
    encrypt = time.perf_counter() - started

    started = time.perf_counter()
    for _ in range(clients):
        server.validate(ciphertexts, size)
    total = server.sum_ciphertexts([ciphertexts] * clients)
    aggregate = time.perf_counter() - started

    started = time.perf_counter()
    decrypted = client.decrypt_sum(total, size, num_summands=clients)
    decrypt = time.perf_counter() - started

    upload = sum(len(c) for c in ciphertexts)
    download = sum(len(c) for c in total)
    return {
        "scheme": scheme,
        "security-bits": server.security_bits,
        "parameters": str(server.parameters),
        "ciphertexts-per-client": len(ciphertexts),
        "keygen-seconds": keygen,
        "client-encrypt-seconds": encrypt,
        "server-aggregation-seconds": aggregate,
        "client-decrypt-seconds": decrypt,
        "upload-bytes-per-client": upload,
        "download-bytes-per-client": download,
        "bytes-per-round": clients * (upload + download),
        "max-abs-error-of-sum": float(np.max(np.abs(decrypted - clients * x))),
    }


def table(rows: list[dict]) -> str:
    header = (
        "| model | P | scheme | encrypt s/client | server aggregation s | decrypt s/client | "
        "upload MB/client | bytes per round (MB) | x plaintext |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        plain_round = r["plaintext-bytes-per-round"]
        if r["scheme"] == "plaintext":
            lines.append(
                f"| {r['model']} | {r['size']} | plaintext FedAvg | 0 | {r['server-aggregation-seconds']:.4f} | 0 | "
                f"{r['upload-bytes-per-client'] / 1e6:.3f} | {plain_round / 1e6:.2f} | 1 |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['size']} | {r['scheme']} ({r['security-bits']}-bit) | "
            f"{r['client-encrypt-seconds']:.2f} | {r['server-aggregation-seconds']:.3f} | "
            f"{r['client-decrypt-seconds']:.2f} | {r['upload-bytes-per-client'] / 1e6:.2f} | "
            f"{r['bytes-per-round'] / 1e6:.1f} | {r['bytes-per-round'] / plain_round:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(MODEL_INPUTS))
    parser.add_argument("--schemes", nargs="+", default=["ckks", "paillier"], choices=["ckks", "paillier"])
    parser.add_argument("--clients", type=int, default=10, help="K, clients per round (default 10)")
    parser.add_argument("--paillier-bits", type=int, default=3072)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    rows: list[dict] = []
    for model in args.models:
        size = parameter_count(model)
        plain = {
            "model": model, "size": size, "scheme": "plaintext",
            "server-aggregation-seconds": plaintext_aggregation_seconds(size, args.clients),
            "upload-bytes-per-client": 4 * size, "download-bytes-per-client": 4 * size,
            "plaintext-bytes-per-round": 2 * 4 * size * args.clients,
        }
        rows.append(plain)
        for scheme in args.schemes:
            params = {"key_bits": args.paillier_bits} if scheme == "paillier" else {}
            print(f"measuring {model} (P={size}) with {scheme} ...", flush=True)
            row = {"model": model, "size": size, **measure(scheme, size, args.clients, params)}
            row["plaintext-bytes-per-round"] = plain["plaintext-bytes-per-round"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=1))
    print(f"\nK = {args.clients} clients per round\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
