"""GGUF block types against GGML itself (libggml-python through ctypes) and gguf-py."""

import re
import warnings

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import qstrat
from qstrat.errors import InputError, NonFiniteError, QstratError
from qstrat.formats import FORMATS, block_type
from qstrat.kernels import iq4nl, legacy
from qstrat.kernels.half import encode_rows
from qstrat.reference import ggml_dequantize_row, ggml_quantize_chunk, ggml_quantize_q8k

LEGACY = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
BLOCK32 = LEGACY + ["iq4_nl"]  # every 32-value type
K = 512


def f32_to_bf16_bits(x):
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def edge_rows(k=K, seed=0):
    """Named rows: model-like, heavy-tailed, and the edge cases of every block type."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal(k)
    rows = {
        "bf16-like": bf16_bits_to_f32(f32_to_bf16_bits(normal * 0.02)),
        "student-t": rng.standard_t(2.0, k) * 0.05,
        "zeros": np.zeros(k),
        "1e-30": np.full(k, 1e-30),
        "constant": np.full(k, 0.7),
        "negative constant": np.full(k, -3.0),
        "alternating": np.where(np.arange(k) % 2, 1.0, -1.0),
        "fp16-subnormal scale": normal * 1e-4,  # d ~ 2e-6 .. 4e-5: subnormal halves
        "scale underflows fp16": normal * 1e-7,  # d ~ 2e-9 .. 4e-8: rounds to 0 or the smallest half
        "inverse scale overflows": normal * 1e-38,  # 1/d is infinite in float32
        "one huge value": np.where(np.arange(k) == 37, 1e30, normal),
        "one large value": np.where(np.arange(k) == 300, -4e4, normal),
        "zero block inside": np.where((np.arange(k) >= 64) & (np.arange(k) < 96), 0.0, normal),
        "tiny block inside": np.where((np.arange(k) >= 96) & (np.arange(k) < 128), 1e-20, normal),
        "positive only": np.abs(normal) + 1.0,
    }
    # exact ties: Q8_0 with max 127 (d = 1) and Q4_0/Q5_0 with max -8 / -16 rescale by 1
    halves = rng.integers(-254, 255, k) / 2.0
    halves[::32] = 127.0
    rows["ties at 127"] = halves
    eighths = rng.integers(-16, 16, k) / 2.0
    eighths[::32] = -8.0
    rows["ties at -8"] = eighths
    sixteenths = rng.integers(-32, 32, k) / 2.0
    sixteenths[::32] = -16.0
    rows["ties at -16"] = sixteenths
    # +0 and -0 mixed: GGML keeps the first zero it meets as a block's min (max), sign and all;
    # by block, zeros only, positives among them, negatives among them
    zeros = np.where(rng.random(k) < 0.5, 0.0, -0.0)
    kind = (np.arange(k) // 32) % 3
    some = rng.random(k) < 0.5
    signed = np.where((kind == 1) & some, np.abs(normal), zeros)
    rows["signed zeros"] = np.where((kind == 2) & some, -np.abs(normal), signed)
    return list(rows), np.array(list(rows.values()), dtype=np.float32)


NAMES, ROWS = edge_rows()


def importance(k=K, seed=1):
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.0, 3.0, k).astype(np.float32)
    weights[::17] = 0.0  # zero weights occur in real imatrix files
    return weights


def _assert_rows_equal(got, expected, names=NAMES):
    assert got.shape == expected.shape
    differing = [names[r] for r in np.nonzero((got != expected).any(axis=1))[0]]
    assert not differing, f"rows differ from GGML: {differing}"


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", BLOCK32)
def test_quantize_matches_ggml_quantize_chunk(name, weighted):
    imatrix = importance() if weighted else None
    expected = ggml_quantize_chunk(int(block_type(name).ggml_type), ROWS, imatrix)
    _assert_rows_equal(qstrat.quantize(ROWS, name, imatrix=imatrix), expected)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", BLOCK32)
def test_quantize_matches_ggml_on_many_blocks(name, weighted):
    # rows over eleven decades of scale; a quarter rounded to multiples of 1/4 (many ties)
    rng = np.random.default_rng(2)
    k = 2048
    x = (rng.standard_t(3.0, (96, k)) * 10.0 ** rng.uniform(-8, 3, (96, 1))).astype(np.float32)
    x[::4] = np.round(x[::4] * 4) / 4
    imatrix = (rng.standard_normal(k) ** 2).astype(np.float32) if weighted else None
    expected = ggml_quantize_chunk(int(block_type(name).ggml_type), x, imatrix)
    assert np.array_equal(qstrat.quantize(x, name, imatrix=imatrix), expected)


#: every GGML weight type; their searches are where a block can divide by zero
WEIGHT_TYPES = BLOCK32 + ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def searches_dividing_by_zero(rows=48, k=256, seed=3):
    """Normal rows with, at rows that fall to different threads, blocks where GGML's searches divide
    by zero or overflow float32 (C gives inf or NaN and goes on), and the importance vector that
    makes the first kind: weight only on the columns where those rows are zero."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k))
    weighted_zeros = np.arange(k) % 8 == 3
    imatrix = np.where(weighted_zeros, rng.uniform(0.5, 2.0, k), 0.0).astype(np.float32)
    # values <= 0, weighted only where 0: a trial moves the min to 0 while the max is 0
    x[5] = np.where(weighted_zeros, 0.0, -np.abs(x[5]) * 50.0)
    x[23] = np.where(weighted_zeros, 0.0, -np.abs(x[23]))
    x[31] = x[31] * 1e12  # Q6_K's sums of squares overflow
    x[40] = np.clip(x[40] * 2e38, -3.4e38, 3.4e38)  # max - min overflows
    x[47] = np.where(weighted_zeros, 0.0, -np.abs(x[47]) * 1e-3)
    return x.astype(np.float32), imatrix


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", WEIGHT_TYPES)
def test_blocks_whose_search_divides_by_zero_are_ggmls(name, weighted):
    """Such blocks used to raise inside the kernel: a SystemError, or, on a worker thread, no error
    and the rows that thread had not yet written returned as garbage."""
    x, imatrix = searches_dividing_by_zero()
    imatrix = imatrix if weighted else None
    expected = ggml_quantize_chunk(int(block_type(name).ggml_type), x, imatrix)
    got = qstrat.quantize(x, name, imatrix=imatrix)
    differing = np.nonzero((got != expected).any(axis=1))[0]
    assert not differing.size, f"rows differ from GGML: {differing.tolist()}"


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", BLOCK32)
def test_16bit_inputs_give_the_bytes_of_their_float32_values(name, weighted):
    imatrix = importance() if weighted else None
    ggml_type = int(block_type(name).ggml_type)
    half = np.clip(ROWS, -60000, 60000).astype(np.float16)
    _assert_rows_equal(qstrat.quantize(half, name, imatrix), ggml_quantize_chunk(ggml_type, half.astype(np.float32), imatrix))
    # bfloat16 reaches the kernels as uint16 bits (ml_dtypes.bfloat16 arrays are viewed so)
    bits = f32_to_bf16_bits(ROWS)
    got = block_type(name).quantize_rows(bits, imatrix)
    _assert_rows_equal(got, ggml_quantize_chunk(ggml_type, bf16_bits_to_f32(bits), imatrix))


