"""qstrat.presets against llama.cpp's llama-quant.cpp (commit 0c1e57098).

Every expected type below is written out by hand from the C source (each comment names the
branch that gives it); none is computed by qstrat.presets.  Layer sets are literal:

    use_more_bits(i, n) = i < n/8 || i >= 7*n/8 || (i - n/8) % 3 == 2     (C int arithmetic)

    n = 32: n/8 = 4, 7n/8 = 28  ->  {0,1,2,3} + {6,9,12,15,18,21,24,27} + {28,29,30,31}
    n = 2:  n/8 = 0, 7n/8 = 1   ->  {1}   (i = 0: (0 - 0) % 3 == 0)
    n = 80: n/8 = 10, 7n/8 = 70 ->  10 is not in it ((10 - 10) % 3 == 0), 0 is
"""

from __future__ import annotations

import random

import pytest

from qstrat.presets import (
    PresetError,
    TensorChoice,
    choose_types,
    default_type,
    file_type,
    gguf_arch,
    gguf_tensor_names,
    is_preset,
    preset_names,
    tensor_allows_quantization,
    tensor_category,
    use_more_bits,
)

MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
MORE_BITS_2 = {1}
N_HEAD = 32


def llama_tensors(n_layer, *, gqa, d=512, ff=1024, vocab=1000, tied=False):
    """A Llama-shaped GGUF tensor list (numpy shapes: rows, row length) in converter order."""
    kv = d // 4 if gqa else d  # n_head_kv = 8 of 32 heads, or 32 of 32
    out = [("token_embd.weight", (vocab, d))]
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (d,)),
            (b + "attn_q.weight", (d, d)),
            (b + "attn_k.weight", (kv, d)),
            (b + "attn_v.weight", (kv, d)),
            (b + "attn_output.weight", (d, d)),
            (b + "ffn_norm.weight", (d,)),
            (b + "ffn_gate.weight", (ff, d)),
            (b + "ffn_up.weight", (ff, d)),
            (b + "ffn_down.weight", (d, ff)),
        ]
    out.append(("output_norm.weight", (d,)))
    if not tied:
        out.append(("output.weight", (vocab, d)))
    return out


def run(preset, tensors, *, gqa=True, n_layer=None, **kw):
    n_layer = n_layer if n_layer is not None else sum(1 for n, _ in tensors if n.endswith("attn_norm.weight"))
    return choose_types(preset, tensors, n_head=N_HEAD, n_head_kv=8 if gqa else N_HEAD, n_layer=n_layer, **kw)


def types(result):
    return {name: choice.type_name for name, choice in result.items()}


# -- the expectations, per preset and tensor kind ------------------------------------------------
# A kind maps to a type, or to (type if layer in set, set name, type otherwise).  Set names:
#   "mb"      use_more_bits(layer, n_layer)           (MORE_BITS_32 / MORE_BITS_2)
#   "lt2"     layer < 2      "lt4"  layer < 4
#   "lt_n16"  layer < n_layer/16   (32 -> 2, 2 -> 0)
#   "lt_n8"   layer < n_layer/8    (32 -> 4, 2 -> 0)
# attn_v counts i_attention_wv over attn_v tensors; with one per layer it equals the layer.

