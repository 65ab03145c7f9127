"""Additively homomorphic encryption of model updates: the server adds ciphertexts it cannot read.

Each client encrypts its flat float32 update (optionally pre-multiplied by its weight, e.g. its
number of examples), the server adds the ciphertexts of all clients without any secret, and the
clients decrypt only the sum and divide it by the (plaintext) total weight::

    secret, public = generate_keys("ckks")                       # once, by the operator
    client = load_client_scheme(secret)                          # on every client
    server = load_server_scheme(public)                          # on the server
    cts_k = client.encrypt(w_k * u_k)                            # client k -> list[bytes]
    server.validate(cts_k, size=P)                               # server, per reply (ValueError)
    total = server.sum_ciphertexts([cts_1, ..., cts_K])          # server, public material only
    mean = client.decrypt_sum(total, size=P, num_summands=K) / sum_k(w_k)

Traffic is ``sum(len(c) for c in cts_k)`` bytes per client.

Threat model. The server is honest-but-curious: it sees every client's ciphertexts and the
encrypted sum, and learns nothing about any value (IND-CPA security of the scheme). All clients
share one secret key, so the scheme does not protect a client from the other clients: the
channel between clients and server must be confidential (TLS), and the decrypted sum reveals
exactly what plaintext FedAvg would reveal to the clients. Nothing here checks that a client's
plaintext is well-formed (that needs zero-knowledge range proofs): a malicious client can shift
the sum arbitrarily, so Byzantine-robust rules (median, Krum, ...) cannot run on ciphertexts.

Schemes, both at 128-bit security by default:

* ``ckks`` -- CKKS (Cheon, Kim, Kim, Song 2017, "Homomorphic Encryption for Arithmetic of
  Approximate Numbers") through TenSEAL (Benaissa et al. 2021) over Microsoft SEAL. A
  ciphertext holds ``poly_modulus_degree / 2`` real values; decryption is approximate (error
  ~1e-8 at scale 2^40). Security follows the Homomorphic Encryption Security Standard
  (Albrecht et al. 2018, Table 1, ternary secret, classical attacks): for ``N = 8192`` the total
  coefficient modulus may have at most 218 bits for 128-bit security. Addition needs no
  rescaling, relinearisation or rotation, so the default modulus is ``(60, 40, 60)`` = 160 bits
  (one data prime fewer than the usual ``(60, 40, 40, 60)``: 30 % smaller ciphertexts, same
  security level) and the key files carry neither Galois nor relinearisation keys.
* ``paillier`` -- Paillier (1999, "Public-Key Cryptosystems Based on Composite Degree
  Residuosity Classes") through python-paillier (``phe``). Its security is that of factoring
  the modulus ``n``: 3072 bits give 128-bit security, 2048 bits only 112-bit (NIST SP 800-57
  Part 1 Rev. 5, Table 2). Values are fixed-point integers with ``fraction_bits`` fractional
  bits, offset to be non-negative and packed many per plaintext (see
  :class:`PaillierParameters`); sums are exact on the fixed-point grid.

Overflow is never silent: each key fixes ``max_clients``, the number of ciphertexts the server
may add; a client refuses to encrypt a value whose sum over ``max_clients`` clients would not be
representable, and the server refuses to add more than ``max_clients`` of them.

Key files are ``b"FLHEKEY1"``, a 4-byte big-endian header length, a JSON header (scheme,
``secret`` or ``public``, parameters) and the payload: a serialised TenSEAL context (CKKS) or
the Paillier key as JSON (``n``; plus ``p`` and ``q`` for the secret key).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from phe import paillier

from strategies.encrypted.tenseal_loader import tenseal as ts

SchemeName = Literal["ckks", "paillier"]
SCHEMES: tuple[str, ...] = ("ckks", "paillier")

KEY_MAGIC = b"FLHEKEY1"
_HEADER_LENGTH_BYTES = 4

# Homomorphic Encryption Security Standard (Albrecht et al. 2018), Table 1, uniform ternary
# secret, classical attacks: the largest total coefficient modulus (bits) for each ring
# dimension N at each security level. SEAL enforces the 128-bit row by default.
HE_STANDARD_MAX_COEFF_BITS: dict[int, dict[int, int]] = {
    128: {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881},
    192: {1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611},
    256: {1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476},
}

# NIST SP 800-57 Part 1 Rev. 5, Table 2: integer-factorisation key sizes and their security.
NIST_FACTORING_MODULUS_BITS: dict[int, int] = {112: 2048, 128: 3072, 192: 7680, 256: 15360}


def ckks_security_bits(poly_modulus_degree: int, coeff_mod_bit_sizes: Sequence[int]) -> int:
    """Security level (bits) of CKKS with ring dimension ``N`` and modulus ``q = prod q_i``.

    The largest ``lambda`` in {128, 192, 256} with ``sum(coeff_mod_bit_sizes) <= max_bits(N,
    lambda)`` of the HE Security Standard (Albrecht et al. 2018, Table 1).

    Raises:
        ValueError: ``N`` is not a power of two in [1024, 32768], or the modulus is too large
            for 128-bit security.
    """
    if poly_modulus_degree not in HE_STANDARD_MAX_COEFF_BITS[128]:
        raise ValueError(
            "ckks poly_modulus_degree must be one of "
            f"{sorted(HE_STANDARD_MAX_COEFF_BITS[128])}, got {poly_modulus_degree}"
        )
    total = sum(coeff_mod_bit_sizes)
    levels = [level for level, table in HE_STANDARD_MAX_COEFF_BITS.items() if total <= table[poly_modulus_degree]]
    if not levels:
        raise ValueError(
            f"ckks coeff_mod_bit_sizes {list(coeff_mod_bit_sizes)} total {total} bits, more than "
            f"the {HE_STANDARD_MAX_COEFF_BITS[128][poly_modulus_degree]} bits allowed for 128-bit "
            f"security at poly_modulus_degree={poly_modulus_degree} (HE Security Standard)"
        )
    return max(levels)


def paillier_security_bits(key_bits: int) -> int:
    """Security level (bits) of a Paillier modulus of ``key_bits`` bits (NIST SP 800-57, Table 2).

    Raises:
        ValueError: ``key_bits < 2048`` (less than 112-bit security).
    """
    levels = [level for level, bits in NIST_FACTORING_MODULUS_BITS.items() if key_bits >= bits]
    if not levels:
        raise ValueError(f"paillier key_bits must be >= 2048 (112-bit security; 3072 for 128-bit), got {key_bits}")
    return max(levels)


@dataclasses.dataclass(frozen=True)
class CkksParameters:
    """CKKS parameters; the defaults give 128-bit security (HE Security Standard).

    Attributes:
        poly_modulus_degree: ring dimension ``N``; a ciphertext holds ``N / 2`` values.
        coeff_mod_bit_sizes: bit sizes of the primes ``q_i``; the last one is SEAL's special
            (key-switching) prime, the others form the data modulus ``Q``.
        scale_bits: values are encoded as ``round(x * 2^scale_bits)``; the decryption error
            scales as ``2^-scale_bits`` (measured: max 2e-8 over 100k values at 40 bits).
        max_clients: the most ciphertexts the server may add. A sum is correct while
            ``|sum| * 2^scale_bits < Q / 2``, so a client accepts ``|x| <= max_abs_value`` =
            ``2^(log2 Q - scale_bits - 1) / max_clients``.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40
    max_clients: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(self.coeff_mod_bit_sizes))
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2 or not all(isinstance(b, int) and 20 <= b <= 60 for b in bits):
            raise ValueError(
                "ckks coeff_mod_bit_sizes must hold at least 2 integers in [20, 60] (data primes "
                f"then the special prime), got {list(bits)}"
            )
        ckks_security_bits(self.poly_modulus_degree, bits)
        if self.max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {self.max_clients}")
        largest_scale = self.data_modulus_bits - 1 - _ceil_log2(self.max_clients)
        if not 20 <= self.scale_bits <= largest_scale:
            raise ValueError(
                f"ckks scale_bits must be >= 20 and leave room for the sum of max_clients="
                f"{self.max_clients} values of magnitude 1 in the {self.data_modulus_bits}-bit "
                f"data modulus (scale_bits <= {largest_scale}), got {self.scale_bits}"
            )

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the data modulus ``Q``: all primes but the special one."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def slot_count(self) -> int:
        """Values per ciphertext: ``N / 2``."""
        return self.poly_modulus_degree // 2

    @property
    def max_abs_value(self) -> float:
        """Largest ``|x|`` a client may encrypt: ``2^(log2 Q - scale_bits - 1) / max_clients``."""
        return 2.0 ** (self.data_modulus_bits - self.scale_bits - 1) / self.max_clients

    @property
    def security_bits(self) -> int:
        """128, 192 or 256 (HE Security Standard)."""
        return ckks_security_bits(self.poly_modulus_degree, self.coeff_mod_bit_sizes)


