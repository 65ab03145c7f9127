"""Update compression codecs: a client encodes its update, the server decodes it.

A client's update is a flat float32 vector ``u`` of length ``P`` (client weights minus
global weights, all layers concatenated). A codec turns it into a small payload, a dict
``str -> np.ndarray`` that travels as one Flower ``ArrayRecord``, and the server turns
that payload back into a float32 vector of length ``P``::

    payload = codec.encode(u, round_seed=r, client_seed=node_id)   # on the client
    u_hat = codec.decode(payload, P, round_seed=r)                 # on the server

Codecs (run-config name, payload, bytes sent for ``P`` values):

* ``none`` -- :class:`IdentityCodec`: ``values`` float32; ``4P``.
* ``float16`` -- :class:`Float16Codec`: ``values`` float16; ``2P``.
* ``int8`` -- :class:`Int8Codec`: stochastic rounding to 255 levels per block (QSGD-style,
  Alistarh et al. 2017); ``q`` int8 and ``scales`` float32; ``P + 4 * ceil(P / block)``.
* ``top-k`` -- :class:`TopKCodec`: the ``k P`` largest magnitudes (Stich et al. 2018,
  "Sparsified SGD with Memory"); ``indices`` int32 and ``values`` float32; ``8 k P``.
  Biased: the client wraps it in :class:`ErrorFeedback` (Karimireddy et al. 2019).
* ``random-mask`` -- :class:`RandomMaskCodec`: the coordinates of a random mask that both
  sides derive from ``(round_seed, client_seed)`` (Konecny et al. 2016, "Federated
  Learning: Strategies for Improving Communication Efficiency", structured updates);
  ``seed`` uint64 (one value) and ``values`` float32; about ``4 k P``, no indices.

The server never trusts a payload: :meth:`Codec.decode` checks the key set, every array's
dtype, shape and range, and that the decoded vector is finite, and raises ``ValueError``
saying what is wrong; :func:`payload_from_array_record` deserialises an ``ArrayRecord``
received from a client after checking each array's header against its byte count.

Randomness never comes from NumPy's global state: it is drawn from
``PCG64(SeedSequence([round_seed, client_seed], spawn_key=(stream,)))``. The shared
random mask uses only the bit generator's raw output (``PCG64.random_raw``), whose stream
NumPy keeps stable across releases (NEP 19), so a client and a server on different NumPy
versions derive the same mask.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import numpy as np

from strategies.core.wire_format import (
    Payload,
    payload_from_array_record,
    payload_nbytes,
    payload_to_array_record,
    serialized_nbytes,
)

__all__ = [
    "Codec",
    "ErrorFeedback",
    "Payload",
    "make_codec",
    "payload_from_array_record",
    "payload_nbytes",
    "payload_to_array_record",
    "serialized_nbytes",
]

DEFAULT_TOPK_FRACTION = 0.01
DEFAULT_MASK_FRACTION = 0.01
DEFAULT_INT8_BLOCK = 4096

RUN_CONFIG_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "name": "compression",
        "topk_fraction": "compression-topk-fraction",
        "mask_fraction": "compression-mask-fraction",
        "mask_rescale": "compression-mask-rescale",
        "int8_block": "compression-int8-block",
    }
)
"""``make_codec`` argument -> the run-config key it comes from (used in error messages)."""

_FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT8_LEVELS = 127
_INT32_MAX = int(np.iinfo(np.int32).max)
_UINT64_MAX = 2**64 - 1
_MASK_BITS = 53  # the mask compares the top 53 bits of each raw 64-bit draw
_INT8_ROUNDING_STREAM = 0
_MASK_STREAM = 1


# ----------------------------------------------------------------------------- checks


def _check_seed(value: object, what: str) -> int:
    """Return ``value`` as an int in ``[0, 2**64)``, the range of a Flower node id."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if not 0 <= int(value) <= _UINT64_MAX:
        raise ValueError(f"{what} must be in [0, 2**64), got {value}")
    return int(value)


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