EXPECT = {
    "q4_k_m": {
        # attn_v: "(Q4_K_M || Q5_K_M) && use_more_bits(i_attention_wv, n_attention_wv) -> Q6_K"
        "attn_v": ("q6_k", "mb", "q4_k"),
        # ffn_down: "Q4_K_M, not Falcon: use_more_bits(i_layer, n_layer) -> Q6_K"
        "ffn_down": ("q6_k", "mb", "q4_k"),
        # output: "new_type != Q8_0 -> Q6_K" (row length 512 divides 256)
        "output": "q6_k",
        # token_embd, untied: TOKEN_EMBD branch changes only IQ/TQ/Q2_0 file types -> default Q4_K
        "token_embd": "q4_k",
        # attn_k: only n_expert == 8 or IQ3 types change it; attn_output: no Q4_K_M case
        # without 8 experts; ffn_gate: IQ3_XS only; attn_q: IQ3 only
        "attn_k": "q4_k", "attn_output": "q4_k", "ffn_gate": "q4_k", "attn_q": "q4_k", "ffn_up": "q4_k",
    },
    "q4_k_s": {
        "attn_v": ("q5_k", "lt4", "q4_k"),  # "Q4_K_S && i_attention_wv < 4 -> Q5_K"
        "ffn_down": ("q5_k", "lt_n8", "q4_k"),  # "Q4_K_S && arch != FALCON && i_layer < n_layer/8 -> Q5_K"
        "output": "q6_k",
        "token_embd": "q4_k",
        "attn_k": "q4_k", "attn_output": "q4_k", "ffn_gate": "q4_k", "attn_q": "q4_k", "ffn_up": "q4_k",
    },
    "q5_k_m": {
        "attn_v": ("q6_k", "mb", "q5_k"),  # same attn_v branch as Q4_K_M
        "ffn_down": ("q6_k", "mb", "q5_k"),  # "Q5_K_M && use_more_bits(i_layer, n_layer) -> Q6_K"
        "output": "q6_k",
        "token_embd": "q5_k",
        "attn_k": "q5_k", "attn_output": "q5_k", "ffn_gate": "q5_k", "attn_q": "q5_k", "ffn_up": "q5_k",
    },
    "q3_k_m": {
        "attn_v": ("q5_k", "lt2", "q4_k"),  # "Q3_K_M: i_attention_wv < 2 ? Q5_K : Q4_K"
        # "Q3_K_M: i_layer < n_layer/16 ? Q5_K : arch != FALCON || use_more_bits ? Q4_K : Q3_K"
        "ffn_down": ("q5_k", "lt_n16", "q4_k"),
        "output": "q6_k",
        "token_embd": "q3_k",
        "attn_output": "q4_k",  # "not Falcon, n_expert != 8: Q3_K_M -> Q4_K"
        "attn_k": "q3_k", "ffn_gate": "q3_k", "attn_q": "q3_k", "ffn_up": "q3_k",
    },
    "q3_k_s": {
        # no attn_v / ffn_down / attn_output case for Q3_K_S without 8 experts: all default Q3_K
        "attn_v": "q3_k", "ffn_down": "q3_k", "output": "q6_k", "token_embd": "q3_k",
        "attn_k": "q3_k", "attn_output": "q3_k", "ffn_gate": "q3_k", "attn_q": "q3_k", "ffn_up": "q3_k",
    },
    "q2_k": {
        "attn_v": "GQA",  # "Q2_K: n_gqa() >= 4 ? Q4_K : Q3_K" -- filled in per test
        "ffn_down": "q3_k",  # "Q2_K -> Q3_K"
        "output": "q6_k",
        "token_embd": "q2_k",
        "attn_output": "q3_k",  # "not Falcon, n_expert != 8: Q2_K -> Q3_K"
        "attn_k": "q2_k", "ffn_gate": "q2_k", "attn_q": "q2_k", "ffn_up": "q2_k",
    },
    "q6_k": {
        # no Q6_K case anywhere; output: "new_type != Q8_0 -> Q6_K" is Q6_K already
        "attn_v": "q6_k", "ffn_down": "q6_k", "output": "q6_k", "token_embd": "q6_k",
        "attn_k": "q6_k", "attn_output": "q6_k", "ffn_gate": "q6_k", "attn_q": "q6_k", "ffn_up": "q6_k",
    },
    "q8_0": {
        # output: "else if (new_type != Q8_0) -> Q6_K" does not fire: Q8_0 stays
        "attn_v": "q8_0", "ffn_down": "q8_0", "output": "q8_0", "token_embd": "q8_0",
        "attn_k": "q8_0", "attn_output": "q8_0", "ffn_gate": "q8_0", "attn_q": "q8_0", "ffn_up": "q8_0",
    },
}

LAYER_SETS = {
    32: {"mb": MORE_BITS_32, "lt2": {0, 1}, "lt4": {0, 1, 2, 3}, "lt_n16": {0, 1}, "lt_n8": {0, 1, 2, 3}},
    2: {"mb": MORE_BITS_2, "lt2": {0, 1}, "lt4": {0, 1}, "lt_n16": set(), "lt_n8": set()},
}


