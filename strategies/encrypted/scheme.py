"""The interface every additively homomorphic scheme implements (encrypt, validate, add, decrypt)."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from strategies.encrypted.ckks import CkksParameters
    from strategies.encrypted.paillier import PaillierParameters


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


def as_update_vector(vector: np.ndarray) -> np.ndarray:
    """The update as a finite, non-empty 1-D float64 array, or ``ValueError``."""
    array = np.asarray(vector)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"can only encrypt a non-empty 1-D float vector, got shape {array.shape} dtype {array.dtype}")
    if not np.isfinite(array).all():
        index = int(np.argmin(np.isfinite(array)))
        raise ValueError(f"cannot encrypt a non-finite value ({array[index]} at index {index})")
    return array.astype(np.float64, copy=False)
