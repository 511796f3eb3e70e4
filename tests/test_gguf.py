"""GGUF output and conversion: readable by the gguf package, bit-exact with the .q8k files."""

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

import qstrat
from qstrat.convert import directory_to_gguf, gguf_to_directory
from qstrat.io.gguf import GGML_MAX_NAME_BYTES, PASSTHROUGH_TYPES, passthrough_tag
from qstrat.kernels import BLOCK_BYTES, QK_K
from qstrat.io.safetensors import SafetensorsModel, map_tensor, to_float32
from qstrat.synthetic import write_model
from tests.conftest import REPO
from tests.helpers import assert_clean_failure, held_lock, raw_gguf, rewrite_gguf, run_cli

TYPES = {"F32": GGMLQuantizationType.F32, "BF16": GGMLQuantizationType.BF16, "F16": GGMLQuantizationType.F16}


def test_block_layout_and_types_are_ggmls():
    assert GGML_QUANT_SIZES[GGMLQuantizationType.Q8_K] == (QK_K, BLOCK_BYTES)
    for tag, dtype in PASSTHROUGH_TYPES.items():
        ggml_type = GGMLQuantizationType[tag]
        assert GGML_QUANT_SIZES[ggml_type] == (1, np.dtype(dtype).itemsize)
        assert passthrough_tag(int(ggml_type)) == tag
    assert passthrough_tag(int(GGMLQuantizationType.Q8_K)) is None
    assert passthrough_tag(9999) is None


@pytest.mark.parametrize("variant", qstrat.Q8K_VARIANTS)
def test_run_writes_gguf_with_the_q8k_bytes(tmp_path, variant):
    out = tmp_path / "o"
    result = run_cli("qstrat", "run", str(REPO / "configs" / "attention_aware.yaml"), "-o", str(out), "-q",
                     "--set", "outputs=[q8k, gguf]", "--set", f"variant={variant}")
    assert result.returncode == 0, result.stderr
    reader = GGUFReader(out / "tiny-llama.gguf")
    assert bytes(reader.get_field("general.architecture").contents(), "utf-8") == b"llama"
    assert reader.get_field("general.quantization_version").contents() == 2
    assert reader.get_field("qstrat.variant").contents() == variant
    manifest = json.loads((out / "manifest.json").read_text())
    source = SafetensorsModel(REPO / "examples" / "tiny-llama")
    tensors = {t.name: t for t in reader.tensors}
    for name, entry in manifest["tensors"].items():
        t = tensors[name]
        assert list(t.shape) == list(reversed(entry["shape"]))  # ne[0] is the row length
        if entry["storage"] == "q8k":
            assert t.tensor_type == GGMLQuantizationType.Q8_K
            q8k = (out / entry["files"]["q8k"]["path"]).read_bytes()
            assert t.n_bytes == len(q8k) - 24 and np.asarray(t.data).tobytes() == q8k[24:]
            if "perm" in entry["files"]:
                companion = tensors[name + ".perm"]
                assert companion.tensor_type == GGMLQuantizationType.I32
                assert np.array_equal(companion.data, qstrat.read_perm(out / entry["files"]["perm"]["path"]))
        else:
            assert t.tensor_type == TYPES[entry["dtype"]]
            assert np.asarray(t.data).tobytes() == np.asarray(map_tensor(source.tensors[name])).tobytes()
    assert run_cli("qstrat", "verify", str(out)).returncode == 0


def test_gguf_directory_gguf_roundtrip_and_loading(tmp_path):
    out = tmp_path / "o"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "function_preserving.yaml"), "-o", str(out), "-q").returncode == 0
    first = directory_to_gguf(out, tmp_path / "a.gguf")
    back = gguf_to_directory(first, tmp_path / "back")
    second = directory_to_gguf(back, tmp_path / "b.gguf")
    assert first.read_bytes() == second.read_bytes()
    for original in (False, True):
        expected = qstrat.load_model(out, original=original)
        for loaded in (qstrat.load_model(first, original=original), qstrat.load_model(back, original=original)):
            assert set(loaded) == set(expected)
            assert all(np.array_equal(loaded[n], expected[n]) for n in expected)
    for command in (("verify", str(first)), ("inspect", str(first)), ("dequantize", str(first), str(tmp_path / "d.safetensors"))):
        result = run_cli("qstrat", *command)
        assert result.returncode == 0, result.stderr
    # a run's own GGUF of a model that is not a Llama: its directory was taken for a GGUF input's on
    # the way back (qstrat.layout gguf-input added), and the file was not the same
    model = write_model(tmp_path / "plain", {f"l.{i}.weight": np.ones((8, 256), np.float32) * i for i in range(3)}, dtype="F32")
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(tmp_path / "u"), "-q",
                   "--set", "format=q8_0").returncode == 0
    own = tmp_path / "u" / "plain.gguf"
    again = directory_to_gguf(gguf_to_directory(own, tmp_path / "plain-back"), tmp_path / "plain-again.gguf")
    assert again.read_bytes() == own.read_bytes()


def test_original_tool_directory_converts(tmp_path):
    out = tmp_path / "o"
    result = run_cli("quantize_q8k", str(REPO / "examples" / "tiny-llama"), str(out), env={"CANDLE_Q8K_PERMUTE": "1"})
    assert result.returncode == 0, result.stderr
    seed = tmp_path / "seed"  # what the Rust tool leaves: .q8k and .perm files only
    seed.mkdir()
    for path in list(out.glob("*.q8k")) + list(out.glob("*.perm")):
        shutil.copy(path, seed / path.name)
    result = run_cli("qstrat", "convert", str(seed), str(tmp_path / "seed.gguf"))
    assert result.returncode == 0, result.stderr
    reader = GGUFReader(tmp_path / "seed.gguf")
    names = {t.name for t in reader.tensors}
    assert "model.layers.0.mlp.up_proj.weight" in names and "model.layers.0.mlp.up_proj.weight.perm" in names
    loaded, expected = qstrat.load_model(tmp_path / "seed.gguf"), qstrat.load_model(out)
    assert all(np.array_equal(loaded[n], expected[n]) for n in loaded)
    # inspect lists its tensors (it used to say there were no .safetensors files)
    shown = run_cli("qstrat", "inspect", str(seed))
    assert shown.returncode == 0, shown.stderr
    words = " ".join(shown.stdout.split())  # the title wraps with a long path
    assert f"{len(list(seed.glob('*.q8k')))} Q8K tensors" in words and "model.layers.0.mlp.up_proj.weight" in words and "runtime (.perm)" in words


def test_long_names_are_shortened_and_mapped_back(tmp_path):
    long_name = "model.layers.0.a_really_long_module_path.that_goes_on_and_on.proj.weight"
    assert len(long_name) > GGML_MAX_NAME_BYTES
    rng = np.random.default_rng(0)
    model = write_model(tmp_path / "m", {long_name: rng.standard_normal((4, 512)).astype(np.float32)}, dtype="F32")
    out = tmp_path / "o"
    qstrat.quantize_safetensors(model, qstrat.QuantizationConfig(strategies=["l2_norm"], output_dir=out))
    target = directory_to_gguf(out, tmp_path / "m.gguf")
    assert all(len(t.name.encode()) <= GGML_MAX_NAME_BYTES for t in GGUFReader(target).tensors)
    loaded = qstrat.load_model(target)
    assert list(loaded) == [long_name]
    assert np.array_equal(loaded[long_name], qstrat.load_model(out)[long_name])