def expected_type(preset, kind, layer, n_layer, gqa):
    spec = EXPECT[preset][kind]
    if spec == "GQA":
        return "q4_k" if gqa else "q3_k"
    if isinstance(spec, str):
        return spec
    inside, set_name, outside = spec
    return inside if layer in LAYER_SETS[n_layer][set_name] else outside


@pytest.mark.parametrize("preset", sorted(EXPECT))
@pytest.mark.parametrize("n_layer", [2, 32])
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
def test_llama_shaped_models(preset, n_layer, gqa):
    got = types(run(preset, llama_tensors(n_layer, gqa=gqa), gqa=gqa))
    for kind in ("output", "token_embd"):
        assert got[f"{kind}.weight"] == expected_type(preset, kind, None, n_layer, gqa), kind
    for i in range(n_layer):
        for kind in ("attn_v", "ffn_down", "attn_k", "attn_output", "ffn_gate", "attn_q", "ffn_up"):
            want = expected_type(preset, kind, i, n_layer, gqa)
            assert got[f"blk.{i}.{kind}.weight"] == want, (kind, i)
    # 1-D norms are not quantized: absent
    assert "output_norm.weight" not in got and "blk.0.attn_norm.weight" not in got
    assert len(got) == 2 + 7 * n_layer


def test_spot_values_written_out():
    """A few of the same results spelled out, so a wrong EXPECT table cannot hide them."""
    got = types(run("q4_k_m", llama_tensors(32, gqa=True)))
    assert [got[f"blk.{i}.attn_v.weight"] for i in (0, 3, 4, 5, 6, 7, 27, 28)] == [
        "q6_k", "q6_k", "q4_k", "q4_k", "q6_k", "q4_k", "q6_k", "q6_k"]
    assert [got[f"blk.{i}.ffn_down.weight"] for i in (4, 6, 10, 12)] == ["q4_k", "q6_k", "q4_k", "q6_k"]
    assert sum(got[f"blk.{i}.attn_v.weight"] == "q6_k" for i in range(32)) == 16
    got2 = types(run("q4_k_m", llama_tensors(2, gqa=False), gqa=False))
    assert (got2["blk.0.attn_v.weight"], got2["blk.1.attn_v.weight"]) == ("q4_k", "q6_k")
    assert (got2["blk.0.ffn_down.weight"], got2["blk.1.ffn_down.weight"]) == ("q4_k", "q6_k")


@pytest.mark.parametrize("preset, want", [
    ("q4_k_m", "q6_k"), ("q3_k_s", "q6_k"), ("q2_k", "q6_k"), ("q6_k", "q6_k"), ("q8_0", "q8_0"),
])
def test_tied_embeddings_take_the_output_rule(preset, want):
    # no output.weight: has_tied_embeddings stays true and token_embd goes through the OUTPUT
    # branch ("new_type != Q8_0 -> Q6_K")
    got = types(run(preset, llama_tensors(2, gqa=True, tied=True)))
    assert got["token_embd.weight"] == want
    assert "output.weight" not in got


@pytest.mark.parametrize("preset, want", [("f16", "f16"), ("bf16", "bf16"), ("f32", "f32")])
def test_float_presets_skip_the_rules(preset, want):
    # ggml_is_quantized(default_type) is false: every quantizable tensor gets the default type
    got = types(run(preset, llama_tensors(2, gqa=True)))
    assert set(got.values()) == {want} and len(got) == 2 + 7 * 2
    assert types(run(preset, [("blk.0.attn_q.weight", (100, 100))], n_layer=1)) == {"blk.0.attn_q.weight": want}


# -- row-length fallback (tensor_type_fallback) ----------------------------------------------------


