"""A numpy forward pass of BERT sentence embeddings, to measure accuracy after quantization.

Enough of BERT for sentence-transformers models such as all-MiniLM-L6-v2: embeddings,
post-LayerNorm encoder layers with GELU, mean pooling over the attention mask and L2
normalisation.  Tokenisation uses the ``tokenizers`` package and the model's own
``tokenizer.json``.  No torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.special import erf

from qstrat.errors import QstratError


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def encoder_layers(
    t: Mapping[str, np.ndarray], x: np.ndarray, layers: int, heads: int, mask: np.ndarray | None = None,
    eps: float = 1e-12, prefix: str = "encoder.layer", collect: Callable[[str, np.ndarray], None] | None = None,
) -> np.ndarray:
    """BERT encoder layers on hidden states ``x`` (batch, seq, hidden), float64; ``mask`` (batch, seq) of 0/1.
    ``collect(weight name, inputs)`` sees each linear layer's input rows (the unmasked tokens)."""
    batch, seq, hidden = x.shape
    hd = hidden // heads
    bias = 0.0 if mask is None else (1.0 - mask[:, None, None, :]) * -1e9
    kept = None if mask is None else mask.reshape(-1) > 0

    def lin(h, name):
        if collect is not None:
            rows = h.reshape(-1, h.shape[-1])
            collect(f"{name}.weight", rows if kept is None else rows[kept])
        return h @ t[f"{name}.weight"].T.astype(np.float64) + t[f"{name}.bias"]

    for i in range(layers):
        p, a = f"{prefix}.{i}", f"{prefix}.{i}.attention"
        q = lin(x, f"{a}.self.query").reshape(batch, seq, heads, hd)
        k = lin(x, f"{a}.self.key").reshape(batch, seq, heads, hd)
        v = lin(x, f"{a}.self.value").reshape(batch, seq, heads, hd)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + bias
        context = np.einsum("bhqk,bkhd->bqhd", _softmax(scores), v).reshape(batch, seq, hidden)
        x = _layer_norm(x + lin(context, f"{a}.output.dense"), t[f"{a}.output.LayerNorm.weight"], t[f"{a}.output.LayerNorm.bias"], eps)
        inner = lin(x, f"{p}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))
        x = _layer_norm(x + lin(inner, f"{p}.output.dense"), t[f"{p}.output.LayerNorm.weight"], t[f"{p}.output.LayerNorm.bias"], eps)
    return x


def hidden_states(
    t: Mapping[str, np.ndarray], config: Mapping[str, object], input_ids: np.ndarray, attention_mask: np.ndarray,
    collect: Callable[[str, np.ndarray], None] | None = None,
) -> np.ndarray:
    """The last layer's hidden states (batch, seq, hidden) of a BERT model (see :func:`encoder_layers`)."""
    batch, seq = input_ids.shape
    eps = float(config.get("layer_norm_eps", 1e-12))
    x = (
        t["embeddings.word_embeddings.weight"][input_ids]
        + t["embeddings.position_embeddings.weight"][np.arange(seq)][None]
        + t["embeddings.token_type_embeddings.weight"][0][None, None]
    ).astype(np.float64)
    x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    mask = attention_mask.astype(np.float64)
    return encoder_layers(t, x, int(config["num_hidden_layers"]), int(config["num_attention_heads"]), mask, eps, collect=collect)


def sentence_embeddings(
    t: Mapping[str, np.ndarray], config: Mapping[str, object], input_ids: np.ndarray, attention_mask: np.ndarray
) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings (batch, hidden) of a BERT model."""
    mask = attention_mask.astype(np.float64)
    x = hidden_states(t, config, input_ids, attention_mask)
    pooled = (x * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def tokenize(tokenizer_file: Path, sentences: Sequence[str], max_length: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, padded to the longest sentence."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise QstratError("tokenising needs the package tokenizers (pip install 'qstrat[test]')") from None
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(list(sentences))
    return np.array([e.ids for e in encodings]), np.array([e.attention_mask for e in encodings])


#: fixed sentences for the accuracy check (varied topics, lengths and punctuation)
SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Quantization maps floating-point weights to 8-bit integers with a shared scale per block.",
    "The stock market fell sharply on Tuesday after the central bank raised interest rates.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Where is the nearest train station?",
    "I can't believe it's already December!",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and most populous city of France.",
    "She sells sea shells by the sea shore.",
)


def embedding_agreement(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Mean and worst cosine similarity between matching rows of two embedding matrices."""
    cos = np.sum(reference * candidate, axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))
    return float(cos.mean()), float(cos.min())


class BertEngine:
    """A BERT model as the engine of ``qstrat imatrix`` (its encoder's linear layers collected), with
    the model's own tokenizer (``tokenizer.json``, the ``tokenizers`` package).

    A chunk of ``ctx`` tokens of the text is evaluated with its first and last tokens replaced by
    ``[CLS]`` and ``[SEP]``, as llama-imatrix replaces a chunk's first token by BOS: every chunk is
    one sequence of exactly ``ctx`` tokens."""

    add_bos = False
    bos = 0

    def __init__(self, source: Path) -> None:
        import json

        from qstrat.errors import InputError
        from qstrat.io.safetensors import SafetensorsModel, map_tensor, to_float32

        model = SafetensorsModel(source)
        directory = source if source.is_dir() else source.parent
        self.config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise InputError(f"{source}: no tokenizer.json to read a text with")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise InputError("a BERT model's tokenizer needs the package tokenizers: pip install 'qstrat[eval]'") from None
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_truncation()  # a whole text, cut into chunks here (a model's file may truncate at 128)
        self.tokenizer.no_padding()
        # a BertModel's own names, or a BertFor...'s under "bert.": collected under the model's names
        self.prefix = "bert." if any(name.startswith("bert.") for name in model.tensors) else ""
        self.t = {info.name.removeprefix(self.prefix): to_float32(info.dtype, np.asarray(map_tensor(info))) for info in model}
        self.cls, self.sep = self.tokenizer.token_to_id("[CLS]"), self.tokenizer.token_to_id("[SEP]")
        if self.cls is None or self.sep is None:
            raise InputError(f"{tokenizer_file}: no [CLS] or [SEP] token")
        self.max_positions = int(self.config.get("max_position_embeddings", 512))

    def tokenize(self, text: bytes) -> list[int]:
        return self.tokenizer.encode(text.decode("utf-8", "replace"), add_special_tokens=False).ids

    def collect(self, tokens: list[int], collect: Callable[[str, np.ndarray], None]) -> None:
        from qstrat.errors import InputError

        if len(tokens) > self.max_positions:
            raise InputError(f"--ctx {len(tokens)}: this BERT model takes at most {self.max_positions} positions")
        ids = np.array([[self.cls, *tokens[1:-1], self.sep]])
        hidden_states(self.t, self.config, ids, np.ones_like(ids), lambda name, rows: collect(self.prefix + name, rows))

    def close(self) -> None:
        pass


def is_bert(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face BERT model (directory, or .safetensors beside its config.json)."""
    import json

    directory = path if path.is_dir() else path.parent
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type") == "bert"
    except (OSError, ValueError, AttributeError):
        return False
