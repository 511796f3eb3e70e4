"""Bit-exactness of the Q8K kernels against the reference vectors and the real GGML library."""

import numpy as np
import pytest

import qstrat
from qstrat.blocks import quantize_rows
from qstrat.errors import InputError, NonFiniteError
from qstrat.reference import ggml_quantize_q8k

VECTOR_KEYS = {"candle": "candle", "candle-0.9": "candle_0_9", "ggml": "ggml"}


def f32_to_bf16_bits(x):
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def test_variant_names():
    assert qstrat.Q8K_VARIANTS == ("candle", "candle-0.9", "ggml")


@pytest.mark.parametrize("variant", list(VECTOR_KEYS))
def test_reference_vectors_byte_identical(reference_vectors, variant):
    x = reference_vectors["x"]
    expected = reference_vectors[VECTOR_KEYS[variant]]
    got = qstrat.quantize_blocks(x, variant=variant)
    assert got.shape == expected.shape
    mismatched = np.nonzero((got != expected).any(axis=1))[0]
    assert mismatched.size == 0, f"{variant}: blocks {mismatched[:10]} differ"


@pytest.mark.parametrize("variant", list(VECTOR_KEYS))
def test_reference_vectors_as_rows(reference_vectors, variant):
    # The same blocks laid out as rows of 4 blocks must give the same bytes in row-major order.
    x = reference_vectors["x"][:2108]
    expected = reference_vectors[VECTOR_KEYS[variant]][:2108]
    got = qstrat.quantize_blocks(x.reshape(-1, 4 * 256), variant=variant)
    assert np.array_equal(got, expected)


def _random_blocks(rng, n_blocks):
    """Blocks of several distributions over scales 1e-6..1e4, with exact-tie blocks."""
    scale = 10.0 ** rng.uniform(-6, 4, size=(n_blocks, 1))
    kind = rng.integers(0, 4, size=(n_blocks, 1))
    normal = rng.standard_normal((n_blocks, 256))
    heavy = rng.standard_t(2.5, size=(n_blocks, 256))
    uniform = rng.uniform(-1, 1, size=(n_blocks, 256))
    # integers of [-127, 127] with max 127: scaling by -127/max is exact, many .5 ties appear
    ties = rng.integers(-254, 255, size=(n_blocks, 256)) / 2.0
    # both +127 and -127 present, either first: the first of largest magnitude sets d's sign
    first_sign = rng.choice([-1.0, 1.0], size=n_blocks)
    ties[:, 0] = 127.0 * first_sign
    ties[np.arange(n_blocks), rng.integers(1, 256, size=n_blocks)] = -127.0 * first_sign
    x = np.select([kind == 0, kind == 1, kind == 2], [normal, heavy, uniform], ties) * scale
    return x.astype(np.float32)


def test_ggml_variant_matches_libggml_float32():
    rng = np.random.default_rng(20261128)
    x = _random_blocks(rng, 8192)  # 2.1 million values
    assert np.array_equal(qstrat.quantize_blocks(x, "ggml"), ggml_quantize_q8k(x))


def test_ggml_variant_matches_libggml_bf16_read_directly():
    rng = np.random.default_rng(7)
    bits = f32_to_bf16_bits(_random_blocks(rng, 8192))
    got = quantize_rows(bits.reshape(-1, 256 * 4), "ggml")  # uint16 storage = bfloat16
    assert np.array_equal(got, ggml_quantize_q8k(bf16_bits_to_f32(bits)))


def test_ggml_variant_matches_libggml_f16_read_directly():
    rng = np.random.default_rng(11)
    x = _random_blocks(rng, 8192)
    half = np.clip(x, -60000, 60000).astype(np.float16)
    # include subnormal halves
    half[:8] = (rng.standard_normal((8, 256)) * 1e-6).astype(np.float16)
    got = qstrat.quantize_blocks(half.reshape(-1, 512), "ggml")
    assert np.array_equal(got, ggml_quantize_q8k(half.astype(np.float32)))


