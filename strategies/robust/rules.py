"""Aggregation rules as pure functions of the K x P matrix of client updates.

Every rule has the same signature (as in ByzFL), so a strategy can call any of them, including
a user's own ``package.module:function``::

    rule(updates: np.ndarray, weights: np.ndarray, **params) -> np.ndarray

* ``updates``: K x P float32 matrix, one row per client: the client's weights minus the global
  weights, flattened. It is never modified.
* ``weights``: length-K vector of non-negative client weights (usually the number of training
  examples). Byzantine-robust rules ignore them, since a client can forge its weight; each
  docstring says whether it uses them.
* returns: the aggregated update, a length-P float32 vector.

Rows are assumed finite: the strategy rejects replies holding NaN or Inf before aggregating.

Coordinate-wise rules (median, trimmed mean, Bulyan's second stage) work on blocks of columns,
transposed and sorted in a small reused buffer, so their extra memory stays a few MB whatever P.
Distance-based rules (Krum, Multi-Krum, Bulyan's first stage) compute all pairwise squared
distances from one Gram matrix (one BLAS call per column block) instead of K^2 row differences.
They read their rows through :class:`UpdateRows`, so that Krum, Multi-Krum and Bulyan
(:data:`DISTANCE_RULES`) run on the matrix or straight on the replies' bytes, with the same results.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np
from scipy.linalg.blas import dsyrk, ssyrk  # at import, so that BLAS thread limits (threadpoolctl) see its library

from strategies.core.checks import positive_number

Rule = Callable[..., np.ndarray]

_BLOCK_BYTES = 4 * 2**20  # bytes of float32 per column block: small enough to stay in cache


# ---------------------------------------------------------------------------------------------
# Input and parameter validation
# ---------------------------------------------------------------------------------------------


def _as_update_matrix(updates: np.ndarray) -> np.ndarray:
    """Return ``updates`` as a C-contiguous K x P float32 matrix (no copy when it already is)."""
    matrix = np.ascontiguousarray(updates, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] < 1:
        raise ValueError(f"updates must be a K x P matrix with K >= 1 and P >= 1, got shape {matrix.shape}")
    return matrix


def _as_weights(weights: np.ndarray, num_clients: int) -> np.ndarray:
    """Return ``weights`` as a float64 vector of K finite, non-negative values."""
    vector = np.asarray(weights, dtype=np.float64)
    if vector.shape != (num_clients,):
        raise ValueError(
            f"weights must be a vector of {num_clients} values (one per row of updates), got shape {vector.shape}"
        )
    bad = np.flatnonzero(~(np.isfinite(vector) & (vector >= 0)))
    if bad.size:
        raise ValueError(f"weights must be finite and non-negative, got {vector[bad[0]]} for row {bad[0]}")
    return vector


def _normalised(weights: np.ndarray) -> np.ndarray:
    """Weights divided by their sum; at least one weight must be positive."""
    total = weights.sum()
    if total <= 0:
        raise ValueError("weights must have a positive sum, got all zeros")
    return weights / total


def _check_int(key: str, value: Any, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, else a ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


FLOOR_TOLERANCE = 1e-9
"""Added before flooring a count ``beta * n``: ``beta = k / n`` must give ``k`` although the float
product may be ``k - 1e-15`` (4/49 * 49 = 3.9999999999999996). The same as
:func:`fl_app.config.choices.select_attackers` uses for ``attack-fraction``."""


def trimmed_count(num_clients: int, beta: float) -> int:
    """Values trimmed at each end of a coordinate: ``floor(beta * n + 1e-9)``, at most ``(n - 1) // 2``
    so that one value is always kept (``beta`` just below 0.5 could otherwise round up to n/2)."""
    return min(math.floor(beta * num_clients + FLOOR_TOLERANCE), (num_clients - 1) // 2)


def _check_trimmed_mean(num_clients: int, beta: Any, beta_key: str = "beta") -> int:
    """Validate the trimmed mean's beta; return the number trimmed at each end (:func:`trimmed_count`).

    ``beta < 0.5`` and the cap of :func:`trimmed_count` guarantee ``2b < n``: some values are always kept.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.number)):
        raise ValueError(f"{beta_key} must be a number in [0, 0.5), got {beta!r}")
    if not 0 <= beta < 0.5:
        raise ValueError(f"{beta_key} must be in [0, 0.5), got {beta!r}")
    return trimmed_count(num_clients, float(beta))


def _check_krum(num_clients: int, f: Any, f_key: str = "f") -> int:
    """Validate Krum's f (n > 2f + 2); return it as an int."""
    f = _check_int(f_key, f, 0)
    if num_clients <= 2 * f + 2:
        raise ValueError(
            f"Krum needs more than 2*{f_key} + 2 clients: {f_key}={f} requires at least "
            f"{2 * f + 3} clients, got {num_clients}"
        )
    return f


def _check_multi_krum(num_clients: int, f: Any, m: Any, f_key: str = "f", m_key: str = "m") -> tuple[int, int]:
    """Validate Multi-Krum's f and m (1 <= m <= n - f); return them as ints."""
    f = _check_krum(num_clients, f, f_key)
    m = _check_int(m_key, m, 1)
    if m > num_clients - f:
        raise ValueError(
            f"{m_key} must be in [1, n - {f_key}] = [1, {num_clients - f}] for "
            f"{num_clients} clients and {f_key}={f}, got {m}"
        )
    return f, m


def _check_bulyan(num_clients: int, f: Any, f_key: str = "f") -> int:
    """Validate Bulyan's f (n >= 4f + 3); return it as an int."""
    f = _check_int(f_key, f, 0)
    if num_clients < 4 * f + 3:
        raise ValueError(
            f"Bulyan needs at least 4*{f_key} + 3 clients: {f_key}={f} requires {4 * f + 3} clients, got {num_clients}"
        )
    return f


