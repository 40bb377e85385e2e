"""Fast, byte-identical conversion between numpy arrays and Flower ``Array`` / ``ArrayRecord``.

    from tilestack.federated.codec import to_record, to_numpy
    record = to_record({"fc.weight": w, "fc.bias": b})      # what ArrayRecord({k: Array(v)}) would hold
    params = to_numpy(record)                                # writable float32 copies

Flower serialises an ``Array`` in the ``.npy`` format through ``np.save`` / ``np.load``, which parse and
write the text header every time (about 0.2 ms per array: most of a tiny client's round). The bytes here
are the same (the header of each (dtype, shape) is produced once by ``np.save`` and cached; the payload
is the C-order buffer), so Flower, Ray and a deployment read them unchanged; decoding checks the header
bytes and falls back to ``Array.numpy()`` for anything it has not seen.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"
TOPK_STYPE = "tilestack.topk"  # data: k uint32 flat indices, then k values (float32, float64 for a float64 update; the
# Array's dtype says which); the rest of the array is 0
TOPK_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
INT8_STYPE = "tilestack.int8"  # data: float32 (low, step), then one uint8 code per element: low + code * step
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    key = (dtype.str, shape)
    header = _HEADERS.get(key)
    if header is None:
        buf = BytesIO()
        probe = np.zeros(shape, dtype)
        np.save(buf, probe, allow_pickle=False)
        header = buf.getvalue()[: len(buf.getvalue()) - probe.nbytes]
        _HEADERS[key] = header
    return header


def encode(arr: np.ndarray) -> Array:
    """``Array(arr)``, without re-writing the ``.npy`` header each time."""
    arr = np.ascontiguousarray(arr)
    shape = tuple(arr.shape)
    data = _header(arr.dtype, shape) + arr.tobytes()
    return Array(dtype=str(arr.dtype), shape=shape, stype=NUMPY_STYPE, data=data)


def encode_topk(arr: np.ndarray, k: int) -> Array:
    """The ``k`` entries of ``arr`` largest in magnitude (an update compressed by top-k sparsification), their values
    in float64 where ``arr`` is float64 (a float64 model's update: float32 values lost its low bits for good, so that
    even top-k of every entry did not give the uncompressed run), else float32."""
    dtype = np.dtype(np.float64) if np.asarray(arr).dtype == np.float64 else np.dtype(np.float32)
    flat = np.ascontiguousarray(arr, dtype).ravel()
    k = min(max(1, k), flat.size)
    idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]).astype(np.uint32)  # (k,)
    data = idx.tobytes() + flat[idx].tobytes()
    return Array(dtype=str(dtype), shape=tuple(arr.shape), stype=TOPK_STYPE, data=data)


def encode_int8(arr: np.ndarray) -> Array:
    """``arr`` quantised to 256 evenly spaced levels between its minimum and maximum (rounded to nearest)."""
    flat = np.ascontiguousarray(arr, np.float32).ravel()
    low = float(flat.min()) if flat.size else 0.0
    span = float(flat.max()) - low if flat.size else 0.0
    step = span / INT8_LEVELS if span > 0 else 1.0
    with np.errstate(invalid="ignore"):  # a non-finite update: its NaN low/step decode to NaN, caught by the server
        codes = np.clip(np.rint((flat - low) / step), 0, INT8_LEVELS).astype(np.uint8)
    data = np.array([low, step], np.float32).tobytes() + codes.tobytes()
    return Array(dtype="float32", shape=tuple(arr.shape), stype=INT8_STYPE, data=data)


INT8_LEVELS = 255


def _decode_compressed(a: Array) -> np.ndarray:
    shape = tuple(a.shape)
    n = int(np.prod(shape, dtype=np.int64))
    if a.stype == TOPK_STYPE:
        dtype = np.dtype(a.dtype) if a.dtype in ("float32", "float64") else None
        if dtype not in TOPK_DTYPES:
            raise ValueError(f"codec: a {TOPK_STYPE} array of dtype {a.dtype!r}; expected 'float32' or 'float64'")
        entry = 4 + dtype.itemsize  # a uint32 index and a value
        k = len(a.data) // entry
        if len(a.data) != entry * k:
            raise ValueError(f"codec: a {TOPK_STYPE} array of {len(a.data)} bytes; expected {entry} per kept entry")
        idx = np.frombuffer(a.data, np.uint32, count=k)
        if k and int(idx.max()) >= n:
            raise ValueError(f"codec: a {TOPK_STYPE} index {int(idx.max())} for shape {shape}; expected < {n}")
        out = np.zeros(n, dtype)
        out[idx] = np.frombuffer(a.data, dtype, count=k, offset=4 * k)
        return out.reshape(shape)
    low, step = np.frombuffer(a.data, np.float32, count=2)
    codes = np.frombuffer(a.data, np.uint8, offset=8)
    if codes.size != n:
        raise ValueError(f"codec: a {INT8_STYPE} array with {codes.size} codes for shape {shape}; expected {n}")
    return (low + codes.astype(np.float32) * step).reshape(shape)


def decode(a: Array) -> np.ndarray:
    """``a.numpy()`` as a writable array, without parsing a header it has seen before; compressed arrays
    (top-k, int8) are expanded to dense float32 (top-k of a float64 update: float64)."""
    if a.stype in (TOPK_STYPE, INT8_STYPE):
        return _decode_compressed(a)
    if a.stype != NUMPY_STYPE:
        return a.numpy()
    dtype = np.dtype(a.dtype)
    shape = tuple(a.shape)
    header = _HEADERS.get((dtype.str, shape))
    if header is None or not a.data.startswith(header):
        out = a.numpy()
        _header(out.dtype, tuple(out.shape))  # learn it for next time
        return out
    return np.frombuffer(a.data, dtype=dtype, offset=len(header)).reshape(shape).copy()


def to_record(params: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: encode(v) for k, v in params.items()})


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: decode(v) for k, v in record.items()}