@dataclasses.dataclass(frozen=True)
class PaillierParameters:
    """Paillier key size and the fixed-point packing of values into plaintexts.

    A value ``x`` becomes the integer ``c = round(x * 2^f) + 2^(v-1)`` in ``[0, 2^v)`` (offset
    encoding, so negative values need no sign), ``f = fraction_bits``, ``v = value_bits``; the
    representable range is ``[-2^(v-1-f), (2^(v-1) - 1) * 2^-f]`` and anything outside it is
    refused at encryption. Each slot is ``b = v + ceil(log2(max_clients)) + 1`` bits wide (room
    for the sum of ``max_clients`` codes plus a guard bit), and ``s = floor((key_bits - 1) / b)``
    slots form one plaintext ``m = sum_j c_j 2^(j b) < 2^(key_bits - 1) < n``, so adding
    ``K <= max_clients`` ciphertexts adds the slots without carries or reduction modulo ``n``.
    Decryption subtracts ``K * 2^(v-1)`` from each slot sum and divides by ``2^f``.

    Precision: rounding costs at most ``2^-(f+1)`` per value and client, so a sum over ``K``
    clients is within ``K * 2^-(f+1)`` of the exact sum (then rounded to float32). A client that
    pre-multiplies its update by its weight ``w_k`` must keep ``|w_k x|`` inside the range; the
    weighted mean ``sum_k w_k x_k / W`` is then within ``K * 2^-(f+1) / W`` -- large weights
    improve the relative precision but shrink the usable range, so normalise weights (e.g. to
    ``n_k / max_k n_k``) rather than using raw example counts when updates are large.

    Defaults: ``key_bits=3072`` (128-bit security; 2048 is 112-bit and only for tests),
    ``f = 20`` (step 9.5e-7), ``v = 32`` (range +-2048), ``max_clients = 1024``: 43-bit slots,
    71 values per 3072-bit plaintext.
    """

    key_bits: int = 3072
    fraction_bits: int = 20
    value_bits: int = 32
    max_clients: int = 1024

    def __post_init__(self) -> None:
        paillier_security_bits(self.key_bits)
        if self.key_bits % 2:
            raise ValueError(f"paillier key_bits must be even, got {self.key_bits}")
        if self.max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {self.max_clients}")
        if not 2 <= self.value_bits <= 53:
            raise ValueError(f"paillier value_bits must be in [2, 53], got {self.value_bits}")
        if not 0 <= self.fraction_bits <= 52:
            raise ValueError(f"paillier fraction_bits must be in [0, 52], got {self.fraction_bits}")
        if self.bits_per_slot > 63:
            raise ValueError(
                f"paillier value_bits + ceil(log2(max_clients)) + 1 must be <= 63, got "
                f"{self.bits_per_slot} (value_bits={self.value_bits}, "
                f"max_clients={self.max_clients})"
            )

    @property
    def bits_per_slot(self) -> int:
        """``value_bits + ceil(log2(max_clients)) + 1``."""
        return self.value_bits + _ceil_log2(self.max_clients) + 1

    @property
    def slots_per_plaintext(self) -> int:
        """``floor((key_bits - 1) / bits_per_slot)``."""
        return (self.key_bits - 1) // self.bits_per_slot

    @property
    def offset(self) -> int:
        """``2^(value_bits - 1)``, added to every fixed-point value."""
        return 1 << (self.value_bits - 1)

    @property
    def min_value(self) -> float:
        """Smallest encodable value, ``-2^(v-1-f)``."""
        return -self.offset / 2.0**self.fraction_bits

    @property
    def max_value(self) -> float:
        """Largest encodable value, ``(2^(v-1) - 1) * 2^-f``."""
        return (self.offset - 1) / 2.0**self.fraction_bits

    @property
    def security_bits(self) -> int:
        """112, 128, 192 or 256 (NIST SP 800-57)."""
        return paillier_security_bits(self.key_bits)


