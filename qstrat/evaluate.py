"""Perplexity and KL divergence of a model's next-token predictions, as llama.cpp's
``llama-perplexity`` measures them (tools/perplexity/perplexity.cpp: ``perplexity()``,
``kl_divergence()``, ``process_logits``, ``log_softmax``).

This module is arithmetic over logits arrays, and the loop over a text's chunks; it never runs
a model itself.  An engine (:mod:`qstrat.llama_engine`: llama.cpp through llama-cpp-python) gives
the tokens of a text and the logits of a chunk, and :func:`evaluate` does the rest:

- the text is the file's bytes less one final newline (llama.cpp's ``-f`` drops it);
- it is tokenized once, as llama.cpp's ``common_tokenize(ctx, text, add_special=true,
  parse_special=false)`` does: a BOS token in front only if the vocabulary adds one;
- it is cut into ``min(chunks, tokens // ctx)`` chunks of ``ctx`` tokens; fewer than ``2 * ctx``
  tokens is refused, as llama-perplexity refuses it;
- each chunk is evaluated in a fresh context, its first token replaced by BOS only if the
  vocabulary adds BOS;
- the logits of positions ``ctx // 2 .. ctx - 2`` score the token that follows each (the model always
  has at least half a context behind it): ``ctx - 1 - ctx // 2`` scores per chunk;
- perplexity is ``exp`` of the mean negative log-likelihood of those tokens, its uncertainty
  ``ppl * sqrt(var(nll) / (n - 1))``, as llama-perplexity prints it;
- with a reference model (the same tokens, the same positions): the mean KL divergence
  ``KL(reference || model)`` and its uncertainty, its median and 99th percentile, the fraction of
  positions where both models' most likely token is the same ("Same top p"), and the RMS of
  ``p_model(next) - p_reference(next)`` for the actual next token ("RMS Δp").

One difference from llama-perplexity, on purpose: it stores the reference's log-probabilities
as 16-bit integers over the top 16 nats (its logits file) and drops the terms of tokens below
that range from the KL sum; here both models' logits are at hand chunk by chunk, so the KL sum is
exact (float64 over the whole vocabulary): a model compared with itself gives exactly 0.
Everything else is computed in float64 where llama.cpp mixes float and double; the figures agree
to far more digits than the statistical uncertainty.

Memory: only one chunk's logits per model are held (``ctx x n_vocab`` float32), and they are
reduced in blocks of rows; per position only a few numbers are kept (for the median and percentiles).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from qstrat.errors import InputError

#: rows of logits reduced at once (bounds the float64 temporaries: 64 x 49152 x 8 bytes = 25 MB)
ROW_BLOCK = 64


# --- per position: pure functions of logits (float32 or float64, rows = positions) -------------

def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log p`` of every token at every position (float64): ``x - max - log(sum(exp(x - max)))``."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, next_tokens: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of ``next_tokens[i]`` under the logits of row ``i`` (float64)."""
    logp = log_softmax(logits)
    return -logp[np.arange(len(logp)), np.asarray(next_tokens, dtype=np.int64)]


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """``KL(reference || model)`` per position: ``sum p_ref * (log p_ref - log p_model)`` over the
    vocabulary, in nats (float64, exact: no truncation of small probabilities)."""
    ref = log_softmax(reference_logits)
    return (np.exp(ref) * (ref - log_softmax(logits))).sum(axis=-1)


def top1_agreement(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per position, whether both models' most likely token is the same (the first of equal
    maxima, as llama.cpp takes it)."""
    return np.argmax(np.asarray(reference_logits), axis=-1) == np.argmax(np.asarray(logits), axis=-1)


def probability_differences(reference_logits: np.ndarray, logits: np.ndarray, next_tokens: Sequence[int]) -> np.ndarray:
    """``p_model(next) - p_reference(next)`` per position, for the actual next token (float64)."""
    return np.exp(-token_nll(logits, next_tokens)) - np.exp(-token_nll(reference_logits, next_tokens))


# --- statistics, as llama-perplexity computes them ---------------------------------------------

def mean_and_uncertainty(values: np.ndarray, min_count: int = 1) -> tuple[float, float]:
    """Mean and its standard error ``sqrt((mean(v^2) - mean(v)^2) / (n - 1))``, 0 when the variance
    is not positive or there are fewer than ``min_count`` values (llama-perplexity's KL statistics
    take 11, its perplexity 2)."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n == 0:
        return math.nan, math.nan
    mean = float(v.mean())
    variance = float((v * v).mean()) - mean * mean
    return mean, (math.sqrt(variance / (n - 1)) if variance > 0 and n >= max(min_count, 2) else 0.0)


