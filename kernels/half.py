"""float32 -> binary16 / bfloat16 encoding, rounded exactly as GGML rounds, and the fp16 scales
of GGML's blocks stored and loaded.

GGML stores every legacy block scale with ``GGML_FP32_TO_FP16``: round to nearest, ties to
even, subnormal halves kept (not flushed), overflow to infinity, NaN to 0x7E00 with the sign
kept.  ``ggml_compute_fp32_to_bf16`` rounds to nearest even on the bits.  Here both are
integer arithmetic on the float32 bits, so no CPU conversion mode can change a result.
"""

import numpy as np
from numba import prange
from qstrat.kernels.decode import FLOAT32_INFINITY_BITS, magnitude_bits, to_float32
from qstrat.kernels.jit import kernel
from qstrat.kernels.layout import U64

# float32 bits thresholds for binary16 (bias 15) seen from float32 (bias 127)
_F16_INF_FROM = np.uint32(0x477FF000)  # 65520 = (65504 + 65536) / 2: a tie that rounds to the even infinity
_F16_NORMAL_FROM = np.uint32(0x38800000)  # 2**-14, the smallest normal half
_REBIAS = np.uint32((127 - 15) << 23)
_TWO_24 = np.float32(2.0**24)  # a subnormal half counts units of 2**-24
ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: x + magic - magic rounds ties to even


@kernel(inline="always")
def float32_to_f16_bits(value):
    """The binary16 bits (uint16) of float32 ``value`` as GGML_FP32_TO_FP16 gives them.  Every
    case is computed and one selected, without branches, so that loops over it vectorise."""
    bits = np.float32(value).view(np.uint32)
    sign = np.uint32((bits >> np.uint32(16)) & np.uint32(0x8000))
    magnitude = bits & np.uint32(0x7FFFFFFF)
    # normal half: drop 13 mantissa bits, ties to even; a carry into the exponent is the right
    # result (for smaller magnitudes the subtraction wraps, and the select below drops it)
    odd = (magnitude >> np.uint32(13)) & np.uint32(1)
    normal = np.uint32((magnitude - _REBIAS + np.uint32(0xFFF) + odd) >> np.uint32(13))
    # subnormal half (or zero): the magnitude in units of 2**-24 is exact in float32 (< 1024),
    # and the magic constant rounds it ties to even; 1024 is the smallest normal, as it should be
    units = np.uint32(min(magnitude, _F16_NORMAL_FROM)).view(np.float32) * _TWO_24
    subnormal = np.uint32((units + ROUND_MAGIC) - ROUND_MAGIC)
    half = subnormal if magnitude < _F16_NORMAL_FROM else normal
    half = np.uint32(0x7C00) if magnitude >= _F16_INF_FROM else half
    half = np.uint32(0x7E00) if magnitude > np.uint32(0x7F800000) else half  # NaN: GGML's quiet NaN, sign kept
    return np.uint16(sign | half)


@kernel(inline="always")
def float32_to_bf16_bits(value):
    """The bfloat16 bits (uint16) of finite float32 ``value``: round to nearest even, as GGML."""
    bits = np.float32(value).view(np.uint32)
    return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@kernel(inline="always")
def store_half_bits(out, b, offset, bits):
    """out[b, offset:offset + 2] = the fp16 ``bits`` (uint16), little-endian."""
    out[b, U64(offset)] = np.uint8(bits & np.uint16(0xFF))
    out[b, U64(offset + 1)] = np.uint8(bits >> np.uint16(8))


@kernel(inline="always")
def store_half(out, b, offset, value):
    """out[b, offset:offset + 2] = GGML_FP32_TO_FP16(value), little-endian; returns the float32
    value of what was stored (GGML_FP16_TO_FP32 of it)."""
    h = float32_to_f16_bits(value)
    store_half_bits(out, b, offset, h)
    return to_float32(np.int16(h))


@kernel(inline="always")
def load_half(blocks, b, offset):
    """The float32 value of the fp16 at blocks[b, offset:offset + 2]."""
    bits = np.uint16(blocks[b, U64(offset)]) | (np.uint16(blocks[b, U64(offset + 1)]) << np.uint16(8))
    return to_float32(np.int16(bits))


@kernel(parallel=True, nogil=True)
def encode_rows(x, out, bfloat16):
    """``out`` (rows, k) uint16 = the bfloat16 bits (``bfloat16``) or binary16 bits of every
    element of ``x`` (rows, k); returns how many rows hold NaN or infinity (the caller refuses
    them, so no scan is needed first)."""
    rows, k = x.shape
    non_finite = 0
    for r in prange(rows):
        largest = np.uint32(0)  # the largest magnitude's bits: a max reduction vectorises, a count did not
        for j in range(U64(k)):
            value = to_float32(x[r, j])
            out[r, j] = float32_to_bf16_bits(value) if bfloat16 else float32_to_f16_bits(value)
            largest = max(largest, magnitude_bits(value))
        non_finite += np.int64(largest >= FLOAT32_INFINITY_BITS)
    return non_finite


@kernel(parallel=True, nogil=True)
def decode_rows(x, out):
    """``out`` (rows, k) float32 = the values of ``x`` (rows, k) bfloat16 (uint16) or float16
    (int16) bits, exactly; on every core, in one pass (numpy's widening takes three)."""
    rows, k = x.shape
    for r in prange(rows):
        for j in range(U64(k)):
            out[r, j] = to_float32(x[r, j])


@kernel(parallel=True, nogil=True)
def count_overflowed_halves(blocks, offsets):
    """How many float16 fields of ``blocks`` (uint8, one block per row), each at a byte offset of
    ``offsets`` (int64) in its block, are infinite or NaN: exponent bits (all in the high byte)
    all set.  One pass on every core, for the block types' scales (numpy's masks of each field
    took a sixth of Q8_0's quantizing time and longer than F16's encoding)."""
    count = 0
    for b in prange(blocks.shape[0]):
        for j in range(offsets.shape[0]):
            count += np.int64((blocks[b, offsets[j] + 1] & 0x7C) == 0x7C)
    return count


@kernel(parallel=True, nogil=True)
def count_infinite_halves(bits):
    """How many of ``bits`` (uint16 binary16 values, contiguous) are infinite or NaN: F16's blocks,
    all halves, in a loop that vectorises (the per-block loop above took longer than F16's encoding)."""
    count = 0
    for i in prange(bits.shape[0]):
        count += np.int64((bits[i] & 0x7C00) == 0x7C00)
    return count
