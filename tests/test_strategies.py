"""Permutation strategies, the chain, and function-preserving joint permutations."""

import json

import numpy as np
import pytest

import qstrat
from qstrat import QuantizationConfig, quantize_safetensors
from qstrat.errors import ConfigError
from qstrat.io.safetensors import SafetensorsFile, map_tensor, write_safetensors
from qstrat.strategies import Candidate, StrategyChain, make_strategy
from qstrat.strategies.qr import qr_pivot_order
from qstrat.synthetic import (
    LlamaShape,
    float32_to_bf16_bits,
    hf_config,
    llama_tensors,
    write_model,
)
from tests.conftest import REPO
from tests.forward import bert_encoder, bert_tensors, llama_forward

GQA_SHAPE = LlamaShape(vocab_size=64, hidden_size=512, intermediate_size=768, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4)
FUNCTION_PRESERVING = ["mlp_joint", "head_order", "identity"]


def unused_error(name, storage, col_perm):
    raise AssertionError("a per-tensor strategy does not measure quantization error")


def test_l2_norm_is_stable_descending():
    x = np.array([[1.0, 3.0, 1.0, 0.0, 3.0]] * 2, dtype=np.float32)
    perm = make_strategy("l2_norm").permutations({"w": x}, unused_error)["w"].perm
    assert perm.tolist() == [1, 4, 0, 2, 3]


def test_amax_orders_by_largest_magnitude():
    x = np.array([[0.1, -5.0, 2.0], [0.2, 1.0, -3.0]], dtype=np.float32)
    assert make_strategy("amax").permutations({"w": x}, unused_error)["w"].perm.tolist() == [1, 2, 0]


@pytest.mark.parametrize("rows, k", [(1, 256), (3, 512), (512, 256), (256, 1024), (1000, 512), (40, 768)])
def test_qr_pivot_always_gives_a_permutation(rows, k):
    rng = np.random.default_rng(rows * k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, ::7] = 0.0  # rank-deficient, with zero columns
    x[:, 5] = x[:, 3] * 2
    order = qr_pivot_order(x)
    assert sorted(order.tolist()) == list(range(k))
    # the first pivot is the column of largest norm
    assert order[0] == int(np.argmax(np.linalg.norm(x.astype(np.float64), axis=0)))


def test_qr_pivot_on_zero_and_bf16():
    assert sorted(qr_pivot_order(np.zeros((4, 256), np.float32)).tolist()) == list(range(256))
    bits = float32_to_bf16_bits(np.random.default_rng(0).standard_normal((64, 512)))
    assert sorted(qr_pivot_order(bits).tolist()) == list(range(512))


def test_attention_aware_is_independent_of_order():
    t = llama_tensors(GQA_SHAPE, 0)
    names = [n for n in t if "self_attn" in n and n.startswith("model.layers.0")]
    strategy = make_strategy("attention_aware")
    candidates = {n: Candidate(t[n].shape, True) for n in names}
    groups = strategy.claim(candidates, {})
    assert groups == strategy.claim(dict(reversed(list(candidates.items()))), {})
    qkv = next(g for g in groups if len(g) == 3)
    forward = strategy.permutations({n: t[n] for n in qkv}, unused_error)
    backward = strategy.permutations({n: t[n] for n in reversed(qkv)}, unused_error)
    assert all(np.array_equal(forward[n].perm, backward[n].perm) for n in qkv)
    assert len({forward[n].perm.tobytes() for n in qkv}) == 1


def test_chain_conflicts_and_fallback():
    t = llama_tensors(GQA_SHAPE, 0)
    candidates = {n: Candidate(a.shape, a.ndim == 2 and "norm" not in n and "embed" not in n) for n in t.items() for n, a in [n]}
    with pytest.raises(ConfigError, match="claimed by both"):
        StrategyChain(["attention_aware", "head_order"]).assign(candidates, hf_config(GQA_SHAPE))
    with pytest.raises(ConfigError, match="strategy mlp_joint appears twice in the chain"):  # "claimed by mlp_joint and mlp_joint"
        StrategyChain(["mlp_joint", "mlp_joint", "identity"]).assign(candidates, hf_config(GQA_SHAPE))
    assignments = StrategyChain(["mlp_joint", "head_order", "l2_norm"]).assign(candidates, hf_config(GQA_SHAPE))
    owners = {m: a.strategy.name for a in assignments for m in a.members}
    assert owners["lm_head.weight"] == "l2_norm"
    assert owners["model.layers.1.mlp.down_proj.weight"] == "mlp_joint"
    assert owners["model.layers.1.self_attn.k_proj.weight"] == "head_order"
    only_joint = StrategyChain(["mlp_joint"]).assign(candidates, {})
    assert {a.strategy.name for a in only_joint if "lm_head.weight" in a.members} == {"identity"}