@pytest.mark.parametrize("name", BLOCK32)
def test_dequantize_matches_ggml_and_gguf_py(name):
    ggml_type = block_type(name).ggml_type
    blocks = np.concatenate([ggml_quantize_chunk(int(ggml_type), ROWS, w) for w in (None, importance())])
    got = qstrat.dequantize(blocks, name)
    expected = ggml_dequantize_row(name, blocks, K)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    # a scale that overflowed fp16 (the 1e30 row) gives inf * 0 = NaN in all three; NaNs are equal here
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(got, gguf.quants.dequantize(blocks, ggml_type))
    # every byte pattern too (GGML never writes some of them, but any file may hold them)
    noise = np.random.default_rng(3).integers(0, 256, (64, blocks.shape[1]), dtype=np.uint8)
    for high_byte in (1, 3):  # keep d (and m) finite: clear a bit of each fp16 exponent
        noise[:, high_byte :: block_type(name).type_size] &= 0xFB
    expected = ggml_dequantize_row(name, noise, K)
    assert np.array_equal(qstrat.dequantize(noise, ggml_type).view(np.uint32), expected.view(np.uint32))


def test_iq4_nl_edge_blocks_and_both_scale_signs():
    # rows of a length that is not a multiple of 256: what llama.cpp quantizes to IQ4_NL instead of Q2_K/Q3_K
    x = np.random.default_rng(5).standard_normal((5, 96)).astype(np.float32)
    assert np.array_equal(qstrat.quantize(x, "iq4_nl"), ggml_quantize_chunk(int(T.IQ4_NL), x))
    weights = importance(96)
    weights[32:64] = 0.0  # a block the importance vector ignores entirely: d = 0, as in GGML
    got = qstrat.quantize(x, "iq4_nl", imatrix=weights)
    assert np.array_equal(got, ggml_quantize_chunk(int(T.IQ4_NL), x, weights))
    assert np.all(got.reshape(5, 3, 18)[:, 1] == [0, 0] + [0x88] * 16)
    for weighted in (None, importance()):
        blocks = qstrat.quantize(ROWS, "iq4_nl", imatrix=weighted).reshape(len(NAMES), -1, 18)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        # a block whose |max| is below 1e-15 has d = +0 and every index 8, the level nearest 0
        # (GGML's best_index_int8 of 0 * x)
        for name in ("zeros", "1e-30", "inverse scale overflows"):
            assert np.all(blocks[NAMES.index(name)] == [0, 0] + [0x88] * 16)
        assert np.all(blocks[NAMES.index("zero block inside"), 2] == [0, 0] + [0x88] * 16)
        assert np.all(blocks[NAMES.index("tiny block inside"), 3] == [0, 0] + [0x88] * 16)
        # the first trial scale (max / 127) and the 15 of the other sign ((itry - 127) / max) both win
        # somewhere, so a wrong sign in either would change bytes
        blocks32 = ROWS.reshape(len(NAMES), -1, 32)
        extreme = np.take_along_axis(blocks32, np.abs(blocks32).argmax(axis=2)[..., None], 2)[..., 0]
        assert np.any(d * extreme > 0) and np.any(d * extreme < 0)
    # x**2 overflows in the 1e30 block: GGML's sums give inf / inf, a NaN d, kept as GGML keeps it
    plain = qstrat.quantize(ROWS, "iq4_nl").reshape(len(NAMES), -1, 18)
    assert np.isnan(plain[NAMES.index("one huge value"), 1, :2].copy().view(np.float16)[0])
    # the kernel zeroes and counts blocks holding NaN or infinity (the registry refuses them first)
    bad = x.copy()
    bad[1, 40] = np.inf
    out = np.empty((15, iq4nl.BLOCK_BYTES), np.uint8)
    assert iq4nl.quantize_rows_iq4nl(bad, out, np.empty(0, np.float32)) == 1
    good = qstrat.quantize(x, "iq4_nl").reshape(15, 18)
    assert not out[4].any() and np.array_equal(np.delete(out, 4, axis=0), np.delete(good, 4, axis=0))


