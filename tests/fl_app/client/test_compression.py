"""Compressed uploads: client encoding with error feedback in context.state, server decoding."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fl_app.client.compression import STATE_KEY, encode_upload
from fl_app.config.settings import Settings, codec_from_settings
from fl_app.server.strategy_setup import attach_compression, make_strategy
from strategies.aggregation.guard import GuardedStrategy
from strategies.aggregation.strategy import AggregationStrategy
from strategies.compression.decoder import UpdateDecoder
from strategies.registry import build_strategy
from tests.fakes import FakeGrid, reply

RNG = np.random.default_rng(0)
GLOBAL = [RNG.normal(size=(200, 10)).astype(np.float32), RNG.normal(size=10).astype(np.float32)]
WEIGHTS = [g + RNG.normal(scale=0.1, size=g.shape).astype(np.float32) for g in GLOBAL]
UPDATE = np.concatenate([(w - g).ravel() for w, g in zip(WEIGHTS, GLOBAL)])


def context(settings):
    return Context(
        run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config=settings.to_run_config()
    )


def settings(name, **kw):
    return Settings(compression=name, strategy="robust", **kw)


@pytest.mark.parametrize(("name", "tolerance"), [("none", 0.0), ("float16", 1e-3), ("int8", 0.02)])
def test_unbiased_codecs_round_trip(name, tolerance):
    s = settings(name, compression_int8_block=64)
    record = encode_upload(s, context(s), GLOBAL, WEIGHTS, {"server-round": 3})
    decoded = UpdateDecoder(codec_from_settings(s))(record, UPDATE.size, server_round=3)
    assert np.max(np.abs(decoded - UPDATE)) <= tolerance + 1e-7


def test_top_k_sends_few_bytes_and_keeps_the_rest_in_context_state():
    s = settings("top-k", compression_topk_fraction=0.05)
    ctx = context(s)
    record = encode_upload(s, ctx, GLOBAL, WEIGHTS, {"server-round": 1})
    assert record.count_bytes() < 0.2 * UPDATE.nbytes
    decoder = UpdateDecoder(codec_from_settings(s))
    sent = decoder(record, UPDATE.size, server_round=1)
    residual = ctx.state.array_records[STATE_KEY].to_numpy_ndarrays()[0]
    np.testing.assert_allclose(sent + residual, UPDATE, atol=1e-6)  # nothing lost, only delayed
    second = decoder(encode_upload(s, ctx, GLOBAL, WEIGHTS, {"server-round": 2}), UPDATE.size, server_round=2)
    total = ctx.state.array_records[STATE_KEY].to_numpy_ndarrays()[0] + sent + second
    np.testing.assert_allclose(total, 2 * UPDATE, atol=1e-5)


def test_error_feedback_can_be_switched_off():
    s = settings("top-k", compression_error_feedback=False)
    ctx = context(s)
    encode_upload(s, ctx, GLOBAL, WEIGHTS, {"server-round": 1})
    assert STATE_KEY not in ctx.state.array_records


def test_random_mask_decodes_with_the_round_seed():
    s = settings("random-mask", compression_mask_fraction=0.5, compression_mask_rescale=False)
    record = encode_upload(s, context(s), GLOBAL, WEIGHTS, {"server-round": 4})
    decoder = UpdateDecoder(codec_from_settings(s))
    decoded = decoder(record, UPDATE.size, server_round=4)
    kept = decoded != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(decoded[kept], UPDATE[kept])
    with pytest.raises(ValueError, match="must have shape"):  # another round, another mask
        decoder(record, UPDATE.size, server_round=5)


def test_the_strategy_decodes_each_round_with_its_own_number():
    """AggregationStrategy passes the round to the decoder: a random-mask upload of round r is
    rebuilt with round r's mask, with no state set from outside between rounds."""
    s = settings(
        "random-mask",
        compression_mask_fraction=0.5,
        compression_mask_rescale=False,
        min_train_clients=1,
        min_available_clients=1,
    )
    strategy = make_strategy(s)
    inner = strategy.inner
    assert isinstance(inner, AggregationStrategy) and isinstance(inner.collector.decoder, UpdateDecoder)
    assert strategy.aggregate_train.__func__ is GuardedStrategy.aggregate_train  # nothing patched
    assert "aggregate_train" not in vars(inner)  # the strategy's own method, not a closure set on it
    for server_round in (4, 5):
        record = encode_upload(s, context(s), GLOBAL, WEIGHTS, {"server-round": server_round})
        list(strategy.configure_train(server_round, ArrayRecord(GLOBAL), ConfigRecord({}), FakeGrid([7], lambda m: m)))
        new, metrics = strategy.aggregate_train(server_round, [reply(7, record)])
        assert metrics["accepted-replies"] == 1 and strategy.rejections() == []
        new_flat = np.concatenate([a.ravel() for a in new.to_numpy_ndarrays()])
        expected = UpdateDecoder(codec_from_settings(s))(record, UPDATE.size, server_round=server_round)
        np.testing.assert_allclose(new_flat - np.concatenate([g.ravel() for g in GLOBAL]), expected, atol=1e-6)


def test_only_our_aggregation_strategies_can_decode():
    s = Settings(compression="top-k", strategy="robust")
    strategy = build_strategy("robust", s.strategy_params())
    decoder = attach_compression(s, strategy)
    assert strategy.collector.decoder is decoder
    flower = build_strategy("fedavg", Settings().strategy_params())
    with pytest.raises(ValueError, match="needs one of our aggregation strategies"):
        attach_compression(s, flower)
    assert attach_compression(Settings(), flower) is None


def test_compressed_federation_uploads_fewer_bytes_and_learns():
    from fl_app.simulation.local_grid import run_local_federation

    base = {
        "num-partitions": 3,
        "partitioner": "iid",
        "local-epochs": 1,
        "num-server-rounds": 2,
        "min-train-clients": 3,
        "min-evaluate-clients": 3,
        "min-available-clients": 3,
        "strategy": "robust",
        "client-weighting": "num-examples",
    }
    _, plain = run_local_federation(base)
    _, sparse = run_local_federation({**base, "compression": "top-k", "compression-topk-fraction": 0.05})
    assert plain[1].bytes_received > 8 * sparse[1].bytes_received > 0
    assert sparse[1].bytes_sent == plain[1].bytes_sent  # the downlink carries full weights
    assert sparse[2].clients_replied == 3 and not sparse[2].failures
    assert sparse[2].centralized_accuracy > sparse[0].centralized_accuracy + 0.1
