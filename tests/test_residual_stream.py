"""residual_stream: one permutation of the hidden dimension folded into the whole model.

llama.cpp judges the Llama GGUF (in a subprocess, as in test_llama_gguf.py); qstrat's numpy
BERT forward judges all-MiniLM-L6-v2.  Every reader's error is compared with a run without the
permutation, tensor by tensor."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qstrat
from qstrat.bert import SENTENCES, hidden_states, tokenize
from qstrat.errors import ConfigError
from qstrat.export import dequantize_to_safetensors
from qstrat.io.safetensors import SafetensorsModel, map_tensor
from qstrat.model import QuantizedModel, as_directory
from qstrat.pipelines.run import quantize_model
from qstrat.reference import minilm_model_dir
from qstrat.runconfig import RunConfig
from qstrat.strategies import StrategyChain
from qstrat.kernels import column_sq_norms
from qstrat.strategies.base import descending_order
from qstrat.strategies.residual import balanced_order, residual_axis
from qstrat.strategies.search import Reader, SampledErrors, SearchSettings, search_order
from qstrat.synthetic import LlamaShape, hf_config, llama_tensors, write_model
from tests.conftest import REPO
from tests.forward import llama_forward
from tests.test_llama_gguf import QUANTIZED_TOLERANCE, TOKENS, probe, relative_error

#: 8 blocks of Q8_0 per row of the hidden dimension: room for the search to move columns
SHAPE = LlamaShape(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
SEARCH = {"name": "residual_stream", "budget": 150, "sample_rows": 128}


def run(model_dir, out, strategies, **settings):
    config = RunConfig.build({"validation": {"stages": ["weight_error"]}, "strategies": strategies, **settings}, "test")
    return quantize_model(model_dir, config, out)


def sqnr(result) -> dict[str, float]:
    return {r.name: r.metrics.sqnr_db for r in result.tensors if r.quantized}


def test_which_axis_carries_the_stream():
    assert residual_axis("model.layers.3.self_attn.q_proj.weight") == 1
    assert residual_axis("model.layers.3.self_attn.q_proj.bias") is None  # head dimensions
    assert residual_axis("model.layers.3.self_attn.o_proj.weight") == 0
    assert residual_axis("model.layers.3.mlp.down_proj.weight") == 0
    assert residual_axis("model.layers.3.post_attention_layernorm.weight") == 0
    assert residual_axis("lm_head.weight") == residual_axis("model.embed_tokens.weight") == 1
    assert residual_axis("blk.0.ffn_down.weight") == 0 and residual_axis("blk.0.attn_k.weight") == 1
    assert residual_axis("encoder.layer.1.attention.output.LayerNorm.bias") == 0
    assert residual_axis("embeddings.token_type_embeddings.weight") == 1
    assert residual_axis("encoder.layer.1.intermediate.dense.bias") is None
    with pytest.raises(ConfigError, match="model.layers.0.mystery.weight"):
        residual_axis("model.layers.0.mystery.weight")


def test_it_combines_only_with_function_preserving_strategies():
    StrategyChain(["residual_stream", "mlp_joint", "head_order", "identity"])
    with pytest.raises(ConfigError, match="not with l2_norm"):
        StrategyChain(["residual_stream", "l2_norm"])
    with pytest.raises(ConfigError, match="budget"):
        StrategyChain([{"name": "residual_stream", "budget": -1}])


def test_balanced_order_deals_each_block_a_share():
    order = np.arange(64)[::-1]
    dealt = balanced_order(order, 16)
    assert sorted(dealt) == list(range(64))
    assert [max(dealt[b * 16:(b + 1) * 16]) for b in range(4)] == [63, 62, 61, 60]


def test_unknown_tensors_stop_the_plan(tmp_path):
    tensors = llama_tensors(SHAPE, seed=3)
    tensors["model.layers.0.adapter.weight"] = np.ones((4, SHAPE.hidden_size), np.float32)
    model_dir = write_model(tmp_path / "odd", tensors, dtype="F32", config=hf_config(SHAPE))
    with pytest.raises(ConfigError, match="adapter"):
        run(model_dir, tmp_path / "out", ["residual_stream"], format="q8_0")


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("residual")
    model_dir = write_model(base / "tiny", llama_tensors(SHAPE, seed=3), dtype="BF16", config=hf_config(SHAPE))
    plain = run(model_dir, base / "plain", ["mlp_joint", "head_order", "identity"], format="q8_0")
    folded = run(model_dir, base / "folded", [SEARCH, "mlp_joint", "head_order", "identity"], format="q8_0")
    return model_dir, base, plain, folded


def test_the_folded_model_runs_in_llama_cpp_with_the_source_function(llama_runs):
    model_dir, base, plain, folded = llama_runs
    assert folded.residual["order"].startswith("search"), folded.residual  # not the identity
    with as_directory(base / "folded") as directory:  # the GGUF container, unpacked
        stored = QuantizedModel(directory)
        perm, axis = stored.residual_permutation("model.layers.0.mlp.gate_proj.weight")
        assert axis == 1 and not np.array_equal(perm, np.arange(SHAPE.hidden_size))
        assert stored.residual_permutation("model.norm.weight")[1] == 0
        assert stored.joint_permutation("model.layers.0.mlp.gate_proj.weight")[1] == 0  # mlp_joint's, the other axis
    logits, _ = probe(base / "folded" / "tiny.gguf")
    # the weights in their source layout (both permutations undone) compute what llama.cpp computes
    # from the permuted file: the permutation is folded in without changing the function
    held = llama_forward(qstrat.load_model(base / "folded", original=True), SHAPE, np.array(TOKENS))
    assert relative_error(logits, held) < QUANTIZED_TOLERANCE["q8_0"], relative_error(logits, held)
    # the stored (permuted) weights, through the same forward, are the same model
    permuted = llama_forward(qstrat.load_model(base / "folded"), SHAPE, np.array(TOKENS))
    assert relative_error(permuted, held) < 1e-9
    # `qstrat dequantize` writes the source layout too
    with as_directory(base / "folded") as directory:
        dequantize_to_safetensors(directory, base / "source.safetensors")
    written = {i.name: np.asarray(map_tensor(i)) for i in SafetensorsModel(base / "source.safetensors") if i.dtype == "F32"}
    original = qstrat.load_model(base / "folded", original=True)
    assert len(written) > 12 and all(np.array_equal(written[n], original[n]) for n in written)


def test_no_reader_is_worse_than_without_the_permutation(llama_runs):
    _, _, plain, folded = llama_runs
    before, after = sqnr(plain), sqnr(folded)
    readers = {r.name for r in folded.tensors if r.residual_axis == 1 and r.quantized}
    assert len(readers) == 2 * 5 + 2  # q, k, v, gate, up per layer; the embeddings and the output head
    assert all(after[n] >= before[n] for n in readers), {n: after[n] - before[n] for n in readers}
    assert np.mean([after[n] - before[n] for n in readers]) > 0.05
    gains = {r.name: r.permutation_gain_db for r in folded.tensors if r.name in readers}
    assert all(g is not None and g >= 0 for g in gains.values()), gains
    report = json.loads((llama_runs[1] / "folded" / "report.json").read_text())
    assert report["summary"]["residual_stream"]["order"] == folded.residual["order"]


def test_bert_through_the_numpy_forward(tmp_path):
    model_dir = minilm_model_dir()
    result = run(model_dir, tmp_path / "out", [{"name": "residual_stream", "budget": 200, "sample_rows": 512}], format="q8_0")
    assert result.residual["tensors"] > 50 and result.residual["order"] != "identity", result.residual
    config = json.loads((model_dir / "config.json").read_text())
    ids, mask = tokenize(model_dir / "tokenizer.json", SENTENCES[:4])
    stored = qstrat.load_model(tmp_path / "out")
    original = qstrat.load_model(tmp_path / "out", original=True)
    with as_directory(tmp_path / "out") as directory:
        perm = QuantizedModel(directory).residual_permutation("embeddings.LayerNorm.weight")[0]
    # the permuted model's last hidden state is the original's, its features in the stream's order
    np.testing.assert_allclose(hidden_states(stored, config, ids, mask), hidden_states(original, config, ids, mask)[..., perm], atol=2e-5)


def test_mlp_joint_search_never_loses_to_its_candidates(llama_runs, tmp_path):
    model_dir = llama_runs[0]
    plain = run(model_dir, tmp_path / "plain", ["mlp_joint", "identity"], format="q4_0")
    searched = run(model_dir, tmp_path / "searched", [{"name": "mlp_joint", "budget": 100, "sample_rows": 128}, "identity"], format="q4_0")
    downs = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(SHAPE.num_hidden_layers)]
    before, after = sqnr(plain), sqnr(searched)
    assert all(after[n] >= before[n] for n in downs), {n: after[n] - before[n] for n in downs}
    gains = {r.name: r.permutation_gain_db for r in searched.tensors if r.name in downs}
    assert all(g is not None and g >= 0 for g in gains.values()), gains
    manifest = json.loads((tmp_path / "searched" / "manifest.json").read_text())
    assert [manifest["tensors"][n].get("permutation_gain_db") for n in downs] == [round(gains[n], 4) for n in downs]


#: two super-blocks of 256 per row of o_proj, each two key/value groups of two heads of 64: swaps of
#: groups move values between blocks (swaps within a group never do: a group lies inside one block)
HEADS = LlamaShape(vocab_size=320, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=4)


def test_head_order_search_where_blocks_hold_several_heads(tmp_path):
    model_dir = write_model(tmp_path / "tiny", llama_tensors(HEADS, seed=5), dtype="F32", config=hf_config(HEADS))
    plain = run(model_dir, tmp_path / "plain", ["head_order", "identity"], format="q4_k")
    searched = run(model_dir, tmp_path / "searched", [{"name": "head_order", "budget": 60, "sample_rows": 512}, "identity"], format="q4_k")
    outs = [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(HEADS.num_hidden_layers)]
    before, after = sqnr(plain), sqnr(searched)
    assert all(after[n] >= before[n] for n in outs) and any(after[n] > before[n] for n in outs), {n: after[n] - before[n] for n in outs}
    assert all(after[n] == before[n] for n in before if n not in outs)  # nothing else is quantized differently
    # key/value groups moved, yet llama.cpp computes the source model's function
    logits, _ = probe(tmp_path / "searched" / "tiny.gguf")
    held = llama_forward(qstrat.load_model(tmp_path / "searched", original=True), HEADS, np.array(TOKENS))
    assert relative_error(logits, held) < QUANTIZED_TOLERANCE["q4_k_m"], relative_error(logits, held)
    permuted = llama_forward(qstrat.load_model(tmp_path / "searched"), HEADS, np.array(TOKENS))
    assert relative_error(permuted, held) < 1e-9


def nearest_columns(permuted: np.ndarray, source: np.ndarray) -> np.ndarray:
    """For each column of ``permuted`` (a quantized copy), the source column closest to it."""
    distances = ((permuted[:, :, None] - source[:, None, :]) ** 2).sum(axis=0)
    return distances.argmin(axis=1)


def test_value_channels_move_inside_heads_and_keep_the_function(tmp_path):
    # Q8_0's blocks of 32 never hold two heads of 64, so only value channels moved inside the heads
    # (the same order in every query head of a key/value group) change o_proj's blocks
    source = llama_tensors(HEADS, seed=5)
    model_dir = write_model(tmp_path / "tiny", source, dtype="F32", config=hf_config(HEADS))
    plain = run(model_dir, tmp_path / "plain", ["identity"], format="q8_0")
    searched = run(model_dir, tmp_path / "searched", [{"name": "head_order", "budget": 60, "sample_rows": 512}, "identity"], format="q8_0")
    outs = [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(HEADS.num_hidden_layers)]
    before, after = sqnr(plain), sqnr(searched)
    assert all(after[n] >= before[n] for n in outs) and any(after[n] > before[n] for n in outs), {n: after[n] - before[n] for n in outs}
    assert all(after[n] == before[n] for n in before if n not in outs)
    permuted = qstrat.load_model(tmp_path / "searched")
    head_dim, per_group = HEADS.head_dim, HEADS.num_attention_heads // HEADS.num_key_value_heads
    moved = False
    for name in outs:
        columns = nearest_columns(permuted[name], source[name]).reshape(HEADS.num_attention_heads, head_dim)
        heads = columns[:, 0] // head_dim
        inside = columns - heads[:, None] * head_dim
        assert np.all((inside >= 0) & (inside < head_dim))  # heads stay whole
        assert all(np.array_equal(inside[s], inside[t]) for s in range(len(heads)) for t in range(len(heads))
                   if heads[s] // per_group == heads[t] // per_group)  # one channel order per group
        moved |= not np.array_equal(inside, np.broadcast_to(np.arange(head_dim), inside.shape))
    assert moved
    # llama.cpp computes the source model's function, and so does the permuted model's forward pass
    logits, _ = probe(tmp_path / "searched" / "tiny.gguf")
    held = llama_forward(qstrat.load_model(tmp_path / "searched", original=True), HEADS, np.array(TOKENS))
    assert relative_error(logits, held) < QUANTIZED_TOLERANCE["q8_0"], relative_error(logits, held)
    assert relative_error(llama_forward(permuted, HEADS, np.array(TOKENS)), held) < 1e-9


def test_heads_inside_one_block_have_nothing_to_search(tmp_path):
    shape = LlamaShape(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=4)  # heads of 32: one Q8_0 block each
    model_dir = write_model(tmp_path / "tiny", llama_tensors(shape, seed=5), dtype="F32", config=hf_config(shape))
    q8 = [run(model_dir, tmp_path / f"q8-{budget}", [{"name": "head_order", "budget": budget}, "identity"], format="q8_0") for budget in (0, 60)]
    assert sqnr(q8[0]) == sqnr(q8[1])


def test_a_rerun_resumes_under_the_same_permutation(llama_runs):
    model_dir, base, _, folded = llama_runs
    before = json.loads((base / "folded" / "manifest.json").read_text())
    again = run(model_dir, base / "folded", [SEARCH, "mlp_joint", "head_order", "identity"], format="q8_0")
    after = json.loads((base / "folded" / "manifest.json").read_text())
    assert again.residual == folded.residual
    assert after["tensors"] == before["tensors"] and after["containers"] == before["containers"]


def test_a_search_from_identity_finds_an_order_at_q4_k(tmp_path):
    # at Q4_K every candidate order leaves some reader of the example model worse, so the search
    # starts from identity, where nearly every swap leaves some reader a little worse: its first
    # half lowers the total alone, the second takes away what any reader lost
    model_dir = REPO / "examples" / "tiny-llama"
    plain = run(model_dir, tmp_path / "plain", ["identity"], format="q4_k")
    searched = run(model_dir, tmp_path / "searched", [{"name": "residual_stream", "budget": 200}, "identity"], format="q4_k")
    assert searched.residual["order"].startswith("search from identity"), searched.residual
    readers = {r.name for r in searched.tensors if r.residual_axis == 1 and r.quantized}
    before, after = sqnr(plain), sqnr(searched)
    assert all(after[n] >= before[n] for n in readers), {n: after[n] - before[n] for n in readers}
    assert np.mean([after[n] - before[n] for n in readers]) > 0


@pytest.mark.parametrize("seed", [2, 4, 5])
def test_a_search_repairs_a_reader_the_sort_left_worse_and_keeps_the_sorts_gain(seed):
    # one reader shares the stream's scales (log-normal, 16 outlier channels), one does not: a
    # sort by energy gains 2-4 dB on the first and leaves the second a little worse or better by
    # chance; the search takes any such excess away without undoing the sort
    rng = np.random.default_rng(seed)
    width = 2048
    scale = np.exp(0.5 * rng.standard_normal(width))
    scale[rng.choice(width, 16, replace=False)] *= 12.0
    readers = {"shared": Reader((rng.standard_normal((512, width)) * scale).astype(np.float32), "q8_0"),
               "neutral": Reader(rng.standard_normal((8192, width)).astype(np.float32), "q8_0")}
    energy = np.zeros(width)
    for reader in readers.values():
        norms = np.zeros(width)
        column_sq_norms(reader.array, norms)
        energy += norms / norms.sum()
    start = descending_order(energy)

    def measured(order):  # the neutral reader on all its rows, as a search does once its sample misled it
        errors = SampledErrors(readers, 128, np.random.default_rng(0), frozenset({"neutral"}))
        identity = errors.reset(np.arange(width))
        return identity, errors.reset(order)

    identity, before = measured(start)
    order, kept = search_order(readers, start, energy, 32, SearchSettings(budget=100),
                               SampledErrors(readers, 128, np.random.default_rng(0), frozenset({"neutral"})))
    _, after = measured(order)
    assert kept and sorted(order) == list(range(width))
    assert after["neutral"] <= identity["neutral"], after["neutral"] / identity["neutral"]
    sorted_gain, searched_gain = (10 * np.log10(identity["shared"] / e["shared"]) for e in (before, after))
    assert sorted_gain > 1.5 and searched_gain >= sorted_gain - 0.05, (sorted_gain, searched_gain)


def test_a_swap_inside_a_k_quant_super_block_is_measured():
    # Q4_K scales each 32 of its 256 columns: swapping columns 5 and 70 changes the error of
    # super-block 0 although both stay in it (such swaps were once taken for no change)
    rng = np.random.default_rng(0)
    readers = {"w": Reader((rng.standard_normal((64, 512)) * np.exp(rng.standard_normal(512))).astype(np.float32), "q4_k")}
    errors = SampledErrors(readers, 64, np.random.default_rng(0))
    before = errors.reset(np.arange(512))
    order = np.arange(512)
    order[[5, 70]] = order[[70, 5]]
    after = errors.swapped(order, np.array([5, 70]))
    assert after["w"] != before["w"]
    assert after["w"] == pytest.approx(SampledErrors(readers, 64, np.random.default_rng(0)).reset(order)["w"], rel=1e-12)


def test_no_permutation_is_written_where_no_order_can_change_a_block(tmp_path):
    # rows of 256: one Q8K block each, so every order of down's or o's columns holds the same values
    # per block; errors then differ by float rounding alone (Q8K's kernel sums float32 squares in
    # vector lanes, ~1e-9 apart here), which must not pass for a gain
    shape = LlamaShape(vocab_size=320, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)
    model_dir = write_model(tmp_path / "tiny", llama_tensors(shape, seed=1), dtype="F32", config=hf_config(shape))
    for seed in range(3):
        chain = [{"name": "residual_stream", "budget": 20, "seed": seed}, {"name": "mlp_joint", "budget": 20, "seed": seed},
                 {"name": "head_order", "budget": 20, "seed": seed}, "identity"]
        result = run(model_dir, tmp_path / f"out-{seed}", chain, format="q8_k")
        assert [r.name for r in result.tensors if r.permutation != "none"] == []


def test_a_quantized_gguf_input_is_decoded_one_reader_at_a_time(tmp_path):
    # its block types decode to new float32 arrays; the search held every reader's at once (for a 7B
    # model some 19 GB). Measured against the same model as mapped float32 safetensors (nothing decoded)
    import tracemalloc

    shape = LlamaShape(vocab_size=4096, hidden_size=256, intermediate_size=2048, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=1)
    source = write_model(tmp_path / "m", llama_tensors(shape, 3), dtype="F32", shards=1, config=hf_config(shape))
    run(source, tmp_path / "g", ["identity"], format="q8_0", validation={"enabled": False})
    gguf_input = next((tmp_path / "g").glob("*.gguf"))
    readers_bytes = 4 * sum(info.numel for info in SafetensorsModel(source) if residual_axis(info.name) == 1)
    peaks = {}
    for label, model in (("safetensors", source), ("gguf", gguf_input)):
        tracemalloc.start()
        try:
            run(model, tmp_path / f"o-{label}", [{"name": "residual_stream", "budget": 0}, "identity"],
                format="q8_0", validation={"enabled": False})
            peaks[label] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks["gguf"] - peaks["safetensors"] < readers_bytes / 4, (peaks, readers_bytes)