def test_head_order_needs_geometry():
    t = llama_tensors(GQA_SHAPE, 0)
    candidates = {n: Candidate(a.shape, a.ndim == 2) for n, a in t.items()}
    with pytest.raises(ConfigError, match="number of attention heads is unknown"):
        StrategyChain(["head_order"]).assign(candidates, {})
    with pytest.raises(ConfigError, match="does not fit"):
        StrategyChain([{"name": "head_order", "num_heads": 16, "num_kv_heads": 4}]).assign(candidates, {})
    for value in ("x", -4, 2.0):
        with pytest.raises(ConfigError, match=f"head_order: num_heads must be an integer >= 1, not {value!r}"):
            StrategyChain([{"name": "head_order", "num_heads": value}])


def _joint_permuted(source, out):
    """The source tensors with the run's stored joint permutations applied (no quantization)."""
    manifest = json.loads((out / "manifest.json").read_text())
    perms = SafetensorsFile(out / "joint_permutations.safetensors")
    permuted = dict(source)
    for name, entry in manifest["tensors"].items():
        if "joint" in entry:
            perm = map_tensor(perms.tensors[name])
            permuted[name] = np.take(source[name], perm, axis=entry["joint"]["axis"])
    return permuted, manifest


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_llama_joint_permutations_preserve_the_function(tmp_path):
    source = llama_tensors(GQA_SHAPE, 5)
    # heads of alternating groups differ 8x in scale: reordering whole groups pays off in o_proj
    head_scale = np.repeat([1.0, 1.0, 8.0, 8.0, 1.0, 1.0, 8.0, 8.0], GQA_SHAPE.head_dim)
    rng = np.random.default_rng(5)
    for i in range(GQA_SHAPE.num_hidden_layers):
        source[f"model.layers.{i}.self_attn.o_proj.weight"] = (rng.standard_normal((512, 512)) * head_scale / 60).astype(np.float32)
    model = write_model(tmp_path / "m", source, dtype="F32", config=hf_config(GQA_SHAPE))
    out = tmp_path / "out"
    quantize_safetensors(model, QuantizationConfig(strategies=FUNCTION_PRESERVING, output_dir=out))
    assert not list(out.glob("*.perm"))
    permuted, manifest = _joint_permuted(source, out)
    kinds = {n: e["permutation"] for n, e in manifest["tensors"].items()}
    assert kinds["model.layers.0.mlp.down_proj.weight"] == "joint"
    assert kinds["model.layers.0.self_attn.o_proj.weight"] == "joint"
    assert any(not np.array_equal(permuted[n], source[n]) for n in source)
    tokens = np.array([1, 5, 9, 2, 33, 7, 60, 11])
    reference = llama_forward(source, GQA_SHAPE, tokens)
    assert _rel(llama_forward(permuted, GQA_SHAPE, tokens), reference) < 1e-6
    # dequantized: the function-equivalent layout computes what the original layout does
    loaded, restored = qstrat.load_model(out), qstrat.load_model(out, original=True)
    quantized_joint = llama_forward(loaded, GQA_SHAPE, tokens)
    assert _rel(quantized_joint, llama_forward(restored, GQA_SHAPE, tokens)) < 1e-6
    for name in source:
        assert restored[name].shape == source[name].shape
    # and it is at least as close to the original as quantizing without permutation
    quantize_safetensors(model, QuantizationConfig(output_dir=tmp_path / "plain"))
    plain = llama_forward(qstrat.load_model(tmp_path / "plain"), GQA_SHAPE, tokens)
    assert np.abs(quantized_joint - reference).mean() <= np.abs(plain - reference).mean() * 1.001