def test_writing_gguf_keeps_one_tensor_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"l.{i}.weight": rng.standard_normal((1024, 1024)).astype(np.float32) for i in range(24)}
    model = write_model(tmp_path / "m", tensors, dtype="F32")
    out = tmp_path / "o"
    qstrat.quantize_safetensors(model, qstrat.QuantizationConfig(strategies=["l2_norm"], output_dir=out, validation=False))
    largest = 1024 * 1024 * 4
    tracemalloc.start()
    directory_to_gguf(out, tmp_path / "m.gguf")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total = sum(a.nbytes for a in tensors.values())
    assert peak < 2 * largest, (peak, largest, total)


def test_bad_gguf_is_a_clean_error(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    assert_clean_failure(run_cli("qstrat", "verify", str(tmp_path / "bad.gguf")), "bad.gguf")
    assert_clean_failure(run_cli("qstrat", "convert", str(tmp_path / "bad.gguf"), str(tmp_path / "o")), "bad.gguf")


def test_a_truncated_or_empty_gguf_is_named_as_such_by_every_reader(tmp_path):
    out = tmp_path / "o"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(out), "-q",
                   "--set", "format=q8_0").returncode == 0
    data = (out / "tiny-llama.gguf").read_bytes()
    cut_in_header, cut_in_data = tmp_path / "header" / "m.gguf", tmp_path / "data" / "m.gguf"
    for path, size in ((cut_in_header, 300), (cut_in_data, len(data) - 5000)):
        path.parent.mkdir()
        path.write_bytes(data[:size])
        message = f"{path}: truncated GGUF file ({size} bytes"
        # gguf-py's own errors here were a reshape or an index out of bounds
        assert_clean_failure(run_cli("qstrat", "inspect", str(path)), message)
        assert_clean_failure(run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(path),
                                     "-o", str(tmp_path / "again"), "-q", "--set", "format=q8_0"), message)
        assert_clean_failure(run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(tmp_path / "w"),
                                     "-q", "--set", "format=q4_k", "--set", f"imatrix={path}"), message)
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert_clean_failure(run_cli("qstrat", "inspect", str(tmp_path / "empty.gguf")), "empty.gguf: empty file")


