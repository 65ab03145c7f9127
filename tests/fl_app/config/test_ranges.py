"""Every numeric run-config key has a closed range: values just inside each bound are accepted, values
just outside are refused naming key, value and range; a fuzz over every key; and the extreme values
that once hung, overflowed or crashed a run now finish a one-round federation with a finite model."""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from fl_app.config.settings import Range, Settings, SettingsError, allowed_of, range_of

NUMERIC = [f for f in dataclasses.fields(Settings) if f.type in ("int", "float")]
TEXT = [f for f in dataclasses.fields(Settings) if f.type == "str"]


def key_of(field: dataclasses.Field) -> str:
    return field.name.replace("_", "-")


def declared(field: dataclasses.Field) -> Range:
    key_range = range_of(field)
    assert key_range is not None, f"{key_of(field)} declares no range"
    return key_range


def inside_and_outside(field: dataclasses.Field) -> tuple[list[Any], list[Any]]:
    """The values just inside each bound of ``field``'s range, and those just outside."""
    r = declared(field)
    if field.type == "int":
        low = int(r.low) + 1 if r.low_open else int(r.low)
        high = int(r.high) - 1 if r.high_open else int(r.high)
        return [low, high], [low - 1, high + 1]
    up, down = math.inf, -math.inf
    low_in, low_out = (math.nextafter(r.low, up), r.low) if r.low_open else (r.low, math.nextafter(r.low, down))
    high_in, high_out = (math.nextafter(r.high, down), r.high) if r.high_open else (r.high, math.nextafter(r.high, up))
    return [low_in, high_in], [low_out, high_out]


def assert_names_key_value_and_range(message: str, key: str, value: Any, key_range: Range) -> None:
    assert key in message, message
    assert repr(value) in message, message
    assert key_range.interval() in message, message


def test_every_numeric_key_declares_a_range_that_holds_its_default():
    assert len(NUMERIC) > 60
    for field in NUMERIC:
        key_range = declared(field)
        assert math.isfinite(key_range.low) and math.isfinite(key_range.high), key_of(field)
        assert field.default in key_range, f"{key_of(field)}: default {field.default} not in {key_range.interval()}"
        assert allowed_of(field).startswith(key_range.interval()), "the docs print the range that is checked"
    assert all(range_of(f) is None for f in dataclasses.fields(Settings) if f not in NUMERIC)


@pytest.mark.parametrize("field", NUMERIC, ids=key_of)
def test_values_just_inside_are_accepted_and_just_outside_refused(field):
    key = key_of(field)
    inside, outside = inside_and_outside(field)
    for value in inside:
        assert getattr(Settings.parse({key: value}), field.name) == value
    for value in outside:
        with pytest.raises(SettingsError) as err:
            Settings.parse({key: value})
        assert_names_key_value_and_range(str(err.value), key, value, declared(field))
        with pytest.raises(SettingsError):  # the server and a ClientApp refuse it too
            Settings.client_from_run_config({key: value})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("seed", -1, "seed must be in [0, 4294967295], got -1"),
        (
            "centered-clipping-iterations",
            1e12,
            "centered-clipping-iterations must be in [1, 1000], got 1000000000000.0",
        ),
        ("server-learning-rate", 1e39, "server-learning-rate must be in (0, 1000], got 1e+39"),
        ("dp-clip-norm", 1e300, "dp-clip-norm must be in (0, 1000000], got 1e+300"),
        ("client-threads", 1e12, "client-threads must be in [1, 1024], got 1000000000000.0"),
        ("synthetic-samples-per-client", 1e7, "synthetic-samples-per-client must be in [2, 100000], got 10000000.0"),
        ("min-available-clients", 1e12, "min-available-clients must be in [1, 1000000], got 1000000000000.0"),
        ("local-epochs", 1.5, "local-epochs must be of type int, got 1.5 (float)"),
        ("round-timeout", 10**400, "round-timeout must be a finite number"),
        ("dp-delta", float("nan"), "dp-delta must be a finite number, got nan"),
    ],
)
def test_the_values_that_broke_runs_are_refused_by_name(key, value, message):
    with pytest.raises(SettingsError) as err:
        Settings.from_run_config({key: value})
    assert message in str(err.value)


def test_cross_key_limits_name_every_key():
    for key in ("min-train-clients", "min-evaluate-clients", "min-available-clients"):
        with pytest.raises(SettingsError, match=rf"{key} \(3\) must be at most num-partitions \(2\)"):
            Settings.from_run_config({"num-partitions": 2, key: 3})
    synthetic = {"dataset": "synthetic", "num-partitions": 1000, "synthetic-samples-per-client": 100_000}
    with pytest.raises(SettingsError, match="synthetic-samples-per-client x num-partitions .* synthetic-features"):
        Settings.client_from_run_config(synthetic)
    Settings.client_from_run_config({**synthetic, "num-partitions": 10})


# ----------------------------------------------------------------------------------------- the fuzz


def text_choices(field: dataclasses.Field) -> list[str]:
    """The words in code font in a text key's allowed and meaning cells (its choices, mostly)."""
    return re.findall(r"`([^`]*)`", allowed_of(field) + " " + field.metadata["help"])


