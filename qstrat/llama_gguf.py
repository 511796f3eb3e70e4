"""The GGUF of a Llama-family model as llama.cpp's converter writes it, so that llama.cpp runs it.

Followed: ``convert_hf_to_gguf.py`` of ggml-org/llama.cpp at commit 0c1e57098 (the llama.cpp
that llama-cpp-python 0.3.36 vendors; the converter lives in its ``conversion/`` package there):
``TextModel.set_gguf_parameters`` and ``__init__`` (hyperparameters, rope parameters),
``LlamaModel`` (``set_gguf_parameters``, ``permute``, ``modify_tensors``, ``set_vocab``,
``generate_extra_tensors``), ``Qwen2Model`` and the vocabulary functions of ``TextModel``
(``_set_vocab_gpt2`` / ``get_vocab_base``, ``_create_vocab_sentencepiece``,
``_set_vocab_llama_hf``).

What differs, and why:

* The converter names the BPE pre-tokenizer by hashing the tokenization of a fixed text
  with ``transformers`` (``get_vocab_base_pre``), which qstrat does not depend on.  Here the
  ``pre_tokenizer`` of ``tokenizer.json`` is compared with the ones of the known
  tokenizers (llama-bpe, qwen2, smollm, gpt-2: :data:`KNOWN_PRE_TOKENIZERS`); any other is
  written as ``default`` with a note in the run's output and report (the converter stops
  there instead).
* ``get_vocab_base`` re-encodes added tokens that are not ``normalized`` through the
  tokenizer; that needs ``transformers`` too and is not done (for a byte-level BPE it gives
  the token back unchanged).
* ``LlamaHfVocab`` (a byte-fallback BPE ``tokenizer.json`` without ``tokenizer.model``) takes
  the special tokens from ``transformers``; here they are the added tokens marked special.
* A SentencePiece ``tokenizer.model`` is read directly (its protobuf pieces: text, score,
  type) instead of through the ``sentencepiece`` package.
* A model without any tokenizer file gets the converter's ``_set_vocab_none``
  (``tokenizer.ggml.model = none`` and the vocabulary size): llama.cpp loads it with dummy
  tokens and evaluates token ids, but cannot turn text into tokens.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: config.json model_type of the models written in llama.cpp's layout
LLAMA_FAMILY = ("llama", "mistral", "qwen2")

#: tokenizer.json pre_tokenizer of the tokenizers llama.cpp knows -> tokenizer.ggml.pre.
#: The regexes are those of the models' tokenizer.json files (Llama 3, Qwen2); llama.cpp
#: implements each pre-tokenizer under this name (src/llama-vocab.cpp).
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _split(regex: str) -> tuple:
    return ("Split", regex, "Isolated", False)


def _byte_level(use_regex: bool) -> tuple:
    return ("ByteLevel", False, use_regex)


KNOWN_PRE_TOKENIZERS: dict[tuple, str] = {
    (_split(_LLAMA3_REGEX), _byte_level(False)): "llama-bpe",
    (_split(_QWEN2_REGEX), _byte_level(False)): "qwen2",
    (("Digits", True), _byte_level(True)): "smollm",
    (_byte_level(True),): "gpt-2",
}


def _pre_tokenizer_key(pre: Any) -> tuple | None:
    """A comparable form of a tokenizer.json ``pre_tokenizer`` (None for a part not described)."""
    if not isinstance(pre, dict):
        return None
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    key = []
    for part in parts or ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "ByteLevel":
            key.append(("ByteLevel", bool(part.get("add_prefix_space", True)), bool(part.get("use_regex", True))))
        elif kind == "Split":
            pattern = part.get("pattern") or {}
            key.append(("Split", pattern.get("Regex", pattern.get("String")), part.get("behavior"), bool(part.get("invert"))))
        elif kind == "Digits":
            key.append(("Digits", bool(part.get("individual_digits"))))
        else:
            key.append((kind,))
    return tuple(key)


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """What the converter's set_vocab writes: tokenizer model, pre-tokenizer, tokens, ..."""

    model: str  # tokenizer.ggml.model: "gpt2", "llama" or "none"
    pre: str | None
    tokens: list[str | bytes] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    scores: list[float] | None = None
    special: Any = None  # gguf.SpecialVocab
    add_space_prefix: bool | None = None
    description: str = ""


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special"""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _read_json(path: Path) -> Any:
    from qstrat.errors import FormatError

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FormatError(f"{path}: not readable JSON: {err}") from None


def _gpt2_vocab(directory: Path, tokenizer: dict, vocab_size: int, notes: list[str]) -> Vocabulary:
    """_set_vocab_gpt2: get_vocab_base (tokens padded to vocab_size), the pre-tokenizer, merges."""
    import gguf

    model = tokenizer["model"]
    added = {t["content"]: t for t in tokenizer.get("added_tokens") or []}
    reverse = {int(i): t for t, i in model["vocab"].items()}
    reverse.update({int(t["id"]): t["content"] for t in added.values()})
    if reverse and max(reverse) >= vocab_size:
        raise ValueError(f"tokenizer.json has token id {max(reverse)}, the model only {vocab_size} embeddings")
    tokens: list[str | bytes] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if added[token].get("special") or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    key = _pre_tokenizer_key(tokenizer.get("pre_tokenizer"))
    pre = KNOWN_PRE_TOKENIZERS.get(key) if key is not None else None
    if pre is None:
        pre = "default"
        notes.append(
            "tokenizer.json's pre-tokenizer is not one qstrat maps to llama.cpp's (llama-bpe, qwen2, smollm, gpt-2): "
            "written as 'default', so llama.cpp may split text differently from the model's tokenizer"
        )
    special = gguf.SpecialVocab(directory, load_merges=True)
    return Vocabulary("gpt2", pre, tokens, types, None, special, description=f"BPE (gpt2, pre-tokenizer {pre}), {len(tokens)} tokens")


def _llama_hf_vocab(directory: Path, tokenizer: dict, notes: list[str]) -> Vocabulary:
    """_set_vocab_llama_hf (gguf.LlamaHfVocab without transformers): a byte-fallback BPE."""
    import gguf

    model = tokenizer["model"]
    added = sorted(tokenizer.get("added_tokens") or [], key=lambda t: int(t["id"]))
    special_ids = {int(t["id"]) for t in added if t.get("special")}
    reverse = {int(i): t for t, i in model["vocab"].items()}
    base = len(reverse)
    tokens: list[str | bytes] = []
    types: list[int] = []
    for i in range(base):
        text = reverse[i].encode("utf-8")
        tokens.append(text)
        if re.fullmatch(rb"<0x[0-9A-Fa-f]{2}>", text):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL)
    for t in added:
        if int(t["id"]) >= base:
            tokens.append(t["content"].encode("utf-8"))
            types.append(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    scores = [-1000.0] * len(tokens)
    special = gguf.SpecialVocab(directory, n_vocab=len(tokens))
    return Vocabulary("llama", "default", tokens, types, scores, special, description=f"byte-fallback BPE (llama), {len(tokens)} tokens")


def _protobuf_fields(data: bytes):
    """(field number, wire type, value) of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire == 1:
            yield number, wire, data[pos : pos + 8]
            pos += 8
        elif wire == 2:
            size = varint()
            yield number, wire, data[pos : pos + size]
            pos += size
        elif wire == 5:
            yield number, wire, data[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not supported")


#: SentencePiece piece types (sentencepiece_model.proto): NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4,
#: UNUSED 5, BYTE 6 -- gguf.TokenType has the same numbers
def sentencepiece_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece of a SentencePiece ``tokenizer.model``."""
    pieces = []
    for number, wire, value in _protobuf_fields(path.read_bytes()):
        if number != 1 or wire != 2:
            continue
        piece, score, kind = "", 0.0, 1
        for n, w, v in _protobuf_fields(value):
            if n == 1 and w == 2:
                piece = v.decode("utf-8")
            elif n == 2 and w == 5:
                score = float(np.frombuffer(v, "<f4")[0])
            elif n == 3 and w == 0:
                kind = v
        pieces.append((piece, score, kind))
    return pieces


def _sentencepiece_vocab(directory: Path, vocab_size: int | None, notes: list[str]) -> Vocabulary:
    """_set_vocab_sentencepiece / _create_vocab_sentencepiece"""
    import gguf

    pieces = sentencepiece_pieces(directory / "tokenizer.model")
    n = vocab_size or len(pieces)
    tokens: list[str | bytes] = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [int(gguf.TokenType.UNUSED)] * n
    for i, (piece, score, kind) in enumerate(pieces):
        if i >= n:
            notes.append(f"tokenizer.model: pieces from id {i} ignored, the model has {n} embeddings")
            break
        toktype = gguf.TokenType.NORMAL
        if kind == gguf.TokenType.UNKNOWN:
            toktype = gguf.TokenType.UNKNOWN
        elif kind == gguf.TokenType.CONTROL:
            toktype = gguf.TokenType.CONTROL
        elif kind == gguf.TokenType.UNUSED:
            toktype = gguf.TokenType.UNUSED
        elif kind == gguf.TokenType.BYTE:
            toktype = gguf.TokenType.BYTE
        tokens[i], scores[i], types[i] = piece.encode("utf-8"), score, int(toktype)
    added_file = directory / "added_tokens.json"
    if added_file.is_file():
        for text, token_id in _read_json(added_file).items():
            if int(token_id) < n:
                tokens[token_id], scores[token_id], types[token_id] = text.encode("utf-8"), -1000.0, int(gguf.TokenType.USER_DEFINED)
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        for token_id, data in (_read_json(config_file).get("added_tokens_decoder") or {}).items():
            token_id, text = int(token_id), data["content"]
            if token_id >= n:
                continue
            if data.get("special") or _looks_special(text):
                types[token_id] = int(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types[token_id] = int(gguf.TokenType.USER_DEFINED)
            scores[token_id], tokens[token_id] = -1000.0, text.encode("utf-8")
    special = gguf.SpecialVocab(directory, n_vocab=len(tokens))
    return Vocabulary("llama", "default", tokens, types, scores, special, description=f"SentencePiece (llama), {len(tokens)} tokens")


def read_vocabulary(directory: Path | None, arch: str, vocab_size: int | None, notes: list[str]) -> Vocabulary:
    """The vocabulary the converter writes for ``arch`` (LlamaModel.set_vocab, Qwen2Model.set_vocab)."""
    none = Vocabulary("none", None, description="none")
    if directory is None or not directory.is_dir():
        notes.append("no tokenizer: the source directory is not at hand")
        return none
    add_space_prefix = None
    config_file = directory / "tokenizer_config.json"
    if arch == "llama" and config_file.is_file():
        add_space_prefix = _read_json(config_file).get("add_prefix_space")
    if (directory / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(directory, vocab_size, notes)
    elif (directory / "tokenizer.json").is_file():
        tokenizer = _read_json(directory / "tokenizer.json")
        model = tokenizer.get("model") or {}
        if model.get("type") != "BPE":
            notes.append(f"tokenizer.json holds a {model.get('type')} tokenizer, not BPE: written without a vocabulary")
            return none
        byte_fallback = bool(model.get("byte_fallback", False))
        decoder = (tokenizer.get("decoder") or {}).get("type")
        # gguf.LlamaHfVocab takes a byte-fallback BPE with a Sequence decoder (ignore_merges turns away
        # only a tokenizer without byte fallback: Llama 3's, which goes to the gpt2 path)
        if arch == "llama" and byte_fallback and decoder == "Sequence":
            vocab = _llama_hf_vocab(directory, tokenizer, notes)
        else:
            vocab = _gpt2_vocab(directory, tokenizer, vocab_size or len(model.get("vocab") or {}), notes)
    else:
        notes.append(
            "no tokenizer.json or tokenizer.model: written without a vocabulary (tokenizer.ggml.model 'none'); "
            "llama.cpp evaluates token ids but cannot tokenize text"
        )
        return none
    vocab.add_space_prefix = add_space_prefix
    if arch == "llama" and vocab.special is not None:
        # LlamaModel.set_vocab's rules by vocabulary size: CodeLlama's fill-in-the-middle tokens (of
        # prefix, suffix, middle and eot, gguf-py has a key for eot alone), and no BOS for 49152
        # (small Granite models; SmolLM2's converter-made GGUF has add_bos_token false too)
        if (vocab_size or 32000) == 32016:
            vocab.special.special_token_ids["eot"] = 32010
        if (vocab_size or 32000) == 49152:
            vocab.special.add_special_token["bos"] = False
    return vocab


# ---------------------------------------------------------------------------------------------
# Hyperparameters and tensors
# ---------------------------------------------------------------------------------------------


def _find(hparams: dict, keys: list[str]) -> Any:
    """ModelBase.find_hparam(keys, optional=True)"""
    return next((hparams[k] for k in keys if k in hparams), None)


def rope_parameters(hparams: dict) -> dict:
    """TextModel.__init__'s rope_parameters (rope_theta, rope_type... mirrored in)."""
    rope = dict(hparams.get("rope_parameters", hparams.get("rope_scaling")) or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        theta = _find(hparams, ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"])
        original = _find(hparams, ["original_max_position_embeddings"])
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        if "original_max_position_embeddings" not in rope and original is not None:
            rope["original_max_position_embeddings"] = original
    return rope.get("full_attention", rope)


def rope_row_order(rows: int, n_head: int) -> np.ndarray:
    """The gather map of ``LlamaModel.permute``: stored row i is source row ``order[i]``.

    ``w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)``
    equals ``w[order]``: within each head, the two halves that HF's rotary embedding pairs
    (i, i + head_dim/2) are interleaved, as GGML's rotary embedding pairs (2i, 2i+1)."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of pairs")
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


@dataclass
class LlamaLayout:
    """How one model is written in llama.cpp's layout."""

    arch: str  # general.architecture (gguf.MODEL_ARCH_NAMES)
    hparams: dict
    names: dict[str, str]  # Hugging Face name -> llama.cpp name
    row_heads: dict[str, int]  # tensors whose rows take LlamaModel.permute -> its n_head
    vocabulary: Vocabulary
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # source tensors the converter drops

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        """LlamaModel.generate_extra_tensors: rope_freqs for llama3 rope scaling."""
        import gguf

        rope = rope_parameters(self.hparams)
        if self.arch != "llama" or str(rope.get("rope_type", "")).lower() != "llama3":
            return []
        base = rope.get("rope_theta", 10000.0)
        dim = self.hparams.get("head_dim") or self.hparams["hidden_size"] // self.hparams["num_attention_heads"]
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = rope.get("factor", 8.0)
        low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old = rope.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old / low, old / high
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_wavelen:
                factors.append(1)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return [(name, np.asarray(factors, dtype=np.float32))]

    def write_parameters(self, writer, file_type: int | None) -> None:
        """TextModel.set_gguf_parameters, then LlamaModel's / Qwen2Model's."""
        import gguf

        h = self.hparams
        writer.add_block_count(int(h["num_hidden_layers"]))
        if (n_ctx := _find(h, ["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"])) is not None:
            writer.add_context_length(int(n_ctx))
        if (n_embd := _find(h, ["hidden_size", "n_embd", "dim"])) is not None:
            writer.add_embedding_length(int(n_embd))
        if (n_ff := _find(h, ["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim"])) is not None:
            writer.add_feed_forward_length(int(n_ff))
        if (n_head := _find(h, ["num_attention_heads", "n_head", "n_heads"])) is not None:
            writer.add_head_count(int(n_head))
        if (n_head_kv := _find(h, ["num_key_value_heads", "n_kv_heads"])) is not None:
            writer.add_head_count_kv(int(n_head_kv))
        if h.get("is_causal") is False:
            writer.add_causal_attention(False)
        rope = rope_parameters(h)
        if (rope_type := rope.get("rope_type")) is not None:
            factor = rope.get("factor")
            if rope_type == "linear" and factor is not None:
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(factor)
            elif rope_type == "yarn" and factor is not None:
                writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
                writer.add_rope_scaling_factor(factor)
                writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
                if (v := rope.get("extrapolation_factor")) is not None:
                    writer.add_rope_scaling_yarn_ext_factor(v)
                if (v := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                    writer.add_rope_scaling_yarn_attn_factor(v)
                if (v := rope.get("beta_fast")) is not None:
                    writer.add_rope_scaling_yarn_beta_fast(v)
                if (v := rope.get("beta_slow")) is not None:
                    writer.add_rope_scaling_yarn_beta_slow(v)
            elif rope_type in ("su", "longrope"):
                writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            elif rope_type in ("dynamic", "default") or str(rope_type).lower() == "llama3":
                pass  # llama3: the rope_freqs tensor (extra_tensors)
            else:
                self.notes.append(f"config.json's rope type {rope_type!r} is unknown to llama.cpp's converter: not written")
        if (theta := rope.get("rope_theta")) is not None:
            writer.add_rope_freq_base(theta)
        if (eps := _find(h, ["rms_norm_eps", "norm_eps"])) is not None:
            writer.add_layer_norm_rms_eps(eps)
        if (head_dim := h.get("head_dim")) is not None:
            writer.add_key_length(int(head_dim))
            writer.add_value_length(int(head_dim))
        if file_type is not None:
            writer.add_file_type(int(file_type))
        if self.arch == "llama":
            writer.add_vocab_size(int(h["vocab_size"]))
            writer.add_rope_dimension_count(int(h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]))
        elif self.vocabulary.model == "none" and h.get("vocab_size") is not None:
            writer.add_vocab_size(int(h["vocab_size"]))  # llama.cpp's dummy tokens need it

    def write_vocabulary(self, writer) -> None:
        v = self.vocabulary
        if v.add_space_prefix is not None:
            writer.add_add_space_prefix(v.add_space_prefix)
        writer.add_tokenizer_model(v.model)
        if v.model == "none":
            return
        writer.add_tokenizer_pre(v.pre)
        writer.add_token_list(v.tokens)
        if v.scores is not None:
            writer.add_token_scores(v.scores)
        writer.add_token_types(v.types)
        if v.special is not None:
            v.special.add_to_gguf(writer, quiet=True)


#: the tensors every layer of a Llama-family model has, by llama.cpp's name
_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def _shape_disagreement(tensors: dict[str, tuple[int, ...]], names: dict[str, str], hparams: dict,
                        n_layer: int, n_head: int, n_head_kv: int) -> str | None:
    """Where config.json and the tensors disagree on what llama.cpp checks when it loads the file
    (every layer's tensors, each of the shape the hyperparameters give), or None."""
    by_name = {gguf_name: hf for hf, gguf_name in names.items()}
    for layer in range(n_layer):
        missing = [t for t in _LAYER_TENSORS if f"blk.{layer}.{t}.weight" not in by_name]
        if missing:
            return f"config.json gives {n_layer} layers (num_hidden_layers), and layer {layer} has no {missing[0]} tensor"
    n_embd = int(hparams["hidden_size"])
    head_dim = int(hparams.get("head_dim") or n_embd // n_head)
    n_ff, n_vocab = hparams.get("intermediate_size"), hparams.get("vocab_size")
    q, kv = n_head * head_dim, n_head_kv * head_dim
    expected = {
        "token_embd.weight": (n_vocab, n_embd), "output.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,),
        "attn_norm.weight": (n_embd,), "ffn_norm.weight": (n_embd,), "attn_q.weight": (q, n_embd),
        "attn_k.weight": (kv, n_embd), "attn_v.weight": (kv, n_embd), "attn_output.weight": (n_embd, q),
        "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
        "ffn_gate.weight": (n_ff, n_embd), "ffn_up.weight": (n_ff, n_embd), "ffn_down.weight": (n_embd, n_ff),
    }
    for gguf_name, hf in sorted(by_name.items()):
        role = gguf_name.split(".", 2)[2] if gguf_name.startswith("blk.") else gguf_name
        want = expected.get(role)
        if want is None or any(d is None for d in want):
            continue
        want = tuple(int(d) for d in want)
        if tuple(tensors[hf]) != want:
            return (f"tensor {hf} has shape {list(tensors[hf])}, and config.json's hyperparameters (hidden_size {n_embd}, "
                    f"{n_head} heads of {head_dim}, {n_head_kv} key/value heads, intermediate_size {n_ff}, vocab_size {n_vocab}) "
                    f"give {list(want)}: llama.cpp refuses a file where they differ")
    return None


def plan_layout(
    tensors: dict[str, tuple[int, ...]], hparams: dict, source: Path | None
) -> tuple[LlamaLayout | None, str]:
    """llama.cpp's layout of a model with these tensors (HF name -> shape), or None and why not."""
    from qstrat.presets import PresetError, gguf_arch, gguf_tensor_names

    if hparams.get("model_type") is None:
        return None, "its architecture is unknown: no config.json (with model_type) beside its weights"
    model_type = str(hparams.get("model_type"))
    if model_type not in LLAMA_FAMILY:
        return None, f"model_type {model_type!r} is not one qstrat writes for llama.cpp ({', '.join(LLAMA_FAMILY)})"
    try:
        arch = gguf_arch(model_type)
        n_layer, n_head = int(hparams["num_hidden_layers"]), int(hparams["num_attention_heads"])
        n_head_kv = int(hparams.get("num_key_value_heads") or n_head)
        int(hparams["hidden_size"])
    except KeyError as err:
        return None, f"config.json has no {err.args[0]}"
    except (PresetError, TypeError, ValueError) as err:
        return None, f"config.json: {err}"
    if hparams.get("num_local_experts"):
        return None, "mixture-of-experts models are not written in llama.cpp's layout"
    mapped = gguf_tensor_names(list(tensors), model_type, n_layer)
    names, dropped = {}, []
    for hf, name in mapped.items():
        if name is not None:
            names[hf] = name
        elif hf.endswith(".rotary_emb.inv_freq"):
            dropped.append(hf)  # the converter drops them: llama.cpp computes the rotary frequencies
        else:
            return None, f"tensor {hf} has no llama.cpp name"
    if len(set(names.values())) != len(names):
        return None, "two tensors map to one llama.cpp name"
    disagreement = _shape_disagreement(tensors, names, hparams, n_layer, n_head, n_head_kv)
    if disagreement is not None:
        return None, disagreement
    row_heads = {}
    if arch == "llama":  # LlamaModel.undo_permute; Qwen2Model does not permute (NEOX rotary embedding)
        for hf in names:
            if hf.endswith(("q_proj.weight", "q_proj.bias")):
                row_heads[hf] = n_head
            elif hf.endswith(("k_proj.weight", "k_proj.bias")):
                row_heads[hf] = n_head_kv
        for hf, heads in row_heads.items():
            if tensors[hf][0] % (2 * heads):
                return None, f"{hf}: {tensors[hf][0]} rows do not split into {heads} heads"
    notes: list[str] = []
    if _find(hparams, ["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"]) is None:
        notes.append("config.json gives no context length (max_position_embeddings): llama.cpp refuses a file without one")
    vocab_size = hparams.get("vocab_size")
    try:
        vocabulary = read_vocabulary(source, arch, int(vocab_size) if vocab_size is not None else None, notes)
    except (KeyError, TypeError, ValueError) as err:
        notes.append(f"tokenizer not usable ({type(err).__name__}: {err}): written without a vocabulary")
        vocabulary = Vocabulary("none", None, description="none")
    embeddings = next((shape[0] for hf, shape in tensors.items() if names.get(hf) == "token_embd.weight"), None)
    if vocabulary.model != "none" and embeddings is not None and len(vocabulary.tokens) != embeddings:
        notes.append(
            f"the vocabulary has {len(vocabulary.tokens)} tokens and the model {embeddings} embeddings: "
            "llama.cpp refuses to load a file where they differ"
        )
    if dropped:
        notes.append(f"dropped as llama.cpp's converter does: {', '.join(dropped)}")
    return LlamaLayout(arch, dict(hparams), names, row_heads, vocabulary, notes, dropped), ""


__all__ = ["KNOWN_PRE_TOKENIZERS", "LLAMA_FAMILY", "LlamaLayout", "Vocabulary", "plan_layout", "read_vocabulary", "rope_row_order", "sentencepiece_pieces"]
