"""Accuracy on a real model shipped by a PyPI package: all-MiniLM-L6-v2 (F32 BERT)."""

import importlib.util
import json

import numpy as np

from qstrat.bert import SENTENCES, sentence_embeddings, tokenize
from qstrat.io.safetensors import SafetensorsModel, map_tensor
from qstrat.reference import minilm_model_dir
from tests.conftest import REPO


def _script():
    spec = importlib.util.spec_from_file_location("minilm_accuracy", REPO / "scripts" / "minilm_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_numpy_forward_pass_is_the_real_model():
    # related sentences score high, unrelated ones low: the forward pass and tokenizer are right
    model_dir = minilm_model_dir()
    tensors = {n: np.array(map_tensor(i)) for n, i in SafetensorsModel(model_dir).tensors.items()}
    config = json.loads((model_dir / "config.json").read_text())
    ids, mask = tokenize(model_dir / "tokenizer.json", SENTENCES)
    e = sentence_embeddings(tensors, config, ids, mask)
    assert e[0] @ e[1] > 0.7  # eating food / eating bread
    assert e[3] @ e[6] > 0.6  # riding a horse / riding a white horse
    assert abs(e[0] @ e[10]) < 0.2  # eating / photosynthesis


def test_quantized_embeddings_agree_with_the_original():
    chains = {"identity": ["identity"], "l2_norm": ["l2_norm"], "function_preserving": ["mlp_joint", "head_order", "identity"]}
    rows = _script().measure(("q8_k",), chains) + _script().measure(("q8_0", "q4_k"), {"identity": ["identity"]})
    by = {(r["format"], r["chain"]): r for r in rows}
    for chain in chains:
        row = by[("q8_k", chain)]
        assert row["quantized"] == 6  # only the 384x1536 output.dense matrices have rows of a multiple of 256
        assert row["mean_cos"] > 0.9999 and row["worst_cos"] > 0.9995, row
        assert row["bits_per_weight"] == 292 * 8 / 256  # the original tool's Q8K
    assert by[("q8_k", "l2_norm")]["mean_cos"] >= by[("q8_k", "identity")]["mean_cos"]
    # every matrix in a weight type (embeddings too): 36 linear layers, the pooler and 3 embedding tables
    q8_0, q4_k = by[("q8_0", "identity")], by[("q4_k", "identity")]
    assert q8_0["quantized"] == q4_k["quantized"] == 40
    assert q8_0["types"] == ["q8_0"] and q4_k["types"] == ["q4_k", "q5_0"]  # rows of 384: llama.cpp's fallback of Q4_K
    assert q8_0["mean_cos"] > 0.9995 and 0.98 < q4_k["mean_cos"] < q8_0["mean_cos"], (q8_0, q4_k)
