"""Run a GGUF file in llama.cpp (llama-cpp-python), in a process of its own.

llama-cpp-python and libggml-python (the tests' oracle, loaded in-process through ctypes)
must never share a process: their ggml symbols clash.  The tests call this script with
``sys.executable``:

    python tests/llama_cpp_probe.py MODEL.gguf OUT.npy '{"tokens": [1, 2, 3], "text": "..."}'

It evaluates ``tokens`` and saves the logits of every position to OUT.npy (float32,
tokens x vocabulary), and prints one JSON line: the model's metadata, whether its vocabulary
adds BOS (``llama_vocab_get_add_bos``), and the token ids llama.cpp makes of ``text`` (without
BOS), if given.  With ``"chunks": [[...], [...]]`` instead of ``tokens`` it evaluates each list
from an empty context and saves their logits one after the other.

Several models in one process (llama.cpp is loaded once):

    python tests/llama_cpp_probe.py --batch '[{"model": "A.gguf", "out": "A.npy", "tokens": [...]}, ...]'

prints one JSON line: the list of answers, in order.
"""

from __future__ import annotations

import json
import sys


def probe(model_path: str, out_path: str, request: dict) -> dict[str, object]:
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    tokens = [int(t) for t in request.get("tokens", [])]
    llm = Llama(
        model_path=model_path, logits_all=True, n_ctx=int(request.get("n_ctx", 64)), n_batch=64,
        n_threads=2, n_threads_batch=2, verbose=False,
    )
    answer: dict[str, object] = {
        "metadata": dict(llm.metadata), "n_vocab": llm.n_vocab(),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab)), "bos": llm.token_bos(),
    }
    if tokens:
        llm.eval(tokens)
        np.save(out_path, np.asarray(llm.scores[: len(tokens)], dtype=np.float32))
    if "chunks" in request:
        logits = []
        for chunk in request["chunks"]:
            llm.reset()
            llm.eval([int(t) for t in chunk])
            logits.append(np.array(llm.scores[: len(chunk)], dtype=np.float32))
        np.save(out_path, np.concatenate(logits))
    if "text" in request:
        answer["tokens"] = llm.tokenize(request["text"].encode("utf-8"), add_bos=False, special=False)
        answer["detokenized"] = llm.detokenize(answer["tokens"]).decode("utf-8", "replace")
    llm.close()
    return answer


def main() -> None:
    if sys.argv[1] == "--batch":
        print(json.dumps([probe(r["model"], r["out"], r) for r in json.loads(sys.argv[2])]))
    else:
        print(json.dumps(probe(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))))


if __name__ == "__main__":
    main()
