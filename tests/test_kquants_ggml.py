"""K-quant block types (256-value super-blocks) against GGML itself (libggml-python through
ctypes) and gguf-py."""

import gguf
import numpy as np
import pytest

import qstrat
from qstrat.errors import NonFiniteError
from qstrat.formats import block_type
from qstrat.kernels import kquants
from qstrat.reference import ggml_dequantize_row, ggml_quantize_chunk
from tests.test_formats_ggml import bf16_bits_to_f32, edge_rows, f32_to_bf16_bits, importance

KQUANTS = ["q6_k", "q4_k", "q5_k", "q3_k", "q2_k"]
K = 512  # two super-blocks per row


def kquant_rows(k=K, seed=0):
    """The shared edge rows plus the K-quants' own: super-block scales that are subnormal
    halves, and sub-blocks whose quantized scale rounds to zero inside a non-zero block."""
    names, rows = edge_rows(k, seed)
    rng = np.random.default_rng(seed + 10)
    normal = rng.standard_normal(k)
    column = np.arange(k)
    extra = {
        "fp16-subnormal d (1e-2)": normal * 1e-2,
        "fp16-subnormal d (1e-3)": normal * 1e-3,
        "small sub-block inside": np.where((column >= 32) & (column < 64), normal * 1e-3, normal),
        "small sub-blocks": normal * np.repeat(10.0 ** -rng.integers(0, 5, k // 16), 16),
        "one sub-block only": np.where((column >= 256) & (column < 272), normal, 0.0),
        "negative only": -np.abs(normal) - 0.5,
        "two levels": np.where(normal > 0, 0.25, -0.125),
    }
    return names + list(extra), np.concatenate([rows, np.array(list(extra.values()), dtype=np.float32)])


NAMES, ROWS = kquant_rows()


def _assert_rows_equal(got, expected, names=NAMES):
    assert got.shape == expected.shape
    differing = [names[r] for r in np.nonzero((got != expected).any(axis=1))[0]]
    assert not differing, f"rows differ from GGML: {differing}"


def _ggml(name, x, imatrix=None):
    return ggml_quantize_chunk(int(block_type(name).ggml_type), x, imatrix)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", KQUANTS)
def test_quantize_matches_ggml_quantize_chunk(name, weighted):
    imatrix = importance(K) if weighted else None
    _assert_rows_equal(qstrat.quantize(ROWS, name, imatrix=imatrix), _ggml(name, ROWS, imatrix))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", KQUANTS)
def test_quantize_matches_ggml_on_many_blocks(name, weighted):
    # rows over eleven decades of scale, sub-blocks over three more; a quarter of the rows
    # rounded to multiples of 1/4 (ties), an eighth bf16-rounded model-like rows
    rng = np.random.default_rng(2)
    k = 2048
    x = rng.standard_t(3.0, (96, k)) * 10.0 ** rng.uniform(-8, 3, (96, 1))
    x *= np.repeat(10.0 ** rng.uniform(-3, 0, (96, k // 16)), 16, axis=1)
    x[::4] = np.round(x[::4] * 4) / 4
    x[1::8] = bf16_bits_to_f32(f32_to_bf16_bits(rng.standard_normal((12, k)) * 0.02))
    x = x.astype(np.float32)
    imatrix = (rng.standard_normal(k) ** 2).astype(np.float32) if weighted else None
    assert np.array_equal(qstrat.quantize(x, name, imatrix=imatrix), _ggml(name, x, imatrix))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", KQUANTS)
def test_16bit_inputs_give_the_bytes_of_their_float32_values(name, weighted):
    imatrix = importance(K) if weighted else None
    half = np.clip(ROWS, -60000, 60000).astype(np.float16)
    _assert_rows_equal(qstrat.quantize(half, name, imatrix), _ggml(name, half.astype(np.float32), imatrix))
    bits = f32_to_bf16_bits(ROWS)  # bfloat16 reaches the kernels as uint16 bits
    _assert_rows_equal(block_type(name).quantize_rows(bits, imatrix), _ggml(name, bf16_bits_to_f32(bits), imatrix))


def test_a_non_finite_16bit_value_is_named_by_its_index():
    # 16-bit rows reach the kernels undecoded; the block holding the NaN is found there
    half = np.clip(ROWS, -60000, 60000).astype(np.float16)
    half[-1, 300] = np.nan
    with pytest.raises(NonFiniteError, match=rf"index \({len(ROWS) - 1}, 300\).*q5_k"):
        qstrat.quantize(half, "q5_k")


@pytest.mark.parametrize("name", KQUANTS)
def test_dequantize_matches_ggml_and_gguf_py(name):
    entry = block_type(name)
    blocks = np.concatenate([_ggml(name, ROWS, w) for w in (None, importance(K))])
    got = qstrat.dequantize(blocks, name)
    assert np.array_equal(got.view(np.uint32), ggml_dequantize_row(name.replace("_k", "_K"), blocks, K).view(np.uint32))
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 from the 1e30 row: NaN in all three
        np.testing.assert_array_equal(got, gguf.quants.dequantize(blocks, entry.ggml_type))
    # every byte pattern too (GGML never writes some of them, but any file may hold them);
    # d and dmin kept finite: one bit of each fp16 exponent cleared
    noise = np.random.default_rng(3).integers(0, 256, (64, blocks.shape[1]), dtype=np.uint8)
    for offset in HALF_OFFSETS[name]:
        noise[:, offset + 1 :: entry.type_size] &= 0xFB
    expected = ggml_dequantize_row(name.replace("_k", "_K"), noise, K)
    assert np.array_equal(qstrat.dequantize(noise, name).view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(qstrat.dequantize(noise, name), gguf.quants.dequantize(noise, entry.ggml_type))


#: byte offsets of each type's fp16 scales (d, dmin) inside a block
HALF_OFFSETS = {"q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", KQUANTS)
def test_edge_rows_exercise_what_they_claim(name, weighted):
    # in GGML's own bytes: some super-block scales are subnormal halves, and some sub-blocks
    # with non-zero values have a zero quantized scale (GGML keeps their search codes)
    blocks = _ggml(name, ROWS, importance(K) if weighted else None).reshape(-1, block_type(name).type_size)
    d = blocks[:, HALF_OFFSETS[name][0] :][:, :2].copy().view(np.float16).ravel()
    assert np.any((d != 0) & (np.abs(d) < np.finfo(np.float16).smallest_normal))
    values = ROWS.reshape(-1, QK_SUB[name])
    scale_zero = SUB_SCALES[name](blocks).ravel() == 0
    assert np.any(scale_zero & (np.abs(values).max(axis=1) > 0))


def _q6_k_sub_scales(blocks):
    return blocks[:, 192:208].view(np.int8)


def _k4_sub_scales(blocks):
    # get_scale_min_k4's scales: the low 6 bits of bytes 4..8, then nibbles of 12..16 with bits 6-7 of 4..8
    packed = blocks[:, 4:16].astype(np.int64)
    low = packed[:, 0:4] & 63
    high = (packed[:, 8:12] & 0xF) | ((packed[:, 0:4] >> 6) << 4)
    return np.concatenate([low, high], axis=1)


def _q3_k_sub_scales(blocks):
    # 6-bit scales stored with a +32 offset: a zero d * (sc - 32) is sc == 32
    packed = blocks[:, 96:108].astype(np.int64)
    low = np.concatenate([packed[:, 0:8] & 0xF, packed[:, 0:8] >> 4], axis=1)
    j = np.arange(16)
    high = (packed[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


def _q2_k_sub_scales(blocks):
    return blocks[:, 0:16] & 0xF


QK_SUB = {"q6_k": 16, "q4_k": 32, "q5_k": 32, "q3_k": 16, "q2_k": 16}
SUB_SCALES = {
    "q6_k": _q6_k_sub_scales, "q4_k": _k4_sub_scales, "q5_k": _k4_sub_scales, "q3_k": _q3_k_sub_scales,
    "q2_k": _q2_k_sub_scales,
}


def _nearest_int(v):
    """GGML's nearest_int on float32 values: ties to even through the bits of v + 1.5 * 2**23."""
    return ((np.asarray(v, dtype=np.float32) + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000


def _q6_k_codes(blocks):
    """The 256 six-bit codes (l + 32) of each Q6_K block: low nibbles in ql, top two bits in qh."""
    ql, qh = blocks[:, :128].astype(np.int64), blocks[:, 128:192].astype(np.int64)
    half, rest = np.divmod(np.arange(kquants.QK_K), 128)
    group, lane = np.divmod(rest, 32)
    low = (ql[:, 64 * half + lane + 32 * (group % 2)] >> (4 * (group // 2))) & 0xF
    return low | (((qh[:, 32 * half + lane] >> (2 * group)) & 3) << 4)


def _q6_k_value_scales(blocks):
    """Each value's stored scale d * sc (float32, as GGML computes it), shape (blocks, 256)."""
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
    return np.repeat(d * _q6_k_sub_scales(blocks).astype(np.float32), 16, axis=1)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
def test_q6_k_requantizes_by_dividing_by_the_stored_scale(weighted):
    # quantize_row_q6_K_ref / _impl quantize every value again as nearest_int(x / d), d its
    # sub-block's stored scale; nearest_int(x * (1 / d)) differs in float32 for some x within a
    # few ulps of a boundary (l + 1/2) d.  Rows each holding one such x, found against GGML's own
    # d, catch either form written for the other.
    imatrix = importance(kquants.QK_K) if weighted else None
    x = (np.random.default_rng(5).standard_normal(kquants.QK_K) * 0.02).astype(np.float32)
    d = _q6_k_value_scales(_ggml("q6_k", x[None], imatrix))[0]
    boundary = ((np.floor(x / d) + np.float32(0.5)) * d).astype(np.float32)
    rows = []
    for ulps in range(-6, 7):  # each value's first boundary neighbour where the forms differ
        near = (boundary.view(np.int32) + np.int32(ulps)).view(np.float32)
        differ = _nearest_int(near / d) != _nearest_int(near * (np.float32(1.0) / d))
        for i in np.nonzero(differ & (np.abs(boundary / d) < 31))[0]:
            if all(row[1] != i for row in rows):
                rows.append((near[i], i))
    y = np.repeat(x[None], len(rows), axis=0)
    y[np.arange(len(rows)), [i for _, i in rows]] = [v for v, _ in rows]
    expected = _ggml("q6_k", y, imatrix)
    # the rows test what they claim: GGML's code for the changed value is the quotient's, not the product's
    index = np.array([i for _, i in rows])
    changed, scale = y[np.arange(len(rows)), index], _q6_k_value_scales(expected)[np.arange(len(rows)), index]
    by_division = np.clip(_nearest_int(changed / scale), -32, 31) + 32
    by_product = np.clip(_nearest_int(changed * (np.float32(1.0) / scale)), -32, 31) + 32
    live = (_q6_k_codes(expected)[np.arange(len(rows)), index] == by_division) & (by_division != by_product)
    assert live.sum() >= 5, f"only {live.sum()} of {len(rows)} rows tell x / d from x * (1 / d)"
    _assert_rows_equal(qstrat.quantize(y, "q6_k", imatrix=imatrix), expected, [f"x[{i}] = {v!r}" for v, i in rows])


def test_layout_constants_are_gguf_sizes():
    for name in KQUANTS:
        code = getattr(kquants, name.upper())
        assert (kquants.QK_K, kquants.BLOCK_BYTES[code]) == gguf.GGML_QUANT_SIZES[block_type(name).ggml_type]
