"""Importance matrices: ``qstrat imatrix`` writes llama.cpp's GGUF imatrix format, qstrat reads it
and llama.cpp's legacy ``.dat``, and the config key ``imatrix:`` drives GGML's weighted quantizers
(libggml-python is the oracle; llama.cpp, which tokenizes, runs in the CLI's own process)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from qstrat.imatrix import read_imatrix
from qstrat.io.gguf import GGUFModel
from qstrat.io.safetensors import SafetensorsModel, map_tensor, to_float32, write_safetensors
from qstrat.pipelines.run import quantize_model
from qstrat.reference import ggml_quantize_chunk
from qstrat.runconfig import RunConfig
from qstrat.synthetic import LlamaShape, hf_config, llama_tensors, write_model
from tests.helpers import assert_clean_failure, make_bpe_tokenizer, rewrite_gguf, run_cli

SHAPE = LlamaShape(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
CTX = 32
#: the matrices of each layer, as llama-imatrix names them (the output head is left out by default)
LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Llama with a BPE tokenizer, a text of a few chunks, and its importance matrix."""
    root = tmp_path_factory.mktemp("imatrix")
    directory = write_model(root / "tiny", llama_tensors(SHAPE, seed=11), dtype="BF16", config=hf_config(SHAPE))
    lines = make_bpe_tokenizer(directory, SHAPE.vocab_size)
    text = root / "text.txt"
    text.write_text("\n".join(lines[:60]) + "\n", encoding="utf-8")
    imatrix = root / "tiny.imatrix.gguf"
    result = run_cli("qstrat", "imatrix", str(directory), "--text", str(text), "-o", str(imatrix), "--ctx", str(CTX), "--chunks", "3", "--json")
    assert result.returncode == 0, result.stderr
    return directory, text, imatrix, json.loads(result.stdout.strip().splitlines()[-1])


def source_matrices(directory):
    return {info.name: to_float32(info.dtype, np.asarray(map_tensor(info))).astype(np.float32)
            for info in SafetensorsModel(directory) if len(info.shape) == 2}


def llama_cpp_vectors(path) -> dict[str, np.ndarray]:
    """Importance vectors as llama-quantize's load_imatrix makes them of a GGUF imatrix, read
    with gguf-py: float32 ``in_sum2 / counts``."""
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(path).tensors}
    return {
        name[: -len(".in_sum2")]: (values.reshape(-1) / tensors[name[: -len(".in_sum2")] + ".counts"].reshape(-1)[0]).astype(np.float32)
        for name, values in tensors.items() if name.endswith(".in_sum2")
    }


def test_imatrix_file_is_llama_cpps_format(model):
    directory, text, imatrix, answer = model
    reader = GGUFReader(imatrix)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "imatrix" and "general.architecture" not in fields
    assert fields["imatrix.datasets"] == [str(text)]
    assert fields["imatrix.chunk_count"] == 3 and fields["imatrix.chunk_size"] == CTX
    expected = {f"blk.{i}.{m}.weight" for i in range(SHAPE.num_hidden_layers) for m in LAYER_MATRICES}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {f"{n}.in_sum2" for n in expected} | {f"{n}.counts" for n in expected}
    for name in expected:
        sums, counts = tensors[f"{name}.in_sum2"], tensors[f"{name}.counts"]
        assert sums.tensor_type == counts.tensor_type == GGMLQuantizationType.F32
        k = SHAPE.intermediate_size if name.endswith("ffn_down.weight") else SHAPE.hidden_size
        assert [int(d) for d in sums.shape] == [k, 1] and [int(d) for d in counts.shape] == [1, 1]
        assert float(counts.data.reshape(-1)[0]) == 3 * CTX  # every token of every chunk
        assert np.all(np.asarray(sums.data) > 0)
    assert answer["chunks"] == 3 and answer["tokens"] == 3 * CTX and answer["matrices"] == len(expected)
    # q, k and v read the same normalized input; the first layer's is computable from the weights
    sums = {m: np.asarray(tensors[f"blk.0.{m}.weight.in_sum2"].data).reshape(-1) for m in ("attn_q", "attn_k", "attn_v")}
    assert np.array_equal(sums["attn_q"], sums["attn_k"]) and np.array_equal(sums["attn_q"], sums["attn_v"])


