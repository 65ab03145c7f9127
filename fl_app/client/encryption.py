"""The client's side of encrypted aggregation (protocol in :mod:`strategies.encrypted.strategy`).

* :func:`global_weights` turns a train or evaluate message into the global model: plainly its
  ``arrays`` without encryption; with encryption it decrypts the chain of encrypted sums the message
  carries and applies them to the global model this node keeps in ``context.state``.
* :func:`encrypted_upload` encrypts ``w_k * clip(x_k - G)`` instead of sending the weights.
* :func:`reply_metrics` adds the version trained from and the seconds spent decrypting/encrypting.
* :func:`capped_examples` caps the example count the client reports and encrypts with.
* :func:`answer_verification`: as a key holder, decrypt the sums a verification query carries and
  answer one bit each (:mod:`strategies.encrypted.verification`), never a plaintext.

The secret key is read from the node config's ``he-secret-key-path`` (edge machines) or else the
run config's (simulation); it is loaded once per process and path.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fl_app.config.settings import Settings
from strategies.core.clipping import clip_rows
from strategies.core.update_matrix import ModelLayout
from strategies.encrypted import strategy as protocol
from strategies.encrypted import verification
from strategies.encrypted.keys import load_client_scheme
from strategies.encrypted.scheme import HomomorphicScheme

STATE_MODEL = "he-global"
STATE_INFO = "he-client"


def secret_key_path(settings: Settings, context: Context) -> str:
    """The node config's ``he-secret-key-path``, else the run config's."""
    return str(context.node_config.get("he-secret-key-path", "") or settings.he_secret_key_path)


@functools.lru_cache(maxsize=4)
def _load_scheme(path: str, modified: float) -> HomomorphicScheme:
    return load_client_scheme(Path(path).read_bytes())


def client_scheme(settings: Settings, context: Context) -> HomomorphicScheme:
    """The scheme with the secret key; ``ValueError`` naming the key when it cannot be loaded."""
    path = secret_key_path(settings, context)
    if not path:
        raise ValueError(
            f"homomorphic-encryption='{settings.homomorphic_encryption}' needs the secret key on every "
            "client: set he-secret-key-path in the run config (simulation) or in the node config "
            "(--node-config \"he-secret-key-path='keys/secret.key'\")"
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"he-secret-key-path '{path}' does not exist on this node ({file.resolve()})")
    scheme = _load_scheme(str(file.resolve()), file.stat().st_mtime)
    if scheme.name != settings.homomorphic_encryption:
        raise ValueError(
            f"homomorphic-encryption='{settings.homomorphic_encryption}' but he-secret-key-path "
            f"'{path}' holds a {scheme.name} key"
        )
    return scheme


def _info(context: Context) -> ConfigRecord:
    records = context.state.config_records
    if STATE_INFO not in records:
        records[STATE_INFO] = ConfigRecord()
    return records[STATE_INFO]


def _number(value: object, what: str) -> float:
    """A config value that must be a number (the server's train config is not trusted blindly)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    return float(value)


def _numbers(value: object, what: str) -> list[float]:
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list of numbers, got {value!r}")
    return [_number(v, what) for v in value]


def global_weights(settings: Settings, context: Context, msg: Message) -> list[np.ndarray]:
    """The global model of ``msg`` (plaintext arrays, or decrypted from the encrypted chain).

    Raises:
        ValueError: with :data:`~strategies.encrypted.strategy.OUT_OF_DATE` in the message when this node's
            stored model does not fit the chain (it lost its state, or missed rounds the server
            believes it received); the server then resends the chain from the initial model.
    """
    if settings.homomorphic_encryption == "none":
        return msg.content.array_records["arrays"].to_numpy_ndarrays()
    config = msg.content.config_records["config"]
    target = int(_number(config[protocol.CFG_TARGET], protocol.CFG_TARGET))
    start = int(_number(config[protocol.CFG_FROM], protocol.CFG_FROM))
    weights = _numbers(config[protocol.CFG_WEIGHTS], protocol.CFG_WEIGHTS)
    summands = [int(k) for k in _numbers(config[protocol.CFG_SUMMANDS], protocol.CFG_SUMMANDS)]
    info = _info(context)
    models = context.state.array_records
    stored = int(_number(info["version"], "version")) if "version" in info and STATE_MODEL in models else None

    if stored == target:
        base_version, arrays = target, models[STATE_MODEL].to_numpy_ndarrays()
    elif stored is not None and start <= stored < target:
        base_version, arrays = stored, models[STATE_MODEL].to_numpy_ndarrays()
    elif start == 0 and len(msg.content.array_records["arrays"]) > 0:
        base_version, arrays = 0, msg.content.array_records["arrays"].to_numpy_ndarrays()
    else:
        raise ValueError(
            f"{protocol.OUT_OF_DATE}: this node holds global version {stored}, the message carries "
            f"versions {start + 1}..{target} without the initial model"
        )

    started = time.perf_counter()
    if base_version < target:
        scheme = client_scheme(settings, context)
        chain = msg.content.array_records[protocol.CHAIN_KEY]
        layout = ModelLayout.of_arrays(arrays)
        flat = layout.flatten_arrays(arrays)
        for version in range(base_version + 1, target + 1):
            index = version - start - 1
            ciphertexts = protocol.record_to_ciphertexts(chain, f"v{version}")
            decrypted = scheme.decrypt_sum(ciphertexts, flat.size, summands[index])
            flat = protocol.apply_delta(flat, decrypted, weights[index])
        arrays = layout.unflatten_arrays(flat)
        models[STATE_MODEL] = ArrayRecord(arrays)
        info[protocol.MET_DECRYPT] = time.perf_counter() - started  # the latest decryption
    elif STATE_MODEL not in models or stored != target:
        models[STATE_MODEL] = ArrayRecord(arrays)
    info["version"] = target
    return arrays


def encrypted_upload(
    settings: Settings, context: Context, global_weights: list, weights: list, config: dict
) -> ArrayRecord:
    """``Enc(w_k * clip(x_k - G, C))`` as uint8 arrays; ``config`` must hold ``num-examples``."""
    scheme = client_scheme(settings, context)
    clip_norm = float(config.get(protocol.CFG_CLIP, settings.he_clip_norm))
    weighting = str(config.get(protocol.CFG_WEIGHTING, settings.he_client_weighting))
    started = time.perf_counter()
    layout = ModelLayout.of_arrays(global_weights)
    update = layout.flatten_arrays(weights, minus=layout.flatten_arrays(global_weights))
    if clip_norm > 0:  # he-clip-norm = 0: no clipping
        clip_rows(update[None, :], clip_norm)
    weight = protocol.client_weight(int(config["num-examples"]), weighting)
    ciphertexts = scheme.encrypt(weight * update.astype(np.float64))
    _info(context)[protocol.MET_ENCRYPT] = time.perf_counter() - started
    return protocol.ciphertexts_to_record(ciphertexts)


def reply_metrics(settings: Settings, context: Context) -> dict[str, float | int]:
    """Metrics the server needs (version trained from) and records (encrypt/decrypt seconds)."""
    if settings.homomorphic_encryption == "none":
        return {}
    info = _info(context)
    metrics: dict[str, float | int] = {protocol.MET_BASE: int(_number(info["version"], "version"))}
    for key in (protocol.MET_DECRYPT, protocol.MET_ENCRYPT):
        if key in info and math.isfinite(seconds := _number(info[key], key)):
            metrics[key] = seconds
    return metrics


def capped_examples(settings: Settings, num_examples: int) -> int:
    """The example count an encrypted run's client reports and weights its update with:
    ``min(n_k, he-max-examples)`` (the server rejects larger counts); ``n_k`` without encryption."""
    if settings.homomorphic_encryption == "none":
        return num_examples
    return min(int(num_examples), settings.he_max_examples)


def is_verification(msg: Message) -> bool:
    """Whether ``msg`` asks this key holder to verify a round's encrypted sums."""
    records = msg.content.config_records
    return "config" in records and records["config"].get("query") == verification.QUERY


def answer_verification(settings: Settings, context: Context, msg: Message) -> Message:
    """Decrypt each group sum of a verification query; answer 1 (valid) or 0 per sum.

    A sum is invalid when it cannot be decrypted (a Paillier slot beyond what its summands can
    give) or fails :func:`~strategies.encrypted.verification.sum_is_valid`. Only the bits leave.
    """
    scheme = client_scheme(settings, context)
    config = msg.content["config"]
    weights = _numbers(config[verification.CFG_WEIGHTS], verification.CFG_WEIGHTS)
    summands = [int(v) for v in _numbers(config[verification.CFG_SUMMANDS], verification.CFG_SUMMANDS)]
    clip_norm = _number(config[verification.CFG_CLIP], verification.CFG_CLIP)
    size = int(_number(config[verification.CFG_SIZE], verification.CFG_SIZE))
    if len(weights) != len(summands):
        raise ValueError(f"verification query: {len(weights)} weights for {len(summands)} sums")
    record = msg.content.array_records["arrays"]
    verdicts = []
    for index, (weight, count) in enumerate(zip(weights, summands, strict=True)):
        ciphertexts = protocol.record_to_ciphertexts(record, verification.group_prefix(index))
        try:
            decrypted = scheme.decrypt_sum(ciphertexts, size, count)
        except ValueError:
            verdicts.append(0)
            continue
        verdicts.append(int(verification.sum_is_valid(decrypted, weight, clip_norm)))
    return Message(content=RecordDict({"metrics": MetricRecord({verification.MET_VERDICTS: verdicts})}), reply_to=msg)