def test_verify_of_a_lone_gguf_checks_its_recorded_data_checksum(tmp_path):
    out = tmp_path / "o"
    config = ("--set", "format=q8_0", "--set", "outputs=[gguf]")
    assert run_cli("qstrat", "run", str(REPO / "configs" / "function_preserving.yaml"), "-o", str(out), "-q", *config).returncode == 0
    lone = tmp_path / "lone.gguf"
    shutil.copyfile(out / "tiny-llama.gguf", lone)
    result = run_cli("qstrat", "verify", str(lone))
    assert result.returncode == 0 and result.stdout.strip() == f"{lone}: intact", result.stdout + result.stderr
    # one bit of one tensor: the file still parses, and used to be called intact
    tensor = GGUFReader(lone).tensors[3]
    data = bytearray(lone.read_bytes())
    data[int(tensor.data_offset) + tensor.n_bytes // 2] ^= 1
    lone.write_bytes(bytes(data))
    result = run_cli("qstrat", "verify", str(lone))
    assert result.returncode == 3, result.stdout + result.stderr
    assert_clean_failure(result, "lone.gguf", "sha256 of its header and tensor data differs")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(bytes(data[:-5000]))
    assert run_cli("qstrat", "verify", str(truncated)).returncode == 3
    # the header too: a tensor's shape or a key's value changed loads differently, and was called intact
    for edit in ("shape", "metadata"):
        header = tmp_path / f"{edit}.gguf"
        shutil.copyfile(out / "tiny-llama.gguf", header)
        reader = GGUFReader(header, "r+")
        if edit == "shape":
            tensor = next(t for t in reader.tensors if len(t.shape) == 2 and t.shape[0] != t.shape[1])
            dims = tensor.field.parts[3]  # ne: swapped, the same bytes read as another matrix
            dims[0], dims[1] = int(dims[1]), int(dims[0])
        else:
            variant = reader.fields["qstrat.variant"]
            variant.parts[-1][0] ^= 0x20  # a letter's case
        del reader
        assert_clean_failure(run_cli("qstrat", "verify", str(header)), f"{edit}.gguf", "sha256 of its header and tensor data differs")
    # a file another tool wrote records no checksum: its structure is all that can be checked, and verify says so
    foreign = tmp_path / "foreign.gguf"
    shutil.copyfile(out / "tiny-llama.gguf", foreign)
    reader = GGUFReader(foreign, "r+")
    key = reader.fields["qstrat.sha256"]
    reader.data[key.offset + 8:key.offset + 16] = np.frombuffer(b"foreign.", np.uint8)  # the key renamed, same length (after its u64 length)
    del reader
    result = run_cli("qstrat", "verify", str(foreign))
    assert result.returncode == 0 and "records no checksum" in result.stdout, result.stdout + result.stderr
    # rewritten in another type by a tool that copies every key, as llama.cpp's quantizer does (run in
    # tests/test_llama_quantize.py): its checksum is stale, and the file not damaged
    import gguf

    def q4_0(tensor):  # its Q8_0 matrices in Q4_0, every other tensor as it was
        if tensor.tensor_type != GGMLQuantizationType.Q8_0:
            return np.asarray(tensor.data), None
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return gguf.quants.quantize(values, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0

    rewritten = rewrite_gguf(out / "tiny-llama.gguf", tmp_path / "rewritten.gguf", q4_0)
    result = run_cli("qstrat", "verify", str(rewritten))
    assert result.returncode == 0 and "rewritten by another tool" in result.stdout, result.stdout + result.stderr
    listed = run_cli("qstrat", "inspect", str(rewritten))
    assert listed.returncode == 0 and "rewritten by another tool since qstrat wrote it" in listed.stdout, listed.stdout + listed.stderr
    assert "rewritten" not in run_cli("qstrat", "inspect", str(out / "tiny-llama.gguf")).stdout


def test_a_gguf_of_an_earlier_qstrat_is_checked_against_its_data_checksum(tmp_path):
    # qstrat.data_sha256: the tensor bytes alone, what files written before the header was covered record
    import hashlib

    import gguf

    blocks = qstrat.quantize(np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64), "q8_0")
    path = tmp_path / "earlier.gguf"
    writer = gguf.GGUFWriter(path, "qstrat")
    writer.add_string("qstrat.version", "0.1.0")
    writer.add_string("qstrat.data_sha256", hashlib.sha256(blocks.tobytes()).hexdigest())
    writer.add_tensor("w.weight", blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_cli("qstrat", "verify", str(path))
    assert result.returncode == 0 and result.stdout.strip() == f"{path}: intact", result.stdout + result.stderr
    data = bytearray(path.read_bytes())
    data[int(GGUFReader(path).tensors[0].data_offset) + 5] ^= 1
    path.write_bytes(bytes(data))
    assert_clean_failure(run_cli("qstrat", "verify", str(path)), "sha256 of its tensor data differs")


def test_gguf_instead_of_q8k_files(tmp_path):
    out = tmp_path / "o"
    result = run_cli("qstrat", "run", str(REPO / "configs" / "attention_aware.yaml"), "-o", str(out), "-q", "--set", "outputs=[gguf]")
    assert result.returncode == 0, result.stderr
    assert not list(out.glob("*.q8k")) and not list(out.glob("*.perm")) and not (out / "passthrough.safetensors").exists()
    assert (out / "tiny-llama.gguf").exists()
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
    # the manifest's shapes and types against the container's (only its names were compared)
    manifest = json.loads((out / "manifest.json").read_text())
    edited = json.loads(json.dumps(manifest))
    edited["tensors"]["lm_head.weight"]["shape"] = [256, 256]
    (out / "manifest.json").write_text(json.dumps(edited))
    assert_clean_failure(run_cli("qstrat", "verify", str(out)),
                         "tensor 'lm_head.weight' is q8k [256, 512] in the GGUF container, the manifest says q8k [256, 256]")
    (out / "manifest.json").write_text(json.dumps(manifest))
    reference = tmp_path / "ref"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "attention_aware.yaml"), "-o", str(reference), "-q").returncode == 0
    loaded, expected = qstrat.load_model(out), qstrat.load_model(reference)
    assert set(loaded) == set(expected) and all(np.array_equal(loaded[n], expected[n]) for n in expected)
    data = bytearray((out / "tiny-llama.gguf").read_bytes())
    data[len(data) // 2] ^= 1
    (out / "tiny-llama.gguf").write_bytes(bytes(data))
    assert_clean_failure(run_cli("qstrat", "verify", str(out)), "tiny-llama.gguf")
    # every reader compares the container with the manifest's sha256 before reading a value: the changed
    # file passed as the model, and convert gave it fresh checksums
    with pytest.raises(qstrat.QstratError, match="tiny-llama.gguf: differs from the manifest's sha256"):
        qstrat.load_model(out)
    with qstrat.open_model(out) as opened:
        assert opened.shape("lm_head.weight") == (256, 512)  # headers only: no values read, nothing checked
        with pytest.raises(qstrat.QstratError, match="tiny-llama.gguf: differs from the manifest's sha256"):
            opened["lm_head.weight"]
    for command in (("dequantize", "x.safetensors"), ("convert", "sealed.gguf")):
        failed = run_cli("qstrat", command[0], str(out), str(tmp_path / command[1]))
        assert failed.returncode == 2
        assert_clean_failure(failed, "tiny-llama.gguf: differs from the manifest's sha256")
        assert not (tmp_path / command[1]).exists()
    # the lone file records its own checksum: read or unpacked, a changed one is refused as well
    lone = tmp_path / "lone.gguf"
    lone.write_bytes(bytes(data))
    with pytest.raises(qstrat.QstratError, match="lone.gguf: the sha256 of its header and tensor data differs"):
        qstrat.load_model(lone)
    assert_clean_failure(run_cli("qstrat", "convert", str(lone), str(tmp_path / "unpacked")), "lone.gguf: the sha256")
    assert not (tmp_path / "unpacked" / "manifest.json").exists()
    # nor is a changed one a run's input, quantized into an output of fresh checksums
    plain = tmp_path / "plain"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(plain), "-q", "--set", "format=q8_0").returncode == 0
    changed = bytearray((plain / "tiny-llama.gguf").read_bytes())
    changed[len(changed) // 2] ^= 1
    (tmp_path / "input.gguf").write_bytes(bytes(changed))
    as_input = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(tmp_path / "input.gguf"),
                       "-o", str(tmp_path / "from-input"), "--set", "format=q8_0")
    assert as_input.returncode == 2 and not (tmp_path / "from-input").exists()
    assert_clean_failure(as_input, "input.gguf: the sha256 of its header and tensor data differs")
    data[len(data) // 2] ^= 1
    lone.write_bytes(bytes(data))
    assert qstrat.load_model(lone).keys() == expected.keys()
    # a bit flipped in a tensor's name changed the tensor table, which passed for a rewrite by another
    # tool (llama.cpp's quantizer keeps the names): the checksum was not compared at all
    named = bytearray(data)  # the intact file
    at = named.index(b"self_attn.o_proj", int(GGUFReader(lone).tensors[0].field.offset))  # in the tensor infos
    named[at + len("self_attn.o") - 1] ^= 1
    (tmp_path / "named.gguf").write_bytes(bytes(named))
    with pytest.raises(qstrat.QstratError, match="named.gguf: the sha256 of its header and tensor data differs"):
        qstrat.load_model(tmp_path / "named.gguf")
    assert run_cli("qstrat", "verify", str(tmp_path / "named.gguf")).returncode == 3
    # a rerun repairs it
    assert run_cli("qstrat", "run", str(REPO / "configs" / "attention_aware.yaml"), "-o", str(out), "-q", "--set", "outputs=[gguf]").returncode == 0
    assert run_cli("qstrat", "verify", str(out)).returncode == 0


def test_another_tools_gguf_converted_there_and_back_keeps_its_file_type(tmp_path):
    # a directory converted from a GGUF holds its tensors as they were: the way back used to drop
    # general.file_type (llama.cpp then printed "(guessed)")
    from qstrat.reference import smollm2_gguf

    source = smollm2_gguf()
    assert run_cli("qstrat", "convert", str(source), str(tmp_path / "d")).returncode == 0
    result = run_cli("qstrat", "convert", str(tmp_path / "d"), str(tmp_path / "back.gguf"))
    assert result.returncode == 0, result.stderr
    file_type = [GGUFReader(path).fields["general.file_type"].contents() for path in (source, tmp_path / "back.gguf")]
    assert file_type[0] == file_type[1] == 3  # MOSTLY_Q4_1


def test_tensors_of_dtypes_gguf_lacks_go_through_a_gguf_output_and_come_back(tmp_path):
    # BOOL, unsigned and FP8 tensors (masks, token ids, FP8 checkpoints' scales) have no GGUF type: a
    # run into GGUF failed after quantizing everything, naming no tensor; and load_model gave FP8 codes
    from qstrat.io.safetensors import write_safetensors

    rng = np.random.default_rng(3)
    e4m3 = np.array([0x38, 0x40, 0xB8, 0x30, 0x7E, 0x01, 0x80, 0x00], dtype=np.uint8)  # OCP E4M3FN codes
    e5m2 = np.array([0x3C, 0x40, 0xBC, 0x7B, 0x7C, 0x01, 0xFC, 0x80], dtype=np.uint8)
    odd = {
        "mask": ("BOOL", np.array([True, False, True, True])),
        "ids": ("U8", np.arange(250, 256, dtype=np.uint8)),
        "u16": ("U16", np.array([0, 1, 65535], dtype=np.uint16)),
        "u32": ("U32", np.array([[7, 2**32 - 1]], dtype=np.uint32)),
        "u64": ("U64", np.array([2**64 - 1, 3], dtype=np.uint64)),
        "scale_e4m3": ("F8_E4M3", e4m3),
        "scale_e5m2": ("F8_E5M2", e5m2),
    }
    weight = rng.standard_normal((8, 256)).astype(np.float32)
    model = tmp_path / "m"
    model.mkdir()
    write_safetensors(model / "model.safetensors",
                      [("w.weight", "F32", weight.shape, weight)] + [(n, tag, a.shape, a) for n, (tag, a) in odd.items()], {})
    out = tmp_path / "o"
    result = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(out), "-q", "--set", "format=q4_k")
    assert result.returncode == 0, result.stderr
    reader = GGUFReader(next(out.glob("*.gguf")))
    assert {t.name: t.tensor_type.name for t in reader.tensors if t.name != "w.weight"} == {
        "mask": "I8", "ids": "I8", "u16": "I16", "u32": "I32", "u64": "I64", "scale_e4m3": "I8", "scale_e5m2": "I8"}
    back = qstrat.load_model(out)
    for name in ("mask", "ids", "u16", "u32", "u64"):
        assert back[name].dtype == odd[name][1].dtype and np.array_equal(back[name], odd[name][1]), name
    # FP8 as float32 values (the formats' spec: E4M3FN's largest is 448, E5M2's 57344, with infinities)
    assert back["scale_e4m3"].tolist() == [1.0, 2.0, -1.0, 0.5, 448.0, 2.0**-9, -0.0, 0.0]
    assert back["scale_e5m2"].tolist() == [1.0, 2.0, -1.0, 57344.0, np.inf, 2.0**-16, -np.inf, -0.0]
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
    # to a directory and back: the passed-through bytes and dtypes are the source's
    assert run_cli("qstrat", "convert", str(next(out.glob("*.gguf"))), str(tmp_path / "dir")).returncode == 0
    with open(tmp_path / "dir" / "passthrough.safetensors", "rb") as stream:
        header = json.loads(stream.read(int.from_bytes(stream.read(8), "little")))
    assert {n: header[n]["dtype"] for n in odd} == {n: tag for n, (tag, _) in odd.items()}
    again = SafetensorsModel(tmp_path / "dir" / "passthrough.safetensors").tensors
    for name, (_, array) in odd.items():
        assert np.asarray(map_tensor(again[name])).tobytes() == array.tobytes(), name


