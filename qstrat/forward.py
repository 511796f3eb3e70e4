"""A numpy forward pass of Llama-family models, as llama.cpp's graph computes it (src/models/llama.cpp,
qwen2.cpp): the engine of ``qstrat imatrix``, and of ``qstrat eval`` for models llama.cpp cannot
run (Q8_K weights, Hugging Face directories).

It works on llama.cpp's tensor names and row layout, whatever the source:

- a GGUF file as it is (tensors of any type qstrat reads, decoded to float32);
- a Hugging Face directory through the same planning as its GGUF conversion
  (:func:`qstrat.llama_gguf.plan_layout`: llama.cpp names, q/k rows in llama.cpp's rotary layout)
  and a metadata-and-vocabulary-only GGUF file written beside it in a temporary directory, which
  llama.cpp loads to tokenize (so both kinds of source are tokenized by the same code).

The arithmetic is float32 with BLAS matrix products, as llama.cpp's CPU backend; K and V are kept
in float32 (llama.cpp keeps them in f16 by default: logits differ by about 1e-4 of their range).
Each matrix product's input can be handed to a ``collect(name, inputs)`` callback: the
activations an importance matrix sums.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qstrat.errors import InputError
from qstrat.io.gguf_read import is_gguf_name

#: llama.cpp architectures this forward computes, and whether their rotary embedding is NEOX's
#: (pairs i and i + n_rot/2) rather than the normal one (pairs 2i and 2i+1): llama_model_rope_type
ROPE_NEOX = {"llama": False, "qwen2": True}

Collector = Callable[[str, np.ndarray], None]


@dataclass(frozen=True)
class LlamaParams:
    """The hyperparameters the graph needs, from a GGUF's keys."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    eps: float
    rope_base: float
    freq_scale: float  # 1 / linear rope scaling factor
    n_ctx_train: int | None = None  # {arch}.context_length: the context it was trained on

    @classmethod
    def from_fields(cls, fields: dict, source: str) -> LlamaParams:
        arch = str(fields.get("general.architecture", ""))
        if arch not in ROPE_NEOX:
            raise InputError(f"{source}: architecture {arch!r}; the numpy forward computes {', '.join(ROPE_NEOX)}")
        if fields.get(f"{arch}.expert_count"):
            raise InputError(f"{source}: a mixture-of-experts model ({arch}.expert_count {fields[f'{arch}.expert_count']}): the numpy "
                             "forward computes dense models only; llama.cpp's llama-imatrix and llama-perplexity run this one")

        def key(name: str, default=None, kind: type = int, least: float | None = 1):
            value = fields.get(f"{arch}.{name}", default)
            if value is None:
                raise InputError(f"{source}: no {arch}.{name} in the model's metadata")
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise InputError(f"{source}: {arch}.{name} is {value!r}, not a number")
            if least is not None and not value >= least:
                raise InputError(f"{source}: {arch}.{name} is {value!r}; at least {least}")
            return kind(value)

        n_head = key("attention.head_count")
        n_embd = key("embedding_length")
        head_dim = key("attention.key_length", n_embd // n_head)
        n_head_kv = key("attention.head_count_kv", n_head)
        if n_head % n_head_kv:
            raise InputError(f"{source}: {n_head} attention heads do not share {n_head_kv} key/value heads")
        scaling = str(fields.get(f"{arch}.rope.scaling.type", "none"))
        if scaling not in ("none", "linear"):
            raise InputError(f"{source}: rope scaling {scaling!r}; the numpy forward computes none or linear")
        factor = key("rope.scaling.factor", 0.0, kind=float, least=0)
        return cls(
            arch=arch,
            n_layer=key("block_count"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_rot=key("rope.dimension_count", head_dim, least=0),
            eps=key("attention.layer_norm_rms_epsilon", kind=float, least=0),
            rope_base=key("rope.freq_base", 10000.0, kind=float, least=0),
            freq_scale=1.0 / factor if scaling == "linear" and factor > 0 else 1.0,
            n_ctx_train=key("context_length", 0, least=0) or None,
        )


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """ggml_rms_norm then the norm's weight."""
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32) + np.float32(eps))
    return (x * scale) * weight


