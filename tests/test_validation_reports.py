"""Validation stages on known answers, thresholds, reports and `qstrat compare`."""

import json
import math

import numpy as np
import pytest
from qstrat.pipelines.run import threshold_failures

import qstrat
from qstrat.errors import OutputError
from qstrat.kernels import BLOCK_BYTES, measure_columns, quantize_rows_q8k
from qstrat.kernels.metrics import DEQUANTIZED_SQUARES, ERROR_SQUARES, MAX_ABS_ERROR, PROBE_COLUMNS, REFERENCE_SQUARES
from qstrat.io.q8k import write_q8k
from qstrat.matrix import TensorMetrics, quantize_matrix
from qstrat.results import TensorRecord
from qstrat.runconfig import Thresholds
from qstrat.validation import check_roundtrip, matvec_mse, probe_vector
from tests.conftest import REPO
from tests.helpers import assert_clean_failure, run_cli


def _exact_matrix(rows=4, k=512, seed=0):
    """Values q * 2^-7 with |q| <= 127 and a 127 in each block: Q8K represents them exactly."""
    q = np.random.default_rng(seed).integers(-127, 128, size=(rows, k))
    q[:, ::256] = 127
    return (q / 128.0).astype(np.float32)


def _probe_mse(x, probe, product, variant, col_perm=None):
    """The matrix-vector MSE of x as the pipeline measures it: products from the quantize pass."""
    q = quantize_matrix(x, variant, col_perm=col_perm, probes={"p": probe})
    return matvec_mse(q.probe_products["p"], q.blocks, probe, product, variant)


def test_exact_matrix_has_no_error():
    x = _exact_matrix()
    metrics = quantize_matrix(x, "ggml").metrics
    assert metrics.mse == 0 and metrics.max_abs_error == 0 and metrics.sqnr_db == math.inf and metrics.cosine == 1
    for stage in ("sum_test", "gradient_test"):
        assert _probe_mse(x, probe_vector(stage, 512), "exact", "ggml") == 0


def test_weight_error_known_answer():
    # one block: 127 and a value exactly 0.25 step off the grid: error 0.25 * step
    x = np.zeros((1, 256), dtype=np.float32)
    x[0, 0], x[0, 1] = 127.0, 10.25
    m = quantize_matrix(x, "candle").metrics
    assert m.max_abs_error == pytest.approx(0.25)
    assert m.mse == pytest.approx(0.0625 / 256)
    assert m.sqnr_db == pytest.approx(20 * math.log10(math.hypot(127, 10.25) / 0.25))


def test_probe_vectors_and_products():
    assert np.array_equal(probe_vector("sum_test", 4), np.ones(4, np.float32))
    assert np.allclose(probe_vector("gradient_test", 4), [0.25, 0.5, 0.75, 1.0])
    x = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32)
    blocks = quantize_matrix(x, "candle").blocks
    probe = probe_vector("gradient_test", 512)
    deq = qstrat.dequantize_blocks(blocks).reshape(8, 512).astype(np.float64)
    expected = np.mean((x.astype(np.float64) @ probe - deq @ probe) ** 2)
    # float32 sums within a block, float64 across (kernels/metrics.py)
    assert _probe_mse(x, probe, "exact", "candle") == pytest.approx(expected, rel=1e-6)
    # Candle's way: the probe is quantized too, so the error includes the probe's rounding
    probe_deq = qstrat.dequantize_blocks(qstrat.quantize_blocks(probe[None, :])).reshape(-1).astype(np.float64)
    candle_expected = np.mean((x.astype(np.float64) @ probe - deq @ probe_deq) ** 2)
    assert _probe_mse(x, probe, "candle", "candle") == pytest.approx(candle_expected, rel=1e-3)


