"""Element decoding for kernels that read float32, bfloat16 or float16 storage directly.

Numba has no 16-bit float arrays, so a 16-bit tensor is handed over as its raw bits and
the integer type of that view says how to decode it: ``uint16`` is bfloat16, ``int16`` is
IEEE-754 binary16.  Decoding is exact (every bf16/f16 value is a float32 value), so a
kernel reading bits gives the same result as one reading a float32 copy, without the copy.
"""

import platform

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import config as numba_config
from numba.extending import intrinsic, overload

from qstrat.kernels.jit import kernel

BF16_BITS = np.uint16
F16_BITS = np.int16

#: float32 magnitudes (bits without the sign) from here up are infinity or NaN
FLOAT32_INFINITY_BITS = np.uint32(0x7F800000)


@kernel
def magnitude_bits(value):
    """The bits of float32 ``value`` without its sign: ordered as the magnitudes, NaN above
    infinity, so an integer max over them finds the largest magnitude and any NaN or infinity."""
    return np.uint32(np.float32(value).view(np.uint32) & np.uint32(0x7FFFFFFF))


def to_float32(value):  # pragma: no cover - replaced by the overload inside numba
    """Decode one stored element to float32 (usable only inside numba kernels)."""
    raise NotImplementedError("to_float32 is only callable from numba-compiled code")


_F16_EXPONENT_MASK = np.uint32(0x7C00)
# Shifted 13 bits up, binary16's exponent and mantissa read as a float32 are the value
# times 2**-112, for normal and subnormal numbers alike; the product below is exact.
_F16_REBIAS = np.float32(2.0**112)


def _f16_bits_to_float32(value):
    # the parameter name must match to_float32's for numba's overload.  Branch-free (the
    # infinity/NaN case is blended in with a mask), so that loops decoding float16 vectorise.
    h = np.uint32(value) & np.uint32(0xFFFF)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    magnitude_bits = (h & np.uint32(0x7FFF)) << np.uint32(13)
    finite = np.float32(np.uint32(magnitude_bits).view(np.float32) * _F16_REBIAS).view(np.uint32)
    special = magnitude_bits | np.uint32(0x7F800000)  # infinity, NaN
    is_special = np.uint32((h & _F16_EXPONENT_MASK) == _F16_EXPONENT_MASK)
    mask = np.uint32(0) - is_special
    return np.uint32((special & mask) | (finite & ~mask) | sign).view(np.float32)


def _host_converts_half() -> bool:
    """Whether the CPU numba compiles for converts binary16 to float32 in one (vectorisable)
    instruction: F16C on x86-64 (most CPUs since 2012), always on 64-bit ARM.

    Numba's own target is asked, not the host: with ``NUMBA_CPU_NAME=generic`` or explicit
    ``NUMBA_CPU_FEATURES`` (caches shared between machines), LLVM would otherwise emit a call
    to a conversion routine the JIT cannot resolve.
    """
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64"):
        return False
    features = numba_config.CPU_FEATURES
    if features is None:
        try:
            features = llvmlite.binding.get_host_cpu_features().flatten()
        except RuntimeError:  # features unknown: take the portable decode
            return False
    return "+f16c" in features.split(",")


@intrinsic
def _half_bits_to_float32(typingctx, bits):
    # LLVM's fpext from half: one vcvtph2ps per vector on x86 with F16C, exact for every value
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


def _f16_by_instruction(value):
    return _half_bits_to_float32(np.int16(value))


#: kernels decode float16 with the CPU's conversion when it has one, else with the bit arithmetic
_CONVERTS_HALF = _host_converts_half()
_F16_DECODE = _f16_by_instruction if _CONVERTS_HALF else _f16_bits_to_float32


@overload(to_float32)
def _to_float32_overload(value):
    if value == types.float32:
        return lambda value: value
    if value == types.uint16:
        return lambda value: np.uint32(np.uint32(value) << np.uint32(16)).view(np.float32)
    if value == types.int16:
        return _F16_DECODE
    return None


def finite_to_float32(value):  # pragma: no cover - replaced by the overload inside numba
    """``to_float32`` for an element known to be finite: float16 skips the infinity/NaN case."""
    raise NotImplementedError("finite_to_float32 is only callable from numba-compiled code")


def _finite_f16_bits_to_float32(value):
    h = np.uint32(value) & np.uint32(0xFFFF)
    magnitude = np.uint32((h & np.uint32(0x7FFF)) << np.uint32(13)).view(np.float32) * _F16_REBIAS
    return np.uint32(np.float32(magnitude).view(np.uint32) | ((h & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


@overload(finite_to_float32)
def _finite_to_float32_overload(value):
    if value == types.int16:
        return _f16_by_instruction if _CONVERTS_HALF else _finite_f16_bits_to_float32
    if value in (types.float32, types.uint16):
        return lambda value: to_float32(value)
    return None


def source_index(perm, index):  # pragma: no cover - replaced by the overload inside numba
    """The source row/column of stored index ``index``: ``perm[index]``, or itself when perm is None."""
    raise NotImplementedError("source_index is only callable from numba-compiled code")


@overload(source_index)
def _source_index_overload(perm, index):
    # Resolved at compile time: the identity path has no index load at all.
    if isinstance(perm, types.NoneType):
        return lambda perm, index: index
    return lambda perm, index: perm[index]


def order_key(value):  # pragma: no cover - replaced by the overload inside numba
    """A signed integer ordered like the stored element's (finite) value (numba only).

    Min/max reductions over these keys are integer reductions, which LLVM vectorises in
    numba (float ones it does not), and 16-bit inputs need no decoding for them:
    float32 gives an int32 key, bfloat16 and float16 bits an int16 key.
    """
    raise NotImplementedError("order_key is only callable from numba-compiled code")


def from_order_key(key, like):  # pragma: no cover - replaced by the overload inside numba
    """The float32 value of a key made by ``order_key`` from an element of ``like``'s type."""
    raise NotImplementedError("from_order_key is only callable from numba-compiled code")


# Every format here is sign-magnitude: flipping the magnitude bits of negative values makes
# the bits two's-complement ordered.  The map is its own inverse.
@overload(order_key)
def _order_key_overload(value):
    if value == types.float32:

        def float32_key(value):
            bits = np.float32(value).view(np.int32)
            # numba computes int32 arithmetic in int64: narrowing the key back keeps the
            # min/max reductions at 16 lanes per AVX-512 vector instead of 8
            return np.int32(bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))

        return float32_key
    if value in (types.uint16, types.int16):

        def half_key(value):
            bits = np.int16(value)
            return np.int16(bits ^ (np.int16(bits >> np.int16(15)) & np.int16(0x7FFF)))

        return half_key
    return None


@overload(from_order_key)
def _from_order_key_overload(key, like):
    if like == types.float32:

        def float32_value(key, like):
            bits = key ^ ((key >> np.int32(31)) & np.int32(0x7FFFFFFF))
            return np.int32(bits).view(np.float32)

        return float32_value
    if like in (types.uint16, types.int16):
        storage = like

        def half_value(key, like):
            bits = np.int16(key ^ (np.int16(key >> np.int16(15)) & np.int16(0x7FFF)))
            return to_float32(storage(bits))

        return half_value
    return None
