"""Function-preserving permutations by block type: what they gain in weight SQNR, tensor by tensor.

    python scripts/permutation_table.py                 # prints the tables, writes docs/permutations.md
    python scripts/permutation_table.py --budget 100    # a shorter search
    python scripts/permutation_table.py --sections own  # only the per-reader bound (about 13 minutes)

For each model (the example model, a synthetic Llama whose residual stream has outlier channels shared
by every layer, what one plain sort would do to it and what each reader's own order would,
all-MiniLM-L6-v2 with and without an importance matrix), each block type and each chain, the model is
quantized in memory and compared with the identity chain of the same type: the mean weight SQNR, its
gain, and the least gain of any tensor (never negative: no tensor may be worse than without a
permutation). MiniLM also gets the cosine of its sentence embeddings to the original's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import qstrat
from qstrat.bert import SENTENCES, embedding_agreement, sentence_embeddings, tokenize
from qstrat.io.safetensors import SafetensorsModel, map_tensor
from qstrat.kernels import column_sq_norms
from qstrat.matrix import quantize_matrix_as
from qstrat.pipelines.run import evaluate_model, quantize_model
from qstrat.reference import minilm_model_dir
from qstrat.runconfig import RunConfig
from qstrat.strategies.base import descending_order
from qstrat.strategies.residual import residual_axis
from qstrat.strategies.search import Reader, SearchSettings, search_order
from qstrat.synthetic import LlamaShape, hf_config, llama_tensors, write_model

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("q8_0", "q6_k", "q4_k", "q4_0", "q8_k")
#: residual hidden size 1024 (4 K-quant super-blocks per row), 8 outlier channels shared by every layer
OUTLIER_SHAPE = LlamaShape(vocab_size=512, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2)
#: one layer of a 7B model's shapes (Llama-2-7B's vocabulary, hidden and MLP sizes; 8 KV heads), normal
#: weights: 32 outlier channels, and 4096 columns, as many as a 7B model's residual stream
SEVEN_B_SHAPE = LlamaShape(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                           num_attention_heads=32, num_key_value_heads=8)


def chains(budget: int) -> dict[str, list[object]]:
    return {
        "identity": ["identity"],
        "mlp_joint, head_order (before)": ["mlp_joint", "head_order", "identity"],
        "residual_stream, mlp_joint, head_order (searched)": [
            {"name": "residual_stream", "budget": budget}, {"name": "mlp_joint", "budget": budget},
            {"name": "head_order", "budget": budget}, "identity"],
    }


def measure(model_dir: Path, fmt: str, chain: list[object], imatrix: Path | None = None, embeddings=None) -> dict[str, object]:
    settings = {"strategies": chain, "format": fmt, "validation": {"stages": ["weight_error"]}}
    if imatrix is not None:
        settings["imatrix"] = str(imatrix)
    config = RunConfig.build(settings, "table")
    started = time.perf_counter()
    if embeddings is None:
        result = evaluate_model(model_dir, config)
        cosine = None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = quantize_model(model_dir, config, Path(tmp) / "out")
            reference, tensors_config, ids, mask = embeddings
            cosine = embedding_agreement(reference, sentence_embeddings(qstrat.load_model(Path(tmp) / "out", original=True), tensors_config, ids, mask))[0]
    # with an imatrix, orders are chosen by the importance-weighted error: that is the SQNR compared
    # (plain SQNR for a tensor the imatrix has no entry for, such as the embeddings: it is judged so)
    def judged(metrics) -> float:
        return metrics.sqnr_db if imatrix is None or metrics.weighted_sqnr_db is None else metrics.weighted_sqnr_db

    return {"sqnr": {r.name: judged(r.metrics) for r in result.quantized}, "cosine": cosine,
            "order": (result.residual or {}).get("order"), "seconds": time.perf_counter() - started}


def table(label: str, model_dir: Path, budget: int, imatrix: Path | None = None, embeddings=None) -> list[str]:
    lines = [f"### {label}", "",
             f"| type | chain | mean {'importance-weighted ' if imatrix else ''}SQNR (dB) | gain | least gain of a tensor | residual order | "
             + ("embedding cosine | " if embeddings else "") + "seconds |",
             "| --- | --- | --- | --- | --- | --- | " + ("--- | " if embeddings else "") + "--- |"]
    for fmt in FORMATS:
        base = None
        for name, chain in chains(budget).items():
            row = measure(model_dir, fmt, chain, imatrix, embeddings)
            base = base or row
            finite = [n for n in row["sqnr"] if np.isfinite(row["sqnr"][n]) and np.isfinite(base["sqnr"][n])]
            mean = float(np.mean([row["sqnr"][n] for n in finite]))
            gain = mean - float(np.mean([base["sqnr"][n] for n in finite]))
            # rounded before printing: an unchanged tensor differs by ~1e-14 (float sums), not a loss
            least = round(min(row["sqnr"][n] - base["sqnr"][n] for n in finite), 3) + 0.0
            cells = [fmt, name, f"{mean:.2f}", f"{gain:+.2f}", f"{least:+.3f}", row["order"] or "—"]
            if embeddings:
                cells.append(f"{row['cosine']:.6f}")
            cells.append(f"{row['seconds']:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines + [""]


def sort_ceiling(label: str, tensors: dict[str, np.ndarray]) -> list[str]:
    """What one global descending-energy order of the hidden dimension does to each reader, with
    no rule against losses: the most a plain sort offers on this model."""
    readers = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in sorted(tensors.items()) if a.ndim == 2 and residual_axis(n) == 1}
    width = next(iter(readers.values())).shape[1]
    energy = np.zeros(width)
    for array in readers.values():
        norms = np.zeros(width)
        column_sq_norms(array, norms)
        energy += norms / norms.sum()
    order = descending_order(energy)
    lines = [f"### {label}", "", "| type | least gain of a reader (dB) | most gain of a reader (dB) | mean gain over every tensor (dB) |",
             "| --- | --- | --- | --- |"]
    for fmt in FORMATS:
        def error(name: str, perm: np.ndarray | None) -> float:
            return quantize_matrix_as(readers[name], fmt, None, perm, tensor_name=name, measure="error").chosen_error

        gains = [10 * np.log10(error(n, None) / error(n, order)) for n in readers]
        matrices = sum(1 for a in tensors.values() if a.ndim == 2)  # the quantized tensors the other tables average over
        lines.append(f"| {fmt} | {min(gains):+.2f} | {max(gains):+.2f} | {sum(gains) / matrices:+.2f} |")
        print(lines[-1], flush=True)
    return lines + [""]


#: the types of the goals on the shared-outlier model (+1 dB at Q8_0, +0.3 dB at Q4_K)
GOAL_TYPES = ("q8_0", "q4_k")


def own_orders(label: str, tensors: dict[str, np.ndarray], budget: int) -> list[str]:
    """Each reader of the residual stream with an order of its own, chosen on its error alone: the
    better of its descending-energy order and searches of ``budget`` swaps (every row, no rule against
    losses) from identity and from that order.  One order shared by all readers can do no better than
    each reader's own, so this bounds (as far as such searches find) what a residual order can gain."""
    readers = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in sorted(tensors.items()) if a.ndim == 2 and residual_axis(n) == 1}
    matrices = sum(1 for a in tensors.values() if a.ndim == 2)
    lines = [f"### {label}", "", "| type | least gain of a reader (dB) | most gain of a reader (dB) | mean gain of the readers (dB) "
             "| mean gain over every tensor (dB) |", "| --- | --- | --- | --- | --- |"]
    for fmt in GOAL_TYPES:
        gains = []
        for name, array in readers.items():
            def error(perm: np.ndarray | None) -> float:
                return quantize_matrix_as(array, fmt, None, perm, tensor_name=name, measure="error").chosen_error

            energy = np.zeros(array.shape[1])
            column_sq_norms(array, energy)
            sort = descending_order(energy)
            orders = [sort] + [search_order({name: Reader(array, fmt)}, start, energy, 32, SearchSettings(budget, 0, array.shape[0]),
                                            repair="mixed")[0] for start in (np.arange(array.shape[1]), sort)]
            identity = error(None)
            gains.append(max(0.0, *(10 * np.log10(identity / error(order)) for order in orders)))
        lines.append(f"| {fmt} | {min(gains):+.2f} | {max(gains):+.2f} | {np.mean(gains):+.2f} | {sum(gains) / matrices:+.2f} |")
        print(lines[-1], flush=True)
    return lines + [""]


