"""GGML's K-quant block types: quantize and dequantize kernels, byte-identical with
``ggml_quantize_chunk`` and ``dequantize_row_*_K`` (layouts: ``docs/formats.md``).

A super-block holds 256 consecutive values of one row (blocks never cross rows), cut into
sub-blocks of 16 or 32 values whose scales (and minimums) are themselves quantized against one
fp16 ``d`` (and ``dmin``).  Without an importance vector each block follows GGML's
``quantize_row_*_K_ref``; with one (``quant_weights``, one float per column) it follows
``quantize_row_*_K_impl``, whose weights are built from the block's own mean square.  Either way,
once the scales are stored the values are quantized again against the rounded scales, except in
sub-blocks whose rounded scale is zero: those keep the codes of the scale search, as in GGML.

All arithmetic is float32 in GGML's evaluation order, without fused multiply-add, and every
sequential float32 sum stays sequential (numba neither contracts nor reassociates without
``fastmath``).  The C code's narrowing stores (int to ``uint8_t`` / ``int8_t``) keep the low byte.
"""

import numpy as np
from numba import njit, prange
from qstrat.kernels.decode import finite_to_float32, to_float32
from qstrat.kernels.half import float32_to_f16_bits
from qstrat.kernels.layout import QK_K, U64
from qstrat.kernels.legacy import load_half, make_qx_quants, nearest_int, store_half

# Kernel codes of the types; the registry (qstrat.formats) maps names to them.
Q2_K = 0
Q3_K = 1
Q4_K = 2
Q5_K = 3
Q6_K = 4

#: bytes per 256-value block, by code
BLOCK_BYTES = (84, 110, 144, 176, 210)

# Q6_K: ql u8[128] (low nibbles), qh u8[64] (top two bits), scales i8[16], d fp16
_Q6_QH = 128
_Q6_SCALES = 192
_Q6_D = 208

_GROUP_MAX_EPS = np.float32(1e-15)  # GGML: a sub-block or block below this is all zeros
_BLOCKS_PER_TASK = 16  # blocks one parallel task quantizes with one set of scratch arrays


@njit(cache=True, inline="always")
def _low_byte(i):
    """What a C store of the int ``i`` into a uint8_t keeps."""
    return np.int64(i) & 0xFF


@njit(cache=True, inline="always")
def _signed_byte(i):
    """What a C store of the int ``i`` into an int8_t keeps."""
    return ((np.int64(i) & 0xFF) ^ 0x80) - 0x80


@njit(cache=True, inline="always")
def _half_value(out, b, offset):
    """The float32 value of the fp16 just stored at ``offset`` (GGML_FP16_TO_FP32 of y[i].d)."""
    return load_half(out, b, offset)


# --- Q6_K: 16 sub-blocks of 16, int8 scales, 6-bit codes


@njit(cache=True)
def _quantize_q6_k(xb, qw, out, b, codes, weight, scales):
    """quantize_row_q6_K_ref (qw None) / quantize_row_q6_K_impl (qw: the block's 256 weights)."""
    max_scale = np.float32(0.0)
    max_abs_scale = np.float32(0.0)
    for ib in range(16):
        x = xb[16 * ib : 16 * ib + 16]
        if qw is None:  # make_qx_quants with rmse_type 1 and no weights: w = x * x
            for j in range(16):
                weight[j] = x[j] * x[j]
            scale = make_qx_quants(x, weight[:16], 32, codes[16 * ib : 16 * ib + 16])
        else:  # GGML passes the importance vector itself (its sigma2 weighting is commented out)
            scale = make_qx_quants(x, qw[16 * ib : 16 * ib + 16], 32, codes[16 * ib : 16 * ib + 16])
        scales[ib] = scale
        abs_scale = abs(scale)
        if abs_scale > max_abs_scale:
            max_abs_scale = abs_scale
            max_scale = scale
    if max_abs_scale < _GROUP_MAX_EPS:
        out[b, :] = 0
        return
    iscale = np.float32(-128.0) / max_scale
    store_half(out, b, _Q6_D, np.float32(1.0) / iscale)
    d_all = _half_value(out, b, _Q6_D)
    for ib in range(16):
        out[b, _Q6_SCALES + ib] = np.uint8(_low_byte(min(127, nearest_int(iscale * scales[ib]))))
    for j in range(16):
        d = d_all * np.float32(_signed_byte(out[b, _Q6_SCALES + j]))
        if d == np.float32(0.0):  # C's `if (!d) continue`: NaN goes on
            continue
        for ii in range(16):
            l = nearest_int(xb[16 * j + ii] / d)
            codes[16 * j + ii] = max(-32, min(31, l)) + 32
    for half in range(2):
        j = 128 * half
        ql = 64 * half
        qh = _Q6_QH + 32 * half
        for l in range(32):
            c1 = codes[j + l]
            c2 = codes[j + l + 32]
            c3 = codes[j + l + 64]
            c4 = codes[j + l + 96]
            out[b, ql + l] = np.uint8((c1 & 0xF) | ((c3 & 0xF) << 4))
            out[b, ql + l + 32] = np.uint8((c2 & 0xF) | ((c4 & 0xF) << 4))
            out[b, qh + l] = np.uint8(_low_byte((c1 >> 4) | ((c2 >> 4) << 2) | ((c3 >> 4) << 4) | ((c4 >> 4) << 6)))