def perplexity(nll: np.ndarray) -> tuple[float, float]:
    """``exp(mean(nll))`` and its uncertainty ``ppl * sqrt(var(nll) / (n - 1))``."""
    mean, error = mean_and_uncertainty(nll)
    ppl = math.exp(mean)
    return ppl, ppl * error


def percentile(values: np.ndarray, fraction: float) -> float:
    """Linear interpolation between the sorted values at ``fraction * (n - 1)``, as llama-perplexity."""
    return float(np.quantile(np.asarray(values, dtype=np.float64), fraction))


def text_from_file(data: bytes) -> bytes:
    """The text llama-perplexity evaluates of a file given with ``-f``: its bytes, less one final
    newline (common/arg.cpp)."""
    return data[:-1] if data.endswith(b"\n") else data


# --- chunks ------------------------------------------------------------------------------------

def chunk_count(n_tokens: int, ctx: int, chunks: int | None, source: str = "the text", tool: str = "llama-perplexity") -> int:
    """``min(chunks, n_tokens // ctx)``; refuses fewer than ``2 * ctx`` tokens, as llama-perplexity
    and llama-imatrix (``tool``, named in the error) do."""
    if ctx < 4:
        raise InputError(f"a context of {ctx} tokens is too small (at least 4: the second half of each chunk is scored)")
    if chunks is not None and chunks < 1:
        raise InputError(f"--chunks {chunks}: at least 1")
    if n_tokens < 2 * ctx:
        raise InputError(
            f"{source}: {n_tokens} tokens, fewer than the {2 * ctx} needed with a context of {ctx} "
            f"(two chunks, as {tool} requires): give a longer text or a smaller --ctx"
        )
    available = n_tokens // ctx
    return available if chunks is None else min(chunks, available)


def chunk_input(tokens: Sequence[int], index: int, ctx: int, bos: int | None) -> list[int]:
    """The tokens a chunk is evaluated on: ``ctx`` tokens from ``index * ctx``, the first replaced
    by ``bos`` when the vocabulary adds BOS (``bos`` is None when it does not)."""
    chunk = [int(t) for t in tokens[index * ctx:(index + 1) * ctx]]
    if bos is not None:
        chunk[0] = int(bos)
    return chunk


def scored_positions(ctx: int) -> slice:
    """The logits rows that are scored: ``ctx // 2 .. ctx - 2``, each predicting the next token."""
    return slice(ctx // 2, ctx - 1)


# --- the evaluation of a text ------------------------------------------------------------------

class Engine(Protocol):
    """What :func:`evaluate` needs of a model (see qstrat.llama_engine.LlamaCppModel)."""

    n_vocab: int
    add_bos: bool
    bos: int

    def tokenize(self, text: bytes) -> list[int]: ...

    def logits(self, tokens: list[int]) -> np.ndarray:
        """``len(tokens) x n_vocab`` logits from an empty context (may be a view that the
        engine's next call overwrites: a model and its reference are two engines)."""


@dataclass
class Scores:
    """Per-position results, gathered chunk by chunk (a few floats per scored token)."""

    nll: list[np.ndarray] = field(default_factory=list)
    reference_nll: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    same_top: list[np.ndarray] = field(default_factory=list)
    p_diff: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, next_tokens: Sequence[int], reference_logits: np.ndarray | None = None) -> None:
        """Score one chunk: ``logits`` rows (the scored positions) and the tokens that follow them."""
        next_tokens = np.asarray(next_tokens, dtype=np.int64)
        for start in range(0, len(next_tokens), ROW_BLOCK):
            rows = slice(start, start + ROW_BLOCK)
            targets = next_tokens[rows]
            logp = log_softmax(logits[rows])
            nll = -logp[np.arange(len(logp)), targets]
            self.nll.append(nll)
            if reference_logits is None:
                continue
            ref_logp = log_softmax(reference_logits[rows])
            ref_nll = -ref_logp[np.arange(len(ref_logp)), targets]
            self.reference_nll.append(ref_nll)
            self.kl.append((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1))
            self.same_top.append(np.argmax(reference_logits[rows], axis=-1) == np.argmax(logits[rows], axis=-1))
            self.p_diff.append(np.exp(-nll) - np.exp(-ref_nll))

    def summary(self) -> dict[str, float | int | None]:
        nll = np.concatenate(self.nll) if self.nll else np.zeros(0)
        ppl, ppl_error = perplexity(nll)
        result: dict[str, float | int | None] = {
            "perplexity": ppl, "perplexity_uncertainty": ppl_error, "scored_tokens": int(nll.size),
            "kl_divergence": None, "kl_divergence_uncertainty": None, "kl_divergence_median": None,
            "kl_divergence_p99": None, "top1_agreement": None, "top1_agreement_uncertainty": None,
            "rms_dp": None, "rms_dp_uncertainty": None, "reference_perplexity": None,
            "reference_perplexity_uncertainty": None,
        }
        if not self.kl:
            return result
        kl = np.concatenate(self.kl)
        same = np.concatenate(self.same_top).astype(np.float64)
        p_diff = np.concatenate(self.p_diff)
        ref_ppl, ref_ppl_error = perplexity(np.concatenate(self.reference_nll))
        kl_mean, kl_error = mean_and_uncertainty(kl, min_count=11)
        mse, mse_error = mean_and_uncertainty(p_diff * p_diff, min_count=11)
        rms = math.sqrt(mse)
        top = float(same.mean())
        result.update(
            kl_divergence=kl_mean, kl_divergence_uncertainty=kl_error,
            kl_divergence_median=float(np.median(kl)), kl_divergence_p99=percentile(kl, 0.99),
            top1_agreement=top,
            top1_agreement_uncertainty=math.sqrt(top * (1 - top) / (same.size - 1)) if same.size > 1 else 0.0,
            rms_dp=rms, rms_dp_uncertainty=0.5 / rms * mse_error if rms > 0 else 0.0,
            reference_perplexity=ref_ppl, reference_perplexity_uncertainty=ref_ppl_error,
        )
        return result