def _as_update(update: object) -> np.ndarray:
    """Return a client's update as a finite 1-D float32 vector (client-side check)."""
    array = np.asarray(update)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"update must be a non-empty flat vector, got shape {array.shape}")
    if array.dtype.kind != "f":
        raise ValueError(f"update must be floating point, got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # float64 beyond float32 range becomes Inf, refused below
        vector = array.astype(np.float32, copy=False)
    if not np.isfinite(vector).all():
        raise ValueError("update contains NaN or Inf (or values beyond float32 range)")
    return vector


def _payload_array(payload: Mapping[str, object], key: str, dtype: type, length: int) -> np.ndarray:
    """Return ``payload[key]`` as a native-byte-order 1-D array of ``dtype`` and ``length``.

    Byte order is not part of the contract (``np.save`` writes the sender's native order),
    so ``>f4`` is accepted as ``float32``; kind and item size must match exactly.
    """
    array = payload[key]
    if not isinstance(array, np.ndarray):
        raise ValueError(f"payload[{key!r}] must be a numpy array, got {type(array).__name__}")
    expected = np.dtype(dtype)
    if array.dtype.kind != expected.kind or array.dtype.itemsize != expected.itemsize:
        raise ValueError(f"payload[{key!r}] must have dtype {expected}, got {array.dtype}")
    if array.shape != (length,):
        raise ValueError(f"payload[{key!r}] must have shape ({length},), got {array.shape}")
    return np.asarray(array, dtype=expected)


def _check_finite(values: np.ndarray, key: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"payload[{key!r}] contains NaN or Inf")


def _check_fraction(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key} must be a number in (0, 1], got {value!r}")
    fraction = float(value)
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"{key} must be in (0, 1], got {value!r}")
    return fraction


def _rng_seed(round_seed: int, client_seed: int, stream: int) -> np.random.SeedSequence:
    """Seed of one random stream, independent across rounds, clients and purposes."""
    return np.random.SeedSequence([round_seed, client_seed], spawn_key=(stream,))


# ----------------------------------------------------------------------------- codecs


