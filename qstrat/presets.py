"""llama.cpp's per-tensor type rules for its named file types (``q4_k_m``, ``q8_0``, ...).

``format: q4_k_m`` in a config must give every tensor exactly the type that
``llama-quantize model.gguf out.gguf Q4_K_M`` (no other option) would give it.  This module
writes those rules in Python; it does no I/O and needs no numba.

Source followed
---------------
ggml-org/llama.cpp at commit **0c1e57098** (the llama.cpp that llama-cpp-python 0.3.36
vendors; its changelog reads "update llama.cpp to ggml-org/llama.cpp@0c1e57098"), read in

* ``src/llama-quant.cpp``: ``tensor_get_category``, ``tensor_allows_quantization``,
  ``llama_tensor_get_type`` and ``llama_tensor_get_type_impl``, ``tensor_type_fallback``,
  ``tensor_requires_imatrix``, ``llama_ftype_get_default_type``,
  ``init_quantize_state_counters``, ``llama_model_quantize_impl`` (the tensor loop);
* ``src/llama-model-loader.h``: ``weight_name_comparer`` (the order tensors are visited in);
* ``src/llama-hparams.cpp``: ``n_gqa``; ``src/llama-model.cpp``: ``n_layer_all`` is
  ``{arch}.block_count``;
* ``src/models/llama.cpp`` and ``src/models/qwen2.cpp``: when the model type is 70B;
* ``src/llama-arch.cpp``: the position / token-type embedding names.

Older llama.cpp differs in places that change results: before the Feb 2026 rework of
llama-quant.cpp (PR #19770) the row-length fallback lived inside ``llama_tensor_get_type``
(``convert_incompatible_tensor``) and sent Q2_K/Q3_K to IQ4_NL; at 0c1e57098 it sends them
to Q4_0, and a 32-block type whose row length is not a multiple of 32 becomes F16 (older
code threw).

Visiting order and the counters
-------------------------------
``llama_model_quantize_impl`` does not visit tensors in file order: it walks
``ml.weights_map``, a ``std::map`` ordered by ``weight_name_comparer`` -- the layer number
parsed with ``sscanf(name, "blk.%d.")`` (-1 for names without it), then the name.  The
running counters (``i_attention_wv``, ``i_ffn_down``...) count in that order, so
:func:`choose_types` sorts the list the same way first, and its result never depends on the
order of the list it is given (``--keep-split``, which re-sorts by file offset, is not
mirrored).  Which rule uses what:

* attn_v (and attn_qkv, attn_kv_b): the counter ``i_attention_wv`` against
  ``n_attention_wv`` (the number of such tensors in the list), never the layer in the name;
* ffn_down / ffn_gate / ffn_up: with ``n_expert <= 1`` the counter ``i_ffn_down`` (etc.)
  against ``n_layer`` (``block_count``); with ``n_expert > 1`` the layer parsed from the
  name (llama.cpp raises if it has none or it is out of range).

So for a dense model whose list holds one ffn_down per layer, the counter equals the
layer; if a layer's ffn_down is missing, the later ones shift, as in llama.cpp.

What is mirrored and what is not
--------------------------------
Only llama-quantize's defaults: no ``--pure``, ``--leave-output-tensor``,
``--output-tensor-type``, ``--token-embedding-type``, ``--tensor-type``, ``--prune-layers``,
``--keep-split``.  Only the llama family of architectures (``llama``, ``mistral`` -> GGUF
``llama``; ``qwen2``): other architectures have rules of their own (Falcon, GLM5-next,
BailingMoE3 branches; other 70B conditions) that are not written here, and are refused.
Branches for IQ / TQ / MXFP4 / Q1_0 / Q2_0 file types are not written either: no preset
here reaches them.  At 0c1e57098 no rule gives a preset of this module an IQ type (every
branch that yields IQ2_S, IQ3_S, IQ3_XXS... is guarded by an IQ file type, and the fallback
no longer yields IQ4_NL for K-quants); should a result ever fall outside the types qstrat
writes, :func:`choose_types` raises :class:`PresetError` rather than substitute.

An unusual finding: in ``llama_tensor_get_type_impl`` the attn_v branch
(``category_is_attn_v``: attn_v, attn_qkv, attn_kv_b) comes before the branch for
``ATTENTION_QKV``, so that later branch (Q4_K_M -> Q5_K, Q5_K_M -> Q6_K, Q3_K_M/L -> Q4_K)
is never taken; a fused attn_qkv follows the attn_v rules.  Mirrored as is.

>>> choose_types("q4_k_m", [("output.weight", (32000, 4096))], n_head=32, n_head_kv=8, n_layer=32)
{'output.weight': TensorChoice(type_name='q6_k', fallback_from=None, requires_imatrix=False)}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import gguf

from qstrat.errors import ConfigError

__all__ = [
    "PresetError",
    "TensorChoice",
    "choose_types",
    "default_type",
    "file_type",
    "gguf_arch",
    "gguf_tensor_names",
    "is_preset",
    "preset_names",
    "tensor_allows_quantization",
    "tensor_category",
    "use_more_bits",
]

_T = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType


class PresetError(ConfigError):
    """A preset, architecture or tensor list the rules cannot serve (one-line message)."""


@dataclass(frozen=True)
class TensorChoice:
    """The type llama-quantize gives one tensor."""

    type_name: str  # lower-case GGUF type name: "q4_k", "q6_k", "q5_0", "f16", ...
    fallback_from: str | None  # the type the rules chose before the row-length fallback, or None
    requires_imatrix: bool = False  # llama.cpp refuses this tensor without importance data


# ---------------------------------------------------------------------------------------------
# The file types: llama_ftype_get_default_type (a switch in C, a table here)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Preset:
    ftype: gguf.LlamaFileType  # written as general.file_type
    default: gguf.GGMLQuantizationType  # llama_ftype_get_default_type(ftype)


_PRESETS: dict[str, _Preset] = {
    "q4_0": _Preset(_F.MOSTLY_Q4_0, _T.Q4_0),
    "q4_1": _Preset(_F.MOSTLY_Q4_1, _T.Q4_1),
    "q5_0": _Preset(_F.MOSTLY_Q5_0, _T.Q5_0),
    "q5_1": _Preset(_F.MOSTLY_Q5_1, _T.Q5_1),
    "q8_0": _Preset(_F.MOSTLY_Q8_0, _T.Q8_0),
    "q2_k": _Preset(_F.MOSTLY_Q2_K, _T.Q2_K),
    "q2_k_s": _Preset(_F.MOSTLY_Q2_K_S, _T.Q2_K),
    "q3_k_s": _Preset(_F.MOSTLY_Q3_K_S, _T.Q3_K),
    "q3_k_m": _Preset(_F.MOSTLY_Q3_K_M, _T.Q3_K),
    "q3_k_l": _Preset(_F.MOSTLY_Q3_K_L, _T.Q3_K),
    "q4_k_s": _Preset(_F.MOSTLY_Q4_K_S, _T.Q4_K),
    "q4_k_m": _Preset(_F.MOSTLY_Q4_K_M, _T.Q4_K),
    "q5_k_s": _Preset(_F.MOSTLY_Q5_K_S, _T.Q5_K),
    "q5_k_m": _Preset(_F.MOSTLY_Q5_K_M, _T.Q5_K),
    "q6_k": _Preset(_F.MOSTLY_Q6_K, _T.Q6_K),
    "f16": _Preset(_F.MOSTLY_F16, _T.F16),
    "bf16": _Preset(_F.MOSTLY_BF16, _T.BF16),
    "f32": _Preset(_F.ALL_F32, _T.F32),
}

#: the tensor types qstrat writes (IQ4_NL is being added); anything else is refused
_WRITABLE = frozenset(
    {_T.F32, _T.F16, _T.BF16, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0}
    | {_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K, _T.IQ4_NL}
)

#: ggml_is_quantized: false for the float types, whose presets skip the rules and the fallback
_NOT_QUANTIZED = frozenset({_T.F32, _T.F16, _T.BF16})


def _type_name(t: gguf.GGMLQuantizationType) -> str:
    return t.name.lower()


def _block_size(t: gguf.GGMLQuantizationType) -> int:
    """ggml_blck_size"""
    return gguf.GGML_QUANT_SIZES[t][0]


def _preset(name: str) -> tuple[str, _Preset]:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _PRESETS:
        raise PresetError(f"unknown llama.cpp file type {name!r}; known: {', '.join(_PRESETS)}")
    return key, _PRESETS[key]


def preset_names() -> tuple[str, ...]:
    """The file types this module knows, lower-case LLAMA_FTYPE names without ``MOSTLY_``
    (``ALL_F32`` is ``f32``).  llama-quantize's aliases (``Q4_K`` for ``Q4_K_M``...) are not
    accepted: they read as tensor types."""
    return tuple(_PRESETS)


def is_preset(name: str) -> bool:
    """Whether ``name`` (any case) is one of :func:`preset_names`."""
    return isinstance(name, str) and name.strip().lower() in _PRESETS


def file_type(preset: str) -> int:
    """``general.file_type`` for the preset: its ``gguf.LlamaFileType`` value, which
    llama-quantize writes as given (``gguf_set_val_u32(..., LLM_KV_GENERAL_FILE_TYPE, ftype)``)."""
    return int(_preset(preset)[1].ftype)


def default_type(preset: str) -> str:
    """The tensor type the preset starts every quantized tensor from
    (``llama_ftype_get_default_type``)."""
    return _type_name(_preset(preset)[1].default)


# ---------------------------------------------------------------------------------------------
# Architectures: which GGUF arch, and when llama.cpp calls the model "70B"
# ---------------------------------------------------------------------------------------------

#: config.json model_type (or GGUF arch name) -> gguf MODEL_ARCH; convert_hf_to_gguf writes
#: MistralForCausalLM with the llama arch
_ARCHS: dict[str, gguf.MODEL_ARCH] = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
}


def _arch(arch: str | None) -> gguf.MODEL_ARCH:
    key = arch.strip().lower() if isinstance(arch, str) else arch
    if key is None:
        raise PresetError("llama.cpp's type rules need the model's architecture: no config.json (with model_type) beside its weights")
    if key not in _ARCHS:
        raise PresetError(
            f"llama.cpp's type rules are mirrored for the llama family only ({', '.join(_ARCHS)}); got {arch!r}"
        )
    return _ARCHS[key]


def gguf_arch(model_type: str | None) -> str:
    """The GGUF architecture name (``general.architecture``) for a config.json ``model_type``
    of the llama family: ``llama`` and ``mistral`` -> ``llama``, ``qwen2`` -> ``qwen2``."""
    return gguf.MODEL_ARCH_NAMES[_arch(model_type)]


def _is_llm_type_70b(arch: gguf.MODEL_ARCH, n_layer: int, n_head: int, n_head_kv: int, n_expert: int) -> bool:
    """``model.type == LLM_TYPE_70B`` as the loaders set it (n_layer() is block_count: these
    archs have no nextn layers)."""
    if arch == gguf.MODEL_ARCH.LLAMA:
        # src/models/llama.cpp: n_expert == 8 -> 8x7B / 8x22B; else 80 layers -> 65B if
        # n_head == n_head_kv, else 70B
        return n_expert != 8 and n_layer == 80 and n_head != n_head_kv
    # src/models/qwen2.cpp: 80 layers -> 70B
    return n_layer == 80


# ---------------------------------------------------------------------------------------------
# Which tensors are quantized: tensor_allows_quantization
# ---------------------------------------------------------------------------------------------

GGML_MAX_DIMS = 4

#: substrings that keep a tensor out of quantization, in the C function's order
_NOT_QUANTIZED_SUBSTRINGS = (
    "_norm.weight",  # norm tensors
    "ffn_gate_inp.weight",  # expert gating
    "ffn_gate_tid2eid.weight",  # DeepSeek-V4 token-id -> expert-id table
    "altup",  # very small (e.g. 4x4)
    "laurel",
    "per_layer_model_proj",  # not too big, kept as is
    "ssm_conv1d",  # Mamba/Kimi's small conv1d weights
    "shortconv.conv.weight",
    "indexer.k_proj.weight",  # MiniMax's tiny indexer projections
    "indexer.q_proj.weight",
    # (the GLM5-next block of the C function applies to that arch only, refused here)
    "time_mix_first.weight",  # RWKV's small 2-D weights
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",  # T5 relative position bias
    ".position_embd",  # multimodal tensors
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",  # audio codebook
    "mm.a.code_embd",
)

#: exact names kept out: LLM_TN(arch)(LLM_TENSOR_POS_EMBD / LLM_TENSOR_TOKEN_TYPES, "weight")
#: (the same for every arch in llama-arch.cpp)
_NOT_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})


def _ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: 1 + the highest ggml dimension (numpy's leftmost) larger than 1, at least
    1, so a (1, 4096) tensor counts as 1-D."""
    ne = tuple(reversed(shape))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def tensor_allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """Whether llama-quantize quantizes this tensor at all (``tensor_allows_quantization``
    with its default parameters).  ``shape`` is in numpy order.  A tensor it does not quantize
    keeps the type it has in the input file (in a convert_hf_to_gguf file: F32 for 1-D
    tensors and norms)."""
    # quantize only 2D and 3D tensors (experts)
    if _ggml_n_dims(shape) < 2:
        return False
    # `name.rfind("weight") == name.size() - 6`: "ends with weight" -- and, since the size_t
    # subtraction wraps to npos, also true for any 5-character name; mirrored
    quantize = name.endswith("weight") or len(name) == 5
    # (params->quantize_output_tensor is true by default, so output.weight stays eligible)
    quantize = quantize and not any(s in name for s in _NOT_QUANTIZED_SUBSTRINGS)
    return quantize and name not in _NOT_QUANTIZED_NAMES