def test_first_layer_sums_are_the_squared_normalized_embeddings(model, tmp_path):
    directory, text, imatrix, _ = model
    # llama.cpp's tokens of the text, through a GGUF of the same vocabulary (the probe tokenizes)
    converted = tmp_path / "out"
    quantize_model(directory, RunConfig.build({"format": "f32"}, "test"), converted)
    probe = Path(__file__).with_name("llama_cpp_probe.py")
    payload = text.read_bytes()[:-1].decode("utf-8")  # llama.cpp's -f drops one final newline
    ran = subprocess.run([sys.executable, str(probe), str(converted / "tiny.gguf"), str(tmp_path / "x.npy"), json.dumps({"text": payload})],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    answer = json.loads(ran.stdout.strip().splitlines()[-1])
    # llama-imatrix: BOS first when the vocabulary adds one, then each chunk's first token made BOS
    tokens = np.asarray(([answer["bos"]] if answer["add_bos"] else []) + answer["tokens"])[: 3 * CTX].reshape(3, CTX)
    if answer["add_bos"]:
        tokens[:, 0] = answer["bos"]
    tokens = tokens.reshape(-1)
    weights = source_matrices(directory)
    norm = to_float32("BF16", np.asarray(map_tensor(SafetensorsModel(directory).tensors["model.layers.0.input_layernorm.weight"])))
    x = weights["model.embed_tokens.weight"][tokens].astype(np.float64)
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + SHAPE.rms_norm_eps) * norm
    expected = (h * h).sum(axis=0)
    got = llama_cpp_vectors(imatrix)["blk.0.attn_q.weight"] * (3 * CTX)
    assert np.allclose(got, expected, rtol=1e-4), np.abs(got / expected - 1).max()


def run_with_imatrix(directory, imatrix, out, fmt="q4_k", extra=""):
    config = out.parent / f"{out.name}.yaml"
    config.write_text(
        f"input: {directory}\noutput: {out}\nformat: {fmt}\nimatrix: {imatrix}\n"
        f"validation: {{stages: [weight_error]}}\n{extra}"
    )
    return run_cli("qstrat", "run", str(config), "--json")


def stored_bytes(out, name):
    model = GGUFModel(out / "tiny.gguf")
    tensor = model.tensors[name]
    rows = [int(d) for d in reversed(tensor.shape.tolist())][0]
    return model.source_rows(name, np.asarray(tensor.data).view(np.uint8).reshape(rows, -1)), tensor.tensor_type.name.lower()


