"""qstrat.evaluate: the arithmetic of perplexity and KL divergence over logits, checked against a
direct computation (a Python loop over positions, math.fsum), and its chunking against
llama-perplexity's rules, with a fake engine.  No model runs here (tests/test_eval.py runs llama.cpp)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qstrat.errors import InputError
from qstrat.evaluate import (
    Scores,
    chunk_count,
    chunk_input,
    evaluate,
    kl_divergence,
    log_softmax,
    mean_and_uncertainty,
    percentile,
    perplexity,
    probability_differences,
    scored_positions,
    text_from_file,
    token_nll,
    top1_agreement,
)


def direct_log_probs(row) -> list[float]:
    """log p of each token of one row, written out without numpy's reductions."""
    row = [float(x) for x in row]
    top = max(row)
    log_sum = top + math.log(math.fsum(math.exp(x - top) for x in row))
    return [x - log_sum for x in row]


@pytest.fixture
def logits():
    rng = np.random.default_rng(7)
    # spread like a language model's: a few large logits, a long tail
    reference = (rng.standard_normal((9, 50)) * 3).astype(np.float32)
    model = (reference + rng.standard_normal((9, 50)).astype(np.float32) * 0.5).astype(np.float32)
    targets = rng.integers(0, 50, 9)
    return reference, model, targets


def test_log_softmax_nll_kl_top1_dp_equal_a_direct_computation(logits):
    reference, model, targets = logits
    for i in range(len(model)):
        ref_lp, lp = direct_log_probs(reference[i]), direct_log_probs(model[i])
        assert np.allclose(log_softmax(model)[i], lp, rtol=0, atol=1e-12)
        assert token_nll(model, targets)[i] == pytest.approx(-lp[targets[i]], abs=1e-12)
        kl = math.fsum(math.exp(r) * (r - m) for r, m in zip(ref_lp, lp))
        assert kl_divergence(reference, model)[i] == pytest.approx(kl, abs=1e-12)
        assert top1_agreement(reference, model)[i] == (max(range(50), key=lambda j: model[i][j]) == max(range(50), key=lambda j: reference[i][j]))
        dp = math.exp(lp[targets[i]]) - math.exp(ref_lp[targets[i]])
        assert probability_differences(reference, model, targets)[i] == pytest.approx(dp, abs=1e-12)
    assert (kl_divergence(reference, model) > 0).all()
    assert np.array_equal(kl_divergence(model, model), np.zeros(len(model)))  # exactly: same terms
    assert top1_agreement(model, model).all()


def test_log_softmax_is_stable_for_large_logits():
    x = np.array([[1000.0, 999.0, -1000.0]], dtype=np.float32)
    expected = direct_log_probs(x[0])
    assert np.allclose(log_softmax(x)[0], expected, atol=1e-12)
    assert np.isfinite(kl_divergence(x, x[:, ::-1])).all()


def test_statistics_are_llama_perplexitys(logits):
    _, model, targets = logits
    nll = token_nll(model, targets)
    n = len(nll)
    mean = math.fsum(nll) / n
    variance = math.fsum(v * v for v in nll) / n - mean * mean
    ppl, error = perplexity(nll)
    assert ppl == pytest.approx(math.exp(mean), rel=1e-12)
    assert error == pytest.approx(math.exp(mean) * math.sqrt(variance / (n - 1)), rel=1e-9)
    # the KL statistics need more than 10 values for an uncertainty, as llama-perplexity's
    assert mean_and_uncertainty(nll, min_count=11)[1] == 0.0
    assert mean_and_uncertainty(np.full(20, 0.5), min_count=11) == (0.5, 0.0)
    # percentiles interpolate at fraction * (n - 1) of the sorted values
    values = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    assert percentile(values, 0.99) == pytest.approx(4.96)
    assert percentile(values, 0.5) == 3.0