def minilm_imatrix(workdir: Path) -> Path:
    """An importance matrix of all-MiniLM-L6-v2 from 16 chunks of 128 tokens of the Wikipedia text gensim ships."""
    text, out = workdir / "wiki.txt", workdir / "minilm.imatrix.gguf"
    subprocess.run([sys.executable, "-m", "qstrat.corpus", str(text)], check=True)
    subprocess.run(["qstrat", "imatrix", str(minilm_model_dir()), "--text", str(text), "-o", str(out),
                    "--ctx", "128", "--chunks", "16"], check=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=200, help="swaps each search tries (default 200)")
    parser.add_argument("--own-budget", type=int, default=3000, help="swaps of each reader's own searches (section own)")
    parser.add_argument("--write", default=str(REPO / "docs" / "permutations.md"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"which tables to (re)make: {', '.join(SECTIONS)}")
    args = parser.parse_args()
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    made = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "example" in wanted:
            made["example"] = table(SECTIONS["example"], REPO / "examples" / "tiny-llama", args.budget)
        if "outliers" in wanted:
            outliers = write_model(workdir / "outliers", llama_tensors(OUTLIER_SHAPE, seed=0), dtype="BF16", config=hf_config(OUTLIER_SHAPE))
            made["outliers"] = table(SECTIONS["outliers"], outliers, args.budget)
        if "sort" in wanted:
            made["sort"] = sort_ceiling(SECTIONS["sort"], llama_tensors(OUTLIER_SHAPE, seed=0))
        if "own" in wanted:
            made["own"] = own_orders(SECTIONS["own"], llama_tensors(OUTLIER_SHAPE, seed=0), args.own_budget)
        if "7b" in wanted:
            seven_b = llama_tensors(SEVEN_B_SHAPE, seed=0, gaussian=True)
            made["7b-sort"] = sort_ceiling(SECTIONS["7b-sort"], seven_b)
            model = write_model(workdir / "7b", seven_b, dtype="BF16", config=hf_config(SEVEN_B_SHAPE))
            del seven_b
            made["7b"] = table(SECTIONS["7b"], model, args.budget)
        if {"minilm", "minilm-imatrix"} & set(wanted):
            model_dir = minilm_model_dir()
            config = json.loads((model_dir / "config.json").read_text())
            source = {n: np.array(map_tensor(i)) for n, i in SafetensorsModel(model_dir).tensors.items()}
            ids, mask = tokenize(model_dir / "tokenizer.json", SENTENCES)
            embeddings = (sentence_embeddings(source, config, ids, mask), config, ids, mask)
            if "minilm" in wanted:
                made["minilm"] = table(SECTIONS["minilm"], model_dir, args.budget, embeddings=embeddings)
            if "minilm-imatrix" in wanted:
                made["minilm-imatrix"] = table(SECTIONS["minilm-imatrix"], model_dir, args.budget, minilm_imatrix(workdir), embeddings)
    target = Path(args.write)
    text = target.read_text() if target.exists() else ""
    marker, end = "<!-- permutation tables -->", "<!-- end of permutation tables -->"
    head, _, tables = text.partition(marker)
    tables, _, tail = tables.partition(end)  # what follows (the SmolLM2 table) stays
    # keep the tables not remade this time
    kept = {key: ["### " + block] for key, title in SECTIONS.items() for block in tables.split("\n### ")[1:] if block.split("\n", 1)[0] == title}
    sections = [line for key in SECTIONS for line in made.get(key) or kept.get(key, [])]
    target.write_text(head + marker + "\n\n" + "\n".join(sections).rstrip() + "\n\n" + end + tail)
    return 0


SECTIONS = {
    "example": "The example model (examples/tiny-llama)",
    "outliers": "A synthetic Llama with shared outlier channels (hidden 1024, 2 layers)",
    "sort": "The same model, one descending-energy order with no rule against losses (float32 weights)",
    "own": "The same model, each reader with an order of its own, searched on its error alone (float32 weights)",
    "7b": "The 7B-shaped layer: one layer of a 7B model's shapes, normal weights with shared outlier channels (hidden 4096, vocabulary 32000)",
    "7b-sort": "The 7B-shaped layer, one descending-energy order with no rule against losses (float32 weights)",
    "minilm": "all-MiniLM-L6-v2",
    "minilm-imatrix": "all-MiniLM-L6-v2 with an importance matrix (16 x 128 Wikipedia tokens)",
}


if __name__ == "__main__":
    sys.exit(main())
