"""GGUF block types through a run: `format`, `format_rules` and `preset`, into a GGUF file that
gguf-py reads, with GGML's own bytes (libggml-python is the oracle)."""

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

import qstrat
from qstrat.formats import FORMATS
from qstrat.io.gguf import GGUFModel
from qstrat.io.safetensors import SafetensorsModel, map_tensor
from qstrat.pipelines.run import quantize_model
from qstrat.reference import ggml_dequantize_row, ggml_quantize_chunk
from qstrat.runconfig import RunConfig
from qstrat.synthetic import LlamaShape
from tests.conftest import REPO
from tests.helpers import assert_clean_failure, bf16_bits_to_f32, make_llama_dir, run_cli

# intermediate_size 384: the down projection's rows are 384 long, which no K-quant takes
SHAPE = LlamaShape(vocab_size=64, hidden_size=512, intermediate_size=384, num_hidden_layers=1)
DOWN = "model.layers.0.mlp.down_proj.weight"
#: llama.cpp's fallback for rows a K-quant cannot take (llama-quant.cpp, tensor_type_fallback)
K_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
#: every type in the slow tier; in the default run, one of each kernel family, with both fallbacks
FAST_TYPES = ("q8_0", "q4_1", "q4_k", "q6_k", "iq4_nl", "bf16")
GGUF_TYPES = [
    name if name in FAST_TYPES else pytest.param(name, marks=pytest.mark.slow) for name in FORMATS if name != "q8_k"
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_llama_dir(tmp_path_factory.mktemp("formats") / "model", shards=1, shape=SHAPE)


def source_matrices(model_dir):
    model = SafetensorsModel(model_dir)
    return {
        info.name: bf16_bits_to_f32(np.asarray(map_tensor(info)))
        for info in model
        if len(info.shape) == 2 and info.name.endswith(".weight")
    }


def gguf_tensors(path):
    """The tensors of a run's GGUF by Hugging Face name (a Llama-family model's file has
    llama.cpp's names), and a function giving a tensor's stored rows in the source order
    (llama.cpp's layout reorders the rows of q and k)."""
    model = GGUFModel(path)
    assert model.llama_cpp
    return model.tensors, model.source_rows


@pytest.mark.parametrize("fmt", GGUF_TYPES)
def test_every_type_goes_through_a_run_into_gguf_with_ggmls_bytes(model_dir, tmp_path, fmt):
    config = RunConfig.build({"format": fmt, "validation": {"stages": ["weight_error", "roundtrip"]}}, "test")
    result = quantize_model(model_dir, config, tmp_path / "out")
    tensors, source_rows = gguf_tensors(tmp_path / "out" / "model.gguf")
    assert "blk.0.attn_q.weight" in {t.name for t in GGUFReader(tmp_path / "out" / "model.gguf").tensors}
    matrices = source_matrices(model_dir)
    assert {r.name for r in result.quantized} == set(matrices)  # every matrix, embeddings too (as llama.cpp)
    for name, source in matrices.items():
        expected = K_FALLBACK.get(fmt, fmt) if name == DOWN else fmt
        tensor = tensors[name]
        assert tensor.tensor_type.name.lower() == expected, name
        assert [int(d) for d in reversed(tensor.shape.tolist())] == list(source.shape)
        stored = source_rows(name, np.asarray(tensor.data).view(np.uint8).reshape(source.shape[0], -1))
        oracle = ggml_quantize_chunk(int(GGMLQuantizationType[expected.upper()]), source)
        assert np.array_equal(stored, oracle), f"{name} as {expected}: not GGML's bytes"
        record = next(r for r in result.quantized if r.name == name)
        assert record.storage == expected and record.fallback_from == (fmt if expected != fmt else None)
        assert record.metrics.sqnr_db > (5 if fmt == "q2_k" else 10)


def test_format_rules_fallback_lines_report_and_reading_back(model_dir, tmp_path):
    config = tmp_path / "q4_k.yaml"
    config.write_text(
        f"input: {model_dir}\noutput: {tmp_path / 'out'}\nformat: q4_k\n"
        "format_rules:\n  - {match: 'mlp\\.(down|up)_proj', format: q6_k}\n  - {match: 'up_proj', format: q8_0}\n"
    )
    result = run_cli("qstrat", "run", str(config))
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    assert lines[DOWN].split()[0] == "q8_0" and "(fallback: q6_k cannot take rows of 384, as llama.cpp)" in lines[DOWN]
    assert lines["model.layers.0.mlp.up_proj.weight"].split()[0] == "q6_k"  # the first matching rule wins
    assert lines["model.layers.0.mlp.gate_proj.weight"].split()[0] == "q4_k"
    assert lines["model.embed_tokens.weight"].split()[0] == "q4_k"
    assert "Quantized: 9 (q4_k 7, q6_k 1, q8_0 1; 1 by llama.cpp's fallback)" in result.stdout
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["formats"] == {"q4_k": 7, "q6_k": 1, "q8_0": 1}
    assert report["summary"]["fallbacks"] == [{"tensor": DOWN, "asked": "q6_k", "written": "q8_0", "row_length": 384}]
    assert f"- fallback: {DOWN} is q8_0: q6_k cannot take rows of 384" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensors"][DOWN]["storage"] == "q8_0" and manifest["tensors"][DOWN]["fallback_from"] == "q6_k"
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".qblk", ".q8k")) == []  # GGUF holds them
    # read back: GGML's own dequantization of the stored bytes
    tensors, source_rows = gguf_tensors(out / "model.gguf")
    loaded = qstrat.load_model(out)
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.q_proj.weight", DOWN):
        tensor = tensors[name]
        rows = loaded[name].shape[0]
        blocks = source_rows(name, np.asarray(tensor.data).view(np.uint8).reshape(rows, -1))
        assert np.array_equal(loaded[name], ggml_dequantize_row(tensor.tensor_type.name.lower().replace("_k", "_K"), blocks, loaded[name].shape[1]))
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
    inspected = run_cli("qstrat", "inspect", str(out))
    assert "qstrat output: q4_k, q6_k, q8_0" in inspected.stdout and "q8_0" in inspected.stdout
    assert "model.gguf: a llama.cpp model (architecture llama)" in inspected.stdout


