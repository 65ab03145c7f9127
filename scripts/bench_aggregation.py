"""Aggregation benchmark: our rules against Flower 1.41's own Message-API strategies.

For each size (K clients x P parameters, P split over four arrays like a two-layer model) the
script builds K real reply ``Message`` objects (an ``ArrayRecord`` of new weights and a
``MetricRecord`` with ``num-examples``), then calls ``aggregate_train`` of a Flower strategy and of
the corresponding :class:`strategies.aggregation.strategy.AggregationStrategy` (built by
``build_aggregation_strategy`` from the settings' typed parameters, after ``configure_train`` so that it knows the
global arrays) on the same replies, side by side:

=============  ======================================  ===========================================
Flower         ours                                    same definition?
=============  ======================================  ===========================================
FedAvg         mean, weighting num-examples            yes: sum n_k w_k / sum n_k
FedMedian      median                                  yes: np.median per coordinate
FedTrimmedAvg  trimmed-mean, beta                      yes: floor(beta K) cut at each end
Krum           krum, f                                 yes: n - f - 2 nearest, smallest score
MultiKrum      multi-krum, f, m                        yes when Flower's average of the m selected
                                                       is unweighted (weighted_by_key='unit', a
                                                       metric equal to 1 in every reply)
Bulyan         bulyan, f                               no: Flower selects theta = K - 2f by one
                                                       Multi-Krum ranking, we by iterated Krum (the
                                                       paper); the coordinate stage is the same
=============  ======================================  ===========================================

Times are the median of ``--repeats`` calls and include turning the replies into arrays (for
ours: validation into the reused K x P float32 matrix, the first call also allocating it; or,
for the plain weighted mean, validation and the weighted sum straight from the reply bytes).
BLAS runs with ``--threads`` threads (default 1) for both sides, set with threadpoolctl, and the
figure compared is CPU time, which a machine shared with other jobs does not inflate much. Flower's
FedMedian, FedTrimmedAvg and Bulyan consume the arrays of the replies they aggregate, so every call
gets fresh ``Message`` objects that share the same immutable payload bytes (no copy). Peak extra
memory is measured in a separate call under ``tracemalloc`` (NumPy reports its buffers to it):
the peak of traced allocations during ``aggregate_train`` above what was allocated before it (the
replies), on a fresh strategy, so our first-round buffer allocation is counted.

Each row also prints the rule's *floor*, the least work the rule itself must do, timed bare in the
same turns as the two strategies (each repeat: Flower, ours, then each pass of the floor), so that
a change of the machine's speed reaches all three alike (:data:`FLOORS`). Every floor reads the
K x P values once, as any rule given the replies must: for the weighted mean one weighted pass over
the reply values (no validation, no messages, no result: the *read floor*); for the median and the
trimmed mean sorting every coordinate's K values of the prebuilt K x P matrix, copied block by
block into a transposed buffer (the *sort floor*: NumPy's SIMD sort of transposed column blocks,
faster here than a partition at the median); for Krum the Gram matrix ``X X^T`` of the prebuilt
matrix copied block by block into a 4 MiB buffer, one BLAS ``ssyrk`` per block (the *read + Gram
floor*); for Multi-Krum that and one weighted pass over the m rows it averages; for Bulyan that and
the sort floor of its K - 2f selected rows. ``Flower / floor`` is the largest speed-up any
implementation could show at that size on this machine, and ``floor / ours`` how much of it ours
reaches (the issue's target: 90%). For the distance rules a last column gives ours against the
Gram product alone (``ssyrk`` on the whole prebuilt matrix, no read), the floor the issue named:
no rule that reads its replies can reach it, since the read alone costs 25-45% of it. Flower's
times vary by 2x from call to call (its copies of the K x P matrix are fresh allocations), so the
speed-up is given at Flower's median and over Flower's range.

``--scale KxP`` (e.g. ``1000x1000000``: 4 GB of replies) instead times one ``aggregate_train`` of
our strategy per rule of ``--scale-rules`` (default mean, median, Krum) with
``aggregation-memory-gb = --memory-gb``, and prints its CPU and wall time, the tracemalloc peak above
the replies and the process's peak resident memory above its level before the call.

A second table times the defences for heterogeneous clients, which Flower does not have, side by
side with the rules above on the same replies: each as a whole ``aggregate_train`` of our strategy
(``pre-aggregation`` NNM, bucketing or ARC before the mean; the DnC and centered-clipping rules;
weak-DP noise after the mean) and as the bare NumPy step on the prebuilt K x P matrix. NNM's row
splits its step into the K x K distances (one Gram matrix) and the K x K by K x P mixing product.

    uv run python scripts/bench_aggregation.py                      # K in {10, 100}, P in {100k, 1M}
    uv run python scripts/bench_aggregation.py --clients 100 --params 1000000 --rules median,krum
    uv run python scripts/bench_aggregation.py --clients 100 --params 1000000 --rules mean --defences nnm,dnc
    uv run python scripts/bench_aggregation.py --scale 1000x1000000 --threads 2 --memory-gb 4
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import strategy as flower  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from scipy.linalg.blas import ssyrk  # noqa: E402

from fl_app.config.settings import Settings  # noqa: E402
from strategies.aggregation.strategy import build_aggregation_strategy  # noqa: E402
from strategies.core.update_matrix import ModelLayout, weighted_sum  # noqa: E402  (the floor's inner loop)
from strategies.robust import preaggregation as pre  # noqa: E402
from strategies.robust import rules as robust_rules  # noqa: E402
from strategies.robust.weak_dp import WeakDpNoise  # noqa: E402

RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")
FLOWER_NAMES = {
    "mean": "FedAvg",
    "median": "FedMedian",
    "trimmed-mean": "FedTrimmedAvg",
    "krum": "Krum",
    "multi-krum": "MultiKrum",
    "bulyan": "Bulyan",
}
SAME_DEFINITION = {
    "mean": True,
    "median": True,
    "trimmed-mean": True,
    "krum": True,
    "multi-krum": True,
    "bulyan": False,
}
DEFENCES = ("nnm", "bucketing", "arc", "dnc", "centered-clipping", "weak-dp-noise")
"""The defences of the second table: name -> the run config of our strategy in :func:`defence_strategy`."""
BETA = 0.2
THREADS = 1  # BLAS threads of both sides (--threads)


def _ensure_task_identity() -> None:
    for name in ("run_id", "task_id", "node_id"):
        if getattr(TaskIdentity, f"_{name}") is None:
            setattr(TaskIdentity, name, 0 if name == "node_id" else 1)


def model_shapes(num_params: int) -> list[tuple[int, ...]]:
    """Four arrays like a two-layer dense model (kernel, bias, kernel, bias), about P values."""
    hidden = 256
    rest = num_params - hidden - 10
    inputs = max(1, round(0.9 * rest / hidden))
    outputs = max(1, (rest - inputs * hidden) // hidden)
    return [(inputs, hidden), (hidden,), (hidden, outputs), (outputs,)]


class Payloads:
    """K clients' serialised arrays, built once; :meth:`replies` wraps them in fresh Messages."""

    def __init__(self, num_clients: int, num_params: int, seed: int = 0) -> None:
        _ensure_task_identity()
        rng = np.random.default_rng(seed)
        shapes = model_shapes(num_params)
        self.global_arrays = [rng.standard_normal(s, dtype=np.float32) * np.float32(0.05) for s in shapes]
        self.num_examples = rng.integers(20, 200, num_clients)
        self.clients: list[list[tuple[str, Array]]] = []
        for _ in range(num_clients):
            weights = [
                g + rng.standard_normal(g.shape, dtype=np.float32) * np.float32(0.01) for g in self.global_arrays
            ]
            record = ArrayRecord(weights)
            self.clients.append(list(record.items()))
        self.num_params = sum(math.prod(s) for s in shapes)

    def replies(self) -> list[Message]:
        out = []
        for node, (items, count) in enumerate(zip(self.clients, self.num_examples), start=1):
            record = ArrayRecord(
                array_dict={k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data) for k, a in items}
            )
            metrics = MetricRecord({"num-examples": int(count), "unit": 1})
            instruction = Message(
                content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN
            )
            out.append(Message(content=RecordDict({"arrays": record, "metrics": metrics}), reply_to=instruction))
        return out