@pytest.mark.parametrize(
    "magnitude", [1.0, 3.0e38, 1e-30, 1e-36, 1e-40], ids=["normal", "near-max", "tiny", "subnormal-scale", "below-scale"]
)
def test_measures_match_float64_at_any_magnitude(magnitude):
    # float32 block sums must neither overflow (3e38 squared) nor underflow (1e-40 blocks are stored
    # as zeros, so their whole value is error): every measure against a float64 computation
    x = (np.random.default_rng(6).uniform(-1, 1, size=(6, 512)) * magnitude).astype(np.float32)
    probe = probe_vector("gradient_test", 512)
    q = quantize_matrix(x, "candle", probes={"p": probe})
    w = x.astype(np.float64)
    deq = qstrat.dequantize_blocks(q.blocks).reshape(x.shape).astype(np.float64)
    m = q.metrics
    assert m.mse == pytest.approx(np.mean((w - deq) ** 2), rel=1e-5)
    assert m.max_abs_error == pytest.approx(np.abs(w - deq).max(), rel=1e-6)
    assert m.relative_error == pytest.approx(np.linalg.norm(w - deq) / np.linalg.norm(w), rel=1e-5)
    cosine = (w * deq).sum() / (np.linalg.norm(w) * np.linalg.norm(deq)) if deq.any() else 0.0
    assert m.cosine == pytest.approx(cosine, abs=1e-9)
    assert q.probe_products["p"][:, 0] == pytest.approx(w @ probe, rel=1e-5)
    assert q.probe_products["p"][:, 1] == pytest.approx(w @ probe - deq @ probe, rel=1e-4)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("gather", ["none", "rows", "columns", "both"])