def evaluate(
    model: Engine,
    text: bytes,
    ctx: int = 512,
    chunks: int | None = None,
    reference: Engine | None = None,
    progress: Callable[[int, int], None] | None = None,
    source: str = "the text",
    reference_name: str = "the reference",
    model_name: str = "the model",
) -> dict[str, float | int | None]:
    """Perplexity of ``model`` over ``text`` (and, with ``reference``, the KL divergence and the other
    comparisons), chunk by chunk as llama-perplexity.  The tokens are the model's; the reference is
    fed the very same tokens, so its vocabulary must be the model's: the same size, and the text
    split into the same tokens.  ``progress(done, total)`` is called before the first chunk and after
    each; ``source`` names the text, ``model_name`` and ``reference_name`` the models in errors."""
    if reference is not None and reference.n_vocab != model.n_vocab:
        raise InputError(
            f"{reference_name}: a vocabulary of {reference.n_vocab} tokens, the model's has {model.n_vocab}: "
            "KL divergence needs the same vocabulary"
        )
    tokens = list(model.tokenize(text))
    if reference is not None:
        # llama-perplexity checks only the size; another vocabulary of the same size gives figures
        # of the reference fed tokens it would never have made (a KL divergence of nonsense)
        theirs = list(reference.tokenize(text))
        same_bos = reference.add_bos == model.add_bos and (not model.add_bos or reference.bos == model.bos)
        if theirs != tokens or not same_bos:
            at = next((i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b), min(len(tokens), len(theirs)))
            raise InputError(
                f"{reference_name}: its vocabulary is not the model's: it splits {source} into other tokens"
                + (f" (from token {at} on)" if same_bos else " (another BOS)") + "; KL divergence needs the same vocabulary"
            )
    n_chunks = chunk_count(len(tokens), ctx, chunks, source)
    bos = model.bos if model.add_bos else None
    rows = scored_positions(ctx)
    scores = Scores()
    if progress is not None:
        progress(0, n_chunks)
    for index in range(n_chunks):
        chunk = chunk_input(tokens, index, ctx, bos)
        next_tokens = tokens[index * ctx + rows.start + 1:(index + 1) * ctx]  # the text's own tokens
        logits = model.logits(chunk)[rows]
        reference_logits = reference.logits(chunk)[rows] if reference is not None else None
        for name, values in ((model_name, logits), (reference_name, reference_logits)):
            if values is not None and not np.isfinite(values).all():  # figures of NaN, exit 0, otherwise
                raise InputError(f"{name}: its logits of chunk {index + 1} hold NaN or infinity (weights that do?)")
        scores.add(logits, next_tokens, reference_logits)
        if progress is not None:
            progress(index + 1, n_chunks)
    return {"tokens": len(tokens), "chunks": n_chunks, "ctx": ctx, "add_bos": bool(model.add_bos), **scores.summary()}