def test_bert_joint_permutations_preserve_the_function(tmp_path):
    source = bert_tensors()
    model = write_model(tmp_path / "m", source, dtype="F32", config={"num_attention_heads": 8})
    out = tmp_path / "out"
    quantize_safetensors(model, QuantizationConfig(strategies=FUNCTION_PRESERVING, skip_patterns=("LayerNorm",), output_dir=out))
    permuted, manifest = _joint_permuted(source, out)
    assert manifest["tensors"]["encoder.layer.0.intermediate.dense.bias"]["permutation"] == "joint"
    assert manifest["tensors"]["encoder.layer.0.output.dense.bias"]["permutation"] == "none"
    x = np.random.default_rng(1).standard_normal((6, 512))
    reference = bert_encoder(source, x, 2, 8)
    assert _rel(bert_encoder(permuted, x, 2, 8), reference) < 1e-6
    loaded = qstrat.load_model(out)
    assert _rel(bert_encoder(loaded, x, 2, 8), bert_encoder(qstrat.load_model(out, original=True), x, 2, 8)) < 1e-6
    # the permuted biases were stored permuted, beside the quantized weights
    assert np.array_equal(loaded["encoder.layer.0.intermediate.dense.bias"], permuted["encoder.layer.0.intermediate.dense.bias"])
    # and the quantized model is at least as close to the original as quantizing without permutation
    quantize_safetensors(model, QuantizationConfig(skip_patterns=("LayerNorm",), output_dir=tmp_path / "plain"))
    plain = bert_encoder(qstrat.load_model(tmp_path / "plain"), x, 2, 8)
    assert np.abs(bert_encoder(loaded, x, 2, 8) - reference).mean() <= np.abs(plain - reference).mean() * 1.001


def _write_in_order(path, tensors, reverse):
    names = sorted(tensors, reverse=reverse)
    path.mkdir(parents=True)
    write_safetensors(path / "model.safetensors", [(n, "BF16", tensors[n].shape, float32_to_bf16_bits(tensors[n])) for n in names])
    (path / "config.json").write_text(json.dumps(hf_config(GQA_SHAPE)))


def test_output_is_deterministic_across_tensor_order_and_workers(tmp_path):
    source = llama_tensors(GQA_SHAPE, 9)
    _write_in_order(tmp_path / "a", source, reverse=False)
    _write_in_order(tmp_path / "b", source, reverse=True)
    chain = ["mlp_joint", "head_order", "qr_pivot"]
    outs = []
    for model, workers in (("a", 1), ("b", 2), ("a", 2)):
        out = tmp_path / f"out-{model}-{workers}"
        quantize_safetensors(tmp_path / model, QuantizationConfig(strategies=chain, workers=workers, output_dir=out))
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    # The input's identity (file bytes, here a different header order) is provenance, not result:
    # it differs in the manifest's source/fingerprint and in the journal, and only there.
    provenance = ("created_utc", "source", "fingerprint", "reports")  # reports hold timings
    for out in outs[1:]:
        same_input = out.name.startswith("out-a")
        assert sorted(p.name for p in out.iterdir()) == files
        for name in files:
            if name == "manifest.json":
                strip = lambda m: {k: v for k, v in m.items() if k not in provenance}  # noqa: E731
                assert strip(json.loads((out / name).read_text())) == strip(json.loads((outs[0] / name).read_text()))
            elif name.startswith("report."):
                continue  # reports hold timings
            elif name == ".qstrat-journal.jsonl":
                if same_input:  # the same groups, listed as the workers finished them
                    lines = [sorted((d / name).read_text().splitlines()) for d in (out, outs[0])]
                    assert lines[0] == lines[1]
            else:
                assert (out / name).read_bytes() == (outs[0] / name).read_bytes(), name
    for perm_file in outs[0].glob("*.perm"):
        qstrat.read_perm(perm_file)


