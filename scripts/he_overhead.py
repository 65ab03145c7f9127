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
matrix (``np.average`` with example weights). Seconds are reported as wall-clock and as CPU time
of this process (the table shows CPU time, which a machine shared with other jobs does not
inflate). Every figure is measured on the full parameter vector unless ``--paillier-subset`` is
given: then Paillier is timed on that many parameters and scaled by the ciphertext count, and the
row says "extrapolated".

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

from strategies.encrypted.keys import generate_keys, load_client_scheme, load_server_scheme

MODEL_INPUTS = {"logreg": (64,), "mlp": (64,), "cnn": (8, 8, 1)}


def parameter_count(model: str) -> int:
    """Parameters of ``model`` on digits (8x8 images, 10 classes)."""
    from fl_app.task.models import build_model

    built = build_model(model, MODEL_INPUTS[model], 10, 0)
    return int(sum(np.prod(w.shape) for w in built.get_weights()))


def plaintext_aggregation_seconds(size: int, clients: int, repeats: int = 5) -> tuple[float, float]:
    """Median (wall, CPU) seconds of FedAvg's weighted mean over a K x P float32 matrix."""
    rng = np.random.default_rng(0)
    updates = rng.standard_normal((clients, size), dtype=np.float32)
    weights = rng.integers(50, 200, clients).astype(np.float64)
    walls, cpus = [], []
    for _ in range(repeats):
        with Timer() as timer:
            np.average(updates, axis=0, weights=weights)
        walls.append(timer.wall)
        cpus.append(timer.cpu)
    return float(np.median(walls)), float(np.median(cpus))


class Timer:
    """Wall-clock and CPU seconds of this process (CPU time is what a loaded machine does not inflate)."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def measure(scheme: str, size: int, clients: int, key_params: dict, subset: int = 0) -> dict:
    """Measure one scheme on a length-``size`` vector.

    With ``0 < subset < size`` the timings are measured on the first ``subset`` values and scaled
    by the ratio of ciphertext counts (each ciphertext is encrypted, added and decrypted
    independently, so the cost is linear in their number); the row says so. Byte counts are exact
    (Paillier ciphertexts have a fixed size).
    """
    with Timer() as keygen:
        secret, public = generate_keys(scheme, **key_params)
    client, server = load_client_scheme(secret), load_server_scheme(public)
    measured = subset if 0 < subset < size else size
    scale = server.num_ciphertexts(size) / server.num_ciphertexts(measured)
    x = np.random.default_rng(1).uniform(-1.0, 1.0, measured)

    with Timer() as encrypt:
        ciphertexts = client.encrypt(x)
    with Timer() as aggregate:
        for _ in range(clients):
            server.validate(ciphertexts, measured)
        total = server.sum_ciphertexts([ciphertexts] * clients)
    with Timer() as decrypt:
        decrypted = client.decrypt_sum(total, measured, num_summands=clients)

    upload = sum(len(c) for c in ciphertexts) * scale
    download = sum(len(c) for c in total) * scale
    row = {
        "scheme": scheme,
        "security-bits": server.security_bits,
        "parameters": str(server.parameters),
        "ciphertexts-per-client": server.num_ciphertexts(size),
        "keygen-seconds": keygen.wall,
        "max-abs-error-of-sum": float(np.max(np.abs(decrypted - clients * x))),
        "upload-bytes-per-client": int(upload),
        "download-bytes-per-client": int(download),
        "bytes-per-round": int(clients * (upload + download)),
        "measured-parameters": measured,
        "extrapolated": measured < size,
    }
    for name, timer in (("client-encrypt", encrypt), ("server-aggregation", aggregate), ("client-decrypt", decrypt)):
        row[f"{name}-seconds"] = timer.wall * scale
        row[f"{name}-cpu-seconds"] = timer.cpu * scale
    return row


def table(rows: list[dict]) -> str:
    header = (
        "| model | P | scheme | encrypt s/client (CPU) | server aggregation s (CPU) | decrypt s/client (CPU) | "
        "upload MB/client | bytes per round (MB) | x plaintext |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        plain_round = r["plaintext-bytes-per-round"]
        if r["scheme"] == "plaintext":
            lines.append(
                f"| {r['model']} | {r['size']} | plaintext FedAvg | 0 | {r['server-aggregation-cpu-seconds']:.4f} | 0 | "
                f"{r['upload-bytes-per-client'] / 1e6:.3f} | {plain_round / 1e6:.2f} | 1 |"
            )
            continue
        note = f", extrapolated from {r['measured-parameters']} params" if r["extrapolated"] else ""
        lines.append(
            f"| {r['model']} | {r['size']} | {r['scheme']} ({r['security-bits']}-bit{note}) | "
            f"{r['client-encrypt-cpu-seconds']:.2f} | {r['server-aggregation-cpu-seconds']:.3f} | "
            f"{r['client-decrypt-cpu-seconds']:.2f} | {r['upload-bytes-per-client'] / 1e6:.2f} | "
            f"{r['bytes-per-round'] / 1e6:.1f} | {r['bytes-per-round'] / plain_round:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(MODEL_INPUTS))
    parser.add_argument("--schemes", nargs="+", default=["ckks", "paillier"], choices=["ckks", "paillier"])
    parser.add_argument("--clients", type=int, default=10, help="K, clients per round (default 10)")
    parser.add_argument("--paillier-bits", type=int, default=3072)
    parser.add_argument(
        "--paillier-subset",
        type=int,
        default=0,
        help="time Paillier on the first N parameters of larger models and scale linearly by the "
        "number of ciphertexts (0: measure everything; rows say when they are extrapolated)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    rows: list[dict] = []
    for model in args.models:
        size = parameter_count(model)
        wall, cpu = plaintext_aggregation_seconds(size, args.clients)
        plain = {
            "model": model,
            "size": size,
            "scheme": "plaintext",
            "server-aggregation-seconds": wall,
            "server-aggregation-cpu-seconds": cpu,
            "upload-bytes-per-client": 4 * size,
            "download-bytes-per-client": 4 * size,
            "plaintext-bytes-per-round": 2 * 4 * size * args.clients,
        }
        rows.append(plain)
        for scheme in args.schemes:
            params = {"key_bits": args.paillier_bits} if scheme == "paillier" else {}
            print(f"measuring {model} (P={size}) with {scheme} ...", flush=True)
            subset = args.paillier_subset if scheme == "paillier" else 0
            row = {"model": model, "size": size, **measure(scheme, size, args.clients, params, subset)}
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
