"""Verify an encrypted round before it is committed, and isolate the contributions that break it.

The server of an encrypted run cannot look at an update: one client can encrypt a value outside
the scheme's range (a Paillier slot that overflows into its neighbours, a CKKS vector far beyond
the clip norm), or report a weight that does not match what it encrypted, and the decrypted sum is
then garbage. Committed to the chain, such a sum breaks every later model for everybody. So before
``Enc(S_r)`` joins the chain, a **key holder** (a client of the round, sampled at random) decrypts
it and answers one bit per sum: valid or not (:func:`sum_is_valid`). It never sends a plaintext.

When the whole sum is invalid the server isolates the culprits by group testing
(:func:`isolate_invalid`): it splits the contributions in halves and asks about each half's sum,
recursively, keeping every group whose sum is valid and never asking about a group of fewer than
``m`` contributions (``he-verify-min-summands``): a group of fewer than ``2m`` whose sum is invalid
is dropped whole. The valid groups' sum is valid too (a sum of finite vectors each within
``W_g C`` has norm at most ``(sum W_g) C``), and it is what the round commits. With one bad
contribution among ``K`` this costs at most ``1 + 2 ceil(log2(K / m))`` decrypted sums in at most
``1 + ceil(log2(K / m))`` round trips, and drops at most ``2m - 1`` contributions (one with
``m = 1``).

What the key holder learns: the full sum (which every client decrypts next round anyway) and, only
when a round is attacked, sums of the groups along the search, each of at least ``m``
contributions. ``m = 1`` identifies the culprit exactly but may show the key holder single honest
updates; the default ``m = 2`` never decrypts fewer than two. A key holder that lies can make a
valid round drop (it is then a Byzantine client withholding its verdict) or let an invalid sum
through (as without verification); what it cannot do is learn an individual update with ``m >= 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

QUERY = "he-verify"
"""The ``query`` value of a verification message (``config`` record)."""
CFG_WEIGHTS = "he-verify-weights"  # W_g of each group
CFG_SUMMANDS = "he-verify-summands"  # K_g of each group
CFG_CLIP = "he-verify-clip-norm"  # C (0: no norm check)
CFG_SIZE = "he-verify-size"  # P, the model's number of parameters
MET_VERDICTS = "he-verdicts"  # the reply: 1 valid / 0 invalid, one per group

NORM_TOLERANCE = 1e-3
"""Relative slack on ``||S|| <= W C``: CKKS decrypts with noise, and float32 rounding."""


def group_prefix(index: int) -> str:
    """Name prefix of group ``index``'s ciphertexts in a verification message."""
    return f"g{index:04d}"


def sum_is_valid(decrypted: np.ndarray, total_weight: float, clip_norm: float) -> bool:
    """Whether a decrypted sum ``S = sum_k w_k u_k`` of weight ``W = sum_k w_k`` can be honest.

    Valid when every value is finite, ``W > 0`` and, with a clip norm ``C > 0``, the norm bound of
    clipped updates holds: ``||S||_2 <= W C (1 + 1e-3) + 1e-6`` (``||u_k|| <= C`` for every
    client, so ``||S|| <= sum_k w_k ||u_k|| <= W C``). Without a clip norm only finiteness and the
    scheme's own range check (Paillier's slot bound, in ``decrypt_sum``) can be verified."""
    if not (math.isfinite(total_weight) and total_weight > 0):
        return False
    values = np.asarray(decrypted, dtype=np.float64)
    if not np.isfinite(values).all():
        return False
    if clip_norm > 0:
        return bool(np.linalg.norm(values) <= total_weight * clip_norm * (1 + NORM_TOLERANCE) + 1e-6)
    return True


Verifier = Callable[[Sequence[Sequence[int]]], Sequence[bool]]
"""Asks a key holder about the sums of several groups of contributions at once; one bit each."""


def isolate_invalid(count: int, verify: Verifier, min_summands: int) -> tuple[list[list[int]], list[int]]:
    """Group testing over contributions ``0 .. count-1``: the groups whose sums are valid, and the
    contributions dropped.

    Round trip 1 asks about the whole sum; each later one about the halves of every group found
    invalid that has at least ``2 * min_summands`` members (smaller invalid groups are dropped
    whole). The valid groups partition the kept contributions, and no group asked about has fewer
    than ``min_summands`` members. ``verify`` must answer one bit per group asked.
    """
    if min_summands < 1:
        raise ValueError(f"he-verify-min-summands must be >= 1 to verify, got {min_summands}")
    if count == 0:
        return [], []
    valid: list[list[int]] = []
    dropped: list[int] = []
    pending: list[list[int]] = [list(range(count))]
    while pending:
        verdicts = list(verify(pending))
        if len(verdicts) != len(pending):
            raise ValueError(f"the key holder answered {len(verdicts)} verdicts for {len(pending)} sums")
        split: list[list[int]] = []
        for group, ok in zip(pending, verdicts, strict=True):
            if ok:
                valid.append(group)
            elif len(group) >= 2 * min_summands:
                middle = len(group) // 2
                split += [group[:middle], group[middle:]]
            else:
                dropped += group
        pending = split
    return valid, sorted(dropped)