def numbers_near(field: dataclasses.Field) -> st.SearchStrategy[Any]:
    inside, outside = inside_and_outside(field)
    return st.sampled_from([*inside, *outside, 0, -1, 1e12, 1e39, 1e300, 2**63, 0.5, float("inf"), float("nan")])


@st.composite
def key_and_value(draw: st.DrawFn) -> tuple[dataclasses.Field, Any]:
    field = draw(st.sampled_from(NUMERIC + TEXT))
    if field in NUMERIC:
        value = draw(
            st.one_of(
                numbers_near(field),
                st.integers(min_value=-(2**70), max_value=2**70),
                st.floats(allow_nan=True, allow_infinity=True),
                st.booleans(),
                st.text(max_size=5),
            )
        )
    else:  # no ':' in made-up text: a dotted path would import whatever module it names
        made_up = st.text(max_size=12).filter(lambda text: ":" not in text)
        value = draw(st.one_of(st.sampled_from(text_choices(field) or [""]), made_up, st.integers()))
    return field, value


def outside_its_range(field: dataclasses.Field, value: Any) -> bool:
    """Whether ``value`` has ``field``'s type (an integral float for an int key) but lies outside its range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if field.type == "int" and not (isinstance(value, int) or value.is_integer()):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return value not in declared(field)


@hypothesis_settings(max_examples=300)
@given(key_and_value())
def test_fuzz_every_key_accepted_values_lie_in_the_range_refusals_name_the_key(drawn):
    field, value = drawn
    key = key_of(field)
    try:
        settings = Settings.from_run_config({key: value})
    except SettingsError as err:
        assert key in str(err), f"{key}={value!r} refused without naming the key: {err}"
        if field in NUMERIC and outside_its_range(field, value):
            assert_names_key_value_and_range(str(err), key, value, declared(field))
        return
    parsed = getattr(settings, field.name)
    assert type(parsed).__name__ == field.type
    if field in NUMERIC:
        assert parsed in declared(field), f"{key}={value!r} accepted outside {declared(field).interval()}"


# ------------------------------------------------------------------------- extreme values still run

TIME_BOUND_S = 60.0
"""One round of two clients takes seconds once TensorFlow is imported; what the ranges rule out took hours
(centered clipping's 1e12 iterations) or waited out every phase (min-available-clients beyond the nodes)."""
SMALL = {
    "num-partitions": 2,
    "min-train-clients": 2,
    "min-evaluate-clients": 2,
    "min-available-clients": 2,
    "partitioner": "iid",
    "local-epochs": 1,
    "num-server-rounds": 1,
    "round-timeout": 60.0,
}


def extreme(end: int, keys: tuple[str, ...]) -> dict[str, Any]:
    fields = {key_of(f): f for f in NUMERIC}
    return {key: inside_and_outside(fields[key])[0][end] for key in keys}


def highest(*keys: str) -> dict[str, Any]:
    """Each key at the largest value its declared range accepts."""
    return extreme(1, keys)


def lowest(*keys: str) -> dict[str, Any]:
    """Each key at the smallest value its declared range accepts."""
    return extreme(0, keys)


EXTREMES = {  # the largest accepted values of the keys that once hung, overflowed or crashed a run
    "server-step": {
        "strategy": "centered-clipping",
        **highest("centered-clipping-iterations", "server-learning-rate", "server-momentum", "seed"),
        **highest("client-threads", "aggregation-threads"),
    },
    "dp-noise": {
        "strategy": "dp-fedavg",
        "dp-accounting": "pld",  # the accountant with the coarser resolution of small deltas
        **highest("dp-clip-norm", "dp-noise-multiplier", "server-learning-rate", "dp-target-epsilon"),
        **lowest("dp-delta"),
    },
    "local-dp": {
        "strategy": "dp-fedavg",
        "dp-mode": "local-laplace",
        **highest("dp-clip-norm"),
        **lowest("dp-local-epsilon"),
    },
    "rates": {"strategy": "fedadam", "optimizer": "sgd", **highest("fedopt-eta", "learning-rate")},
    "synthetic-samples-per-client": {
        "dataset": "synthetic",
        "model": "logreg",
        **highest("synthetic-samples-per-client", "batch-size"),
    },
}


@pytest.fixture(scope="module")
def tensorflow_imported() -> None:
    """Import TensorFlow before the clock starts (tens of seconds on a busy machine)."""
    import tensorflow  # noqa: F401


@pytest.mark.parametrize("case", list(EXTREMES))
def test_accepted_extremes_run_one_round_to_a_finite_model(case, tensorflow_imported):
    from fl_app.simulation.local_grid import run_local_federation

    started = time.monotonic()
    arrays, history = run_local_federation({**SMALL, **EXTREMES[case]}, evaluate_centrally=False)
    seconds = time.monotonic() - started
    assert history and history[-1].round == 1, f"{case}: no round ran"
    assert history[-1].clients_replied + history[-1].clients_failed == 2
    assert all(np.isfinite(array).all() for array in arrays.to_numpy_ndarrays()), f"{case}: non-finite model"
    assert seconds < TIME_BOUND_S, f"{case}: one round took {seconds:.1f} s"