# ---------------------------------------------------------------------------------------------
# Categories: tensor_get_category (first match wins, as in C)
# ---------------------------------------------------------------------------------------------

TOKEN_EMBD = "token_embd"
ATTENTION_Q = "attn_q"
ATTENTION_V = "attn_v"
ATTENTION_K = "attn_k"
ATTENTION_QKV = "attn_qkv"
ATTENTION_KV_B = "attn_kv_b"
ATTENTION_OUTPUT = "attn_output"
FFN_UP = "ffn_up"
FFN_GATE = "ffn_gate"
FFN_DOWN = "ffn_down"
OUTPUT = "output"
OTHER = "other"

#: (substring, category) after the two exact-name checks, in the C order
_CATEGORY_SUBSTRINGS = (
    ("attn_qkv.weight", ATTENTION_QKV),
    ("attn_kv_b.weight", ATTENTION_KV_B),
    ("attn_v.weight", ATTENTION_V),
    ("attn_k.weight", ATTENTION_K),
    ("attn_q.weight", ATTENTION_Q),
    ("attn_output.weight", ATTENTION_OUTPUT),
    ("ffn_up", FFN_UP),  # substrings: ffn_up_exps, ffn_up_shexp... too
    ("ffn_gate", FFN_GATE),
    ("ffn_down", FFN_DOWN),
)