class HomomorphicScheme(ABC):
    """An additively homomorphic scheme over flat float vectors; all ciphertexts are ``bytes``.

    A scheme loaded from the secret key (:func:`load_client_scheme`) can encrypt and decrypt;
    one loaded from the public key (:func:`load_server_scheme`) can only validate and add.
    """

    name: ClassVar[str]

    @property
    @abstractmethod
    def parameters(self) -> CkksParameters | PaillierParameters:
        """The parameters the keys were generated with."""

    @property
    @abstractmethod
    def can_decrypt(self) -> bool:
        """Whether this instance holds the secret key."""

    @property
    def max_clients(self) -> int:
        """The most ciphertexts :meth:`sum_ciphertexts` adds."""
        return self.parameters.max_clients

    @property
    def security_bits(self) -> int:
        """Classical security level in bits."""
        return self.parameters.security_bits

    @abstractmethod
    def num_ciphertexts(self, size: int) -> int:
        """Number of ciphertexts that hold a vector of ``size`` values."""

    @abstractmethod
    def encrypt(self, vector: np.ndarray) -> list[bytes]:
        """Encrypt a finite 1-D float vector (client side; needs the secret key file)."""

    @abstractmethod
    def validate(self, ciphertexts: Sequence[bytes], size: int) -> None:
        """Raise ``ValueError`` unless ``ciphertexts`` is a well-formed encryption of ``size``
        values under this key (server side, before adding a client's reply)."""

    @abstractmethod
    def sum_ciphertexts(self, per_client: Sequence[Sequence[bytes]]) -> list[bytes]:
        """Encrypted element-wise sum of the clients' encrypted vectors (public key only)."""

    def add(self, ciphertexts_a: Sequence[bytes], ciphertexts_b: Sequence[bytes]) -> list[bytes]:
        """Encrypted element-wise sum of two encrypted vectors."""
        return self.sum_ciphertexts([ciphertexts_a, ciphertexts_b])

    @abstractmethod
    def decrypt_sum(self, ciphertexts: Sequence[bytes], size: int, num_summands: int) -> np.ndarray:
        """Decrypt a sum of ``num_summands`` encrypted vectors into a float32 vector of ``size``.

        ``num_summands`` is the number of client vectors added (Paillier removes one offset per
        summand; CKKS only checks it against ``max_clients``).
        """

    def _require_secret(self, action: str) -> None:
        if not self.can_decrypt:
            raise ValueError(
                f"this {self.name} scheme was loaded from the public (server) key and cannot "
                f"{action}; only clients holding the secret key file can "
                "(load it with load_client_scheme)"
            )

    def _check_num_ciphertexts(self, ciphertexts: Sequence[bytes], size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        expected = self.num_ciphertexts(size)
        if len(ciphertexts) != expected:
            raise ValueError(
                f"{self.name}: a vector of {size} values needs {expected} ciphertexts, got {len(ciphertexts)}"
            )

    def _check_summands(self, per_client: Sequence[Sequence[bytes]]) -> int:
        """Check the client count and that all clients sent equally many ciphertexts."""
        if not 1 <= len(per_client) <= self.max_clients:
            raise ValueError(
                f"{self.name}: can add between 1 and max_clients={self.max_clients} encrypted "
                f"vectors with this key, got {len(per_client)}"
            )
        lengths = {len(c) for c in per_client}
        if len(lengths) != 1:
            raise ValueError(f"{self.name}: clients sent different numbers of ciphertexts: {sorted(lengths)}")
        return lengths.pop()

    def _check_num_summands(self, num_summands: int) -> None:
        if not 1 <= num_summands <= self.max_clients:
            raise ValueError(f"num_summands must be in [1, max_clients={self.max_clients}], got {num_summands}")


class CkksScheme(HomomorphicScheme):
    """CKKS through TenSEAL: ``slot_count`` values per ciphertext, approximate decryption."""

    name = "ckks"

    def __init__(self, parameters: CkksParameters, context: ts.Context) -> None:
        seal_context = context.data.seal_context()
        key_level = seal_context.key_context_data()
        actual = (
            key_level.parms().poly_modulus_degree(),
            key_level.total_coeff_modulus_bit_count(),
            seal_context.first_context_data().total_coeff_modulus_bit_count(),
            context.global_scale,
        )
        declared = (
            parameters.poly_modulus_degree,
            sum(parameters.coeff_mod_bit_sizes),
            parameters.data_modulus_bits,
            2.0**parameters.scale_bits,
        )
        if actual != declared:
            raise ValueError(
                "ckks key file is inconsistent: its TenSEAL context has (poly_modulus_degree, "
                f"modulus bits, data modulus bits, scale) = {actual}, its header says {declared}"
            )
        self._parameters = parameters
        self._context = context
        self._parms_id = seal_context.first_parms_id()

    @property
    def parameters(self) -> CkksParameters:
        return self._parameters

    @property
    def can_decrypt(self) -> bool:
        return self._context.is_private()

    def num_ciphertexts(self, size: int) -> int:
        return -(-size // self._parameters.slot_count)

    def encrypt(self, vector: np.ndarray) -> list[bytes]:
        """Encrypt ``vector`` in chunks of ``slot_count`` values (``ts.ckks_vector``).

        Raises:
            ValueError: the vector is not 1-D, empty, not finite, or has ``|x| >
                max_abs_value`` (its sum over ``max_clients`` clients could wrap around).
        """
        self._require_secret("encrypt")
        x = _as_update_vector(vector)
        bound = self._parameters.max_abs_value
        worst = int(np.argmax(np.abs(x)))
        if abs(x[worst]) > bound:
            raise ValueError(
                f"value {x[worst]} at index {worst} exceeds the ckks bound |x| <= {bound:g} "
                f"(coeff_mod_bit_sizes={list(self._parameters.coeff_mod_bit_sizes)}, scale_bits="
                f"{self._parameters.scale_bits}, max_clients={self._parameters.max_clients})"
            )
        slots = self._parameters.slot_count
        return [
            ts.ckks_vector(self._context, x[start : start + slots]).serialize() for start in range(0, x.size, slots)
        ]

    def validate(self, ciphertexts: Sequence[bytes], size: int) -> None:
        """Check count, chunk sizes, scale, level and polynomial count of every ciphertext."""
        self._check_num_ciphertexts(ciphertexts, size)
        slots = self._parameters.slot_count
        for index, blob in enumerate(ciphertexts):
            vector = self._load(blob, index)
            expected = min(slots, size - index * slots)
            if vector.size() != expected:
                raise ValueError(f"ckks ciphertext {index} holds {vector.size()} values, expected {expected}")
            (ciphertext,) = vector.ciphertext()
            if (
                ciphertext.size() != 2
                or ciphertext.scale != self._context.global_scale
                or ciphertext.parms_id() != self._parms_id
            ):
                raise ValueError(
                    f"ckks ciphertext {index} is not a fresh encryption under this key's "
                    f"parameters (polynomials={ciphertext.size()}, scale={ciphertext.scale:g}; "
                    f"expected 2 and 2^{self._parameters.scale_bits})"
                )

    def sum_ciphertexts(self, per_client: Sequence[Sequence[bytes]]) -> list[bytes]:
        """Add the clients' ciphertexts chunk by chunk (``CKKSVector.add_``)."""
        num_chunks = self._check_summands(per_client)
        total = []
        for index in range(num_chunks):
            accumulator = self._load(per_client[0][index], index)
            for client, ciphertexts in enumerate(per_client[1:], start=1):
                try:
                    accumulator.add_(self._load(ciphertexts[index], index))
                except (ValueError, RuntimeError) as error:
                    raise ValueError(
                        f"ckks ciphertext {index} of client {client} cannot be added to the "
                        f"others ({error}); validate each reply before summing"
                    ) from error
            total.append(accumulator.serialize())
        return total

    def decrypt_sum(self, ciphertexts: Sequence[bytes], size: int, num_summands: int) -> np.ndarray:
        """Decrypt each chunk and concatenate; at ``scale_bits=40`` the error per value is at
        most ~2e-8 per summand, before rounding to float32."""
        self._require_secret("decrypt")
        self._check_num_ciphertexts(ciphertexts, size)
        self._check_num_summands(num_summands)
        chunks = [self._load(blob, i).decrypt() for i, blob in enumerate(ciphertexts)]
        values = np.concatenate([np.asarray(chunk, dtype=np.float64) for chunk in chunks])
        if values.size != size:
            raise ValueError(f"ckks ciphertexts hold {values.size} values, expected {size}")
        return values.astype(np.float32)

    def _load(self, blob: bytes, index: int) -> ts.CKKSVector:
        try:
            return ts.ckks_vector_from(self._context, blob)
        except (ValueError, RuntimeError, TypeError) as error:
            raise ValueError(f"ckks ciphertext {index} cannot be parsed: {error}") from error


class PaillierScheme(HomomorphicScheme):
    """Paillier with fixed-point values packed ``slots_per_plaintext`` per plaintext.

    Encryption is ``c = (1 + m n) r^n mod n^2``; the server adds by multiplying ciphertexts
    modulo ``n^2``. Clients hold ``p`` and ``q``, so they compute ``r^n mod n^2`` by the Chinese
    remainder theorem, ~3.5x faster than python-paillier's ``raw_encrypt``: for ``t_p``
    uniform in ``[1, p)``, ``t_p^p mod p^2`` is uniform on the order-``(p-1)`` subgroup of
    ``Z*_{p^2}``, which is where ``r^n mod p^2`` lies, uniformly, for ``r`` uniform in ``Z*_n``
    (since ``gcd(q, p - 1) = 1`` for primes of equal bit length); likewise modulo ``q^2``. The
    ciphertexts have exactly the distribution of textbook Paillier encryption.
    """

    name = "paillier"

    def __init__(
        self,
        parameters: PaillierParameters,
        public_key: paillier.PaillierPublicKey,
        private_key: paillier.PaillierPrivateKey | None,
    ) -> None:
        if public_key.n.bit_length() != parameters.key_bits:
            raise ValueError(
                f"paillier modulus has {public_key.n.bit_length()} bits, the key header says "
                f"key_bits={parameters.key_bits}"
            )
        self._parameters = parameters
        self._public_key = public_key
        self._private_key = private_key
        self._n = public_key.n
        self._nsquare = public_key.nsquare
        self._ciphertext_bytes = (2 * parameters.key_bits + 7) // 8
        if private_key is not None:
            self._psquare = private_key.psquare
            self._qsquare = private_key.qsquare
            self._psquare_inverse = pow(self._psquare, -1, self._qsquare)

    @property
    def parameters(self) -> PaillierParameters:
        return self._parameters

    @property
    def can_decrypt(self) -> bool:
        return self._private_key is not None

    def num_ciphertexts(self, size: int) -> int:
        return -(-size // self._parameters.slots_per_plaintext)

    def encrypt(self, vector: np.ndarray) -> list[bytes]:
        """Quantise, pack and encrypt ``vector``; each ciphertext is ``ceil(2 key_bits / 8)`` bytes.

        Raises:
            ValueError: the vector is not 1-D, empty, not finite, or holds a value outside
                ``[min_value, max_value]``.
        """
        self._require_secret("encrypt")
        codes = fixed_point_encode(_as_update_vector(vector), self._parameters)
        slots = self._parameters.slots_per_plaintext
        padded = np.zeros(self.num_ciphertexts(codes.size) * slots, dtype=np.int64)
        padded[: codes.size] = codes
        plaintexts = pack_slots(padded.reshape(-1, slots), self._parameters.bits_per_slot)
        return [self._encrypt_plaintext(m).to_bytes(self._ciphertext_bytes, "big") for m in plaintexts]

    def validate(self, ciphertexts: Sequence[bytes], size: int) -> None:
        """Check the count, byte length and range ``0 < c < n^2`` of every ciphertext."""
        self._check_num_ciphertexts(ciphertexts, size)
        for index, blob in enumerate(ciphertexts):
            self._load(blob, index)

    def sum_ciphertexts(self, per_client: Sequence[Sequence[bytes]]) -> list[bytes]:
        """Homomorphic addition: ``prod_k c_k mod n^2`` for each plaintext position."""
        num_ciphertexts = self._check_summands(per_client)
        nsquare = self._nsquare
        total = [self._load(blob, index) for index, blob in enumerate(per_client[0])]
        for ciphertexts in per_client[1:]:
            for index in range(num_ciphertexts):
                total[index] = total[index] * self._load(ciphertexts[index], index) % nsquare
        return [c.to_bytes(self._ciphertext_bytes, "big") for c in total]

    def decrypt_sum(self, ciphertexts: Sequence[bytes], size: int, num_summands: int) -> np.ndarray:
        """Decrypt, unpack, remove ``num_summands`` offsets and scale by ``2^-fraction_bits``.

        Raises:
            ValueError: a slot sum exceeds what ``num_summands`` in-range values can produce
                (``num_summands`` is wrong or a client encrypted an out-of-range plaintext).
        """
        self._require_secret("decrypt")
        self._check_num_ciphertexts(ciphertexts, size)
        self._check_num_summands(num_summands)
        parameters = self._parameters
        plaintexts = [self._private_key.raw_decrypt(self._load(blob, index)) for index, blob in enumerate(ciphertexts)]
        sums = unpack_slots(plaintexts, parameters.slots_per_plaintext, parameters.bits_per_slot)
        sums = sums.reshape(-1)[:size]
        limit = num_summands * ((1 << parameters.value_bits) - 1)
        if int(sums.max()) > limit:
            raise ValueError(
                f"paillier slot sum {int(sums.max())} exceeds {limit}, the most {num_summands} "
                "in-range values can give: num_summands is wrong or a client sent a malformed "
                "ciphertext"
            )
        return fixed_point_decode(sums, num_summands, parameters)

    def _encrypt_plaintext(self, plaintext: int) -> int:
        """``(1 + m n) r^n mod n^2`` with ``r^n`` from its residues modulo ``p^2`` and ``q^2``."""
        private_key = self._private_key
        residue_p = pow(secrets.randbelow(private_key.p - 1) + 1, private_key.p, self._psquare)
        residue_q = pow(secrets.randbelow(private_key.q - 1) + 1, private_key.q, self._qsquare)
        obfuscator = residue_p + self._psquare * ((residue_q - residue_p) * self._psquare_inverse % self._qsquare)
        return (1 + plaintext * self._n) * obfuscator % self._nsquare

    def _load(self, blob: bytes, index: int) -> int:
        if not isinstance(blob, (bytes, bytearray)) or len(blob) != self._ciphertext_bytes:
            length = len(blob) if isinstance(blob, (bytes, bytearray)) else type(blob).__name__
            raise ValueError(f"paillier ciphertext {index} must be {self._ciphertext_bytes} bytes, got {length}")
        ciphertext = int.from_bytes(blob, "big")
        if not 0 < ciphertext < self._nsquare:
            raise ValueError(f"paillier ciphertext {index} is outside (0, n^2)")
        return ciphertext


def fixed_point_encode(values: np.ndarray, parameters: PaillierParameters) -> np.ndarray:
    """Offset fixed-point codes ``round(x * 2^f) + 2^(v-1)`` in ``[0, 2^v)``, as int64.

    Raises:
        ValueError: a value is outside ``[min_value, max_value]`` (would wrap into another slot).
    """
    scaled = np.rint(np.asarray(values, dtype=np.float64) * 2.0**parameters.fraction_bits)
    out_of_range = (scaled < -parameters.offset) | (scaled > parameters.offset - 1)
    if out_of_range.any():
        index = int(np.argmax(out_of_range))
        raise ValueError(
            f"value {values[index]} at index {index} is outside the paillier fixed-point range "
            f"[{parameters.min_value:g}, {parameters.max_value:g}] (value_bits="
            f"{parameters.value_bits}, fraction_bits={parameters.fraction_bits}); scale the update "
            "down (e.g. normalise the client weights) or generate keys with larger value_bits"
        )
    return scaled.astype(np.int64) + parameters.offset


def fixed_point_decode(slot_sums: np.ndarray, num_summands: int, parameters: PaillierParameters) -> np.ndarray:
    """``(S - K 2^(v-1)) / 2^f`` as float32, for slot sums ``S`` of ``K = num_summands`` codes."""
    centred = slot_sums.astype(np.int64) - num_summands * parameters.offset
    return (centred.astype(np.float64) / 2.0**parameters.fraction_bits).astype(np.float32)


def pack_slots(codes: np.ndarray, bits_per_slot: int) -> list[int]:
    """Pack each row of non-negative codes into one integer: ``m = sum_j codes[j] 2^(j b)``.

    ``codes`` is an ``(m, s)`` int64 array with entries in ``[0, 2^b)``, ``b = bits_per_slot``
    <= 63. The bits are laid out with NumPy (``unpackbits``/``packbits``, little-endian) and
    each row becomes a Python int with one ``int.from_bytes``.
    """
    rows, slots = codes.shape
    bits = np.unpackbits(codes.astype("<u8").view(np.uint8).reshape(rows, slots, 8), axis=-1, bitorder="little")[
        :, :, :bits_per_slot
    ]
    packed = np.packbits(bits.reshape(rows, slots * bits_per_slot), axis=-1, bitorder="little")
    data, width = packed.tobytes(), packed.shape[1]
    return [int.from_bytes(data[i * width : (i + 1) * width], "little") for i in range(rows)]


def unpack_slots(plaintexts: Sequence[int], slots: int, bits_per_slot: int) -> np.ndarray:
    """Inverse of :func:`pack_slots`: an ``(len(plaintexts), slots)`` int64 array.

    Raises:
        ValueError: a plaintext has bits above its ``slots * bits_per_slot`` packed bits.
    """
    packed_bits = slots * bits_per_slot
    if any(m < 0 or m.bit_length() > packed_bits for m in plaintexts):
        raise ValueError(
            f"a paillier plaintext exceeds its {packed_bits} packed bits: the sum overflowed "
            "(more summands than max_clients, or a malformed ciphertext)"
        )
    rows, width = len(plaintexts), -(-packed_bits // 8)
    data = b"".join(m.to_bytes(width, "little") for m in plaintexts)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8).reshape(rows, width), axis=-1, bitorder="little")[
        :, :packed_bits
    ].reshape(rows, slots, bits_per_slot)
    words = np.zeros((rows, slots, 64), dtype=np.uint8)
    words[:, :, :bits_per_slot] = bits
    packed = np.packbits(words, axis=-1, bitorder="little")
    return packed.view("<u8").reshape(rows, slots).astype(np.int64)


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
        context = _load_context(payload)
        if not context.is_private():
            raise ValueError("the ckks secret key file holds no secret key")
        return CkksScheme(parameters, context)
    fields = _paillier_fields(payload)
    if "p" not in fields or "q" not in fields:
        raise ValueError("the paillier secret key file holds no p and q")
    public_key = paillier.PaillierPublicKey(fields["n"])
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
        context = _load_context(payload)
        if context.is_private():
            raise ValueError(refusal)
        return CkksScheme(parameters, context)
    fields = _paillier_fields(payload)
    if set(fields) != {"n"}:
        raise ValueError(refusal)
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


def _load_context(payload: bytes) -> ts.Context:
    try:
        return ts.context_from(payload)
    except (ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"the ckks key file holds no readable TenSEAL context ({error})") from error


def _paillier_fields(payload: bytes) -> dict[str, int]:
    try:
        fields = {name: int(value) for name, value in json.loads(payload).items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"the paillier key file holds no readable key ({error})") from error
    if "n" not in fields:
        raise ValueError("the paillier key file holds no modulus n")
    return fields


def _as_update_vector(vector: np.ndarray) -> np.ndarray:
    """The update as a finite, non-empty 1-D float64 array, or ``ValueError``."""
    array = np.asarray(vector)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"can only encrypt a non-empty 1-D float vector, got shape {array.shape} dtype {array.dtype}")
    if not np.isfinite(array).all():
        index = int(np.argmin(np.isfinite(array)))
        raise ValueError(f"cannot encrypt a non-finite value ({array[index]} at index {index})")
    return array.astype(np.float64, copy=False)


def _ceil_log2(count: int) -> int:
    """``ceil(log2(count))`` for ``count >= 1``."""
    return (count - 1).bit_length()