def test_an_imatrix_drives_a_q4_k_run_with_ggmls_weighted_bytes(model, tmp_path):
    directory, _, imatrix, _ = model
    result = run_with_imatrix(directory, imatrix, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    vectors = llama_cpp_vectors(imatrix)
    out = tmp_path / "out"
    gguf_names = {name: tensor.name for name, tensor in GGUFModel(out / "tiny.gguf").tensors.items()}
    weighted = 0
    for name, source in source_matrices(directory).items():
        stored, type_name = stored_bytes(out, name)
        assert type_name == "q4_k", name
        vector = vectors.get(gguf_names[name])
        oracle = ggml_quantize_chunk(int(GGMLQuantizationType.Q4_K), source, imatrix=vector)
        assert np.array_equal(stored, oracle), f"{name}: not GGML's weighted bytes"
        if vector is not None:
            weighted += 1
            assert not np.array_equal(stored, ggml_quantize_chunk(int(GGMLQuantizationType.Q4_K), source)), name
    assert weighted == len(vectors)  # every layer matrix had its vector; embeddings and head none
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["imatrix"]["path"] == str(imatrix)
    assert report["summary"]["imatrix"]["used"] == weighted
    assert report["summary"]["imatrix"]["missing"] == ["lm_head.weight", "model.embed_tokens.weight"]
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert report["tensors"][name]["imatrix"] is False
    tensor = report["tensors"]["model.layers.0.mlp.down_proj.weight"]
    assert tensor["imatrix"] is True and tensor["metrics"]["weighted_sqnr_db"] > 10
    outcome = json.loads(result.stdout.strip().splitlines()[-1])["models"][0]
    assert outcome["imatrix"]["missing"] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert "importance matrix" in (out / "report.md").read_text()


def write_legacy_dat(path, vectors: dict[str, np.ndarray], ncall: int, dataset: str) -> None:
    """llama.cpp's legacy layout (save_imatrix_legacy): values are ``sum / count * ncall``."""
    parts = [struct.pack("<i", len(vectors))]
    for name, values in sorted(vectors.items()):
        raw = name.encode()
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), (values * np.float32(ncall)).astype("<f4").tobytes()]
    parts += [struct.pack("<i", ncall), struct.pack("<i", len(dataset)), dataset.encode()]
    path.write_bytes(b"".join(parts))


def test_legacy_dat_imatrix(model, tmp_path):
    directory, _, imatrix, _ = model
    vectors = llama_cpp_vectors(imatrix)
    dat = tmp_path / "tiny.imatrix.dat"
    write_legacy_dat(dat, vectors, ncall=3, dataset="text.txt")
    read = read_imatrix(dat)
    assert read.legacy and read.chunk_count == 3 and read.datasets == ["text.txt"]
    expected = {n: (v * np.float32(3)).astype(np.float32) / np.float32(3) for n, v in vectors.items()}  # load_imatrix: sum / ncall
    assert set(read.entries) == set(vectors)
    assert all(np.array_equal(read.vector(n), expected[n]) for n in vectors)
    result = run_with_imatrix(directory, dat, tmp_path / "out", fmt="q4_0")
    assert result.returncode == 0, result.stderr
    gguf_names = {name: tensor.name for name, tensor in GGUFModel(tmp_path / "out" / "tiny.gguf").tensors.items()}
    for name, source in source_matrices(directory).items():
        stored, type_name = stored_bytes(tmp_path / "out", name)
        vector = expected.get(gguf_names[name])
        assert np.array_equal(stored, ggml_quantize_chunk(int(GGMLQuantizationType[type_name.upper()]), source, imatrix=vector)), name


