"""Privacy accounting for the mechanisms the app runs, through Google's ``dp_accounting``.

Immutable *round specs* describe one round of a mechanism exactly as it was run (noise,
sampling, population) and turn themselves into a ``dp_accounting`` ``DpEvent``; a
:class:`PrivacyAccountant` composes the rounds and reports epsilon with the RDP accountant
(Mironov 2017; subsampling bounds of Mironov et al. 2019 and Wang et al. 2019) or the PLD
accountant (Koskela et al. 2020; Doroshenko et al. 2022).

Specs:

* :class:`DpFedAvgRound` -- user-level central DP-FedAvg (McMahan et al. 2018).
  Poisson sampling (each client joins with probability ``q = m / N``) is accounted under
  add/remove-one-client as ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``. Fixed-size sampling
  (``m`` of ``N`` without replacement) has an amplification bound only under replace-one-client,
  where the clipped sum has L2 sensitivity ``2C``; the event is therefore
  ``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))``. (``dp_accounting``'s RDP
  accountant feeds the event's noise multiplier straight into a bound normalised by the L2
  sensitivity, google/differential-privacy issue #378; passing ``z`` would understate RDP by 4x.)
  Full participation (``m = N``) is the plain Gaussian mechanism, ``GaussianDpEvent(z)``.
* :class:`LocalGaussianRound`, :class:`LocalLaplaceRound` -- local DP, per client and round.
* :class:`TreeAggregationEpoch` -- one epoch (tree) of DP-FTRL, no sampling (Kairouz et al. 2021).

Adaptive clipping (Andrew et al. 2021) spends part of the budget on the noised count of
unclipped updates. The count is centred (each client adds ``b_i - 1/2``, add/remove sensitivity
``1/2``) and noised with std ``sigma_b``, so it is ``GaussianDpEvent(sigma_b / (1/2))``; the update
gets ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (:func:`adaptive_clipping_update_noise_multiplier`)
and a round is, under the same sampling as the update,

    ComposedDpEvent([GaussianDpEvent(z_Delta), GaussianDpEvent(2 sigma_b)])     (add/remove)

(``DpFedAvgRound(z, N, m, sampling, count_noise_multiplier=2 sigma_b)``), which costs exactly
what ``GaussianDpEvent(z)`` costs: two Gaussians on the same sample are one Gaussian whose
``z^-2`` is the sum of theirs (Mironov et al. 2019, Sec. 3).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import dp_accounting
from dp_accounting import NeighboringRelation, pld, rdp

AccountingMethod = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed-size"]
DpSgdSampling = Literal["poisson", "shuffle"]

METHODS: tuple[str, ...] = ("rdp", "pld")
SAMPLINGS: tuple[str, ...] = ("poisson", "fixed-size")
DPSGD_SAMPLINGS: tuple[str, ...] = ("poisson", "shuffle")

#: RDP orders: dp_accounting's defaults (1.1 ... 10.9 in steps of 0.1, 11 ... 63, 128 ... 1024).
RDP_ORDERS: tuple[float, ...] = tuple(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)

#: PLD grid step. 1e-3 keeps 1000 subsampled-Gaussian rounds under ~0.2 s; the accountant's
#: pessimistic rounding makes the result an upper bound at any step (1e-4 changed epsilon by
#: < 1e-4 in our checks and costs 10x the time).
PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-3
PLD_MIN_NOISE_MULTIPLIER = 0.1
"""PLD's grid grows as 1/z^2: at q = 0.5 and 10 rounds, z = 0.1 takes 4 s and 174 MB, z = 0.05 takes
10 s and 355 MB, and z = 1e-4 asked for 747 GiB. Below this z, PLD accounting is refused (RDP is not)."""


def _check_finite(name: str, value: float, *, minimum: float, strict: bool) -> float:
    value = float(value)
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {minimum}, got {value}")
    return value


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return delta


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"accounting method must be one of {', '.join(METHODS)}, got '{method}'")
    return method


def adaptive_clipping_update_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier left for the update when adaptive clipping spends part of ``z``.

    Andrew et al. 2021, Sec. 3: a round releases the clipped-update sum with noise multiplier
    ``z_Delta`` and the count of unclipped updates (sensitivity 1/2 after centring) with noise
    std ``sigma_b``; together they are one Gaussian mechanism with
    ``z^-2 = z_Delta^-2 + (2 sigma_b)^-2``. Hence

        z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).

    ``count_noise_std = 0`` means fixed clipping (returns ``z``); ``z = 0`` means no DP (returns 0).
    Raises ``ValueError`` when ``2 sigma_b <= z``: the count alone would use the whole budget.
    """
    z = _check_finite("noise_multiplier", noise_multiplier, minimum=0.0, strict=False)
    sigma_b = _check_finite("count_noise_std", count_noise_std, minimum=0.0, strict=False)
    if sigma_b == 0.0 or z == 0.0:
        return z
    if 2.0 * sigma_b <= z:
        raise ValueError(
            f"count_noise_std must be > noise_multiplier / 2 = {z / 2:g} so that the clipped "
            f"count leaves budget for the update, got {sigma_b:g} (Andrew et al. suggest "
            f"expected clients / 20)"
        )
    return (z**-2 - (2.0 * sigma_b) ** -2) ** -0.5


