"""Hostile and broken inputs through the CLI: one clear line, a documented exit code, nothing escapes."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qstrat
from qstrat.errors import QstratError
from qstrat.io.manifest import read_manifest
from qstrat.io.safetensors import SafetensorsFile, write_safetensors
from qstrat.synthetic import write_model
from tests.conftest import REPO
from tests.helpers import assert_clean_failure, communicate_or_dump_stacks, make_llama_dir, raw_gguf, raw_safetensors, run_cli

HOSTILE_NAMES = [
    "../../escape.weight", "/abs/path.weight", "a/b.weight", "a\\b.weight", "nul\0byte.weight", "new\nline.weight",
    "x" * 300 + ".weight", "Case.weight", "case.weight", "..", ".",
]


def test_hostile_tensor_names_stay_inside_and_apart(tmp_path):
    rng = np.random.default_rng(0)
    items = [(n, "F32", (2, 256), rng.standard_normal((2, 256)).astype(np.float32)) for n in sorted(HOSTILE_NAMES)]
    (tmp_path / "in").mkdir()
    write_safetensors(tmp_path / "in" / "model.safetensors", items)
    out = tmp_path / "sandbox" / "out"
    result = run_cli("qstrat", "quantize", str(tmp_path / "in"), str(out), "-s", "l2_norm")
    assert result.returncode == 0, result.stderr
    # nothing outside the output directory, and one distinct file (case-insensitively) per tensor
    assert sorted(p.name for p in (tmp_path / "sandbox").iterdir()) == ["out"]
    assert not (tmp_path / "escape.weight.q8k").exists()
    q8k = [p.name.lower() for p in out.glob("*.q8k")]
    assert len(q8k) == len(set(q8k)) == len([n for n in HOSTILE_NAMES if n.endswith(".weight")])
    loaded = qstrat.load_model(out)
    assert set(loaded) == set(HOSTILE_NAMES)
    assert run_cli("qstrat", "verify", str(out)).returncode == 0


def _broken_files(tmp_path, good_bytes):
    cases = {
        "empty": b"",
        "short": b"\x01\x02",
        "huge-header": struct.pack("<Q", 2**62) + b"{}",
        "not-json": struct.pack("<Q", 5) + b"hello",
        "truncated": good_bytes[: len(good_bytes) // 2],
    }
    paths = {}
    for name, data in cases.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        paths[name] = tmp_path / f"{name}.safetensors"
    paths["zero-sized"] = raw_safetensors(tmp_path / "zero-sized.safetensors", {"t.weight": {"dtype": "F32", "shape": [0, 256], "data_offsets": [0, 0]}})
    paths["bad-dtype"] = raw_safetensors(tmp_path / "bad-dtype.safetensors", {"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    return paths


def test_broken_safetensors_through_the_cli(tmp_path):
    model = make_llama_dir(tmp_path / "m", shards=1)
    paths = _broken_files(tmp_path, (model / "model.safetensors").read_bytes())
    for name, path in paths.items():
        result = run_cli("quantize_q8k", str(path), str(tmp_path / f"out-{name}"))
        if name == "zero-sized":  # a valid file whose only tensor is empty: passed through
            assert result.returncode == 0, result.stderr
            continue
        assert_clean_failure(result, path.name)
        assert result.returncode == 2
        assert read_manifest(tmp_path / f"out-{name}") is None if (tmp_path / f"out-{name}").exists() else True


def test_index_outside_and_duplicate_shards_through_the_cli(tmp_path):
    model = make_llama_dir(tmp_path / "m", shards=2)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "../../etc/passwd"
    index_path.write_text(json.dumps(index))
    assert_clean_failure(run_cli("quantize_q8k", str(model), str(tmp_path / "o")), "outside the model directory")
    index_path.unlink()
    shards = sorted(model.glob("*.safetensors"))
    (model / "copy.safetensors").write_bytes(shards[0].read_bytes())
    assert_clean_failure(run_cli("quantize_q8k", str(model), str(tmp_path / "o")), "appears in both")


def test_sigint_stops_cleanly(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"b.{i}.weight": rng.standard_normal((512, 1024)).astype(np.float32) for i in range(60)}
    model = write_model(tmp_path / "big", tensors, dtype="BF16")
    out = tmp_path / "o"
    process = subprocess.Popen([str(Path(sys.executable).with_name("qstrat")), "quantize", str(model), str(out), "--workers", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and len(list(out.glob("*.q8k"))) < 5:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = communicate_or_dump_stacks(process, 120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not list(out.glob(".*.tmp-*")) and not (out / "manifest.json").exists()


def test_symlink_loop_and_missing_index_shard(tmp_path):
    loop = tmp_path / "loop"
    loop.mkdir()
    os.symlink(loop / "a.safetensors", loop / "b.safetensors")
    os.symlink(loop / "b.safetensors", loop / "a.safetensors")
    assert_clean_failure(run_cli("quantize_q8k", str(loop), str(tmp_path / "o")), "loop")


def test_non_finite_and_extreme_values(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((4, 512)).astype(np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        x = base.copy()
        x[3, 17] = bad
        d = tmp_path / f"m{bad}"
        d.mkdir()
        write_safetensors(d / "model.safetensors", [("w.weight", "F32", x.shape, x)])
        assert_clean_failure(run_cli("quantize_q8k", str(d), str(tmp_path / "o")), "w.weight", "(3, 17)")
    x = base.copy()
    x[0] = 0.0  # all-zero row
    x[1, :256] = 3.0e38  # near the float32 limit
    x[2, :256] = 1e-40  # denormals: 127/max overflows, the block dequantizes to zeros
    d = tmp_path / "extreme"
    d.mkdir()
    write_safetensors(d / "model.safetensors", [("w.weight", "F32", x.shape, x)])
    assert run_cli("quantize_q8k", str(d), str(tmp_path / "ok")).returncode == 0
    y = qstrat.load_model(tmp_path / "ok")["w.weight"]
    assert np.all(np.isfinite(y)) and not y[0].any() and not y[2, :256].any()
    assert np.allclose(y[1, :256], 3.0e38, rtol=1e-2)


_GOOD = {}


def _valid_files(tmp_path_factory):
    if not _GOOD:
        d = tmp_path_factory.mktemp("fuzz")
        model = make_llama_dir(d / "m", shards=1)
        qstrat.quantize_safetensors(model, qstrat.QuantizationConfig(strategies=["l2_norm"], output_dir=d / "o"))
        _GOOD["safetensors"] = (model / "model.safetensors").read_bytes()[:4096 * 64]
        _GOOD["q8k"] = (d / "o" / "lm_head.weight.q8k").read_bytes()
        _GOOD["perm"] = (d / "o" / "lm_head.weight.perm").read_bytes()
        _GOOD["manifest"] = (d / "o" / "manifest.json").read_bytes()
        from qstrat.convert import directory_to_gguf

        _GOOD["gguf"] = directory_to_gguf(d / "o", d / "m.gguf").read_bytes()[:200_000]
        _GOOD["dir"] = d
    return _GOOD


@pytest.mark.parametrize("kind", ["q8k", "perm", "manifest", "safetensors", "gguf"])
def test_fuzzed_files_give_qstrat_errors_only(tmp_path_factory, kind):
    files = _valid_files(tmp_path_factory)
    original = files[kind]
    target_dir = tmp_path_factory.mktemp(f"fuzz-{kind}")
    readers = {
        "q8k": lambda p: qstrat.read_q8k(p).dequantize(),
        "perm": lambda p: qstrat.read_perm(p),
        "manifest": lambda p: read_manifest(p.parent),
        "safetensors": lambda p: SafetensorsFile(p),
        "gguf": lambda p: qstrat.load_model(p),
    }
    name = {"q8k": "x.q8k", "perm": "x.perm", "manifest": "manifest.json", "safetensors": "x.safetensors", "gguf": "x.gguf"}[kind]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), max_size=8),
           st.integers(0, len(original)), st.binary(max_size=64))
    def check(flips, cut, tail):
        data = bytearray(original)
        for position, value in flips:
            data[position] = value
        data = bytes(data[:cut]) + tail if tail or cut < len(original) else bytes(data)
        path = target_dir / name
        path.write_bytes(data)
        try:
            readers[kind](path)
        except QstratError as err:
            assert "\n" not in str(err) or kind == "manifest"

    check()


def _gguf_with(path: Path, metadata: dict, rows: int = 2) -> Path:
    """A GGUF of one Q8_0 tensor ``w.weight`` (rows x 32) and the given metadata (a value of bytes
    is written as a string of those bytes)."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    for key, value in metadata.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, (str, bytes)):
            writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
        else:
            writer.add_uint32(key, value)
    blocks = qstrat.quantize(np.ones((max(rows, 1), 32), dtype=np.float32), "q8_0")[:rows]
    writer.add_tensor_info("w.weight", blocks.shape, np.dtype(np.uint8), blocks.nbytes, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.write_tensor_data(blocks)
    writer.close()
    return path


@pytest.mark.parametrize(
    "metadata, rows, message",
    [
        # each of these was an internal error ("unexpected ...") in load_model, inspect, verify or dequantize
        ({"qstrat.joint_perm_tensors": ["w.weight"], "qstrat.joint_perm_axes": ["x"], "qstrat.joint_perm.0": [0, 1]}, 2,
         "qstrat.joint_perm_axes is ARRAY of STRING, expected ARRAY of INT"),
        ({"qstrat.joint_perm_tensors": ["w.weight"], "qstrat.joint_perm_axes": [5], "qstrat.joint_perm.0": [0, 1]}, 2,
         "joint permutation of 'w.weight' along axis 5; the tensor has 2"),
        ({"qstrat.joint_perm_tensors": ["w.weight"], "qstrat.joint_perm_axes": [0], "qstrat.joint_perm.0": [-1, 0]}, 2,
         "joint permutation of 'w.weight': not a permutation of 0..1"),
        ({"general.name": b"caf\xe9"}, 2, "metadata 'general.name' holds a string that is not UTF-8"),
        ({"qstrat.config": "[1, 2]"}, 2, "qstrat.config is not a JSON object"),
        ({}, 0, "tensor 'w.weight' has shape [32, 0] (a dimension of 0)"),
    ],
)
def test_gguf_metadata_of_the_wrong_kind_is_a_format_error(tmp_path, metadata, rows, message):
    path = _gguf_with(tmp_path / "m.gguf", metadata, rows)
    with pytest.raises(QstratError, match=re.escape(message)):
        qstrat.load_model(path)
    assert_clean_failure(run_cli("qstrat", "inspect", str(path)), "m.gguf", message)


def test_manifests_imatrices_and_names_of_the_wrong_kind_are_format_errors(tmp_path):
    from qstrat.imatrix import ImportanceEntry, ImportanceMatrix, read_imatrix, write_imatrix

    model = make_llama_dir(tmp_path / "m", shards=1)
    out = tmp_path / "o"
    qstrat.quantize_safetensors(model, qstrat.QuantizationConfig(output_dir=out, validation=False))
    manifest = json.loads((out / "manifest.json").read_text())
    name = next(n for n, t in manifest["tensors"].items() if t["storage"] == "q8k")
    for edit, message in (
        (lambda m: m["tensors"][name].update(files={}), "lists no file holding its blocks"),
        (lambda m: m["tensors"][name]["files"]["q8k"].update(path="a\0b"), "holds a NUL byte"),
        (lambda m: m["tensors"][name].update(shape=[2**70, -1]), "shape.0: Input should be less than"),
    ):
        broken = json.loads(json.dumps(manifest))
        edit(broken)
        (out / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(QstratError, match=re.escape(message)):  # a KeyError, a ValueError, or accepted
            qstrat.load_model(out)
    (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(QstratError, match="not a readable manifest"):  # a RecursionError
        qstrat.load_model(out)
    # an importance matrix whose counts are text, whose datasets are a number
    import gguf

    good = tmp_path / "good.imatrix.gguf"
    write_imatrix(good, ImportanceMatrix({"blk.0.attn_q.weight": ImportanceEntry(np.ones((1, 32), np.float32), np.ones(1, np.int64))},
                                         ["text"], 1, 32))
    for key, value, message in (("imatrix.chunk_count", "x", "imatrix.chunk_count is 'x', not a count"),
                                ("imatrix.datasets", 5, "imatrix.datasets is 5, not an array of strings")):
        reader = gguf.GGUFReader(good)
        bad = tmp_path / "bad.imatrix.gguf"
        writer = gguf.GGUFWriter(bad, arch=None)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            if field.name == key:
                writer.add_key_value(key, value, gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32)
            elif field.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_array(field.name, field.contents())
            else:
                writer.add_key_value(field.name, field.contents(), field.types[0])
        for tensor in reader.tensors:
            writer.add_tensor(tensor.name, np.asarray(tensor.data))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(QstratError, match=re.escape(message)):
            read_imatrix(bad)
    # a tensor name JSON spells with a lone surrogate: no file or terminal can hold it
    raw_safetensors(tmp_path / "s.safetensors", {"x\ud800.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(QstratError, match="not valid Unicode"):
        SafetensorsFile(tmp_path / "s.safetensors")


def test_hyperparameters_of_the_wrong_kind_are_input_errors_of_the_numpy_forward():
    from qstrat.forward import LlamaParams

    good = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
            "llama.block_count": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5}
    assert LlamaParams.from_fields(good, "m.gguf").n_head == 4
    # a ZeroDivisionError, a float() ValueError, a reshape deep in the forward
    for change, message in (({"llama.attention.head_count": 0}, "llama.attention.head_count is 0; at least 1"),
                            ({"llama.attention.layer_norm_rms_epsilon": "x"}, "llama.attention.layer_norm_rms_epsilon is 'x', not a number"),
                            ({"llama.attention.head_count_kv": 3}, "4 attention heads do not share 3 key/value heads")):
        with pytest.raises(QstratError, match=re.escape(f"m.gguf: {message}")):
            LlamaParams.from_fields({**good, **change}, "m.gguf")


def _gguf_mutant(path: Path, kvs: dict, tensors: dict) -> Path:
    """A small qstrat generic container (a.weight F16 with its gather map, b.weight F32), with ``kvs``
    (key -> (type, value[, element type]), None to drop) and ``tensors`` (name -> changes) applied."""
    base_kvs = {"general.architecture": (8, "qstrat"), "qstrat.version": (8, "0"), "qstrat.perm_tensors": (9, ["a.weight.perm"], 8)}
    base_tensors = {"a.weight": (1, (32, 4), np.ones(128, np.float16).tobytes(), 0),
                    "a.weight.perm": (26, (32,), np.arange(32, dtype=np.int32)[::-1].tobytes(), 256),
                    "b.weight": (0, (32,), np.ones(32, np.float32).tobytes(), 384)}
    base_kvs.update(kvs)
    for name, change in tensors.items():
        base_tensors[name] = change if change is None else tuple(change.get(i, part) for i, part in enumerate(base_tensors.get(name, (0, (1,), b"", 0))))
    return raw_gguf(path, [(k, *v) for k, v in base_kvs.items() if v is not None],
                    [(n, *t) for n, t in base_tensors.items() if t is not None])


GGUF_MUTANTS = {
    # an OverflowError, then an internal error, for a value past int64
    "a permutation value past int64": ({"qstrat.residual_perm": (9, [2**64 - 1], 10), "qstrat.residual_tensors": (9, ["b.weight"], 8),
                                        "qstrat.residual_axes": (9, [0], 5)}, {}, "qstrat.residual_perm holds a value out of range"),
    # the rest were read without a word: a tensor dropped, or read under its stored name, or without its gather
    "renamed lists of two lengths": ({"qstrat.renamed.gguf": (9, ["a.weight"], 8), "qstrat.renamed.original": (9, ["x", "y"], 8)}, {},
                                     "renamed metadata is inconsistent"),
    "generated names a model tensor": ({"qstrat.generated": (9, ["b.weight"], 8)}, {}, "generated names 'b.weight'"),
    "a gather map list naming a model tensor": ({"qstrat.perm_tensors": (9, ["a.weight.perm", "b.weight"], 8)}, {},
                                                "companion tensor 'b.weight' does not name a tensor of the file"),
    "an unlisted gather map": ({"qstrat.perm_tensors": None}, {}, "'a.weight.perm' is a gather map qstrat.perm_tensors does not list"),
    "a gather map of floats": ({}, {"a.weight.perm": {0: 0, 2: (np.arange(32, dtype=np.float32) + 0.5).tobytes()}},
                               "companion tensor 'a.weight.perm' is not a 1-D I32 tensor"),
    "a misaligned tensor": ({}, {"b.weight": {3: 392}}, "starts at offset 392, not a multiple of the alignment 32"),
    "overlapping tensors": ({}, {"b.weight": {3: 224}}, "the data of tensors 'a.weight' and 'b.weight' overlap"),
}


@pytest.mark.parametrize("case", sorted(GGUF_MUTANTS))
def test_a_gguf_whose_structure_lies_is_refused_by_every_reader(tmp_path, case):
    kvs, tensors, message = GGUF_MUTANTS[case]
    path = _gguf_mutant(tmp_path / "m.gguf", kvs, tensors)
    with pytest.raises(QstratError, match=re.escape(message)):
        qstrat.load_model(path)
    checked = run_cli("qstrat", "verify", str(path))
    assert checked.returncode == 3
    assert_clean_failure(checked, message)
    assert qstrat.load_model(_gguf_mutant(tmp_path / "good.gguf", {}, {})).keys() == {"a.weight", "b.weight"}


def test_gguf_metadata_a_writer_cannot_carry_is_an_input_error(tmp_path):
    # convert GGUF -> directory -> GGUF of another tool's file: an empty metadata array (gguf-py's writer
    # refuses one) and a file type that is text ended in an internal error
    from tests.helpers import raw_gguf

    weight = [("a.weight", 0, (32, 2), np.ones(64, np.float32).tobytes(), 0)]
    for kv, message in (((("tokenizer.ggml.merges", 9, [], 8)), "metadata 'tokenizer.ggml.merges' is an empty array"),
                        ((("general.file_type", 8, "q4_1")), "general.file_type is not an integer")):
        source = raw_gguf(tmp_path / "other.gguf", [("general.architecture", 8, "llama"), kv], weight)
        directory = tmp_path / f"d-{len(message)}"
        assert run_cli("qstrat", "convert", str(source), str(directory)).returncode == 0
        back = run_cli("qstrat", "convert", str(directory), str(tmp_path / "back.gguf"))
        assert back.returncode == 2
        assert_clean_failure(back, message)
    retyped = _gguf_mutant(tmp_path / "bool.gguf", {"qstrat.retyped": (9, ["c"], 8), "qstrat.retyped_from": (9, ["BOOL"], 8)},
                           {"c": {0: 24, 1: (4,), 2: bytes([0, 1, 5, 1]), 3: 512}})
    with pytest.raises(QstratError, match="holds bytes other than 0 and 1"):
        qstrat.load_model(retyped)


def test_verify_of_a_directory_calls_its_unreadable_container_damaged(tmp_path):
    # its checksum matched the manifest's, and the structure error came out as exit 2; a lone file's is exit 3
    out = tmp_path / "o"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(out), "-q", "--set", "format=q8_0").returncode == 0
    container = next(out.glob("*.gguf"))
    _gguf_mutant(container, {"qstrat.generated": (9, ["b.weight"], 8)}, {})
    import hashlib

    size, digest = container.stat().st_size, hashlib.sha256(container.read_bytes()).hexdigest()
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text)

    def matched(node):
        if isinstance(node, dict):
            if node.get("path") == container.name:
                node.update(size=size, sha256=digest)
            for value in node.values():
                matched(value)
        elif isinstance(node, list):
            for value in node:
                matched(value)

    matched(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    checked = run_cli("qstrat", "verify", str(out))
    assert checked.returncode == 3
    assert_clean_failure(checked, "generated names 'b.weight'")


def test_a_gguf_tensor_in_a_type_qstrat_does_not_read_is_named_by_every_command(tmp_path):
    # Q8_1 (GGML's activation type): gguf-py has no dequantizer for it, nor has qstrat
    import gguf

    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]  # as gguf-py sizes it
    weight = ("blk.0.ffn_down.weight", 9, (256, 2), bytes(2 * 8 * block_bytes), 0)
    path = raw_gguf(tmp_path / "q8_1.gguf", [("general.architecture", 8, "llama")], [weight])
    listed = run_cli("qstrat", "inspect", str(path))  # listed all the same, by its type's name
    assert listed.returncode == 0 and "q8_1" in listed.stdout and "blk.0.ffn_down.weight" in listed.stdout, listed.stderr
    assert "another tool wrote (architecture llama); qstrat cannot read its q8_1 tensors" in listed.stdout
    verified = run_cli("qstrat", "verify", str(path))  # not damaged: its structure is checked
    assert verified.returncode == 0 and "intact as far as its structure goes" in verified.stdout, verified.stderr
    for command in (["dequantize", str(path), str(tmp_path / "d.safetensors")],
                    ["convert", str(path), str(tmp_path / "dir")], ["quantize", str(path), str(tmp_path / "q")],
                    ["run", str(REPO / "configs" / "identity.yaml"), "-i", str(path), "-o", str(tmp_path / "r"), "--set", "format=q8_0"]):
        result = run_cli("qstrat", *command)
        assert result.returncode in (2, 3) and "Traceback" not in result.stderr, (command, result.stderr)
        assert "'blk.0.ffn_down.weight' is Q8_1, a type qstrat cannot read (it reads BF16, F16, F32" in result.stderr + result.stdout, command


def test_one_part_of_a_split_gguf_is_refused_by_every_command(tmp_path):
    # gguf-py's writer splits as llama-gguf-split does: each part holds some tensors and split.count
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama", split_max_tensors=2)
    for i in range(5):
        writer.add_tensor(f"t{i}.weight", np.full((2, 32), i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    first = tmp_path / "m-00001-of-00003.gguf"
    assert first.is_file()
    for command in (["inspect", str(first)], ["verify", str(first)], ["dequantize", str(first), str(tmp_path / "d.safetensors")],
                    ["convert", str(first), str(tmp_path / "dir")], ["quantize", str(first), str(tmp_path / "q")],
                    ["run", str(REPO / "configs" / "identity.yaml"), "-i", str(first), "-o", str(tmp_path / "r"), "--set", "format=q8_0"]):
        result = run_cli("qstrat", *command)
        assert result.returncode in (2, 3) and "Traceback" not in result.stderr, (command, result.stderr)
        assert "one part of a GGUF split into 3 files (split.count)" in result.stderr + result.stdout, command
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "r").exists()


def test_a_tensor_without_values_is_refused_where_a_gguf_is_written(tmp_path):
    # a .q8k directory passes it through; a GGUF cannot hold it for qstrat's readers (this was exit 1)
    model = make_llama_dir(tmp_path / "m", shards=1)
    write_safetensors(model / "extra.safetensors", [("model.empty.weight", "F32", (0, 256), np.zeros((0, 256), np.float32))])
    q8k = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(tmp_path / "q8k"))
    assert q8k.returncode == 0, q8k.stderr
    for command in (["run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(tmp_path / "g"), "--set", "format=q8_0"],
                    ["convert", str(tmp_path / "q8k"), str(tmp_path / "c.gguf")]):
        assert_clean_failure(run_cli("qstrat", *command), "'model.empty.weight'", "no values")
    assert not (tmp_path / "g").exists() and not (tmp_path / "c.gguf").exists()


def test_values_too_large_for_the_type_are_refused_with_or_without_validation(tmp_path):
    # GGML writes an infinite float16 scale for them (llama.cpp refuses the file); this was exit 1 with
    # validation (an infinite SQNR) and a model of inf/NaN without it
    x = np.random.default_rng(2).standard_normal((4, 512)).astype(np.float32)
    x[3, 17] = 1.0e7
    model = tmp_path / "m"
    model.mkdir()
    write_safetensors(model / "model.safetensors", [("w.weight", "F32", x.shape, x)])
    for format_name in ("q8_0", "f16"):
        for validation in ("true", "false"):
            result = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(tmp_path / f"o-{format_name}-{validation}"),
                             "--set", f"format={format_name}", "--set", f"validation.enabled={validation}")
            assert result.returncode == 2, result.stderr
            assert_clean_failure(result, "'w.weight'", "1e+07 at index (3, 17), is too large for " + format_name)
    compared = run_cli("qstrat", "compare", str(model), "--strategies", "identity", "--formats", "f16")
    assert_clean_failure(compared, "'w.weight'", "too large for f16")


def test_a_gguf_file_without_its_suffix_is_named_as_one(tmp_path):
    # an Ollama blob (sha256-...) is a GGUF file; read as safetensors it gave "header length ... exceeds"
    blob = raw_gguf(tmp_path / "sha256-0123abcd", [("general.architecture", 8, "llama")], [("w", 0, (32, 2), bytes(256), 0)])
    assert_clean_failure(run_cli("qstrat", "inspect", str(blob)), "a GGUF file", "name ending in .gguf")
    blob.rename(tmp_path / "model.gguf")
    assert run_cli("qstrat", "inspect", str(tmp_path / "model.gguf")).returncode == 0