def test_a_gguf_of_more_tensors_than_open_files_allowed_is_written(tmp_path):
    # every tensor file was mapped at once: past `ulimit -n` tensors (MoE checkpoints hold thousands)
    # the run failed with "Too many open files" once all the quantizing was done
    rng = np.random.default_rng(5)
    model = write_model(tmp_path / "m", {f"e.{i}.weight": rng.standard_normal((4, 256)).astype(np.float32) for i in range(300)}, dtype="F32")
    limited = "ulimit -n 200; "
    run = subprocess.run(["bash", "-c", limited + f"{Path(sys.executable).with_name('qstrat')} run {REPO / 'configs' / 'identity.yaml'} "
                          f"-i {model} -o {tmp_path / 'o'} -q --set format=q8_0 --set validation.enabled=false"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(GGUFReader(tmp_path / "o" / "m.gguf").tensors) == 300
    q8k = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(tmp_path / "q8k"), "-q",
                  "--set", "validation.enabled=false", "--set", "skip_patterns=[none]")
    assert q8k.returncode == 0, q8k.stderr
    convert = subprocess.run(["bash", "-c", limited + f"{Path(sys.executable).with_name('qstrat')} convert {tmp_path / 'q8k'} {tmp_path / 'c.gguf'}"],
                             capture_output=True, text=True)
    assert convert.returncode == 0, convert.stderr
    assert len(GGUFReader(tmp_path / "c.gguf").tensors) == 300


def test_convert_removes_what_a_killed_convert_left_and_makes_the_target_directory(tmp_path):
    out = tmp_path / "o"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(out), "-q").returncode == 0
    target = tmp_path / "new" / "deeper" / "m.gguf"  # its directory did not exist: exit 3
    target.parent.mkdir(parents=True)
    # a convert killed with SIGKILL (its lock went with it), and one still writing in another container,
    # whose pid is this process's own (each container's first process is pid 1): its lock tells, not its pid
    dead, alive = target.parent / ".m.gguf.tmp-4-0badc0de", target.parent / f".m.gguf.tmp-{os.getpid()}-0c0ffee0"
    dead.write_bytes(b"x" * 1000)
    alive.write_bytes(b"y")
    with held_lock(alive):
        assert run_cli("qstrat", "convert", str(out), str(target)).returncode == 0
        assert not dead.exists() and alive.exists()
    fresh = tmp_path / "made" / "here" / "m.gguf"
    result = run_cli("qstrat", "convert", str(out), str(fresh))
    assert result.returncode == 0, result.stderr
    assert qstrat.load_model(fresh).keys() == qstrat.load_model(target).keys()


def test_a_block_file_whose_header_names_another_type_is_refused_by_readers(tmp_path):
    # IQ4_NL's blocks are Q4_0's size: a header naming it loaded as other values; verify caught it, load_model did not
    from qstrat.io.qblock import read_blocks, write_blocks

    out = tmp_path / "o"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(out), "-q", "--set", "format=q4_0").returncode == 0
    directory = gguf_to_directory(out / "tiny-llama.gguf", tmp_path / "d")
    path = next(directory.glob("*.qblk"))
    stored = read_blocks(path)
    blocks = np.array(stored.blocks)
    written = write_blocks(path, blocks, "iq4_nl", stored.k)
    with pytest.raises(qstrat.QstratError, match=f"{path.name}: differs from the manifest's sha256"):
        qstrat.load_model(directory)
    # the manifest edited to the new file's checksum: the header's type still disagrees with its storage
    from qstrat.io.atomic import file_sha256

    manifest = json.loads((directory / "manifest.json").read_text())
    entry = next(e for e in manifest["tensors"].values() if e["files"].get("blocks", {}).get("path") == path.name)
    entry["files"]["blocks"].update(size=written.size, sha256=file_sha256(path))
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(qstrat.QstratError, match=f"{path.name}: iq4_nl of shape .*, the manifest says q4_0 of"):
        qstrat.load_model(directory)
    assert_clean_failure(run_cli("qstrat", "dequantize", str(directory), str(tmp_path / "x.safetensors")), "the manifest says q4_0")


def test_a_gguf_named_in_upper_case_is_read_as_one(tmp_path):
    # llama.cpp does not mind the case; load_model called M.GGUF "not an output directory"
    out = tmp_path / "o"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(out), "-q", "--set", "format=q8_0").returncode == 0
    upper = tmp_path / "M.GGUF"
    shutil.copyfile(out / "tiny-llama.gguf", upper)
    assert qstrat.load_model(upper).keys() == qstrat.load_model(out).keys()
    assert run_cli("qstrat", "verify", str(upper)).stdout.strip() == f"{upper}: intact"
    again = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(upper), "-o", str(tmp_path / "again"), "-q",
                    "--set", "format=q4_0")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / "M.gguf").is_file()


def test_open_model_walks_a_gguf_in_place_one_tensor_at_a_time(tmp_path):
    # load_model unpacked a GGUF into a temporary copy and dequantized every tensor at once: a 7B model
    # (28 GB as float32) could not be read back on a 24 GB machine
    rng = np.random.default_rng(0)
    tensors = {f"l.{i}.weight": rng.standard_normal((1024, 1024)).astype(np.float32) for i in range(24)}
    model = write_model(tmp_path / "m", tensors, dtype="F32")
    assert run_cli("qstrat", "run", str(REPO / "configs" / "l2_norm.yaml"), "-i", str(model), "-o", str(tmp_path / "o"), "-q",
                   "--set", "outputs=[q8k, gguf]").returncode == 0
    expected = qstrat.load_model(tmp_path / "o")  # the directory's .q8k and .perm files
    largest = 1024 * 1024 * 4
    tracemalloc.start()
    with qstrat.open_model(tmp_path / "o" / "m.gguf") as opened:
        assert len(opened) == len(tensors) and opened.shape("l.3.weight") == (1024, 1024)
        for name in opened:
            assert np.array_equal(opened[name], expected[name]), name
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * largest, (peak, largest)
    with pytest.raises(KeyError):
        opened["no.such.tensor"]
    with pytest.raises(ValueError, match="closed"):
        opened["l.0.weight"]