@dataclasses.dataclass(frozen=True)
class DpFedAvgRound:
    """One round of user-level DP-FedAvg: clip to ``C``, sum, add ``N(0, (zC)^2)``, divide by ``m``.

    Attributes:
        noise_multiplier: total ``z`` = noise std on the clipped sum / ``C`` (with adaptive
            clipping, the total of update and count noise; see
            :func:`adaptive_clipping_update_noise_multiplier`). 0 means no privacy.
        num_clients: ``N``, the size of the client population.
        clients_per_round: ``m``; the sample size under fixed-size sampling, the expected one
            (``q N``) under Poisson sampling.
        sampling: ``"poisson"`` or ``"fixed-size"`` (``m`` of ``N`` without replacement).
        count_noise_multiplier: adaptive clipping only (0: fixed clipping): ``2 sigma_b``, the
            noise std of the centred count of unclipped updates over its add/remove sensitivity
            ``1/2``. The round's mechanism is then the update with
            ``z_Delta = (z^-2 - count_noise_multiplier^-2)^(-1/2)`` composed with the count with
            ``count_noise_multiplier``, both on the same sampled clients (see :meth:`to_dp_event`).
    """

    kind: ClassVar[str] = "dp-fedavg"

    noise_multiplier: float
    num_clients: int
    clients_per_round: float
    sampling: Sampling = "poisson"
    count_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        z = _check_finite("noise_multiplier", self.noise_multiplier, minimum=0.0, strict=False)
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, got '{self.sampling}'")
        if int(self.num_clients) != self.num_clients or self.num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {self.num_clients}")
        m = _check_finite("clients_per_round", self.clients_per_round, minimum=0.0, strict=True)
        if m > self.num_clients:
            raise ValueError(f"clients_per_round must be <= num_clients = {self.num_clients}, got {m:g}")
        if self.sampling == "fixed-size":
            if not m.is_integer():
                raise ValueError(f"clients_per_round must be an integer for fixed-size sampling, got {m:g}")
            m = int(m)
        count_z = _check_finite("count_noise_multiplier", self.count_noise_multiplier, minimum=0.0, strict=False)
        if count_z:  # fails unless the count leaves budget for the update (count_z > z)
            adaptive_clipping_update_noise_multiplier(z, count_z / 2.0)
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "count_noise_multiplier", count_z)
        object.__setattr__(self, "num_clients", int(self.num_clients))
        object.__setattr__(self, "clients_per_round", m)

    @classmethod
    def poisson(cls, noise_multiplier: float, num_clients: int, sampling_rate: float) -> DpFedAvgRound:
        """Poisson sampling with rate ``q``: each client joins each round with probability ``q``."""
        q = _check_finite("sampling_rate", sampling_rate, minimum=0.0, strict=True)
        if q > 1.0:
            raise ValueError(f"sampling_rate must be in (0, 1], got {q:g}")
        return cls(noise_multiplier, num_clients, q * num_clients, "poisson")

    @property
    def sampling_rate(self) -> float:
        """``q = m / N``."""
        return self.clients_per_round / self.num_clients

    @property
    def full_participation(self) -> bool:
        return self.clients_per_round == self.num_clients

    @property
    def neighboring_relation(self) -> NeighboringRelation:
        """Replace-one-client for fixed-size sampling, add/remove-one-client for Poisson sampling.

        Decided by the sampling alone, never by the round: a fixed-size run whose round finds no
        more connected nodes than ``m`` (every connected node trains) is still accounted under
        replace-one, so that all its rounds compose under one relation.
        """
        if self.sampling == "fixed-size":
            return NeighboringRelation.REPLACE_ONE
        return NeighboringRelation.ADD_OR_REMOVE_ONE

    @property
    def update_noise_multiplier(self) -> float:
        """``z_Delta``: the update's noise multiplier (``z`` with fixed clipping)."""
        return adaptive_clipping_update_noise_multiplier(self.noise_multiplier, self.count_noise_multiplier / 2.0)

    def _gaussians(self, merge: bool) -> dp_accounting.DpEvent:
        """The un-sampled round under this spec's relation: the update's Gaussian, composed with
        the count's with adaptive clipping (``merge``: as the one equivalent Gaussian, whose
        ``z^-2`` is the sum of theirs, for accountants that take only a Gaussian under sampling).

        Add/remove: update ``z_Delta``, count ``count_noise_multiplier``. Replace-one (fixed-size
        sampling): every sensitivity doubles (clipped sum ``2C``, centred count 1), so both halve.
        """
        scale = 2.0 if self.neighboring_relation is NeighboringRelation.REPLACE_ONE else 1.0
        if not self.count_noise_multiplier:
            return dp_accounting.GaussianDpEvent(self.noise_multiplier / scale)
        update_z, count_z = self.update_noise_multiplier / scale, self.count_noise_multiplier / scale
        if merge:
            return dp_accounting.GaussianDpEvent((update_z**-2 + count_z**-2) ** -0.5)
        return dp_accounting.ComposedDpEvent(
            [dp_accounting.GaussianDpEvent(update_z), dp_accounting.GaussianDpEvent(count_z)]
        )

    def to_dp_event(self, *, merge_gaussians: bool = False) -> dp_accounting.DpEvent:
        """The round as a ``DpEvent``:

        * Poisson: ``PoissonSampledDpEvent(q, G)`` (add/remove), ``G`` itself when ``q = 1``;
        * fixed-size: ``SampledWithoutReplacementDpEvent(N, m, G)`` (replace-one, where the
          clipped sum moves by up to ``2C``, so noise / sensitivity = ``z / 2``), ``G`` itself
          (still replace-one, ``z / 2``) when every one of the ``N`` connected nodes trains;

        with ``G = GaussianDpEvent(z)``, or with adaptive clipping
        ``ComposedDpEvent([GaussianDpEvent(z_Delta), GaussianDpEvent(2 sigma_b)])`` (both halved
        under replace-one). ``merge_gaussians`` folds that composition into its one equivalent
        Gaussian (the PLD accountant takes only a Gaussian under sampling).
        """
        if self.noise_multiplier == 0.0:
            return dp_accounting.NonPrivateDpEvent()
        gaussians = self._gaussians(merge_gaussians)
        if self.full_participation:
            return gaussians
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussians)
        return dp_accounting.SampledWithoutReplacementDpEvent(self.num_clients, int(self.clients_per_round), gaussians)