def test_scores_by_row_blocks_equal_whole_arrays(logits, monkeypatch):
    reference, model, targets = logits
    import qstrat.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "ROW_BLOCK", 4)  # 9 rows: blocks of 4, 4, 1
    scores = Scores()
    scores.add(model, targets, reference)
    summary = scores.summary()
    kl = kl_divergence(reference, model)
    dp = probability_differences(reference, model, targets)
    assert summary["perplexity"] == pytest.approx(math.exp(token_nll(model, targets).mean()), rel=1e-12)
    assert summary["reference_perplexity"] == pytest.approx(math.exp(token_nll(reference, targets).mean()), rel=1e-12)
    assert summary["kl_divergence"] == pytest.approx(kl.mean(), rel=1e-12)
    assert summary["kl_divergence_median"] == pytest.approx(float(np.median(kl)), rel=1e-12)
    assert summary["kl_divergence_p99"] == pytest.approx(float(np.sort(kl)[-2] + 0.92 * (np.sort(kl)[-1] - np.sort(kl)[-2])), rel=1e-9)
    assert summary["top1_agreement"] == pytest.approx(top1_agreement(reference, model).mean())
    assert summary["rms_dp"] == pytest.approx(math.sqrt(np.mean(dp * dp)), rel=1e-12)
    assert summary["scored_tokens"] == 9
    alone = Scores()
    alone.add(model, targets)
    assert alone.summary()["perplexity"] == summary["perplexity"] and alone.summary()["kl_divergence"] is None


def llama_perplexity_kl(reference_row: np.ndarray, model_row: np.ndarray) -> float:
    """KL as llama-perplexity computes it: the reference's log-probabilities stored as 16-bit
    integers over its top 16 nats (log_softmax with a uint16 output), terms below -16 dropped."""
    ref = reference_row.astype(np.float32)
    top, low = ref.max(), max(ref.min(), ref.max() - 16)
    log_sum = np.float32(math.log(np.exp(ref.astype(np.float64) - top).sum()))
    min_log_prob = np.float32(low - top - log_sum)
    scale = np.float32((top - low) / 65535)
    stored = np.where(ref > low, np.round((ref - low) / scale), 0).astype(np.uint16)
    p_log_base = scale * stored.astype(np.float32) + min_log_prob
    model_log_probs = log_softmax(model_row[None])[0]
    kept = p_log_base > -16
    return float((np.exp(p_log_base[kept]) * (p_log_base[kept] - model_log_probs[kept])).sum())


def test_kl_agrees_with_llama_perplexitys_16_bit_version():
    """qstrat's KL is exact; llama-perplexity's, from 16-bit log-probabilities, is within 2e-4 nats
    of it (a model against itself: 0 here, about 1e-5 there)."""
    rng = np.random.default_rng(3)
    reference = (rng.standard_normal((6, 4000)) * 2.5).astype(np.float32)
    model = (reference + rng.standard_normal((6, 4000)).astype(np.float32) * 0.1).astype(np.float32)
    ours = kl_divergence(reference, model)
    theirs = np.array([llama_perplexity_kl(r, m) for r, m in zip(reference, model)])
    assert np.abs(ours - theirs).max() < 2e-4, (ours, theirs)
    itself = np.array([llama_perplexity_kl(r, r) for r in reference])
    assert np.abs(itself).max() < 1e-4 and (kl_divergence(reference, reference) == 0).all()


# --- chunks: llama-perplexity's rules ---------------------------------------------------------

def test_chunk_count_and_positions():
    assert chunk_count(1000, 128, None) == 7
    assert chunk_count(1000, 128, 4) == 4
    assert chunk_count(1000, 128, 40) == 7
    assert chunk_count(256, 128, None) == 2
    with pytest.raises(InputError, match=r"wiki.txt: 255 tokens, fewer than the 256 needed with a context of 128"):
        chunk_count(255, 128, None, "wiki.txt")
    with pytest.raises(InputError, match="at least 4"):
        chunk_count(1000, 3, None)
    # positions ctx/2 .. ctx-2 predict the next token: ctx - 1 - ctx/2 scores per chunk
    assert scored_positions(128) == slice(64, 127) and len(range(128)[scored_positions(128)]) == 63
    assert len(range(7)[scored_positions(7)]) == 7 - 1 - 3


def test_bos_replaces_the_first_token_only_when_the_vocabulary_adds_it():
    tokens = list(range(100, 120))
    assert chunk_input(tokens, 1, 8, None) == list(range(108, 116))
    assert chunk_input(tokens, 1, 8, 1) == [1] + list(range(109, 116))
    assert tokens == list(range(100, 120))  # the text's tokens are left as they were


class FakeEngine:
    """A deterministic stand-in for llama.cpp: the logits of a position depend on every token up
    to it (a cumulative hash), so that a chunk evaluated with a stale context, a shifted window or
    a missing BOS gives other figures.  It records what it was asked."""

    def __init__(self, n_vocab=37, add_bos=False, bos=1, scale=1.0, seed=0):
        self.n_vocab, self.add_bos, self.bos, self.scale = n_vocab, add_bos, bos, scale
        self.table = np.random.default_rng(seed).standard_normal((1009, n_vocab)).astype(np.float32) * 2
        self.calls: list[list[int]] = []

    def tokenize(self, text: bytes) -> list[int]:
        body = [b % self.n_vocab for b in text]
        return ([self.bos] if self.add_bos else []) + body

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.calls.append(list(tokens))
        state = np.cumsum(np.asarray(tokens) * 31 + 7) % 1009
        return self.table[state] * self.scale