def test_open_model_reads_each_tensor_when_it_is_looked_up(tmp_path):
    out = tmp_path / "o"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(out), "-q").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    broken, entry = next((n, e) for n, e in manifest["tensors"].items() if e["storage"] == "q8k")
    q8k = out / entry["files"]["q8k"]["path"]
    q8k.write_bytes(q8k.read_bytes()[:100])  # cut inside the blocks
    with qstrat.open_model(out) as opened:
        assert broken in opened
        intact = [n for n in opened if n != broken]
        assert all(opened[n].shape == opened.shape(n) for n in intact)
        with pytest.raises(qstrat.QstratError, match=str(q8k.name)):
            opened[broken]
    with pytest.raises(qstrat.QstratError):
        qstrat.load_model(out)


def test_dequantize_of_a_llama_gguf_is_that_of_its_directory(tmp_path):
    # the GGUF is read in place: q/k rows in llama.cpp's order, 1-D tensors widened to F32, joint permutations
    from qstrat.synthetic import write_tiny_llama

    model = write_tiny_llama(tmp_path / "llama")
    assert run_cli("qstrat", "run", str(REPO / "configs" / "residual_stream.yaml"), "-i", str(model), "-o", str(tmp_path / "o"),
                   "-q", "--set", "format=q4_k").returncode == 0
    gguf = tmp_path / "o" / "llama.gguf"
    assert GGUFReader(gguf).get_field("qstrat.layout") is not None
    unpacked = gguf_to_directory(gguf, tmp_path / "unpacked")
    for flags in ((), ("--function-layout",)):
        written = []
        for source in (gguf, unpacked):
            target = tmp_path / f"{source.name}{len(flags)}.safetensors"
            result = run_cli("qstrat", "dequantize", str(source), str(target), *flags)
            assert result.returncode == 0, result.stderr
            written.append(target.read_bytes())
        assert written[0] == written[1]
    dtypes = {t.dtype for t in SafetensorsModel(tmp_path / "llama.gguf0.safetensors").tensors.values()}
    assert dtypes == {"F32", "BF16"}


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8_0"])
def test_run_time_permutations_of_float_types_are_undone_on_reading(tmp_path, fmt):
    # a tensor stored as F32/F16 (the format, or q8_0's fallback for rows of 300) came back from the GGUF
    # as a passed-through tensor, its columns still in the run-time order: wrong values, verify intact
    rng = np.random.default_rng(0)
    source = {name: (rng.standard_normal((8, k)) * rng.permutation(np.linspace(0.1, 5, k))).astype(np.float32)
              for name, k in (("a.weight", 256), ("b.weight", 300))}
    model = write_model(tmp_path / "m", source, dtype="F32")
    out = tmp_path / "o"
    result = run_cli("qstrat", "run", str(REPO / "configs" / "l2_norm.yaml"), "-i", str(model), "-o", str(out), "-q", "--set", f"format={fmt}")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensors"]["b.weight"]["storage"] == ("f32" if fmt == "f32" else "f16")
    assert manifest["tensors"]["b.weight"]["permutation"] == "runtime"
    expected = {n: a if fmt == "f32" or (fmt == "q8_0" and n == "a.weight") else a.astype(np.float16).astype(np.float32)
                for n, a in source.items()}
    assert run_cli("qstrat", "dequantize", str(out), str(tmp_path / "d.safetensors")).returncode == 0
    written = SafetensorsModel(tmp_path / "d.safetensors").tensors
    unpacked = gguf_to_directory(out / "m.gguf", tmp_path / "unpacked")
    for loaded in (qstrat.load_model(out), qstrat.load_model(out / "m.gguf"), qstrat.load_model(unpacked)):
        for name in ("b.weight",) if fmt == "q8_0" else source:
            assert np.array_equal(loaded[name], expected[name]), name
    # written in its own dtype when that holds its values exactly (F16), else F32
    assert written["b.weight"].dtype == ("F32" if fmt == "f32" else "F16")
    assert np.array_equal(to_float32(written["b.weight"].dtype, map_tensor(written["b.weight"])), expected["b.weight"])
    assert directory_to_gguf(unpacked, tmp_path / "again.gguf").read_bytes() == (out / "m.gguf").read_bytes()


def _stopped_after(count: int):
    """A write_blocks that stops the process's work (as SIGTERM does) after ``count`` tensors."""
    from qstrat.io import gguf as gguf_io

    written = []
    real = gguf_io.write_blocks

    def write_blocks(*args, **kwargs):
        if len(written) == count:
            raise KeyboardInterrupt
        written.append(args[0])
        return real(*args, **kwargs)

    return write_blocks


def test_a_convert_to_a_directory_stopped_half_way_is_refused_until_finished(tmp_path, monkeypatch):
    # its first tensor files stayed with no manifest: read as the original tool's directory, a partial
    # model loaded without an error; into a directory of another model, that one's manifest stayed
    # over a mix of old and new files (wrong values, verify's word aside)
    model = write_model(tmp_path / "m", {f"l.{i}.weight": np.full((8, 256), i + 1, np.float32) for i in range(6)}, dtype="F32")
    other = write_model(tmp_path / "n", {f"l.{i}.weight": np.full((8, 256), -i - 1, np.float32) for i in range(9)}, dtype="F32")
    for source, name in ((model, "m"), (other, "n")):
        assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(source), "-o", str(tmp_path / f"{name}-out"),
                       "-q", "--set", "format=q8_0").returncode == 0
    first, second = tmp_path / "m-out" / "m.gguf", tmp_path / "n-out" / "n.gguf"
    fresh = {n: a for n, a in qstrat.load_model(first).items()}
    for target in (tmp_path / "new", tmp_path / "used"):
        if target.name == "used":
            gguf_to_directory(second, target)  # a directory of another model
        with monkeypatch.context() as patch:
            patch.setattr("qstrat.io.gguf.write_blocks", _stopped_after(2))
            with pytest.raises(KeyboardInterrupt):
                gguf_to_directory(first, target)
        for command in (("inspect", str(target)), ("dequantize", str(target), str(tmp_path / "d.safetensors")),
                        ("convert", str(target), str(tmp_path / "x.gguf"))):
            refused = run_cli("qstrat", *command)
            assert refused.returncode == 2
            assert_clean_failure(refused, "an unfinished qstrat run or convert")
        assert run_cli("qstrat", "verify", str(target)).returncode != 0
        with pytest.raises(qstrat.QstratError, match="unfinished"):
            qstrat.load_model(target)
        result = run_cli("qstrat", "convert", str(first), str(target))  # the same command finishes it
        assert result.returncode == 0, result.stderr
        assert run_cli("qstrat", "verify", str(target)).returncode == 0
        loaded = qstrat.load_model(target)
        assert loaded.keys() == fresh.keys() and all(np.array_equal(loaded[n], fresh[n]) for n in fresh)
        assert len(list(target.glob("*.qblk"))) == len(fresh)  # the other model's extra tensor files are gone
    for mine in ({"notes.txt": "mine"}, {"manifest.json": "{}", "notes.perm": "mine"}):  # a manifest.json, not qstrat's
        foreign = tmp_path / f"foreign{len(mine)}"
        foreign.mkdir()
        for name, text in mine.items():
            (foreign / name).write_text(text)
        refused = run_cli("qstrat", "convert", str(first), str(foreign))
        assert refused.returncode == 3
        assert_clean_failure(refused, "holds files qstrat did not write")
        assert sorted(p.name for p in foreign.iterdir()) == sorted(mine)


