"""The one gate between clients' train replies and any strategy: :class:`GuardedStrategy`.

Flower's strategies (``fedavg``, ``fedadam``, …) and a user's own trust their replies: one client
that sends NaN makes FedAvg's model non-finite for the rest of the run, a float64 reply or a
negative ``num-examples`` skews or breaks the average, and nothing is recorded. The server runs
every strategy inside a :class:`GuardedStrategy` (:func:`fl_app.server.strategy_setup.make_strategy`,
and :func:`fl_app.server.round_loop.run_rounds` for any strategy it is given), which screens each
round's train replies with the checks of :mod:`strategies.core.replies` before the inner strategy
sees them:

* error replies are passed through: Flower's strategies skip them (and log them) themselves, and
  strategies that track their nodes need them; the round loop records them;
* only the first reply of a node counts; one ArrayRecord and one MetricRecord; ``num-examples`` a
  positive whole number;
* arrays named, shaped and typed like the global arrays sent in ``configure_train``, all finite.

What the inner strategy returns keeps the model's dtypes (Flower's FedAdam, FedYogi and FedAdagrad
step in float64 and would turn a float32 model into float64, after which every client's float32
reply would differ from it) and must be finite.

A rejected reply is removed and recorded as ``"node <id>: rejected: <reason>"`` (:meth:`rejections`).
An inner strategy that validates its replies itself (``validates_replies``, e.g. our
:class:`~strategies.aggregation.strategy.AggregationStrategy`, which also decodes compressed
uploads, and the encrypted strategy, whose replies hold ciphertexts) gets them unscreened, so
nothing is read twice on its hot path. The guard is the server's
:class:`~strategies.core.reporting.RoundReporting` view of the strategy either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from strategies.core.replies import finite_values, rejection, screen_replies
from strategies.core.reporting import Private, RoundReporting, Stateful
from strategies.core.update_matrix import ModelLayout


def _server_optimizer_attributes(strategy: Strategy) -> tuple[str, ...]:
    """The attributes in which Flower's server optimizers keep their state: ``m_t``, ``v_t`` of
    FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021), ``momentum_vector`` of FedAvgM."""
    if isinstance(strategy, FedOpt):
        return ("m_t", "v_t")
    if isinstance(strategy, FedAvgM):
        return ("momentum_vector",)
    return ()


class GuardedStrategy(Strategy):
    """``inner`` with its train replies screened, and the server's view of it (``RoundReporting``).

    Parameters
    ----------
    inner : any Message-API strategy (not itself a GuardedStrategy)
    """

    def __init__(self, inner: Strategy) -> None:
        if isinstance(inner, GuardedStrategy):
            raise ValueError("the strategy is already guarded: wrap a strategy once")
        self.inner = inner
        self._reporting = inner if isinstance(inner, RoundReporting) else None
        self._layout: ModelLayout | None = None
        self._rejections: list[str] = []

    @classmethod
    def around(cls, strategy: Strategy) -> GuardedStrategy:
        """``strategy`` itself if it is guarded already, else a guard around it."""
        return strategy if isinstance(strategy, GuardedStrategy) else cls(strategy)

    @property
    def screens(self) -> bool:
        """Whether this guard screens the replies (False: the inner strategy validates them)."""
        return self._reporting is None or not self._reporting.validates_replies

    # ----------------------------------------------------------------------------- RoundReporting

    @property
    def validates_replies(self) -> bool:
        """Always: the guard screens the replies, or its inner strategy validates them."""
        return True

    @property
    def stop_reason(self) -> str | None:
        return self._reporting.stop_reason if self._reporting is not None else None

    @property
    def min_train_replies(self) -> int | None:
        return self._reporting.min_train_replies if self._reporting is not None else None

    @property
    def dp_mode(self) -> str | None:
        """The inner strategy's ``dp-mode`` (None: not private, e.g. any of Flower's strategies)."""
        return self.inner.dp_mode if isinstance(self.inner, Private) else None

    def rejections(self) -> list[str]:
        """The train replies the last :meth:`aggregate_train` rejected, ``"node <id>: <reason>"``."""
        return list(self._rejections)

    def state_dict(self) -> dict[str, Any]:
        """The inner strategy's ``state_dict()``, or the state of Flower's server optimizers."""
        if isinstance(self.inner, Stateful):
            return self.inner.state_dict()
        return {name: getattr(self.inner, name) for name in _server_optimizer_attributes(self.inner)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ValueError if it belongs to another kind of strategy."""
        if isinstance(self.inner, Stateful):
            self.inner.load_state_dict(state)
            return
        expected = _server_optimizer_attributes(self.inner)
        if set(state) != set(expected):
            raise ValueError(
                f"the strategy state holds {sorted(state)} but strategy {type(self.inner).__name__} keeps "
                f"{sorted(expected)}; resume with the same strategy"
            )
        for name in expected:
            setattr(self.inner, name, state[name])

    # ----------------------------------------------------------------------------- Strategy

    def summary(self) -> None:
        self.inner.summary()
        how = "screened by the guard" if self.screens else f"validated by {type(self.inner).__name__}"
        log(INFO, "\t└──> Train replies: %s", how)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.screens:
            self._layout = ModelLayout.of(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen ``replies`` (unless the inner strategy validates them) and aggregate the rest.

        The inner strategy's arrays come back in the dtypes of the arrays sent. Raises ValueError
        when it turns valid replies into NaN or infinite values (e.g. an optimiser's moments
        overflowing): the round loop then keeps the model.
        """
        self._rejections = []
        reporting = self._reporting
        if reporting is not None and reporting.validates_replies:
            try:
                return self.inner.aggregate_train(server_round, replies)
            finally:
                self._rejections = reporting.rejections()
        if self._layout is None:
            raise RuntimeError("aggregate_train called before configure_train")
        kept = self._screen(server_round, list(replies))
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        if arrays is None:
            return None, metrics
        values = self._in_model_dtypes(arrays)
        for key, array in values.items():
            if not finite_values(array):
                raise ValueError(
                    f"{type(self.inner).__name__} aggregated the round's valid replies into NaN or "
                    f"infinite values (array '{key}'); the global model is kept"
                )
        if all(array.dtype == values[key].dtype for key, array in arrays.items()):
            return arrays, metrics
        return ArrayRecord(array_dict={key: Array(array) for key, array in values.items()}), metrics

    def _in_model_dtypes(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        """The arrays, each cast to the dtype of the sent array of the same name (if any)."""
        assert self._layout is not None
        dtypes = dict(zip(self._layout.keys, self._layout.dtypes))
        values = {}
        for key, array in arrays.items():
            value = array.numpy()
            with np.errstate(over="ignore"):  # values beyond the dtype become inf, found by the caller
                values[key] = value.astype(dtypes.get(key, value.dtype), copy=False)
        return values

    def _screen(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies the inner strategy may see (error replies included); the others are
        recorded in ``self._rejections`` and logged."""
        assert self._layout is not None
        lines: list[tuple[int, str]] = []
        kept = {index: reply for index, reply in enumerate(replies) if reply.has_error()}
        for screened in screen_replies(replies, lines):
            try:
                views = self._layout.views(screened.arrays)
                for key, values in zip(self._layout.keys, views):
                    if not finite_values(values):
                        raise ValueError(f"array '{key}' holds NaN or infinite values")
            except ValueError as err:
                lines.append((screened.index, rejection(screened.node, err)))
                continue
            kept[screened.index] = screened.message
        self._rejections = [line for index, line in sorted(lines) if index not in kept]
        for line in self._rejections:
            log(WARNING, "Round %d: %s", server_round, line)
        return [kept[index] for index in sorted(kept)]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