def test_q8_k_is_ggmls_reference_rounding():
    # ggml_quantize_chunk has no Q8_K case: compare with quantize_row_q8_K_ref itself; rows whose
    # inverse scale overflows are qstrat's documented exception (zeros, see docs/formats.md)
    keep = [i for i, n in enumerate(NAMES) if n not in ("inverse scale overflows", "tiny block inside")]
    x = ROWS[keep]
    got = qstrat.quantize(x, "Q8_K", imatrix=importance())  # the vector is ignored
    assert np.array_equal(got, ggml_quantize_q8k(x).reshape(len(keep), -1))
    values = qstrat.dequantize(got, T.Q8_K)
    assert np.array_equal(values, ggml_dequantize_row("q8_K", got, K))  # gguf-py has no Q8_K dequantize


@pytest.mark.parametrize("name", ["f32", "f16", "bf16"])
def test_unquantized_targets_match_ggml(name):
    ggml_type = block_type(name).ggml_type
    got = qstrat.quantize(ROWS, name)
    assert np.array_equal(got, ggml_quantize_chunk(int(ggml_type), ROWS))
    values = qstrat.dequantize(got, name)
    assert np.array_equal(values, gguf.quants.dequantize(got, ggml_type).reshape(values.shape))
    if name == "f32":
        assert np.array_equal(values, ROWS)
    half = np.clip(ROWS, -60000, 60000).astype(np.float16)
    assert np.array_equal(qstrat.quantize(half, name), ggml_quantize_chunk(int(ggml_type), half.astype(np.float32)))