def test_head_geometry_that_does_not_divide_names_where_it_came_from(tmp_path):
    # the message said only "8 heads cannot share 3 key/value heads": not that config.json said so
    from tests.helpers import make_llama_dir, run_cli

    model = make_llama_dir(tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["num_key_value_heads"] = config["num_attention_heads"] - 1
    (model / "config.json").write_text(json.dumps(config))
    result = run_cli("qstrat", "run", str(REPO / "configs" / "function_preserving.yaml"), "-i", str(model), "-o", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "the model's config.json (num_attention_heads, num_key_value_heads)" in result.stderr
    assert "num_heads and num_kv_heads options" in result.stderr
    options = {"name": "head_order", "num_heads": 8, "num_kv_heads": 3}
    with pytest.raises(ConfigError, match="from the strategy's options"):
        StrategyChain([options]).assign({n: Candidate(a.shape, a.ndim == 2) for n, a in llama_tensors(GQA_SHAPE, 0).items()}, {})


def test_an_mlp_that_mlp_joint_cannot_permute_is_said_before_the_run_and_in_its_report(tmp_path):
    # a layer whose down projection reads more columns than gate/up have rows was left unpermuted silently
    from tests.helpers import run_cli

    rng = np.random.default_rng(5)
    tensors = {
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((64, 256)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((64, 256)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((256, 128)),  # not the 64 gate/up give
        "model.layers.1.mlp.gate_proj.weight": rng.standard_normal((64, 256)),
        "model.layers.1.mlp.up_proj.weight": rng.standard_normal((64, 256)),
        "model.layers.1.mlp.down_proj.weight": rng.standard_normal((256, 64)),
        "model.layers.2.mlp.gate_up_proj.weight": rng.standard_normal((128, 256)),  # Phi-3's fused MLP: not one it knows,
        "model.layers.2.mlp.down_proj.weight": rng.standard_normal((256, 64)),  # and no warning for it every night
    }
    model = tmp_path / "m"
    model.mkdir()
    from safetensors.numpy import save_file

    save_file({n: a.astype(np.float32) for n, a in tensors.items()}, str(model / "model.safetensors"))
    note = ("strategy mlp_joint: 1 MLP(s) left unpermuted: model.layers.0.mlp: model.layers.0.mlp.down_proj.weight reads 128 "
            "columns, but model.layers.0.mlp.gate_proj.weight has shape [64, 256], not 128 rows")
    args = ("qstrat", "run", str(REPO / "configs" / "function_preserving.yaml"), "-i", str(model), "-o", str(tmp_path / "o"),
            "--set", "format=q8_0", "--set", "strategies=[mlp_joint, identity]")
    dry = run_cli(*args, "--dry-run")
    assert dry.returncode == 0 and f"warning: m: {note}" in dry.stderr, dry.stderr
    result = run_cli(*args)
    assert result.returncode == 0 and f"warning: m: {note}" in result.stderr, result.stderr
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())["tensors"]
    assert manifest["model.layers.0.mlp.down_proj.weight"]["strategy"] == "identity"
    assert manifest["model.layers.1.mlp.down_proj.weight"]["strategy"] == "mlp_joint"
    assert json.loads((tmp_path / "o" / "report.json").read_text())["summary"]["notes"] == [note]
    assert f"- warning: {note}" in (tmp_path / "o" / "report.md").read_text()
    again = run_cli(*args, "--json")  # up to date, from cron: the warning is still in its line
    assert again.returncode == 0 and json.loads(again.stdout)["models"][0]["warnings"] == [note], again.stdout


@pytest.mark.parametrize("type_name", ["q8_0", "q4_k", "q8_k"])
def test_the_searchs_errors_are_the_same_measured_a_few_rows_at_a_time(monkeypatch, type_name):
    # the sampled errors are measured in chunks of rows, to bound their temporaries: each row is
    # quantized on its own, so the chunk size must change no value the search compares
    from qstrat.strategies import search

    rng = np.random.default_rng(2)
    readers = {f"m{i}": search.Reader((rng.standard_normal((rows, 512)) * rng.uniform(0.5, 3, 512)).astype(np.float32), type_name)
               for i, rows in enumerate((40, 300, 7))}
    order = rng.permutation(512)
    whole = search.SampledErrors(readers, 64, np.random.default_rng(0), frozenset({"m1"}))
    expected = whole.reset(order), [b.block_errors.copy() for b in whole.batches]
    monkeypatch.setattr(search, "_CHUNK_VALUES", 3 * 512)  # three rows at a time
    chunked = search.SampledErrors(readers, 64, np.random.default_rng(0), frozenset({"m1"}))
    assert chunked.reset(order) == expected[0]
    assert all(np.array_equal(b.block_errors, e) for b, e in zip(chunked.batches, expected[1]))
    assert chunked.batches[0].rows.shape[0] == 40 + 300 + 7 and whole.batches[0].rows.shape == chunked.batches[0].rows.shape
