"""A Hugging Face bf16 Llama directory to a Q4_K_M GGUF: ``qstrat run`` against llama.cpp's own route
(its ``convert_hf_to_gguf.py``, then ``llama_model_quantize``), timed side by side on one machine, and
the two files' tensors compared byte for byte.

    # llama.cpp's converter needs torch and transformers: a virtual environment of its own
    python -m venv /tmp/venv-conv && /tmp/venv-conv/bin/pip install torch==2.13.0 transformers sentencepiece numpy protobuf
    # llama.cpp's sources, as the installed llama-cpp-python vendors them
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/llama-sdist && tar xzf /tmp/llama-sdist/*.tar.gz -C /tmp/llama-sdist
    python benchmarks/bench_convert.py --llama-cpp /tmp/llama-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --converter-python /tmp/venv-conv/bin/python [--layers 6]

The converter writes BF16 (``--outtype bf16``): bf16 to float32 is exact, so llama-quantize quantizes the
very values qstrat does (from F16 they would be rounded first, and the bytes would differ).  Both sides
use every core; qstrat runs as a user runs it (``qstrat run``, validation off to match llama.cpp's route,
which checks nothing).  The model: synthetic weights (``qstrat.synthetic``) of a Llama with a
SentencePiece vocabulary (llama.cpp's converter refuses BPE pre-tokenizers it does not know).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qstrat.synthetic import LlamaShape, hf_config, llama_tensors, write_model  # noqa: E402
from tests.helpers import make_sentencepiece_tokenizer  # noqa: E402
from tests.test_llama_quantize import assert_same_tensors  # noqa: E402

QUANTIZE = REPO / "tests" / "llama_cpp_quantize.py"
Q4_K_M = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def timed(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{result.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp's source tree (convert_hf_to_gguf.py, gguf-py)")
    parser.add_argument("--converter-python", type=Path, required=True, help="a Python with torch and transformers")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    shape = LlamaShape(vocab_size=512, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                       num_attention_heads=16, num_key_value_heads=4)
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        root = Path(tmp)
        model = write_model(root / "model", llama_tensors(shape, seed=1), dtype="BF16", shards=2, config=hf_config(shape))
        make_sentencepiece_tokenizer(model, shape.vocab_size)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        config = root / "q4_k_m.yaml"
        config.write_text(f"input: {model}\noutput: {root / 'qstrat'}\npreset: q4_k_m\nvalidation: {{enabled: false}}\n")
        qstrat = str(Path(sys.executable).with_name("qstrat"))
        llama_times, qstrat_times = [], []
        for _ in range(args.repeats):
            bf16, quantized = root / "model-bf16.gguf", root / "llama-q4_k_m.gguf"
            convert = timed([str(args.converter_python), str(args.llama_cpp / "convert_hf_to_gguf.py"), str(model),
                             "--outtype", "bf16", "--outfile", str(bf16)])
            job = [{"in": str(bf16), "out": str(quantized), "ftype": Q4_K_M, "nthread": cores}]
            quantize = timed([sys.executable, str(QUANTIZE), json.dumps(job)])
            llama_times.append((convert, quantize))
            qstrat_times.append(timed([qstrat, "run", str(config), "--force", "--quiet"]))
            ours = root / "qstrat" / "model.gguf"
            assert_same_tensors(ours, quantized, "qstrat against llama.cpp's route")
            bf16.unlink()
    convert, quantize = (statistics.median(t[i] for t in llama_times) for i in (0, 1))
    ours = statistics.median(qstrat_times)
    print(f"{size / 1e9:.2f} GB bf16 Llama ({args.layers} layers, hidden 2048), {cores} cores, median of {args.repeats}; "
          "the two Q4_K_M files hold the same tensors, types and bytes")
    print("| route | seconds | ratio |")
    print("| --- | --- | --- |")
    print(f"| llama.cpp: convert_hf_to_gguf.py --outtype bf16 ({convert:.2f} s), then llama_model_quantize Q4_K_M ({quantize:.2f} s) | "
          f"{convert + quantize:.2f} | 1.00x |")
    print(f"| qstrat run (preset: q4_k_m, validation off) | {ours:.2f} | {(convert + quantize) / ours:.2f}x |")


if __name__ == "__main__":
    main()
