"""Encrypted aggregation on Flower's Message API: the server only ever adds ciphertexts.

Protocol (``homomorphic-encryption='ckks'`` or ``'paillier'``; the schemes are in
:mod:`strategies.encrypted`). Let ``G_0`` be the initial model (plaintext: it is built from a
public seed, nothing private is in it) and ``G_v`` the global model after ``v`` aggregations::

    round r, client k:  G_{r-1} = G_0 + sum_{j<r} S_j / W_j     (decrypted from the chain, below)
                        x_k     = local training from G_{r-1}
                        u_k     = clip(x_k - G_{r-1}, C)          (optional L2 clipping, he-clip-norm)
                        c_k     = Enc(w_k u_k)                    (w_k = n_k, or 1 with uniform weights)
    round r, server:    Enc(S_r) = sum_k c_k                      (homomorphic addition, public key)
                        W_r      = sum_k w_k                      (plaintext: the n_k are reported anyway)
    every client:       G_r = G_{r-1} + Dec(Enc(S_r)) / W_r       (plain FedAvg: sum_k w_k x_k / W_r)

The server keeps ``G_0`` and the chain of encrypted sums ``(Enc(S_j), W_j, K_j)``, one per version
``j``; it never holds a plaintext model after ``G_0``, nor the secret key (:func:`load_server_scheme`
refuses one). Each train or evaluate message carries the part of the chain that the node lacks:
the server remembers the version it last delivered to each node (confirmed by a successful reply)
and sends the deltas from there to the newest one, plus ``G_0`` for a node it has not heard from.
Clients keep ``G_v`` and ``v`` in their ``context.state``, so with every node in every round
(fraction 1.0) a message holds exactly one encrypted sum. A client whose state does not fit the
chain (it lost its state) replies with an error naming :data:`OUT_OF_DATE`; the server then sends
it the whole chain from ``G_0`` next time. Every client applies the same float operations
(:func:`apply_delta`) to the same decryptions, so all hold bit-identical global models.

What the server learns: ``G_0``, the sampled nodes, each client's reported ``num-examples`` (as in
plain FedAvg), the total weight ``W_r`` and the number of summands ``K_r``, ciphertext sizes and
timing; nothing about any update or the aggregate (IND-CPA). Centralized evaluation on the server
is impossible; clients evaluate the decrypted global model on their own test split. At the end the
server writes ``G_0`` and the chain (:meth:`EncryptedFedAvg.save_encrypted_model`); a key holder
reconstructs the final model with ``scripts/decrypt_model.py``.

Before ``Enc(S_r)`` joins the chain, a key holder verifies it (finite, within the scheme's range
and the clip norm) and group testing drops the contributions that make it invalid
(:mod:`strategies.encrypted.verification`); example counts are integers capped at
``he-max-examples``. One client can therefore no longer break the chain for everybody.

Only averaging can run on ciphertexts: rules that need individual plaintext updates (median,
trimmed mean, Krum, Bulyan, geometric median, centered clipping), server-side norm bounds and
server optimizers are refused at start-up (:func:`check_encryption_compatible`). Clients may add
DP noise to ``u_k`` before encrypting.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from strategies.core.checks import in_interval, non_negative, one_of
from strategies.core.replies import ScreenedReply, is_client_error, rejection, screen_replies
from strategies.core.update_matrix import ModelLayout
from strategies.encrypted import verification
from strategies.encrypted.ckks import CkksParameters
from strategies.encrypted.keys import load_server_scheme
from strategies.encrypted.paillier import PaillierParameters
from strategies.encrypted.scheme import HomomorphicScheme
from strategies.encrypted.security import HE_STANDARD_MAX_COEFF_BITS

if TYPE_CHECKING:
    from strategies.aggregation.strategy import AggregationParams

ENCRYPTION_SCHEMES = ("none", "ckks", "paillier")
HE_WEIGHTINGS = ("num-examples", "uniform")
AVERAGING_STRATEGIES = ("fedavg", "fedprox")
"""Strategies whose aggregation is a weighted mean (plus ``robust`` with ``aggregation-rule='mean'``)."""

VERIFY_TIMEOUT_S = 120.0
"""Seconds to wait for one key holder's verdict on a round's encrypted sum."""
VERIFY_ATTEMPTS = 3
"""Key holders asked in turn before a round is left uncommitted."""

OUT_OF_DATE = "he-state-out-of-date"
"""Marker in a client's error reply: its stored global model does not fit the chain it received."""

