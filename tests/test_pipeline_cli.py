"""A whole model through `quantize_q8k` and the Python API, and back with load_model."""

import json
import math
import shutil

import numpy as np
import pytest

import qstrat
from qstrat import QuantizationConfig, StrategyType, quantize_safetensors
from qstrat.errors import InputError, NonFiniteError, OutputError
from qstrat.io.names import JOURNAL_NAME
from qstrat.io.safetensors import SafetensorsModel, map_tensor, to_float32
from qstrat.runconfig import RunConfig
from qstrat.synthetic import llama_tensors, write_model
from tests.conftest import REPO
from tests.helpers import SMALL_SHAPE, assert_clean_failure, make_llama_dir, run_cli


def _source_values(model_dir):
    model = SafetensorsModel(model_dir)
    return {name: np.asarray(to_float32(info.dtype, map_tensor(info)), dtype=np.float32) for name, info in model.tensors.items()}


def _check_close(loaded, source, out):
    """Quantized tensors within half a step of their source (steps of the stored blocks), the rest equal."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(loaded) == set(source) == set(manifest["tensors"])
    for name, original in source.items():
        entry = manifest["tensors"][name]
        assert loaded[name].shape == original.shape, name
        if entry["storage"] != "q8k":
            assert np.array_equal(loaded[name], original), name
            continue
        rows, k = original.shape
        perm = qstrat.read_perm(out / entry["files"]["perm"]["path"]) if "perm" in entry["files"] else np.arange(k)
        stored = original[:, perm]
        step = np.abs(stored.reshape(rows, k // 256, 256)).max(axis=2) / 127
        bound = np.empty_like(stored)
        bound[:, perm] = np.repeat(step, 256, axis=1) * 0.5001 + 1e-30
        assert np.all(np.abs(loaded[name] - original) <= bound), name


@pytest.mark.parametrize("strategy", ["l2_norm", "attention_aware"])
def test_sharded_bf16_model_through_cli(tmp_path, strategy):
    model_dir = make_llama_dir(tmp_path / "model", dtype="BF16", shards=2)
    out = tmp_path / "out"
    result = run_cli(
        "quantize_q8k", str(model_dir), str(out), env={"CANDLE_Q8K_PERMUTE": "1", "CANDLE_Q8K_STRATEGY": strategy}
    )
    assert result.returncode == 0, result.stderr
    assert "Quantized: 8, skipped: 4" in result.stdout
    assert "model.layers.0.mlp.down_proj.weight" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    quantized = {n for n, e in manifest["tensors"].items() if e["storage"] == "q8k"}
    assert len(quantized) == 8
    source = _source_values(model_dir)
    _check_close(qstrat.load_model(out), source, out)
    for perm_file in out.glob("*.perm"):
        perm = qstrat.read_perm(perm_file)  # validates that it is a permutation
        assert perm.size == qstrat.read_q8k(perm_file.with_suffix(".q8k")).k
    if strategy == "attention_aware":
        q, k, v = (qstrat.read_perm(out / f"model.layers.0.self_attn.{p}_proj.weight.perm") for p in "qkv")
        assert np.array_equal(q, k) and np.array_equal(q, v)
        assert not (out / "model.layers.0.self_attn.o_proj.weight.perm").exists()


def test_without_permutation_no_perm_files_and_seed_example(tmp_path):
    model_dir = make_llama_dir(tmp_path / "model", dtype="F32", shards=1)
    config = QuantizationConfig(output_dir=tmp_path / "out")
    result = quantize_safetensors(model_dir / "model.safetensors", config)
    assert result.tensor_count == 8 and result.skipped_count == 4
    assert not list((tmp_path / "out").glob("*.perm"))
    assert 0 < result.average_mse < 1e-3
    assert result.quantized_tensors == result.tensor_count and result.total_time_seconds == result.elapsed_s
    # the original tool's README example, in Python
    config = QuantizationConfig(strategy_type=StrategyType.ATTENTION_AWARE, use_permutation=True, output_dir=tmp_path / "o2")
    result = quantize_safetensors(model_dir / "model.safetensors", config)
    line = f"Quantized {result.tensor_count} tensors with average MSE: {result.average_mse:.2e}"
    assert line.startswith("Quantized 8 tensors with average MSE: ")
    manifest = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    mean = sum(e["metrics"]["mse"] for e in manifest["tensors"].values() if e["storage"] == "q8k") / 8
    assert math.isclose(mean, result.average_mse, rel_tol=1e-12)


def test_f16_input_and_variants_reach_the_files(tmp_path):
    model_dir = make_llama_dir(tmp_path / "model", dtype="F16", shards=1)
    outs = {}
    for variant in qstrat.Q8K_VARIANTS:
        config = QuantizationConfig(variant=variant, output_dir=tmp_path / variant)
        quantize_safetensors(model_dir, config)
        outs[variant] = (tmp_path / variant / "model.layers.0.mlp.up_proj.weight.q8k").read_bytes()
        source = _source_values(model_dir)["model.layers.0.mlp.up_proj.weight"]
        assert outs[variant][24:] == qstrat.quantize_blocks(source, variant).tobytes()
    assert outs["candle"] != outs["candle-0.9"]


def test_rerun_with_another_strategy_leaves_no_stale_perm(tmp_path):
    model_dir = make_llama_dir(tmp_path / "model", shards=1)
    out = tmp_path / "out"
    assert run_cli("quantize_q8k", str(model_dir), str(out), env={"CANDLE_Q8K_PERMUTE": "1"}).returncode == 0
    assert list(out.glob("*.perm"))
    assert run_cli("quantize_q8k", str(model_dir), str(out)).returncode == 0
    assert not list(out.glob("*.perm"))


def test_workers_do_not_change_the_output(tmp_path):
    model_dir = make_llama_dir(tmp_path / "model", shards=2)
    env = {"CANDLE_Q8K_PERMUTE": "1", "CANDLE_Q8K_STRATEGY": "attention_aware"}
    for workers in ("1", "2"):
        result = run_cli("quantize_q8k", str(model_dir), str(tmp_path / workers), env={**env, "CANDLE_Q8K_THREADS": workers})
        assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "2").iterdir())
    for name in files:
        # reports hold timings; the journal lists groups as workers finish them
        if name not in ("manifest.json", JOURNAL_NAME) and not name.startswith("report."):
            assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
    manifests = [json.loads((tmp_path / w / "manifest.json").read_text()) for w in ("1", "2")]
    assert manifests[0]["tensors"] == manifests[1]["tensors"]


def _nan_model(tmp_path):
    tensors = llama_tensors(SMALL_SHAPE, 3)
    tensors["model.layers.0.mlp.gate_proj.weight"][5, 300] = np.nan
    return write_model(tmp_path / "nan", tensors, dtype="BF16")


def test_bad_inputs_through_the_cli(tmp_path):
    model_dir = make_llama_dir(tmp_path / "model", shards=1)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("quantize_q8k", str(tmp_path / "missing"), str(out)), "missing", "no such file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((model_dir / "model.safetensors").read_bytes()[:-100])
    assert_clean_failure(run_cli("quantize_q8k", str(truncated), str(out)), "truncated.safetensors", "(truncated file?)")
    # cut inside the first tensors: their data_offsets run past the file's end
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((model_dir / "model.safetensors").read_bytes()[:3000])
    assert_clean_failure(run_cli("quantize_q8k", str(cut), str(out)), "cut.safetensors", "data section (truncated file?)")
    result = run_cli("quantize_q8k", str(_nan_model(tmp_path)), str(out))
    assert_clean_failure(result, "model.layers.0.mlp.gate_proj.weight", "(5, 300)")
    assert not (out / "manifest.json").exists()
    assert_clean_failure(
        run_cli("quantize_q8k", str(model_dir), str(out), env={"CANDLE_Q8K_STRATEGY": "l3_norm"}), "unknown strategy 'l3_norm'"
    )
    assert_clean_failure(
        run_cli("quantize_q8k", str(model_dir), str(out), env={"CANDLE_Q8K_PERMUTE": "maybe"}), "CANDLE_Q8K_PERMUTE"
    )
    assert_clean_failure(
        run_cli("quantize_q8k", str(model_dir), str(out), env={"CANDLE_Q8K_THREADS": "zero"}), "CANDLE_Q8K_THREADS"
    )
    (tmp_path / "file").write_text("x")
    assert_clean_failure(run_cli("quantize_q8k", str(model_dir), str(tmp_path / "file")), "not a directory")
    assert_clean_failure(run_cli("quantize_q8k", str(model_dir), str(model_dir)), "is the input")
    usage = run_cli("quantize_q8k")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


@pytest.mark.parametrize(
    "strategies, fmt",
    [
        ("[l2_norm]", "q8_k"),  # column statistics see the NaN; the quantize kernel refuses it
        ("[attention_aware, amax]", "q8_k"),
        ("[l2_norm]", "q4_k"),
        ("[mlp_joint, identity]", "q8_0"),  # checked before the strategy
    ],
)
def test_a_nan_fails_the_run_naming_tensor_and_index_whatever_the_strategy(tmp_path, strategies, fmt):
    config = tmp_path / "run.yaml"
    config.write_text(f"input: {_nan_model(tmp_path)}\noutput: {tmp_path / 'out'}\n")
    result = run_cli("qstrat", "run", str(config), "-q", "--set", f"strategies={strategies}", "--set", f"format={fmt}")
    assert_clean_failure(result, "model.layers.0.mlp.gate_proj.weight", "(5, 300)")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_inputs_through_the_api(tmp_path):
    with pytest.raises(NonFiniteError, match=r"gate_proj.weight.*\(5, 300\)"):
        quantize_safetensors(_nan_model(tmp_path), QuantizationConfig(output_dir=tmp_path / "o"))
    with pytest.raises(InputError, match="no such file"):
        quantize_safetensors(tmp_path / "missing", QuantizationConfig(output_dir=tmp_path / "o"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        quantize_safetensors(_nan_model(tmp_path), QuantizationConfig(output_dir=tmp_path / "file"))
    with pytest.raises(qstrat.QstratError, match="unknown strategy"):
        QuantizationConfig(strategy_type="nope")
    with pytest.raises(qstrat.QstratError, match="variant"):
        QuantizationConfig(variant="q4k")


def test_the_library_refuses_an_output_directory_that_holds_the_input(tmp_path):
    # the run writes <model>.gguf and passthrough.safetensors there: a GGUF input was overwritten
    source = tmp_path / "models" / "tiny.gguf"
    source.parent.mkdir()
    quantize_safetensors(REPO / "examples" / "tiny-llama", RunConfig.build({"format": "q8_0", "output": str(tmp_path / "o")}, "test"))
    shutil.copyfile(tmp_path / "o" / "tiny-llama.gguf", source)
    before = source.read_bytes()
    with pytest.raises(InputError, match="holds the input"):
        quantize_safetensors(source, RunConfig.build({"format": "q8_0", "output": str(source.parent)}, "test"))
    assert source.read_bytes() == before


def test_a_one_worker_run_leaves_its_callers_numba_threads_as_they_were(tmp_path):
    # a one-worker run computes in the caller's thread: it set numba's thread count there for good
    import numba

    from qstrat.pipelines.backends import local_cores

    if local_cores() < 2 or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two cores: a run on one uses one thread, the caller's own setting")
    model = write_model(tmp_path / "m", {"layer.weight": np.ones((4, 256), np.float32)}, dtype="F32")
    numba.set_num_threads(1)
    try:
        result = quantize_safetensors(model, QuantizationConfig(output_dir=tmp_path / "o", validation=False, workers=1))
        assert result.tensor_count == 1 and numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("section", ["### Arrays to GGUF block types (Python API)", "### Python"])
def test_the_readmes_python_examples_run_as_written(tmp_path, section):
    # the Python example once opened a file its own config never writes
    import subprocess
    import sys

    readme = (REPO / "README.md").read_text()
    start = readme.index("```python\n", readme.index(f"\n{section}\n")) + len("```python\n")
    code = readme[start : readme.index("```", start)]
    shutil.copy(REPO / "examples" / "tiny-llama" / "model.safetensors", tmp_path / "model.safetensors")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