def test_f16_encoding_matches_ggml_on_every_exponent_and_rounding_case():
    # every sign/exponent/top-10-mantissa pattern, each with the low 13 bits that decide
    # rounding (zero, one ulp, just below half, half, just above half, all ones): normals,
    # subnormals, overflow to infinity, ties to even, infinities and NaNs
    high = np.arange(1 << 19, dtype=np.uint32) << np.uint32(13)
    low = np.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF], dtype=np.uint32)
    values = (high[:, None] | low[None, :]).reshape(-1, 1 << 10).view(np.float32)
    got = np.empty(values.shape, np.uint16)
    encode_rows(values, got, False)
    expected = ggml_quantize_chunk(int(T.F16), values).view(np.uint16)
    assert np.array_equal(got, expected)
    finite_or_inf = ~np.isnan(values)
    with np.errstate(over="ignore"):
        assert np.array_equal(got[finite_or_inf], values[finite_or_inf].astype(np.float16).view(np.uint16))


def test_edge_rows_exercise_what_they_claim():
    # the ties rows hold exact .5 ties that ties-to-even and ties-away round apart, and the
    # subnormal row's scales are subnormal halves: a wrong rounding rule would fail the tests
    ties = ROWS[NAMES.index("ties at 127")]
    assert np.any(np.round(ties) != np.trunc(ties + np.copysign(0.5, ties)))
    blocks = qstrat.quantize(ROWS[NAMES.index("fp16-subnormal scale")][None], "q8_0").reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16)
    assert np.all((d != 0) & (np.abs(d) < np.finfo(np.float16).smallest_normal))
    # rounding d to fp16 by truncation instead of to nearest would change some bytes
    exact_d = np.abs(ROWS[:, :].reshape(-1, 32)).max(axis=1) / np.float32(127)
    with np.errstate(over="ignore"):  # the 1e30 row's d overflows fp16 either way
        truncated = (exact_d.view(np.uint32) >> 13 << 13).view(np.float32).astype(np.float16)
        assert np.any(truncated != exact_d.astype(np.float16))