class Codec(ABC):
    """Encodes a flat float32 update into a dict of numpy arrays and decodes it back.

    Subclasses implement ``_encode`` / ``_decode``; the public methods validate inputs
    once for all codecs. ``decode`` is the server's trust boundary: it accepts exactly
    ``payload_keys``, raises ``ValueError`` naming the faulty array on anything
    malformed, and never returns a non-finite vector.

    Attributes:
        name: the run-config name (``compression`` key).
        payload_keys: the keys of every payload this codec produces and accepts.
        biased: ``True`` when ``E[decode(encode(u))] != u``; a client should then wrap the
            codec in :class:`ErrorFeedback` so the dropped part is sent later.
    """

    name: ClassVar[str]
    payload_keys: ClassVar[frozenset[str]]
    biased: bool
    parameters: ClassVar[Mapping[str, str]] = MappingProxyType({})
    """``make_codec`` argument -> constructor argument, for the parameters this codec takes."""

    def encode(self, update: np.ndarray, *, round_seed: int, client_seed: int) -> Payload:
        """Compress ``update`` (a finite 1-D float vector) into a payload.

        ``round_seed`` is shared by the server and all clients of a round; ``client_seed``
        (e.g. the Flower node id) makes each client's randomness independent.
        """
        vector = _as_update(update)
        return self._encode(
            vector,
            round_seed=_check_seed(round_seed, "round_seed"),
            client_seed=_check_seed(client_seed, "client_seed"),
        )

    def decode(self, payload: Mapping[str, np.ndarray], size: int, *, round_seed: int) -> np.ndarray:
        """Return the float32 vector of length ``size`` that ``payload`` encodes.

        Raises:
            ValueError: the payload is malformed (missing or unexpected key, wrong dtype or
                length, out-of-range or non-finite content) or decodes to NaN/Inf.
        """
        size = _check_size(size)
        round_seed = _check_seed(round_seed, "round_seed")
        if not isinstance(payload, Mapping):
            raise ValueError(f"payload must be a mapping of arrays, got {type(payload).__name__}")
        missing = self.payload_keys - payload.keys()
        unexpected = payload.keys() - self.payload_keys
        if missing or unexpected:
            raise ValueError(
                f"{self.name} payload must have keys {sorted(self.payload_keys)}; "
                f"missing {sorted(missing)}, unexpected {sorted(map(str, unexpected))}"
            )
        dense = self._decode(payload, size, round_seed=round_seed)
        if not np.isfinite(dense).all():
            raise ValueError(f"{self.name} payload decodes to NaN or Inf")
        return dense

    @abstractmethod
    def _encode(self, update: np.ndarray, *, round_seed: int, client_seed: int) -> Payload:
        """Encode a validated finite float32 vector."""

    @abstractmethod
    def _decode(self, payload: Mapping[str, np.ndarray], size: int, *, round_seed: int) -> np.ndarray:
        """Decode a payload whose key set is already checked; validate its arrays."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IdentityCodec(Codec):
    """No compression: ``values = u`` as float32 (4 bytes per value)."""

    name = "none"
    payload_keys = frozenset({"values"})
    biased = False

    def _encode(self, update: np.ndarray, *, round_seed: int, client_seed: int) -> Payload:
        return {"values": update.copy()}

    def _decode(self, payload: Mapping[str, np.ndarray], size: int, *, round_seed: int) -> np.ndarray:
        values = _payload_array(payload, "values", np.float32, size)
        _check_finite(values, "values")
        return values.copy()


class Float16Codec(Codec):
    """Half precision: ``values = float16(clip(u, -65504, 65504))`` (2 bytes per value).

    Round-to-nearest keeps a relative error of at most ``2**-11`` for ``|u| >= 2**-14``
    and an absolute error of at most ``2**-25`` below. Values beyond float16's largest
    finite value 65504 are clipped to +-65504 instead of becoming Inf; an update entry that
    large is absurd for a model and is bounded by the server's norm checks anyway.
    Round-to-nearest is deterministic, so strictly biased, but by at most the float16
    precision above; the codec counts as unbiased (no error feedback needed).
    """

    name = "float16"
    payload_keys = frozenset({"values"})
    biased = False

    def _encode(self, update: np.ndarray, *, round_seed: int, client_seed: int) -> Payload:
        return {"values": np.clip(update, -_FLOAT16_MAX, _FLOAT16_MAX).astype(np.float16)}

    def _decode(self, payload: Mapping[str, np.ndarray], size: int, *, round_seed: int) -> np.ndarray:
        values = _payload_array(payload, "values", np.float16, size)
        _check_finite(values, "values")
        return values.astype(np.float32)


class Int8Codec(Codec):
    """8-bit quantisation with stochastic rounding, one float32 scale per block.

    For each block ``b`` of ``block`` consecutive values, ``s_b = max_i |u_i| / 127`` and
    ``q_i = floor(u_i / s_b + xi_i)`` with ``xi_i ~ U[0, 1)``, so ``q_i`` is in
    ``[-127, 127]``, ``E[q_i] s_b = u_i`` (unbiased) and ``|q_i s_b - u_i| < s_b``
    (stochastic rounding, Gupta et al. 2015; QSGD, Alistarh et al. 2017). The uniforms
    come from the client's own stream seeded by ``(round_seed, client_seed)``; the server
    does not need them. Payload: ``q`` int8 (P bytes) and ``scales`` float32
    (``4 ceil(P / block)`` bytes). ``block >= P`` gives a single per-vector scale.
    """

    name = "int8"
    payload_keys = frozenset({"q", "scales"})
    biased = False
    parameters: ClassVar[Mapping[str, str]] = MappingProxyType({"int8_block": "block"})
    block: int

    def __init__(self, block: int = DEFAULT_INT8_BLOCK) -> None:
        key = RUN_CONFIG_KEYS["int8_block"]
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
            raise ValueError(f"{key} must be a positive integer, got {block!r}")
        self.block = int(block)

    def num_blocks(self, size: int) -> int:
        """Number of scales sent for a vector of ``size`` values."""
        return -(-size // self.block)

    def _encode(self, update: np.ndarray, *, round_seed: int, client_seed: int) -> Payload:
        starts = np.arange(0, update.size, self.block)
        block_max = np.maximum.reduceat(np.abs(update), starts)
        with np.errstate(over="ignore"):  # 127 / a subnormal maximum: those blocks are redone below
            inverse = np.divide(_INT8_LEVELS, block_max, out=np.zeros_like(block_max), where=block_max > 0)
        rng = np.random.Generator(np.random.PCG64(_rng_seed(round_seed, client_seed, _INT8_ROUNDING_STREAM)))
        draws = rng.random(update.size, dtype=np.float32)
        levels = update * np.repeat(inverse, self.block)[: update.size]
        levels += draws
        np.floor(levels, out=levels)
        # |u| * 127 / max|u| can round a hair above 127 in float32; clip keeps the int8 range.
        np.clip(levels, -_INT8_LEVELS, _INT8_LEVELS, out=levels)
        scales = (block_max / np.float32(_INT8_LEVELS)).astype(np.float32)
        tiny = (block_max > 0) & (scales < np.finfo(np.float32).tiny)
        if tiny.any():  # subnormal block maxima: max/127 underflows in float32 (and 127/max overflows)
            scales[tiny] = np.maximum(scales[tiny], np.finfo(np.float32).smallest_subnormal)
            values = np.repeat(tiny, self.block)[: update.size]
            step = np.repeat(scales.astype(np.float64), self.block)[: update.size][values]
            exact = np.floor(update[values].astype(np.float64) / step + draws[values])
            levels[values] = np.clip(exact, -_INT8_LEVELS, _INT8_LEVELS)
        return {"q": levels.astype(np.int8), "scales": scales}

    def _decode(self, payload: Mapping[str, np.ndarray], size: int, *, round_seed: int) -> np.ndarray:
        levels = _payload_array(payload, "q", np.int8, size)
        scales = _payload_array(payload, "scales", np.float32, self.num_blocks(size))
        if levels.min() < -_INT8_LEVELS:
            raise ValueError(f"payload['q'] must lie in [-127, 127], got {levels.min()}")
        _check_finite(scales, "scales")
        if scales.min() < 0 or scales.max() > _FLOAT32_MAX / _INT8_LEVELS:
            raise ValueError(
                f"payload['scales'] must lie in [0, {_FLOAT32_MAX / _INT8_LEVELS:.3g}], "
                f"got values in [{scales.min():.3g}, {scales.max():.3g}]"
            )
        return levels.astype(np.float32) * np.repeat(scales, self.block)[:size]

    def __repr__(self) -> str:
        return f"Int8Codec(block={self.block})"


class TopKCodec(Codec):
    """Top-k sparsification: the ``m = max(1, round(k P))`` entries of largest ``|u_i|``.

    Payload: ``indices`` int32 (sorted ascending, so the server can check uniqueness in
    one pass) and ``values`` float32, ``8 m`` bytes. Selection uses ``np.argpartition``,
    O(P). The codec is biased (it drops ``P - m`` entries every round), so a client wraps
    it in :class:`ErrorFeedback` (Stich et al. 2018; Karimireddy et al. 2019).
    """

    name = "top-k"
    payload_keys = frozenset({"indices", "values"})
    biased = True
    parameters: ClassVar[Mapping[str, str]] = MappingProxyType({"topk_fraction": "fraction"})

    def __init__(self, fraction: float = DEFAULT_TOPK_FRACTION) -> None:
        self.fraction = _check_fraction(fraction, RUN_CONFIG_KEYS["topk_fraction"])

    def num_kept(self, size: int) -> int:
        """``m = max(1, round(fraction * size))``, at most ``size``."""
        return max(1, min(size, round(self.fraction * size)))

    def _encode(self, update: np.ndarray, *, round_seed: int, client_seed: int) -> Payload:
        if update.size > _INT32_MAX:
            raise ValueError(f"top-k indices are int32; update has {update.size} values")
        kept = self.num_kept(update.size)
        largest = np.argpartition(np.abs(update), update.size - kept)[update.size - kept :]
        indices = np.sort(largest).astype(np.int32)
        return {"indices": indices, "values": update[indices]}

    def _decode(self, payload: Mapping[str, np.ndarray], size: int, *, round_seed: int) -> np.ndarray:
        kept = self.num_kept(size)
        indices = _payload_array(payload, "indices", np.int32, kept)
        values = _payload_array(payload, "values", np.float32, kept)
        if indices[0] < 0 or indices[-1] >= size:
            raise ValueError(
                f"payload['indices'] must lie in [0, {size}), got values in [{indices.min()}, {indices.max()}]"
            )
        if kept > 1 and not (np.diff(indices) > 0).all():
            raise ValueError("payload['indices'] must be strictly increasing (sorted, no duplicates)")
        _check_finite(values, "values")
        dense = np.zeros(size, dtype=np.float32)
        dense[indices] = values
        return dense

    def __repr__(self) -> str:
        return f"TopKCodec(fraction={self.fraction})"


class RandomMaskCodec(Codec):
    """Random-mask sparsification from a shared seed (Konecny et al. 2016).

    Each coordinate is kept independently with probability ``p`` (``p = fraction``,
    rounded to a multiple of ``2**-53``): coordinate ``i`` is kept when the top 53 bits of
    the ``i``-th raw draw of ``PCG64(SeedSequence([round_seed, client_seed]))`` are below
    ``p 2**53``. The client sends its ``client_seed`` (one uint64) and the kept values in
    coordinate order, about ``4 p P`` bytes and no indices; the server rebuilds the mask
    from the seed alone and checks that the number of values matches it.

    With ``rescale=True`` the server multiplies the values by ``1 / p``, so
    ``E[decode(encode(u))] = u`` over the mask (unbiased, at variance
    ``(1/p - 1) u_i**2`` per coordinate). With ``rescale=False`` the decode is the masked
    update itself, ``E = p u`` (biased but contractive, suitable for :class:`ErrorFeedback`).

    A client chooses its own seed, so it chooses which coordinates it sends; the values
    are still checked like any other update. A server that wants to pin the mask can
    compare the seed with the sender's node id.
    """

    name = "random-mask"
    payload_keys = frozenset({"seed", "values"})
    parameters: ClassVar[Mapping[str, str]] = MappingProxyType({"mask_fraction": "fraction", "mask_rescale": "rescale"})

    def __init__(self, fraction: float = DEFAULT_MASK_FRACTION, rescale: bool = True) -> None:
        self.fraction = _check_fraction(fraction, RUN_CONFIG_KEYS["mask_fraction"])
        if not isinstance(rescale, bool):
            key = RUN_CONFIG_KEYS["mask_rescale"]
            raise ValueError(f"{key} must be true or false, got {rescale!r}")
        self.rescale = rescale
        self.biased = not rescale
        self._threshold = max(1, round(self.fraction * 2**_MASK_BITS))

    @property
    def keep_probability(self) -> float:
        """The exact probability ``p`` that a coordinate is kept."""
        return self._threshold / 2**_MASK_BITS

    def mask(self, size: int, *, round_seed: int, client_seed: int) -> np.ndarray:
        """The boolean mask both sides derive from ``(round_seed, client_seed)``."""
        draws = np.random.PCG64(_rng_seed(round_seed, client_seed, _MASK_STREAM)).random_raw(size)
        return (draws >> np.uint64(64 - _MASK_BITS)) < np.uint64(self._threshold)

    def _encode(self, update: np.ndarray, *, round_seed: int, client_seed: int) -> Payload:
        mask = self.mask(update.size, round_seed=round_seed, client_seed=client_seed)
        return {"seed": np.array([client_seed], dtype=np.uint64), "values": update[mask]}

    def _decode(self, payload: Mapping[str, np.ndarray], size: int, *, round_seed: int) -> np.ndarray:
        seed = _payload_array(payload, "seed", np.uint64, 1)
        mask = self.mask(size, round_seed=round_seed, client_seed=int(seed[0]))
        values = _payload_array(payload, "values", np.float32, int(np.count_nonzero(mask)))
        _check_finite(values, "values")
        dense = np.zeros(size, dtype=np.float32)
        with np.errstate(over="ignore"):  # an overflow to Inf is rejected by decode()
            dense[mask] = values / np.float32(self.keep_probability) if self.rescale else values
        return dense

    def __repr__(self) -> str:
        return f"RandomMaskCodec(fraction={self.fraction}, rescale={self.rescale})"


# ----------------------------------------------------------------------- error feedback


class ErrorFeedback:
    """Client-side error feedback around a biased codec (EF-SGD).

    The client keeps a residual ``e`` (initially 0), sends ``C(u_t + e_t)`` and keeps
    ``e_{t+1} = u_t + e_t - decode(C(u_t + e_t))`` (Stich et al. 2018, "Sparsified SGD with
    Memory"; Karimireddy et al. 2019, "Error Feedback Fixes SignSGD and other Gradient
    Compression Schemes"). Summed over rounds, what the server received plus the final
    residual equals the sum of the true updates: nothing is lost, only delayed.

    Only biased codecs are accepted: error feedback needs a contractive compressor, and an
    unbiased rescaled one (``random-mask`` with rescale) amplifies the residual without
    bound. Persist the residual across rounds with :meth:`state_dict` (e.g. in the
    ClientApp's ``context.state`` as an ``ArrayRecord``).
    """

    def __init__(self, codec: Codec) -> None:
        if not codec.biased:
            raise ValueError(f"error feedback is for biased codecs; {codec!r} is unbiased and needs none")
        self.codec = codec
        self._residual: np.ndarray | None = None

    @property
    def residual(self) -> np.ndarray | None:
        """The error not yet sent (``None`` before the first round)."""
        return None if self._residual is None else self._residual.copy()

    def encode(self, update: np.ndarray, *, round_seed: int, client_seed: int) -> Payload:
        """Encode ``update + residual`` and keep what the payload does not carry."""
        corrected = _as_update(update)
        if self._residual is not None:
            if self._residual.size != corrected.size:
                raise ValueError(
                    f"update has {corrected.size} values but the error-feedback residual has "
                    f"{self._residual.size}; call load_state_dict({{}}) after the model changes"
                )
            corrected = corrected + self._residual
        payload = self.codec.encode(corrected, round_seed=round_seed, client_seed=client_seed)
        sent = self.codec.decode(payload, corrected.size, round_seed=round_seed)
        self._residual = corrected - sent
        return payload

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"residual": e}``, or ``{}`` before the first round."""
        return {} if self._residual is None else {"residual": self._residual.copy()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a residual saved by :meth:`state_dict`; ``{}`` resets it to zero."""
        unexpected = set(state) - {"residual"}
        if unexpected:
            raise ValueError(f"error-feedback state has unexpected keys {sorted(unexpected)}")
        self._residual = _as_update(state["residual"]).copy() if "residual" in state else None


# ----------------------------------------------------------------------------- registry

CODECS: Mapping[str, type[Codec]] = MappingProxyType(
    {codec.name: codec for codec in (IdentityCodec, Float16Codec, Int8Codec, TopKCodec, RandomMaskCodec)}
)
"""Run-config name (``compression`` key) -> codec class."""


def make_codec(name: str, **params: object) -> Codec:
    """Build the codec named ``name`` from run-config parameters.

    ``params`` may hold any of ``topk_fraction``, ``mask_fraction``, ``mask_rescale`` and
    ``int8_block`` (run-config keys in :data:`RUN_CONFIG_KEYS`); those the codec does not
    use are ignored, so a caller can pass all of them. Missing ones take the defaults.

    Raises:
        ValueError: unknown name or parameter, or an invalid value, naming the key.
    """
    unknown = sorted(set(params) - (RUN_CONFIG_KEYS.keys() - {"name"}))
    if unknown:
        raise ValueError(
            f"unknown compression parameter(s) {unknown}; allowed: {sorted(RUN_CONFIG_KEYS.keys() - {'name'})}"
        )
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise ValueError(f"{RUN_CONFIG_KEYS['name']} must be one of {sorted(CODECS)}, got {name!r}")
    return codec(**{codec.parameters[key]: value for key, value in params.items() if key in codec.parameters})
