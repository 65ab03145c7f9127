"""Fixed-point encoding and slot packing of many values into one Paillier plaintext."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from strategies.encrypted.paillier import PaillierParameters


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


def ceil_log2(count: int) -> int:
    """``ceil(log2(count))`` for ``count >= 1``."""
    return (count - 1).bit_length()
