"""The .q8k and .perm files: seed-compatible bytes, strict readers."""

import struct

import numpy as np
import pytest

import qstrat
from qstrat.errors import FormatError, InputError
from qstrat.io.names import assign_file_stems, decode_name, encode_name
from qstrat.io.q8k import q8k_file_holds, write_perm, write_q8k
from qstrat.kernels import BLOCK_BYTES


def _blocks(rows=3, k=512, seed=0):
    x = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    return x, qstrat.quantize_blocks(x)


def test_q8k_header_and_layout_are_the_seed_format(tmp_path):
    x, blocks = _blocks()
    written = write_q8k(tmp_path / "w.q8k", blocks, 3, 512)
    raw = (tmp_path / "w.q8k").read_bytes()
    assert raw[:4] == b"88QK"
    assert struct.unpack("<6I", raw[:24]) == (0x4B513838, 1, 3, 512, 2, 0x18)
    assert raw[24:] == blocks.tobytes()
    assert written.size == len(raw) == 24 + 6 * 292
    stored = qstrat.read_q8k(tmp_path / "w.q8k")
    assert stored.shape == (3, 512)
    assert np.array_equal(stored.dequantize(), qstrat.dequantize_blocks(blocks).reshape(3, 512))


def test_perm_layout_and_roundtrip(tmp_path):
    perm = np.random.default_rng(1).permutation(512)
    write_perm(tmp_path / "w.perm", perm)
    raw = (tmp_path / "w.perm").read_bytes()
    assert struct.unpack("<2I", raw[:8]) == (0x4D524550, 512)
    assert np.array_equal(np.frombuffer(raw[8:], "<u4"), perm)
    assert np.array_equal(qstrat.read_perm(tmp_path / "w.perm"), perm)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"XXXX" + b[4:], "not a .q8k file"),
        (lambda b: b[:4] + struct.pack("<I", 2) + b[8:], "version 2"),
        (lambda b: b[:20] + struct.pack("<I", 0x10), "dtype tag"),
        (lambda b: b[:16] + struct.pack("<I", 3) + b[20:], "do not agree"),
        (lambda b: b[:-1], "bytes, but"),
        (lambda b: b + b"\0", "bytes, but"),
        (lambda b: b[:10], "shorter than"),
    ],
)
def test_q8k_reader_rejects(tmp_path, mutate, message):
    _, blocks = _blocks()
    path = tmp_path / "w.q8k"
    write_q8k(path, blocks, 3, 512)
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(FormatError, match=message):
        qstrat.read_q8k(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (struct.pack("<2I", 0x4D524550, 3) + struct.pack("<3I", 0, 0, 2), "not a permutation"),
        (struct.pack("<2I", 0x4D524550, 3) + struct.pack("<3I", 0, 1, 3), "not a permutation"),
        (struct.pack("<2I", 0x4D524550, 4) + struct.pack("<3I", 0, 1, 2), "bytes, but"),
        (struct.pack("<2I", 0x12345678, 1) + struct.pack("<I", 0), "not a .perm file"),
        (b"PE", "shorter than"),
    ],
)
def test_perm_reader_rejects(tmp_path, payload, message):
    path = tmp_path / "w.perm"
    path.write_bytes(payload)
    with pytest.raises(FormatError, match=message):
        qstrat.read_perm(path)


def test_perm_length_must_match_k(tmp_path):
    write_perm(tmp_path / "w.perm", np.arange(256))
    with pytest.raises(FormatError, match="k = 512"):
        qstrat.read_perm(tmp_path / "w.perm", k=512)


def test_writers_refuse_bad_data(tmp_path):
    with pytest.raises(InputError, match="not a permutation"):
        write_perm(tmp_path / "p.perm", np.array([0, 0, 1]))
    _, blocks = _blocks()
    with pytest.raises(InputError, match="do not fit"):
        write_q8k(tmp_path / "w.q8k", blocks, 2, 512)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name", ["model.layers.0.mlp.up_proj.weight", "../../x", "/abs/path", "a\\b", "nul\0x", "new\nline", "..", ".", "é"]
)
def test_names_are_safe_and_reversible(name):
    stem = encode_name(name)
    assert "/" not in stem and "\\" not in stem and "\0" not in stem and "\n" not in stem
    assert stem not in ("", ".", "..")
    assert decode_name(stem) == name


def test_seed_names_are_unchanged():
    assert encode_name("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"


def test_long_and_case_colliding_names_get_distinct_stems():
    long_a, long_b = "a" * 300 + "x", "a" * 300 + "y"
    stems = assign_file_stems([long_a, long_b, "W.weight", "w.weight"])
    assert len({s.casefold() for s in stems.values()}) == 4
    assert all(len(s.encode()) + 8 <= 255 for s in stems.values())
    assert stems == assign_file_stems(["w.weight", long_b, "W.weight", long_a])


def test_q8k_file_holds_compares_every_chunk(tmp_path):
    # more than one 1 MiB read chunk; a difference in the last block must be seen
    blocks = np.random.default_rng(9).integers(0, 256, size=(4096, BLOCK_BYTES), dtype=np.uint8)
    written = write_q8k(tmp_path / "big.q8k", blocks, 4096, 256)
    assert q8k_file_holds(tmp_path / written.path, blocks)
    changed = blocks.copy()
    changed[-1, -1] ^= 0x40
    assert not q8k_file_holds(tmp_path / written.path, changed)
    assert not q8k_file_holds(tmp_path / written.path, blocks[:-1])