def test_row_length_384_falls_back():
    tensors = llama_tensors(2, gqa=False, d=384)
    q4km = run("q4_k_m", tensors, gqa=False)
    # Q4_K (256) -> Q5_0 (32 divides 384)
    assert q4km["blk.0.attn_q.weight"] == TensorChoice("q5_0", "q4_k")
    assert q4km["blk.0.ffn_gate.weight"] == TensorChoice("q5_0", "q4_k")
    assert q4km["token_embd.weight"] == TensorChoice("q5_0", "q4_k")
    # attn_v of layer 1 is Q6_K (use_more_bits(1, 2)): Q6_K -> Q8_0
    assert q4km["blk.1.attn_v.weight"] == TensorChoice("q8_0", "q6_k")
    # ffn_down's rows are 1024 long: no fallback
    assert q4km["blk.1.ffn_down.weight"] == TensorChoice("q6_k", None)
    # output: the OUTPUT branch itself picks Q8_0 when "nx % qk_k != 0" -- not a fallback
    assert q4km["output.weight"] == TensorChoice("q8_0", None)
    # Q3_K -> Q4_0 at 0c1e57098 (before the 2026 rework of llama-quant.cpp it was IQ4_NL)
    assert run("q3_k_s", tensors, gqa=False)["blk.0.attn_q.weight"] == TensorChoice("q4_0", "q3_k")
    q2k = run("q2_k", tensors, gqa=False)
    assert q2k["blk.0.attn_q.weight"] == TensorChoice("q4_0", "q2_k")  # Q2_K -> Q4_0
    assert q2k["blk.0.attn_output.weight"] == TensorChoice("q4_0", "q3_k")  # Q2_K's attn_output Q3_K
    assert run("q5_k_s", tensors, gqa=False)["blk.0.attn_q.weight"] == TensorChoice("q5_1", "q5_k")
    # Q4_0: output "new_type != Q8_0 -> Q6_K" (384 % 32 == 0), then Q6_K -> Q8_0
    assert run("q4_0", tensors, gqa=False)["output.weight"] == TensorChoice("q8_0", "q6_k")


def test_row_length_100_falls_back_to_f16():
    tensors = llama_tensors(2, gqa=False, d=100, ff=200)
    q4km = run("q4_k_m", tensors, gqa=False)
    # Q4_K -> Q5_0, and 100 % 32 != 0 -> F16
    assert q4km["blk.0.attn_q.weight"] == TensorChoice("f16", "q4_k")
    # OUTPUT branch: Q8_0 (nx % 256 != 0); fallback default case: a 32-block type -> F16
    assert q4km["output.weight"] == TensorChoice("f16", "q8_0")
    assert run("q8_0", tensors, gqa=False)["blk.0.attn_q.weight"] == TensorChoice("f16", "q8_0")
    assert run("q4_1", tensors, gqa=False)["blk.0.attn_q.weight"] == TensorChoice("f16", "q4_1")
    # float presets: no fallback at all
    assert run("bf16", tensors, gqa=False)["blk.0.attn_q.weight"] == TensorChoice("bf16", None)


# -- GQA / 70B / experts ------------------------------------------------------------------------


def test_70b_bumps_attn_v():
    llama80 = llama_tensors(80, gqa=True, d=256, ff=256, vocab=64)
    # llama, 80 layers, n_head != n_head_kv -> LLM_TYPE_70B: "Q3_K or Q4_K -> Q5_K" for attn_v
    got = types(run("q4_k_m", llama80))
    assert got["blk.10.attn_v.weight"] == "q5_k"  # use_more_bits(10, 80) false: Q4_K, bumped
    assert got["blk.0.attn_v.weight"] == "q6_k"  # Q6_K is not bumped
    assert got["blk.10.ffn_down.weight"] == "q4_k"  # the bump is attn_v only
    assert types(run("q3_k_s", llama80))["blk.40.attn_v.weight"] == "q5_k"  # default Q3_K bumped
    assert types(run("q2_k", llama80))["blk.40.attn_v.weight"] == "q5_k"  # Q4_K (GQA 4) bumped
    # n_head == n_head_kv -> LLM_TYPE_65B: no bump
    mha80 = llama_tensors(80, gqa=False, d=256, ff=256, vocab=64)
    assert types(run("q4_k_m", mha80, gqa=False))["blk.10.attn_v.weight"] == "q4_k"
    # qwen2: 80 layers -> 70B whatever the heads
    assert types(run("q2_k", mha80, gqa=False, arch="qwen2"))["blk.10.attn_v.weight"] == "q5_k"
    # 79 layers: not 70B
    llama79 = llama_tensors(79, gqa=True, d=256, ff=256, vocab=64)
    assert types(run("q3_k_s", llama79))["blk.40.attn_v.weight"] == "q3_k"


