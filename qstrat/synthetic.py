"""Deterministic synthetic Llama-shaped models, for the example, the tests and benchmarks.

Weights are heavy-tailed (a symmetric Lomax/Pareto law, finite variance) with a per-column
log-normal spread and a few outlier input columns shared across layers, as seen in real
LLM checkpoints; that is what makes column permutation matter.  Only ``Generator.random``
(a stable bit stream) is used, so the same seed gives the same model on any numpy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qstrat.io.safetensors import write_safetensors


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int = 256
    hidden_size: int = 512
    intermediate_size: int = 768
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048  # the context length llama.cpp needs (config.json's)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (to nearest, ties to even) and return the raw bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def _heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...], alpha: float = 4.0) -> np.ndarray:
    u = rng.random(shape)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return sign * ((1.0 - u) ** (-1.0 / alpha) - 1.0)


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal by Box-Muller from ``Generator.random`` (whose stream numpy keeps stable;
    ``standard_normal``'s may change between versions)."""
    radius = np.sqrt(-2.0 * np.log(1.0 - rng.random(shape)))
    return radius * np.cos(2.0 * np.pi * rng.random(shape))


def _linear(rng, rows: int, cols: int, column_scale: np.ndarray, gaussian: bool = False) -> np.ndarray:
    w = (_normal(rng, (rows, cols)) if gaussian else _heavy_tailed(rng, (rows, cols))) * column_scale[None, :] / np.sqrt(cols)
    return w.astype(np.float32)


def llama_tensors(shape: LlamaShape = LlamaShape(), seed: int = 0, gaussian: bool = False) -> dict[str, np.ndarray]:
    """float32 weights of a Llama-shaped model (HF names), deterministic in ``seed``.

    ``gaussian``: normal weights and log-normal column scales instead of heavy tails (the same
    outlier channels).  What a permutation can do differs a lot between the two: a sort by column
    energy gains at Q4_K on the normal weights and loses on the heavy-tailed ones (docs/permutations.md)."""
    rng = np.random.default_rng(seed)
    h, inter, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim

    def linear(rows: int, cols: int, column_scale: np.ndarray) -> np.ndarray:
        return _linear(rng, rows, cols, column_scale, gaussian)

    def column_scales(n: int, outliers: int) -> np.ndarray:
        spread = _normal(rng, (n,)) if gaussian else _heavy_tailed(rng, (n,), alpha=6.0)
        scale = np.exp(0.5 * spread)
        picked = np.argsort(rng.random(n))[:outliers]
        scale[picked] *= 12.0
        return scale

    hidden_scale = column_scales(h, max(2, h // 128))  # outlier features of the residual stream
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": linear(shape.vocab_size, h, np.ones(h)),
    }
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = (1.0 + 0.1 * _heavy_tailed(rng, (h,))).astype(np.float32)
        tensors[f"{p}.self_attn.q_proj.weight"] = linear(shape.num_attention_heads * hd, h, hidden_scale)
        tensors[f"{p}.self_attn.k_proj.weight"] = linear(shape.num_key_value_heads * hd, h, hidden_scale)
        tensors[f"{p}.self_attn.v_proj.weight"] = linear(shape.num_key_value_heads * hd, h, hidden_scale)
        tensors[f"{p}.self_attn.o_proj.weight"] = linear(
            h, shape.num_attention_heads * hd, column_scales(shape.num_attention_heads * hd, 2)
        )
        tensors[f"{p}.post_attention_layernorm.weight"] = (1.0 + 0.1 * _heavy_tailed(rng, (h,))).astype(np.float32)
        tensors[f"{p}.mlp.gate_proj.weight"] = linear(inter, h, hidden_scale)
        tensors[f"{p}.mlp.up_proj.weight"] = linear(inter, h, hidden_scale)
        tensors[f"{p}.mlp.down_proj.weight"] = linear(h, inter, column_scales(inter, max(2, inter // 128)))
    tensors["model.norm.weight"] = (1.0 + 0.1 * _heavy_tailed(rng, (h,))).astype(np.float32)
    tensors["lm_head.weight"] = linear(shape.vocab_size, h, np.ones(h))
    return tensors


def hf_config(shape: LlamaShape) -> dict[str, object]:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}
    config.update(asdict(shape))
    config["head_dim"] = shape.head_dim
    config["tie_word_embeddings"] = False
    return config


def write_model(
    directory: str | Path,
    tensors: dict[str, np.ndarray],
    dtype: str = "BF16",
    shards: int = 1,
    config: dict[str, object] | None = None,
) -> Path:
    """Write ``tensors`` as a model directory (bf16/f16/f32), sharded with an index if shards > 1."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    convert = {
        "BF16": float32_to_bf16_bits,
        "F16": lambda a: a.astype(np.float16),
        "F32": lambda a: a.astype(np.float32),
    }[dtype]
    names = sorted(tensors)
    parts = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for index, part in enumerate(parts):
        file_name = "model.safetensors" if shards == 1 else f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        items = [(n, dtype, tensors[n].shape, convert(tensors[n])) for n in part]
        write_safetensors(directory / file_name, items, {"format": "pt"})
        weight_map.update({n: file_name for n in part})
    if shards > 1:
        index_doc = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def write_tiny_llama(directory: str | Path, seed: int = 0, shards: int = 1, dtype: str = "BF16") -> Path:
    """The example model shipped in ``examples/tiny-llama``."""
    shape = LlamaShape()
    return write_model(directory, llama_tensors(shape, seed), dtype=dtype, shards=shards, config=hf_config(shape))
