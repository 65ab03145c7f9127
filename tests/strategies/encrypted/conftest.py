"""Key pairs shared by the encrypted-aggregation tests (generated once per session: Paillier
key generation takes seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from strategies.encrypted.keys import generate_keys

PAILLIER_2048 = {"key_bits": 2048, "max_clients": 16}  # 112-bit: tests only (fast)


def write_keys(directory: Path, scheme: str, **params) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    secret, public = generate_keys(scheme, **params)
    (directory / "secret.key").write_bytes(secret)
    (directory / "public.key").write_bytes(public)
    return directory / "secret.key", directory / "public.key"


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("he-keys")
    return {
        "ckks": write_keys(root / "ckks", "ckks", max_clients=16),
        "paillier": write_keys(root / "paillier", "paillier", **PAILLIER_2048),
    }