def direct_perplexity(engine: FakeEngine, tokens: list[int], ctx: int, n_chunks: int) -> float:
    nll = []
    for c in range(n_chunks):
        chunk = tokens[c * ctx:(c + 1) * ctx]
        fed = ([engine.bos] + chunk[1:]) if engine.add_bos else chunk
        state = np.cumsum(np.asarray(fed) * 31 + 7) % 1009
        for i in range(ctx // 2, ctx - 1):
            nll.append(-direct_log_probs(engine.table[state[i]] * engine.scale)[chunk[i + 1]])
    return math.exp(math.fsum(nll) / len(nll))


@pytest.mark.parametrize("add_bos", [False, True])
def test_evaluate_follows_llama_perplexity(add_bos):
    text = bytes(range(32, 127)) * 3  # 285 bytes: tokens
    engine = FakeEngine(add_bos=add_bos)
    tokens = engine.tokenize(text)
    seen = []
    result = evaluate(engine, text, ctx=32, chunks=5, progress=lambda done, total: seen.append((done, total)))
    assert result["chunks"] == 5 and result["tokens"] == len(tokens) and result["scored_tokens"] == 5 * 15
    assert result["perplexity"] == pytest.approx(direct_perplexity(engine, tokens, 32, 5), rel=1e-12)
    assert seen == [(0, 5)] + [(i, 5) for i in range(1, 6)]
    # each chunk is evaluated on its own, from its own first token (BOS only if the vocabulary adds it)
    for c, call in enumerate(engine.calls):
        expected = tokens[c * 32:(c + 1) * 32]
        if add_bos:
            expected = [engine.bos] + expected[1:]
        assert call == expected
    every = evaluate(FakeEngine(add_bos=add_bos), text, ctx=32)
    assert every["chunks"] == len(tokens) // 32


def test_evaluate_with_a_reference():
    text = bytes(range(32, 127)) * 3
    model, reference = FakeEngine(scale=1.3), FakeEngine()
    result = evaluate(model, text, ctx=32, chunks=4, reference=reference)
    assert model.calls == reference.calls  # the very same tokens
    assert result["kl_divergence"] > 0 and result["top1_agreement"] == 1.0  # a sharper copy: same argmax
    assert result["reference_perplexity"] == pytest.approx(direct_perplexity(reference, model.tokenize(text), 32, 4), rel=1e-12)
    itself = evaluate(FakeEngine(), text, ctx=32, chunks=4, reference=FakeEngine())
    assert itself["kl_divergence"] == 0.0 and itself["rms_dp"] == 0.0 and itself["top1_agreement"] == 1.0
    assert itself["perplexity"] == itself["reference_perplexity"]
    other = evaluate(FakeEngine(), text, ctx=32, chunks=4, reference=FakeEngine(seed=5))
    assert other["top1_agreement"] < 0.5 and other["kl_divergence"] > result["kl_divergence"]


def test_evaluate_refuses_short_texts_and_other_vocabularies():
    with pytest.raises(InputError, match="short.txt: 63 tokens, fewer than the 64 needed"):
        evaluate(FakeEngine(), b"x" * 63, ctx=32, source="short.txt")
    with pytest.raises(InputError, match="ref.gguf: a vocabulary of 40 tokens, the model's has 37"):
        evaluate(FakeEngine(), b"x" * 100, ctx=32, reference=FakeEngine(n_vocab=40), reference_name="ref.gguf")
    # a model whose weights hold NaN: perplexity nan, exit 0 (a run refuses such weights; a GGUF of another tool may hold them)
    broken = FakeEngine()
    broken.table[:, 3] = np.nan
    with pytest.raises(InputError, match=r"nan.gguf: its logits of chunk \d+ hold NaN or infinity"):
        evaluate(broken, bytes(range(256)) * 4, ctx=32, model_name="nan.gguf")


def test_text_from_a_file_loses_one_final_newline_as_with_llama_cpps_f():
    assert text_from_file(b"text\n\n") == b"text\n"
    assert text_from_file(b"text") == b"text" and text_from_file(b"") == b""
