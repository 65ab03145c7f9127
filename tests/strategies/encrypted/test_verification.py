"""Verified commits: a key holder checks each round's encrypted sum before it joins the chain, and
group testing drops the contributions that break it while the others are kept."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_app.client.encryption import answer_verification
from fl_app.config.settings import Settings
from strategies.encrypted import strategy as protocol
from strategies.encrypted import verification
from strategies.encrypted.keys import load_client_scheme, load_server_scheme
from strategies.encrypted.strategy import EncryptedFedAvg, ciphertexts_to_record, reconstruct
from tests.fakes import FakeGrid
from tests.strategies.encrypted.test_encrypted import SHAPES, SIZE, flat, he_config

CLIP = 1.0


# ------------------------------------------------------------------------------ pure pieces


def test_a_sum_is_valid_only_when_finite_and_within_the_clipped_norm():
    s = np.full(4, 0.5)  # norm 1
    assert verification.sum_is_valid(s, 1.0, CLIP)
    assert verification.sum_is_valid(s * 3, 3.0, CLIP)  # three clipped updates
    assert not verification.sum_is_valid(s * 3.1, 3.0, CLIP)
    assert verification.sum_is_valid(s * 1e6, 1.0, 0.0)  # no clip norm: finiteness only
    assert not verification.sum_is_valid(np.array([np.nan, 0.0]), 1.0, 0.0)
    assert not verification.sum_is_valid(s, 0.0, CLIP) and not verification.sum_is_valid(s, float("nan"), CLIP)


def _oracle(bad: set[int], asked: list[list[int]]):
    def verify(groups):
        asked.extend(list(g) for g in groups)
        return [not (set(g) & bad) for g in groups]

    return verify


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 64),
    bad_fraction=st.floats(0, 0.5),
    min_summands=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_group_testing_drops_every_culprit_and_keeps_the_groups_it_can(count, bad_fraction, min_summands, seed):
    rng = np.random.default_rng(seed)
    bad = {int(i) for i in rng.choice(count, size=int(count * bad_fraction), replace=False)}
    asked: list[list[int]] = []
    valid, dropped = verification.isolate_invalid(count, _oracle(bad, asked), min_summands)
    kept = sorted(i for g in valid for i in g)
    assert sorted(kept + dropped) == list(range(count))  # a partition
    assert bad <= set(dropped) and not set(kept) & bad  # every culprit dropped, none kept
    assert len(dropped) <= len(bad) * (2 * min_summands - 1)  # the honest lost with them
    assert all(len(g) >= min_summands for g in asked[1:])  # the first query is the round's whole sum
    if not bad:
        assert asked == [list(range(count))] and dropped == []  # an honest round costs one sum


def test_exact_identification_with_one_and_the_round_trip_count():
    trips = []

    def verify(groups):
        trips.append(len(groups))
        return [5 not in g for g in groups]

    _, dropped = verification.isolate_invalid(16, verify, 1)
    assert dropped == [5] and len(trips) == 1 + 4  # 1 + log2(16 / 1) round trips
    assert sum(trips) == 1 + 2 * 4  # 1 + 2 log2(K / m) sums decrypted
    with pytest.raises(ValueError, match="he-verify-min-summands must be >= 1"):
        verification.isolate_invalid(4, verify, 0)
    with pytest.raises(ValueError, match="verdicts"):
        verification.isolate_invalid(4, lambda groups: [True, True], 1)


# ------------------------------------------------------------------------------ the strategy with real keys


def _key_holder(keys, scheme_name):
    """A FakeGrid whose nodes answer verification queries as the ClientApp does (secret key)."""
    settings_ = Settings.from_run_config(he_config(keys, scheme_name))
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    asked: list[Message] = []

    def answer(message: Message) -> Message:
        asked.append(message)
        return answer_verification(settings_, context, message)

    return answer, asked


def _reply(message: Message, scheme, update: np.ndarray, num_examples: float, ciphertexts=None) -> Message:
    if ciphertexts is None:
        ciphertexts = scheme.encrypt(np.floor(num_examples) * update.astype(np.float64))
    metrics = MetricRecord({"num-examples": num_examples, protocol.MET_BASE: 0})
    return Message(RecordDict({"arrays": ciphertexts_to_record(ciphertexts), "metrics": metrics}), reply_to=message)


@pytest.mark.parametrize("scheme_name", ["ckks", "paillier"])
def test_a_poisoned_contribution_is_dropped_and_the_round_keeps_the_others(keys, scheme_name):
    secret, public = keys[scheme_name]
    client = load_client_scheme(secret.read_bytes())
    nodes = list(range(1, 9))
    answer, asked = _key_holder(keys, scheme_name)
    strategy = EncryptedFedAvg(
        load_server_scheme(public.read_bytes()),
        clip_norm=CLIP,
        verify_min_summands=1,
        min_available_nodes=8,
        min_train_nodes=8,
    )
    rng = np.random.default_rng(3)
    initial = ArrayRecord([rng.standard_normal(s).astype(np.float32) for s in SHAPES])
    messages = list(strategy.configure_train(1, initial, ConfigRecord({}), FakeGrid(nodes, answer)))
    updates = []
    for _ in messages:
        u = rng.standard_normal(SIZE)
        updates.append(u / np.linalg.norm(u) * 0.9)  # clipped honest updates
    replies = [_reply(m, client, updates[i], 10) for i, m in enumerate(messages)]
    if scheme_name == "ckks":  # a client that skips clipping and scales its update
        replies[5] = _reply(messages[5], client, updates[5] * 1e4, 10)
    else:  # no key needed: c^k mod n^2 encrypts k m, and the packed slots overflow into each other
        nsquare = client._nsquare
        honest = client.encrypt(10 * updates[5])
        scaled = [pow(int.from_bytes(c, "big"), 5000, nsquare).to_bytes(len(c), "big") for c in honest]
        replies[5] = _reply(messages[5], client, updates[5], 10, ciphertexts=scaled)
    _, metrics = strategy.aggregate_train(1, replies)

    bad_node = messages[5].metadata.dst_node_id
    assert metrics["accepted-replies"] == 7 and metrics["rejected-replies"] == 1
    assert strategy.rejections() == [
        f"node {bad_node}: rejected: its encrypted update made the decrypted sum invalid (a key holder checked "
        "the sums of groups of at least 1 updates before the round was committed)"
    ]
    assert strategy.version == 1 and strategy.deltas[0].summands == 7 and strategy.deltas[0].total_weight == 70
    honest = np.mean([u for i, u in enumerate(updates) if i != 5], axis=0)
    new_global = reconstruct(client, flat(initial.to_numpy_ndarrays()), strategy.deltas)
    assert np.allclose(new_global, flat(initial.to_numpy_ndarrays()) + honest, atol=1e-5)
    assert len(asked) == 1 + 3  # the whole sum, then 3 halvings down to the culprit (8 -> 1)
    # the key holders answered bits only; no plaintext left them
    assert all(m.metadata.message_type == "query" for m in asked)


def test_an_honest_round_costs_one_verification_and_commits_everything(keys):
    secret, public = keys["ckks"]
    client = load_client_scheme(secret.read_bytes())
    answer, asked = _key_holder(keys, "ckks")
    strategy = EncryptedFedAvg(
        load_server_scheme(public.read_bytes()), clip_norm=CLIP, verify_min_summands=2, min_available_nodes=4
    )
    initial = ArrayRecord([np.zeros(s, np.float32) for s in SHAPES])
    messages = list(strategy.configure_train(1, initial, ConfigRecord({}), FakeGrid([1, 2, 3, 4], answer)))
    update = np.full(SIZE, 0.5 / np.sqrt(SIZE))
    _, metrics = strategy.aggregate_train(1, [_reply(m, client, update, 3) for m in messages])
    assert metrics["accepted-replies"] == 4 and strategy.version == 1 and len(asked) == 1
    assert asked[0].content["config"][verification.CFG_SUMMANDS] == [4]


def test_bad_example_counts_are_rejected_and_no_verdict_leaves_the_round_uncommitted(keys):
    secret, public = keys["ckks"]
    client = load_client_scheme(secret.read_bytes())
    nobody = FakeGrid([1, 2, 3, 4, 5], lambda m: Message(RecordDict({}), reply_to=m))  # no verdicts
    strategy = EncryptedFedAvg(
        load_server_scheme(public.read_bytes()), verify_min_summands=2, max_examples=1000, min_available_nodes=5
    )
    initial = ArrayRecord([np.zeros(s, np.float32) for s in SHAPES])
    messages = list(strategy.configure_train(1, initial, ConfigRecord({}), nobody))
    update = np.full(SIZE, 0.01)
    counts = [0.5, 1e12, 1001, 7, 7]
    _, metrics = strategy.aggregate_train(1, [_reply(m, client, update, n) for m, n in zip(messages, counts)])
    lines = strategy.rejections()
    assert len(lines) == 3, lines
    assert "whole count of examples" in lines[0]  # 0.5: the screen every strategy runs
    assert all("he-max-examples=1000" in x or "whole count" in x for x in lines)
    assert sum("he-max-examples=1000" in x for x in lines) >= 1  # 1001: above this run's cap
    assert metrics["round-skipped"] == 1 and strategy.version == 0  # unverified: not committed


def test_a_federation_verifies_every_round_through_the_client_app(keys):
    """The real ClientApp answers the key holder's query (LocalGrid): every round verified once."""
    from tests.strategies.encrypted.test_encrypted import BASE, run_encrypted

    config = {**BASE, **he_config(keys, "ckks", **{"he-clip-norm": 5.0, "he-max-examples": 50})}
    strategy, _, history, _ = run_encrypted(config, num_rounds=2)
    assert strategy.verify_min_summands == 2  # the run config's default
    assert all(r.clients_replied == 4 and not r.failures for r in history)
    assert strategy.version == 2 and all(d.total_weight == 4 * 50 for d in strategy.deltas)  # capped weights
