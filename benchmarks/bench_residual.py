"""Time residual_stream's choice on 7B shapes, and how it grows with the search budget.

    python benchmarks/bench_residual.py                      # Q8_0, budgets 0, 100, 300
    python benchmarks/bench_residual.py --layers 4 --type q4_k --budgets 0,50

The readers of a Llama-2-7B residual stream, synthetic (bf16, a shared scale per column with
outlier channels, as qstrat.synthetic draws them): per layer q, k, v (4096 x 4096) and gate, up
(11008 x 4096), plus the token embeddings and the output head (32000 x 4096).  The choice is what
a run does before its groups: every candidate order measured on every row of every reader in the
target type, then the search on sampled rows, then its result judged on every row.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from qstrat.formats import block_type
from qstrat.matrix import quantize_matrix_as
from qstrat.strategies.residual import ResidualStreamStrategy
from qstrat.strategies.search import Reader, scale_group
from qstrat.synthetic import float32_to_bf16_bits

HIDDEN, INTERMEDIATE, VOCAB = 4096, 11008, 32000


def readers(layers: int, type_name: str, seed: int = 0) -> dict[str, Reader]:
    rng = np.random.default_rng(seed)
    scale = np.exp(0.5 * rng.standard_normal(HIDDEN)).astype(np.float32)
    scale[rng.choice(HIDDEN, HIDDEN // 128, replace=False)] *= 12.0  # outlier channels every layer shares

    def matrix(rows: int, shared: bool) -> np.ndarray:
        values = rng.standard_normal((rows, HIDDEN), dtype=np.float32) * (scale if shared else 1.0) * np.float32(0.02)
        bits = float32_to_bf16_bits(values)
        bits.flags.writeable = False
        return bits

    out = {"token_embd": Reader(matrix(VOCAB, False), type_name), "output": Reader(matrix(VOCAB, False), type_name)}
    for layer in range(layers):
        for role, rows in (("attn_q", HIDDEN), ("attn_k", HIDDEN), ("attn_v", HIDDEN), ("ffn_gate", INTERMEDIATE), ("ffn_up", INTERMEDIATE)):
            out[f"blk.{layer}.{role}"] = Reader(matrix(rows, True), type_name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--type", default="q8_0")
    parser.add_argument("--budgets", default="0,100,300")
    args = parser.parse_args()
    started = time.perf_counter()
    matrices = readers(args.layers, args.type)
    values = sum(r.array.size for r in matrices.values())
    print(f"{len(matrices)} readers, {values / 1e9:.2f} G values ({2 * values / 1e9:.1f} GB bf16), drawn in "
          f"{time.perf_counter() - started:.0f} s; {os.cpu_count()} cores\n")

    def error(name: str, storage: np.ndarray, col_perm: np.ndarray | None) -> float:
        return quantize_matrix_as(storage, args.type, None, col_perm, tensor_name=name, measure="error").chosen_error

    print("| budget (swaps) | seconds | order | readers | mean gain (dB) |\n| --- | --- | --- | --- | --- |")
    group = scale_group([args.type])
    for budget in (int(b) for b in args.budgets.split(",")):
        strategy = ResidualStreamStrategy(budget=budget)
        start = time.perf_counter()
        choice = strategy.choose(matrices, error, block=block_type(args.type).block_size, scale_group=group)
        seconds = time.perf_counter() - start
        gains = [g for n in choice.identity_errors if (g := choice.gain_db(n)) is not None]
        print(f"| {budget} | {seconds:.1f} | {choice.candidate} | {len(matrices)} | {np.mean(gains):+.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
