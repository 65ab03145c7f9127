"""L2 clipping of the K x P update matrix: the one clip that every path uses.

Rows are clients, columns are parameters, dtype float32 (a single update is a 1 x P matrix,
``vector[None, :]``). Every row ``u_i`` becomes

    u_i * min(1, C / ||u_i||_2)

with the norms accumulated in float64. This is the per-client clip of DP-FedAvg (McMahan et al.
2018, "Learning Differentially Private Recurrent Language Models"), of client-side clipping and
local DP, of the norm-bounding defence (Sun et al. 2019, "Can You Really Backdoor Federated
Learning?") and of the encrypted path's clipped uploads.
"""

from __future__ import annotations

import numpy as np

from strategies.core.checks import positive_number

# The norms are exact to float64 precision, but scaling by C / norm and rounding to float32 can
# overshoot C by up to about 2 * 2**-24 relatively; shrinking the factor by 2**-22 guarantees
# norms <= C, as the sensitivity of DP noise requires.
ROUNDING_MARGIN = 1.0 - 2.0**-22


def row_norms(updates: np.ndarray) -> np.ndarray:
    """L2 norm of every row of a K x P float32 matrix, as float64 (shape ``(K,)``).

    ``einsum`` accumulates in float64 and casts block by block, without a float64 copy of the
    matrix, so the norms are exact to double precision even for millions of parameters (a float32
    sum can be off by 1e-4 relative at P = 1M, which would let clipped rows exceed the clip norm).
    """
    return np.sqrt(np.einsum("ij,ij->i", updates, updates, dtype=np.float64))


def clip_rows(updates: np.ndarray, max_norm: float) -> np.ndarray:
    """Clip every row of ``updates`` to L2 norm at most ``max_norm`` (``C``), in place.

    ``u_i <- u_i * min(1, C / ||u_i||_2)``: rows within the bound are left untouched (bit for
    bit); longer rows are scaled to norm ``C`` (a hair under it, :data:`ROUNDING_MARGIN`, so that
    float32 rounding never leaves a norm above ``C``). Only the clipped rows are rewritten.
    Returns the rows' L2 norms *before* clipping (float64).

    Raises ``ValueError`` for a bad bound, a matrix that is not a writeable 2-D float32 array
    (clip a copy of an array the caller still needs), or a row that is not finite: clipping
    cannot bound NaN or Inf.
    """
    max_norm = positive_number("max_norm", max_norm)
    if not (
        isinstance(updates, np.ndarray)
        and updates.dtype == np.float32
        and updates.ndim == 2
        and updates.flags.writeable
    ):
        raise ValueError("updates must be a writeable K x P float32 matrix")
    norms = row_norms(updates)
    if not np.all(np.isfinite(norms)):
        bad = np.flatnonzero(~np.isfinite(norms)).tolist()
        raise ValueError(f"updates of rows {bad} are not finite (NaN or Inf); validate replies before clipping")
    over = np.flatnonzero(norms > max_norm)
    if over.size:
        updates[over] *= (max_norm / norms[over] * ROUNDING_MARGIN).astype(np.float32)[:, None]
    return norms