class _Grid:
    def __init__(self, num_nodes: int) -> None:
        self.nodes = list(range(1, num_nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def byzantine_f(num_clients: int) -> int:
    """f for Krum, Multi-Krum and Bulyan: a tenth of the clients, within Bulyan's n >= 4f + 3."""
    return max(1, min(num_clients // 10, (num_clients - 3) // 4))


def flower_strategy(rule: str, num_clients: int):
    f = byzantine_f(num_clients)
    common = dict(min_train_nodes=2, min_available_nodes=2)
    if rule == "mean":
        return flower.FedAvg(**common)
    if rule == "median":
        return flower.FedMedian(**common)
    if rule == "trimmed-mean":
        return flower.FedTrimmedAvg(beta=BETA, **common)
    if rule == "krum":
        return flower.Krum(num_malicious_nodes=f, **common)
    if rule == "multi-krum":
        return flower.MultiKrum(
            num_malicious_nodes=f, num_nodes_to_select=num_clients - f, weighted_by_key="unit", **common
        )
    if rule == "bulyan":
        return flower.Bulyan(num_malicious_nodes=f, **common)
    raise ValueError(rule)


def our_strategy(rule: str, num_clients: int, payloads: Payloads, extra: dict[str, Any] | None = None):
    f = byzantine_f(num_clients)
    settings = Settings.from_run_config(
        {
            "num-partitions": num_clients,
            "min-train-clients": num_clients,
            "min-available-clients": 2,
            "client-weighting": "num-examples" if rule == "mean" else "uniform",
            "trimmed-mean-beta": BETA,
            "krum-f": f,
            "multi-krum-m": num_clients - f,
            "bulyan-f": f,
            "aggregation-threads": THREADS,
            **(extra or {}),
        }
    )
    strategy = build_aggregation_strategy(rule, settings.aggregation_params())
    list(strategy.configure_train(1, ArrayRecord(payloads.global_arrays), ConfigRecord({}), _Grid(num_clients)))
    return strategy


def defence_config(defence: str, num_clients: int) -> dict[str, Any]:
    """Run-config keys of our strategy for ``defence`` (f as for Krum: :func:`byzantine_f`)."""
    f = byzantine_f(num_clients)
    if defence in ("nnm", "bucketing", "arc"):
        return {"aggregation-rule": "mean", "pre-aggregation": defence, "pre-aggregation-f": f}
    if defence == "dnc":
        return {"aggregation-rule": "dnc", "dnc-f": f}
    if defence == "centered-clipping":
        return {"aggregation-rule": "centered-clipping"}
    return {"aggregation-rule": "mean", "weak-dp-noise-std": 0.025}


def defence_strategy(defence: str, num_clients: int, payloads: Payloads):
    settings = Settings.from_run_config(
        {
            "num-partitions": num_clients,
            "min-train-clients": num_clients,
            "min-available-clients": 2,
            "aggregation-threads": THREADS,
            **defence_config(defence, num_clients),
        }
    )
    strategy = build_aggregation_strategy(settings.aggregation_rule, settings.aggregation_params())
    list(strategy.configure_train(1, ArrayRecord(payloads.global_arrays), ConfigRecord({}), _Grid(num_clients)))
    return strategy


def bare_steps(defence: str, matrix: np.ndarray) -> list[tuple[str, Callable[[], Any]]]:
    """(label, call) of the bare NumPy work of ``defence`` on the K x P update matrix."""
    num_clients = matrix.shape[0]
    f = byzantine_f(num_clients)
    ones = np.ones(num_clients)
    if defence == "nnm":
        return [
            ("K x K distances (Gram)", lambda: robust_rules.pairwise_squared_distances(matrix)),
            ("distances + mixing product", lambda: pre.nearest_neighbour_mixing(matrix, f)),
        ]
    if defence == "bucketing":
        step = pre.Bucketing(2)
        return [("bucket means", lambda: step(matrix, ones))]
    if defence == "arc":
        copy = matrix.copy()  # clipped in place; clipping the clipped rows again costs the same norms pass
        return [("norms + clip", lambda: pre.adaptive_robust_clipping(copy, f))]
    if defence == "dnc":
        return [("5 x (gather 10k columns + eigh) + mean", lambda: robust_rules.divide_and_conquer(matrix, ones, f))]
    if defence == "centered-clipping":
        center = matrix.mean(axis=0)
        return [
            (
                "3 iterations, radius 0.5-quantile",
                lambda: robust_rules.centered_clipping(matrix, ones, 1.0, 3, center, 0.5),
            )
        ]
    noise = WeakDpNoise(0.025)
    vector = matrix[0].copy()
    return [("P Gaussian draws + add", lambda: noise(vector))]


def time_bare(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        gc.collect()
        started, started_cpu = time.perf_counter(), time.process_time()
        call()
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started)
    return statistics.median(wall), statistics.median(cpu)


def defence_table(defences: list[str], num_clients: int, payloads: Payloads, repeats: int) -> None:
    """Print the defences' times: whole ``aggregate_train`` (our median rule alongside, on the same
    replies and turns) and the bare steps on the prebuilt matrix."""
    layout = ModelLayout.of(ArrayRecord(payloads.global_arrays))
    global_flat = layout.flatten(ArrayRecord(payloads.global_arrays))
    matrix = np.stack([layout.flatten(m.content.array_records["arrays"]) for m in payloads.replies()])
    matrix -= global_flat
    print()
    print(
        "| K | P | defence (ours) | aggregate_train CPU s (min-max) | median rule, same turns, CPU s "
        "| bare step | bare CPU s | bare wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for defence in defences:
        make = functools.partial(defence_strategy, defence, num_clients, payloads)
        make_median = functools.partial(our_strategy, "median", num_clients, payloads)
        ((_, cpu, low, high, _), (_, median_cpu, _, _, _)), _ = time_calls((make, make_median), payloads, repeats)
        config = ", ".join(f"{k}={v}" for k, v in defence_config(defence, num_clients).items())
        for index, (label, call) in enumerate(bare_steps(defence, matrix)):
            bare_wall, bare_cpu = time_bare(call, repeats)
            whole = f"{cpu:.3f} ({low:.3f}-{high:.3f})" if index == 0 else "″"
            print(
                f"| {num_clients} | {payloads.num_params} | {defence} ({config}) | {whole} | "
                f"{median_cpu:.3f} | {label} | {bare_cpu:.3f} | {bare_wall:.3f} |",
                flush=True,
            )
    del matrix


StrategyTimes = tuple[float, float, float, float, Any]
"""(median wall s, median CPU s, smallest and largest CPU s, last result) of one strategy's calls."""


def time_calls(
    makers: tuple[Callable[[], Any], ...],
    payloads: Payloads,
    repeats: int,
    bare: tuple[Callable[[], Any], ...] = (),
) -> tuple[list[StrategyTimes], list[float]]:
    """For each strategy maker, its :data:`StrategyTimes` over ``repeats`` calls of
    ``aggregate_train`` on fresh replies; and for each ``bare`` call, its median CPU seconds.
    Strategies and bare calls take turns call by call, so that a change of the machine's speed
    (it is shared) reaches all of them alike. CPU time (``time.process_time``) is the figure to
    compare; wall time mostly measures waiting."""
    strategies = [make() for make in makers]
    wall: list[list[float]] = [[] for _ in makers]
    cpu: list[list[float]] = [[] for _ in makers]
    bare_cpu: list[list[float]] = [[] for _ in bare]
    results: list[Any] = [None] * len(makers)
    for _ in range(repeats):
        for i, strategy in enumerate(strategies):
            replies = payloads.replies()
            gc.collect()
            started, started_cpu = time.perf_counter(), time.process_time()
            results[i], _ = strategy.aggregate_train(1, replies)
            cpu[i].append(time.process_time() - started_cpu)
            wall[i].append(time.perf_counter() - started)
            del replies
        for i, call in enumerate(bare):
            gc.collect()
            started_cpu = time.process_time()
            call()
            bare_cpu[i].append(time.process_time() - started_cpu)
    strategy_times = [
        (statistics.median(w), statistics.median(c), min(c), max(c), r) for w, c, r in zip(wall, cpu, results)
    ]
    return strategy_times, [statistics.median(c) for c in bare_cpu]


class FloorInputs:
    """What the floors' passes work on, built once per size outside any timing: the replies' views,
    the prebuilt K x P float32 matrix of the updates ``w_k - w`` and the rules' f, m and theta."""

    def __init__(self, payloads: Payloads) -> None:
        layout = ModelLayout.of(ArrayRecord(payloads.global_arrays))
        self.layout = layout
        self.views = [layout.views(message.content.array_records["arrays"]) for message in payloads.replies()]
        self.matrix = np.stack([layout.flatten(m.content.array_records["arrays"]) for m in payloads.replies()])
        self.matrix -= layout.flatten(ArrayRecord(payloads.global_arrays))
        num_clients = self.matrix.shape[0]
        f = byzantine_f(num_clients)
        self.multi_krum_m = num_clients - f  # as our_strategy and flower_strategy set it
        self.bulyan_theta = num_clients - 2 * f


FloorPass = Callable[[FloorInputs], Callable[[], Any]]
"""Prepares one bare pass of a floor (buffers, coefficients) and returns the call to time, which
returns what it computed."""


def read_pass(inputs: FloorInputs, rows: int | None = None) -> Callable[[], np.ndarray]:
    """One pass ``sum_k c_k x_k`` over the values of every reply (of the first ``rows`` when
    given), as the streamed mean sums them (BLAS saxpy on cache-resident chunks), but with no
    validation, no subtraction of the global weights and no result record: the least work any
    weighted mean of the replies must do."""
    views = inputs.views[:rows]
    coefficients = np.full(len(views), 1.0 / len(views), np.float32)
    out = np.empty(inputs.layout.size, np.float32)
    return lambda: weighted_sum(views, coefficients, inputs.layout, out)


def read_gram_pass(inputs: FloorInputs) -> Callable[[], np.ndarray]:
    """The upper triangle of the Gram matrix ``X X^T`` of the prebuilt matrix, read block by block
    into one 4 MiB buffer (one copy of every value, as reading the replies must) and one BLAS
    ``ssyrk`` per block, accumulated in float64: the least work any exact pairwise-distance rule
    given its replies must do."""
    matrix = inputs.matrix
    num_rows, num_columns = matrix.shape
    width = robust_rules._block_width(num_rows)  # the rules' 4 MiB blocks
    buffer = np.empty((num_rows, width), np.float32)

    def gram() -> np.ndarray:
        upper = np.zeros((num_rows, num_rows))
        for start in range(0, num_columns, width):
            block = buffer[:, : min(width, num_columns - start)]
            np.copyto(block, matrix[:, start : start + width])
            upper += ssyrk(1.0, block.T, trans=1)
        return upper

    return gram


def gram_alone_pass(inputs: FloorInputs) -> Callable[[], np.ndarray]:
    """The upper triangle of ``X X^T`` of the whole prebuilt matrix, one BLAS ``ssyrk`` (half the
    flops of NumPy's ``X @ X.T``, which Flower's Krum, Multi-Krum and Bulyan compute), with the
    matrix given for free: the issue's floor for the distance rules, below any rule that reads."""
    matrix = inputs.matrix
    return lambda: ssyrk(1.0, matrix.T, trans=1)


def sort_pass(inputs: FloorInputs, rows: int | None = None) -> Callable[[], np.ndarray]:
    """Every coordinate's values of the prebuilt matrix (its first ``rows`` rows when given) sorted:
    column blocks of 4 MiB copied transposed into one buffer and sorted line by line (NumPy's SIMD
    sort; a partition at the median is 5x slower here). A coordinate-wise median or trimmed mean
    must at least select within each coordinate's values; this is the fastest selection NumPy has.
    Returns the last block."""
    matrix = inputs.matrix[:rows]
    num_rows, num_columns = matrix.shape
    width = robust_rules._block_width(num_rows)  # the rules' 4 MiB blocks
    buffer = np.empty((width, num_rows), np.float32)

    def sort_blocks() -> np.ndarray:
        block = buffer[:0]
        for start in range(0, num_columns, width):
            block = buffer[: min(width, num_columns - start)]
            block[...] = matrix[:, start : start + width].T
            block.sort(axis=1)
        return block

    return sort_blocks


FLOORS: dict[str, tuple[str, tuple[FloorPass, ...]]] = {
    "mean": ("read", (read_pass,)),
    "median": ("sort", (sort_pass,)),
    "trimmed-mean": ("sort", (sort_pass,)),
    "krum": ("read + Gram", (read_gram_pass,)),
    "multi-krum": ("read + Gram + mean of m", (read_gram_pass, lambda i: read_pass(i, i.multi_krum_m))),
    "bulyan": ("read + Gram + sort of K - 2f", (read_gram_pass, lambda i: sort_pass(i, i.bulyan_theta))),
}
"""Each rule's floor: the least work the rule itself must do given the replies, measured bare on
this machine (the sum of the listed passes, each reading the values it needs once). Mean-type
rules: one read of the replies; coordinate-wise rules: sorting each coordinate's values;
distance rules: the Gram matrix of the rows, then what the rule does with the rows it chose."""

GRAM_ALONE_RULES = ("krum", "multi-krum", "bulyan")
"""The rules also compared with :func:`gram_alone_pass`, the floor the issue named."""


def peak_extra_bytes(make: Callable[[], Any], payloads: Payloads) -> int:
    """tracemalloc peak during one aggregate_train on a fresh strategy, above the level before."""
    strategy = make()
    replies = payloads.replies()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    strategy.aggregate_train(1, replies)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak - before


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakResident:
    """The highest resident memory of this process while the ``with`` block runs, sampled every 20 ms
    by a thread (so a short spike between samples can be missed; tracemalloc gives the exact peak of
    traced allocations)."""

    def __enter__(self) -> PeakResident:
        self.before = self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def scale_table(num_clients: int, num_params: int, rules: list[str], memory_gb: float) -> None:
    """One ``aggregate_train`` of our strategy per rule at a large K x P (no Flower: its strategies
    copy the K x P matrix several times), with ``aggregation-memory-gb = memory_gb``: CPU and wall
    seconds, the exact peak of traced allocations above the replies (tracemalloc, which NumPy reports
    its buffers to), and the process's peak resident memory during the call above what it was before
    (replies included in neither). Each rule runs once: at K = 1000, P = 1M the replies alone hold
    4 GB."""
    started = time.perf_counter()
    payloads = Payloads(num_clients, num_params)
    small = Payloads(7, 10_000)
    for rule in rules:  # first calls (threadpoolctl's look at the libraries, BLAS thread start): not timed
        our_strategy(rule, 7, small).aggregate_train(1, small.replies())
    print(
        f"replies: K = {num_clients}, P = {payloads.num_params}, {4 * num_clients * payloads.num_params / 2**30:.2f} GiB "
        f"of float32 payload, built in {time.perf_counter() - started:.0f} s; process resident "
        f"{resident_bytes() / 2**30:.2f} GiB; aggregation-memory-gb = {memory_gb:g}; BLAS threads {THREADS}",
        flush=True,
    )
    print(
        "| K | P | rule | CPU s | wall s | peak traced above replies, GiB | peak resident above start, GiB | K x P matrix? |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for rule in rules:
        strategy = our_strategy(rule, num_clients, payloads, {"aggregation-memory-gb": memory_gb})
        replies = payloads.replies()
        gc.collect()
        with PeakResident() as resident:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            started, started_cpu = time.perf_counter(), time.process_time()
            result, metrics = strategy.aggregate_train(1, replies)
            cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1] - before
            tracemalloc.stop()
        assert result is not None and metrics is not None, f"{rule}: the round was skipped"
        matrix = "no (streamed)" if strategy.streams_mean() or strategy.streams_distances() else "yes"
        print(
            f"| {num_clients} | {payloads.num_params} | {rule} | {cpu:.1f} | {wall:.1f} | {peak / 2**30:.2f} | "
            f"{(resident.peak - resident.before) / 2**30:.2f} | {matrix} |",
            flush=True,
        )
        del strategy, replies, result
        gc.collect()


def max_difference(ours: ArrayRecord, theirs: ArrayRecord) -> float:
    mine, flower_arrays = ours.to_numpy_ndarrays(), theirs.to_numpy_ndarrays()
    layout = ModelLayout.of_arrays(mine)
    try:
        difference = layout.flatten_arrays(
            flower_arrays, minus=layout.flatten_arrays(mine, dtype=np.float64), dtype=np.float64
        )
    except ValueError:  # different array counts or shapes
        return float("inf")
    return float(np.max(np.abs(difference)))


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100")
    parser.add_argument("--params", default="100000,1000000")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument("--threads", type=int, default=THREADS, help="BLAS threads of both sides")
    parser.add_argument("--defences", default=",".join(DEFENCES), help="defences of the second table ('' to skip it)")
    parser.add_argument(
        "--scale",
        metavar="KxP",
        help="instead of the tables: one aggregate_train per rule at K x P (e.g. 1000x1000000), time and peak memory",
    )
    parser.add_argument("--scale-rules", default="mean,median,krum", help="the rules of --scale")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="aggregation-memory-gb of --scale")
    args = parser.parse_args()
    THREADS = args.threads
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=args.threads, user_api="blas")
    rules = [r.strip() for r in args.rules.split(",")]
    rules = [r for r in rules if r]
    for rule in rules:
        if rule not in RULES:
            parser.error(f"unknown rule '{rule}'; known: {', '.join(RULES)}")
    defences = [d.strip() for d in args.defences.split(",") if d.strip()]
    for defence in defences:
        if defence not in DEFENCES:
            parser.error(f"unknown defence '{defence}'; known: {', '.join(DEFENCES)}")

    import logging

    from flwr.common.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)  # Flower's strategies log every call at INFO

    if args.scale:
        num_clients, num_params = (int(n) for n in args.scale.lower().split("x"))
        scale_table(
            num_clients, num_params, [r.strip() for r in args.scale_rules.split(",") if r.strip()], args.memory_gb
        )
        return

    print(
        "| K | P | Flower strategy | Flower CPU s (min-max) | ours CPU s (min-max) | speed-up (CPU, medians; "
        "Flower min-max / ours median) | floor CPU s | Flower/floor | ours/floor ratio (floor s / ours s) "
        "| Flower wall s | ours wall s | Flower peak MB | ours peak MB | ours peak / KxP | same result? (max abs diff) "
        "| Gram alone CPU s: ours/it |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for num_clients in (int(k) for k in args.clients.split(",")):
        for num_params in (int(p) for p in args.params.split(",")):
            payloads = Payloads(num_clients, num_params)
            inputs = FloorInputs(payloads)
            matrix_bytes = 4 * num_clients * payloads.num_params
            for rule in rules:
                make_flower = functools.partial(flower_strategy, rule, num_clients)
                make_ours = functools.partial(our_strategy, rule, num_clients, payloads)
                passes = [prepare(inputs) for prepare in FLOORS[rule][1]]
                if rule in GRAM_ALONE_RULES:
                    passes.append(gram_alone_pass(inputs))
                (flower_times, ours_times), pass_cpu = time_calls(
                    (make_flower, make_ours), payloads, args.repeats, tuple(passes)
                )
                flower_s, flower_cpu, flower_min, flower_max, flower_result = flower_times
                ours_s, ours_cpu, ours_min, ours_max, ours_result = ours_times
                difference = max_difference(ours_result, flower_result)
                del flower_result, ours_result, passes
                floor_cpu = sum(pass_cpu[: len(FLOORS[rule][1])])
                gram_alone = (
                    f"{pass_cpu[-1]:.3f}: {100 * pass_cpu[-1] / ours_cpu:.0f}%" if rule in GRAM_ALONE_RULES else "-"
                )
                if args.no_memory:
                    flower_mb = ours_mb = ratio = "-"
                else:
                    flower_peak = peak_extra_bytes(make_flower, payloads)
                    ours_peak = peak_extra_bytes(make_ours, payloads)
                    flower_mb, ours_mb = f"{flower_peak / 2**20:.0f}", f"{ours_peak / 2**20:.0f}"
                    ratio = f"{ours_peak / matrix_bytes:.2f}"
                tolerance = 1e-5
                if SAME_DEFINITION[rule]:
                    verdict = ("yes" if difference <= tolerance else "NO") + f" ({difference:.1e})"
                else:
                    verdict = f"definitions differ ({difference:.1e})"
                print(
                    f"| {num_clients} | {payloads.num_params} | {FLOWER_NAMES[rule]} | {flower_cpu:.3f} "
                    f"({flower_min:.3f}-{flower_max:.3f}) | {ours_cpu:.3f} ({ours_min:.3f}-{ours_max:.3f}) | "
                    f"**{flower_cpu / ours_cpu:.1f}x** ({flower_min / ours_cpu:.1f}-{flower_max / ours_cpu:.1f}x) | "
                    f"{FLOORS[rule][0]} {floor_cpu:.3f} | {flower_cpu / floor_cpu:.1f}x | "
                    f"**{100 * floor_cpu / ours_cpu:.0f}%** | {flower_s:.2f} | {ours_s:.2f} | {flower_mb} | {ours_mb} | "
                    f"{ratio} | {verdict} | {gram_alone} |",
                    flush=True,
                )
            del inputs
            if defences:
                defence_table(defences, num_clients, payloads, args.repeats)
            del payloads
            gc.collect()


if __name__ == "__main__":
    main()
