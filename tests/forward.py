"""Reference forward passes in numpy, to check that joint permutations preserve the function."""

from __future__ import annotations

import math

import numpy as np

from qstrat.bert import encoder_layers
from qstrat.synthetic import LlamaShape


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):
    # HF Llama convention: dimension i pairs with i + head_dim/2 inside each head
    seq, _, hd = x.shape
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    angles = np.arange(seq)[:, None] * inv[None, :]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[:, None, :]
    half = hd // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def llama_forward(t: dict[str, np.ndarray], shape: LlamaShape, tokens: np.ndarray) -> np.ndarray:
    """Logits of a Llama model (RMSNorm, RoPE, grouped-query causal attention, SwiGLU); q/k/v
    biases where ``t`` has them (Qwen2), the embeddings as output head without ``lm_head``."""
    heads, kv, hd = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    x = t["model.embed_tokens.weight"][tokens].astype(np.float64)
    seq = len(tokens)
    mask = np.triu(np.full((seq, seq), -np.inf), 1)
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        h = _rms_norm(x, t[f"{p}.input_layernorm.weight"], shape.rms_norm_eps)
        q = (h @ t[f"{p}.self_attn.q_proj.weight"].T + t.get(f"{p}.self_attn.q_proj.bias", 0)).reshape(seq, heads, hd)
        k = (h @ t[f"{p}.self_attn.k_proj.weight"].T + t.get(f"{p}.self_attn.k_proj.bias", 0)).reshape(seq, kv, hd)
        v = (h @ t[f"{p}.self_attn.v_proj.weight"].T + t.get(f"{p}.self_attn.v_proj.bias", 0)).reshape(seq, kv, hd)
        q, k = _rope(q, shape.rope_theta), _rope(k, shape.rope_theta)
        k = np.repeat(k, heads // kv, axis=1)
        v = np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        context = np.einsum("hqk,khd->qhd", _softmax(scores), v).reshape(seq, heads * hd)
        x = x + context @ t[f"{p}.self_attn.o_proj.weight"].T
        h = _rms_norm(x, t[f"{p}.post_attention_layernorm.weight"], shape.rms_norm_eps)
        gate = h @ t[f"{p}.mlp.gate_proj.weight"].T
        up = h @ t[f"{p}.mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ t[f"{p}.mlp.down_proj.weight"].T
    x = _rms_norm(x, t["model.norm.weight"], shape.rms_norm_eps)
    return x @ t.get("lm_head.weight", t["model.embed_tokens.weight"]).T  # tied embeddings without lm_head


def bert_encoder(t: dict[str, np.ndarray], x: np.ndarray, layers: int, heads: int) -> np.ndarray:
    """BERT encoder layers (post-LN, GELU) applied to hidden states ``x`` (seq, hidden)."""
    return encoder_layers(t, x.astype(np.float64)[None], layers, heads)[0]


def bert_tensors(hidden: int = 512, intermediate: int = 1024, layers: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(rows, cols):
        scale = np.exp(rng.standard_normal(cols) * 0.5)
        return (rng.standard_t(4, (rows, cols)) * scale / math.sqrt(cols)).astype(np.float32)

    def b(n):
        return (rng.standard_normal(n) * 0.02).astype(np.float32)

    t = {}
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for name in ("query", "key", "value"):
            t[f"{p}.attention.self.{name}.weight"] = w(hidden, hidden)
            t[f"{p}.attention.self.{name}.bias"] = b(hidden)
        t[f"{p}.attention.output.dense.weight"] = w(hidden, hidden)
        t[f"{p}.attention.output.dense.bias"] = b(hidden)
        t[f"{p}.intermediate.dense.weight"] = w(intermediate, hidden)
        t[f"{p}.intermediate.dense.bias"] = b(intermediate)
        t[f"{p}.output.dense.weight"] = w(hidden, intermediate)
        t[f"{p}.output.dense.bias"] = b(hidden)
        for ln in (f"{p}.attention.output.LayerNorm", f"{p}.output.LayerNorm"):
            t[f"{ln}.weight"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
            t[f"{ln}.bias"] = b(hidden)
    return t
