"""DP-FTRL's participation rule: every user (Flower node id) contributes at most once per epoch.

DP-FTRL (Kairouz et al. 2021, "Practical and private (deep) learning without sampling or shuffling")
needs no sampling: its guarantee rests on each user's data entering at most one leaf of each tree
(App. D of the paper: a tree restart per epoch, each record at most once per epoch). The server
enforces that itself with :class:`EpochParticipation`:

* within an epoch, a node that was asked to train is never asked again (asked counts as used,
  whether or not it replied: conservative);
* an epoch ends, and the tree restarts, when no connected node is left unused, or after
  ``epoch_rounds`` rounds when that is > 0;
* each round asks up to ``clients_per_round`` of the unused connected nodes, chosen by the server's
  generator (no privacy rests on that choice: the accounting assumes no sampling);
* :meth:`EpochParticipation.refusal` names any reply from a node that was not asked this round,
  so the strategy can leave it out rather than let one user contribute twice.

A node is a user: a person who registers a second node id (a second device, or the same device
after its key changed) is two users to this rule, and the guarantee does not cover that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class EpochParticipation:
    """Which nodes a DP-FTRL round asks, so that no node contributes twice in one epoch.

    Parameters
    ----------
    clients_per_round : ``m``, the most nodes one round asks (>= 1)
    epoch_rounds : rounds after which an epoch ends even if unused nodes remain (0: no limit)
    """

    def __init__(self, clients_per_round: int, epoch_rounds: int = 0) -> None:
        if int(clients_per_round) != clients_per_round or clients_per_round < 1:
            raise ValueError(f"clients per round must be an integer >= 1, got {clients_per_round}")
        if int(epoch_rounds) != epoch_rounds or epoch_rounds < 0:
            raise ValueError(f"dp-ftrl-epoch-rounds must be an integer >= 0, got {epoch_rounds}")
        self.clients_per_round = int(clients_per_round)
        self.epoch_rounds = int(epoch_rounds)
        self.epoch = 0
        """Epochs begun so far (the current one's number, 1-based; 0 before the first round)."""
        self.rounds_in_epoch = 0
        self.asked: dict[int, int] = {}
        """Node id -> the round of the current epoch (1-based) in which it was asked."""

    def begins_epoch(self, connected: Sequence[int]) -> bool:
        """Whether the next round starts a new epoch (a tree restart), given the connected nodes."""
        if self.epoch == 0:
            return True
        if self.epoch_rounds and self.rounds_in_epoch >= self.epoch_rounds:
            return True
        return not any(node not in self.asked for node in connected)

    def select(self, connected: Sequence[int], rng: np.random.Generator) -> tuple[list[int], bool]:
        """The nodes this round asks (sorted) and whether it begins a new epoch; records them as used."""
        restart = self.begins_epoch(connected)
        if restart:
            self.epoch += 1
            self.rounds_in_epoch = 0
            self.asked = {}
        unused = sorted({int(node) for node in connected} - set(self.asked))
        count = min(self.clients_per_round, len(unused))
        chosen = sorted(unused[i] for i in rng.permutation(len(unused))[:count])
        self.rounds_in_epoch += 1
        self.asked.update((node, self.rounds_in_epoch) for node in chosen)
        return chosen, restart

    def refusal(self, node: int) -> str | None:
        """Why a reply of ``node`` in the current round must be left out, or None when it may count."""
        asked_in = self.asked.get(int(node))
        if asked_in == self.rounds_in_epoch:
            return None
        if asked_in is not None:
            return (
                f"already asked in round {asked_in} of DP-FTRL epoch {self.epoch}: a user contributes at "
                "most once per epoch, the reply is left out"
            )
        return f"was not asked in this round of DP-FTRL epoch {self.epoch}: the reply is left out"

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the epoch, its rounds so far and ``[[node, round], ...]`` of the nodes asked in it."""
        return {
            "epoch": self.epoch,
            "rounds-in-epoch": self.rounds_in_epoch,
            "asked": [[node, round_] for node, round_ in sorted(self.asked.items())],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        epoch, rounds = int(state["epoch"]), int(state["rounds-in-epoch"])
        asked = {int(node): int(round_) for node, round_ in state["asked"]}
        if epoch < 0 or rounds < 0 or any(not 1 <= r <= rounds for r in asked.values()):
            raise ValueError(
                f"participation state: epoch {epoch}, rounds {rounds}, asked in rounds outside 1..{rounds}"
            )
        self.epoch, self.rounds_in_epoch, self.asked = epoch, rounds, asked
