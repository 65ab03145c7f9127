"""Security levels of the schemes' parameters (the HE Security Standard, NIST SP 800-57)."""

from __future__ import annotations

from collections.abc import Sequence

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