def test_measures_of_each_row_match_float64_on_every_kernel_path(storage, gather):
    # 2051 rows: with probes the kernel walks chunks of 8 rows (the last one shorter); three
    # probes: two summed in the weight-error loop, the third in its own; rows of magnitudes
    # 1e-3..1e3, a block of zeros and a block too small for any scale (stored as zeros)
    rows, k = 2051, 512
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((rows, k)) * 10.0 ** rng.uniform(-3, 3, size=(rows, 1))).astype(np.float32)
    x[5, :256] = 0
    x[9, 256:] *= np.float32(1e-41) / np.abs(x[9, 256:]).max()
    if storage == "bfloat16":
        bits = ((x.view(np.uint32) + 0x8000) >> 16).astype(np.uint16)
        x, source = (bits.astype(np.uint32) << 16).view(np.float32), bits
    else:
        source = x
    row_perm = rng.permutation(rows).astype(np.uint32) if gather in ("rows", "both") else None
    col_perm = rng.permutation(k).astype(np.uint32) if gather in ("columns", "both") else None
    probes = np.stack([probe_vector("sum_test", k), probe_vector("gradient_test", k), rng.standard_normal(k).astype(np.float32)])
    blocks = np.empty((rows * k // 256, BLOCK_BYTES), np.uint8)
    measures = np.zeros((rows, measure_columns(3)))
    assert quantize_rows_q8k(source, row_perm, col_perm, 0, blocks, probes, measures) == 0
    stored = x[row_perm if row_perm is not None else slice(None)][:, col_perm if col_perm is not None else slice(None)]
    # the measured pass stores exactly what the unmeasured one does
    unmeasured = np.empty_like(blocks)
    quantize_rows_q8k(source, row_perm, col_perm, 0, unmeasured)
    assert np.array_equal(blocks, unmeasured)
    w = stored.astype(np.float64)
    deq = qstrat.dequantize_blocks(blocks).reshape(w.shape).astype(np.float64)
    expected = {ERROR_SQUARES: ((w - deq) ** 2).sum(1), REFERENCE_SQUARES: (w**2).sum(1), DEQUANTIZED_SQUARES: (deq**2).sum(1)}
    for column, values in expected.items():
        assert measures[:, column] == pytest.approx(values, rel=1e-5, abs=1e-300), column
    assert measures[:, MAX_ABS_ERROR] == pytest.approx(np.abs(w - deq).max(1), rel=1e-6, abs=1e-300)
    assert measures[5, ERROR_SQUARES] > 0 and measures[9, MAX_ABS_ERROR] > 0  # zero block, and one stored as zeros
    for p, probe in enumerate(probes.astype(np.float64)):
        rounding = 1e-5 * (np.abs(w) @ np.abs(probe))  # what a row's float32 sums are relative to
        exact = measures[:, PROBE_COLUMNS + 2 * p]
        error = measures[:, PROBE_COLUMNS + 2 * p + 1]
        assert np.all(np.abs(exact - w @ probe) <= rounding), p
        assert np.all(np.abs(error - (w @ probe - deq @ probe)) <= rounding), p


def test_measured_gather_counts_non_finite_blocks():
    x = np.random.default_rng(8).standard_normal((40, 512)).astype(np.float32)
    x[3, 7] = np.nan
    x[30, 500] = np.inf
    blocks = np.empty((80, BLOCK_BYTES), np.uint8)
    perm = np.random.default_rng(9).permutation(512).astype(np.uint32)
    measures = np.zeros((40, measure_columns(2)))
    assert quantize_rows_q8k(x, None, perm, 0, blocks, np.ones((2, 512), np.float32), measures) == 2


def test_gradient_test_sees_the_permutation_sum_test_does_not():
    x = np.random.default_rng(2).standard_normal((16, 512)).astype(np.float32)
    perm = np.random.default_rng(3).permutation(512)
    permuted = quantize_matrix(x, "candle", col_perm=perm).blocks
    # the fused gather measures the same error as quantizing a permuted copy
    assert quantize_matrix(x, "candle", col_perm=perm).metrics.mse == pytest.approx(
        quantize_matrix(np.ascontiguousarray(x[:, perm]), "candle").metrics.mse, rel=1e-12)
    ones = probe_vector("sum_test", 512)
    ramp = probe_vector("gradient_test", 512)
    # W' is the stored (permuted) float matrix: with the permutation, both sides move together
    baseline = _probe_mse(x, ramp, "exact", "candle")
    assert _probe_mse(x, ramp, "exact", "candle", col_perm=perm) < 2 * baseline
    assert _probe_mse(x, ramp, "exact", "candle", col_perm=perm) == pytest.approx(
        _probe_mse(np.ascontiguousarray(x[:, perm]), ramp, "exact", "candle"), rel=1e-9)
    # a consumer that forgot the gather is caught by the gradient test, not by the sum test
    deq = qstrat.dequantize_blocks(permuted).reshape(x.shape).astype(np.float64)
    forgot_gather = lambda probe: np.mean((x.astype(np.float64) @ probe - deq @ probe) ** 2)  # noqa: E731
    assert forgot_gather(ramp) > 100 * baseline
    assert forgot_gather(ones) == pytest.approx(_probe_mse(x, ones, "exact", "candle", col_perm=perm), rel=1e-6)


def test_corrupted_quantization_fails_its_thresholds():
    x = np.random.default_rng(4).standard_normal((8, 512)).astype(np.float32)
    good = quantize_matrix(x, "candle").metrics
    # one block's values lost: its measures as the kernel would give them for a zero block
    lost = x.copy()
    lost.reshape(-1, 256)[3] = 0
    w = x.astype(np.float64)
    q = qstrat.dequantize_blocks(quantize_matrix(lost, "candle").blocks).reshape(x.shape).astype(np.float64)
    measures = np.stack([((w - q) ** 2).sum(1), (w**2).sum(1), (q**2).sum(1), abs(w - q).max(1)], axis=1)
    bad = TensorMetrics.from_row_measures(measures, x.size)
    thresholds = Thresholds(min_sqnr_db=30, max_mse=1e-4, min_cosine=0.999)
    records = [TensorRecord("good", x.shape, "F32", "q8k", metrics=good), TensorRecord("bad", x.shape, "F32", "q8k", metrics=bad)]
    failures = threshold_failures(records, thresholds)
    assert {f.name for f in failures} == {"bad"}
    assert {f.metric for f in failures} == {"sqnr_db", "mse", "cosine"}


def test_roundtrip_catches_a_changed_file(tmp_path):
    x = np.random.default_rng(5).standard_normal((2, 256)).astype(np.float32)
    blocks = quantize_matrix(x, "candle").blocks
    written = write_q8k(tmp_path / "w.q8k", blocks, 2, 256)
    check_roundtrip(tmp_path / written.path, blocks, None, None)
    other = blocks.copy()
    other[0, 10] ^= 1
    with pytest.raises(OutputError, match="roundtrip"):
        check_roundtrip(tmp_path / written.path, other, None, None)


def test_run_reports_agree_with_the_result(tmp_path):
    out = tmp_path / "o"
    result = run_cli("qstrat", "run", str(REPO / "configs" / "attention_aware.yaml"), "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    quantized = [e for e in manifest["tensors"].values() if e["storage"] == "q8k"]
    assert report["summary"]["tensor_count"] == len(quantized) == 15
    assert report["summary"]["average_mse"] == pytest.approx(sum(e["metrics"]["mse"] for e in quantized) / 15)
    for entry in quantized:
        m = entry["metrics"]
        assert m["sum_test_mse"] is not None and m["gradient_test_mse"] is not None
    assert "| model.layers.0.self_attn.q_proj.weight | 512x512 | q8k | attention_aware | runtime |" in (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "exact dequantized weights" in (out / "report.md").read_text()


def test_model_quantized_exactly_reports_exact(tmp_path):
    # every value on its block's grid: zero error, infinite SQNR, which JSON cannot hold as a number
    from qstrat.synthetic import write_model

    write_model(tmp_path / "m", {f"model.layers.{i}.mlp.up_proj.weight": _exact_matrix(seed=i) for i in range(2)}, dtype="F32")
    (tmp_path / "c.yaml").write_text(f"input: {tmp_path / 'm'}\noutput: {tmp_path / 'o'}\n")
    result = run_cli("qstrat", "run", str(tmp_path / "c.yaml"), "-q")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "o" / "report.json").read_text())["summary"]
    assert summary["worst_sqnr_db"] == summary["mean_sqnr_db"] == "inf"
    assert "SQNR mean exact, worst exact" in (tmp_path / "o" / "report.md").read_text()


def test_candle_product_and_validation_off(tmp_path):
    config = REPO / "configs" / "identity.yaml"
    result = run_cli("qstrat", "run", str(config), "-o", str(tmp_path / "c"), "-q", "--set", "validation.product=candle")
    assert result.returncode == 0, result.stderr
    assert "as Candle does" in (tmp_path / "c" / "report.md").read_text()
    result = run_cli("qstrat", "run", str(config), "-o", str(tmp_path / "off"), "-q", env={"CANDLE_Q8K_VALIDATION": "0"})
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "off" / "manifest.json").read_text())
    assert all(e.get("metrics") is None for e in manifest["tensors"].values())