# Message layout (server -> client): "arrays" holds G_0 (only when the chain starts at version 0),
# "he-chain" the ciphertexts of the deltas, "config" the chain's metadata below.
CHAIN_KEY = "he-chain"
CFG_TARGET = "he-version"  # the version the client reaches after applying the chain
CFG_FROM = "he-from-version"  # the version the chain starts from (G_0 is sent to unknown nodes)
CFG_WEIGHTS = "he-total-weights"  # W_j for j = from+1 .. target
CFG_SUMMANDS = "he-summands"  # K_j for j = from+1 .. target
CFG_WEIGHTING = "he-client-weighting"
CFG_CLIP = "he-clip-norm"
# Reply metrics (client -> server)
MET_BASE = "he-base-version"  # the version the client trained from
MET_ENCRYPT = "he-encrypt-seconds"
MET_DECRYPT = "he-decrypt-seconds"


class EncryptionConfigError(ValueError):
    """A run config that cannot run with homomorphic encryption."""


# ------------------------------------------------------------------------------------ pure pieces


def client_weight(num_examples: int, weighting: str) -> float:
    """``w_k``: the example count (FedAvg) or 1 (uniform)."""
    if weighting == "num-examples":
        return float(num_examples)
    if weighting == "uniform":
        return 1.0
    raise ValueError(f"he-client-weighting must be one of {', '.join(HE_WEIGHTINGS)}; got '{weighting}'")


def apply_delta(global_flat: np.ndarray, decrypted_sum: np.ndarray, total_weight: float) -> np.ndarray:
    """``G_v = G_{v-1} + S_v / W_v`` in float64, rounded to float32 (the same on every client)."""
    if not total_weight > 0:
        raise ValueError(f"total weight must be > 0, got {total_weight}")
    new = global_flat.astype(np.float64) + decrypted_sum.astype(np.float64) / float(total_weight)
    return new.astype(np.float32)


def ciphertexts_to_record(ciphertexts: Sequence[bytes], prefix: str = "ct") -> ArrayRecord:
    """Ciphertexts as uint8 arrays named ``<prefix>-00000``, ``<prefix>-00001``, …"""
    return ArrayRecord(
        {f"{prefix}-{i:05d}": Array(np.frombuffer(blob, dtype=np.uint8)) for i, blob in enumerate(ciphertexts)}
    )


def record_to_ciphertexts(record: ArrayRecord, prefix: str = "ct") -> list[bytes]:
    """The inverse of :func:`ciphertexts_to_record` (``ValueError`` on a malformed record)."""
    names = [key for key in record if key.startswith(f"{prefix}-")]
    expected = [f"{prefix}-{i:05d}" for i in range(len(names))]
    if names != expected:
        raise ValueError(f"ciphertext arrays must be named {prefix}-00000, … in order; got {list(record.keys())[:4]}…")
    blobs = []
    for key in names:
        array = record[key]
        if array.dtype != "uint8" and np.dtype(array.dtype) != np.uint8:
            raise ValueError(f"ciphertext array '{key}' must be uint8, got {array.dtype}")
        blobs.append(array.numpy().tobytes())
    return blobs


def chain_record(deltas: Sequence[EncryptedDelta], first_version: int) -> ArrayRecord:
    """The ciphertexts of ``deltas`` (versions ``first_version, first_version + 1, …``) in one record."""
    arrays: dict[str, Array] = {}
    for offset, delta in enumerate(deltas):
        for key, array in ciphertexts_to_record(delta.ciphertexts, f"v{first_version + offset}").items():
            arrays[key] = array
    return ArrayRecord(arrays)