def test_a_convolutions_3d_weight_is_a_stack_of_rows_as_llama_cpp_quantizes_it(tmp_path):
    # a checkpoint's conv weight [out, in, kernel] is quantized along its last axis, as llama.cpp treats
    # any 3-D tensor: a kernel of 3 fits no block, so it falls back to F16; a skip pattern keeps it
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {"conv.weight": (rng.standard_normal((16, 4, 3)) * 0.1).astype(np.float32),
               "fc.weight": (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)}
    (tmp_path / "m").mkdir()
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    config = str(REPO / "configs" / "identity.yaml")
    result = run_cli("qstrat", "run", config, "-i", str(tmp_path / "m"), "-o", str(tmp_path / "o"), "--set", "format=q4_0")
    assert result.returncode == 0, result.stderr
    assert "conv.weight [16x4x3]" in result.stdout and "(fallback: q4_0 cannot take rows of 3, as llama.cpp)" in result.stdout
    entry = json.loads((tmp_path / "o" / "manifest.json").read_text())["tensors"]["conv.weight"]
    assert (entry["storage"], entry["shape"], entry["fallback_from"]) == ("f16", [16, 4, 3], "q4_0")
    assert np.array_equal(qstrat.load_model(tmp_path / "o")["conv.weight"], tensors["conv.weight"].astype(np.float16).astype(np.float32))
    kept = run_cli("qstrat", "run", config, "-i", str(tmp_path / "m"), "-o", str(tmp_path / "kept"), "-q",
                   "--set", "format=q4_0", "--set", "skip_patterns=[conv]")
    assert kept.returncode == 0, kept.stderr
    assert json.loads((tmp_path / "kept" / "manifest.json").read_text())["tensors"]["conv.weight"]["storage"] == "passthrough"
    assert np.array_equal(qstrat.load_model(tmp_path / "kept")["conv.weight"], tensors["conv.weight"])