def tensor_category(name: str) -> str:
    """The broad category llama.cpp's rules switch on (``tensor_get_category``)."""
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for substring, category in _CATEGORY_SUBSTRINGS:
        if substring in name:
            return category
    return OTHER


def _category_is_attn_v(category: str) -> bool:
    """category_is_attn_v: the tensors most sensitive to quantization"""
    return category in (ATTENTION_V, ATTENTION_QKV, ATTENTION_KV_B)


# ---------------------------------------------------------------------------------------------
# Helpers of llama_tensor_get_type_impl
# ---------------------------------------------------------------------------------------------


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The C lambda: the first and last eighth of the layers, and every third one between."""
    # C's int division and %; the last clause is only reached with i_layer >= n_layers/8, so
    # its left operand is never negative and Python's // and % agree with C's
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


_BLK = re.compile(r"blk\.\s*([+-]?\d+)")


def _layer_from_name(name: str) -> int | None:
    """``sscanf(name, "blk.%d.", &i)``: the layer number, or None when it does not match."""
    match = _BLK.match(name)
    return int(match.group(1)) if match else None


def _visit_key(name: str) -> tuple[int, bytes]:
    """weight_name_comparer: layer (-1 without ``blk.N.``), then the name (std::string <)."""
    layer = _layer_from_name(name)
    return (-1 if layer is None else layer, name.encode("utf-8"))


class _State:
    """quantize_state_impl's counters."""

    def __init__(self, names: Iterable[str], n_layer: int, has_imatrix: bool) -> None:
        # init_quantize_state_counters: over every tensor of the list, quantized or not
        categories = [tensor_category(n) for n in names]
        self.n_attention_wv = sum(_category_is_attn_v(c) for c in categories)
        self.has_tied_embeddings = OUTPUT not in categories  # tied until output.weight is seen
        self.n_ffn_down = self.n_ffn_gate = self.n_ffn_up = n_layer  # hparams.n_layer_all
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.has_imatrix = has_imatrix