@dataclasses.dataclass(frozen=True)
class EncryptionParams:
    """An encrypted run's settings (run-config keys in brackets; defaults live in ``fl_app.config``).

    Attributes:
        scheme: ``none``, ``ckks`` or ``paillier`` (``homomorphic-encryption``).
        public_key_path: the server's public key file (``he-public-key-path``); the secret key's
            path is the clients' business and not part of these parameters.
        client_weighting: ``num-examples`` or ``uniform`` (``he-client-weighting``).
        clip_norm: clients clip their update to this L2 norm (``he-clip-norm``), >= 0 (0: off).
        max_examples: cap on a client's example-count weight (``he-max-examples``), >= 1.
        verify_min_summands: the smallest group a key holder verifies (``he-verify-min-summands``;
            0: rounds are committed unverified); see :mod:`strategies.encrypted.verification`.
        ckks_poly_degree: CKKS ring dimension the key must have (``he-ckks-poly-degree``).
        ckks_scale_bits: CKKS scale bits the key must have (``he-ckks-scale-bits``), in [20, 60].
        paillier_key_bits: Paillier modulus bits the key must have (``he-paillier-key-bits``), even, >= 2048.
    """

    scheme: str
    public_key_path: str
    client_weighting: str
    clip_norm: float
    max_examples: int
    verify_min_summands: int
    ckks_poly_degree: int
    ckks_scale_bits: int
    paillier_key_bits: int

    def __post_init__(self) -> None:
        one_of("homomorphic-encryption", self.scheme, ENCRYPTION_SCHEMES)
        one_of("he-client-weighting", self.client_weighting, HE_WEIGHTINGS)
        non_negative("he-clip-norm", self.clip_norm, " (0: off)")
        in_interval("he-max-examples", self.max_examples, 1, 1_000_000_000)
        in_interval("he-verify-min-summands", self.verify_min_summands, 0, 10_000)
        degrees = sorted(HE_STANDARD_MAX_COEFF_BITS[128])
        if self.ckks_poly_degree not in degrees:
            raise ValueError(
                f"he-ckks-poly-degree must be one of {', '.join(map(str, degrees))}; got {self.ckks_poly_degree}"
            )
        in_interval("he-ckks-scale-bits", self.ckks_scale_bits, 20, 60)
        if self.paillier_key_bits < 2048 or self.paillier_key_bits % 2:
            raise ValueError(
                "he-paillier-key-bits must be even and >= 2048 (112-bit security; 3072 gives 128-bit), "
                f"got {self.paillier_key_bits}"
            )


def check_encryption_compatible(params: EncryptionParams, strategy: str, aggregation: AggregationParams) -> None:
    """Refuse, at start-up, a strategy that cannot run on ciphertexts (``strategy`` is the run
    config's ``strategy``; the app refuses its own features, such as compression, itself).

    Raises:
        EncryptionConfigError: a strategy or rule that needs individual plaintext updates, a
            server-side norm bound, a server optimizer or momentum.
    """
    scheme = params.scheme
    if scheme == "none":
        return
    rule = aggregation.rule
    averaging = strategy in AVERAGING_STRATEGIES or (strategy == "robust" and rule == "mean")
    if not averaging:
        detail = (
            f"strategy='robust' with aggregation-rule='{rule}'" if strategy == "robust" else f"strategy='{strategy}'"
        )
        raise EncryptionConfigError(
            f"homomorphic-encryption='{scheme}' cannot run {detail}: the server only holds the encrypted "
            "sum of the updates, and this rule needs the individual plaintext updates (median, trimmed "
            "mean, Krum, Bulyan, geometric median, centered clipping) or a server optimizer on the "
            "plaintext aggregate (FedAdam, FedYogi, FedAdagrad, FedAvgM, custom strategies). Allowed: "
            "strategy='fedavg', 'fedprox', or 'robust' with aggregation-rule='mean'; or set "
            "homomorphic-encryption='none'"
        )
    bounds = (
        ("norm-bound", aggregation.norm_bound),
        ("norm-bound-quantile", aggregation.norm_bound_quantile),
        ("max-update-norm", aggregation.max_update_norm),
    )
    for key, value in bounds:
        if value > 0:
            raise EncryptionConfigError(
                f"{key}={value} needs the plaintext updates on the server and cannot run with "
                f"homomorphic-encryption='{scheme}'; clip on the clients with he-clip-norm instead"
            )
    if aggregation.pre_aggregation:
        raise EncryptionConfigError(
            f"pre-aggregation='{aggregation.pre_aggregation}' needs the plaintext updates on the server and "
            f"cannot run with homomorphic-encryption='{scheme}'; set pre-aggregation=''"
        )
    if aggregation.weak_dp_noise_std > 0:
        raise EncryptionConfigError(
            f"weak-dp-noise-std={aggregation.weak_dp_noise_std} needs the plaintext aggregate on the server; "
            f"with homomorphic-encryption='{scheme}' it must be 0"
        )
    steps = (
        ("server-learning-rate", aggregation.server_learning_rate, 1.0),
        ("server-momentum", aggregation.server_momentum, 0.0),
    )
    for key, value, neutral in steps:
        if value != neutral:
            raise EncryptionConfigError(
                f"{key}={value} needs the plaintext aggregate on the server; with "
                f"homomorphic-encryption='{scheme}' it must be {neutral}"
            )