def _check_geometric_median(
    max_iter: Any, eps: Any, tol: Any, max_iter_key: str = "max_iter"
) -> tuple[int, float, float]:
    """Validate the Weiszfeld parameters."""
    max_iter = _check_int(max_iter_key, max_iter, 1)
    eps = positive_number("eps", eps)
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.number)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    return max_iter, eps, float(tol)


def _check_centered_clipping(
    tau: Any,
    iterations: Any,
    tau_quantile: Any = 0.0,
    tau_key: str = "tau",
    iterations_key: str = "iterations",
    tau_quantile_key: str = "tau_quantile",
) -> tuple[float, int, float]:
    """Validate centered clipping's radius, number of iterations and radius quantile (0: absolute)."""
    return (
        positive_number(tau_key, tau),
        _check_int(iterations_key, iterations, 1),
        _check_fraction(tau_quantile_key, tau_quantile, "[0, 1]", lambda q: 0 <= q <= 1),
    )


def _check_fraction(key: str, value: Any, allowed: str, holds: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a number (not a bool) for which ``holds``, else a ValueError
    naming ``key``, the value and the ``allowed`` interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not holds(float(value)):
        raise ValueError(f"{key} must be a number in {allowed}, got {value!r}")
    return float(value)


def _check_dnc(
    num_clients: int,
    f: Any,
    iterations: Any,
    dimension: Any,
    filter_fraction: Any,
    keys: Mapping[str, str] | None = None,
) -> tuple[int, int, int, float, int]:
    """Validate DnC's parameters; return them with the number of rows removed per iteration,
    ``floor(c f)``, which must leave at least one row."""
    keys = keys or {}
    f = _check_int(keys.get("f", "f"), f, 0)
    iterations = _check_int(keys.get("iterations", "iterations"), iterations, 1)
    dimension = _check_int(keys.get("dimension", "dimension"), dimension, 1)
    c_key = keys.get("filter_fraction", "filter_fraction")
    c = _check_fraction(c_key, filter_fraction, "(0, inf)", lambda c: 0 < c < math.inf)
    removed = math.floor(c * f + 1e-9)  # c f without float noise: c = 0.3, f = 10 removes 3
    if removed >= num_clients:
        f_key = keys.get("f", "f")
        raise ValueError(
            f"DnC removes floor({c_key} * {f_key}) = floor({c:g} * {f}) = {removed} updates per iteration and "
            f"needs more clients than that, got {num_clients}"
        )
    return f, iterations, dimension, c, removed


# ---------------------------------------------------------------------------------------------
# Shared vectorised building blocks
# ---------------------------------------------------------------------------------------------


def _block_width(num_rows: int) -> int:
    """Columns of a block of ``num_rows`` rows in :func:`_column_blocks` (at least 1024)."""
    return max(1024, _BLOCK_BYTES // (4 * num_rows))


def _column_blocks(num_rows: int, num_columns: int) -> Iterator[slice]:
    """Consecutive column slices of about ``_BLOCK_BYTES`` of float32 each."""
    width = _block_width(num_rows)
    for start in range(0, num_columns, width):
        yield slice(start, min(start + width, num_columns))


def _sorted_column_blocks(updates: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield ``(columns, block)``: ``updates[:, columns]`` transposed and sorted per column.

    ``block`` has shape (number of columns, K), each line sorted ascending. It is one reused
    buffer: use it before asking for the next block. ``updates`` is not modified.
    """
    buffer: np.ndarray | None = None
    for columns in _column_blocks(*updates.shape):
        if buffer is None:
            buffer = np.empty((columns.stop - columns.start, updates.shape[0]), dtype=np.float32)
        block = buffer[: columns.stop - columns.start]
        block[...] = updates[:, columns].T
        block.sort(axis=1)
        yield columns, block


def _sorted_blocks_of_rows(rows: UpdateRows, selected: np.ndarray | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """:func:`_sorted_column_blocks` of :class:`UpdateRows` (e.g. the replies' bytes, with no K x P
    matrix), of the ``selected`` rows only when given (all rows when None): each block read
    n x w (n rows) into one reused buffer, then transposed into another and sorted per column.
    Both buffers are reused: use a block before asking for the next."""
    num_rows = rows.shape[0] if selected is None else len(selected)
    read_buffer: np.ndarray | None = None
    sorted_buffer: np.ndarray | None = None
    for columns in _column_blocks(num_rows, rows.shape[1]):
        width = columns.stop - columns.start
        if read_buffer is None or sorted_buffer is None:
            read_buffer = np.empty(num_rows * width, dtype=np.float32)
            sorted_buffer = np.empty((width, num_rows), dtype=np.float32)
        block = sorted_buffer[:width]
        block[...] = rows.read(columns, read_buffer[: num_rows * width].reshape(num_rows, width), selected).T
        block.sort(axis=1)
        yield columns, block


def _sorted_block_is_finite(block: np.ndarray) -> bool:
    """Whether a line-wise sorted block holds only finite values: NumPy sorts -inf first, +inf
    and NaN last, so two columns decide it."""
    return bool(np.isfinite(block[:, 0]).all() and np.isfinite(block[:, -1]).all())


def _median_of_sorted(block: np.ndarray) -> np.ndarray:
    """Median of each line of a line-wise sorted block (mean of the two middles when even).

    The two middles are averaged in float64, where their sum is exact (no overflow near the
    float32 limit, no rounding of subnormals), then rounded once: the result always lies
    between them.
    """
    n = block.shape[1]
    if n % 2:
        return block[:, n // 2].copy()
    middles = block[:, n // 2 - 1].astype(np.float64) + block[:, n // 2]
    return (middles * 0.5).astype(np.float32)


def row_norms(updates: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """L2 norm of every row of ``updates`` (of ``updates[i] - center`` when given), in float64.

    Computed in column blocks, without a K x P temporary. Squares are summed in float32 within
    a block (relative error around 1e-7) and in float64 across blocks: distances for the rules.
    Bounds that must hold exactly, such as a clipping norm, use
    :func:`strategies.core.clipping.row_norms` (float64 throughout).
    """
    updates = _as_update_matrix(updates)
    squares = np.zeros(updates.shape[0], dtype=np.float64)
    for columns in _column_blocks(*updates.shape):
        block = updates[:, columns]
        if center is not None:
            block = block - center[columns]
        squares += np.einsum("ij,ij->i", block, block, dtype=np.float32)
    return np.sqrt(squares)


class UpdateRows(Protocol):
    """K x P float32 update rows that a rule reads without needing them as one matrix: the matrix
    itself (:class:`MatrixRows`) or the replies' bytes
    (:class:`strategies.core.update_matrix.ReplyRows`, no K x P matrix at all)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def read(self, columns: slice, out: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """``out[:] = X[rows, columns]``, all K rows when ``rows`` is None (``out``: one line per row
        read, width columns, C-contiguous float32); returns ``out``."""
        ...

    def row(self, index: int) -> np.ndarray:
        """``X[index]`` as a new float32 vector."""
        ...

    def mean_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The unweighted mean of ``X[rows]``, a new float32 vector."""
        ...


class MatrixRows:
    """:class:`UpdateRows` of a K x P float32 matrix (C-contiguous; not modified)."""

    def __init__(self, updates: np.ndarray) -> None:
        self.updates = updates

    @property
    def shape(self) -> tuple[int, int]:
        return self.updates.shape[0], self.updates.shape[1]

    def read(self, columns: slice, out: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        np.copyto(out, self.updates[:, columns] if rows is None else self.updates[rows, columns])
        return out

    def row(self, index: int) -> np.ndarray:
        return self.updates[index].copy()

    def mean_of_rows(self, rows: np.ndarray) -> np.ndarray:
        return _mean_of_rows(self.updates, rows)


def _gram(rows: UpdateRows, dtype: type[np.floating], selected: np.ndarray | None = None) -> np.ndarray:
    """Gram matrix ``G = X X^T`` of the rows (of the ``selected`` rows only when given), in
    float32 (``ssyrk``) or float64 (``dsyrk``) BLAS per column block and float64 across blocks.

    Per column block B (n x about ``_BLOCK_BYTES``, read into one reused buffer, cache-resident):
    ``G += B B^T``, one BLAS ``syrk`` on B's transpose (no copy: a C-contiguous B is a
    Fortran-contiguous B^T), which computes the upper triangle only, about n^2 w flops per block
    of w columns, half of a general product; the lower triangle is mirrored once at the end.
    Only the block buffer and G are allocated: no K x P temporary.
    """
    num_rows = rows.shape[0] if selected is None else len(selected)
    syrk = ssyrk if dtype is np.float32 else dsyrk
    upper = np.zeros((num_rows, num_rows), dtype=np.float64)
    buffer: np.ndarray | None = None
    for columns in _column_blocks(num_rows, rows.shape[1]):
        if buffer is None:
            buffer = np.empty(num_rows * (columns.stop - columns.start), dtype=np.float32)
        out = buffer[: num_rows * (columns.stop - columns.start)].reshape(num_rows, -1)
        block = rows.read(columns, out, selected)
        upper += syrk(1.0, (block if dtype is np.float32 else block.astype(dtype)).T, trans=1)
    return upper + np.triu(upper, 1).T


_FLOAT32_GRAM_ERROR = 2e-9
"""Absolute error of a float32 Gram distance ``D_ij``, per unit of ``G_ii + G_jj`` and per square
root of the block width: measured up to 7e-10 (OpenBLAS ``ssyrk`` on this machine, widths 10k and
42k, shared components 0 to 100 times the rows' spread), so this bound has a margin of about 3."""

_DISTANCE_TOLERANCE = 1e-5
"""Largest estimated relative error of a pairwise distance left as computed in float32."""


def _imprecise_rows(gram: np.ndarray, width: int) -> np.ndarray:
    """The rows of every pair whose float32 distance may be off by more than
    :data:`_DISTANCE_TOLERANCE` of itself: ``(G_ii + G_jj) * _FLOAT32_GRAM_ERROR * sqrt(width) >
    _DISTANCE_TOLERANCE / 2 * D_ij`` (half the tolerance, since ``D_ij`` is itself the float32
    estimate).

    ``D_ij = G_ii + G_jj - 2 G_ij`` cancels when the two rows share a component much longer than
    their difference: clients whose updates nearly agree, or copies of one update. The test is per
    pair, so no other row can make a pair pass or fail it.
    """
    norms = np.diag(gram)
    sums = norms[:, None] + norms[None, :]
    error = sums * (_FLOAT32_GRAM_ERROR * math.sqrt(width))
    imprecise = error > 0.5 * _DISTANCE_TOLERANCE * (sums - 2.0 * gram)
    np.fill_diagonal(imprecise, False)
    return np.flatnonzero(imprecise.any(axis=1))


def distances_of_rows(rows: UpdateRows) -> np.ndarray:
    """K x K float64 matrix of squared L2 distances between ``rows``, from their Gram matrix.

    ``D_ij = G_ii + G_jj - 2 G_ij`` with ``G = X X^T`` (:func:`_gram`), clamped at 0 (rounding
    can make the difference of nearly equal rows slightly negative), with an exact zero diagonal.

    The Gram matrix is computed with float32 BLAS and float64 accumulation across column blocks.
    The rows of the pairs whose distance would lose more than 1e-5 of its value to cancellation
    (:func:`_imprecise_rows`: at K = 100, two rows sharing a component over 7 times as long as the
    rest of each) have their part of G recomputed in float64 (``dsyrk``, about twice the time
    per row pair); so does all of G when float32 overflows (rows with values near the float32
    limit; no finite float32 input overflows float64).

    The rows are not centred on their mean before the product, so the error of ``D_ij`` depends
    on rows i and j alone: a Byzantine row of norm N would move the mean by N / K, and the centred
    honest rows would then share that large component and cancel (measured with one row at 1e4
    times the others' scale: honest distances 21% off when centred, 1.5e-7 when not;
    ``scripts/distance_precision.py``).
    Rows holding NaN or Inf give non-finite distances (the diagonal excepted).
    """
    num_rows, num_columns = rows.shape
    width = min(num_columns, _block_width(num_rows))  # of the float32 pass's blocks
    with np.errstate(over="ignore", invalid="ignore"):
        gram = _gram(rows, np.float32)
        if not np.all(np.isfinite(gram)):
            gram = _gram(rows, np.float64)
        else:
            imprecise = _imprecise_rows(gram, width)
            if imprecise.size:
                gram[np.ix_(imprecise, imprecise)] = _gram(rows, np.float64, imprecise)
        squared_norms = np.diag(gram)
        distances = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
    np.maximum(distances, 0.0, out=distances)
    np.fill_diagonal(distances, 0.0)
    return distances


def pairwise_squared_distances(updates: np.ndarray) -> np.ndarray:
    """K x K float64 matrix of squared L2 distances between the rows of ``updates``
    (:func:`distances_of_rows` of the matrix)."""
    return distances_of_rows(MatrixRows(_as_update_matrix(updates)))


def _krum_order(distances: np.ndarray, num_neighbours: int) -> np.ndarray:
    """Rows of a square matrix of squared distances, from best to worst Krum score.

    score(i) = sum of the ``num_neighbours`` smallest squared distances from i to the other
    rows. With one neighbour, two rows that are each other's nearest always tie; such ties go
    to the row with the smaller sum of distances to all rows, then to the lower index, so that
    the order of the clients does not matter.
    """
    others = distances.copy()
    np.fill_diagonal(others, np.inf)
    scores = np.partition(others, num_neighbours - 1, axis=1)[:, :num_neighbours].sum(axis=1)
    return np.lexsort((distances.sum(axis=1), scores))


def _mean_of_rows(updates: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Unweighted mean of the given rows, without copying them (one BLAS matrix-vector product)."""
    coefficients = np.zeros(updates.shape[0], dtype=np.float32)
    coefficients[rows] = 1.0 / len(rows)
    return coefficients @ updates


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def weighted_mean(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of the updates: FedAvg (McMahan et al., 2017, "Communication-Efficient
    Learning of Deep Networks from Decentralized Data").

    ``mean = sum_i w_i x_i / sum_i w_i``. Uses the weights (at least one must be positive).
    Not robust: one client can move the result arbitrarily far.
    """
    updates = _as_update_matrix(updates)
    weights = _normalised(_as_weights(weights, updates.shape[0]))
    return weights.astype(np.float32) @ updates


def coordinate_median(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Coordinate-wise median (Yin et al., 2018, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates").

    ``out_j = median_i x_ij`` (mean of the two middle values when K is even). Ignores the
    weights. Stays within the honest clients' range in every coordinate while fewer than half
    of the clients are Byzantine.
    """
    updates = _as_update_matrix(updates)
    _as_weights(weights, updates.shape[0])
    result = np.empty(updates.shape[1], dtype=np.float32)
    for columns, block in _sorted_column_blocks(updates):
        result[columns] = _median_of_sorted(block)
    return result


def trimmed_mean(updates: np.ndarray, weights: np.ndarray, beta: float) -> np.ndarray:
    """Coordinate-wise trimmed mean (Yin et al., 2018, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates").

    With ``b = floor(beta * K + 1e-9)`` (:func:`trimmed_count`: ``beta = k / K`` trims exactly k),
    each coordinate drops its ``b`` smallest and ``b`` largest
    values and averages the ``K - 2b`` others: ``out_j = mean(sorted(x_:j)[b : K - b])``.
    ``beta`` must be in [0, 0.5), so that ``2b < K``. Ignores the weights. Stays within the honest
    clients' range in every coordinate while at most ``b`` clients are Byzantine.
    """
    updates = _as_update_matrix(updates)
    num_clients = updates.shape[0]
    _as_weights(weights, num_clients)
    trimmed = _check_trimmed_mean(num_clients, beta)
    if trimmed == 0:
        return _mean_of_rows(updates, np.arange(num_clients))
    kept = num_clients - 2 * trimmed
    result = np.empty(updates.shape[1], dtype=np.float32)
    for columns, block in _sorted_column_blocks(updates):
        np.sum(block[:, trimmed : num_clients - trimmed], axis=1, out=result[columns])
    result /= np.float32(kept)
    return result


def krum_of_rows(rows: UpdateRows, distances: np.ndarray, f: int) -> np.ndarray:
    """Krum's output (see :func:`krum`) from the rows and their K x K squared distances
    (:func:`distances_of_rows`): the row of smallest score, read once."""
    f = _check_krum(rows.shape[0], f)
    return rows.row(int(_krum_order(distances, rows.shape[0] - f - 2)[0]))


def multi_krum_of_rows(rows: UpdateRows, distances: np.ndarray, f: int, m: int) -> np.ndarray:
    """Multi-Krum's output (see :func:`multi_krum`) from the rows and their K x K squared
    distances: the unweighted mean of the ``m`` rows of smallest score, without copying them."""
    f, m = _check_multi_krum(rows.shape[0], f, m)
    return rows.mean_of_rows(_krum_order(distances, rows.shape[0] - f - 2)[:m])


def bulyan_of_rows(rows: UpdateRows, distances: np.ndarray, f: int) -> np.ndarray:
    """Bulyan's output (El Mhamdi et al., 2018; see :func:`bulyan`) from the rows and their K x K
    squared distances (:func:`distances_of_rows`): the set S of ``theta = K - 2f`` rows chosen by
    iterated Krum on the distances, then ``out_j = mean of the beta = theta - 2f values x_ij,
    i in S, nearest median_{i in S} x_ij``, from sorted column blocks of the rows of S alone (read
    from the rows, no theta x P matrix). Needs ``K >= 4f + 3``; with ``f = 0`` the unweighted mean
    of all rows.

    Non-finite values give a non-finite result, so that a caller reading the replies' bytes finds
    and rejects those replies: the mean propagates them; non-finite distances (a row holding NaN
    or Inf makes the whole Gram matrix non-finite) or a sorted block holding them give all NaN,
    since the selection would pass over such a row and hide it.
    """
    num_clients = rows.shape[0]
    f = _check_bulyan(num_clients, f)
    if f == 0:
        return rows.mean_of_rows(np.arange(num_clients))
    result = np.full(rows.shape[1], np.nan, dtype=np.float32)
    if not np.isfinite(distances).all():
        return result
    theta = num_clients - 2 * f
    selected = np.sort(_bulyan_selection(distances, f, theta))
    for columns, block in _sorted_blocks_of_rows(rows, selected):
        if not _sorted_block_is_finite(block):
            result.fill(np.nan)
            return result
        result[columns] = _mean_of_window_nearest_median(block, theta - 2 * f)
    return result


def krum(updates: np.ndarray, weights: np.ndarray, f: int) -> np.ndarray:
    """Krum (Blanchard et al., 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent").

    ``score(i) = sum of |x_i - x_j|^2 over the K - f - 2 rows j != i nearest to x_i``; returns
    the row with the smallest score (ties: smaller sum of all distances, then lower index).
    Needs ``K > 2f + 2``. Ignores the weights. The distances come from one Gram matrix
    (:func:`distances_of_rows`).
    """
    updates = _as_update_matrix(updates)
    _as_weights(weights, updates.shape[0])
    rows = MatrixRows(updates)
    return krum_of_rows(rows, distances_of_rows(rows), f)


def multi_krum(updates: np.ndarray, weights: np.ndarray, f: int, m: int) -> np.ndarray:
    """Multi-Krum (Blanchard et al., 2017, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent").

    Computes every row's Krum score once (see :func:`krum`) and returns the unweighted mean of
    the ``m`` rows with the smallest scores. Needs ``K > 2f + 2`` and ``1 <= m <= K - f``.
    Ignores the weights (a Byzantine client could forge its weight).
    """
    updates = _as_update_matrix(updates)
    _as_weights(weights, updates.shape[0])
    rows = MatrixRows(updates)
    return multi_krum_of_rows(rows, distances_of_rows(rows), f, m)


def coordinate_median_of_rows(rows: UpdateRows) -> np.ndarray:
    """:func:`coordinate_median` of :class:`UpdateRows`, column block by column block, the same
    values as the matrix version; all NaN as soon as a block holds a non-finite value, so that a
    caller reading the replies' bytes finds and rejects those replies (a median would hide them)."""
    result = np.empty(rows.shape[1], dtype=np.float32)
    for columns, block in _sorted_blocks_of_rows(rows):
        if not _sorted_block_is_finite(block):
            result.fill(np.nan)
            return result
        result[columns] = _median_of_sorted(block)
    return result


def trimmed_mean_of_rows(rows: UpdateRows, beta: float) -> np.ndarray:
    """:func:`trimmed_mean` of :class:`UpdateRows`, the same values as the matrix version; all
    NaN when any value is not finite (as :func:`coordinate_median_of_rows`)."""
    num_clients = rows.shape[0]
    trimmed = _check_trimmed_mean(num_clients, beta)
    if trimmed == 0:
        return rows.mean_of_rows(np.arange(num_clients))  # a mean: non-finite in, non-finite out
    result = np.empty(rows.shape[1], dtype=np.float32)
    for columns, block in _sorted_blocks_of_rows(rows):
        if not _sorted_block_is_finite(block):
            result.fill(np.nan)
            return result
        np.sum(block[:, trimmed : num_clients - trimmed], axis=1, out=result[columns])
    result /= np.float32(num_clients - 2 * trimmed)
    return result


SORTED_COLUMN_RULES: dict[str, Callable[..., np.ndarray]] = {
    "median": coordinate_median_of_rows,
    "trimmed-mean": trimmed_mean_of_rows,
}
"""Rules computed from :class:`UpdateRows` one sorted column block at a time:
``rule(rows, **params)``, the same output as the matrix rule of the same name on finite rows and
all NaN otherwise, so that a strategy can run them on the replies' bytes without the K x P matrix."""


DISTANCE_RULES: dict[str, Callable[..., np.ndarray]] = {
    "krum": krum_of_rows,
    "multi-krum": multi_krum_of_rows,
    "bulyan": bulyan_of_rows,
}
"""Rules computed from :class:`UpdateRows` and their K x K squared distances alone:
``rule(rows, distances, **params)``, the same output as the matrix rule of the same name, so
that a strategy can run them on the replies' bytes without building the K x P matrix."""


def _bulyan_selection(distances: np.ndarray, f: int, count: int) -> np.ndarray:
    """Indices of ``count`` rows chosen by iterated Krum, in the order they were chosen.

    Each step scores the remaining rows with Krum among the remaining rows only (on the
    remaining part of the one distance matrix, never recomputed) and moves the best to the
    selection. Krum's neighbour count ``r - f - 2`` on ``r`` remaining rows is kept at least 1,
    which matters only in the last step when f = 1.
    """
    remaining = np.arange(distances.shape[0])
    selected = np.empty(count, dtype=np.intp)
    for step in range(count):
        num_neighbours = max(len(remaining) - f - 2, 1)
        best = _krum_order(distances[np.ix_(remaining, remaining)], num_neighbours)[0]
        selected[step] = remaining[best]
        remaining = np.delete(remaining, best)
    return selected


_WINDOW_LINES = 8192  # lines of a sorted block per step of the window search: its temporaries stay small


def _mean_of_window_nearest_median(block: np.ndarray, width: int) -> np.ndarray:
    """Per line of a line-wise sorted block: mean of the ``width`` values nearest the median.

    In sorted order the ``width`` values nearest the median form a contiguous window. Among the
    ``n - width + 1`` windows the nearest is the one of smallest radius
    ``max(median - s[l], s[l + width - 1] - median)``, the leftmost on ties (``argmin``), so the
    result does not depend on the order of the rows. For up to ``_WINDOW_LINES`` lines at a time,
    all windows' radii come from two slices of the block at once (lines x windows); the values
    outside each line's window are then set to 0 in ``block`` itself (a scratch buffer:
    overwritten) and the lines summed, so that the extra memory is a few arrays of at most
    ``_WINDOW_LINES`` x n values, not copies of the block.
    """
    n = block.shape[1]
    windows = n - width + 1
    columns, starts = np.arange(n), np.arange(windows)[:, None]
    outside = (columns < starts) | (columns >= starts + width)  # per window start: the columns it leaves out
    result = np.empty(len(block), dtype=np.float32)
    for first in range(0, len(block), _WINDOW_LINES):
        lines = block[first : first + _WINDOW_LINES]
        median = _median_of_sorted(lines)[:, None]
        radius = np.subtract(median, lines[:, :windows])
        np.maximum(radius, np.subtract(lines[:, width - 1 :], median), out=radius)
        np.copyto(lines, 0, where=np.take(outside, radius.argmin(axis=1), axis=0))
        np.sum(lines, axis=1, out=result[first : first + len(lines)])
    result /= np.float32(width)
    return result


def bulyan(updates: np.ndarray, weights: np.ndarray, f: int) -> np.ndarray:
    """Bulyan (El Mhamdi et al., 2018, "The Hidden Vulnerability of Distributed Learning in
    Byzantium").

    1. Select ``theta = K - 2f`` rows by iterated Krum: pick the Krum winner among the remaining
       rows, remove it, repeat.
    2. In every coordinate, average the ``beta = theta - 2f`` selected values nearest to the
       selected values' median: ``out_j = mean of the beta values x_ij (i selected) with the
       smallest |x_ij - median_i x_ij|``.

    Needs ``K >= 4f + 3``. Ignores the weights. With ``f = 0`` it is the unweighted mean.
    Computed by :func:`bulyan_of_rows` on the matrix's rows and their distances
    (:func:`distances_of_rows`).
    """
    updates = _as_update_matrix(updates)
    num_clients = updates.shape[0]
    _as_weights(weights, num_clients)
    if _check_bulyan(num_clients, f) == 0:  # the mean: no distances needed
        return _mean_of_rows(updates, np.arange(num_clients))
    rows = MatrixRows(updates)
    return bulyan_of_rows(rows, distances_of_rows(rows), f)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """Smallest value v such that the values <= v hold at least half of the total weight."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def geometric_median(
    updates: np.ndarray,
    weights: np.ndarray,
    max_iter: int = 100,
    eps: float = 1e-6,
    tol: float = 1e-5,
) -> np.ndarray:
    """Weighted geometric median by Weiszfeld's algorithm as in RFA (Pillutla et al., 2022,
    "Robust Aggregation for Federated Learning").

    Approximates ``argmin_v sum_i a_i |v - x_i|`` with ``a = weights / sum(weights)``. Each step
    sets ``b_i = a_i / |v - x_i|`` and moves ``v`` to ``T = sum_i b_i x_i / sum_i b_i``. Uses the
    weights. Its breakdown point is 1/2: while the Byzantine clients hold less than half the
    weight, the result stays within a bounded distance of the honest rows.

    Departures from RFA's code, all for robustness to far outliers:

    * it starts from the coordinate-wise median, not the weighted mean: a start as robust as the
      result, so that outliers millions of units away do not cost dozens of steps;
    * rows within ``eps`` of ``v`` are not given RFA's smoothed weight ``a_i / eps`` (which pins
      ``v`` to a row it starts on) but treated as in Vardi & Zhang (2000, "The multivariate
      L1-median and associated data depth"): with ``eta`` their total weight and
      ``r = |sum_others b_i (x_i - v)|`` the pull of the others, ``v`` moves to
      ``(1 - min(1, eta/r)) T + min(1, eta/r) v``, so it leaves a row exactly when that row is
      not the median;
    * it stops after ``max_iter`` steps or once a step moves ``v`` by at most ``tol`` times the
      weighted median of the distances ``|v - x_i|``, a scale set by the honest majority (RFA's
      relative change of the objective is dominated by the outliers' distances and stops early);
    * it then returns the row ``x_k`` nearest to ``v``, or else the row of largest weight, instead
      of ``v`` when that row is the exact median, by Vardi & Zhang's condition
      ``|sum_{i: x_i != x_k} a_i (x_i - x_k) / |x_i - x_k|| <= sum_{i: x_i = x_k} a_i`` (see
      :func:`_row_is_geometric_median`): Weiszfeld's steps approach such a row at a linear rate
      that tends to 1 as the condition becomes tight, and from a start near another row they may
      not come near it within ``max_iter`` steps;
    * a row holding at least half the weight is returned at once: it always meets that condition;
    * when the nearest row is not the median, ``v`` may still be creeping towards a minimiser close
      to it: one Vardi-Zhang step from the row itself, which leaves the row by about the right
      distance, is returned instead when its objective is lower (found by a random search: 1,000
      steps ended 1.3e-4 above the minimum, one step from the row 2.1e-5).
    """
    updates = _as_update_matrix(updates)
    coefficients = _normalised(_as_weights(weights, updates.shape[0]))
    max_iter, eps, tol = _check_geometric_median(max_iter, eps, tol)
    heaviest = int(np.argmax(coefficients))
    if coefficients[heaviest] >= 0.5:  # the others' pull is at most 1 - a_k <= a_k
        return updates[heaviest].copy()
    median = coordinate_median(updates, weights)
    for _ in range(max_iter):
        step = _weiszfeld_step(updates, coefficients, median, eps)
        if step is None:  # all the weight sits within eps of v
            break
        previous, (median, distances) = median, step
        scale = max(_weighted_median(distances, coefficients), eps)
        if np.linalg.norm(median - previous) <= tol * scale:
            break
    distances = row_norms(updates, median)
    nearest = int(np.argmin(distances))
    for row in dict.fromkeys((nearest, heaviest)):
        if _row_is_geometric_median(updates, coefficients, row, eps):
            return updates[row].copy()
    off_the_row = _weiszfeld_step(updates, coefficients, updates[nearest], eps)
    # the objective sum_i a_i |v - x_i| there and at v
    if off_the_row is not None and coefficients @ row_norms(updates, off_the_row[0]) < coefficients @ distances:
        return off_the_row[0]
    return median


def _weiszfeld_step(
    updates: np.ndarray, coefficients: np.ndarray, v: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """One step of :func:`geometric_median` from ``v``: ``(new v, the distances |v - x_i|)``, or None
    when all the weight sits within ``eps`` of ``v``.

    Weiszfeld's ``T = sum_i b_i x_i / sum_i b_i``, ``b_i = a_i / |v - x_i|``, over the rows farther
    than ``eps``; with ``eta`` the weight of the others and ``r`` the others' pull, Vardi & Zhang's
    ``(1 - min(1, eta / r)) T + min(1, eta / r) v``.
    """
    distances = row_norms(updates, v)
    near = distances <= eps
    pull = np.where(near, 0.0, coefficients / np.maximum(distances, eps))
    total_pull = pull.sum()
    if total_pull == 0:
        return None
    target = (pull / total_pull).astype(np.float32) @ updates
    coincident = coefficients[near].sum()
    if coincident > 0:
        resultant = total_pull * float(np.linalg.norm(target - v))
        stay = min(1.0, coincident / resultant) if resultant > 0 else 1.0
        target = target * np.float32(1.0 - stay) + v * np.float32(stay)
    return target, distances


def _row_is_geometric_median(updates: np.ndarray, coefficients: np.ndarray, k: int, eps: float) -> bool:
    """Whether row ``x_k`` minimises ``sum_i a_i |v - x_i|`` (Vardi & Zhang 2000, Theorem 1).

    With ``eta`` the weight of the rows within ``eps`` of ``x_k`` (``x_k`` included) and
    ``R = sum_{others} a_i (x_i - x_k) / |x_i - x_k|`` the others' pull, ``x_k`` is a minimiser
    exactly when ``|R| <= eta``: no direction lowers the objective.
    """
    distances = row_norms(updates, updates[k])
    others = distances > eps
    pull = np.where(others, coefficients / np.maximum(distances, eps), 0.0)
    resultant = pull.astype(np.float32) @ updates - np.float32(pull.sum()) * updates[k]
    return float(np.linalg.norm(resultant)) <= float(coefficients[~others].sum())


def centered_clipping(
    updates: np.ndarray,
    weights: np.ndarray,
    tau: float,
    iterations: int,
    center: np.ndarray | None = None,
    tau_quantile: float = 0.0,
) -> np.ndarray:
    """Centered clipping (Karimireddy, He & Jaggi, ICML 2021, "Learning from History for
    Byzantine Robust Optimization", Algorithm 1).

    Starting from ``v = center`` (default zeros; the strategy passes the previous round's
    aggregate, see :class:`strategies.aggregation.steps.CenteredClippingStep`), repeats
    ``iterations`` (L) times::

        v <- v + (1/K) sum_i clip_r(x_i - v),    clip_r(z) = z * min(1, r / |z|)

    The radius is ``r = tau`` when ``tau_quantile`` is 0 (absolute), else ``r = tau * Q_q`` with
    ``Q_q`` the ``q = tau_quantile`` quantile of the distances ``|x_i - center|`` (linear
    interpolation), so that the radius follows the scale of the updates; with ``q = 0.5`` and
    fewer than K/2 Byzantine rows, ``Q_q`` is at most the largest honest distance. Each step moves
    ``v`` by at most ``r``, so a Byzantine client shifts it by at most ``r / K`` per step. Ignores
    the weights. Cost: L + 1 passes over the K x P matrix.
    """
    updates = _as_update_matrix(updates)
    num_clients, num_params = updates.shape
    _as_weights(weights, num_clients)
    tau, iterations, tau_quantile = _check_centered_clipping(tau, iterations, tau_quantile)
    if center is None:
        estimate = np.zeros(num_params, dtype=np.float32)
    else:
        estimate = np.array(center, dtype=np.float32)
        if estimate.shape != (num_params,):
            raise ValueError(f"center must be a vector of {num_params} values, got shape {estimate.shape}")
    if tau_quantile > 0:
        scale = float(np.quantile(row_norms(updates, estimate), tau_quantile))
        if scale == 0:  # the chosen quantile of the rows sits on the centre: nothing to move
            return estimate
        tau *= scale
    for _ in range(iterations):
        distances = row_norms(updates, estimate)
        scales = tau / np.maximum(distances, tau)  # min(1, tau / |x_i - v|)
        # (1/K) sum_i s_i (x_i - v) = (s @ X) / K - (sum_i s_i / K) v
        step = (scales / num_clients).astype(np.float32) @ updates
        step -= np.float32(scales.sum() / num_clients) * estimate
        estimate += step
    return estimate


def random_generator(seed: int | None = None) -> np.random.Generator:
    """A PCG64 generator: seeded with ``seed`` (tests, reproducible experiments) or, when None,
    with 128 bits from the OS's CSPRNG (``secrets``), so that clients cannot predict the draws."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128) if seed is None else seed))


def divide_and_conquer(
    updates: np.ndarray,
    weights: np.ndarray,
    f: int,
    iterations: int = 5,
    dimension: int = 10_000,
    filter_fraction: float = 1.0,
    seed: int | None = None,
) -> np.ndarray:
    """Divide-and-conquer, DnC (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine:
    Optimizing Model Poisoning Attacks and Defenses for Federated Learning", Algorithm 2).

    Each of the ``iterations`` rounds draws ``b = dimension`` coordinates ``r`` at random (all P
    when ``b >= P``), centres the sub-matrix ``Z = X[:, r] - mean_i X[i, r]``, takes its top right
    singular vector ``v`` and scores every row by ``s_i = <Z_i, v>^2`` (computed as
    ``s_i = lambda u_i^2`` from the top eigenpair ``(lambda, u)`` of the K x K matrix ``Z Z^T``).
    The ``floor(c f)`` rows of highest score are removed (``c = filter_fraction``). The result is
    the unweighted mean of the rows kept in every iteration, the paper's intersection; if the
    iterations disagree so much that it is empty, of the rows kept in the most iterations.

    Needs ``floor(c f) < K``. Ignores the weights. The coordinates come from
    :func:`random_generator` (``seed`` None: a CSPRNG seed per call, so attackers cannot aim at
    them); for a fixed ``seed`` the result does not depend on the order of the rows (up to ties of
    the scores). Cost: per iteration one gather of K x b values and a K x K eigendecomposition,
    then one pass for the mean.
    """
    updates = _as_update_matrix(updates)
    num_clients, num_params = updates.shape
    _as_weights(weights, num_clients)
    f, iterations, dimension, _, removed = _check_dnc(num_clients, f, iterations, dimension, filter_fraction)
    rng = random_generator(seed)
    kept_count = np.zeros(num_clients, dtype=np.intp)
    for _ in range(iterations):
        if dimension >= num_params:
            sub = updates.astype(np.float64)
        else:
            sub = updates[:, np.sort(rng.choice(num_params, dimension, replace=False))].astype(np.float64)
        sub -= sub.mean(axis=0)
        eigenvalues, eigenvectors = np.linalg.eigh(sub @ sub.T)
        scores = eigenvalues[-1] * eigenvectors[:, -1] ** 2
        kept_count[np.argsort(scores, kind="stable")[: num_clients - removed]] += 1
    return _mean_of_rows(updates, np.flatnonzero(kept_count == kept_count.max()))


# ---------------------------------------------------------------------------------------------
# Registry and run-config checks
# ---------------------------------------------------------------------------------------------

RULES: dict[str, Rule] = {
    "mean": weighted_mean,
    "median": coordinate_median,
    "trimmed-mean": trimmed_mean,
    "krum": krum,
    "multi-krum": multi_krum,
    "bulyan": bulyan,
    "geometric-median": geometric_median,
    "centered-clipping": centered_clipping,
    "dnc": divide_and_conquer,
}

# rule name -> {keyword parameter of the rule: run-config key that sets it}
RUN_CONFIG_KEYS: dict[str, dict[str, str]] = {
    "mean": {},
    "median": {},
    "trimmed-mean": {"beta": "trimmed-mean-beta"},
    "krum": {"f": "krum-f"},
    "multi-krum": {"f": "krum-f", "m": "multi-krum-m"},
    "bulyan": {"f": "bulyan-f"},
    "geometric-median": {"max_iter": "geometric-median-iterations"},
    "centered-clipping": {
        "tau": "centered-clipping-tau",
        "iterations": "centered-clipping-iterations",
        "tau_quantile": "centered-clipping-tau-quantile",
    },
    "dnc": {
        "f": "dnc-f",
        "iterations": "dnc-iterations",
        "dimension": "dnc-dimension",
        "filter_fraction": "dnc-filter-fraction",
    },
}

_REQUIRED_PARAMS: dict[str, tuple[str, ...]] = {
    "trimmed-mean": ("beta",),
    "krum": ("f",),
    "multi-krum": ("f", "m"),
    "bulyan": ("f",),
    "centered-clipping": ("tau", "iterations"),
    "dnc": ("f",),
}


def check_rule_conditions(name: str, num_clients: int, params: Mapping[str, Any]) -> None:
    """Raise a ValueError if rule ``name`` cannot aggregate ``num_clients`` updates.

    ``params`` are the keyword parameters that will be passed to the rule (e.g. ``{"f": 2}`` for
    Krum); messages name the run-config keys that set them (see :data:`RUN_CONFIG_KEYS`), the
    offending value and what is allowed. Only built-in rules (:data:`RULES`) can be checked.
    """
    if name not in RULES:
        raise ValueError(f"unknown aggregation rule {name!r}; known rules: {sorted(RULES)}")
    num_clients = _check_int("number of clients", num_clients, 1)
    keys = RUN_CONFIG_KEYS[name]
    missing = [param for param in _REQUIRED_PARAMS.get(name, ()) if param not in params]
    if missing:
        raise ValueError(f"rule {name!r} needs {', '.join(keys[param] for param in missing)} to be set")
    if name == "trimmed-mean":
        _check_trimmed_mean(num_clients, params["beta"], keys["beta"])
    elif name == "krum":
        _check_krum(num_clients, params["f"], keys["f"])
    elif name == "multi-krum":
        _check_multi_krum(num_clients, params["f"], params["m"], keys["f"], keys["m"])
    elif name == "bulyan":
        _check_bulyan(num_clients, params["f"], keys["f"])
    elif name == "geometric-median":
        _check_geometric_median(
            params.get("max_iter", 100),
            params.get("eps", 1e-6),
            params.get("tol", 1e-5),
            keys["max_iter"],
        )
    elif name == "centered-clipping":
        _check_centered_clipping(
            params["tau"],
            params["iterations"],
            params.get("tau_quantile", 0.0),
            keys["tau"],
            keys["iterations"],
            keys["tau_quantile"],
        )
    elif name == "dnc":
        _check_dnc(
            num_clients,
            params["f"],
            params.get("iterations", 5),
            params.get("dimension", 10_000),
            params.get("filter_fraction", 1.0),
            keys,
        )
