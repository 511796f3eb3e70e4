"""Element decoding for kernels that read float32, bfloat16 or float16 storage directly.

Numba has no 16-bit float arrays, so a 16-bit tensor is handed over as its raw bits and
the integer type of that view says how to decode it: ``uint16`` is bfloat16, ``int16`` is
IEEE-754 binary16.  Decoding is exact (every bf16/f16 value is a float32 value), so a
kernel reading bits gives the same result as one reading a float32 copy, without the copy.
"""

import numpy as np
from numba import types
from numba.extending import overload

BF16_BITS = np.uint16
F16_BITS = np.int16


def to_float32(value):  # pragma: no cover - replaced by the overload inside numba
    """Decode one stored element to float32 (usable only inside numba kernels)."""
    raise NotImplementedError("to_float32 is only callable from numba-compiled code")


def _f16_bits_to_float32(value):
    # the parameter name must match to_float32's for numba's overload
    h = np.uint32(value) & np.uint32(0xFFFF)
    sign = (h >> np.uint32(15)) << np.uint32(31)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    if exponent == 0:
        # zero or subnormal: mantissa * 2**-24 is exact in float32
        magnitude = np.float32(mantissa) * np.float32(5.9604644775390625e-08)
        return np.uint32(np.float32(magnitude).view(np.uint32) | sign).view(np.float32)
    if exponent == 31:
        return np.uint32(sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13))).view(np.float32)
    return np.uint32(
        sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))
    ).view(np.float32)


@overload(to_float32, inline="always")
def _to_float32_overload(value):
    if value == types.float32:
        return lambda value: value
    if value == types.uint16:
        return lambda value: np.uint32(np.uint32(value) << np.uint32(16)).view(np.float32)
    if value == types.int16:
        return _f16_bits_to_float32
    return None


def source_index(perm, index):  # pragma: no cover - replaced by the overload inside numba
    """The source row/column of stored index ``index``: ``perm[index]``, or itself when perm is None."""
    raise NotImplementedError("source_index is only callable from numba-compiled code")


@overload(source_index, inline="always")
def _source_index_overload(perm, index):
    # Resolved at compile time: the identity path has no index load at all.
    if isinstance(perm, types.NoneType):
        return lambda perm, index: index
    return lambda perm, index: perm[index]