def check_key_parameters(scheme: HomomorphicScheme, params: EncryptionParams) -> None:
    """The key file must be of the configured scheme and match the configured key parameters."""
    if scheme.name != params.scheme:
        raise EncryptionConfigError(
            f"homomorphic-encryption='{params.scheme}' but he-public-key-path holds a {scheme.name} key; "
            f"generate one with: python scripts/make_he_keys.py --scheme {params.scheme} --out-dir keys/"
        )
    key_params = scheme.parameters
    checks: tuple[tuple[str, int, int, str], ...]
    if isinstance(key_params, CkksParameters):
        checks = (
            ("he-ckks-poly-degree", params.ckks_poly_degree, key_params.poly_modulus_degree, "--ckks-poly-degree"),
            ("he-ckks-scale-bits", params.ckks_scale_bits, key_params.scale_bits, "--ckks-scale-bits"),
        )
    elif isinstance(key_params, PaillierParameters):
        checks = (("he-paillier-key-bits", params.paillier_key_bits, key_params.key_bits, "--paillier-bits"),)
    else:
        raise EncryptionConfigError(f"he-public-key-path holds parameters of an unknown scheme: {key_params!r}")
    for key, configured, actual, flag in checks:
        if configured != actual:
            raise EncryptionConfigError(
                f"{key}={configured} but the key file was generated with {actual}: set {key}={actual} or "
                f"regenerate the keys with scripts/make_he_keys.py {flag} {configured}"
            )


