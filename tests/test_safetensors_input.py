"""Reading .safetensors files and model directories."""

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from qstrat.errors import FormatError, InputError
from qstrat.io.safetensors import (
    SafetensorsFile,
    SafetensorsModel,
    map_tensor,
    read_tensor,
    to_float32,
    write_safetensors,
)
from qstrat.synthetic import float32_to_bf16_bits
from tests.helpers import bf16_bits_to_f32, make_llama_dir, raw_safetensors


def test_reads_files_written_by_the_safetensors_package(tmp_path):
    tensors = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.int64), "h": np.ones(3, np.float16)}
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "np"})
    file = SafetensorsFile(tmp_path / "m.safetensors")
    assert file.metadata == {"format": "np"}
    for name, value in tensors.items():
        assert np.array_equal(map_tensor(file.tensors[name]), value)


def test_read_into_a_reused_buffer_and_a_file_truncated_meanwhile(tmp_path):
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2, 2), np.float16)}
    save_file(tensors, tmp_path / "m.safetensors")
    file = SafetensorsFile(tmp_path / "m.safetensors")
    buffer = np.empty(64, dtype=np.uint8)
    for name, value in tensors.items():
        read = read_tensor(file.tensors[name], buffer)
        assert read.dtype == value.dtype and np.array_equal(read, value) and not read.flags.writeable
    with open(tmp_path / "m.safetensors", "r+b") as f:  # cut inside "b", the last tensor
        f.truncate(file.tensors["b"].offset + 3)
    with pytest.raises(InputError, match=r"m\.safetensors.*ends inside tensor 'b'"):
        read_tensor(file.tensors["b"], buffer)


def test_written_files_are_read_by_the_safetensors_package(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    bits = float32_to_bf16_bits(x)
    write_safetensors(tmp_path / "o.safetensors", [("b", "BF16", x.shape, bits), ("f", "F32", x.shape, x)], {"k": "v"})
    with safe_open(tmp_path / "o.safetensors", framework="numpy") as f:
        assert f.metadata() == {"k": "v"}
        assert np.array_equal(f.get_tensor("f"), x)
        assert sorted(f.keys()) == ["b", "f"]
    file = SafetensorsFile(tmp_path / "o.safetensors")
    assert np.array_equal(to_float32(file.tensors["b"].dtype, map_tensor(file.tensors["b"])), bf16_bits_to_f32(bits))


def test_sharded_directory_with_index(tmp_path):
    model_dir = make_llama_dir(tmp_path / "m", shards=2)
    model = SafetensorsModel(model_dir)
    assert len(model.files) == 2
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert set(model.tensors) == set(index["weight_map"])


def test_index_naming_a_missing_shard(tmp_path):
    model_dir = make_llama_dir(tmp_path / "m", shards=2)
    next(model_dir.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(InputError, match="named by the index is missing"):
        SafetensorsModel(model_dir)


def test_index_pointing_outside(tmp_path):
    model_dir = make_llama_dir(tmp_path / "m", shards=2)
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "../evil.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InputError, match="outside the model directory"):
        SafetensorsModel(model_dir)


def test_duplicate_tensor_across_shards(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"x.weight": np.ones((1, 256), np.float32)}, d / "a.safetensors")
    save_file({"x.weight": np.ones((1, 256), np.float32)}, d / "b.safetensors")
    with pytest.raises(InputError, match="appears in both"):
        SafetensorsModel(d)


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"t": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
        ({"t": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "outside"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 8, "outside"),
        (GOOD, b"\0" * 4, "outside"),
        (GOOD, b"\0" * 12, "trailing bytes"),
        (
            {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12,
            "overlaps",
        ),
        ({"__metadata__": {"a": 1}, **GOOD}, b"\0" * 8, "__metadata__"),
        ({"__metadata__": [], **GOOD}, b"\0" * 8, "__metadata__"),
        ([1, 2], b"", "not a JSON object"),
        ({"t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "exactly dtype"),
    ],
)
def test_malformed_headers(tmp_path, header, data, message):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(FormatError, match=message) as err:
        SafetensorsFile(path)
    assert "bad.safetensors" in str(err.value)


def test_not_json_and_duplicates_and_sizes(tmp_path):
    path = raw_safetensors(tmp_path / "a.safetensors", None, header_bytes=b"{not json")
    with pytest.raises(FormatError, match="not JSON"):
        SafetensorsFile(path)
    dup = b'{"t":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"t":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    path = raw_safetensors(tmp_path / "b.safetensors", None, header_bytes=dup)
    with pytest.raises(FormatError, match="duplicate"):
        SafetensorsFile(path)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(FormatError, match="shorter than the 8-byte"):
        SafetensorsFile(tmp_path / "empty.safetensors")
    (tmp_path / "huge.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(FormatError, match="exceeds"):
        SafetensorsFile(tmp_path / "huge.safetensors")