def test_imatrix_errors_are_one_line(model, tmp_path):
    directory, text, imatrix, _ = model
    wrong = tmp_path / "wrong.dat"
    write_legacy_dat(wrong, {"blk.0.attn_q.weight": np.ones(128, dtype=np.float32)}, ncall=1, dataset="x")
    failure = run_with_imatrix(directory, wrong, tmp_path / "a")
    assert_clean_failure(failure, "blk.0.attn_q.weight has 128 values", "model.layers.0.self_attn.q_proj.weight", "rows of 256")
    assert not (tmp_path / "a" / "manifest.json").exists()
    not_imatrix = tmp_path / "model.gguf"
    not_imatrix.write_bytes(b"GGUF" + b"\0" * 20)
    assert_clean_failure(run_with_imatrix(directory, not_imatrix, tmp_path / "b"), str(not_imatrix))
    assert_clean_failure(run_with_imatrix(directory, tmp_path / "missing.gguf", tmp_path / "c"), "missing.gguf: no such importance matrix file")
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(b"\x05\0\0\0\x03\0\0\0ab")
    assert_clean_failure(run_with_imatrix(directory, garbage, tmp_path / "d"), "garbage.dat")
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    assert_clean_failure(run_cli("qstrat", "imatrix", str(directory), "--text", str(short), "-o", str(tmp_path / "x.gguf"), "--ctx", "32"),
                         "fewer than the 64 needed with a context of 32 (two chunks, as llama-imatrix requires)")
    assert_clean_failure(run_cli("qstrat", "imatrix", str(directory), "--text", str(text), "-o", str(tmp_path / "x.gguf"), "--ctx", "8"),
                         "--ctx 8: at least 16")
    assert_clean_failure(run_cli("qstrat", "imatrix", str(directory), "--text", str(text), "-o", str(tmp_path / "x.gguf"), "--ctx", "-3"),
                         "--ctx -3: at least 16")  # it said 4, then 16 for 8
    # a Latin-1 file: llama.cpp's tokenizer reads each bad byte as U+FFFD, and so the text was another, silently
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(Path(text).read_bytes()[:200] + "café".encode("latin-1") + Path(text).read_bytes()[200:])
    for command in (("imatrix", str(directory), "-o", str(tmp_path / "x.gguf")), ("eval", str(directory)),
                    ("compare", str(directory), "-f", "q8_0", "-s", "identity")):
        assert_clean_failure(run_cli("qstrat", *command, "--text", str(latin1)), f"{latin1}: not UTF-8 text (byte 0xe9 at offset 203)")
    assert not (tmp_path / "x.gguf").exists()
    # beyond the trained context (config.json's 2048): llama.cpp's engine warned, the numpy forward did not
    for command in (("imatrix", str(directory), "-o", str(tmp_path / "x.gguf")), ("eval", str(directory))):
        result = run_cli("qstrat", *command, "--text", str(text), "--ctx", "4096")
        assert f"warning: {directory} was trained on contexts of 2048 tokens, --ctx is 4096" in result.stderr, result.stderr
        assert_clean_failure(result, "fewer than the 8192 needed")
    # before any case is quantized (it was checked once the first case had run)
    result = run_cli("qstrat", "compare", str(directory), "-f", "q8_0", "-s", "identity", "--text", str(short), "--ctx", "32")
    assert_clean_failure(result, "fewer than the 64 needed")
    assert "q8_0" not in result.stdout + result.stderr.replace(str(short), "")