@dataclasses.dataclass(frozen=True)
class LocalGaussianRound:
    """One round of local Gaussian DP for one client: ``clip_L2(u, C) + N(0, noise_std^2)``.

    Local DP protects any two inputs of the client, so the L2 sensitivity is ``2C`` and the
    event is ``GaussianDpEvent(noise_std / (2C))``.
    """

    kind: ClassVar[str] = "local-gaussian"

    clip_norm: float
    noise_std: float

    def __post_init__(self) -> None:
        c = _check_finite("clip_norm", self.clip_norm, minimum=0.0, strict=True)
        s = _check_finite("noise_std", self.noise_std, minimum=0.0, strict=False)
        object.__setattr__(self, "clip_norm", c)
        object.__setattr__(self, "noise_std", s)

    @property
    def neighboring_relation(self) -> NeighboringRelation:
        return NeighboringRelation.REPLACE_ONE

    def to_dp_event(self) -> dp_accounting.DpEvent:
        if self.noise_std == 0.0:
            return dp_accounting.NonPrivateDpEvent()
        return dp_accounting.GaussianDpEvent(self.noise_std / (2.0 * self.clip_norm))


@dataclasses.dataclass(frozen=True)
class LocalLaplaceRound:
    """One round of local Laplace DP for one client: ``clip_L1(u, C) + Laplace(0, 2C / epsilon)``.

    Pure ``epsilon``-DP per round (L1 sensitivity ``2C`` over any two inputs, scale
    ``b = 2C / epsilon``, so ``epsilon = sensitivity / b``); the event is
    ``LaplaceDpEvent(b / 2C) = LaplaceDpEvent(1 / epsilon)``.
    """

    kind: ClassVar[str] = "local-laplace"

    epsilon: float

    def __post_init__(self) -> None:
        eps = _check_finite("epsilon", self.epsilon, minimum=0.0, strict=True)
        object.__setattr__(self, "epsilon", eps)

    @property
    def neighboring_relation(self) -> NeighboringRelation:
        return NeighboringRelation.REPLACE_ONE

    def to_dp_event(self) -> dp_accounting.DpEvent:
        return dp_accounting.LaplaceDpEvent(1.0 / self.epsilon)


