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