def test_a_convert_of_a_bad_gguf_leaves_the_directory_as_it_was(tmp_path):
    # a tensor's own error (here a run-time permutation of the wrong length) came up only once the
    # target's manifest was gone: its good model was then refused as unfinished, for good
    import gguf

    model = write_model(tmp_path / "m", {"a.weight": np.ones((8, 256), np.float32)}, dtype="F32")
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(tmp_path / "o"), "-q",
                   "--set", "format=q8_0").returncode == 0
    target = tmp_path / "d"
    assert run_cli("qstrat", "convert", str(tmp_path / "o" / "m.gguf"), str(target)).returncode == 0
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    bad = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(bad, "qstrat")
    writer.add_string("qstrat.version", "0")
    writer.add_array("qstrat.perm_tensors", ["a.weight.perm"])
    writer.add_tensor("a.weight", np.ones((8, 256), np.float16))
    writer.add_tensor("a.weight.perm", np.arange(100, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    refused = run_cli("qstrat", "convert", str(bad), str(target))
    assert refused.returncode == 2
    assert_clean_failure(refused, f"{bad}: a.weight.perm")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert run_cli("qstrat", "verify", str(target)).returncode == 0


def test_what_a_killed_dequantize_or_reader_left_is_removed(tmp_path):
    out = tmp_path / "o"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(out), "-q", "--set", "outputs=[q8k, gguf]").returncode == 0
    target = tmp_path / "d.safetensors"
    # killed with SIGKILL: an earlier qstrat's name (a pid alone) and this one's; a dequantize still writing
    dead, dead_too = tmp_path / f".d.safetensors.tmp-{os.getpid()}", tmp_path / ".d.safetensors.tmp-7-1234abcd"
    alive = tmp_path / f".d.safetensors.tmp-{os.getpid()}-5678ef01"
    other = tmp_path / ".e.safetensors.tmp-7-1234abcd"  # another file's: not this command's to judge
    for path in (dead, dead_too, alive, other):
        path.write_bytes(b"x")
    with held_lock(alive):
        assert run_cli("qstrat", "dequantize", str(out), str(target)).returncode == 0
        assert not dead.exists() and not dead_too.exists() and alive.exists() and other.exists()
    import tempfile

    import fcntl

    # a reader killed while it unpacked a GGUF, and one still reading (its lock held, as a reader's in
    # another container would be: pids do not tell there)
    killed, reading = (Path(tempfile.mkdtemp(prefix=f"qstrat-gguf-{what}-")) for what in ("killed", "reading"))
    for unpacked in (killed, reading):
        (unpacked / "manifest.json").write_text("{}")
        os.utime(unpacked, (0, 0))  # older than a reader's first moments
    held = os.open(reading, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    only_gguf = tmp_path / "q8_0"  # an outputs: [gguf] directory: convert reads it through an unpacked copy
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(only_gguf), "-q", "--set", "format=q8_0").returncode == 0
    try:
        assert run_cli("qstrat", "convert", str(only_gguf), str(tmp_path / "again.gguf")).returncode == 0
        assert not killed.exists() and reading.exists()
    finally:
        os.close(held)
        shutil.rmtree(killed, ignore_errors=True)
        shutil.rmtree(reading, ignore_errors=True)


def test_verify_and_inspect_read_a_gguf_in_place(tmp_path, monkeypatch, capsys):
    # it unpacked the whole model into the temporary directory (a 7B model's 4 GB, on a tmpfs: memory)
    import tempfile

    from qstrat.verify import verify_gguf_file, verify_output

    outs = []
    for outputs in ("[gguf]", "[q8k, gguf]"):
        out = tmp_path / outputs.strip("[]").replace(", ", "-")
        result = run_cli("qstrat", "run", str(REPO / "configs" / "function_preserving.yaml"), "-o", str(out), "-q",
                         "--set", f"outputs={outputs}", *(("--set", "format=q4_k") if outputs == "[gguf]" else ()))
        assert result.returncode == 0, result.stderr
        outs.append(out)

    def no_copies(*args, **kwargs):
        raise AssertionError("verify unpacked a GGUF into a temporary directory")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_copies)
    from qstrat.cli import inspect

    for out in outs:
        assert verify_output(out) == []
        assert verify_gguf_file(out / "tiny-llama.gguf") == ([], True)
        inspect(out / "tiny-llama.gguf")
        shown = capsys.readouterr().out
        assert "model.layers.0.mlp.down_proj.weight" in shown and "joint" in shown


def test_a_writer_holds_its_temporary_and_writers_of_one_pid_never_share_a_name(tmp_path):
    # what the cleaners above rely on: the writer's lock, held from the temporary's creation to its rename
    from qstrat.io.atomic import atomic_path, remove_stale_temporaries, temp_path_for

    target = tmp_path / "m.gguf"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        assert remove_stale_temporaries(tmp_path, keep_live_writers=True) == 0 and tmp.exists()
    assert target.read_bytes() == b"partial" and not list(tmp_path.glob(".*"))
    assert temp_path_for(target) != temp_path_for(target)  # pid 1 in two containers sharing a volume


def test_the_gguf_parser_gives_gguf_pys_own_fields_for_every_value_type(tmp_path):
    # qstrat parses arrays in one pass (gguf-py's element-by-element parse took seconds for a large
    # vocabulary); what it gives must be exactly what gguf-py's reader gives
    import gguf

    from qstrat.io.gguf_read import open_gguf

    path = tmp_path / "all.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    scalar_types = [t for t in gguf.GGUFValueType if t not in (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)]
    for value_type in scalar_types:
        values = [True, False, True] if value_type == gguf.GGUFValueType.BOOL else [0, 1, 2, 100]
        writer.add_key_value(f"array.{value_type.name}", values, gguf.GGUFValueType.ARRAY, sub_type=value_type)
        writer.add_key_value(f"scalar.{value_type.name}", values[1], value_type)
    writer.add_array("strings", ["", "é中", "x" * 300, "tok"] * 50)
    writer.add_key_value("nested", [[1, 2], [3]], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.ARRAY)
    writer.add_string("string", "end")
    writer.add_tensor("w", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    empty = raw_gguf(tmp_path / "empty.gguf", [("general.architecture", 8, "llama"), ("empty", 9, [], 5), ("after", 9, ["a"], 8)], [])
    for file in (path, empty):  # gguf-py's writer refuses empty arrays; other tools write them
        ours, theirs = open_gguf(file), GGUFReader(file)
        assert list(ours.fields) == list(theirs.fields)
        for key, field in theirs.fields.items():
            mine = ours.fields[key]
            assert (mine.offset, mine.types, mine.data) == (field.offset, field.types, field.data), key
            assert [(p.dtype, p.tobytes()) for p in mine.parts] == [(p.dtype, p.tobytes()) for p in field.parts], key
            assert mine.contents() == field.contents(), key
    ours, theirs = open_gguf(path), GGUFReader(path)
    assert len(ours.fields) > 2 * len(scalar_types) + 4 and np.array_equal(ours.tensors[0].data, theirs.tensors[0].data)
    # cut inside the strings: a truncated file, as before
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: ours.fields["strings"].offset + 2000])
    from qstrat.errors import FormatError

    with pytest.raises(FormatError, match="truncated"):
        open_gguf(cut)