def test_compare_writes_no_model_files(tmp_path):
    result = run_cli("qstrat", "compare", str(REPO / "examples" / "tiny-llama"), "-s", "identity,l2_norm,attention_aware+l2_norm",
                     "-o", str(tmp_path / "cmp"), "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["chain"]: r for r in json.loads(result.stdout)["chains"]}
    assert set(rows) == {"identity", "l2_norm", "attention_aware+l2_norm"}
    assert rows["l2_norm"]["mean_sqnr_db"] > rows["identity"]["mean_sqnr_db"]
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.json", "compare.md", "compare.png"]


def test_compare_refuses_an_unknown_strategy_and_an_output_that_is_a_file(tmp_path):
    model = str(REPO / "examples" / "tiny-llama")
    unknown = run_cli("qstrat", "compare", model, "-s", "identity,l2_norm+bogus")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert_clean_failure(unknown, "--strategies: unknown strategy 'bogus'")
    (tmp_path / "afile").write_text("mine")
    taken = run_cli("qstrat", "compare", model, "-s", "identity", "-o", str(tmp_path / "afile"))
    assert taken.returncode == 3 and taken.stdout == ""  # refused before anything is computed
    assert_clean_failure(taken, "afile: exists and is not a directory (--output)")
    assert (tmp_path / "afile").read_text() == "mine"


def test_compare_gives_a_preset_that_needs_an_imatrix_a_refused_row(tmp_path):
    # the whole comparison used to stop (exit 2, no table) at q2_k_s without an importance matrix
    result = run_cli("qstrat", "compare", str(REPO / "examples" / "tiny-llama"), "-f", "q2_k_s,q8_0,q8_k", "-s", "identity,l2_norm", "--json")
    assert result.returncode == 0, result.stderr
    rows = {(r["format"], r["chain"]): r for r in json.loads(result.stdout)["chains"]}
    assert "q2_k_s requires importance data (imatrix)" in rows["q2_k_s", "identity"]["error"]
    assert rows["q8_0", "identity"]["bits_per_weight"] == 8.5 and "error" not in rows["q8_0", "identity"]
    # a run-time permutation in a model written for llama.cpp: refused as the run refuses it (it had figures)
    assert "llama.cpp cannot apply" in rows["q8_0", "l2_norm"]["error"]
    assert rows["q8_k", "l2_norm"]["runtime_permutations"] == 15  # Candle's Q8K path gathers
    # an option of the command itself is no case's refusal: it stops the comparison
    bad = run_cli("qstrat", "compare", str(REPO / "examples" / "tiny-llama"), "-f", "q8_0", "-s", "identity", "--variant", "bogus")
    assert bad.returncode == 2 and bad.stdout == ""
    assert_clean_failure(bad, "variant")


def test_compare_gives_a_preset_a_model_of_another_architecture_cannot_take_a_refused_row(tmp_path):
    # llama.cpp's rules are mirrored for the Llama family: a BERT model's q4_k_m stopped the whole comparison
    from qstrat.synthetic import write_model
    from tests.forward import bert_tensors

    model = write_model(tmp_path / "bert", bert_tensors(256, 512, 1), dtype="F32", config={"model_type": "bert", "architectures": ["BertModel"]})
    result = run_cli("qstrat", "compare", str(model), "-f", "q8_0,q4_k_m", "-s", "identity", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["format"]: r for r in json.loads(result.stdout)["chains"]}
    assert "mirrored for the llama family only" in rows["q4_k_m"]["error"] and rows["q8_0"]["bits_per_weight"] == 8.5
    run = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(tmp_path / "o"), "--set", "preset=q4_k_m")
    assert run.returncode == 2
    assert_clean_failure(run, "preset q4_k_m: llama.cpp's type rules are mirrored for the llama family only")


