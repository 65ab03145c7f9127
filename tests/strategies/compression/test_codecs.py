"""Tests of the update compression codecs (strategies/compression/codecs.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from strategies.compression.codecs import (
    CODECS,
    Codec,
    ErrorFeedback,
    Float16Codec,
    IdentityCodec,
    Int8Codec,
    RandomMaskCodec,
    TopKCodec,
    make_codec,
    payload_from_array_record,
    payload_nbytes,
    payload_to_array_record,
    serialized_nbytes,
)

SEEDS = st.integers(0, 2**64 - 1)
FAST = settings(max_examples=40, deadline=None)


def finite_float32(max_size: int = 300, bound: float = 1e6) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(
        np.float32,
        st.integers(1, max_size),
        elements=st.floats(-bound, bound, allow_nan=False, width=32),
    )


def gaussian(size: int, seed: int = 0, scale: float = 0.01) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(size) * scale).astype(np.float32)


def all_codecs() -> list[Codec]:
    return [
        IdentityCodec(),
        Float16Codec(),
        Int8Codec(block=16),
        TopKCodec(0.1),
        RandomMaskCodec(0.3),
        RandomMaskCodec(0.3, rescale=False),
    ]


# ------------------------------------------------------------------------- round trips


@FAST
@given(update=finite_float32(), round_seed=SEEDS, client_seed=SEEDS)
def test_identity_round_trip_is_exact(update, round_seed, client_seed):
    codec = IdentityCodec()
    payload = codec.encode(update, round_seed=round_seed, client_seed=client_seed)
    decoded = codec.decode(payload, update.size, round_seed=round_seed)
    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, update)


@FAST
@given(update=finite_float32(bound=65504.0))
def test_float16_error_is_within_half_precision(update):
    codec = Float16Codec()
    payload = codec.encode(update, round_seed=0, client_seed=0)
    assert payload["values"].dtype == np.float16
    decoded = codec.decode(payload, update.size, round_seed=0)
    # unit roundoff 2**-11 for normal float16 values, half the subnormal spacing below.
    bound = np.maximum(np.abs(update) * 2.0**-11, 2.0**-25)
    assert (np.abs(decoded - update) <= bound).all()


def test_float16_clips_beyond_its_range_instead_of_overflowing():
    update = np.array([1e6, -7e4, 1.0], dtype=np.float32)
    codec = Float16Codec()
    decoded = codec.decode(codec.encode(update, round_seed=0, client_seed=0), 3, round_seed=0)
    np.testing.assert_array_equal(decoded, [65504.0, -65504.0, 1.0])


@FAST
@given(
    update=finite_float32(max_size=500),
    block=st.integers(1, 600),
    round_seed=SEEDS,
    client_seed=SEEDS,
)
# a subnormal block maximum: max/127 underflows to 0 in float32 (found by Hypothesis)
@example(update=np.array([6.7e-44], np.float32), block=1, round_seed=0, client_seed=0)
def test_int8_error_per_value_is_below_its_block_scale(update, block, round_seed, client_seed):
    codec = Int8Codec(block=block)
    payload = codec.encode(update, round_seed=round_seed, client_seed=client_seed)
    assert payload["q"].dtype == np.int8 and payload["scales"].dtype == np.float32
    assert payload["scales"].shape == (-(-update.size // block),)
    assert np.abs(payload["q"].astype(int)).max() <= 127
    decoded = codec.decode(payload, update.size, round_seed=round_seed)
    scale_per_value = np.repeat(payload["scales"], block)[: update.size]
    assert (np.abs(decoded - update) <= scale_per_value * (1 + 1e-6)).all()


def test_int8_stochastic_rounding_is_unbiased():
    # Values sit 0.3 of a step above a level: rounding to nearest would be off by 0.3 step.
    steps = np.array([127.0, -127.0, 10.3, -10.3, 0.3, 50.3, -99.7, 0.0], dtype=np.float32)
    update = steps * np.float32(0.01)
    scale = 0.01
    codec = Int8Codec(block=update.size)
    trials = 3000
    mean = np.mean(
        [codec.decode(codec.encode(update, round_seed=7, client_seed=c), 8, round_seed=7) for c in range(trials)],
        axis=0,
    )
    # Each value's rounding variance is at most scale**2 / 4: allow 5 standard errors.
    tolerance = 5 * scale / (2 * np.sqrt(trials))
    assert tolerance < 0.3 * scale / 4
    np.testing.assert_allclose(mean, update, rtol=0, atol=tolerance)


def test_int8_randomness_depends_on_round_and_client_seed_only():
    update = gaussian(1000)
    codec = Int8Codec()

    def levels(round_seed: int, client_seed: int) -> np.ndarray:
        return codec.encode(update, round_seed=round_seed, client_seed=client_seed)["q"]

    np.testing.assert_array_equal(levels(1, 2), levels(1, 2))
    assert (levels(1, 2) != levels(1, 3)).any()
    assert (levels(1, 2) != levels(2, 2)).any()


# ------------------------------------------------------------------------------- top-k


@st.composite
def distinct_magnitudes(draw) -> np.ndarray:
    size = draw(st.integers(1, 400))
    order = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(size)
    signs = np.where(draw(hnp.arrays(np.bool_, size)), -1.0, 1.0)
    return ((order + 1) * signs * 0.001).astype(np.float32)


@FAST
@given(update=distinct_magnitudes(), fraction=st.floats(0.001, 1.0))
def test_topk_keeps_exactly_the_largest_magnitudes(update, fraction):
    codec = TopKCodec(fraction)
    payload = codec.encode(update, round_seed=0, client_seed=0)
    kept = max(1, min(update.size, round(fraction * update.size)))
    reference = np.sort(np.argsort(-np.abs(update), kind="stable")[:kept])
    assert payload["indices"].dtype == np.int32
    np.testing.assert_array_equal(payload["indices"], reference)
    np.testing.assert_array_equal(payload["values"], update[reference])
    decoded = codec.decode(payload, update.size, round_seed=0)
    expected = np.zeros_like(update)
    expected[reference] = update[reference]
    np.testing.assert_array_equal(decoded, expected)


@FAST
@given(
    updates=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 12), st.integers(1, 200)),
        elements=st.floats(-10, 10, allow_nan=False, width=32),
    ),
    fraction=st.floats(0.01, 0.5),
)
def test_error_feedback_loses_nothing(updates, fraction):
    """sum_t sent_t + e_T == sum_t u_t: the defining property of error feedback."""
    codec = TopKCodec(fraction)
    feedback = ErrorFeedback(codec)
    sent = np.zeros(updates.shape[1], dtype=np.float64)
    for t, update in enumerate(updates):
        payload = feedback.encode(update, round_seed=t, client_seed=1)
        sent += codec.decode(payload, update.size, round_seed=t)
    total = sent + feedback.residual
    # Each round adds u_t + e_t in float32, so the identity holds up to float32 rounding.
    tolerance = 1e-6 * updates.shape[0] * (np.abs(updates).sum(axis=0) + 1)
    assert (np.abs(total - updates.astype(np.float64).sum(axis=0)) <= tolerance).all()


def test_error_feedback_sends_what_top_k_dropped_earlier():
    codec = TopKCodec(0.5)
    feedback = ErrorFeedback(codec)
    first = feedback.encode(np.array([4.0, 3.0, 2.0, 1.0]), round_seed=0, client_seed=0)
    np.testing.assert_array_equal(first["indices"], [0, 1])
    np.testing.assert_array_equal(feedback.residual, [0.0, 0.0, 2.0, 1.0])
    second = feedback.encode(np.array([0.0, 0.0, 0.0, 0.0]), round_seed=1, client_seed=0)
    np.testing.assert_array_equal(second["indices"], [2, 3])
    np.testing.assert_array_equal(second["values"], [2.0, 1.0])
    np.testing.assert_array_equal(feedback.residual, np.zeros(4))


def test_error_feedback_state_round_trip_continues_identically():
    codec = TopKCodec(0.1)
    original = ErrorFeedback(codec)
    assert original.state_dict() == {}
    original.encode(gaussian(500, seed=1), round_seed=0, client_seed=5)
    restored = ErrorFeedback(codec)
    restored.load_state_dict(original.state_dict())
    update = gaussian(500, seed=2)
    a = original.encode(update, round_seed=1, client_seed=5)
    b = restored.encode(update, round_seed=1, client_seed=5)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(original.residual, restored.residual)
    restored.load_state_dict({})
    assert restored.residual is None


def test_error_feedback_rejects_unbiased_codecs_and_resized_updates():
    with pytest.raises(ValueError, match="unbiased"):
        ErrorFeedback(RandomMaskCodec(0.1, rescale=True))
    ErrorFeedback(RandomMaskCodec(0.1, rescale=False))
    feedback = ErrorFeedback(TopKCodec(0.1))
    feedback.encode(gaussian(100), round_seed=0, client_seed=0)
    with pytest.raises(ValueError, match="residual has 100"):
        feedback.encode(gaussian(101), round_seed=1, client_seed=0)
    with pytest.raises(ValueError, match="unexpected keys"):
        feedback.load_state_dict({"residue": np.zeros(3, np.float32)})


# ------------------------------------------------------------------------- random mask


def test_random_mask_server_rebuilds_the_mask_from_the_seed_alone():
    size, fraction = 20_000, 0.05
    update = gaussian(size)
    client = RandomMaskCodec(fraction)
    payload = client.encode(update, round_seed=11, client_seed=2**64 - 1)
    assert set(payload) == {"seed", "values"}  # no indices travel
    assert payload["seed"].dtype == np.uint64 and payload["seed"].shape == (1,)
    assert abs(payload["values"].size - fraction * size) < 5 * np.sqrt(fraction * size)

    server = RandomMaskCodec(fraction)  # a separate instance: nothing shared but the config
    decoded = server.decode(payload, size, round_seed=11)
    kept = decoded != 0
    assert kept.sum() == payload["values"].size
    np.testing.assert_allclose(decoded[kept], payload["values"] / fraction, rtol=1e-6)
    np.testing.assert_allclose(decoded[kept] * fraction, update[kept], rtol=1e-6)
    assert (update[~kept] != 0).all()  # every zero in the decode is a dropped coordinate


def test_random_mask_wire_format_is_pinned():
    """The mask must not change between releases: clients and servers may differ."""
    codec = RandomMaskCodec(0.25)
    mask = codec.mask(32, round_seed=1, client_seed=2)
    np.testing.assert_array_equal(np.flatnonzero(mask), [3, 4, 7, 12, 15, 19, 25, 26, 27, 28, 30])
    assert (codec.mask(32, round_seed=1, client_seed=3) != mask).any()
    assert (codec.mask(32, round_seed=2, client_seed=2) != mask).any()


def test_random_mask_decode_is_unbiased_with_rescale_and_shrunk_without():
    update = np.linspace(-1.0, 1.0, 16, dtype=np.float32)
    fraction, trials = 0.25, 4000
    rescaled, masked = RandomMaskCodec(fraction), RandomMaskCodec(fraction, rescale=False)

    def mean_decode(codec: RandomMaskCodec) -> np.ndarray:
        return np.mean(
            [codec.decode(codec.encode(update, round_seed=3, client_seed=c), 16, round_seed=3) for c in range(trials)],
            axis=0,
        )

    # Variance per coordinate (1/p - 1) u**2; allow 5 standard errors.
    tolerance = 5 * np.sqrt((1 / fraction - 1) / trials) * np.abs(update) + 1e-6
    assert (np.abs(mean_decode(rescaled) - update) <= tolerance).all()
    assert (np.abs(mean_decode(masked) - fraction * update) <= fraction * tolerance).all()


# ------------------------------------------------------------------------------- bytes


def test_top_k_one_percent_sends_ten_times_fewer_bytes_than_identity():
    update = gaussian(100_000)
    dense = IdentityCodec().encode(update, round_seed=0, client_seed=0)
    sparse = TopKCodec(0.01).encode(update, round_seed=0, client_seed=0)
    assert payload_nbytes(dense) == 4 * 100_000
    assert payload_nbytes(sparse) == 8 * 1_000
    assert payload_nbytes(dense) >= 10 * payload_nbytes(sparse)
    assert serialized_nbytes(dense) >= 10 * serialized_nbytes(sparse)
    record = payload_to_array_record(sparse)
    assert isinstance(record, ArrayRecord)
    assert record.count_bytes() == serialized_nbytes(sparse) > payload_nbytes(sparse)


@pytest.mark.parametrize("codec", all_codecs(), ids=repr)
def test_every_codec_survives_an_array_record_round_trip(codec):
    update = gaussian(3000, seed=4)
    payload = codec.encode(update, round_seed=9, client_seed=12)
    received = payload_from_array_record(payload_to_array_record(payload))
    assert set(received) == codec.payload_keys
    np.testing.assert_array_equal(codec.decode(received, 3000, round_seed=9), codec.decode(payload, 3000, round_seed=9))


def test_array_record_with_a_forged_header_is_rejected_before_allocation():
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (4 * 10**12,)}  # 16 TB
    np.lib.format.write_array_header_1_0(buffer, header)
    forged = buffer.getvalue() + np.zeros(4, dtype=np.float32).tobytes()
    record = ArrayRecord(array_dict={"values": Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=forged)})
    with pytest.raises(ValueError, match="declares shape"):
        payload_from_array_record(record)
    record = ArrayRecord(array_dict={"values": Array(dtype="float32", shape=(4,), stype="torch", data=b"")})
    with pytest.raises(ValueError, match="serialisation type"):
        payload_from_array_record(record)


@settings(max_examples=60, deadline=None)
@given(tail=st.binary(max_size=200))
def test_array_record_with_garbage_bytes_raises_value_error_only(tail):
    for data in (tail, b"\x93NUMPY\x01\x00" + tail):
        record = ArrayRecord(
            array_dict={"values": Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=data)}
        )
        try:
            payload = payload_from_array_record(record)
        except ValueError:
            continue
        assert all(isinstance(array, np.ndarray) for array in payload.values())


# ---------------------------------------------------------------------------- registry


def test_make_codec_builds_every_registered_codec_with_its_parameters():
    assert set(CODECS) == {"none", "float16", "int8", "top-k", "random-mask"}
    every = {"topk_fraction": 0.02, "mask_fraction": 0.3, "mask_rescale": False, "int8_block": 64}
    for name in CODECS:
        assert make_codec(name, **every).name == name
    assert make_codec("top-k", **every).fraction == 0.02
    assert make_codec("int8", **every).block == 64
    mask = make_codec("random-mask", **every)
    assert (mask.fraction, mask.rescale, mask.biased) == (0.3, False, True)
    assert make_codec("top-k").fraction == 0.01


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("zip", {}, r"compression must be one of \['float16', 'int8', 'none', .*got 'zip'"),
        (None, {}, "compression must be one of"),
        ("top-k", {"topk_fraction": 0.0}, r"compression-topk-fraction must be in \(0, 1\], got 0"),
        ("top-k", {"topk_fraction": 1.5}, "compression-topk-fraction must be in"),
        ("top-k", {"topk_fraction": float("nan")}, "compression-topk-fraction must be in"),
        ("top-k", {"topk_fraction": "0.1"}, "compression-topk-fraction must be a number"),
        ("top-k", {"topk_fraction": True}, "compression-topk-fraction must be a number"),
        ("random-mask", {"mask_fraction": -0.1}, "compression-mask-fraction must be in"),
        ("random-mask", {"mask_rescale": "yes"}, "compression-mask-rescale must be true or false"),
        ("int8", {"int8_block": 0}, "compression-int8-block must be a positive integer, got 0"),
        ("int8", {"int8_block": 2.5}, "compression-int8-block must be a positive integer"),
        ("none", {"topk_fraction_": 0.1}, r"unknown compression parameter\(s\) \['topk_fr"),
    ],
)
def test_bad_names_and_parameters_raise_value_error_naming_the_key(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_codec(name, **params)


@pytest.mark.parametrize(
    ("update", "seeds", "message"),
    [
        (np.array([1.0, np.nan], np.float32), (0, 0), "NaN or Inf"),
        (np.array([1e39]), (0, 0), "NaN or Inf"),
        (np.zeros((2, 2), np.float32), (0, 0), "flat vector"),
        (np.zeros(0, np.float32), (0, 0), "non-empty"),
        (np.arange(3), (0, 0), "floating point"),
        (np.zeros(3, np.float32), (-1, 0), "round_seed must be in"),
        (np.zeros(3, np.float32), (0, 2**64), "client_seed must be in"),
        (np.zeros(3, np.float32), (0, 1.5), "client_seed must be an integer"),
    ],
)
def test_encode_rejects_bad_updates_and_seeds(update, seeds, message):
    with pytest.raises(ValueError, match=message):
        TopKCodec(0.5).encode(update, round_seed=seeds[0], client_seed=seeds[1])


# --------------------------------------------------------------------- malformed payloads

SIZE = 200


def valid_payload(codec: Codec) -> dict[str, np.ndarray]:
    return codec.encode(gaussian(SIZE, seed=8), round_seed=5, client_seed=6)


@pytest.mark.parametrize("codec", all_codecs(), ids=repr)
def test_decode_rejects_generic_malformations(codec):
    def rejects(payload, message, size=SIZE):
        with pytest.raises(ValueError, match=message):
            codec.decode(payload, size, round_seed=5)

    good = valid_payload(codec)
    key = "values" if "values" in good else "q"
    rejects({k: v for k, v in good.items() if k != key}, rf"missing \['{key}'\]")
    rejects({**good, "extra": np.zeros(1)}, r"unexpected \['extra'\]")
    rejects([good[key]], "payload must be a mapping")
    rejects({**good, key: good[key].tolist()}, rf"payload\['{key}'\] must be a numpy array")
    rejects({**good, key: good[key].astype(np.float64)}, rf"payload\['{key}'\] must have dtype")
    rejects({**good, key: good[key][:-1]}, rf"payload\['{key}'\] must have shape")
    rejects({**good, key: good[key][None, :]}, rf"payload\['{key}'\] must have shape")
    rejects(good, "size must be a positive integer", size=0)
    if key == "values":
        poisoned = good["values"].copy()
        poisoned[0] = np.inf
        rejects({**good, "values": poisoned}, r"payload\['values'\] contains NaN or Inf")
    # A payload for another size is refused, never padded or truncated.
    with pytest.raises(ValueError, match="must have shape"):
        codec.decode(good, SIZE + 50, round_seed=5)


def test_decode_accepts_a_big_endian_sender():
    codec = IdentityCodec()
    update = gaussian(10)
    decoded = codec.decode({"values": update.astype(">f4")}, 10, round_seed=0)
    assert decoded.dtype == np.dtype("float32")
    np.testing.assert_array_equal(decoded, update)


def test_top_k_decode_rejects_bad_indices():
    codec = TopKCodec(0.1)
    good = valid_payload(codec)
    cases = {
        "out of range": (np.r_[good["indices"][:-1], SIZE], r"must lie in \[0, 200\)"),
        "negative": (np.r_[-1, good["indices"][1:]], r"must lie in \[0, 200\)"),
        "duplicate": (np.r_[good["indices"][:-1], good["indices"][-2]], "strictly increasing"),
        "unsorted": (good["indices"][::-1], "strictly increasing"),
    }
    for indices, message in cases.values():
        with pytest.raises(ValueError, match=message):
            codec.decode({**good, "indices": indices.astype(np.int32)}, SIZE, round_seed=5)
    with pytest.raises(ValueError, match="must have dtype int32"):
        codec.decode({**good, "indices": good["indices"].astype(np.int64)}, SIZE, round_seed=5)


def test_int8_decode_rejects_bad_scales_and_levels():
    codec = Int8Codec(block=16)
    good = valid_payload(codec)
    for scales, message in [
        (np.full_like(good["scales"], -1.0), r"payload\['scales'\] must lie in \[0"),
        (np.full_like(good["scales"], 1e37), r"payload\['scales'\] must lie in \[0"),
        (np.full_like(good["scales"], np.nan), r"payload\['scales'\] contains NaN"),
    ]:
        with pytest.raises(ValueError, match=message):
            codec.decode({**good, "scales": scales}, SIZE, round_seed=5)
    levels = good["q"].copy()
    levels[3] = -128
    with pytest.raises(ValueError, match=r"payload\['q'\] must lie in \[-127, 127\]"):
        codec.decode({**good, "q": levels}, SIZE, round_seed=5)


def test_random_mask_decode_rejects_a_wrong_seed_or_an_overflowing_value():
    codec = RandomMaskCodec(0.3)
    good = valid_payload(codec)
    with pytest.raises(ValueError, match=r"payload\['seed'\] must have shape \(1,\)"):
        codec.decode({**good, "seed": np.array([6, 7], np.uint64)}, SIZE, round_seed=5)
    with pytest.raises(ValueError, match=r"payload\['seed'\] must have dtype uint64"):
        codec.decode({**good, "seed": np.array([6], np.int64)}, SIZE, round_seed=5)
    # Another seed gives another mask: its size no longer matches the values sent.
    other_seed = next(
        s for s in range(7, 100) if codec.mask(SIZE, round_seed=5, client_seed=s).sum() != good["values"].size
    )
    with pytest.raises(ValueError, match=r"payload\['values'\] must have shape"):
        codec.decode({**good, "seed": np.array([other_seed], np.uint64)}, SIZE, round_seed=5)
    huge = np.full_like(good["values"], 3e38)
    with pytest.raises(ValueError, match="decodes to NaN or Inf"):
        codec.decode({**good, "values": huge}, SIZE, round_seed=5)