def rope(x: np.ndarray, positions: np.ndarray, params: LlamaParams, freq_factors: np.ndarray | None) -> np.ndarray:
    """ggml_rope_ext on (tokens, heads, head_dim): the first n_rot dimensions rotated in pairs,
    by ``position * freq_scale * base^(-2i/n_rot) / freq_factors[i]``."""
    n_rot = params.n_rot
    theta = params.freq_scale * params.rope_base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if freq_factors is not None:
        theta = theta / freq_factors.astype(np.float64)
    angles = positions[:, None].astype(np.float64) * theta[None, :]
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    out = x.copy()
    if ROPE_NEOX[params.arch]:
        a, b = x[..., : n_rot // 2], x[..., n_rot // 2 : n_rot]
        out[..., : n_rot // 2] = a * cos - b * sin
        out[..., n_rot // 2 : n_rot] = a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        out[..., 0:n_rot:2] = a * cos - b * sin
        out[..., 1:n_rot:2] = a * sin + b * cos
    return out


class LlamaForward:
    """A Llama-family model's weights (llama.cpp names and layout, float32) and its graph."""

    def __init__(self, params: LlamaParams, tensors: dict[str, np.ndarray], source: str) -> None:
        self.params = params
        self.t = tensors
        missing = [n for n in self._required() if n not in tensors]
        if missing:
            raise InputError(f"{source}: no tensor {missing[0]} (the numpy forward needs {len(missing)} more)")
        self.n_vocab = int(tensors["token_embd.weight"].shape[0])
        self.output = tensors.get("output.weight", tensors["token_embd.weight"])  # tied embeddings

    def _required(self) -> Iterator[str]:
        yield from ("token_embd.weight", "output_norm.weight")
        for i in range(self.params.n_layer):
            for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
                yield f"blk.{i}.{part}.weight"

    def _linear(self, name: str, x: np.ndarray, collect: Collector | None) -> np.ndarray:
        if collect is not None:
            collect(f"{name}.weight", x)
        y = x @ self.t[f"{name}.weight"].T
        bias = self.t.get(f"{name}.bias")
        return y + bias if bias is not None else y

    def logits(self, tokens: list[int] | np.ndarray, collect: Collector | None = None) -> np.ndarray:
        """The logits of every position (tokens x vocabulary, float32) of ``tokens`` evaluated from an
        empty context; ``collect(weight name, inputs)`` sees the input of each ``blk.*`` matrix
        product, as llama-imatrix's callback (the output head is not collected: its default)."""
        p = self.params
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.n_vocab):
            raise ValueError(f"token ids must be below {self.n_vocab}")
        n = len(tokens)
        positions = np.arange(n)
        freq_factors = self.t.get("rope_freqs.weight")
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        group = p.n_head // p.n_head_kv
        scale = np.float32(1.0 / math.sqrt(p.head_dim))
        x = self.t["token_embd.weight"][tokens].astype(np.float32)
        for i in range(p.n_layer):
            b = f"blk.{i}"
            h = rms_norm(x, self.t[f"{b}.attn_norm.weight"], p.eps)
            q = self._linear(f"{b}.attn_q", h, collect).reshape(n, p.n_head, p.head_dim)
            k = self._linear(f"{b}.attn_k", h, collect).reshape(n, p.n_head_kv, p.head_dim)
            v = self._linear(f"{b}.attn_v", h, collect).reshape(n, p.n_head_kv, p.head_dim)
            q, k = rope(q, positions, p, freq_factors), rope(k, positions, p, freq_factors)
            # grouped-query attention: query head j reads key/value head j // group
            q = q.reshape(n, p.n_head_kv, group, p.head_dim).transpose(1, 2, 0, 3)  # (kv, group, n, d)
            kt = k.transpose(1, 2, 0)[:, None]  # (kv, 1, d, n)
            scores = (q @ kt) * scale + mask
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = scores @ v.transpose(1, 0, 2)[:, None]  # (kv, group, n, d)
            context = context.transpose(2, 0, 1, 3).reshape(n, p.n_head * p.head_dim)
            x = x + self._linear(f"{b}.attn_output", context, collect)
            h = rms_norm(x, self.t[f"{b}.ffn_norm.weight"], p.eps)
            gate = self._linear(f"{b}.ffn_gate", h, collect)
            up = self._linear(f"{b}.ffn_up", h, collect)
            x = x + self._linear(f"{b}.ffn_down", gate / (1 + np.exp(-gate)) * up, collect)
        x = rms_norm(x, self.t["output_norm.weight"], p.eps)
        return np.ascontiguousarray(x @ self.output.T, dtype=np.float32)


def _float32(info) -> np.ndarray:
    from qstrat.io.safetensors import map_tensor, to_float32

    return np.ascontiguousarray(to_float32(info.dtype, np.asarray(map_tensor(info))), dtype=np.float32)


def _from_gguf(path: Path, tensors: dict[str, np.ndarray] | None = None) -> LlamaForward:
    """A GGUF model's forward (``tensors``, by llama.cpp name, replace the file's)."""
    from qstrat.io.gguf_input import GGUFInput

    model = GGUFInput(path)  # refuses qstrat's container with run-time permutations (a gather the forward does not apply)
    fields = model.fields()
    params = LlamaParams.from_fields(fields, str(path))
    if tensors is None:
        model.check_intact()  # a qstrat GGUF changed since it was written is not the model
        tensors = {info.name: _float32(info) for info in model}
    return LlamaForward(params, tensors, str(path))


def _write_vocabulary_gguf(layout, target: Path) -> None:
    """A GGUF of a model's metadata and vocabulary only: what llama.cpp needs to tokenize."""
    import gguf

    writer = gguf.GGUFWriter(target, layout.arch)
    writer.add_name(target.stem)
    layout.write_parameters(writer, None)
    layout.write_vocabulary(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _from_hf(source: Path, scratch: Path, tensors: dict[str, np.ndarray] | None = None) -> tuple[LlamaForward, Path]:
    """A Hugging Face model's forward in llama.cpp's layout (``source``: its directory or a
    .safetensors file beside its config.json), and its vocabulary GGUF (written in ``scratch``);
    ``tensors``, by Hugging Face name, replace the model's own."""
    from qstrat.io.gguf_input import GGUFInput
    from qstrat.io.safetensors import SafetensorsModel, read_model_config
    from qstrat.llama_gguf import plan_layout, rope_row_order

    model = SafetensorsModel(source)
    directory = source if source.is_dir() else source.parent
    hparams = read_model_config(model)
    if tensors is None:
        tensors = {info.name: _float32(info) for info in model}
    layout, why_not = plan_layout({name: values.shape for name, values in tensors.items()}, hparams, directory)
    if layout is None:
        raise InputError(f"{source}: the numpy forward computes Llama-family models; {why_not}")
    if layout.vocabulary.model == "none":
        raise InputError(f"{source}: no tokenizer (tokenizer.json or tokenizer.model in {directory}) to read a text with")
    vocabulary = scratch / f"{model.name}.vocab.gguf"
    _write_vocabulary_gguf(layout, vocabulary)
    named = {}
    for hf, name in layout.names.items():
        values = tensors[hf]
        if hf in layout.row_heads:  # llama.cpp's rotary layout, as the GGUF conversion writes it
            values = np.ascontiguousarray(values[rope_row_order(values.shape[0], layout.row_heads[hf])])
        named[name] = values
    named.update(layout.extra_tensors())
    params = LlamaParams.from_fields(GGUFInput(vocabulary).fields(), str(source))
    return LlamaForward(params, named, str(source)), vocabulary


def _from_output(directory: Path, scratch: Path) -> tuple[LlamaForward, Path]:
    """A qstrat output's forward: its tensors dequantized in the source's layout (every
    permutation undone), the source's hyperparameters and vocabulary."""
    from qstrat.io.manifest import read_manifest
    from qstrat.model import load_model

    manifest = read_manifest(directory)
    source = Path(manifest.source.path)
    if not source.exists():
        raise InputError(f"{directory}: its source model {source} is not at hand (the forward needs its configuration and tokenizer)")
    tensors = {name: np.ascontiguousarray(values, dtype=np.float32) for name, values in load_model(directory, original=True).items()}
    if source.is_file() and is_gguf_name(source):
        return _from_gguf(source, _stored_as_in(source, tensors)), source
    return _from_hf(source, scratch, tensors)


def _stored_as_in(source: Path, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``tensors`` (a directory converted from GGUF ``source``, as reading gives them) under the names and in
    the row order ``source`` stores them: a qstrat GGUF, or one llama.cpp's quantizer rewrote from it, reads
    back under the Hugging Face names with q/k rows in their order, while the forward takes llama.cpp's."""
    from qstrat.io.gguf import GGUFModel
    from qstrat.llama_gguf import rope_row_order

    model = GGUFModel(source)
    stored = {}
    for name, values in tensors.items():
        heads = model.row_heads.get(name)
        if heads is not None:
            values = np.ascontiguousarray(values[rope_row_order(values.shape[0], heads)])
        stored[model.tensors[name].name if name in model.tensors else name] = values
    return stored


@contextlib.contextmanager
def open_forward(path: str | os.PathLike) -> Iterator[tuple[LlamaForward, Path]]:
    """The numpy forward of a GGUF file, a Hugging Face model (a directory, or a .safetensors file
    beside its config.json) or a qstrat output directory,
    and a GGUF file llama.cpp can tokenize the model's texts with (for a directory, one written
    in a temporary directory that lives as long as the context)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file() and path.suffix != ".safetensors":
        yield _from_gguf(path), path
        return
    from qstrat.io.names import MANIFEST_NAME

    with tempfile.TemporaryDirectory(prefix="qstrat-forward-") as scratch:
        if (path / MANIFEST_NAME).is_file():
            yield _from_output(path, Path(scratch))
        else:
            yield _from_hf(path, Path(scratch))


__all__ = ["LlamaForward", "LlamaParams", "open_forward", "rms_norm", "rope"]
