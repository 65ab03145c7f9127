"""Tests of strategies.encrypted: encrypted sums, key separation, overflow, key files."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import paillier

from strategies.encrypted.ckks import CkksParameters
from strategies.encrypted.keys import KEY_MAGIC, generate_keys, load_client_scheme, load_server_scheme
from strategies.encrypted.packing import pack_slots, unpack_slots
from strategies.encrypted.paillier import PaillierParameters

REPO = Path(__file__).resolve().parents[3]
NUM_CLIENTS = 4
PAILLIER_TEST = {"key_bits": 2048, "fraction_bits": 16, "value_bits": 24, "max_clients": 4}


def key_payload(blob: bytes) -> tuple[dict, bytes]:
    """Split a key file into its JSON header and payload (format in the module docstring)."""
    start = len(KEY_MAGIC) + 4
    length = int.from_bytes(blob[len(KEY_MAGIC) : start], "big")
    return json.loads(blob[start : start + length]), blob[start + length :]


def relabel_as_public(secret: bytes) -> bytes:
    """A forged key file: the secret payload under a header claiming ``public``."""
    forged = secret.replace(b'"kind": "secret"', b'"kind": "public"', 1)
    assert forged != secret
    return forged


@pytest.fixture(scope="module")
def ckks_keys() -> tuple[bytes, bytes]:
    return generate_keys("ckks", max_clients=NUM_CLIENTS)


@pytest.fixture(scope="module")
def paillier_keys() -> tuple[bytes, bytes]:
    return generate_keys("paillier", **PAILLIER_TEST)


@pytest.fixture(scope="module")
def updates() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.uniform(-1.0, 1.0, size=9_000).astype(np.float32) for _ in range(NUM_CLIENTS)]


def exact_sum(vectors: list[np.ndarray]) -> np.ndarray:
    return np.sum(np.stack(vectors).astype(np.float64), axis=0)


# --- CKKS -----------------------------------------------------------------------------------


def test_ckks_sum_of_four_clients_decrypts_to_plaintext_sum(ckks_keys, updates):
    secret, public = ckks_keys
    client, server = load_client_scheme(secret), load_server_scheme(public)
    size = updates[0].size
    ciphertexts = [client.encrypt(u) for u in updates]
    assert len(ciphertexts[0]) == 3  # 9000 values in 4096-slot chunks, the last one partial
    for c in ciphertexts:
        server.validate(c, size)
    total = server.sum_ciphertexts(ciphertexts)
    decrypted = client.decrypt_sum(total, size, num_summands=NUM_CLIENTS)
    assert decrypted.dtype == np.float32 and decrypted.shape == (size,)
    np.testing.assert_allclose(decrypted, exact_sum(updates), rtol=0, atol=1e-5)


def test_ckks_add_equals_sum_and_weighted_mean(ckks_keys, updates):
    secret, public = ckks_keys
    client, server = load_client_scheme(secret), load_server_scheme(public)
    weights = [10.0, 30.0]
    a, b = (client.encrypt(np.float32(w) * u) for w, u in zip(weights, updates[:2]))
    mean = client.decrypt_sum(server.add(a, b), updates[0].size, num_summands=2) / sum(weights)
    expected = (weights[0] * updates[0].astype(np.float64) + weights[1] * updates[1]) / 40.0
    np.testing.assert_allclose(mean, expected, rtol=0, atol=1e-5)


def test_ckks_server_cannot_decrypt(ckks_keys, updates):
    secret, public = ckks_keys
    server = load_server_scheme(public)
    assert not server.can_decrypt
    total = server.sum_ciphertexts([load_client_scheme(secret).encrypt(updates[0])])
    with pytest.raises(ValueError, match="cannot decrypt"):
        server.decrypt_sum(total, updates[0].size, num_summands=1)
    with pytest.raises(ValueError, match="cannot encrypt"):
        server.encrypt(updates[0])
    # TenSEAL itself: the server's context has no secret key and refuses to decrypt.
    context = ts.context_from(key_payload(public)[1])
    assert not context.is_private()
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(context, total[0]).decrypt()


def test_ckks_validate_rejects_malformed_replies(ckks_keys, updates):
    secret, public = ckks_keys
    client, server = load_client_scheme(secret), load_server_scheme(public)
    size = updates[0].size
    good = client.encrypt(updates[0])
    with pytest.raises(ValueError, match="needs 3 ciphertexts"):
        server.validate(good[:2], size)
    with pytest.raises(ValueError, match="cannot be parsed"):
        server.validate([good[0], b"garbage" * 10, good[2]], size)
    with pytest.raises(ValueError, match="holds 4096 values, expected"):
        server.validate([good[0], good[1], good[1]], size)
    other_scale_secret, _ = generate_keys("ckks", scale_bits=30, max_clients=NUM_CLIENTS)
    foreign = load_client_scheme(other_scale_secret).encrypt(updates[0])
    with pytest.raises(ValueError, match="not a fresh encryption"):
        server.validate(foreign, size)
    with pytest.raises(ValueError, match="cannot be added"):
        server.sum_ciphertexts([good, foreign])


def test_ckks_refuses_values_and_summands_that_could_overflow():
    secret, public = generate_keys("ckks", coeff_mod_bit_sizes=(60, 60), max_clients=8)
    client, server = load_client_scheme(secret), load_server_scheme(public)
    assert client.parameters.max_abs_value == 2.0**19 / 8
    client.encrypt(np.array([2.0**16, -(2.0**16)], dtype=np.float32))
    with pytest.raises(ValueError, match="exceeds the ckks bound"):
        client.encrypt(np.array([0.0, 2.0**16 + 1], dtype=np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        client.encrypt(np.array([0.0, np.nan], dtype=np.float32))
    one = client.encrypt(np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match="max_clients=8"):
        server.sum_ciphertexts([one] * 9)


# --- Paillier -------------------------------------------------------------------------------


def paillier_test_vectors(parameters: PaillierParameters) -> list[np.ndarray]:
    """Four clients: random values, negatives, and both ends of the range in the same slots."""
    rng = np.random.default_rng(11)
    vectors = []
    for _ in range(NUM_CLIENTS):
        x = rng.uniform(-100.0, 100.0, size=160)
        x[:3] = [parameters.max_value, parameters.min_value, 0.0]
        x[-1] = parameters.max_value  # in the last, partly padded plaintext
        vectors.append(x.astype(np.float32))
    return vectors


def test_paillier_sum_is_exact_on_the_fixed_point_grid(paillier_keys):
    secret, public = paillier_keys
    client, server = load_client_scheme(secret), load_server_scheme(public)
    parameters = client.parameters
    assert parameters.bits_per_slot == 24 + 2 + 1
    assert parameters.slots_per_plaintext == 2047 // 27
    vectors = paillier_test_vectors(parameters)
    size = vectors[0].size
    ciphertexts = [client.encrypt(v) for v in vectors]
    assert all(len(blob) == 512 for c in ciphertexts for blob in c)  # n^2 of a 2048-bit n
    for c in ciphertexts:
        server.validate(c, size)
    decrypted = client.decrypt_sum(server.sum_ciphertexts(ciphertexts), size, NUM_CLIENTS)
    scale = 2.0**parameters.fraction_bits
    quantised_sum = np.sum([np.rint(v.astype(np.float64) * scale) for v in vectors], axis=0)
    np.testing.assert_array_equal(decrypted, (quantised_sum / scale).astype(np.float32))
    # Precision bound: K * 2^-(f+1) of quantisation plus the float32 rounding of the result.
    bound = NUM_CLIENTS * 2.0 ** -(parameters.fraction_bits + 1) + np.abs(decrypted) * 2.0**-24
    assert np.all(np.abs(decrypted - exact_sum(vectors)) <= bound)
    assert decrypted[0] == NUM_CLIENTS * parameters.max_value
    assert decrypted[1] == NUM_CLIENTS * parameters.min_value


def test_paillier_refuses_out_of_range_values_instead_of_wrapping(paillier_keys):
    client = load_client_scheme(paillier_keys[0])
    parameters = client.parameters
    step = 2.0**-parameters.fraction_bits
    client.encrypt(np.array([parameters.max_value, parameters.min_value]))
    for bad in (parameters.max_value + step, parameters.min_value - step, 1e9, -1e9):
        with pytest.raises(ValueError, match="outside the paillier fixed-point range"):
            client.encrypt(np.array([0.5, bad, -0.5]))
    with pytest.raises(ValueError, match="non-finite"):
        client.encrypt(np.array([np.inf]))
    with pytest.raises(ValueError, match="1-D float vector"):
        client.encrypt(np.ones((2, 2)))


def test_paillier_overflow_of_the_sum_is_detected(paillier_keys):
    secret, public = paillier_keys
    client, server = load_client_scheme(secret), load_server_scheme(public)
    top = client.encrypt(np.full(5, client.parameters.max_value))
    with pytest.raises(ValueError, match="max_clients=4"):
        server.sum_ciphertexts([top] * (NUM_CLIENTS + 1))
    total = server.sum_ciphertexts([top] * NUM_CLIENTS)
    with pytest.raises(ValueError, match="num_summands is wrong"):
        client.decrypt_sum(total, 5, num_summands=1)


def test_paillier_server_cannot_decrypt_and_validates(paillier_keys):
    secret, public = paillier_keys
    client, server = load_client_scheme(secret), load_server_scheme(public)
    assert not server.can_decrypt and client.can_decrypt
    good = client.encrypt(np.array([1.0, -2.0]))
    with pytest.raises(ValueError, match="cannot decrypt"):
        server.decrypt_sum(good, 2, num_summands=1)
    with pytest.raises(ValueError, match="must be 512 bytes"):
        server.validate([good[0][:-1]], 2)
    with pytest.raises(ValueError, match=r"outside \(0, n\^2\)"):
        server.validate([b"\xff" * 512], 2)
    with pytest.raises(ValueError, match="needs 1 ciphertexts"):
        server.validate(good + good, 2)
    n = server._n  # the public modulus
    for forged in (n, 2 * n, n * n - n):  # in (0, n^2) but not in Z*_{n^2}: made without any key
        with pytest.raises(ValueError, match="not invertible modulo n\\^2"):
            server.validate([forged.to_bytes(512, "big")], 2)


def test_paillier_ciphertexts_are_textbook_paillier(paillier_keys):
    """Our CRT encryption decrypts with phe, and phe's encryption adds with ours."""
    secret, public = paillier_keys
    client, server = load_client_scheme(secret), load_server_scheme(public)
    fields = {k: int(v) for k, v in json.loads(key_payload(secret)[1]).items()}
    public_key = paillier.PaillierPublicKey(fields["n"])
    private_key = paillier.PaillierPrivateKey(public_key, fields["p"], fields["q"])
    parameters = client.parameters
    x = np.array([1.5, -0.25, 3.0])
    codes = np.rint(x * 2**parameters.fraction_bits).astype(np.int64) + parameters.offset
    plaintext = sum(int(c) << (j * parameters.bits_per_slot) for j, c in enumerate(codes))
    ours = client.encrypt(x)
    assert private_key.raw_decrypt(int.from_bytes(ours[0], "big")) == plaintext
    theirs = [public_key.raw_encrypt(plaintext).to_bytes(512, "big")]
    total = server.add(ours, theirs)
    np.testing.assert_array_equal(client.decrypt_sum(total, 3, num_summands=2), 2 * x)
    assert client.encrypt(x) != ours  # randomised encryption