@njit(cache=True)
def _dequantize_q6_k(blocks, b, y):
    d = load_half(blocks, b, _Q6_D)
    for half in range(2):
        ql = 64 * half
        qh = _Q6_QH + 32 * half
        sc = _Q6_SCALES + 8 * half
        base = 128 * half
        for l in range(32):
            s = sc + l // 16
            h = np.int64(blocks[b, qh + l])
            lo = np.int64(blocks[b, ql + l])
            hi = np.int64(blocks[b, ql + l + 32])
            q1 = ((lo & 0xF) | (((h >> 0) & 3) << 4)) - 32
            q2 = ((hi & 0xF) | (((h >> 2) & 3) << 4)) - 32
            q3 = ((lo >> 4) | (((h >> 4) & 3) << 4)) - 32
            q4 = ((hi >> 4) | (((h >> 6) & 3) << 4)) - 32
            # d * sc[is] * q, left to right
            y[base + l] = d * np.float32(np.int8(blocks[b, s])) * np.float32(q1)
            y[base + l + 32] = d * np.float32(np.int8(blocks[b, s + 2])) * np.float32(q2)
            y[base + l + 64] = d * np.float32(np.int8(blocks[b, s + 4])) * np.float32(q3)
            y[base + l + 96] = d * np.float32(np.int8(blocks[b, s + 6])) * np.float32(q4)


# --- driver


@njit(cache=True)
def _quantize_block(xb, qtype, qw, out, b, codes, weight, scales):
    if qtype == Q6_K:
        _quantize_q6_k(xb, qw, out, b, codes, weight, scales)


@njit(parallel=True, cache=True, nogil=True)
def quantize_rows_kquants(x, qtype, out, quant_weights=None):
    """Quantize every row of ``x`` (rows, k), k % 256 == 0, to K-quant code ``qtype`` into
    ``out`` (rows * k // 256, BLOCK_BYTES[qtype]) uint8, C-contiguous, blocks in row-major order.

    ``x`` is float32, or raw bfloat16 (uint16) / float16 (int16) bits.  ``quant_weights`` (k,)
    float32, finite and >= 0, selects GGML's weighted quantization.  Returns the number of
    blocks holding a NaN or infinity (zeroed; the caller refuses them).
    """
    rows, k = x.shape
    blocks_per_row = k // QK_K
    n_blocks = rows * blocks_per_row
    non_finite = 0
    for task in prange((n_blocks + _BLOCKS_PER_TASK - 1) // _BLOCKS_PER_TASK):
        xb = np.empty(QK_K, dtype=np.float32)
        codes = np.empty(QK_K, dtype=np.int64)
        weight = np.empty(32, dtype=np.float32)
        scales = np.empty(16, dtype=np.float32)
        for b in range(task * _BLOCKS_PER_TASK, min(n_blocks, (task + 1) * _BLOCKS_PER_TASK)):
            r = b // blocks_per_row
            start = (b - r * blocks_per_row) * QK_K
            bad = np.uint32(0)
            for j in range(QK_K):
                bits = np.float32(to_float32(x[r, start + j])).view(np.uint32)
                bad |= np.uint32((bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
            if bad:
                out[b, :] = 0
                non_finite += 1
                continue
            for j in range(QK_K):
                xb[j] = finite_to_float32(x[r, start + j])
            if quant_weights is None:
                _quantize_block(xb, qtype, None, out, b, codes, weight, scales)
            else:
                _quantize_block(xb, qtype, quant_weights[start : start + QK_K], out, b, codes, weight, scales)
    return non_finite


@njit(parallel=True, cache=True, nogil=True)
def dequantize_blocks_kquants(blocks, qtype, out):
    """Dequantize ``blocks`` (n, BLOCK_BYTES[qtype]) uint8 into ``out`` (n, 256) float32, as
    GGML's dequantize_row_*_K."""
    for b in prange(blocks.shape[0]):
        if qtype == Q6_K:
            _dequantize_q6_k(blocks, b, out[b])
