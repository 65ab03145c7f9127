"""Encrypted aggregation: the server adds ciphertexts only; clients decrypt the weighted mean."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_app.config.settings import Settings, SettingsError
from strategies.aggregation.guard import GuardedStrategy
from strategies.core.clipping import clip_rows
from strategies.encrypted import strategy as protocol
from strategies.encrypted.keys import load_client_scheme, load_server_scheme
from strategies.encrypted.strategy import (
    EncryptedFedAvg,
    EncryptionConfigError,
    apply_delta,
    build_encrypted_strategy,
    ciphertexts_to_record,
    reconstruct,
    record_to_ciphertexts,
)
from tests.fakes import FakeGrid

SHAPES = [(30, 10), (10,)]
SIZE = 310


def he_config(keys, scheme: str, **overrides) -> dict:
    secret, public = keys[scheme]
    config = {
        "homomorphic-encryption": scheme,
        "he-public-key-path": str(public),
        "he-secret-key-path": str(secret),
    }
    if scheme == "paillier":
        config["he-paillier-key-bits"] = 2048
    config.update(overrides)
    return config


def encrypted_strategy(config: dict) -> EncryptedFedAvg:
    """``build_encrypted_strategy`` from the typed parameters of ``config``."""
    settings = Settings.parse(config)
    return build_encrypted_strategy(
        settings.encryption_params(),
        strategy=settings.strategy,
        aggregation=settings.aggregation_params(),
        proximal_mu=settings.proximal_mu,
    )


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays])


# ------------------------------------------------------------------------------ pure pieces


def test_protocol_pieces():
    g = np.array([1.0, 2.0], np.float32)
    assert np.array_equal(apply_delta(g, np.array([3.0, -6.0], np.float32), 3.0), [2.0, 0.0])
    with pytest.raises(ValueError, match="total weight"):
        apply_delta(g, g, 0.0)
    u = np.array([[3.0, 4.0]], np.float32)
    assert np.allclose(clip_rows(u, 1.0), [5.0]) and np.allclose(u, [[0.6, 0.8]])
    assert protocol.client_weight(7, "num-examples") == 7.0 and protocol.client_weight(7, "uniform") == 1.0
    blobs = [b"\x00\x01\x02", b"xyz"]
    assert record_to_ciphertexts(ciphertexts_to_record(blobs)) == blobs
    with pytest.raises(ValueError, match="named"):
        record_to_ciphertexts(ArrayRecord({"ct-00001": ciphertexts_to_record(blobs)["ct-00000"]}))


def test_client_upload_is_clipped_only_with_a_clip_norm(keys):
    from fl_app.client.encryption import encrypted_upload

    settings = Settings.from_run_config(he_config(keys, "ckks"))
    client = load_client_scheme(keys["ckks"][0].read_bytes())
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    g = [np.full(s, 0.5, np.float32) for s in SHAPES]
    w = [a + np.float32(0.1) for a in g]
    norm = float(np.linalg.norm(flat(w) - flat(g)))  # about 0.1 sqrt(310) = 1.76
    for clip, expected in ((1.0, 1.0), (0.0, norm)):  # he-clip-norm = 0: off, the update as it is
        config = {"num-examples": 3, protocol.CFG_CLIP: clip, protocol.CFG_WEIGHTING: "uniform"}
        decrypted = client.decrypt_sum(
            record_to_ciphertexts(encrypted_upload(settings, context, g, w, config)), SIZE, 1
        )
        assert np.linalg.norm(decrypted) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ the strategy


def encrypted_reply(
    message: Message, scheme, update: np.ndarray, num_examples: int, version: int = 0, **extra
) -> Message:
    ciphertexts = scheme.encrypt(num_examples * update.astype(np.float64))
    metrics = MetricRecord(
        {"num-examples": num_examples, protocol.MET_BASE: version, protocol.MET_ENCRYPT: 0.5, **extra}
    )
    content = RecordDict({"arrays": ciphertexts_to_record(ciphertexts), "metrics": metrics})
    return Message(content=content, reply_to=message)


def first_round(strategy, grid):
    rng = np.random.default_rng(0)
    initial = ArrayRecord([rng.standard_normal(s).astype(np.float32) for s in SHAPES])
    return initial, list(strategy.configure_train(1, initial, ConfigRecord({}), grid))


@pytest.mark.parametrize("scheme_name", ["ckks", "paillier"])
def test_decrypted_sum_is_the_weighted_mean(keys, scheme_name):
    secret, public = keys[scheme_name]
    client = load_client_scheme(secret.read_bytes())
    strategy = EncryptedFedAvg(load_server_scheme(public.read_bytes()), min_available_nodes=4, min_train_nodes=4)
    grid = FakeGrid([1, 2, 3, 4], lambda m: m)
    initial, messages = first_round(strategy, grid)
    assert len(messages) == 4 and all(len(m.content["arrays"]) == 2 for m in messages)
    assert all(m.content["config"][protocol.CFG_TARGET] == 0 for m in messages)
    rng = np.random.default_rng(1)
    updates = [rng.uniform(-0.5, 0.5, SIZE).astype(np.float32) for _ in range(4)]
    counts = [17, 40, 5, 90]
    replies = [encrypted_reply(m, client, u, n) for m, u, n in zip(messages, updates, counts)]

    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None  # the server holds no plaintext model
    assert strategy.version == 1 and metrics["accepted-replies"] == 4
    assert metrics["he-total-weight"] == sum(counts)
    assert metrics["he-ciphertext-bytes"] // 4 == metrics["he-ciphertext-bytes-per-client"] > 0
    assert metrics["he-aggregation-seconds"] > 0 and metrics["he-encrypt-seconds-mean"] == 0.5

    expected_mean = np.average(np.stack(updates).astype(np.float64), axis=0, weights=counts)
    delta = strategy.deltas[0]
    decrypted = client.decrypt_sum(list(delta.ciphertexts), SIZE, delta.summands) / delta.total_weight
    # CKKS: error ~1e-8 per summand at scale 2^40, then float32 rounding; Paillier: quantisation,
    # K * 2^-(f+1) on the sum, f = 20 fraction bits, divided by W
    tolerance = 1e-6 if scheme_name == "ckks" else 4 * 2.0**-21 / sum(counts) + 1e-7
    assert np.max(np.abs(decrypted - expected_mean)) <= tolerance
    new_global = reconstruct(client, flat(initial.to_numpy_ndarrays()), strategy.deltas)
    assert np.allclose(new_global, flat(initial.to_numpy_ndarrays()) + expected_mean, atol=2e-6)


def test_bad_replies_are_rejected_with_node_ids(keys):
    secret, public = keys["ckks"]
    client = load_client_scheme(secret.read_bytes())
    strategy = EncryptedFedAvg(load_server_scheme(public.read_bytes()), min_available_nodes=4, min_train_nodes=4)
    _, messages = first_round(strategy, FakeGrid([1, 2, 3, 4], lambda m: m))
    update = np.full(SIZE, 0.1, np.float32)
    good = encrypted_reply(messages[0], client, update, 10)
    stale = encrypted_reply(messages[1], client, update, 10, version=7)
    short = encrypted_reply(messages[2], client, update[:100], 10)
    garbage = Message(
        RecordDict(
            {
                "arrays": ciphertexts_to_record([b"not a ciphertext"]),
                "metrics": MetricRecord({"num-examples": 10, protocol.MET_BASE: 0}),
            }
        ),
        reply_to=messages[3],
    )
    _, metrics = strategy.aggregate_train(1, [good, stale, short, garbage])
    assert metrics["accepted-replies"] == 1 and metrics["rejected-replies"] == 3
    lines = " ".join(strategy.rejections())
    node = [m.metadata.dst_node_id for m in messages]
    assert f"node {node[1]}: rejected: trained from global version 7" in lines
    assert f"node {node[2]}: rejected: ckks ciphertext 0 holds 100 values, expected 310" in lines
    assert f"node {node[3]}: rejected: ckks ciphertext 0 cannot be parsed" in lines
    assert strategy.deltas[0].summands == 1


def test_chain_catches_up_nodes_and_resets_out_of_date_ones(keys):
    secret, public = keys["ckks"]
    client = load_client_scheme(secret.read_bytes())
    strategy = EncryptedFedAvg(load_server_scheme(public.read_bytes()), min_available_nodes=2, min_train_nodes=2)
    _, messages = first_round(strategy, FakeGrid([1, 2], lambda m: m))
    update = np.full(SIZE, 0.1, np.float32)
    strategy.aggregate_train(1, [encrypted_reply(m, client, update, 10) for m in messages])
    # round 2: node 1 and 2 confirmed version 0; node 3 is new and needs G_0 and the chain
    messages = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord({}), FakeGrid([1, 2, 3], lambda m: m)))
    by_node = {m.metadata.dst_node_id: m for m in messages}
    assert len(by_node[1].content["arrays"]) == 0 and by_node[1].content["config"][protocol.CFG_FROM] == 0
    assert len(by_node[3].content["arrays"]) == 2
    assert len(by_node[1].content[protocol.CHAIN_KEY]) == len(strategy.deltas[0].ciphertexts)
    replies = [encrypted_reply(m, client, update, 10, version=1) for m in messages]
    strategy.aggregate_train(2, replies)
    assert strategy.node_versions == {1: 1, 2: 1, 3: 1}
    # an out-of-date error resets the node: it gets the initial model again
    from flwr.app import Error

    messages = list(strategy.configure_train(3, ArrayRecord(), ConfigRecord({}), FakeGrid([1, 2, 3], lambda m: m)))
    assert all(m.content["config"][protocol.CFG_FROM] == 1 for m in messages)
    error = Message(Error(code=1, reason=f"ValueError: {protocol.OUT_OF_DATE}: ..."), reply_to=messages[0])
    strategy.aggregate_train(3, [error] + [encrypted_reply(m, client, update, 10, version=2) for m in messages[1:]])
    assert messages[0].metadata.dst_node_id not in strategy.node_versions
    state = strategy.state_dict()
    copy = EncryptedFedAvg(load_server_scheme(public.read_bytes()))
    copy.load_state_dict(state)
    assert copy.version == 3 and copy.deltas == strategy.deltas and copy.node_versions == strategy.node_versions


# ------------------------------------------------------------------------------ the server has no secret


def test_server_side_scheme_cannot_decrypt(keys):
    for scheme_name, (secret, _public) in keys.items():
        client = load_client_scheme(secret.read_bytes())
        server = encrypted_strategy(he_config(keys, scheme_name)).scheme
        assert not server.can_decrypt
        total = server.sum_ciphertexts([client.encrypt(np.ones(SIZE))])
        with pytest.raises(ValueError, match="cannot decrypt"):
            server.decrypt_sum(total, SIZE, 1)
        with pytest.raises(ValueError, match="refuses a scheme that holds the secret key"):
            EncryptedFedAvg(client)


def test_server_refuses_the_secret_key_and_never_reads_it(keys, monkeypatch):
    secret, _ = keys["ckks"]
    with pytest.raises(EncryptionConfigError, match="refuses secret key material"):
        encrypted_strategy(he_config(keys, "ckks", **{"he-public-key-path": str(secret)}))
    with pytest.raises(EncryptionConfigError, match="he-public-key-path is empty"):
        encrypted_strategy(he_config(keys, "ckks", **{"he-public-key-path": ""}))

    read: list[str] = []
    original = Path.read_bytes

    def recording_read_bytes(self):
        read.append(str(Path(self).resolve()))
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", recording_read_bytes)
    from fl_app.server.strategy_setup import make_strategy

    config = he_config(keys, "ckks")
    strategy = make_strategy(Settings.from_run_config(config)).inner
    assert isinstance(strategy, EncryptedFedAvg) and not strategy.scheme.can_decrypt
    # the only file besides Python sources (a lazy scipy import reads its own) is the public key
    assert [path for path in read if not path.endswith(".py")] == [str(keys["ckks"][1].resolve())]
    assert "secret" not in inspect.getsource(build_encrypted_strategy).replace("nothing secret", "")


# ------------------------------------------------------------------------------ refusals at start-up


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"strategy": "median"}, "cannot run strategy='median'"),
        ({"strategy": "krum"}, "cannot run strategy='krum'"),
        ({"strategy": "bulyan"}, "cannot run strategy='bulyan'"),
        ({"strategy": "trimmed-mean"}, "cannot run strategy='trimmed-mean'"),
        (
            {"strategy": "robust", "aggregation-rule": "geometric-median"},
            "cannot run strategy='robust' with aggregation-rule='geometric-median'",
        ),
        ({"strategy": "fedadam"}, "cannot run strategy='fedadam'"),
        ({"strategy": "robust", "norm-bound": 1.0}, "norm-bound=1.0 needs the plaintext updates"),
        ({"server-momentum": 0.9}, "server-momentum=0.9 needs the plaintext aggregate"),
        ({"attack": "alie", "attack-fraction": 0.2}, "attack='alie' is simulated on the server"),
        ({"homomorphic-encryption": "rsa"}, "homomorphic-encryption must be one of none, ckks, paillier"),
        ({"he-client-weighting": "capped"}, "he-client-weighting must be one of num-examples, uniform"),
        ({"he-paillier-key-bits": 1024}, "he-paillier-key-bits must be in [2048, 16384], got 1024"),
    ],
)
def test_plaintext_rules_are_refused_with_encryption(overrides, fragment):
    with pytest.raises(SettingsError) as err:
        Settings.from_run_config({"homomorphic-encryption": "ckks", **overrides})
    assert fragment in str(err.value)


def test_allowed_strategies_and_key_parameter_checks(keys):
    for overrides in (
        {"strategy": "fedavg"},
        {"strategy": "fedprox", "proximal-mu": 0.1},
        {"strategy": "robust", "aggregation-rule": "mean"},
    ):
        Settings.from_run_config({"homomorphic-encryption": "paillier", **overrides})
    strategy = encrypted_strategy(he_config(keys, "ckks", strategy="fedprox", **{"proximal-mu": 0.1}))
    assert strategy.train_config == {"proximal-mu": 0.1}
    with pytest.raises(
        EncryptionConfigError, match="he-paillier-key-bits=3072 but the key file was generated with 2048"
    ):
        encrypted_strategy(he_config(keys, "paillier", **{"he-paillier-key-bits": 3072}))
    with pytest.raises(EncryptionConfigError, match="holds a paillier key"):
        encrypted_strategy(he_config(keys, "ckks", **{"he-public-key-path": str(keys["paillier"][1])}))
    with pytest.raises(EncryptionConfigError, match="he-ckks-scale-bits=30 but the key file was generated with 40"):
        encrypted_strategy(he_config(keys, "ckks", **{"he-ckks-scale-bits": 30}))


# ------------------------------------------------------------------------------ whole federations in-process


def run_encrypted(config: dict, num_rounds: int, first_round: int = 1, grid=None, strategy=None):
    """An encrypted federation in this process; returns (strategy, grid, history, initial)."""
    import tensorflow as tf

    from fl_app.server.evaluation import model_spec
    from fl_app.server.round_loop import run_rounds
    from fl_app.server.strategy_setup import make_strategy
    from fl_app.simulation.local_grid import LocalGrid
    from fl_app.task.models import build_model

    settings = Settings.from_run_config(config)
    run_config = settings.to_run_config()
    guarded = make_strategy(settings) if strategy is None else GuardedStrategy(strategy)
    shape, classes, _ = model_spec(settings)
    tf.keras.utils.set_random_seed(settings.seed)
    initial = ArrayRecord(build_model(settings.model, shape, classes, settings.seed).get_weights())
    grid = grid or LocalGrid(run_config, settings.num_partitions)
    _, history = run_rounds(grid, guarded, initial, num_rounds=num_rounds, first_round=first_round)
    return guarded.inner, grid, history, initial


BASE = {
    "num-partitions": 4,
    "partitioner": "iid",
    "local-epochs": 1,
    "model": "logreg",
    "min-train-clients": 2,
    "min-evaluate-clients": 2,
    "min-available-clients": 4,
}


def test_paillier_federation_matches_plaintext_fedavg(keys):
    from fl_app.simulation.local_grid import run_local_federation

    config = {**BASE, **he_config(keys, "paillier")}
    strategy, grid, history, initial = run_encrypted(config, num_rounds=3)
    assert all(r.clients_failed == 0 and r.clients_replied == 4 and not r.failures for r in history)
    client = load_client_scheme(keys["paillier"][0].read_bytes())
    final = reconstruct(client, flat(initial.to_numpy_ndarrays()), strategy.deltas)
    plain, _ = run_local_federation({**BASE, "strategy": "fedavg"}, num_rounds=3, evaluate_centrally=False)
    difference = np.max(np.abs(final - flat(plain.to_numpy_ndarrays())))
    assert difference < 1e-4, difference
    for context in grid.contexts.values():  # every client holds the same decrypted global model
        assert np.array_equal(flat(context.state["he-global"].to_numpy_ndarrays()), final)
    record = history[-1].extra
    for key in (
        "he-aggregation-seconds",
        "he-encrypt-seconds-mean",
        "he-decrypt-seconds-mean",
        "he-ciphertext-bytes",
        "he-chain-bytes-sent",
    ):
        assert record[key] > 0, key
    assert history[-1].federated_accuracy is not None


def test_partial_participation_and_a_client_that_lost_its_state(keys):
    config = {**BASE, **he_config(keys, "ckks"), "fraction-train": 0.5, "fraction-evaluate": 0.5}
    strategy, grid, history, initial = run_encrypted(config, num_rounds=3)
    assert all(r.clients_failed == 0 and r.clients_replied == 2 and not r.failures for r in history)
    client = load_client_scheme(keys["ckks"][0].read_bytes())
    final = reconstruct(client, flat(initial.to_numpy_ndarrays()), strategy.deltas)
    current = [c for c in grid.contexts.values() if int(c.state["he-client"]["version"]) == 3]
    assert current and all(np.array_equal(flat(c.state["he-global"].to_numpy_ndarrays()), final) for c in current)

    # node 1 loses its state: its next message fails with out-of-date, the one after brings G_0 again
    strategy.fraction_train = strategy.fraction_evaluate = 1.0
    strategy.node_versions[1] = strategy.version
    grid.contexts[1] = Context(
        run_id=1,
        node_id=1,
        node_config=grid.contexts[1].node_config,
        state=RecordDict(),
        run_config=grid.contexts[1].run_config,
    )
    _, _, more, _ = run_encrypted(config, num_rounds=5, first_round=4, grid=grid, strategy=strategy)
    assert more[0].clients_failed == 1 and protocol.OUT_OF_DATE in more[0].failures[0]
    assert more[1].clients_failed == 0 and more[1].clients_replied == 4 and not more[1].failures
    final = reconstruct(client, flat(initial.to_numpy_ndarrays()), strategy.deltas)
    assert all(np.array_equal(flat(c.state["he-global"].to_numpy_ndarrays()), final) for c in grid.contexts.values())


def test_client_without_secret_key_fails_with_the_key_name(keys):
    config = {**BASE, **he_config(keys, "ckks", **{"he-secret-key-path": ""})}
    _, _, history, _ = run_encrypted(config, num_rounds=1)
    assert history[0].clients_replied == 0
    assert "set he-secret-key-path in the run config" in history[0].failures[0]
