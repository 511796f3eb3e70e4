"""qstrat's performance table: every figure a ratio measured side by side in this run.

    python benchmarks/bench.py              # kernels + a 2 GB end-to-end run (a few minutes)
    python benchmarks/bench.py --quick      # smaller arrays, 256 MB end-to-end

Absolute GB/s are for information only (shared machines are noisy); read the ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
from qstrat.kernels import (
    BLOCK_BYTES,
    QK_K,
    column_sq_norms,
    dequantize_q8k_blocks,
    quantize_rows_q8k,
)

from qstrat.blocks import KERNEL_STORAGE
from qstrat.reference import ggml_quantize_q8k
from qstrat.synthetic import float32_to_bf16_bits, write_model

CORES = len(os.sched_getaffinity(0))


def timed(fn, repeats=5) -> float:
    fn()  # warm-up (JIT, page faults)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def row(label, seconds, reference_seconds, nbytes, note=""):
    gbs = nbytes / seconds / 1e9
    print(f"| {label} | {gbs:7.2f} GB/s | {reference_seconds / seconds:6.2f}x | {note} |", flush=True)


def kernels(values: int) -> None:
    rows, k = values // 4096, 4096
    x = np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)
    out = np.empty((rows * k // QK_K, BLOCK_BYTES), np.uint8)
    dst = np.empty_like(x)
    print(f"\n### Kernels ({x.nbytes / 1e6:.0f} MB of float32, {CORES} cores)\n")
    print("| kernel | throughput (f32 input) | ratio | against |\n| --- | --- | --- | --- |")
    for threads in (1, CORES):
        numba.set_num_threads(threads)
        copy = timed(lambda: np.copyto(dst, x))
        quant = timed(lambda: quantize_rows_q8k(x, None, None, 0, out))
        row(f"quantize, {threads} thread(s)", quant, copy, x.nbytes, "np.copyto into a preallocated array (target >= 0.7)")
    numba.set_num_threads(1)
    sub = x[: max(1, rows // 8)]
    sub_out = out[: sub.shape[0] * k // QK_K]
    ggml = timed(lambda: ggml_quantize_q8k(sub), 3)
    ours = timed(lambda: quantize_rows_q8k(sub, None, None, 2, sub_out), 3)
    row("quantize (ggml variant), 1 thread", ours, ggml, sub.nbytes, "GGML quantize_row_q8_K_ref via ctypes, 1 thread (target >= 1)")
    numba.set_num_threads(CORES)
    chunks = np.array_split(sub, CORES)
    with ThreadPoolExecutor(CORES) as pool:
        ggml_all = timed(lambda: list(pool.map(ggml_quantize_q8k, chunks)), 3)
    ours_all = timed(lambda: quantize_rows_q8k(sub, None, None, 2, sub_out), 3)
    row(f"quantize (ggml variant), {CORES} threads", ours_all, ggml_all, sub.nbytes, f"GGML reference on {CORES} threads")
    try:
        import gguf

        small = x[: max(1, rows // 64)]
        q8_0 = timed(lambda: gguf.quants.quantize(small, gguf.GGMLQuantizationType.Q8_0), 3)
        ours_small = timed(lambda: quantize_rows_q8k(small, None, None, 0, out[: small.shape[0] * k // QK_K]), 3)
        row("quantize vs numpy Q8_0", ours_small, q8_0, small.nbytes, "gguf.quants Q8_0 (pure numpy; it has no Q8_K) (target >= 10)")
    except ImportError:
        print("| quantize vs numpy Q8_0 | — | — | gguf not installed |")
    f32_time = timed(lambda: quantize_rows_q8k(x, None, None, 0, out))
    bf16 = float32_to_bf16_bits(x)
    f16 = x.astype(np.float16).view(KERNEL_STORAGE["F16"])
    bf16_time = timed(lambda: quantize_rows_q8k(bf16, None, None, 0, out))
    f16_time = timed(lambda: quantize_rows_q8k(f16, None, None, 0, out))
    print(f"| quantize bf16 input | per element | {f32_time / bf16_time:6.2f}x | float32 input (target >= 1) |")
    print(f"| quantize f16 input | per element | {f32_time / f16_time:6.2f}x | float32 input (target >= 1) |")
    deq = np.empty((out.shape[0], QK_K), np.float32)
    copy = timed(lambda: np.copyto(dst, x))
    row("dequantize", timed(lambda: dequantize_q8k_blocks(out, deq)), copy, x.nbytes, "np.copyto (target >= 0.7)")
    norms = np.zeros(k)
    row("column L2 norms", timed(lambda: column_sq_norms(x, norms)), copy, x.nbytes, "np.copyto")
    perm = np.random.default_rng(1).permutation(k).astype(np.int64)
    row("quantize with fused column gather", timed(lambda: quantize_rows_q8k(x, None, perm, 0, out)), f32_time, x.nbytes,
        "quantize without permutation")


def end_to_end(size_gb: float, workdir: Path) -> None:
    model = workdir / "model"
    rows, k = 4096, 4096
    count = max(1, int(size_gb * 1e9 / (rows * k * 2)))
    rng = np.random.default_rng(0)
    base = rng.standard_normal((rows, k)).astype(np.float32)
    tensors = {f"model.layers.{i}.mlp.proj.weight": base * (1 + 0.01 * i) for i in range(count)}
    write_model(model, tensors, dtype="BF16", shards=max(1, count // 8))
    del tensors
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"\n### End to end ({size / 1e9:.2f} GB of bf16, {count} tensors of 4096x4096)\n")
    print("| run | seconds | throughput | ratio to cp | tensors/s | peak RSS / largest tensor |\n| --- | --- | --- | --- | --- | --- |")
    qstrat_bin = Path(sys.executable).with_name("qstrat")
    config = workdir / "c.yaml"

    def run(command):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    cp_seconds = min(run(["cp", "-r", str(model), str(workdir / f"copy{i}")]) for i in range(2))
    print(f"| cp -r | {cp_seconds:.2f} | {size / cp_seconds / 1e9:.2f} GB/s | 1.00x | — | — |")
    for workers in (1, 2):
        config.write_text(f"input: {model}\noutput: {workdir}/out-{workers}\nparallel: {{workers: {workers}}}\n")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        seconds = run([str(qstrat_bin), "run", str(config), "-q"])
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        note = f"{peak / (rows * k * 2):.1f}x" if peak > before * 1024 else "(below an earlier child's peak)"
        print(f"| qstrat run, validation on, {workers} worker(s) | {seconds:.2f} | {size / seconds / 1e9:.2f} GB/s | "
              f"{cp_seconds / seconds:.2f}x | {count / seconds:.1f} | {note} |", flush=True)
        shutil.rmtree(workdir / f"out-{workers}")


def jit_cost(workdir: Path) -> None:
    code = "import numpy as np, qstrat; qstrat.quantize_blocks(np.ones((1, 256), np.float32))"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(workdir / "numba-cache"))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        times.append(time.perf_counter() - start)
    print(f"\n### JIT\n\nfirst process (compiles): {times[0]:.2f} s; second process (numba cache): {times[1]:.2f} s "
          f"({times[0] / times[1]:.1f}x faster start)\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size-gb", type=float, default=None)
    args = parser.parse_args()
    kernels(16 * 1024 * 1024 if args.quick else 64 * 1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="qstrat-bench-", dir=os.environ.get("QSTRAT_BENCH_DIR")) as tmp:
        jit_cost(Path(tmp))
        end_to_end(args.size_gb or (0.25 if args.quick else 2.0), Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