@settings(max_examples=40, deadline=None)
@given(
    bits_per_slot=st.integers(1, 63),
    rows=st.integers(1, 4),
    slots=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_slots_matches_shift_and_or_and_round_trips(bits_per_slot, rows, slots, seed):
    rng = np.random.default_rng(seed)
    high = 2**bits_per_slot
    codes = rng.integers(0, high, size=(rows, slots), dtype=np.uint64).astype(np.int64)
    codes[0, 0] = high - 1
    packed = pack_slots(codes, bits_per_slot)
    reference = [sum(int(c) << (j * bits_per_slot) for j, c in enumerate(row)) for row in codes.tolist()]
    assert packed == reference
    np.testing.assert_array_equal(unpack_slots(packed, slots, bits_per_slot), codes)


def test_unpack_slots_rejects_bits_above_the_packed_slots():
    with pytest.raises(ValueError, match="overflowed"):
        unpack_slots([1 << 30], slots=3, bits_per_slot=10)


# --- keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["ckks", "paillier"])
def test_server_refuses_secret_key_material(scheme, ckks_keys, paillier_keys):
    secret, public = {"ckks": ckks_keys, "paillier": paillier_keys}[scheme]
    with pytest.raises(ValueError, match="refuses secret key material"):
        load_server_scheme(secret)
    with pytest.raises(ValueError, match="refuses secret key material"):
        load_server_scheme(relabel_as_public(secret))
    with pytest.raises(ValueError, match="needs the secret key"):
        load_client_scheme(public)
    with pytest.raises(ValueError, match="not a key file"):
        load_server_scheme(key_payload(public)[1])


@pytest.mark.parametrize("scheme", ["ckks", "paillier"])
def test_key_bytes_round_trip_between_instances(scheme, ckks_keys, paillier_keys):
    secret, public = {"ckks": ckks_keys, "paillier": paillier_keys}[scheme]
    x = np.linspace(-1.0, 1.0, 50, dtype=np.float32)
    ciphertexts = load_client_scheme(secret).encrypt(x)
    total = load_server_scheme(public).sum_ciphertexts([ciphertexts])
    decrypted = load_client_scheme(bytes(secret)).decrypt_sum(total, 50, num_summands=1)
    np.testing.assert_allclose(decrypted, x, rtol=0, atol=1e-5)
    header, _ = key_payload(public)
    assert header["scheme"] == scheme and header["kind"] == "public"
    assert load_server_scheme(public).parameters == load_client_scheme(secret).parameters


def test_key_header_must_match_the_key_material(ckks_keys, paillier_keys):
    ckks_public = ckks_keys[1].replace(b'"scale_bits": 40', b'"scale_bits": 41', 1)
    with pytest.raises(ValueError, match="inconsistent"):
        load_server_scheme(ckks_public)
    paillier_public = paillier_keys[1].replace(b'"key_bits": 2048', b'"key_bits": 2050', 1)
    with pytest.raises(ValueError, match="modulus has 2048 bits"):
        load_server_scheme(paillier_public)


def test_parameters_refuse_insecure_or_unknown_settings():
    with pytest.raises(ValueError, match="key_bits must be >= 2048"):
        generate_keys("paillier", key_bits=1024)
    with pytest.raises(ValueError, match="218 bits allowed for 128-bit"):
        generate_keys("ckks", coeff_mod_bit_sizes=(60, 60, 60, 60))
    with pytest.raises(ValueError, match="scheme must be one of"):
        generate_keys("rsa")
    with pytest.raises(ValueError, match="unknown PaillierParameters"):
        generate_keys("paillier", bits=3072)
    with pytest.raises(ValueError, match="must be <= 63"):
        PaillierParameters(value_bits=53, max_clients=2**20)
    assert CkksParameters().security_bits == 128
    assert CkksParameters(coeff_mod_bit_sizes=(60, 40, 40, 60)).security_bits == 128
    assert PaillierParameters().security_bits == 128
    assert PaillierParameters(key_bits=2048).security_bits == 112
    assert PaillierParameters().slots_per_plaintext == 3071 // 43


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_he_keys.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_make_he_keys_script_writes_both_files(tmp_path):
    out = tmp_path / "keys"
    result = run_script("--scheme", "paillier", "--paillier-bits", "2048", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr
    secret_path, public_path = out / "secret.key", out / "public.key"
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert "112-bit security" in result.stdout
    assert str(secret_path) in result.stdout and str(public_path) in result.stdout
    server = load_server_scheme(public_path.read_bytes())
    client = load_client_scheme(secret_path.read_bytes())
    assert server.parameters.key_bits == 2048 and client.can_decrypt and not server.can_decrypt

    refused = run_script("--scheme", "ckks", "--out-dir", str(out))
    assert refused.returncode == 2 and "--force" in refused.stderr
    forced = run_script("--scheme", "ckks", "--out-dir", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "128-bit security" in forced.stdout
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert load_server_scheme(public_path.read_bytes()).name == "ckks"
