"""Tensor codec for the wire: base64 of little-endian C-order bytes with dtype and shape."""

from __future__ import annotations

import base64
import binascii
import math

import numpy as np

from .schemas import Tensor

WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
}


class TensorDecodeError(ValueError):
    """A tensor payload that cannot be decoded; the message names what is wrong."""


def encode_tensor(array: np.ndarray, dtype: str = "float32") -> Tensor:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(WIRE_DTYPES)}, got {dtype!r}")
    arr = np.ascontiguousarray(np.asarray(array), dtype=WIRE_DTYPES[dtype])
    return Tensor(dtype=dtype, shape=list(arr.shape), data=base64.b64encode(arr.tobytes()).decode("ascii"))


def decode_tensor(tensor: Tensor, field: str = "tensor", max_elements: int | None = None) -> np.ndarray:
    """Decode to float32, checking dtype, shape against the byte count, size and finiteness."""
    if tensor.dtype not in WIRE_DTYPES:
        raise TensorDecodeError(f"{field}.dtype must be one of {sorted(WIRE_DTYPES)}, got {tensor.dtype!r}")
    if any(s < 0 for s in tensor.shape):
        raise TensorDecodeError(f"{field}.shape must hold non-negative sizes, got {tensor.shape}")
    count = math.prod(tensor.shape)
    if max_elements is not None and count > max_elements:
        raise TensorDecodeError(f"{field}.shape {tensor.shape} holds {count} values, over the limit {max_elements}")
    dt = WIRE_DTYPES[tensor.dtype]
    try:
        raw = base64.b64decode(tensor.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TensorDecodeError(f"{field}.data is not valid base64: {exc}") from None
    if len(raw) != count * dt.itemsize:
        raise TensorDecodeError(
            f"{field}.data holds {len(raw)} bytes but shape {tensor.shape} of {tensor.dtype} "
            f"needs {count * dt.itemsize}"
        )
    arr = np.frombuffer(raw, dtype=dt).reshape(tensor.shape).astype(np.float32)
    if not np.isfinite(arr).all():
        raise TensorDecodeError(f"{field}.data holds NaN or infinite values")
    return arr
