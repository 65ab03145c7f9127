"""How arrays travel in a reply: NumPy-serialised arrays in a Flower ``ArrayRecord``, read without trust.

A payload is a mapping of names to arrays (a codec's output, or a model's weights); the server
reads each ``.npy`` buffer header first and checks its declared shape against the bytes present,
so a forged header cannot make it allocate a huge array.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

Payload = dict[str, np.ndarray]

_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of array data in ``payload`` (sum of ``nbytes``, without headers or keys)."""
    return sum(int(np.asarray(array).nbytes) for array in payload.values())


def payload_to_array_record(payload: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap a payload in a Flower ``ArrayRecord`` (each array serialised with ``np.save``)."""
    return ArrayRecord(array_dict={key: Array.from_numpy_ndarray(np.asarray(array)) for key, array in payload.items()})


def serialized_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes the payload occupies in a Flower ``ArrayRecord`` (``count_bytes()``).

    This is the array data plus each array's ``.npy`` header (about 128 bytes) plus the
    length of each key: what the message carries for the update.
    """
    return payload_to_array_record(payload).count_bytes()


def _load_npy(data: bytes, key: str) -> np.ndarray:
    """Deserialise one ``.npy`` buffer from an untrusted sender.

    The header is read first and the declared shape checked against the bytes actually
    present, so a forged header cannot make the server allocate a huge array (``np.load``
    allocates the declared shape before reading the data).
    """
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        reader = _NPY_HEADER_READERS.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran_order, dtype = reader(stream)
    except (ValueError, TypeError, SyntaxError) as error:
        raise ValueError(f"array {key!r} is not a valid .npy buffer: {error}") from error
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise ValueError(f"array {key!r} has unsupported dtype {dtype}")
    if any(dim < 0 for dim in shape):
        raise ValueError(f"array {key!r} declares a negative shape {shape}")
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f"array {key!r} declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes) "
            f"but carries {len(data) - offset} bytes"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def payload_from_array_record(record: ArrayRecord) -> Payload:
    """Read a payload out of a client's ``ArrayRecord`` without trusting it.

    Raises:
        ValueError: an array is not a NumPy-serialised numeric array whose header matches
            its data. The returned arrays are read-only views of the received bytes.
    """
    payload: Payload = {}
    for key, array in record.items():
        if array.stype != SType.NUMPY:
            raise ValueError(f"array {key!r} has serialisation type {array.stype!r}, expected {SType.NUMPY!r}")
        payload[key] = _load_npy(array.data, key)
    return payload