@dataclasses.dataclass(frozen=True)
class TreeAggregationEpoch:
    """One epoch of DP-FTRL (Kairouz et al. 2021, "Practical and private (deep) learning without
    sampling or shuffling"): ``steps`` rounds whose clipped-update sums were released as prefix
    sums through one tree of Gaussian node noise ``N(0, (z C)^2 I)``
    (:mod:`strategies.private.tree_aggregation`), every user contributing to at most one round.

    A user's clipped update lies in at most ``ceil(log2(steps + 1))`` tree nodes, so the epoch is
    ``SingleEpochTreeAggregationDpEvent(z, steps)``, RDP ``alpha ceil(log2(steps + 1)) / (2 z^2)``
    (App. D of the paper), under ``REPLACE_SPECIAL``: neighbouring federations differ in one user's
    data replaced by a special user whose updates are zero (the paper's Definition 1.1). Epochs
    (tree restarts) compose.
    """

    kind: ClassVar[str] = "dp-ftrl-epoch"

    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        z = _check_finite("noise_multiplier", self.noise_multiplier, minimum=0.0, strict=True)
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps}")
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "steps", int(self.steps))

    @property
    def neighboring_relation(self) -> NeighboringRelation:
        return NeighboringRelation.REPLACE_SPECIAL

    def to_dp_event(self) -> dp_accounting.DpEvent:
        return dp_accounting.SingleEpochTreeAggregationDpEvent(self.noise_multiplier, self.steps)


RoundSpec = DpFedAvgRound | LocalGaussianRound | LocalLaplaceRound | TreeAggregationEpoch
ROUND_SPECS: dict[str, type] = {
    spec.kind: spec for spec in (DpFedAvgRound, LocalGaussianRound, LocalLaplaceRound, TreeAggregationEpoch)
}