def test_a_tensor_too_small_for_float16_scales_is_said_to_come_out_as_zeros(tmp_path):
    # weights around 5e-8 give Q8_0 a scale below float16's least value: GGML writes zeros, so does
    # qstrat, and the run said nothing but "sqnr=0.0dB" on that tensor's line
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    (tmp_path / "m").mkdir()
    save_file({"tiny.weight": (rng.standard_normal((64, 256)) * 5e-8).astype(np.float32),
               "fc.weight": (rng.standard_normal((64, 256)) * 0.05).astype(np.float32)}, str(tmp_path / "m" / "model.safetensors"))
    args = ("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(tmp_path / "m"), "--set", "format=q8_0")
    result = run_cli(*args, "-o", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    warning = "1 quantized tensor(s) came out all zeros (tiny.weight): tiny.weight's largest |value| 2.0e-07 is too small for q8_0"
    assert f"warning: m: {warning}" in result.stderr
    assert not qstrat.load_model(tmp_path / "o")["tiny.weight"].any()
    assert f"- warning: {warning}" in (tmp_path / "o" / "report.md").read_text()
    again = run_cli(*args, "-o", str(tmp_path / "o"), "--json")  # up to date: still said
    assert json.loads(again.stdout)["models"][0]["warnings"][0].startswith(warning)
    kept = run_cli(*args, "-o", str(tmp_path / "kept"), "--set", "format_rules=[{match: tiny, format: bf16}]")
    assert kept.returncode == 0 and "all zeros" not in kept.stderr, kept.stderr
    assert qstrat.load_model(tmp_path / "kept")["tiny.weight"].all()


def test_format_rules_in_a_q8k_run_leave_the_original_tools_skips_to_the_q8k_tensors(model_dir, tmp_path):
    # a rule for the MLP dropped Q8K's default skip list for every tensor: the embedding went to Q8K
    config = tmp_path / "rules.yaml"
    config.write_text(f"input: {model_dir}\noutput: {tmp_path / 'out'}\n"
                      "format_rules:\n  - {match: 'mlp\\.', format: q6_k}\n  - {match: 'lm_head', format: q8_0}\n"
                      "  - {match: 'mpl', format: q4_0}\n")
    result = run_cli("qstrat", "run", str(config), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    (plan,) = json.loads(result.stdout)["models"].values()
    formats = {t["name"]: t["format"] for t in plan["quantized"]}
    assert formats["model.layers.0.mlp.gate_proj.weight"] == "q6_k" and formats["model.layers.0.self_attn.q_proj.weight"] == "q8k"
    assert formats["lm_head.weight"] == "q8_0"  # a rule's tensor is quantized, skip pattern or not
    passed = {t["name"]: t["reason"] for t in plan["passthrough"]}
    assert passed["model.embed_tokens.weight"] == "matches skip pattern 'embed_tokens'"
    # a rule matching nothing (misspelt) changes nothing but the output's kind: it is said
    assert plan["warnings"] == ["format_rules.2 (match 'mpl', format q4_0) matches no tensor of the model"]
    result = run_cli("qstrat", "run", str(config))
    assert result.returncode == 0, result.stderr
    assert f"warning: {model_dir.name}: format_rules.2 (match 'mpl', format q4_0) matches no tensor of the model" in result.stderr


def test_preset_q4_k_m_follows_llama_cpp_rules(model_dir, tmp_path):
    config = tmp_path / "preset.yaml"
    config.write_text(f"input: {model_dir}\noutput: {tmp_path / 'out'}\npreset: Q4_K_M\n")
    result = run_cli("qstrat", "run", str(config))
    assert result.returncode == 0, result.stderr
    reader = GGUFReader(tmp_path / "out" / "model.gguf")
    assert int(reader.get_field("general.file_type").contents()) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = {name: t.tensor_type.name.lower() for name, t in GGUFModel(tmp_path / "out" / "model.gguf").tensors.items()}
    # llama-quant.cpp, one layer: use_more_bits(0, 1) holds, so attn_v and ffn_down take Q6_K;
    # ffn_down's rows (384) then fall back to Q8_0; the output head is Q6_K; the rest Q4_K
    assert types["model.layers.0.self_attn.v_proj.weight"] == "q6_k"
    assert types[DOWN] == "q8_0"
    assert types["lm_head.weight"] == "q6_k"
    for name in ("q_proj", "k_proj", "o_proj"):
        assert types[f"model.layers.0.self_attn.{name}.weight"] == "q4_k"
    assert types["model.layers.0.mlp.gate_proj.weight"] == types["model.embed_tokens.weight"] == "q4_k"
    assert types["model.norm.weight"] == "f32"  # 1-D: not quantized, and F32 as llama.cpp's converter writes it
    assert "(fallback: q6_k cannot take rows of 384, as llama.cpp)" in result.stdout


@pytest.mark.parametrize(
    "sets, message",
    [
        (["format=q4_k_m"], "format: 'q4_k_m' is a llama.cpp file type, not a block type: write preset: q4_k_m"),
        (["format=q9_k"], "format: unknown format 'q9_k'"),
        (["preset=q4_k_m", "format=q4_0"], "preset: give format (q4_0) or preset (q4_k_m), not both"),
        (["format=q4_0", "outputs=[q8k]"], "outputs: .q8k files hold Q8K only; format q4_0 is written to GGUF"),
        (["format=q4_0", "validation.product=candle"], "validation: product: candle multiplies Q8K blocks"),
        (["format_rules=[{match: '(', format: q4_0}]"], "format_rules.0.match: not a valid regular expression"),
    ],
)
def test_bad_format_settings_are_one_line_errors(model_dir, tmp_path, sets, message):
    args = [a for s in sets for a in ("--set", s)]
    result = run_cli("qstrat", "run", str(REPO / "configs/identity.yaml"), "-i", str(model_dir), "-o", str(tmp_path / "out"), *args)
    assert_clean_failure(result, message)
    assert result.returncode == 2 and not (tmp_path / "out").exists()


def test_a_preset_needs_a_llama_family_model(model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    result = run_cli("qstrat", "run", str(REPO / "configs/identity.yaml"), "-i", str(bert), "-o", str(tmp_path / "out"), "--set", "preset=q4_k_m")
    assert_clean_failure(result, "preset q4_k_m", "'bert'")
    assert result.returncode == 2


def test_a_gguf_model_is_an_input_requantized_from_its_values(model_dir, tmp_path):
    """A GGUF whose tensors are Q4_1, Q4_K, Q8_0, F16 and F32 (as llama.cpp's files mix them):
    each is read as GGML dequantizes it (gguf-py agrees) and requantized with GGML's bytes."""
    import gguf

    rng = np.random.default_rng(3)
    sources = {
        "blk.0.attn_q.weight": ("q4_1", rng.standard_normal((64, 96)).astype(np.float32)),
        "blk.0.ffn_down.weight": ("q4_k", rng.standard_normal((32, 512)).astype(np.float32)),
        "token_embd.weight": ("q8_0", rng.standard_normal((40, 64)).astype(np.float32)),
        "blk.0.attn_k.weight": ("f16", rng.standard_normal((16, 64)).astype(np.float32)),
        "blk.0.attn_norm.weight": ("f32", rng.standard_normal(64).astype(np.float32)),
    }
    path = tmp_path / "mixed.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    stored = {}
    for name, (kind, values) in sources.items():
        if kind == "f32":
            writer.add_tensor(name, values)
            stored[name] = values
            continue
        blocks = qstrat.quantize(values, kind)
        writer.add_tensor(name, blocks, raw_dtype=GGMLQuantizationType[kind.upper()])
        stored[name] = gguf.quants.dequantize(blocks, GGMLQuantizationType[kind.upper()])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = run_cli("qstrat", "run", str(REPO / "configs/identity.yaml"), "-i", str(path), "-o", str(tmp_path / "out"), "--set", "format=q8_0")
    assert result.returncode == 0, result.stderr
    tensors = {t.name: t for t in GGUFReader(tmp_path / "out" / "mixed.gguf").tensors}
    for name, values in stored.items():
        if values.ndim == 1:
            assert np.array_equal(np.asarray(tensors[name].data), values)  # passed through as it was
            continue
        assert tensors[name].tensor_type == GGMLQuantizationType.Q8_0
        written = np.asarray(tensors[name].data).view(np.uint8).reshape(values.shape[0], -1)
        assert np.array_equal(written, ggml_quantize_chunk(int(GGMLQuantizationType.Q8_0), values)), name
