"""Key files: generation, and loading the client's (secret) or the server's (public) scheme."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from phe import paillier

from strategies.encrypted.ckks import CkksParameters, CkksScheme, load_context
from strategies.encrypted.paillier import PaillierParameters, PaillierScheme, paillier_key_fields
from strategies.encrypted.scheme import HomomorphicScheme
from strategies.encrypted.tenseal_loader import tenseal as ts

SchemeName = Literal["ckks", "paillier"]


SCHEMES: tuple[str, ...] = ("ckks", "paillier")


KEY_MAGIC = b"FLHEKEY1"


_HEADER_LENGTH_BYTES = 4


def generate_keys(scheme: SchemeName, **params: Any) -> tuple[bytes, bytes]:
    """Generate ``(secret_key_bytes, public_bytes)`` for ``scheme``.

    The secret bytes (all clients) can encrypt and decrypt; the public bytes (the server) can
    only add. ``params`` are the fields of :class:`CkksParameters` (``poly_modulus_degree``,
    ``coeff_mod_bit_sizes``, ``scale_bits``, ``max_clients``) or :class:`PaillierParameters`
    (``key_bits``, ``fraction_bits``, ``value_bits``, ``max_clients``); the defaults give
    128-bit security. Paillier key generation takes a few seconds at 3072 bits.

    Raises:
        ValueError: unknown scheme or parameter, or parameters below 112/128-bit security.
    """
    if scheme == "ckks":
        ckks = _parameters_from(CkksParameters, params)
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=ckks.poly_modulus_degree,
            coeff_mod_bit_sizes=list(ckks.coeff_mod_bit_sizes),
        )
        context.global_scale = 2.0**ckks.scale_bits
        without_evaluation_keys = {"save_galois_keys": False, "save_relin_keys": False}
        secret = context.serialize(save_secret_key=True, **without_evaluation_keys)
        context.make_context_public()
        public = context.serialize(save_secret_key=False, **without_evaluation_keys)
        return _wrap_key("ckks", "secret", ckks, secret), _wrap_key("ckks", "public", ckks, public)
    if scheme == "paillier":
        pai = _parameters_from(PaillierParameters, params)
        public_key, private_key = paillier.generate_paillier_keypair(n_length=pai.key_bits)
        secret = {"n": str(public_key.n), "p": str(private_key.p), "q": str(private_key.q)}
        public = {"n": str(public_key.n)}
        return (
            _wrap_key("paillier", "secret", pai, json.dumps(secret).encode()),
            _wrap_key("paillier", "public", pai, json.dumps(public).encode()),
        )
    raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")


def load_client_scheme(secret_bytes: bytes) -> HomomorphicScheme:
    """A scheme that encrypts and decrypts, from the secret key bytes of :func:`generate_keys`.

    Raises:
        ValueError: the bytes are not a key file, or are the public (server) key.
    """
    scheme, kind, parameters, payload = _unwrap_key(secret_bytes)
    if kind != "secret":
        raise ValueError("load_client_scheme needs the secret key (secret.key), got the public (server) key")
    if scheme == "ckks":
        context = load_context(payload)
        if not context.is_private():
            raise ValueError("the ckks secret key file holds no secret key")
        assert isinstance(parameters, CkksParameters)  # _unwrap_key pairs the scheme with its parameters
        return CkksScheme(parameters, context)
    fields = paillier_key_fields(payload)
    if "p" not in fields or "q" not in fields:
        raise ValueError("the paillier secret key file holds no p and q")
    public_key = paillier.PaillierPublicKey(fields["n"])
    assert isinstance(parameters, PaillierParameters)
    return PaillierScheme(parameters, public_key, paillier.PaillierPrivateKey(public_key, fields["p"], fields["q"]))


def load_server_scheme(public_bytes: bytes) -> HomomorphicScheme:
    """A scheme that only validates and adds, from the public bytes of :func:`generate_keys`.

    Raises:
        ValueError: the bytes are not a key file, or hold secret key material (the server must
            never be able to decrypt a single client's update).
    """
    scheme, kind, parameters, payload = _unwrap_key(public_bytes)
    refusal = "load_server_scheme refuses secret key material: give the server public.key, never secret.key"
    if kind != "public":
        raise ValueError(refusal)
    if scheme == "ckks":
        context = load_context(payload)
        if context.is_private():
            raise ValueError(refusal)
        assert isinstance(parameters, CkksParameters)  # _unwrap_key pairs the scheme with its parameters
        return CkksScheme(parameters, context)
    fields = paillier_key_fields(payload)
    if set(fields) != {"n"}:
        raise ValueError(refusal)
    assert isinstance(parameters, PaillierParameters)
    return PaillierScheme(parameters, paillier.PaillierPublicKey(fields["n"]), None)


def _wrap_key(scheme: str, kind: str, parameters: CkksParameters | PaillierParameters, payload: bytes) -> bytes:
    header = json.dumps(
        {"scheme": scheme, "kind": kind, "parameters": dataclasses.asdict(parameters)},
        sort_keys=True,
    ).encode()
    return KEY_MAGIC + len(header).to_bytes(_HEADER_LENGTH_BYTES, "big") + header + payload


def _unwrap_key(blob: bytes) -> tuple[str, str, CkksParameters | PaillierParameters, bytes]:
    not_a_key = "not a key file written by generate_keys / scripts/make_he_keys.py"
    if not isinstance(blob, (bytes, bytearray)) or not blob.startswith(KEY_MAGIC):
        raise ValueError(not_a_key)
    start = len(KEY_MAGIC) + _HEADER_LENGTH_BYTES
    length = int.from_bytes(blob[len(KEY_MAGIC) : start], "big")
    try:
        header = json.loads(bytes(blob[start : start + length]))
        scheme, kind, fields = header["scheme"], header["kind"], header["parameters"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{not_a_key}: unreadable header ({error})") from error
    parameter_class = {"ckks": CkksParameters, "paillier": PaillierParameters}.get(scheme)
    if parameter_class is None or kind not in ("secret", "public"):
        raise ValueError(f"{not_a_key}: unknown scheme {scheme!r} or kind {kind!r}")
    return scheme, kind, _parameters_from(parameter_class, fields), bytes(blob[start + length :])


def _parameters_from(parameter_class: type[CkksParameters] | type[PaillierParameters], params: dict[str, Any]) -> Any:
    allowed = [field.name for field in dataclasses.fields(parameter_class)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown {parameter_class.__name__} {unknown}; allowed: {allowed}")
    return parameter_class(**params)