def test_a_moe_ggufs_stacked_experts_are_read_by_every_reader(tmp_path):
    # llama.cpp stores a MoE model's experts as one 3-D tensor (ne = [k, rows, experts]), each row
    # quantized on its own; readers refused it ("qstrat reads 2-D ones") and verify called the file damaged
    import gguf

    from qstrat.reference import ggml_dequantize_row, ggml_quantize_chunk

    rng = np.random.default_rng(5)
    experts = (rng.standard_normal((4, 64, 256)) * 0.05).astype(np.float32)
    stored = {"blk.0.ffn_up_exps.weight": ("q4_k", experts), "blk.0.ffn_down_exps.weight": ("q8_0", experts.transpose(0, 2, 1)[:, :64, :64] * 3)}
    path = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    expected = {}
    for name, (type_name, values) in stored.items():
        rows = np.ascontiguousarray(values.reshape(-1, values.shape[-1]))
        blocks = ggml_quantize_chunk(int(GGMLQuantizationType[type_name.upper()]), rows)
        writer.add_tensor(name, blocks.reshape(values.shape[:-1] + (-1,)), raw_dtype=GGMLQuantizationType[type_name.upper()])
        symbol = type_name[:-1] + "K" if type_name.endswith("_k") else type_name  # GGML's dequantize_row_q4_K
        expected[name] = ggml_dequantize_row(symbol, blocks, values.shape[-1]).reshape(values.shape)
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    listed = run_cli("qstrat", "inspect", str(path))
    assert listed.returncode == 0 and "4x64x256" in listed.stdout and "4x64x64" in listed.stdout, listed.stdout + listed.stderr
    verified = run_cli("qstrat", "verify", str(path))
    assert verified.returncode == 0 and "intact as far as its structure goes" in verified.stdout, verified.stdout + verified.stderr
    decoded = run_cli("qstrat", "dequantize", str(path), str(tmp_path / "values.safetensors"))
    assert decoded.returncode == 0, decoded.stderr
    from safetensors.numpy import load_file

    values = load_file(tmp_path / "values.safetensors")
    for name, want in expected.items():
        assert values[name].shape == want.shape and np.array_equal(values[name], want), name
        assert np.array_equal(qstrat.load_model(path)[name], want) and qstrat.open_model(path)[name].shape == want.shape
    # a directory holds them too (a .qblk file of all their rows), and gives the same GGUF back
    converted = run_cli("qstrat", "convert", str(path), str(tmp_path / "dir"))
    assert converted.returncode == 0, converted.stderr
    assert all(np.array_equal(qstrat.load_model(tmp_path / "dir")[name], want) for name, want in expected.items())
    back = run_cli("qstrat", "convert", str(tmp_path / "dir"), str(tmp_path / "back.gguf"))
    assert back.returncode == 0, back.stderr
    assert stored_blocks(tmp_path / "back.gguf") == stored_blocks(path)