def test_registry_layouts_are_gguf_and_ggml_sizes():
    assert set(FORMATS) == {
        "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "q8_k",
        "f32", "f16", "bf16",
    }
    for name, entry in FORMATS.items():
        assert entry.ggml_type.name.lower() == name
        assert (entry.block_size, entry.type_size) == gguf.GGML_QUANT_SIZES[entry.ggml_type]
        assert qstrat.quantize(np.zeros((2, 256), np.float32), name).shape == (2, 256 // entry.block_size * entry.type_size)
    for code, name in enumerate(LEGACY):
        assert getattr(legacy, name.upper()) == code
        assert (legacy.QK, legacy.BLOCK_BYTES[code]) == gguf.GGML_QUANT_SIZES[block_type(name).ggml_type]
    assert (legacy.QK, iq4nl.BLOCK_BYTES) == gguf.GGML_QUANT_SIZES[T.IQ4_NL]
    assert block_type("iq4_nl").uses_imatrix


def test_type_names_and_enums():
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(qstrat.quantize(x, "Q4_1"), qstrat.quantize(x, T.Q4_1))
    assert qstrat.quantize(x[0], "q5_0").shape == (2 * 22,)  # 1-D: one row, as gguf-py
    assert qstrat.quantize(x.reshape(3, 1, 64), "q8_0").shape == (3, 1, 68)
    assert qstrat.dequantize(qstrat.quantize(x.reshape(3, 1, 64), "q8_0"), "q8_0").shape == (3, 1, 64)
    with pytest.raises(InputError, match="unknown or unsupported quantization type 'iq2_xxs'.*q8_0, q4_0"):
        qstrat.quantize(x, "iq2_xxs")
    with pytest.raises(InputError, match="IQ2_XXS"):
        qstrat.quantize(x, T.IQ2_XXS)
    with pytest.raises(InputError, match="a name or a gguf"):
        qstrat.quantize(x, 8)


def test_no_rows_give_no_blocks_and_empty_rows_are_refused():
    for name in ("q8_0", "q4_k", "q8_k", "iq4_nl", "f16"):
        stored = qstrat.quantize(np.zeros((0, 256), np.float32), name)
        assert stored.shape == (0, qstrat.formats.block_type(name).row_bytes(256))  # as gguf-py's quantize
        assert qstrat.dequantize(stored, name).shape == (0, 256)
        with pytest.raises(InputError, match=r"shape \(4, 0\).*positive multiple"):
            qstrat.quantize(np.zeros((4, 0), np.float32), name)
    with pytest.raises(InputError, match=r"q8_0 data must be uint8.*\(0,\)"):
        qstrat.dequantize(np.zeros(0, np.uint8), "q8_0")


def test_errors_name_shape_type_and_index():
    x = np.ones((3, 100), np.float32)
    with pytest.raises(InputError, match=r"shape \(3, 100\).*q4_0.*multiple of 32"):
        qstrat.quantize(x, "q4_0")
    with pytest.raises(InputError, match=r"shape \(3, 100\).*q8_k.*multiple of 256"):
        qstrat.quantize(x, "q8_k")
    x = np.ones((3, 64), np.float32)
    x[2, 37] = np.nan
    x[2, 40] = np.inf
    for data in (x, x.astype(np.float16)):
        for name in ("q5_1", "iq4_nl", "f16"):
            with pytest.raises(NonFiniteError, match=rf"shape \(3, 64\).*index \(2, 37\).*{name}"):
                qstrat.quantize(data, name, imatrix=np.ones(64))
    with pytest.raises(NonFiniteError, match=r"index \(1, 0, 37\)"):
        qstrat.quantize(x.reshape(3, 1, 64)[[0, 2]], "q4_0")
    wide = np.ones((2, 256), np.float32)
    wide[1, 200] = -np.inf  # the K-quant kernels find it themselves (the API does not scan first)
    for name, imatrix in (("q8_0", None), ("q4_k", None), ("q6_k", np.ones(256)), ("q8_k", None), ("bf16", None)):
        with pytest.raises(NonFiniteError, match=rf"index \(1, 200\).*{name}"):
            qstrat.quantize(wide.astype(np.float16) if name == "q8_0" else wide, name, imatrix=imatrix)
    good = np.ones((3, 64), np.float32)
    with pytest.raises(InputError, match=r"shape \(63,\).*q4_1 data of shape \(3, 64\).*\(64,\)"):
        qstrat.quantize(good, "q4_1", imatrix=np.ones(63))
    for bad, index in ((-1.0, 7), (np.nan, 9), (np.inf, 2), (1e39, 5)):  # 1e39: a float64 beyond float32, named as given
        weights = np.ones(64)
        weights[index] = bad
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no numpy overflow warning on the way
            with pytest.raises(InputError, match=rf"q5_0 data of shape \(3, 64\) holds {re.escape(str(bad))} at index {index}\b"):
                qstrat.quantize(good, "q5_0", imatrix=weights)
    with pytest.raises(InputError, match="cannot quantize dtype float64"):
        qstrat.quantize(good.astype(np.float64), "q8_0")
    with pytest.raises(InputError, match=r"q4_0 data must be uint8.*18 bytes.*\(2, 17\)"):
        qstrat.dequantize(np.zeros((2, 17), np.uint8), "q4_0")
    with pytest.raises(InputError, match=r"int8 of shape \(2, 18\)"):
        qstrat.dequantize(np.zeros((2, 18), np.int8), "q4_0")
    assert issubclass(InputError, QstratError)


@pytest.mark.parametrize("name", ["q4_k", "q5_0"])
def test_a_matrix_quantized_in_row_chunks_is_ggmls_and_measured_as_a_whole(name, monkeypatch):
    # rows go through in chunks (a whole float32 copy took 3-4x a 16-bit matrix's memory): each row is
    # quantized alone, so the bytes are GGML's; the measures are summed in the same order as unchunked
    from qstrat import matrix
    from qstrat.synthetic import float32_to_bf16_bits

    rng = np.random.default_rng(7)
    values = rng.standard_normal((1100, 512)).astype(np.float32) * rng.lognormal(0, 1, 512).astype(np.float32)
    storage = float32_to_bf16_bits(values)
    exact = (storage.astype(np.uint32) << 16).view(np.float32)
    rows, cols = rng.permutation(1100), rng.permutation(512)
    importance = rng.random(512).astype(np.float32) + 0.1
    probes = {"sum": np.ones(512, np.float32)}
    whole = matrix.quantize_matrix_as(storage, name, rows, cols, probes=probes, importance=importance)
    monkeypatch.setattr(matrix, "_CHUNK_VALUES", 256 * 512)  # 256 rows a chunk: five chunks, the last short
    chunked = matrix.quantize_matrix_as(storage, name, rows, cols, probes=probes, importance=importance)
    oracle = ggml_quantize_chunk(int(gguf.GGMLQuantizationType[name.upper()]), exact[rows][:, cols], importance[cols])
    assert np.array_equal(chunked.blocks, oracle.reshape(chunked.blocks.shape))
    assert np.array_equal(chunked.blocks, whole.blocks)
    assert chunked.metrics == whole.metrics and chunked.error_squares == whole.error_squares
    assert np.array_equal(chunked.probe_products["sum"], whole.probe_products["sum"])
    assert chunked.weighted_error_squares == whole.weighted_error_squares
    errors = matrix.quantize_matrix_as(storage, name, rows, cols, measure="error", importance=importance)
    assert errors.error_squares == whole.error_squares


@pytest.mark.parametrize("name", [n for n, t in FORMATS.items() if t.half_fields])
def test_blocks_whose_float16_fields_overflow_are_found_exactly_where_ggml_writes_infinity(name):
    # GGML's float16 scales (and F16's values) overflow past 65504: its bytes then dequantize to inf or
    # NaN, a file llama.cpp refuses to load. The API gives GGML's bytes; a run refuses them (overflows)
    entry = block_type(name)
    k = max(entry.block_size, 256)
    base = np.random.default_rng(5).standard_normal((1, k)).astype(np.float32)
    seen = set()
    for magnitude in (6.0e4, 6.6e4, 5.0e5, 1.0e6, 8.0e6, 9.0e6, 1.0e8, 1.0e12, 3.0e38):
        for sign in (1.0, -1.0):
            x = base.copy()
            x[0, 7] = sign * magnitude
            ggml = ggml_quantize_chunk(int(entry.ggml_type), x, None)
            assert np.array_equal(qstrat.quantize(x, name), ggml), (name, sign * magnitude)
            symbol = name[:-1] + "K" if name.endswith("_k") else name  # dequantize_row_q4_K
            infinite = not np.all(np.isfinite(ggml.view("<f2") if name == "f16" else ggml_dequantize_row(symbol, ggml, k)))
            assert entry.overflows(ggml) == infinite, (name, sign * magnitude)
            seen.add(infinite)
    assert seen == {True, False}
