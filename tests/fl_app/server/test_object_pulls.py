"""Flower's object pulls retry within milliseconds once shortened, in this process only."""

from __future__ import annotations

import time

import pytest
from flwr.supercore import constant
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

from fl_app.server import object_pulls
from fl_app.server.object_pulls import shorten_object_pulls, tries_for_same_patience

FUNCTIONS = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)


@pytest.fixture(autouse=True)
def flower_defaults():
    """Each test starts from Flower's own defaults and leaves them as it found them."""
    saved = [dict(f.__kwdefaults__) for f in FUNCTIONS]
    for function in FUNCTIONS:
        function.__kwdefaults__.update(
            initial_backoff=constant.PULL_INITIAL_BACKOFF,
            backoff_cap=constant.PULL_BACKOFF_CAP,
            max_tries_per_object=constant.PULL_MAX_TRIES_PER_OBJECT,
        )
    yield
    for function, defaults in zip(FUNCTIONS, saved, strict=True):
        function.__kwdefaults__.clear()
        function.__kwdefaults__.update(defaults)


def test_the_module_knows_flowers_own_constants():
    assert constant.PULL_INITIAL_BACKOFF == object_pulls.FLOWER_INITIAL_BACKOFF_S
    assert constant.PULL_BACKOFF_CAP == object_pulls.FLOWER_BACKOFF_CAP_S
    assert constant.PULL_MAX_TRIES_PER_OBJECT == object_pulls.FLOWER_MAX_TRIES_PER_OBJECT


def test_tries_keep_flowers_patience():
    assert tries_for_same_patience(10) == 500
    assert tries_for_same_patience(0.5) == 10_000
    assert tries_for_same_patience(0.3) * 0.3 >= 5000
    with pytest.raises(ValueError, match="positive"):
        tries_for_same_patience(0)


def _unavailable_first(times: int):
    calls = []

    def pull(object_id: str) -> bytes:
        calls.append(time.perf_counter())
        if len(calls) <= times:
            raise ObjectUnavailableError(object_id)
        return b"content"

    return pull, calls


def test_an_object_that_lands_late_costs_flower_a_second_and_us_milliseconds():
    pull, calls = _unavailable_first(1)
    started = time.perf_counter()
    assert pull_objects(["a"], pull) == {"a": b"content"}
    assert time.perf_counter() - started >= 0.75  # Flower's first back-off: 1 s +- 20 %

    shorten_object_pulls()
    pull, calls = _unavailable_first(3)
    started = time.perf_counter()
    assert pull_objects(["a"], pull) == {"a": b"content"}
    assert len(calls) == 4
    assert time.perf_counter() - started < 0.5  # 0.01 + 0.02 + 0.04 s, +- 20 %


def test_both_pull_functions_are_shortened_and_the_call_is_idempotent():
    shorten_object_pulls()
    shorten_object_pulls()
    for function in FUNCTIONS:
        assert function.__kwdefaults__["initial_backoff"] == object_pulls.INITIAL_BACKOFF_S
        assert function.__kwdefaults__["backoff_cap"] == object_pulls.BACKOFF_CAP_S
        assert function.__kwdefaults__["max_tries_per_object"] == tries_for_same_patience(object_pulls.BACKOFF_CAP_S)


def test_defaults_that_are_not_flowers_are_refused():
    inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] = 2
    with pytest.raises(RuntimeError, match="pull_objects defaults changed"):
        shorten_object_pulls()


def test_bad_backoffs_are_refused():
    with pytest.raises(ValueError, match="initial <= cap"):
        shorten_object_pulls(initial=1, cap=0.5)
