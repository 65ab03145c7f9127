"""Generate the key pair for encrypted aggregation (``strategies.encrypted``).

Writes two files into ``--out-dir``:

* ``secret.key`` (mode 0600) -- for every client: encrypts updates and decrypts the sum.
* ``public.key`` -- for the server: adds ciphertexts, cannot decrypt.

Examples::

    python scripts/make_he_keys.py --scheme ckks --out-dir keys/
    python scripts/make_he_keys.py --scheme paillier --out-dir keys/ --paillier-bits 3072

Distribute ``secret.key`` to the clients over a confidential channel; never give it to the
server (``load_server_scheme`` refuses it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from strategies.encrypted.ckks import CkksParameters
from strategies.encrypted.keys import SCHEMES, generate_keys, load_server_scheme
from strategies.encrypted.paillier import PaillierParameters

SECRET_KEY_FILE = "secret.key"
PUBLIC_KEY_FILE = "public.key"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ckks, paillier = CkksParameters(), PaillierParameters()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", choices=SCHEMES, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument(
        "--max-clients",
        type=int,
        default=ckks.max_clients,
        help="most client updates the server may add (default %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing key files in --out-dir")
    group = parser.add_argument_group("paillier")
    group.add_argument(
        "--paillier-bits",
        type=int,
        default=paillier.key_bits,
        help="modulus bits: 3072 = 128-bit security (default), 2048 = 112-bit",
    )
    group.add_argument("--paillier-fraction-bits", type=int, default=paillier.fraction_bits)
    group.add_argument("--paillier-value-bits", type=int, default=paillier.value_bits)
    group = parser.add_argument_group("ckks")
    group.add_argument("--ckks-poly-degree", type=int, default=ckks.poly_modulus_degree)
    group.add_argument("--ckks-coeff-mod-bit-sizes", type=int, nargs="+", default=list(ckks.coeff_mod_bit_sizes))
    group.add_argument("--ckks-scale-bits", type=int, default=ckks.scale_bits)
    return parser.parse_args(argv)


def scheme_parameters(args: argparse.Namespace) -> dict[str, object]:
    """The keyword arguments of :func:`generate_keys` for the chosen scheme."""
    if args.scheme == "ckks":
        return {
            "poly_modulus_degree": args.ckks_poly_degree,
            "coeff_mod_bit_sizes": tuple(args.ckks_coeff_mod_bit_sizes),
            "scale_bits": args.ckks_scale_bits,
            "max_clients": args.max_clients,
        }
    return {
        "key_bits": args.paillier_bits,
        "fraction_bits": args.paillier_fraction_bits,
        "value_bits": args.paillier_value_bits,
        "max_clients": args.max_clients,
    }


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` created with permissions ``mode`` (also when it existed)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    secret_path = args.out_dir / SECRET_KEY_FILE
    public_path = args.out_dir / PUBLIC_KEY_FILE
    existing = [str(p) for p in (secret_path, public_path) if p.exists()]
    if existing and not args.force:
        print(f"error: {', '.join(existing)} exist; pass --force to overwrite", file=sys.stderr)
        return 2
    try:
        secret, public = generate_keys(args.scheme, **scheme_parameters(args))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_file(secret_path, secret, 0o600)
    write_file(public_path, public, 0o644)
    server = load_server_scheme(public)
    print(f"scheme: {args.scheme}, {server.security_bits}-bit security")
    print(f"parameters: {server.parameters}")
    print(f"secret key (clients only, mode 0600): {secret_path}")
    print(f"public key (server): {public_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
