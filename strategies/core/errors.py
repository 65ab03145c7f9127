"""A strategy's way to end training early (e.g. a privacy budget that the next round would exceed).

:func:`fl_app.server.round_loop.run_rounds` catches :class:`StopTraining` raised by ``configure_train``,
logs its message and ends the run after the last completed round.
"""

from __future__ import annotations


class StopTraining(Exception):
    """Raised by ``Strategy.configure_train`` when no further round may run; the message says why."""


class PrivacyBudgetExhausted(StopTraining):
    """The next round would take epsilon above ``dp-target-epsilon``."""