@dataclass(frozen=True)
class _Model:
    arch: gguf.MODEL_ARCH
    n_gqa: int  # hparams.n_gqa(): n_head / n_head_kv of layer 0, 0 if n_head_kv == 0
    n_expert: int  # hparams.n_expert
    is_70b: bool  # model.type == LLM_TYPE_70B


def _layer_info(i_layer: int, n_layer: int, name: str, n_expert: int) -> tuple[int, int]:
    """The C lambda layer_info: the counter, or with experts the layer parsed from the name."""
    if max(1, n_expert) > 1:
        parsed = _layer_from_name(name)
        if parsed is None:
            raise PresetError(f"Failed to determine layer for tensor {name}")
        if parsed < 0 or parsed >= n_layer:
            raise PresetError(f"Bad layer {parsed} for tensor {name}. Must be in [0, {n_layer})")
        i_layer = parsed
    return i_layer, n_layer


# ---------------------------------------------------------------------------------------------
# llama_tensor_get_type_impl, for the presets of this module
# ---------------------------------------------------------------------------------------------


def _impl_type(
    qs: _State, model: _Model, new_type: _T, name: str, ncols: int, ftype: str, category: str
) -> _T:
    """The standard rules.  ``ftype`` is the preset name; branches guarded only by IQ / TQ /
    MXFP4 / Q1_0 / Q2_0 file types are left out (never taken for these presets)."""
    T = _T

    # C: if (category == OUTPUT || (qs.has_tied_embeddings && category == TOKEN_EMBD))
    if category == OUTPUT or (qs.has_tied_embeddings and category == TOKEN_EMBD):
        qk_k = _block_size(new_type)
        if ncols % qk_k != 0:  # (arch == LLM_ARCH_FALCON || nx % qk_k != 0)
            new_type = T.Q8_0
        elif new_type != T.Q8_0:
            new_type = T.Q6_K
        return new_type

    # C: else if (category == TOKEN_EMBD): only IQ/TQ/Q2_0 file types change it
    if category == TOKEN_EMBD:
        return new_type

    # C: else if (category_is_attn_v(category))
    if _category_is_attn_v(category):
        if ftype == "q2_k":
            new_type = T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        elif ftype == "q2_k_s" and model.n_gqa >= 4:
            new_type = T.Q4_K
        elif ftype == "q3_k_m":
            new_type = T.Q5_K if qs.i_attention_wv < 2 else T.Q4_K
        elif ftype == "q3_k_l":
            new_type = T.Q5_K
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = T.Q6_K
        elif ftype == "q4_k_s" and qs.i_attention_wv < 4:
            new_type = T.Q5_K
        if model.is_70b and new_type in (T.Q3_K, T.Q4_K):
            # 8 heads share attn_v in the 70B model: more bits for a tensor 8x smaller than attn_q
            new_type = T.Q5_K
        if model.n_expert == 8:
            new_type = T.Q8_0
        qs.i_attention_wv += 1
        return new_type

    # C: else if (category == ATTENTION_K): n_expert == 8 -> Q8_0 (the rest: IQ3 file types)
    if category == ATTENTION_K:
        return T.Q8_0 if model.n_expert == 8 else new_type

    # C: else if (category == ATTENTION_Q): IQ3 file types only
    if category == ATTENTION_Q:
        return new_type

    # C: else if (category == FFN_DOWN)
    if category == FFN_DOWN:
        i_layer, n_layer = _layer_info(qs.i_ffn_down, qs.n_ffn_down, name, model.n_expert)
        if ftype == "q2_k":
            new_type = T.Q3_K
        elif ftype == "q2_k_s":
            if i_layer < n_layer // 8:
                new_type = T.Q4_K
        elif ftype == "q3_k_m":
            # i < n/16 -> Q5_K; else (arch != FALCON || use_more_bits) -> Q4_K: always, here
            new_type = T.Q5_K if i_layer < n_layer // 16 else T.Q4_K
        elif ftype == "q3_k_l":
            new_type = T.Q5_K  # (Q4_K on Falcon)
        elif ftype == "q4_k_m":
            if use_more_bits(i_layer, n_layer):  # (the non-Falcon sub-branch)
                new_type = T.Q6_K
        elif ftype == "q5_k_m" and use_more_bits(i_layer, n_layer):
            new_type = T.Q6_K
        elif ftype == "q4_k_s" and i_layer < n_layer // 8:  # (arch != FALCON)
            new_type = T.Q5_K
        elif ftype in ("q4_0", "q5_0") and qs.has_imatrix and i_layer < n_layer // 8:
            # guard for the first ffn_down layers, with an imatrix only
            new_type = T.Q4_1 if ftype == "q4_0" else T.Q5_1
        qs.i_ffn_down += 1
        return new_type

    # C: else if (category == ATTENTION_OUTPUT)   (the arch != FALCON side)
    if category == ATTENTION_OUTPUT:
        if model.n_expert == 8:
            if ftype in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"):
                new_type = T.Q5_K
        elif ftype == "q2_k":
            new_type = T.Q3_K
        elif ftype == "q3_k_m":
            new_type = T.Q4_K
        elif ftype == "q3_k_l":
            new_type = T.Q5_K
        return new_type

    # C: else if (category == ATTENTION_QKV): never reached, category_is_attn_v took it above

    # C: else if (category == FFN_GATE) / (category == FFN_UP): IQ3_XS only, but layer_info
    # still runs (and raises for an expert tensor without a valid layer) and the counter moves
    if category == FFN_GATE:
        _layer_info(qs.i_ffn_gate, qs.n_ffn_gate, name, model.n_expert)
        qs.i_ffn_gate += 1
        return new_type
    if category == FFN_UP:
        _layer_info(qs.i_ffn_up, qs.n_ffn_up, name, model.n_expert)
        qs.i_ffn_up += 1
        return new_type

    return new_type