def test_a_threshold_the_run_does_not_measure_is_a_warning(tmp_path):
    config = str(REPO / "configs" / "attention_aware.yaml")  # min_sqnr_db: 20
    off = run_cli("qstrat", "run", config, "-o", str(tmp_path / "off"), "--set", "validation.enabled=false")
    assert off.returncode == 0, off.stderr
    assert "warning: validation.thresholds.min_sqnr_db is not checked: validation.enabled is false" in off.stderr
    staged = run_cli("qstrat", "run", config, "-o", str(tmp_path / "staged"), "--json",
                     "--set", "validation.stages=[weight_error, sum_test]", "--set", "validation.thresholds.max_gradient_test_mse=1")
    assert staged.returncode == 0 and staged.stderr == "", staged.stderr
    assert json.loads(staged.stdout)["warnings"] == ["validation.thresholds.max_gradient_test_mse is not checked: validation.stages lacks gradient_test"]
    measured = run_cli("qstrat", "run", config, "-o", str(tmp_path / "measured"), "--json")
    assert "warnings" not in json.loads(measured.stdout)


def test_the_report_names_the_format_or_preset_and_the_q8k_variant_only_for_q8k(tmp_path):
    config = str(REPO / "configs" / "identity.yaml")
    for name, settings, head in (("preset", ["--set", "preset=q4_k_m"], "Preset `q4_k_m`; strategies identity"),
                                 ("q8k", [], "Format `q8k`, Q8K variant `candle`; strategies identity")):
        assert run_cli("qstrat", "run", config, "-o", str(tmp_path / name), "-q", *settings).returncode == 0
        assert (tmp_path / name / "report.md").read_text().splitlines()[2].startswith(head)


def test_weights_of_more_than_two_dimensions_are_a_warning_only_where_they_weigh():
    # a MoE model's experts are most of it; a vision tower's convolutions would be a warning every night
    from pathlib import Path

    from qstrat.io.safetensors import TensorInfo
    from qstrat.report import stacked_passthrough

    def info(name, shape):
        return TensorInfo(name, "F32", shape, Path("m.safetensors"), 0, 4 * math.prod(shape))

    matrix = info("w.weight", (1024, 1024))
    conv = info("conv.weight", (64, 3, 16, 16))
    assert stacked_passthrough({"w.weight": matrix, "conv.weight": conv}, {"conv.weight": "4-D"}) is None
    experts = info("blk.0.ffn_up_exps.weight", (8, 1024, 1024))
    assert stacked_passthrough({"w.weight": matrix, experts.name: experts}, {}) is None  # quantized
    sentence = stacked_passthrough({"w.weight": matrix, experts.name: experts}, {experts.name: "3-D, not Q8K"})
    assert sentence == ("1 weight tensor of more than two dimensions, such as a MoE model's experts (blk.0.ffn_up_exps.weight), "
                        "is not quantized (blk.0.ffn_up_exps.weight: 3-D, not Q8K) but passed through: 34 MB in the input, 34 MB in the output")
    large_conv = info("conv.weight", (1024, 64, 4, 4))  # no expert in sight: not called one
    sentence = stacked_passthrough({"w.weight": matrix, "conv.weight": large_conv}, {"conv.weight": "4-D"})
    assert sentence.startswith("1 weight tensor of more than two dimensions (conv.weight) is not quantized (conv.weight: 4-D)")