def moe_tensors(n_layer, d=512, ff=512, n_expert=8):
    out = [("token_embd.weight", (1000, d)), ("output_norm.weight", (d,)), ("output.weight", (1000, d))]
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (d,)),
            (b + "attn_q.weight", (d, d)),
            (b + "attn_k.weight", (d // 4, d)),
            (b + "attn_v.weight", (d // 4, d)),
            (b + "attn_output.weight", (d, d)),
            (b + "ffn_norm.weight", (d,)),
            (b + "ffn_gate_inp.weight", (n_expert, d)),
            (b + "ffn_gate_exps.weight", (n_expert, ff, d)),
            (b + "ffn_up_exps.weight", (n_expert, ff, d)),
            (b + "ffn_down_exps.weight", (n_expert, d, ff)),
        ]
    return out


def test_eight_experts():
    got = types(run("q4_k_m", moe_tensors(32), n_layer=32, n_expert=8))
    assert got["blk.5.attn_v.weight"] == "q8_0"  # attn_v: "n_expert == 8 -> Q8_0"
    assert got["blk.5.attn_k.weight"] == "q8_0"  # attn_k: "n_expert == 8 -> Q8_0"
    assert got["blk.5.attn_output.weight"] == "q5_k"  # "n_expert == 8 && Q4_K_M -> Q5_K"
    assert got["blk.5.attn_q.weight"] == "q4_k"
    # ffn_down_exps: layer from the name (n_expert > 1); use_more_bits(i, 32)
    assert got["blk.6.ffn_down_exps.weight"] == "q6_k" and got["blk.5.ffn_down_exps.weight"] == "q4_k"
    assert got["blk.5.ffn_gate_exps.weight"] == "q4_k"
    assert "blk.5.ffn_gate_inp.weight" not in got  # expert gating is not quantized
    q3ks = types(run("q3_k_s", moe_tensors(2), n_layer=2, n_expert=8))
    assert q3ks["blk.0.attn_output.weight"] == "q5_k"  # Q3_K_S is in the n_expert == 8 list
    q5km = types(run("q5_k_m", moe_tensors(2), n_layer=2, n_expert=8))
    assert q5km["blk.0.attn_output.weight"] == "q5_k"  # Q5_K_M is not in it: default Q5_K


def test_expert_layer_must_be_in_range():
    tensors = moe_tensors(2) + [("blk.7.ffn_down_exps.weight", (8, 512, 512))]
    with pytest.raises(PresetError, match="Bad layer 7"):
        run("q4_k_m", tensors, n_layer=2, n_expert=8)


# -- counters and order -------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["q4_k_m", "q3_k_m", "q4_k_s", "q2_k", "q5_k_m"])
def test_order_of_the_list_does_not_matter(preset):
    tensors = llama_tensors(32, gqa=True)
    reference = run(preset, tensors)
    for seed in range(3):
        shuffled = tensors[:]
        random.Random(seed).shuffle(shuffled)
        assert run(preset, shuffled) == reference
    moe = moe_tensors(8)
    reference = run(preset, moe, n_layer=8, n_expert=8)
    random.Random(7).shuffle(moe)
    assert run(preset, moe, n_layer=8, n_expert=8) == reference


def test_layers_are_visited_in_numeric_order():
    # weight_name_comparer sorts by the layer number first: blk.10 comes after blk.9, so
    # Q4_K_S's "i_attention_wv < 4" picks layers 0-3, not blk.0, blk.1, blk.10, blk.11
    got = types(run("q4_k_s", llama_tensors(32, gqa=True)))
    assert [got[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2, 3, 4, 10, 11)] == ["q5_k"] * 4 + ["q4_k"] * 3


def test_counters_count_tensors_not_layer_names():
    # attn_v uses the running counter i_attention_wv: without blk.0's attn_v, blk.1 and blk.2
    # are the first two -> Q3_K_M's "i_attention_wv < 2 -> Q5_K"
    tensors = [t for t in llama_tensors(32, gqa=True) if t[0] != "blk.0.attn_v.weight"]
    got = types(run("q3_k_m", tensors))
    assert [got[f"blk.{i}.attn_v.weight"] for i in (1, 2, 3)] == ["q5_k", "q5_k", "q4_k"]
    # n_attention_wv counts the list: 31 attn_v -> use_more_bits(5, 31) = (5 - 3) % 3 == 2
    tensors = [t for t in llama_tensors(32, gqa=True) if t[0] != "blk.31.attn_v.weight"]
    assert types(run("q4_k_m", tensors))["blk.5.attn_v.weight"] == "q6_k"  # q4_k with 32 of them
    # dense ffn_down uses i_ffn_down (n_expert <= 1) against n_layer = block_count: without
    # blk.4's ffn_down, blk.6's counter is 5 -> use_more_bits(5, 32) false -> Q4_K
    tensors = [t for t in llama_tensors(32, gqa=True) if t[0] != "blk.4.ffn_down.weight"]
    got = types(run("q4_k_m", tensors, n_layer=32))
    assert got["blk.6.ffn_down.weight"] == "q4_k" and got["blk.7.ffn_down.weight"] == "q6_k"


def test_fused_qkv_follows_the_attn_v_rules():
    # attn_qkv is category_is_attn_v, whose branch comes first: the later ATTENTION_QKV branch
    # ("Q4_K_M -> Q5_K") is never reached, so layer 0 (use_more_bits) is Q6_K and layer 4 Q4_K
    tensors = [("blk.%d.attn_qkv.weight" % i, (768, 512)) for i in range(32)]
    got = types(run("q4_k_m", tensors, n_layer=32))
    assert got["blk.0.attn_qkv.weight"] == "q6_k" and got["blk.4.attn_qkv.weight"] == "q4_k"


# -- imatrix ------------------------------------------------------------------------------------


def test_q2_k_s_needs_an_imatrix():
    tensors = llama_tensors(32, gqa=False)
    # tensor_requires_imatrix: Q2_K tensors of a Q2_K_S file -> llama-quantize refuses
    with pytest.raises(PresetError, match="imatrix"):
        run("q2_k_s", tensors, gqa=False)
    got = run("q2_k_s", tensors, gqa=False, has_imatrix=True)
    assert got["blk.0.attn_v.weight"] == TensorChoice("q2_k", None, True)  # no GQA: default
    assert got["blk.3.ffn_down.weight"] == TensorChoice("q4_k", None, False)  # i < n/8 -> Q4_K
    assert got["blk.4.ffn_down.weight"] == TensorChoice("q2_k", None, True)
    assert got["token_embd.weight"] == TensorChoice("q2_k", None, False)  # token_embd never needs it
    assert got["output.weight"] == TensorChoice("q6_k", None, False)
    gqa = run("q2_k_s", llama_tensors(2, gqa=True), has_imatrix=True)
    assert gqa["blk.1.attn_v.weight"].type_name == "q4_k"  # "Q2_K_S && n_gqa() >= 4 -> Q4_K"


def test_legacy_types_with_an_imatrix():
    tensors = llama_tensors(32, gqa=True)
    # "(Q4_0 || Q5_0) && has_imatrix && i_layer < n_layer/8 -> Q4_1 / Q5_1"
    got = types(run("q4_0", tensors, has_imatrix=True))
    assert [got[f"blk.{i}.ffn_down.weight"] for i in (0, 3, 4)] == ["q4_1", "q4_1", "q4_0"]
    assert types(run("q5_0", tensors, has_imatrix=True))["blk.2.ffn_down.weight"] == "q5_1"
    assert types(run("q4_0", tensors))["blk.0.ffn_down.weight"] == "q4_0"
    assert types(run("q4_0", tensors))["output.weight"] == "q6_k"  # "new_type != Q8_0 -> Q6_K"


# -- which tensors are quantized ----------------------------------------------------------------


@pytest.mark.parametrize("name, shape, want", [
    ("blk.0.attn_q.weight", (512, 512), True),
    ("blk.0.ffn_down_exps.weight", (8, 512, 512), True),
    ("blk.0.attn_norm.weight", (512,), False),  # 1-D
    ("blk.0.attn_q.weight", (1, 512), False),  # ggml_n_dims is 1
    ("blk.0.attn_q.weight", (512, 1), True),  # ne = [1, 512]: 2-D
    ("blk.0.attn_q.bias", (512, 2), False),  # does not end with "weight"
    ("blk.0.ffn_gate_inp.weight", (8, 512), False),
    ("blk.0.attn_q_norm.weight", (2, 64), False),  # "_norm.weight"
    ("position_embd.weight", (512, 512), False),
    ("token_types.weight", (2, 512), False),
    ("blk.0.ssm_conv1d.weight", (4, 512), False),
    ("v.patch_embd.weight", (512, 512), False),
    ("abcde", (4, 4), True),  # rfind("weight") == size() - 6 wraps for a 5-character name
    ("abcd", (4, 4), False),
])
def test_tensor_allows_quantization(name, shape, want):
    assert tensor_allows_quantization(name, shape) is want


def test_categories():
    assert tensor_category("output.weight") == "output"
    assert tensor_category("per_layer_token_embd.weight") == "token_embd"
    assert tensor_category("blk.0.ffn_down_exps.weight") == "ffn_down"
    assert tensor_category("blk.0.ffn_up_shexp.weight") == "ffn_up"
    assert tensor_category("blk.0.attn_kv_b.weight") == "attn_kv_b"
    assert tensor_category("output_norm.weight") == "other"
    # n = 8: n/8 = 1, 7n/8 = 7 -> i < 1, i >= 7, and (i - 1) % 3 == 2 at i = 3, 6
    assert [use_more_bits(i, 8) for i in range(8)] == [True, False, False, True, False, False, True, True]


# -- presets and file types ---------------------------------------------------------------------


def test_preset_table():
    assert set(preset_names()) == {
        "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l",
        "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "f16", "bf16", "f32"}
    assert is_preset("q4_k_m") and is_preset("Q4_K_M") and not is_preset("q4_k") and not is_preset("iq4_nl")
    # LLAMA_FTYPE values in include/llama.h
    assert {p: file_type(p) for p in ("f32", "f16", "q4_0", "q8_0", "q2_k", "q3_k_m", "q4_k_m", "q2_k_s", "bf16")} == {
        "f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q2_k": 10, "q3_k_m": 12, "q4_k_m": 15, "q2_k_s": 21, "bf16": 32}
    assert default_type("q2_k_s") == "q2_k" and default_type("q3_k_l") == "q3_k" and default_type("f32") == "f32"
    with pytest.raises(PresetError, match="unknown"):
        file_type("q4_k")


def test_bad_inputs():
    with pytest.raises(PresetError, match="llama family"):
        run("q4_k_m", llama_tensors(2, gqa=True), arch="falcon")
    with pytest.raises(PresetError, match="twice"):
        run("q4_k_m", llama_tensors(2, gqa=True) + [("output.weight", (1000, 512))])
    with pytest.raises(PresetError, match="shape"):
        run("q4_k_m", [("blk.0.attn_q.weight", (1, 2, 3, 4, 5))], n_layer=1)


# -- Hugging Face names -------------------------------------------------------------------------


def test_gguf_tensor_names():
    hf = [
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
        "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.2.mlp.down_proj.weight", "something.else",
    ]
    assert gguf_tensor_names(hf, "llama", 2) == {
        "model.embed_tokens.weight": "token_embd.weight",
        "lm_head.weight": "output.weight",
        "model.norm.weight": "output_norm.weight",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight",
        "model.layers.0.self_attn.rotary_emb.inv_freq": None,  # convert_hf_to_gguf drops it
        "model.layers.2.mlp.down_proj.weight": None,  # beyond n_layer
        "something.else": None,
    }
    assert gguf_tensor_names(["model.layers.0.self_attn.q_proj.bias"], "qwen2", 1) == {
        "model.layers.0.self_attn.q_proj.bias": "blk.0.attn_q.bias"}
    assert gguf_tensor_names(["model.layers.0.mlp.gate_proj.weight"], "mistral", 1) == {
        "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight"}
    assert (gguf_arch("mistral"), gguf_arch("qwen2")) == ("llama", "qwen2")
    with pytest.raises(PresetError):
        gguf_tensor_names(["x"], "gpt2", 1)