@pytest.mark.parametrize("variant", list(VECTOR_KEYS))
def test_dequantize_within_half_step(variant):
    rng = np.random.default_rng(3)
    x = _random_blocks(rng, 512)
    blocks = qstrat.quantize_blocks(x, variant)
    y = qstrat.dequantize_blocks(blocks)
    step = np.abs(blocks[:, :4].copy().view(np.float32))
    # half a step per element, plus a few float32 roundings of d and of d * q
    tolerance = 0.5 * step + 4 * np.finfo(np.float32).eps * np.abs(x)
    within = np.abs(y - x) <= tolerance
    if variant == "candle-0.9":
        # -128/max maps the opposite-sign extreme to +128, clamped to 127: one full step, by design
        clamped = x * np.sign(-x[np.arange(len(x)), np.abs(x).argmax(axis=1)])[:, None] / step > 127.5
        assert clamped.any()
        assert np.all(np.abs(y - x)[clamped] <= step.repeat(256, axis=1)[clamped] * 1.0001)
        within |= clamped
    assert within.all()


@pytest.mark.parametrize("variant", list(VECTOR_KEYS))
def test_fused_gather_equals_quantizing_the_permuted_copy(variant):
    rng = np.random.default_rng(5)
    x = _random_blocks(rng, 64).reshape(16, 1024)
    perm = rng.permutation(1024)
    expected = qstrat.quantize_blocks(np.ascontiguousarray(x[:, perm]), variant)
    assert np.array_equal(quantize_rows(x, variant, col_perm=perm), expected)
    bits = f32_to_bf16_bits(x)
    expected = qstrat.quantize_blocks(np.ascontiguousarray(bf16_bits_to_f32(bits)[:, perm]), variant)
    assert np.array_equal(quantize_rows(bits, variant, col_perm=perm), expected)


def test_fused_row_and_column_gather():
    rng = np.random.default_rng(6)
    x = _random_blocks(rng, 64).reshape(32, 512)
    rows, cols = rng.permutation(32), rng.permutation(512)
    expected = qstrat.quantize_blocks(np.ascontiguousarray(x[rows][:, cols]))
    assert np.array_equal(quantize_rows(x, row_perm=rows, col_perm=cols), expected)


def test_tiny_blocks_are_ggmls_and_dequantize_to_zeros():
    # 127 / |max| overflows float32: GGML's d is 1 / iscale, a zero whose sign is max's opposite (qstrat
    # wrote +0 for both signs), and its quants all zero
    x = np.zeros((6, 256), dtype=np.float32)
    x[0, 5] = 1e-38
    x[1, 5] = -1e-38
    x[2, 0], x[2, 9] = 1e-37, -3e-38
    x[3, 200] = -np.float32(1e-45)  # subnormal
    x[4, :] = np.float32(2e-38) * np.arange(256, dtype=np.float32) / 256
    x[5, 7] = 1e-36  # 127 / 1e-36 is finite: an ordinary block next to the tiny ones
    assert np.array_equal(qstrat.quantize_blocks(x, "ggml"), ggml_quantize_q8k(x))
    assert np.array_equal(qstrat.quantize(x, "q8_k"), ggml_quantize_q8k(x).reshape(6, -1))
    for variant in qstrat.Q8K_VARIANTS:
        blocks = qstrat.quantize_blocks(x, variant)
        assert not blocks[:5, 4:].any()  # quants and sums
        assert not qstrat.dequantize_blocks(blocks[:5]).any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16"])
def test_non_finite_refused_with_index(bad, dtype):
    x = np.ones((3, 512), dtype=np.float32)
    x[2, 300] = bad
    x[2, 301] = -bad  # the first one is named, whatever its sign
    with pytest.raises(NonFiniteError, match=r"index \(2, 300\)"):
        if dtype == "bfloat16":
            quantize_rows(f32_to_bf16_bits(x))  # uint16 storage = bfloat16
        else:
            qstrat.quantize_blocks(x.astype(dtype))


