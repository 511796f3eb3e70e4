"""The GGUF of a Llama-family model is a model llama.cpp runs: llama.cpp itself is the judge.

llama.cpp (llama-cpp-python) runs in a subprocess (tests/llama_cpp_probe.py): it must never
be loaded into the process that loads libggml-python, the other tests' oracle.  Its logits
are compared with a numpy forward pass of the source weights (tests/forward.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

import qstrat
from qstrat.convert import gguf_metadata
from qstrat.forward import open_forward
from qstrat.io.gguf import GGUFModel, write_gguf
from qstrat.io.safetensors import SafetensorsModel, map_tensor, to_float32
from qstrat.model import QuantizedModel, as_directory
from qstrat.pipelines.run import quantize_model
from qstrat.runconfig import RunConfig
from qstrat.synthetic import LlamaShape, hf_config, llama_tensors, write_model
from tests.conftest import REPO
from tests.forward import bert_tensors, llama_forward
from tests.helpers import assert_clean_failure, make_bpe_tokenizer, make_sentencepiece_tokenizer, run_cli

PROBE = Path(__file__).with_name("llama_cpp_probe.py")
#: 4 query heads sharing 2 key/value heads (grouped-query attention), 2 layers; rows of 256
#: and 512, so that every K-quant takes them
SHAPE = LlamaShape(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
TOKENS = [0, 37, 101, 5, 250, 77, 3, 190]
#: llama.cpp keeps K and V in f16 and accumulates in float32: its logits differ from the float64
#: forward pass of the same weights by about 1e-4 of their range here; a wrong q/k row layout by
#: far more than this bound (measured: see test_f32_gguf_is_the_source_model_in_llama_cpp)
F32_TOLERANCE = 2e-3


def relative_error(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(logits - reference)) / np.max(np.abs(reference)))


def probe(gguf: Path, tokens=TOKENS, text: str | None = None) -> tuple[np.ndarray | None, dict]:
    """llama.cpp's logits for ``tokens`` (and its tokenization of ``text``), from a subprocess."""
    out = gguf.with_suffix(".logits.npy")
    request = {"tokens": list(tokens), **({"text": text} if text is not None else {})}
    result = subprocess.run([sys.executable, str(PROBE), str(gguf), str(out), json.dumps(request)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"llama.cpp could not run {gguf.name}:\n{result.stderr[-3000:]}"
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    return (np.load(out) if tokens else None), answer


def source_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """The source tensors as exact float32 (bf16 widened)."""
    return {info.name: to_float32(info.dtype, np.asarray(map_tensor(info))).astype(np.float32) for info in SafetensorsModel(model_dir)}


def run(model_dir: Path, out: Path, **settings):
    config = RunConfig.build({"validation": {"stages": ["weight_error"]}, **settings}, "test")
    return quantize_model(model_dir, config, out)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama") / "tiny"
    write_model(directory, llama_tensors(SHAPE, seed=3), dtype="BF16", shards=2, config=hf_config(SHAPE))
    make_bpe_tokenizer(directory, SHAPE.vocab_size)
    return directory


@pytest.fixture(scope="module")
def f32_run(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("f32") / "out"
    result = run(llama_dir, out, format="f32")
    return out, result


def test_f32_gguf_is_the_source_model_in_llama_cpp(llama_dir, f32_run, tmp_path):
    out, result = f32_run
    gguf = out / "tiny.gguf"
    assert result.container["llama_cpp"] and result.container["architecture"] == "llama"
    reference = llama_forward(source_weights(llama_dir), SHAPE, np.array(TOKENS))
    text = "the quick brown fox said: Don't forget 12345 merges!"
    logits, answer = probe(gguf, text=text)
    error = relative_error(logits, reference)
    assert error < F32_TOLERANCE, error
    # qstrat's numpy forward computes llama.cpp's graph: from the GGUF, from the source directory
    # (in llama.cpp's layout) and from the run's output directory
    for source in (gguf, llama_dir, out):
        assert relative_error(numpy_forward(source), logits) < F32_TOLERANCE, source
    meta = answer["metadata"]
    assert meta["general.architecture"] == "llama" and meta["llama.attention.head_count_kv"] == "2"
    assert meta["general.file_type"] == "0" and meta["tokenizer.ggml.pre"] == "gpt-2"  # ALL_F32
    # the vocabulary: llama.cpp splits text into the same tokens as the model's own tokenizer
    from tokenizers import Tokenizer

    expected = Tokenizer.from_file(str(llama_dir / "tokenizer.json")).encode(text).ids
    assert answer["tokens"] == expected and answer["detokenized"] == text
    # without llama.cpp's q/k row layout the same weights are a different model: far off
    unpermuted = tmp_path / "unpermuted.gguf"
    with as_directory(out) as directory:
        model = QuantizedModel(directory)
        metadata = gguf_metadata(model, llama_dir)
        metadata["layout"].row_heads = {}
        write_gguf(model, unpermuted, metadata)
    wrong, _ = probe(unpermuted)
    assert relative_error(wrong, reference) > 20 * F32_TOLERANCE, relative_error(wrong, reference)


def test_llama_cpp_layout_reads_back_as_the_source(llama_dir, f32_run):
    out, _ = f32_run
    names = {t.name for t in GGUFReader(out / "tiny.gguf").tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.weight", "output_norm.weight"} <= names
    source = source_weights(llama_dir)
    for path in (out, out / "tiny.gguf"):
        loaded = qstrat.load_model(path)
        assert set(loaded) == set(source)
        assert all(np.array_equal(loaded[n], source[n]) for n in source)  # q/k rows back in order
    back = GGUFModel(out / "tiny.gguf")
    assert back.widened["model.norm.weight"] == "BF16"  # stored as F32, read back as the source's bf16
    converted = out.parent / "converted.gguf"
    commands = (("verify", str(out)), ("verify", str(out / "tiny.gguf")), ("convert", str(out), str(converted)), ("inspect", str(out / "tiny.gguf")))
    for command in commands:
        result = run_cli("qstrat", *command)
        assert result.returncode == 0, result.stderr
    assert "tiny.gguf: a llama.cpp model (architecture llama)" in result.stdout
    assert converted.read_bytes() == (out / "tiny.gguf").read_bytes()  # the source directory is at hand
    # a directory converted from that GGUF holds its tensors under their Hugging Face names, and no source
    # model to lay them out again for llama.cpp: refused, where it wrote a file llama.cpp could not load
    mapped_back, again = out.parent / "mapped-back", out.parent / "again.gguf"
    assert run_cli("qstrat", "convert", str(out / "tiny.gguf"), str(mapped_back)).returncode == 0
    refused = run_cli("qstrat", "convert", str(mapped_back), str(again))
    assert refused.returncode == 2 and not again.exists()
    assert_clean_failure(refused, "a GGUF in llama.cpp's layout", "use that GGUF itself")
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["gguf"]["llama_cpp"] is True
    assert "- GGUF tiny.gguf: a llama.cpp model (architecture llama, vocabulary: BPE (gpt2, pre-tokenizer gpt-2), 320 tokens)" in (out / "report.md").read_text()


def numpy_forward(path: Path, tokens=TOKENS) -> np.ndarray:
    """qstrat's own numpy forward (qstrat eval --engine numpy, qstrat imatrix) of a GGUF file,
    a Hugging Face directory or a qstrat output directory."""
    with open_forward(path) as (forward, _):
        return forward.logits(tokens)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


#: llama.cpp multiplies quantized weights by activations it quantizes too (Q8_0 / Q8_K), so its
#: logits differ from a float64 forward pass of the same dequantized weights: measured 0.025 (Q8_0)
#: and 0.044 (Q4_K_M) of the logits' range on this model, 0.021 for Q4_0 on the model of heads of 48
QUANTIZED_TOLERANCE = {"q8_0": 0.05, "q4_k_m": 0.1, "q4_0": 0.05}


@pytest.mark.parametrize("settings, file_type", [({"format": "q8_0"}, 7), ({"preset": "q4_k_m"}, 15)])
def test_quantized_ggufs_run_in_llama_cpp(llama_dir, f32_run, tmp_path, settings, file_type):
    run(llama_dir, tmp_path / "out", **settings)
    logits, answer = probe(tmp_path / "out" / "tiny.gguf")
    assert int(answer["metadata"]["general.file_type"]) == file_type
    assert np.all(np.isfinite(logits))
    # llama.cpp computes the model the file holds: the forward pass of its dequantized weights
    held = llama_forward(qstrat.load_model(tmp_path / "out"), SHAPE, np.array(TOKENS))
    kind = settings.get("format") or settings["preset"]
    assert relative_error(logits, held) < QUANTIZED_TOLERANCE[kind], relative_error(logits, held)
    # and that is the F32 model, coarser (this synthetic model, with its outlier columns, amplifies
    # weight errors: Q8_0's logits are 6 % (rms) off F32's, Q4_K_M's 31 %)
    f32, _ = probe(f32_run[0] / "tiny.gguf")
    assert correlation(logits, f32) > (0.99 if kind == "q8_0" else 0.9), correlation(logits, f32)


def test_joint_permutations_are_folded_into_a_llama_cpp_model(tmp_path):
    # heads of 48 values: Q4_0's blocks of 32 then mix heads, so head_order's choice matters
    shape = LlamaShape(vocab_size=320, hidden_size=384, intermediate_size=512, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=2)
    model_dir = write_model(tmp_path / "heads", llama_tensors(shape, seed=3), dtype="BF16", config=hf_config(shape))
    result = run(model_dir, tmp_path / "out", format="q4_0", strategies=["mlp_joint", "head_order", "identity"])
    joint = {r.name for r in result.tensors if r.permutation == "joint"}
    assert {"model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"} <= joint
    logits, _ = probe(tmp_path / "out" / "heads.gguf")
    # whole heads reordered, then llama.cpp's rows within each head: the function is the source's;
    # the source layout (joint permutations undone from the GGUF's metadata) computes it
    loaded = qstrat.load_model(tmp_path / "out", original=True)
    held = llama_forward(loaded, shape, np.array(TOKENS))
    assert relative_error(logits, held) < QUANTIZED_TOLERANCE["q4_0"], relative_error(logits, held)
    source = source_weights(model_dir)
    assert all(np.abs(loaded[n] - source[n]).max() <= 0.07 * np.abs(source[n]).max() for n in source)


def test_tied_embeddings_in_llama_cpp(tmp_path):
    tensors = llama_tensors(SHAPE, seed=4)
    del tensors["lm_head.weight"]
    model_dir = write_model(tmp_path / "tied", tensors, dtype="BF16", config={**hf_config(SHAPE), "tie_word_embeddings": True})
    text = make_bpe_tokenizer(model_dir, SHAPE.vocab_size, style="llama3")[-1] + " 1234567 isn't it?\n\n  x"
    result = run(model_dir, tmp_path / "out", format="f32")
    gguf = tmp_path / "out" / "tied.gguf"
    assert "output.weight" not in {t.name for t in GGUFReader(gguf).tensors}
    logits, answer = probe(gguf, text=text)
    assert answer["metadata"]["tokenizer.ggml.pre"] == "llama-bpe"
    from tokenizers import Tokenizer

    assert answer["tokens"] == Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids
    assert relative_error(logits, llama_forward(source_weights(model_dir), SHAPE, np.array(TOKENS))) < F32_TOLERANCE
    assert relative_error(numpy_forward(model_dir), logits) < F32_TOLERANCE  # no output.weight: the embeddings
    assert result.container["llama_cpp"]


def test_qwen2_with_biases_in_llama_cpp(tmp_path):
    tensors = llama_tensors(SHAPE, seed=5)
    rng = np.random.default_rng(5)
    for i in range(SHAPE.num_hidden_layers):
        for proj, rows in (("q", SHAPE.hidden_size), ("k", 128), ("v", 128)):
            tensors[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = (0.5 * rng.standard_normal(rows)).astype(np.float32)
    config = {**hf_config(SHAPE), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    model_dir = write_model(tmp_path / "qwen", tensors, dtype="BF16", config=config)
    text = make_bpe_tokenizer(model_dir, SHAPE.vocab_size, style="qwen2")
    result = run(model_dir, tmp_path / "out", format="f32")
    gguf = tmp_path / "out" / "qwen.gguf"
    names = {t.name: t for t in GGUFReader(gguf).tensors}
    assert names["blk.0.attn_q.bias"].tensor_type.name == "F32"
    assert "qstrat.rope_rows" not in GGUFReader(gguf).fields  # Qwen2: no q/k row reordering
    logits, answer = probe(gguf, text=text[0])
    assert answer["metadata"]["general.architecture"] == "qwen2" and answer["metadata"]["tokenizer.ggml.pre"] == "qwen2"
    assert relative_error(logits, llama_forward(source_weights(model_dir), SHAPE, np.array(TOKENS))) < F32_TOLERANCE
    for source in (gguf, model_dir):  # NEOX rotary embedding, biases
        assert relative_error(numpy_forward(source), logits) < F32_TOLERANCE, source
    from tokenizers import Tokenizer

    assert answer["tokens"] == Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text[0]).ids
    assert result.container["llama_cpp"]
    loaded = qstrat.load_model(gguf)
    assert all(np.array_equal(loaded[n], v) for n, v in source_weights(model_dir).items())


def test_sentencepiece_vocabulary_in_llama_cpp(tmp_path):
    import sentencepiece

    model_dir = write_model(tmp_path / "spm", llama_tensors(SHAPE, seed=7), dtype="BF16", config=hf_config(SHAPE))
    text = make_sentencepiece_tokenizer(model_dir, SHAPE.vocab_size)
    result = run(model_dir, tmp_path / "out", format="q8_0")
    assert result.container["vocabulary"] == f"SentencePiece (llama), {SHAPE.vocab_size} tokens"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    reader = GGUFReader(tmp_path / "out" / "spm.gguf")
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    assert tokens == [processor.IdToPiece(i) for i in range(processor.vocab_size())]
    assert reader.get_field("tokenizer.ggml.scores").contents() == [processor.GetScore(i) for i in range(processor.vocab_size())]
    logits, answer = probe(tmp_path / "out" / "spm.gguf", text=text[0])
    assert np.all(np.isfinite(logits)) and answer["metadata"]["tokenizer.ggml.model"] == "llama"
    assert answer["tokens"] == processor.encode(text[0])


def test_without_tokenizer_and_with_an_unknown_pre_tokenizer(tmp_path):
    model_dir = write_model(tmp_path / "bare", llama_tensors(SHAPE, seed=6), dtype="BF16", config=hf_config(SHAPE))
    result = run(model_dir, tmp_path / "out", format="f32")
    assert result.container["llama_cpp"] and result.container["vocabulary"] == "none"
    assert any("no tokenizer.json or tokenizer.model" in note for note in result.container["notes"])
    # llama.cpp loads it with dummy tokens and evaluates token ids
    logits, answer = probe(tmp_path / "out" / "bare.gguf")
    assert answer["metadata"]["tokenizer.ggml.model"] == "none"
    assert relative_error(logits, llama_forward(source_weights(model_dir), SHAPE, np.array(TOKENS))) < F32_TOLERANCE
    # but it cannot turn text into tokens (asked to, llama.cpp aborts the process): eval and imatrix refuse it
    text = tmp_path / "text.txt"
    text.write_text("Some text to measure. " * 200)
    for args in (["eval", "--text", str(text)], ["eval", "--text", str(text), "--engine", "numpy"],
                 ["imatrix", "--text", str(text), "-o", str(tmp_path / "im.gguf")]):
        refused = run_cli("qstrat", args[0], str(tmp_path / "out" / "bare.gguf"), *args[1:])
        assert refused.returncode == 2, (args, refused.stderr[-2000:])
        assert_clean_failure(refused, "bare.gguf: has no vocabulary (tokenizer.ggml.model 'none')")
    assert not (tmp_path / "im.gguf").exists()
    # a pre-tokenizer llama.cpp does not know: 'default', said in the run's output and report
    make_bpe_tokenizer(model_dir, SHAPE.vocab_size, style="odd")
    cli = run_cli("qstrat", "run", str(REPO / "configs/identity.yaml"), "-i", str(model_dir), "-o", str(tmp_path / "odd"), "--set", "format=q8_0")
    assert cli.returncode == 0, cli.stderr
    assert "GGUF bare.gguf: a llama.cpp model (architecture llama, vocabulary: BPE (gpt2, pre-tokenizer default)" in cli.stdout
    assert "warning: bare.gguf: tokenizer.json's pre-tokenizer is not one qstrat maps" in cli.stderr
    assert "written as 'default'" in (tmp_path / "odd" / "report.md").read_text()


def test_runtime_permutation_is_refused_for_a_llama_cpp_target(llama_dir, tmp_path):
    for config, sets in (("l2_norm.yaml", ["format=q8_0"]), ("attention_aware.yaml", ["preset=q4_k_m", "outputs=[gguf]"])):
        result = run_cli("qstrat", "run", str(REPO / "configs" / config), "-i", str(llama_dir), "-o", str(tmp_path / "out"),
                         *[a for s in sets for a in ("--set", s)])
        assert_clean_failure(result, "at run time", "llama.cpp cannot apply", "mlp_joint, head_order", "configs/function_preserving.yaml")
        assert result.returncode == 2 and not (tmp_path / "out").exists()
    # Q8K (for Candle) keeps its run-time permutations
    q8k = run_cli("qstrat", "run", str(REPO / "configs/l2_norm.yaml"), "-i", str(llama_dir), "-o", str(tmp_path / "q8k"), "-q", "--set", "outputs=[q8k, gguf]")
    assert q8k.returncode == 0, q8k.stderr
    report = json.loads((tmp_path / "q8k" / "report.json").read_text())["summary"]["gguf"]
    assert report["llama_cpp"] is False and "Q8_K weights, which llama.cpp cannot run" in report["reason"]


def test_other_architectures_get_the_generic_container(tmp_path):
    tensors = bert_tensors(hidden=256, intermediate=512, layers=1)
    model_dir = write_model(tmp_path / "bert", tensors, dtype="F32", config={"model_type": "bert", "architectures": ["BertModel"]})
    result = run_cli("qstrat", "run", str(REPO / "configs/identity.yaml"), "-i", str(model_dir), "-o", str(tmp_path / "out"), "--set", "format=q8_0")
    assert result.returncode == 0, result.stderr
    assert "GGUF bert.gguf: not a llama.cpp model: not a Llama-family model (model_type 'bert')" in result.stdout
    assert "- GGUF bert.gguf: not a llama.cpp model" in (tmp_path / "out" / "report.md").read_text()
    names = {t.name for t in GGUFReader(tmp_path / "out" / "bert.gguf").tensors}
    assert "encoder.layer.0.attention.self.query.weight" in names  # its own names
    inspected = run_cli("qstrat", "inspect", str(tmp_path / "out"))
    assert "bert.gguf: not a llama.cpp model: qstrat's generic container" in inspected.stdout


@pytest.mark.parametrize("settings", [{"format": "q8_0"}, {"preset": "q4_k_m"}])
def test_a_gguf_input_gives_the_bytes_and_the_model_of_its_source(llama_dir, f32_run, tmp_path, settings):
    """llama.cpp's F32 GGUF of the model, requantized as a GGUF input, is the file the Hugging Face
    directory gives directly: the same tensors, byte for byte, the same metadata and vocabulary,
    and llama.cpp computes exactly the same logits."""
    direct = tmp_path / "direct"
    run(llama_dir, direct, **settings)
    f32_gguf = f32_run[0] / "tiny.gguf"
    result = run_cli("qstrat", "run", str(REPO / "configs/identity.yaml"), "-i", str(f32_gguf), "-o", str(tmp_path / "again"),
                     *[a for key, value in settings.items() for a in ("--set", f"{key}={value}")])
    assert result.returncode == 0, result.stderr
    assert "tiny.gguf: a llama.cpp model" in result.stdout
    ours, theirs = GGUFReader(tmp_path / "again" / "tiny.gguf"), GGUFReader(direct / "tiny.gguf")
    expected = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(expected)
    for tensor in ours.tensors:
        assert tensor.tensor_type == expected[tensor.name].tensor_type, tensor.name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(expected[tensor.name].data)), tensor.name
    for key in ("llama.block_count", "llama.attention.head_count_kv", "general.file_type", "tokenizer.ggml.tokens",
                "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert ours.get_field(key).contents() == theirs.get_field(key).contents(), key
    logits, _ = probe(tmp_path / "again" / "tiny.gguf")
    direct_logits, _ = probe(direct / "tiny.gguf")
    assert np.array_equal(logits, direct_logits)


def test_a_gguf_inputs_joint_permutations_stay_out_of_its_tensors(llama_dir, f32_run, tmp_path):
    """Requantized from a GGUF with every function-preserving strategy, the file is still one
    llama.cpp loads (it refuses tensors it does not expect): the permutations are metadata, the
    file is the one the Hugging Face directory gives, and reads back as the source."""
    direct = tmp_path / "direct"
    config = RunConfig.build({"validation": {"stages": ["weight_error"]}, "format": "q4_0",
                              "strategies": ["residual_stream", "mlp_joint", "head_order", "identity"]}, "test")
    quantize_model(llama_dir, config, direct)
    result = run_cli("qstrat", "run", str(REPO / "configs/residual_stream.yaml"), "-i", str(f32_run[0] / "tiny.gguf"),
                     "-o", str(tmp_path / "again"), "--set", "format=q4_0")
    assert result.returncode == 0, result.stderr
    # the search (over the embeddings, the head and q, k, v, gate, up) precedes the first tensor's line: said
    assert result.stdout.splitlines()[:2] == ["tiny: quantizing", f"  choosing the residual-stream order over {2 + 5 * SHAPE.num_hidden_layers} matrices"]
    again = tmp_path / "again" / "tiny.gguf"
    reader = GGUFReader(again)
    assert not [t.name for t in reader.tensors if t.name.endswith(".joint_perm")]
    assert len(reader.get_field("qstrat.joint_perm_tensors").contents()) >= 3 * SHAPE.num_hidden_layers
    assert sorted(t.name for t in reader.tensors) == sorted(t.name for t in GGUFReader(direct / "tiny.gguf").tensors)
    logits, _ = probe(again)
    held = numpy_forward(again)  # the weights the file holds, in qstrat's numpy forward
    assert relative_error(logits, held) < QUANTIZED_TOLERANCE["q4_0"], relative_error(logits, held)
    # the input's tensors (llama.cpp's names and row layout), as far as Q4_0 reaches
    restored = qstrat.load_model(tmp_path / "again", original=True)
    source = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(f32_run[0] / "tiny.gguf").tensors}
    assert sorted(restored) == sorted(source)
    assert all(np.abs(restored[n] - source[n]).max() <= 0.15 * np.abs(source[n]).max() for n in source)


def test_the_converters_vocabulary_rules_by_size(tmp_path):
    # LlamaModel.set_vocab: a vocabulary of 49152 adds no BOS whatever tokenizer_config says (SmolLM2's
    # own GGUF has add_bos_token false); CodeLlama's 32016 gets its end-of-turn token, 32010
    for vocab_size, key, expected in ((49152, "tokenizer.ggml.add_bos_token", False), (32016, "tokenizer.ggml.eot_token_id", 32010)):
        shape = LlamaShape(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
        model_dir = write_model(tmp_path / f"v{vocab_size}", llama_tensors(shape, seed=1), dtype="BF16", config=hf_config(shape))
        make_bpe_tokenizer(model_dir, 320)
        run(model_dir, tmp_path / f"out{vocab_size}", format="f32")
        fields = GGUFReader(tmp_path / f"out{vocab_size}" / f"v{vocab_size}.gguf").fields
        assert fields[key].contents() == expected
        if vocab_size == 49152:
            _, answer = probe(tmp_path / f"out{vocab_size}" / f"v{vocab_size}.gguf", text="a b c")
            assert answer["add_bos"] is False  # and llama.cpp reads it so


def test_a_byte_fallback_bpe_is_llamas_even_when_it_ignores_merges(tmp_path):
    # gguf.LlamaHfVocab turns ignore_merges away only without byte fallback (Llama 3's tokenizer)
    from qstrat.llama_gguf import read_vocabulary

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}, "a": 259, "b": 260, "ab": 261}
    for byte_fallback, expected in ((True, "llama"), (False, "gpt2")):
        tokenizer = {"model": {"type": "BPE", "vocab": vocab, "merges": ["a b"], "byte_fallback": byte_fallback, "ignore_merges": True},
                     "decoder": {"type": "Sequence", "decoders": []}, "added_tokens": [{"id": 1, "content": "<s>", "special": True}]}
        (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
        assert read_vocabulary(tmp_path, "llama", len(vocab), []).model == expected


@pytest.mark.parametrize("key, value, fragment", [
    ("hidden_size", 1024, "hidden_size 1024"),
    ("num_hidden_layers", SHAPE.num_hidden_layers + 1, f"layer {SHAPE.num_hidden_layers} has no attn_norm tensor"),
    ("vocab_size", SHAPE.vocab_size + 8, f"vocab_size {SHAPE.vocab_size + 8}"),
    ("intermediate_size", 2 * SHAPE.intermediate_size, f"intermediate_size {2 * SHAPE.intermediate_size}"),
])
def test_a_config_that_disagrees_with_the_tensors_gives_no_llama_cpp_model(tmp_path, key, value, fragment):
    # llama.cpp checks every tensor's shape against the hyperparameters and refused such files, which
    # the run had called llama.cpp models
    model = write_model(tmp_path / "m", llama_tensors(SHAPE, 1), dtype="F32", shards=1, config={**hf_config(SHAPE), key: value})
    result = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(tmp_path / "o"),
                     "--set", "format=q8_0", "--json")
    assert result.returncode == 0, result.stderr
    gguf_summary = json.loads(result.stdout.splitlines()[-1])["models"][0]["gguf"]
    assert gguf_summary["llama_cpp"] is False and fragment in gguf_summary["reason"], gguf_summary