def stored_blocks(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Each tensor of a GGUF file: its GGML type, its shape (numpy order) and its bytes."""
    return {t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())), bytes(np.asarray(t.data).tobytes()))
            for t in GGUFReader(path).tensors}


def test_a_moe_models_stacked_experts_are_quantized_expert_by_expert_as_ggml_does(tmp_path):
    # llama.cpp quantizes a 3-D tensor matrix by matrix, each with its own importance vector (its
    # imatrix holds one per expert); runs passed experts through, decoded to F32: a MoE model's output
    # was several times llama.cpp's
    import gguf

    from qstrat.imatrix import ImportanceEntry, ImportanceMatrix, write_imatrix
    from qstrat.reference import ggml_quantize_chunk

    rng = np.random.default_rng(6)
    experts = {"blk.0.ffn_gate_exps.weight": (rng.standard_normal((4, 64, 256)) * 0.05).astype(np.float32),
               "blk.0.ffn_up_exps.weight": (rng.standard_normal((4, 64, 256)) * 0.05).astype(np.float32),
               "blk.0.ffn_down_exps.weight": (rng.standard_normal((4, 256, 64)) * 0.05).astype(np.float32)}
    experts["blk.0.ffn_up_exps.weight"][2, 5, :40] *= 30  # an outlier in one expert only
    path = tmp_path / "moe.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.expert_count", 4)
    up_blocks = ggml_quantize_chunk(int(GGMLQuantizationType.Q4_K), experts["blk.0.ffn_up_exps.weight"].reshape(-1, 256))
    for name, values in experts.items():
        if name == "blk.0.ffn_up_exps.weight":  # stored in a block type, as llama.cpp's files are
            writer.add_tensor(name, up_blocks.reshape(4, 64, -1), raw_dtype=GGMLQuantizationType.Q4_K)
        else:
            writer.add_tensor(name, values)
    writer.add_tensor("blk.0.ffn_gate_inp.weight", (rng.standard_normal((4, 256)) * 0.05).astype(np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(256, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    decoded = qstrat.load_model(path)
    config = str(REPO / "configs" / "identity.yaml")

    # format q4_k: the F32 experts quantized, the Q4_K ones copied; rows of 64 take llama.cpp's fallback
    run = run_cli("qstrat", "run", config, "-i", str(path), "-o", str(tmp_path / "q4"), "--set", "format=q4_k", "--json")
    assert run.returncode == 0, run.stderr
    assert "warning" not in run.stderr and json.loads(run.stdout)["models"][0]["copied_count"] == 1
    held = stored_blocks(tmp_path / "q4" / "moe.gguf")
    gate = ggml_quantize_chunk(int(GGMLQuantizationType.Q4_K), experts["blk.0.ffn_gate_exps.weight"].reshape(-1, 256))
    down = ggml_quantize_chunk(int(GGMLQuantizationType.Q5_0), experts["blk.0.ffn_down_exps.weight"].reshape(-1, 64))
    assert held["blk.0.ffn_gate_exps.weight"] == ("Q4_K", (4, 64, 256), gate.tobytes())
    assert held["blk.0.ffn_up_exps.weight"] == ("Q4_K", (4, 64, 256), up_blocks.tobytes())
    assert held["blk.0.ffn_down_exps.weight"] == ("Q5_0", (4, 256, 64), down.tobytes())
    assert held["blk.0.ffn_gate_inp.weight"][:2] == ("F32", (4, 256))  # the router: llama.cpp's pure q4_k keeps it too
    manifest = json.loads((tmp_path / "q4" / "manifest.json").read_text())["tensors"]
    assert manifest["blk.0.ffn_down_exps.weight"]["shape"] == [4, 256, 64] and manifest["blk.0.ffn_down_exps.weight"]["fallback_from"] == "q4_k"
    assert run_cli("qstrat", "verify", str(tmp_path / "q4")).returncode == 0
    loaded, from_file = qstrat.load_model(tmp_path / "q4"), qstrat.load_model(tmp_path / "q4" / "moe.gguf")
    assert all(loaded[n].shape == experts[n].shape and np.array_equal(loaded[n], from_file[n]) for n in experts)
    assert np.array_equal(loaded["blk.0.ffn_up_exps.weight"], decoded["blk.0.ffn_up_exps.weight"])

    # with an importance matrix: each expert quantized with its own vector
    sums = rng.uniform(0.0, 4.0, (4, 256)).astype(np.float32)
    sums[1, :128] *= 50
    counts = np.array([10, 3, 0, 7])  # an expert no token reached: its vector is ones, as llama-quantize makes it
    entries = {"blk.0.ffn_up_exps.weight": ImportanceEntry(sums, counts)}
    write_imatrix(tmp_path / "imatrix.gguf", ImportanceMatrix(entries, ["text"], 1, 32))
    weighted = run_cli("qstrat", "run", config, "-i", str(path), "-o", str(tmp_path / "q5"), "--set", "format=q5_k",
                       "--set", f"imatrix={tmp_path / 'imatrix.gguf'}")
    assert weighted.returncode == 0, weighted.stderr
    vectors = [sums[e] / counts[e] if counts[e] else np.ones(256, np.float32) for e in range(4)]
    up = decoded["blk.0.ffn_up_exps.weight"]
    want = b"".join(ggml_quantize_chunk(int(GGMLQuantizationType.Q5_K), up[e], vectors[e].astype(np.float32)).tobytes() for e in range(4))
    assert stored_blocks(tmp_path / "q5" / "moe.gguf")["blk.0.ffn_up_exps.weight"][2] == want
    one_vector = b"".join(ggml_quantize_chunk(int(GGMLQuantizationType.Q5_K), up[e], vectors[0].astype(np.float32)).tobytes() for e in range(4))
    assert want != one_vector  # the experts' vectors differ where it shows
    # an importance matrix of one vector for a stack of four is refused, naming both
    write_imatrix(tmp_path / "flat.gguf", ImportanceMatrix({"blk.0.ffn_up_exps.weight": ImportanceEntry(sums[:1], counts[:1])}, ["text"], 1, 32))
    flat = run_cli("qstrat", "run", config, "-i", str(path), "-o", str(tmp_path / "flat"), "--set", "format=q5_k",
                   "--set", f"imatrix={tmp_path / 'flat.gguf'}")
    assert_clean_failure(flat, "blk.0.ffn_up_exps.weight has 256 values;", "4 matrices with rows of 256 (1024 values)")

    # the original tool's Q8K holds matrices: stacks pass through, said before the run starts, with why
    q8k = run_cli("qstrat", "run", config, "-i", str(path), "-o", str(tmp_path / "q8k"))
    assert q8k.returncode == 0, q8k.stderr
    assert ("warning: moe: 3 weight tensors of more than two dimensions, such as a MoE model's experts (blk.0.ffn_down_exps.weight, "
            "blk.0.ffn_gate_exps.weight, blk.0.ffn_up_exps.weight), are not quantized (blk.0.ffn_down_exps.weight: 3-D: a stack of "
            "matrices (a MoE model's experts); Q8_K holds matrices only (the original tool's .q8k files): give stacks a GGUF block type) "
            "but passed through, "
            "decoded to F32") in q8k.stderr
    assert all(np.array_equal(qstrat.load_model(tmp_path / "q8k")[n], decoded[n]) for n in experts)
    legacy = run_cli("qstrat", "quantize", str(path), str(tmp_path / "legacy"))  # the original tool's command says it too
    assert legacy.returncode == 0 and "warning: 3 weight tensors of more than two dimensions" in legacy.stderr, legacy.stderr
    # a joint strategy leaves them alone; residual_stream does not know them, and says so
    joint = run_cli("qstrat", "run", str(REPO / "configs" / "function_preserving.yaml"), "-i", str(path), "-o", str(tmp_path / "joint"),
                    "--set", "format=q8_0")
    assert joint.returncode == 0, joint.stderr
    held = stored_blocks(tmp_path / "joint" / "moe.gguf")
    tensors = json.loads((tmp_path / "joint" / "manifest.json").read_text())["tensors"]
    for name in experts:  # in place: GGML's Q8_0 of the source rows (the Q4_K stack's decoded ones)
        want = ggml_quantize_chunk(int(GGMLQuantizationType.Q8_0), decoded[name].reshape(-1, experts[name].shape[-1]))
        assert held[name] == ("Q8_0", experts[name].shape, want.tobytes()) and tensors[name]["permutation"] == "none"
    residual = run_cli("qstrat", "run", str(REPO / "configs" / "residual_stream.yaml"), "-i", str(path), "-o", str(tmp_path / "residual"),
                       "--set", "format=q8_0")
    assert_clean_failure(residual, "blk.0.ffn_down_exps.weight' holds a mixture-of-experts model's experts", "it refuses MoE models")
    compared = run_cli("qstrat", "compare", str(path), "-f", "q4_k,q8_0", "-s", "identity", "--json")
    assert compared.returncode == 0, compared.stderr
    rows = json.loads(compared.stdout)["chains"]
    assert [(r["format"], r["tensor_count"]) for r in rows] == [("q4_k", 3), ("q8_0", 3)] and rows[0]["bits_per_weight"] < rows[1]["bits_per_weight"]
    # qstrat's importance matrix comes from its numpy forward, of dense models: llama.cpp's for this one
    (tmp_path / "text.txt").write_text("some words to read\n" * 20)
    collected = run_cli("qstrat", "imatrix", str(path), "--text", str(tmp_path / "text.txt"), "-o", str(tmp_path / "mine.gguf"))
    assert_clean_failure(collected, "a mixture-of-experts model (llama.expert_count 4): the numpy forward computes dense models only")


def test_a_qstrat_gguf_with_run_time_permutations_is_no_runs_input(tmp_path):
    # its matrices hold permuted columns and its .perm gather maps passed through as model tensors:
    # the output failed qstrat's own verify
    rng = np.random.default_rng(8)
    model = write_model(tmp_path / "m", {f"l.{i}.weight": rng.standard_normal((32, 256)).astype(np.float32) for i in range(2)}, dtype="F32")
    made = run_cli("qstrat", "run", str(REPO / "configs" / "l2_norm.yaml"), "-i", str(model), "-o", str(tmp_path / "perm"), "-q",
                   "--set", "format=q8_0")
    assert made.returncode == 0, made.stderr
    again = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(tmp_path / "perm" / "m.gguf"),
                    "-o", str(tmp_path / "again"), "--set", "format=q8_0")
    assert_clean_failure(again, "m.gguf: holds run-time permutations (.perm gather maps, for Candle), which only those gathers undo")
    assert again.returncode == 2 and not (tmp_path / "again").exists()
    # the way the message gives: its original weights, then a run
    assert run_cli("qstrat", "dequantize", str(tmp_path / "perm" / "m.gguf"), str(tmp_path / "w.safetensors")).returncode == 0
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(tmp_path / "w.safetensors"),
                   "-o", str(tmp_path / "plain"), "-q", "--set", "format=q8_0").returncode == 0


def test_a_stack_with_a_run_time_gather_map_is_unpermuted_along_its_columns(tmp_path):
    # a .perm permutes the k columns of every row; a directory's reader reshaped a stack to (experts,
    # rows, k) first and then unpermuted its rows (axis 1), where the GGUF's own reader was right
    import gguf

    from qstrat.reference import ggml_quantize_chunk

    rng = np.random.default_rng(11)
    stack = (rng.standard_normal((3, 8, 64)) * 0.05).astype(np.float32)
    perm = rng.permutation(64).astype(np.int32)  # stored column i holds source column perm[i]
    blocks = ggml_quantize_chunk(int(GGMLQuantizationType.Q8_0), stack[:, :, perm].reshape(-1, 64))
    path = tmp_path / "gathered.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_array("qstrat.perm_tensors", ["blk.0.ffn_up_exps.weight.perm"])
    writer.add_tensor("blk.0.ffn_up_exps.weight", blocks.reshape(3, 8, -1), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up_exps.weight.perm", perm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from_file = qstrat.load_model(path)["blk.0.ffn_up_exps.weight"]
    assert from_file.shape == (3, 8, 64)
    np.testing.assert_allclose(from_file, stack, atol=0.002)  # Q8_0's error, columns in the source order
    result = run_cli("qstrat", "convert", str(path), str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    assert run_cli("qstrat", "verify", str(tmp_path / "d")).returncode == 0
    assert np.array_equal(qstrat.load_model(tmp_path / "d")["blk.0.ffn_up_exps.weight"], from_file)
    assert run_cli("qstrat", "convert", str(tmp_path / "d"), str(tmp_path / "back.gguf")).returncode == 0
    assert np.array_equal(qstrat.load_model(tmp_path / "back.gguf")["blk.0.ffn_up_exps.weight"], from_file)