def test_a_non_finite_value_of_a_1d_array_is_named_by_its_own_index():
    x = np.zeros(512, dtype=np.float32)
    x[300] = np.nan
    with pytest.raises(NonFiniteError, match=r"index \(300,\)"):  # it said (0, 300)
        qstrat.quantize_blocks(x)


def test_every_float16_value_decodes_exactly():
    # all 63,488 finite binary16 bit patterns, subnormals included, in shuffled blocks
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    half = bits.view(np.float16)
    half = half[np.isfinite(half)]
    half = np.random.default_rng(3).permutation(np.concatenate([half, np.zeros(-half.size % 256, np.float16)]))
    got = qstrat.quantize_blocks(half.reshape(-1, 256), "ggml")
    assert np.array_equal(got, ggml_quantize_q8k(half.astype(np.float32).reshape(-1, 256)))


@pytest.mark.parametrize("decoder", ["_f16_by_instruction", "_f16_bits_to_float32", "_finite_f16_bits_to_float32"])
def test_both_float16_decoders_on_every_bit_pattern(decoder):
    # kernels take the CPU's conversion where it exists and the bit arithmetic elsewhere:
    # whichever this machine uses, both are checked here
    import numba

    from qstrat.kernels import decode

    if decoder == "_f16_by_instruction" and decode._F16_DECODE is not decode._f16_by_instruction:
        pytest.skip("this CPU has no float16 conversion instruction")
    convert = numba.njit(getattr(decode, decoder))

    @numba.njit
    def decode_all(bits, out):
        for i in range(bits.size):
            out[i] = convert(bits[i])

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    out = np.empty(bits.size, np.float32)
    decode_all(bits, out)
    expected = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(expected)
    assert np.array_equal(out[finite].view(np.uint32), expected[finite].view(np.uint32))
    if decoder != "_finite_f16_bits_to_float32":  # the finite-only decode may do anything else
        assert np.array_equal(np.isnan(out), np.isnan(expected)) and np.array_equal(out[np.isinf(expected)], expected[np.isinf(expected)])


def test_float16_decode_follows_numbas_target_not_the_host():
    # a generic target (caches shared between machines) has no F16C: the instruction would
    # become a call the JIT cannot resolve, so the bit decode must be chosen
    import os
    import subprocess
    import sys

    check = "from qstrat.kernels import decode; print(decode._F16_DECODE.__name__)"
    env = {**os.environ, "NUMBA_CPU_NAME": "generic"}
    chosen = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == "_f16_bits_to_float32"


def test_bad_shapes_and_variants():
    with pytest.raises(InputError, match="multiple of 256"):
        qstrat.quantize_blocks(np.ones((2, 100), dtype=np.float32))
    with pytest.raises(InputError, match="unknown Q8K variant"):
        qstrat.quantize_blocks(np.ones((1, 256), dtype=np.float32), variant="q8_0")
    with pytest.raises(InputError, match="cannot quantize dtype"):
        qstrat.quantize_blocks(np.ones((1, 256), dtype=np.float64))
    with pytest.raises(InputError, match=r"\(n, 292\)"):
        qstrat.dequantize_blocks(np.zeros((1, 291), dtype=np.uint8))
    with pytest.raises(InputError, match="positive multiple of 256"):
        qstrat.quantize_blocks(np.zeros(0, dtype=np.float32))
    assert qstrat.quantize_blocks(np.zeros((0, 256), dtype=np.float32)).shape == (0, 292)  # no rows, no blocks
    x = np.ones((2, 2, 512), dtype=np.float32)
    x[1, 0, 400] = np.nan
    with pytest.raises(NonFiniteError, match=r"shape \(2, 2, 512\) holds a non-finite value at index \(1, 0, 400\)"):
        qstrat.quantize_blocks(x)  # named in the array's own shape, not in its rows'