def load_public_key(path: str) -> HomomorphicScheme:
    """The server's scheme from ``he-public-key-path`` (never the secret key)."""
    if not path:
        raise EncryptionConfigError(
            "he-public-key-path is empty: the server needs the public key written by "
            "scripts/make_he_keys.py (e.g. he-public-key-path='keys/public.key')"
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise EncryptionConfigError(f"he-public-key-path '{path}' does not exist ({file.resolve()})")
    try:
        return load_server_scheme(file.read_bytes())
    except ValueError as err:
        raise EncryptionConfigError(f"he-public-key-path '{path}': {err}") from err


def build_encrypted_strategy(
    params: EncryptionParams, *, strategy: str, aggregation: AggregationParams, proximal_mu: float
) -> EncryptedFedAvg:
    """The server's strategy for an encrypted run; reads ``he-public-key-path`` and nothing else.

    ``strategy`` and ``aggregation`` are checked with :func:`check_encryption_compatible`; the
    sampling comes from ``aggregation.sampling``; FedProx's ``proximal_mu`` is sent to the clients.
    """
    check_encryption_compatible(params, strategy, aggregation)
    scheme = load_public_key(params.public_key_path)
    check_key_parameters(scheme, params)
    extra: dict[str, Any] = {"proximal-mu": proximal_mu} if strategy == "fedprox" else {}
    return EncryptedFedAvg(
        scheme,
        weighting=params.client_weighting,
        clip_norm=params.clip_norm,
        max_examples=params.max_examples,
        verify_min_summands=params.verify_min_summands,
        train_config=extra,
        **aggregation.sampling.kwargs(),
    )


# ------------------------------------------------------------------------------------ the strategy


@dataclasses.dataclass(frozen=True)
class Contribution:
    """One client's checked reply: its place among the round's replies, node, ciphertexts of
    ``Enc(w_k u_k)``, weight ``w_k`` and metrics."""

    index: int
    node: int
    ciphertexts: list[bytes]
    weight: float
    metrics: MetricRecord


class _NoVerdict(Exception):
    """No key holder answered a verification query."""


@dataclasses.dataclass(frozen=True)
class EncryptedDelta:
    """One aggregation: ``Enc(S_v)``, ``W_v`` and ``K_v``."""

    ciphertexts: tuple[bytes, ...]
    total_weight: float
    summands: int


class EncryptedFedAvg(FedAvg):
    """FedAvg whose server adds ciphertexts only (see the module docstring for the protocol).

    Parameters
    ----------
    scheme : the server's scheme, loaded from the public key (refused if it can decrypt)
    weighting : ``num-examples`` (FedAvg) or ``uniform``; the clients use the same
    clip_norm : L2 bound the clients clip their update to before encrypting (0: off)
    max_examples : a reply's ``num-examples`` must be an integer in ``[1, max_examples]`` (the
        clients cap their weight there): a fractional count would truncate the round's weight to 0,
        a huge one would freeze the model
    verify_min_summands : before a round's sum joins the chain a key holder verifies it, isolating
        invalid contributions in groups of at least this many (0: no verification); see
        :mod:`strategies.encrypted.verification`
    verify_timeout : seconds to wait for a key holder's verdict (three are tried in turn)
    train_config : extra keys sent in every train config (e.g. ``proximal-mu`` for FedProx)
    **sampling : FedAvg's ``fraction_train``, ``min_train_nodes``, …

    Implements :class:`~strategies.core.reporting.RoundReporting`: it validates its replies
    (ciphertexts, which a plaintext check would reject) itself.
    """

    validates_replies = True
    """:meth:`aggregate_train` screens every reply (:mod:`strategies.core.replies`, then the ciphertexts)."""
    stop_reason: str | None = None
    """It never ends training early."""
    min_train_replies: int | None = None
    """No bound of its own: the run config's ``min-train-replies``."""
    dp_mode: str | None = None
    """Encryption hides the updates from the server; it is not differential privacy."""

    def __init__(
        self,
        scheme: HomomorphicScheme,
        *,
        weighting: str = "num-examples",
        clip_norm: float = 0.0,
        max_examples: int = 100_000,
        verify_min_summands: int = 0,
        verify_timeout: float = VERIFY_TIMEOUT_S,
        train_config: Mapping[str, Any] | None = None,
        **sampling: Any,
    ) -> None:
        super().__init__(**sampling)
        if scheme.can_decrypt:
            raise ValueError(
                "EncryptedFedAvg refuses a scheme that holds the secret key: the server must be "
                "given public.key (load_server_scheme), never secret.key"
            )
        client_weight(1, weighting)
        self.scheme = scheme
        self.weighting = weighting
        self.clip_norm = float(clip_norm)
        self.max_examples = int(max_examples)
        self.verify_min_summands = int(verify_min_summands)
        self.verify_timeout = float(verify_timeout)
        self.train_config = dict(train_config or {})
        self._grid: Grid | None = None  # the round's grid, to ask a key holder for its verdict
        self.initial: ArrayRecord | None = None
        self.layout: ModelLayout | None = None
        self.deltas: list[EncryptedDelta] = []
        self.node_versions: dict[int, int] = {}  # version each node confirmed holding
        self._sent: dict[int, int] = {}  # node -> target version of the last message sent to it
        self._chain_bytes_sent = 0  # encrypted-sum bytes in messages since the last aggregate_train
        self._rejections: list[str] = []

    @property
    def version(self) -> int:
        """Aggregations so far: the global model is ``G_version``."""
        return len(self.deltas)

    def summary(self) -> None:
        super().summary()
        log(
            INFO,
            "\t├──> Encrypted aggregation: %s, %d-bit security, %s",
            self.scheme.name,
            self.scheme.security_bits,
            self.scheme.parameters,
        )
        log(INFO, "\t│\t└── client weighting %s, client clip norm %s", self.weighting, self.clip_norm or "off")

    # ----------------------------------------------------------------------------- messages

    def _remember_initial(self, arrays: ArrayRecord) -> None:
        if self.initial is None:
            self.initial = arrays
            self.layout = ModelLayout.of(arrays)

    def _sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, minimum))
        return list(node_ids)

    def _messages(self, node_ids: Iterable[int], config: ConfigRecord, message_type: str) -> list[Message]:
        """One message per node with the part of the chain it lacks (shared records per start)."""
        assert self.initial is not None
        target = self.version
        by_start: dict[tuple[int, bool], tuple[ArrayRecord, ArrayRecord, ConfigRecord]] = {}
        messages = []
        for node_id in node_ids:
            confirmed = self.node_versions.get(node_id)  # None: unknown node, it gets G_0 too
            start = 0 if confirmed is None else min(confirmed, target)
            if (start, confirmed is None) not in by_start:
                deltas = self.deltas[start:target]
                chain_config = ConfigRecord(
                    {
                        **dict(config),
                        CFG_TARGET: target,
                        CFG_FROM: start,
                        CFG_WEIGHTS: [d.total_weight for d in deltas] or [1.0],
                        CFG_SUMMANDS: [d.summands for d in deltas] or [0],
                        CFG_WEIGHTING: self.weighting,
                        CFG_CLIP: self.clip_norm,
                    }
                )
                model = self.initial if confirmed is None else ArrayRecord()
                by_start[start, confirmed is None] = (model, chain_record(deltas, start + 1), chain_config)
            model, chain, chain_config = by_start[start, confirmed is None]
            self._chain_bytes_sent += chain.count_bytes()
            content = RecordDict({self.arrayrecord_key: model, CHAIN_KEY: chain, self.configrecord_key: chain_config})
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
            self._sent[node_id] = target
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """``arrays`` is used once, as ``G_0``; afterwards the global model is the encrypted chain."""
        self._remember_initial(arrays)
        self._grid = grid
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_train: sampled %d nodes; global version %d", len(node_ids), self.version)
        config = ConfigRecord({**dict(config), **self.train_config, "server-round": server_round})
        return self._messages(node_ids, config, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._remember_initial(arrays)
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        config = ConfigRecord({**dict(config), "server-round": server_round})
        return self._messages(node_ids, config, MessageType.EVALUATE)

    def _track(self, replies: Sequence[Message]) -> None:
        """A successful reply confirms the version sent; an out-of-date error resets the node."""
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                if OUT_OF_DATE in str(reply.error.reason):
                    self.node_versions.pop(node_id, None)
            elif node_id in self._sent:
                self.node_versions[node_id] = self._sent[node_id]

    # ----------------------------------------------------------------------------- aggregation

    def _check_reply(self, reply: ScreenedReply, size: int) -> Contribution:
        """A screened reply's contribution; ValueError if it is stale, its example count is not an
        integer in ``[1, max_examples]``, or its ciphertexts do not fit the key and model."""
        base = reply.metrics.get(MET_BASE)
        if base != self.version:
            raise ValueError(f"trained from global version {base!r}, the current one is {self.version}")
        count = float(reply.num_examples)
        if not (count == int(count) and 1 <= count <= self.max_examples):
            raise ValueError(
                f"num-examples must be an integer in [1, he-max-examples={self.max_examples}] "
                "(the clients cap their weight there)"
            )
        ciphertexts = record_to_ciphertexts(reply.arrays)
        self.scheme.validate(ciphertexts, size)
        return Contribution(
            reply.index, reply.node, ciphertexts, client_weight(int(count), self.weighting), reply.metrics
        )

    def _ask_key_holder(self, server_round: int, accepted: Sequence[Contribution], groups: Sequence[Sequence[int]]):
        """One verification round trip: the sums of ``groups`` to a key holder of this round (up to
        three in turn, in a random order); its verdicts, or ``None`` when none answered."""
        assert self._grid is not None and self.layout is not None
        arrays: dict[str, Array] = {}
        for index, group in enumerate(groups):
            total = self.scheme.sum_ciphertexts([accepted[i].ciphertexts for i in group])
            arrays.update(ciphertexts_to_record(total, verification.group_prefix(index)).items())
        config = ConfigRecord(
            {
                "query": verification.QUERY,
                verification.CFG_WEIGHTS: [float(sum(accepted[i].weight for i in g)) for g in groups],
                verification.CFG_SUMMANDS: [len(g) for g in groups],
                verification.CFG_CLIP: self.clip_norm,
                verification.CFG_SIZE: self.layout.size,
            }
        )
        holders = sorted({c.node for c in accepted})
        secrets.SystemRandom().shuffle(holders)
        for node in holders[:VERIFY_ATTEMPTS]:
            content = RecordDict({"arrays": ArrayRecord(arrays), "config": config})
            query = Message(content=content, message_type=MessageType.QUERY, dst_node_id=node)
            for reply in self._grid.send_and_receive([query], timeout=self.verify_timeout):
                if reply.has_error() or "metrics" not in reply.content.metric_records:
                    continue
                verdicts = reply.content["metrics"].get(verification.MET_VERDICTS)
                if isinstance(verdicts, list) and len(verdicts) == len(groups):
                    return [bool(v) for v in verdicts]
            log(WARNING, "Round %d: key holder node %d gave no verdict on the encrypted sum", server_round, node)
        return None

    def _verified(
        self, server_round: int, accepted: list[Contribution], lines: list[tuple[int, str]]
    ) -> list[Contribution] | None:
        """The contributions whose sum a key holder verified (see
        :mod:`strategies.encrypted.verification`); the dropped ones become rejections. ``None``
        when no key holder answered: the round is then not committed."""
        if self.verify_min_summands == 0 or not accepted:
            return accepted

        def ask(groups: Sequence[Sequence[int]]) -> list[bool]:
            verdicts = self._ask_key_holder(server_round, accepted, groups)
            if verdicts is None:
                raise _NoVerdict
            return verdicts

        try:
            groups, dropped = verification.isolate_invalid(len(accepted), ask, self.verify_min_summands)
        except _NoVerdict:
            return None
        for i in dropped:
            reason = (
                "its encrypted update made the decrypted sum invalid (a key holder checked the sums of "
                f"groups of at least {self.verify_min_summands} updates before the round was committed)"
            )
            lines.append((accepted[i].index, rejection(accepted[i].node, reason)))
        return [accepted[i] for group in groups for i in group]

    def rejections(self) -> list[str]:
        """The replies the last :meth:`aggregate_train` rejected, as ``"node <id>: rejected: <reason>"``."""
        return list(self._rejections)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, add the ciphertexts, append ``(Enc(S_r), W_r, K_r)`` to the chain.

        Returns ``None`` for the arrays (the server holds no plaintext model) and the round's
        measurements: per-client encrypt/decrypt seconds, aggregation seconds, ciphertext bytes.
        """
        if self.layout is None:
            raise RuntimeError("aggregate_train called before configure_train")
        replies = list(replies)
        self._track(replies)
        started = time.perf_counter()
        checked: list[Contribution] = []
        lines: list[tuple[int, str]] = []
        for screened in screen_replies(replies, lines):
            try:
                if len(checked) >= self.scheme.max_clients:
                    raise ValueError(f"the key adds at most max_clients={self.scheme.max_clients} updates")
                checked.append(self._check_reply(screened, self.layout.size))
            except (ValueError, KeyError, TypeError) as err:
                lines.append((screened.index, rejection(screened.node, err)))
        verified = self._verified(server_round, checked, lines)
        self._rejections = [line for _, line in sorted(lines) if not is_client_error(line)]
        for line in self._rejections:
            log(WARNING, "Round %d: %s", server_round, line)
        accepted = verified or []
        measurements: dict[str, Any] = {
            "accepted-replies": len(accepted),
            "rejected-replies": len(self._rejections),
        }
        if verified is None:
            log(WARNING, "Round %d: no key holder verified the encrypted sum; the round is not committed", server_round)
            return None, MetricRecord({**measurements, "round-skipped": 1, "he-version": self.version})
        if not accepted:
            log(WARNING, "Round %d: no valid encrypted update, the global model is kept", server_round)
            return None, MetricRecord({**measurements, "round-skipped": 1, "he-version": self.version})
        total = self.scheme.sum_ciphertexts([c.ciphertexts for c in accepted])
        aggregation_seconds = time.perf_counter() - started
        total_weight = float(sum(c.weight for c in accepted))
        self.deltas.append(EncryptedDelta(tuple(total), total_weight, len(accepted)))

        uploaded = [sum(len(b) for b in c.ciphertexts) for c in accepted]
        measurements.update(
            {
                "he-version": self.version,
                "he-aggregation-seconds": aggregation_seconds,
                "he-ciphertext-bytes": int(sum(uploaded)),
                "he-ciphertext-bytes-per-client": int(np.mean(uploaded)),  # CKKS sizes vary (compressed)
                "he-sum-bytes": int(sum(len(b) for b in total)),
                "he-total-weight": total_weight,
                # encrypted sums sent to clients since the last aggregation (evaluate r-1 + train r)
                "he-chain-bytes-sent": int(self._chain_bytes_sent),
            }
        )
        self._chain_bytes_sent = 0
        for key in (MET_ENCRYPT, MET_DECRYPT):
            values = [float(v) for c in accepted if isinstance(v := c.metrics.get(key), (int, float))]
            if values:
                measurements[f"{key}-mean"] = float(np.mean(values))
                measurements[f"{key}-max"] = float(np.max(values))
        train_keys = sorted({k for c in accepted for k in c.metrics if k.startswith("train-")})
        for key in train_keys:  # the clients' train-<Keras metric> means
            pairs = [(float(v), c.weight) for c in accepted if isinstance(v := c.metrics.get(key), (int, float))]
            if pairs:
                measurements[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        return None, MetricRecord(measurements)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._track(replies)
        return super().aggregate_evaluate(server_round, replies)

    # ----------------------------------------------------------------------------- outputs and state

    def save_encrypted_model(self, path: str | Path) -> Path:
        """``G_0``, the layout and the encrypted chain in one ``.npz``, for scripts/decrypt_model.py."""
        if self.initial is None or self.layout is None:
            raise RuntimeError("no round has run: nothing to save")
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            f"initial-{i:04d}": array.numpy() for i, array in enumerate(self.initial.values())
        }
        for version, delta in enumerate(self.deltas, start=1):
            for i, blob in enumerate(delta.ciphertexts):
                arrays[f"v{version}-{i:05d}"] = np.frombuffer(blob, dtype=np.uint8)
        meta = {
            "scheme": self.scheme.name,
            "version": self.version,
            "layout": {"keys": list(self.layout.keys), "shapes": [list(s) for s in self.layout.shapes]},
            "total-weights": [d.total_weight for d in self.deltas],
            "summands": [d.summands for d in self.deltas],
            "ciphertexts-per-delta": [len(d.ciphertexts) for d in self.deltas],
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        with path.open("wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
        return path

    def state_dict(self) -> dict[str, Any]:
        """The chain, ``G_0`` and the nodes' versions (numpy arrays and JSON values)."""
        state: dict[str, Any] = {
            "total-weights": [d.total_weight for d in self.deltas],
            "summands": [d.summands for d in self.deltas],
            "lengths": [len(d.ciphertexts) for d in self.deltas],
            "node-versions": {str(k): v for k, v in self.node_versions.items()},
        }
        if self.initial is not None:
            state["initial"] = [a.numpy() for a in self.initial.values()]
            state["initial-keys"] = list(self.initial.keys())
        for version, delta in enumerate(self.deltas, start=1):
            state[f"chain-{version}"] = [np.frombuffer(b, np.uint8) for b in delta.ciphertexts]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "initial" in state:
            self.initial = None
            self._remember_initial(
                ArrayRecord({key: Array(np.asarray(a)) for key, a in zip(state["initial-keys"], state["initial"])})
            )
        self.deltas = [
            EncryptedDelta(tuple(np.asarray(a, np.uint8).tobytes() for a in state[f"chain-{v}"]), float(w), int(k))
            for v, (w, k) in enumerate(zip(state["total-weights"], state["summands"]), start=1)
        ]
        self.node_versions = {int(k): int(v) for k, v in dict(state.get("node-versions", {})).items()}


def load_encrypted_model(path: str | Path) -> tuple[dict[str, Any], list[np.ndarray], list[EncryptedDelta]]:
    """Read :meth:`EncryptedFedAvg.save_encrypted_model`'s file: (meta, G_0 arrays, chain)."""
    with np.load(Path(path)) as data:
        meta = json.loads(data["meta"].tobytes())
        initial = [data[f"initial-{i:04d}"] for i in range(len(meta["layout"]["keys"]))]
        chain = [
            EncryptedDelta(
                tuple(data[f"v{version}-{i:05d}"].tobytes() for i in range(count)), float(weight), int(summands)
            )
            for version, (weight, summands, count) in enumerate(
                zip(meta["total-weights"], meta["summands"], meta["ciphertexts-per-delta"]), start=1
            )
        ]
    return meta, initial, chain


def reconstruct(scheme: HomomorphicScheme, initial_flat: np.ndarray, chain: Sequence[EncryptedDelta]) -> np.ndarray:
    """``G_v`` from ``G_0`` and the chain (needs the secret key): what every client computes."""
    flat = np.asarray(initial_flat, np.float32)
    for delta in chain:
        decrypted = scheme.decrypt_sum(list(delta.ciphertexts), flat.size, delta.summands)
        flat = apply_delta(flat, decrypted, delta.total_weight)
    return flat