# tensor_type_fallback's switch: the K-quants (block 256) -> a 32-block type
_FALLBACK = {
    _T.Q2_K: _T.Q4_0,
    _T.Q3_K: _T.Q4_0,
    _T.Q4_K: _T.Q5_0,
    _T.Q5_K: _T.Q5_1,
    _T.Q6_K: _T.Q8_0,
    # the IQ / TQ / Q2_0 cases of the switch are not reachable from these presets
}


def _fallback(target: _T, ncols: int) -> _T:
    """tensor_type_fallback: a type whose block divides the row length."""
    qk_k = _block_size(target)
    if ncols % qk_k == 0:
        return target
    if target in _FALLBACK:
        result = _FALLBACK[target]
    elif qk_k <= 32:
        result = target  # default case: already a 32-block type; the check below makes it F16
    else:  # pragma: no cover - no preset here reaches another 256-block type
        raise PresetError(f"no tensor type fallback is defined for type {_type_name(target)}")
    if ncols % _block_size(result) != 0:
        result = _T.F16  # "must use F16 due to unusual shape"
    return result


def fallback_type(type_name: str, ncols: int) -> str:
    """The type a tensor with rows of ``ncols`` values gets when ``type_name`` is asked for:
    itself if its blocks divide the rows, else llama.cpp's fallback (``tensor_type_fallback``)."""
    return _type_name(_fallback(_T[type_name.upper()], ncols))


