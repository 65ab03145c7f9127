"""Paillier through ``phe``: exact sums of fixed-point values packed many per plaintext (Paillier 1999)."""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
from collections.abc import Sequence

import numpy as np
from phe import paillier

from strategies.encrypted.packing import ceil_log2, fixed_point_decode, fixed_point_encode, pack_slots, unpack_slots
from strategies.encrypted.scheme import HomomorphicScheme, as_update_vector
from strategies.encrypted.security import paillier_security_bits


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
        return self.value_bits + ceil_log2(self.max_clients) + 1

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
        codes = fixed_point_encode(as_update_vector(vector), self._parameters)
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
        assert self._private_key is not None  # _require_secret passed
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
        assert private_key is not None  # only clients holding the secret key encrypt
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
        if math.gcd(ciphertext, self._n) != 1:
            # not in Z*_{n^2}: no encryption gives it (c = n needs no key), and its product with
            # any sum stays outside the group, so the chain's later decryptions would all fail
            raise ValueError(f"paillier ciphertext {index} is not invertible modulo n^2 (shares a factor with n)")
        return ciphertext


def paillier_key_fields(payload: bytes) -> dict[str, int]:
    try:
        fields = {name: int(value) for name, value in json.loads(payload).items()}
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"the paillier key file holds no readable key ({error})") from error
    if "n" not in fields:
        raise ValueError("the paillier key file holds no modulus n")
    return fields
