"""The types qstrat reads but does not write (IQ1..IQ3, IQ4_XS, TQ1_0/TQ2_0, MXFP4), against GGML itself.

GGML (libggml-python, through ctypes) quantizes the bytes and dequantizes them; qstrat must read
exactly GGML's values, in its Python API and through every command that reads a GGUF.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf import GGUFReader
from safetensors.numpy import load_file

import qstrat
from qstrat.formats import DECODED_ONLY, FORMATS
from qstrat.reference import ggml_dequantize_row, ggml_quantize_chunk
from qstrat.synthetic import LlamaShape
from tests.conftest import REPO
from tests.helpers import make_llama_dir, rewrite_gguf, run_cli

TYPES = list(DECODED_ONLY)
#: two layers: 16 matrices, every row 512 or 768 long (the 256-value types' blocks divide them)
SHAPE = LlamaShape(vocab_size=64, hidden_size=512, intermediate_size=768, num_hidden_layers=2)


def _ggml_bytes(type_name: str, rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """GGML's quantization of ``rows``, with an importance vector (IQ1/IQ2 refuse to go without one)."""
    importance = np.random.default_rng(seed).uniform(0.1, 2.0, rows.shape[1]).astype(np.float32)
    return ggml_quantize_chunk(int(gguf.GGMLQuantizationType[type_name.upper()]), rows, importance)


def test_the_decoded_types_are_neither_written_nor_unknown_to_gguf():
    assert not set(DECODED_ONLY) & set(FORMATS)
    for name, entry in DECODED_ONLY.items():
        assert (entry.block_size, entry.type_size) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
    with pytest.raises(qstrat.QstratError, match="unknown or unsupported quantization type 'iq2_xxs'"):
        qstrat.quantize(np.zeros((1, 256), np.float32), "iq2_xxs")  # read, never written


@pytest.mark.parametrize("type_name", TYPES)
def test_each_decoded_type_reads_as_ggml_dequantizes_it(type_name):
    rng = np.random.default_rng(3)
    rows = np.concatenate([
        rng.standard_normal((6, 512)) * 0.02,
        rng.standard_t(2.0, (4, 512)) * 0.05,  # heavy tails
        np.zeros((1, 512)),
        np.full((1, 512), -3.0),
    ]).astype(np.float32)
    blocks = _ggml_bytes(type_name, rows)
    assert blocks.shape == (rows.shape[0], DECODED_ONLY[type_name].row_bytes(512))
    ours = qstrat.dequantize(blocks, type_name)
    assert ours.dtype == np.float32 and ours.view(np.uint32).tolist() == ggml_dequantize_row(type_name, blocks, 512).view(np.uint32).tolist()
    with pytest.raises(qstrat.QstratError, match="whole blocks"):
        qstrat.dequantize(blocks[:, :-1], type_name)


@pytest.fixture(scope="module")
def decoded_gguf(tmp_path_factory):
    """A Llama GGUF (llama.cpp's names) whose 16 matrices GGML stored in the decoded types, each type
    at least once, as another tool writes them: the F32 file qstrat makes, rewritten with gguf-py
    without qstrat's own keys (so it is read with llama.cpp's names, as a downloaded file is)."""
    root = tmp_path_factory.mktemp("decoded")
    model = make_llama_dir(root / "tiny", dtype="F32", shards=1, shape=SHAPE)
    made = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(root / "f32"), "-q",
                   "--set", "format=f32", "--set", "outputs=[gguf]")
    assert made.returncode == 0, made.stderr
    source = root / "f32" / "tiny.gguf"
    matrices = [t.name for t in GGUFReader(source).tensors if len(t.shape) == 2]
    assert len(matrices) >= len(TYPES)
    stored = {}

    def in_decoded_types(tensor):
        values = np.asarray(tensor.data, dtype=np.float32)
        if tensor.name not in matrices:
            return values, None
        type_name = TYPES[matrices.index(tensor.name) % len(TYPES)]
        stored[tensor.name] = (type_name, _ggml_bytes(type_name, values, seed=matrices.index(tensor.name)))
        return stored[tensor.name][1], gguf.GGMLQuantizationType[type_name.upper()]

    path = rewrite_gguf(source, root / "decoded.gguf", in_decoded_types, keep_qstrat_keys=False)
    # GGML's values of each matrix, in numpy order
    values = {name: ggml_dequantize_row(type_name, blocks, blocks.shape[1] // DECODED_ONLY[type_name].type_size
                                        * DECODED_ONLY[type_name].block_size) for name, (type_name, blocks) in stored.items()}
    return path, stored, values


def test_a_gguf_in_decoded_types_is_listed_verified_and_dequantized(decoded_gguf, tmp_path):
    path, stored, values = decoded_gguf
    listed = run_cli("qstrat", "inspect", str(path))
    assert listed.returncode == 0, listed.stderr
    for name, (type_name, _) in stored.items():
        assert any(name in line and type_name in line for line in listed.stdout.splitlines()), (name, listed.stdout)
    assert "cannot read" not in listed.stdout
    verified = run_cli("qstrat", "verify", str(path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    out = tmp_path / "values.safetensors"
    decoded = run_cli("qstrat", "dequantize", str(path), str(out))
    assert decoded.returncode == 0, decoded.stderr
    tensors = load_file(out)
    for name, expected in values.items():
        assert np.array_equal(tensors[name].view(np.uint32), expected.view(np.uint32)), name
    loaded = qstrat.load_model(path)
    assert all(np.array_equal(loaded[name], expected) for name, expected in values.items())
    # unpacked to a directory (.qblk files of these types) and packed again: the same blocks
    for source, target in ((path, tmp_path / "unpacked"), (tmp_path / "unpacked", tmp_path / "packed.gguf")):
        converted = run_cli("qstrat", "convert", str(source), str(target))
        assert converted.returncode == 0, converted.stderr
    assert run_cli("qstrat", "verify", str(tmp_path / "unpacked")).returncode == 0
    packed = {t.name: (t.tensor_type.name.lower(), np.asarray(t.data)) for t in GGUFReader(tmp_path / "packed.gguf").tensors}
    assert all(packed[name][0] == t and np.array_equal(packed[name][1], blocks) for name, (t, blocks) in stored.items())


def test_a_gguf_in_decoded_types_is_requantized_from_ggmls_values(decoded_gguf, tmp_path):
    path, stored, values = decoded_gguf
    out = tmp_path / "q8_0"
    result = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(path), "-o", str(out), "-q",
                     "--set", "format=q8_0")
    assert result.returncode == 0, result.stderr
    written = {t.name: np.asarray(t.data) for t in GGUFReader(out / path.name).tensors}
    for name, expected in values.items():
        assert np.array_equal(written[name], ggml_quantize_chunk(int(gguf.GGMLQuantizationType.Q8_0), expected)), name
    manifest = json.loads((out / "manifest.json").read_text())["tensors"]
    assert {name: manifest[name]["source_type"] for name in stored} == {name: t for name, (t, _) in stored.items()}
    # the report counts the bytes the input stored them in
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["quantized_source_bytes"] == sum(blocks.nbytes for _, blocks in stored.values())
