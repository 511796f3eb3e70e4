"""Quantize a GGUF file with llama.cpp's own quantizer (``llama_model_quantize``, what
``llama-quantize`` runs), in a process of its own.

llama-cpp-python and libggml-python (the tests' oracle, loaded in-process through ctypes)
must never share a process: their ggml symbols clash.  The tests call this script with
``sys.executable``:

    python tests/llama_cpp_quantize.py '[{"in": "IN.gguf", "out": "OUT.gguf", "ftype": 15}, ...]'

Each job is one call of ``llama_model_quantize`` on its input with llama.cpp's default
parameters (``llama_model_quantize_default_params``: no importance matrix, output tensor
quantized, no requantization), one thread (or the job's ``"nthread"``), ``ftype`` (a ``LLAMA_FTYPE`` value,
``gguf.LlamaFileType``) and, if the job says ``"pure": true``, ``params.pure`` (every
tensor the file type's default type, the row-length fallback aside), if it says
``"requantize": true``, ``params.allow_requantize`` (a quantized input: llama.cpp copies each
tensor already in the type it chooses and requantizes the others' decoded values) and, if the job names an
``"imatrix"`` (a GGUF imatrix file), the importance data llama-quantize's ``load_imatrix`` makes
of it (float32 ``in_sum2 / counts``, read here with gguf-py).  Jobs run in order;
each output is written under a temporary name and renamed to ``out`` when it is complete,
so a caller may wait for one file while the later ones are made.  A failed job stops the
script with exit code 1 (llama.cpp's log, on stderr, says why).  The last line on stdout
is a JSON list of the outputs written.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys


def importance_data(path: str, llama_cpp):
    """``params.imatrix`` for a GGUF imatrix file: a NULL-terminated array of
    ``llama_model_imatrix_data``, and the buffers it points into (keep them alive)."""
    import numpy as np
    from gguf import GGUFReader

    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in GGUFReader(path).tensors}
    names = sorted(n[: -len(".in_sum2")] for n in tensors if n.endswith(".in_sum2"))
    buffers = []
    for name in names:
        sums, counts = tensors[f"{name}.in_sum2"], np.rint(tensors[f"{name}.counts"])
        per_matrix = sums.size // counts.size
        parts = [sums[j * per_matrix:(j + 1) * per_matrix] / np.float32(c) if c > 0 else np.ones(per_matrix, np.float32)
                 for j, c in enumerate(counts)]
        buffers.append(np.ascontiguousarray(np.concatenate(parts), dtype=np.float32))
    array = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    encoded = [name.encode() for name in names]
    for entry, name, values in zip(array, encoded, buffers):
        entry.name = name
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = values.size
    array[len(names)].name = None
    return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), (array, encoded, buffers)


def main() -> None:
    jobs = json.loads(sys.argv[1])
    import llama_cpp

    llama_cpp.llama_backend_init()
    written = []
    for job in jobs:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(job["ftype"])
        params.nthread = int(job.get("nthread", 1))
        params.pure = bool(job.get("pure", False))
        params.allow_requantize = bool(job.get("requantize", False))
        if job.get("imatrix"):
            params.imatrix, kept = importance_data(job["imatrix"], llama_cpp)
        in_path, out = job["in"], job["out"]
        partial = f"{out}.part"
        status = llama_cpp.llama_model_quantize(in_path.encode(), partial.encode(), ctypes.byref(params))
        if status != 0:
            print(f"llama_model_quantize({in_path}, ftype {job['ftype']}, pure {params.pure}) returned {status}", file=sys.stderr)
            sys.exit(1)
        os.replace(partial, out)
        written.append(out)
    print(json.dumps(written))


if __name__ == "__main__":
    main()
