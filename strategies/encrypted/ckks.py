"""CKKS through TenSEAL: approximate arithmetic on packed real values (Cheon, Kim, Kim, Song 2017)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from strategies.encrypted.packing import ceil_log2
from strategies.encrypted.scheme import HomomorphicScheme, as_update_vector
from strategies.encrypted.security import ckks_security_bits
from strategies.encrypted.tenseal_loader import tenseal as ts


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
        largest_scale = self.data_modulus_bits - 1 - ceil_log2(self.max_clients)
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
        x = as_update_vector(vector)
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


def load_context(payload: bytes) -> ts.Context:
    try:
        return ts.context_from(payload)
    except (ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"the ckks key file holds no readable TenSEAL context ({error})") from error