def spec_to_dict(spec: RoundSpec) -> dict[str, Any]:
    """JSON-able form of a round spec: its fields plus ``"kind"`` (a fixed-clipping DP-FedAvg round
    leaves out ``count_noise_multiplier = 0``, so its form is the one saved before that field)."""
    fields = dataclasses.asdict(spec)
    if fields.get("count_noise_multiplier", None) == 0.0:
        del fields["count_noise_multiplier"]
    return {"kind": spec.kind, **fields}


def spec_from_dict(data: Mapping[str, Any]) -> RoundSpec:
    """Inverse of :func:`spec_to_dict` (validated by the spec's constructor)."""
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind not in ROUND_SPECS:
        raise ValueError(f"round spec kind must be one of {', '.join(ROUND_SPECS)}, got {kind!r}")
    return ROUND_SPECS[kind](**fields)


def make_dp_accountant(
    method: AccountingMethod, relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE
) -> dp_accounting.PrivacyAccountant:
    """A fresh ``dp_accounting`` accountant with this module's RDP orders / PLD grid."""
    _check_method(method)
    if method == "rdp":
        return rdp.RdpAccountant(orders=RDP_ORDERS, neighboring_relation=relation)
    return pld.PLDAccountant(
        neighboring_relation=relation,
        value_discretization_interval=PLD_VALUE_DISCRETIZATION_INTERVAL,
    )


def gaussian_noise_multipliers(event: dp_accounting.DpEvent) -> list[float]:
    """The noise multipliers of every Gaussian in ``event`` (through sampling and composition)."""
    if isinstance(event, dp_accounting.GaussianDpEvent):
        return [float(event.noise_multiplier)]
    if isinstance(
        event,
        (
            dp_accounting.PoissonSampledDpEvent,
            dp_accounting.SampledWithoutReplacementDpEvent,
            dp_accounting.SelfComposedDpEvent,
        ),
    ):
        return gaussian_noise_multipliers(event.event)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        return [z for inner in event.events for z in gaussian_noise_multipliers(inner)]
    return []


def _epsilon_of_event(
    event: dp_accounting.DpEvent,
    relation: NeighboringRelation,
    delta: float,
    method: AccountingMethod,
) -> float:
    if method == "pld":
        smallest = min(gaussian_noise_multipliers(event), default=math.inf)
        if smallest < PLD_MIN_NOISE_MULTIPLIER:
            raise ValueError(
                f"PLD accounting of a Gaussian with noise multiplier {smallest:.3g} < {PLD_MIN_NOISE_MULTIPLIER} "
                f"would need a privacy-loss grid of ~{(PLD_MIN_NOISE_MULTIPLIER / smallest) ** 2 * 200:.3g} MB "
                "(its epsilon is in the hundreds or more anyway): use dp-accounting='rdp' or more noise"
            )
    accountant = make_dp_accountant(method, relation)
    if not accountant.supports(event):
        raise ValueError(
            f"accounting method '{method}' cannot account {event} under {relation.name} "
            f"(dp_accounting's PLD accountant has no bound for fixed-size sampling without "
            f"replacement: use method 'rdp' or Poisson sampling)"
        )
    return float(accountant.compose(event).get_epsilon(delta))