@pytest.mark.slow
def test_eval_by_the_numpy_forward_measures_a_q8k_run(model, tmp_path):
    """Q8_K weights, which llama.cpp cannot run, are evaluated by the numpy forward: a qstrat output
    directory against its Hugging Face source (tokens by llama.cpp's tokenizer of the source)."""
    directory, text, _, _ = model
    out = tmp_path / "q8k"
    quantize_model(directory, RunConfig.build({}, "test"), out)  # the default: the original tool's Q8K
    assert any(p.suffix == ".q8k" for p in out.iterdir())
    args = ("--text", str(text), "--ctx", str(CTX), "--json")
    quantized = run_cli("qstrat", "eval", str(out), "--reference", str(directory), *args)
    assert quantized.returncode == 0, quantized.stderr
    figures = json.loads(quantized.stdout.strip().splitlines()[-1])
    assert figures["engine"].startswith("qstrat's numpy forward")
    assert figures["chunks"] == figures["tokens"] // CTX >= 3
    assert 0 < figures["kl_divergence"] < 0.01 and figures["top1_agreement"] > 0.8  # a random model: flat predictions
    assert abs(figures["perplexity"] / figures["reference_perplexity"] - 1) < 0.05
    itself = json.loads(run_cli("qstrat", "eval", str(directory), "--reference", str(directory), *args).stdout.strip().splitlines()[-1])
    assert itself["kl_divergence"] == 0 and itself["top1_agreement"] == 1
    assert itself["perplexity"] == figures["reference_perplexity"]
    no_tokenizer = write_model(tmp_path / "bare", llama_tensors(SHAPE, seed=2), dtype="BF16", config=hf_config(SHAPE))
    assert_clean_failure(run_cli("qstrat", "eval", str(no_tokenizer), *args), "no tokenizer")
    # qstrat's Q8K container with run-time permutations: the gather is not the forward's to apply
    quantize_model(directory, RunConfig.build({"strategies": ["l2_norm"], "outputs": ["q8k", "gguf"]}, "test"), tmp_path / "perm")
    assert_clean_failure(run_cli("qstrat", "eval", str(tmp_path / "perm" / "tiny.gguf"), "--engine", "numpy", *args),
                         "holds run-time permutations (.perm gather maps, for Candle), which only those gathers undo")
    permuted = json.loads(run_cli("qstrat", "eval", str(tmp_path / "perm"), "--reference", str(directory), *args).stdout)
    assert 0 < permuted["kl_divergence"] < 0.01  # the directory: its gather undone on reading
    # a qstrat GGUF changed since it was written is not read as the model by the forward either
    quantize_model(directory, RunConfig.build({"format": "q8_0", "outputs": ["gguf"]}, "test"), tmp_path / "q8_0")
    changed = bytearray((tmp_path / "q8_0" / "tiny.gguf").read_bytes())
    changed[len(changed) // 2] ^= 1
    (tmp_path / "changed.gguf").write_bytes(bytes(changed))
    for command in (("eval", "--engine", "numpy", *args), ("imatrix", "--text", str(text), "-o", str(tmp_path / "x.gguf"))):
        result = run_cli("qstrat", command[0], str(tmp_path / "changed.gguf"), *command[1:])
        assert result.returncode == 2, result.stderr
        assert_clean_failure(result, "changed.gguf: the sha256 of its header and tensor data differs")


@pytest.mark.slow
def test_compare_formats_chains_imatrix_and_text(model, tmp_path):
    """qstrat compare's axes: block type or preset x strategy chain x importance matrix, each case
    evaluated on a text against the source model; a combination llama.cpp cannot run is refused in its row."""
    directory, text, imatrix, _ = model
    result = run_cli("qstrat", "compare", str(directory), "-f", "q8_k,q4_k", "-s", "identity,l2_norm",
                     "--imatrix", str(imatrix), "--text", str(text), "--ctx", str(CTX), "-o", str(tmp_path / "cmp"), "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["chains"]
    assert [(r["format"], r["chain"], r["imatrix"]) for r in rows] == [
        (f, c, i) for f in ("q8_k", "q4_k") for c in ("identity", "l2_norm") for i in (False, True)]
    by = {(r["format"], r["chain"], r["imatrix"]): r for r in rows}
    assert "at run time" in by[("q4_k", "l2_norm", False)]["error"]  # a .perm gather llama.cpp cannot apply
    assert by[("q8_k", "l2_norm", False)]["runtime_permutations"] > 0  # Q8K for Candle: allowed
    for key, row in by.items():
        if "error" in row:
            continue
        assert row["bits_per_weight"] == (9.125 if key[0] == "q8_k" else 4.5)
        assert 0 < row["kl_divergence"] and row["perplexity"] > 1
        assert (row["imatrix_summary"] is not None) == key[2]
    # fewer bits, a larger divergence from the source
    assert by[("q4_k", "identity", False)]["kl_divergence"] > 3 * by[("q8_k", "identity", False)]["kl_divergence"]
    # quantized with the importance of this text's activations, the model departs less from the
    # source on it (measured: 0.0203 against 0.0221 nats, uncertainties 0.0004)
    assert by[("q4_k", "identity", True)]["kl_divergence"] < by[("q4_k", "identity", False)]["kl_divergence"]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| q4_k | l2_norm | no | refused:" in table and "numpy forward" in table
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.json", "compare.md", "compare.png"]


@pytest.mark.slow
def test_importance_vectors_move_with_joint_permutations(model, tmp_path):
    """Under mlp_joint, down_proj is stored with its columns permuted: its importance vector is
    permuted with them, and the bytes are GGML's of the permuted columns with the permuted vector."""
    from qstrat.model import QuantizedModel, as_directory

    directory, _, imatrix, _ = model
    out = tmp_path / "out"
    result = run_with_imatrix(directory, imatrix, out, fmt="q4_0", extra="strategies: [mlp_joint, identity]\n")
    assert result.returncode == 0, result.stderr
    vectors = llama_cpp_vectors(imatrix)
    sources = source_matrices(directory)
    permuted = 0
    with as_directory(out) as stored_dir:
        stored_model = QuantizedModel(stored_dir)
        for layer in range(SHAPE.num_hidden_layers):
            name = f"model.layers.{layer}.mlp.down_proj.weight"
            joint = stored_model.joint_permutation(name)
            if joint is None:
                continue
            perm, axis = joint
            assert axis == 1
            permuted += 1
            stored, _ = stored_bytes(out, name)
            vector = vectors[f"blk.{layer}.ffn_down.weight"]
            oracle = ggml_quantize_chunk(int(GGMLQuantizationType.Q4_0), np.ascontiguousarray(sources[name][:, perm]), imatrix=vector[perm])
            assert np.array_equal(stored, oracle), name
            unmoved = ggml_quantize_chunk(int(GGMLQuantizationType.Q4_0), np.ascontiguousarray(sources[name][:, perm]), imatrix=vector)
            assert not np.array_equal(stored, unmoved), name  # the vector did move
    assert permuted, "mlp_joint kept every down projection in place: the test checks nothing"


def test_an_imatrix_that_names_none_of_the_models_tensors_is_a_warning(model, tmp_path):
    # another model's importance matrix: nothing to weight with, which the report showed only as used 0
    _, _, imatrix, _ = model
    other = tmp_path / "other"
    other.mkdir()
    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    write_safetensors(other / "model.safetensors", [("encoder.dense.weight", "F32", x.shape, x)])
    result = run_with_imatrix(other, imatrix, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])["models"][0]
    assert line["imatrix"]["used"] == 0
    assert (f"the importance matrix {imatrix} has a vector for none of the 1 quantized tensors: they were quantized "
            "without one") in line["warnings"], line


def test_a_directory_converted_from_a_rewritten_qstrat_gguf_is_evaluated_as_the_file(model, tmp_path):
    # llama.cpp's quantizer copies qstrat's keys into its file, so the directory `qstrat convert` makes of it
    # reads back under the Hugging Face names, which the forward of its GGUF source did not find
    directory, text, _, _ = model
    quantize_model(directory, RunConfig.build({"format": "f32", "outputs": ["gguf"], "validation": {"enabled": False}}, "test"), tmp_path / "f32")

    def q8_0(tensor):  # what llama.cpp's Q8_0 gives its matrices (GGML's bytes)
        values = np.asarray(tensor.data, dtype=np.float32)
        if values.ndim != 2:
            return values, None
        return ggml_quantize_chunk(int(GGMLQuantizationType.Q8_0), values), GGMLQuantizationType.Q8_0

    rewritten = rewrite_gguf(tmp_path / "f32" / "tiny.gguf", tmp_path / "rewritten.gguf", q8_0)
    converted = run_cli("qstrat", "convert", str(rewritten), str(tmp_path / "dir"))
    assert converted.returncode == 0, converted.stderr
    args = ("--text", str(text), "--ctx", "32", "--chunks", "2", "--engine", "numpy", "--json")
    figures = [run_cli("qstrat", "eval", str(path), *args) for path in (rewritten, tmp_path / "dir")]
    assert all(f.returncode == 0 for f in figures), [f.stderr for f in figures]
    file_figures, directory_figures = (json.loads(f.stdout.strip().splitlines()[-1]) for f in figures)
    assert directory_figures["perplexity"] == file_figures["perplexity"]