def _requires_imatrix(name: str, t: _T, ftype: str) -> bool:
    """tensor_requires_imatrix"""
    if tensor_category(name) in (TOKEN_EMBD, OUTPUT):  # token_embd, per_layer_token_embd, output
        return False
    if t in (_T.IQ3_XXS, _T.IQ2_XXS, _T.IQ2_XS, _T.IQ2_S, _T.IQ1_M, _T.IQ1_S):
        return True
    # the K-quants need no imatrix, except Q2_K tensors of a Q2_K_S file
    return t == _T.Q2_K and ftype == "q2_k_s"


def _check_shape(name: str, shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or not 1 <= len(shape) <= GGML_MAX_DIMS:
        raise PresetError(f"tensor {name}: shape must be 1 to {GGML_MAX_DIMS} dimensions, got {shape!r}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 or d != s for d, s in zip(dims, shape)):
        raise PresetError(f"tensor {name}: shape must be non-negative integers, got {shape!r}")
    return dims


def choose_types(
    preset: str,
    tensors: Sequence[tuple[str, Sequence[int]]],
    *,
    n_head: int,
    n_head_kv: int,
    n_layer: int,
    n_expert: int = 0,
    arch: str = "llama",
    has_imatrix: bool = False,
) -> dict[str, TensorChoice]:
    """The type llama-quantize gives each tensor of a model under ``preset``.

    ``tensors``: every tensor of the GGUF file, 1-D ones included (they count for
    ``n_attention_wv`` and ``output.weight`` tells whether embeddings are tied), as
    (llama.cpp name, shape in numpy order); the row length is the last dimension (ggml's
    ne[0]).  ``n_head`` / ``n_head_kv`` / ``n_layer`` / ``n_expert`` are the GGUF
    ``{arch}.attention.head_count`` / ``.head_count_kv`` / ``.block_count`` /
    ``.expert_count`` (0 without experts).  ``arch``: ``llama``, ``mistral`` or ``qwen2``.
    ``has_imatrix``: whether importance data will be used (it changes Q4_0/Q5_0's first
    ffn_down layers, and Q2_K_S is refused without it, as llama-quantize refuses it).

    Returns {name: TensorChoice} in the order given, for the tensors llama-quantize
    quantizes (:func:`tensor_allows_quantization`); the others are absent and keep their
    input type.  The result does not depend on the order of ``tensors``.  Raises
    :class:`PresetError` for an unknown preset or arch, duplicate names, a bad shape, an
    expert tensor without a valid ``blk.N.`` (as llama.cpp does), Q2_K_S without
    ``has_imatrix``, or a type qstrat cannot write.
    """
    ftype, spec = _preset(preset)
    model_arch = _arch(arch)
    limits = (("n_head", n_head, 1), ("n_head_kv", n_head_kv, 0), ("n_layer", n_layer, 1), ("n_expert", n_expert, 0))
    for label, value, low in limits:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise PresetError(f"{label} must be an integer >= {low}, got {value!r}")

    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in tensors:
        if name in shapes:
            raise PresetError(f"tensor {name} is listed twice")
        shapes[name] = _check_shape(name, shape)

    model = _Model(
        arch=model_arch,
        n_gqa=0 if n_head_kv == 0 else n_head // n_head_kv,
        n_expert=n_expert,
        is_70b=_is_llm_type_70b(model_arch, n_layer, n_head, n_head_kv, n_expert),
    )
    qs = _State(shapes, n_layer, has_imatrix)

    chosen: dict[str, TensorChoice] = {}
    for name in sorted(shapes, key=_visit_key):  # the order of ml.weights_map
        shape = shapes[name]
        if not tensor_allows_quantization(name, shape):
            continue
        ncols = shape[-1]
        new_type = spec.default
        fallback_from = None
        # llama_tensor_get_type: the rules and the fallback only when ggml_is_quantized(default)
        if new_type not in _NOT_QUANTIZED:
            new_type = _impl_type(qs, model, new_type, name, ncols, ftype, tensor_category(name))
            fallen = _fallback(new_type, ncols)
            if fallen != new_type:
                fallback_from = _type_name(new_type)
            new_type = fallen
        if new_type not in _WRITABLE:
            raise PresetError(
                f"llama.cpp's {ftype} rules give {name} the type {_type_name(new_type)}, which qstrat does not write"
            )
        needs_imatrix = _requires_imatrix(name, new_type, ftype)
        if needs_imatrix and not has_imatrix:
            # llama_model_quantize_impl throws "this quantization requires an imatrix!"
            raise PresetError(
                f"{ftype} requires importance data (imatrix): {name} is {_type_name(new_type)}, which llama.cpp "
                "refuses to make without it; give one with imatrix: (qstrat imatrix MODEL --text FILE makes it)"
            )
        chosen[name] = TensorChoice(_type_name(new_type), fallback_from, needs_imatrix)

    return {name: chosen[name] for name in shapes if name in chosen}


# ---------------------------------------------------------------------------------------------
# Hugging Face names -> llama.cpp names
# ---------------------------------------------------------------------------------------------

#: names convert_hf_to_gguf drops before mapping ("we don't need these")
_CONVERTER_SKIPS = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


def gguf_tensor_names(hf_names: Iterable[str], arch: str, n_layer: int) -> dict[str, str | None]:
    """{Hugging Face name: llama.cpp name} through gguf-py's ``TensorNameMap`` for the
    architecture (config.json ``model_type``: llama, mistral, qwen2) and ``n_layer`` blocks.

    A name that cannot be mapped -- unknown to the map, a block index >= ``n_layer``, or one
    that convert_hf_to_gguf drops (rotary ``inv_freq``...) -- maps to None; the caller
    decides (convert_hf_to_gguf would stop with "Can not map tensor").  Tensors that the
    converter reshapes or merges (Mixtral's per-expert weights into ``ffn_*_exps``) are not
    handled: their names map to None."""
    if not isinstance(n_layer, int) or n_layer < 1:
        raise PresetError(f"n_layer must be an integer >= 1, got {n_layer!r}")
    tensor_map = gguf.get_tensor_name_map(_arch(arch), n_layer)
    names: dict[str, str | None] = {}
    for hf_name in hf_names:
        if hf_name.endswith(_CONVERTER_SKIPS):
            names[hf_name] = None
        else:
            names[hf_name] = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    return names