class PrivacyAccountant:
    """Epsilon of all rounds run so far, composed by ``dp_accounting``.

    Keeps one count per distinct round spec (a run of 1000 identical rounds is one entry), so
    adding a round is O(1) and :meth:`epsilon` costs one accountant evaluation per distinct spec,
    whatever the number of rounds. Every spec composed here must share one neighbouring relation
    (a replace-one epsilon and an add/remove epsilon do not compose into either).

    Save :meth:`state_dict` with every checkpoint and rebuild with :meth:`from_state_dict` on
    resume, so that a resumed run continues its epsilon instead of starting again from zero.
    """

    def __init__(self) -> None:
        self._counts: dict[RoundSpec, int] = {}

    @property
    def rounds(self) -> int:
        """Number of rounds composed so far."""
        return sum(self._counts.values())

    @property
    def neighboring_relation(self) -> NeighboringRelation | None:
        """The relation the epsilon is stated under (``None`` before the first round)."""
        return next(iter(self._counts)).neighboring_relation if self._counts else None

    def _check_spec(self, spec: RoundSpec) -> None:
        if not isinstance(spec, tuple(ROUND_SPECS.values())):
            raise TypeError(f"spec must be one of {', '.join(ROUND_SPECS)}, got {type(spec)}")
        relation = self.neighboring_relation
        if relation is not None and spec.neighboring_relation is not relation:
            raise ValueError(
                f"cannot compose a round accounted under {spec.neighboring_relation.name} with "
                f"rounds accounted under {relation.name} (e.g. Poisson and fixed-size sampling "
                f"in one run)"
            )

    def add_round(self, spec: RoundSpec, rounds: int = 1) -> None:
        """Record that ``rounds`` more rounds of ``spec`` were run."""
        self._check_spec(spec)
        if int(rounds) != rounds or rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0, got {rounds}")
        if rounds:
            self._counts[spec] = self._counts.get(spec, 0) + int(rounds)

    @staticmethod
    def _ledger(counts: Mapping[RoundSpec, int], method: AccountingMethod = "rdp") -> dp_accounting.DpEvent:
        """The rounds as one event; for PLD an adaptive round's two Gaussians are merged into
        their equivalent Gaussian (dp_accounting's PLD accountant samples only a Gaussian)."""

        def event(spec: RoundSpec) -> dp_accounting.DpEvent:
            if isinstance(spec, DpFedAvgRound):
                return spec.to_dp_event(merge_gaussians=method == "pld")
            return spec.to_dp_event()

        return dp_accounting.ComposedDpEvent(
            [dp_accounting.SelfComposedDpEvent(event(s), n) for s, n in counts.items()]
        )

    @property
    def ledger(self) -> dp_accounting.DpEvent:
        """All rounds so far as one ``dp_accounting`` event."""
        return self._ledger(self._counts)

    def _epsilon(self, counts: Mapping[RoundSpec, int], delta: float, method: AccountingMethod) -> float:
        delta = _check_delta(delta)
        _check_method(method)
        if not counts:
            return 0.0
        relation = next(iter(counts)).neighboring_relation
        return _epsilon_of_event(self._ledger(counts, method), relation, delta, method)

    def epsilon(self, delta: float, method: AccountingMethod = "rdp") -> float:
        """Epsilon of every round so far at ``delta`` (``inf`` if any round had no noise)."""
        return self._epsilon(self._counts, delta, method)

    def epsilon_if_added(
        self,
        spec: RoundSpec,
        *,
        delta: float,
        rounds: int = 1,
        method: AccountingMethod = "rdp",
    ) -> float:
        """Epsilon that the run would reach after ``rounds`` more rounds of ``spec``.

        Call it before a round and skip the round when the result exceeds the budget, so the
        budget is never overrun. The accountant itself is not changed.
        """
        self._check_spec(spec)
        counts = dict(self._counts)
        counts[spec] = counts.get(spec, 0) + int(rounds)
        return self._epsilon(counts, delta, method)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: ``{"rounds": [{"spec": {...}, "count": n}, ...]}``."""
        return {"rounds": [{"spec": spec_to_dict(s), "count": n} for s, n in self._counts.items()]}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyAccountant:
        """Rebuild an accountant from :meth:`state_dict` (e.g. on resume from a checkpoint)."""
        if "rounds" not in state:
            raise ValueError("privacy accountant state must have a 'rounds' list")
        accountant = cls()
        for entry in state["rounds"]:
            accountant.add_round(spec_from_dict(entry["spec"]), int(entry["count"]))
        return accountant


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    rounds: int,
    *,
    num_clients: int,
    clients_per_round: float,
    sampling: Sampling = "poisson",
    method: AccountingMethod = "rdp",
    tolerance: float = 1e-4,
) -> float:
    """Smallest DP-FedAvg noise multiplier whose epsilon after ``rounds`` rounds is <= target.

    Root-finding with ``dp_accounting.calibrate_dp_mechanism`` (Brent's method), which returns a
    value within ``tolerance`` of the optimum on the safe side (epsilon <= target).
    """
    target_epsilon = _check_finite("target_epsilon", target_epsilon, minimum=0.0, strict=True)
    delta = _check_delta(delta)
    _check_method(method)
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds}")

    def make_spec(z: float) -> DpFedAvgRound:
        return DpFedAvgRound(z, num_clients, clients_per_round, sampling)

    relation = make_spec(1.0).neighboring_relation

    def make_event(z: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(make_spec(z).to_dp_event(), int(rounds))

    def epsilon(z: float) -> float:
        return _epsilon_of_event(make_event(z), relation, delta, method)

    # Bracket [low, high] with epsilon(low) > target >= epsilon(high); epsilon falls as z grows.
    low, high = 0.5, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, 2.0 * high
        if high > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon:g}")
    while epsilon(low) <= target_epsilon:
        low, high = low / 2.0, low
        if low < 1e-6:
            raise ValueError(
                f"target_epsilon {target_epsilon:g} is met with almost no noise (z < 1e-6); choose a smaller target"
            )
    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: make_dp_accountant(method, relation),
            make_event,
            target_epsilon,
            delta,
            dp_accounting.ExplicitBracketInterval(low, high),
            tol=tolerance,
        )
    )


def dpsgd_steps(num_examples: int, batch_size: int, epochs: float) -> int:
    """DP-SGD steps of ``epochs`` epochs over ``n`` examples in batches of expected size ``B``:
    ``ceil(epochs * ceil(n / B))``.

    One number for the loop and the accountant: :mod:`fl_app.task.dp_sgd` draws this many
    Poisson batches, and :func:`dpsgd_epsilon` composes this many steps (with shuffling, an
    epoch's last batch may be partial and is still a step).
    """
    _check_dpsgd_sizes(num_examples, batch_size)
    epochs = _check_finite("epochs", epochs, minimum=0.0, strict=True)
    return math.ceil(epochs * math.ceil(num_examples / batch_size))


def _check_dpsgd_sizes(num_examples: int, batch_size: int) -> None:
    if int(num_examples) != num_examples or num_examples < 1:
        raise ValueError(f"num_examples must be an integer >= 1, got {num_examples}")
    if int(batch_size) != batch_size or not 1 <= batch_size <= num_examples:
        raise ValueError(f"batch_size must be an integer in [1, num_examples = {num_examples}], got {batch_size}")


def dpsgd_event(
    num_examples: int,
    batch_size: int,
    noise_multiplier: float,
    epochs: float,
    *,
    used_microbatching: bool = False,
    sampling: DpSgdSampling = "poisson",
) -> tuple[dp_accounting.DpEvent, NeighboringRelation]:
    """The ``DpEvent`` of DP-SGD on one client's ``n`` examples, and the relation it is stated under.

    DP-SGD (Abadi et al. 2016) releases per step ``sum_{i in batch} clip(g_i, C) + N(0, (z C)^2 I)``
    (then divided by a public constant and fed to the optimizer: post-processing).

    ``sampling="poisson"``: every example joins every step independently with probability
    ``q = B / n``, drawn from a generator nobody can replay (:mod:`fl_app.task.dp_sgd`), for
    ``T = dpsgd_steps(n, B, epochs)`` steps. Adding or removing one example moves the clipped sum
    by at most ``C`` in the steps that sample it, so each step is the sampled Gaussian mechanism
    ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` (RDP bound of Mironov, Talwar, Zhang 2019,
    "Renyi Differential Privacy of the Sampled Gaussian Mechanism"; PLD of Koskela et al. 2020),
    composed ``T`` times, under add/remove-one-example. With ``q = 1`` (``B = n``) every step
    is ``GaussianDpEvent(z)``.

    ``sampling="shuffle"``: each epoch cuts a permutation seeded by the public run-config seed
    into fixed-size batches. Anyone who knows the run config knows every batch, so there is no
    amplification by sampling. Under add/remove-one-example the permutation of ``n + 1`` examples
    differs from that of ``n`` and every batch can change, so no per-example bound follows;
    under replace-one-example (``n`` fixed, so the permutation and every batch's position set
    are the same for both data sets) the replaced example sits in exactly one batch per epoch.
    That step's clipped sum moves by at most ``||clip(g) - clip(g')|| <= 2C`` (also with
    microbatches: the one microbatch holding it moves by at most ``2C``), and every other step
    of the epoch is computed from the same examples, so by adaptive composition an epoch costs
    one Gaussian mechanism with noise std ``z C`` and sensitivity ``2C``, noise multiplier
    ``z / 2``. ``E = ceil(epochs)`` epochs (a partial epoch still touches every example at most
    once) give ``SelfComposedDpEvent(GaussianDpEvent(z / 2), E)`` under replace-one.

    ``used_microbatching`` (Poisson only): gradients were clipped per microbatch of more than
    one example, which doubles the add/remove sensitivity (Ponomareva et al. 2023, Sec. 5.6),
    so ``z / 2`` is accounted.
    """
    _check_dpsgd_sizes(num_examples, batch_size)
    z = _check_finite("noise_multiplier", noise_multiplier, minimum=0.0, strict=False)
    epochs = _check_finite("epochs", epochs, minimum=0.0, strict=True)
    if sampling not in DPSGD_SAMPLINGS:
        raise ValueError(f"DP-SGD sampling must be one of {', '.join(DPSGD_SAMPLINGS)}, got '{sampling}'")
    if z == 0.0:
        return dp_accounting.NonPrivateDpEvent(), NeighboringRelation.ADD_OR_REMOVE_ONE
    if sampling == "shuffle":
        epoch = dp_accounting.GaussianDpEvent(z / 2.0)
        return dp_accounting.SelfComposedDpEvent(epoch, math.ceil(epochs)), NeighboringRelation.REPLACE_ONE
    if used_microbatching:
        z /= 2.0
    q = batch_size / num_examples
    step: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
    if q < 1.0:
        step = dp_accounting.PoissonSampledDpEvent(q, step)
    steps = dpsgd_steps(num_examples, batch_size, epochs)
    return dp_accounting.SelfComposedDpEvent(step, steps), NeighboringRelation.ADD_OR_REMOVE_ONE


def dpsgd_epsilon(
    num_examples: int,
    batch_size: int,
    noise_multiplier: float,
    epochs: float,
    delta: float,
    *,
    used_microbatching: bool = False,
    method: AccountingMethod = "rdp",
    sampling: DpSgdSampling = "poisson",
) -> float:
    """Example-level epsilon of DP-SGD on one client at ``delta``: the event of :func:`dpsgd_event`.

    Poisson sampling is the analysis TF Privacy's ``compute_dp_sgd_privacy`` reports and is
    stated under add/remove-one-example; shuffled fixed-size batches of a public permutation
    are stated under replace-one-example, with no amplification (``inf`` without noise).
    """
    delta = _check_delta(delta)
    _check_method(method)
    event, relation = dpsgd_event(
        num_examples, batch_size, noise_multiplier, epochs, used_microbatching=used_microbatching, sampling=sampling
    )
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
        return math.inf
    return _epsilon_of_event(event, relation, delta, method)
