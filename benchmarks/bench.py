"""qstrat's performance table: every figure a ratio measured side by side in this run.

    python benchmarks/bench.py              # kernels, 2 GB and 8 GB end-to-end runs, 1 GB / 4 GB memory runs (~12 min)
    python benchmarks/bench.py --quick      # smaller arrays and models (~1 min)
    python benchmarks/bench.py --ggml-types # only the GGUF block types against GGML, 1 thread

Absolute GB/s are for information only (shared machines are noisy); read the ratios.
"""

from __future__ import annotations

import argparse
import os

# as the qstrat commands do: otherwise numba's OpenMP threads spin between calls and, on a busy
# machine, each small parallel call waits for cores they hold (many times slower)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
    measure_columns,
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


def alternated(first, second, repeats, runs_per_turn=1) -> tuple[float, float]:
    """The best time of each of two commands run in turn ``repeats`` times (after a warm-up),
    each ``runs_per_turn`` times in a row per turn."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, samples in zip((first, second), times):
            for _ in range(runs_per_turn):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


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
    perm = np.random.default_rng(1).permutation(k).astype(np.uint32)
    row("quantize with fused column gather", timed(lambda: quantize_rows_q8k(x, None, perm, 0, out)), f32_time, x.nbytes,
        "quantize without permutation")
    probes = np.ones((2, k), np.float32)
    measures = np.zeros((x.shape[0], measure_columns(2)))
    row("quantize + weight error + 2 probe products (one pass)",
        timed(lambda: quantize_rows_q8k(x, None, None, 0, out, probes, measures)), f32_time, x.nbytes, "quantize alone")


def ggml_types(values: int) -> None:
    """Per GGUF block type: qstrat's kernel on one thread against ggml_quantize_chunk (single-
    threaded by design) on the same float32 matrix, plain and with an importance vector."""
    from qstrat.formats import FORMATS
    from qstrat.reference import ggml_quantize_chunk

    rows, k = max(1, values // 4096), 4096
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((rows, k)) * 0.02).astype(np.float32)
    imatrix = rng.uniform(0.0, 3.0, k).astype(np.float32)
    print(f"\n### GGUF block types against GGML ({x.nbytes / 1e6:.0f} MB of float32, 1 thread each)\n")
    print("| type | importance vector | qstrat | GGML | ratio (target >= 1) |\n| --- | --- | --- | --- | --- |")
    numba.set_num_threads(1)
    for name, entry in FORMATS.items():
        if name == "q8_k":  # ggml_quantize_chunk has no Q8_K: see the kernels section
            continue
        for weights in (None, imatrix) if entry.uses_imatrix else (None,):
            ours, ggml = alternated(lambda: entry.quantize_rows(x, weights), lambda: ggml_quantize_chunk(int(entry.ggml_type), x, weights), 3)
            print(f"| {name} | {'yes' if weights is not None else 'no'} | {x.nbytes / ours / 1e9:6.3f} GB/s "
                  f"| {x.nbytes / ggml / 1e9:6.3f} GB/s | {ggml / ours:5.2f}x |", flush=True)
    numba.set_num_threads(CORES)
    ggml_types_all_cores(x)


def ggml_types_all_cores(x: np.ndarray) -> None:
    """The public API on every core: Q8_0 against a copy, each type against gguf-py's numpy
    quantizer where it has one, and bfloat16 input against float32 per element."""
    import gguf

    from qstrat.formats import FORMATS, quantize

    print(f"\n### GGUF block types through `qstrat.quantize`, {CORES} threads\n")
    print("| measurement | throughput | ratio | against (target) |\n| --- | --- | --- | --- |")
    dst = np.empty_like(x)
    # every ratio here alternates the two sides, best of each: on a shared machine a neighbour's
    # load moved a median timed one side after the other by up to 30 %
    ours, copy = alternated(lambda: quantize(x, "q8_0"), lambda: np.copyto(dst, x), 7)
    row("q8_0", ours, copy, x.nbytes, "np.copyto into a preallocated array (>= 0.7)")
    ours, copy = alternated(lambda: FORMATS["q8_0"].quantize_rows(x, None), lambda: np.copyto(dst, x), 7)
    row("q8_0, the kernel alone (no input check)", ours, copy, x.nbytes, "np.copyto")
    # the whole matrix (a 4096 x 4096 tensor in the full run): gguf-py is slow, not unbearably
    for name, entry in FORMATS.items():
        if entry.name == "f32":
            continue  # gguf-py's F32 "quantizer" returns its input: nothing to compare
        try:
            gguf.quants.quantize(x[:1], entry.ggml_type)
        except NotImplementedError:
            continue  # gguf-py has no quantizer for this type
        # Three calls in a row per turn, best of each side: the steady states.  On the 2-core VM our
        # 4 ms call right after gguf-py's 80 ms on one core ran at 12 GB/s, after our own at 17
        # (no page faults either way; after 0.1 s idle, 9 GB/s, climbing back over five calls)
        ours, reference = alternated(lambda: quantize(x, name), lambda: gguf.quants.quantize(x, entry.ggml_type), 5, 3)
        target = "(>= 20)" if entry.block_size > 1 else "(a numpy cast: no target)"
        row(f"{name}, against gguf-py", ours, reference, x.nbytes, f"gguf.quants.quantize, numpy {target}")
    # a run checks each type's float16 fields after quantizing (values too large for them): its cost
    # beside the quantizer's own time on the same matrix
    for name in ("f16", "q8_0", "q4_k"):
        entry = FORMATS[name]
        blocks = entry.quantize_rows(x, None)
        quantizing, checking = alternated(lambda: entry.quantize_rows(x, None), lambda: entry.overflows(blocks), 5)
        print(f"| {name}, float16 overflow check | {checking / quantizing * 100:6.1f} % | of its quantizing time "
              f"({quantizing * 1e3:.0f} ms) | a run's check after quantizing |", flush=True)
    bits = float32_to_bf16_bits(x)
    bf16 = bits.view(KERNEL_STORAGE["BF16"])  # as a run reads it
    # the same values as float32: the K-quants' searches take a time that depends on the values
    same_values = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    for name in ("q8_0", "q4_0", "q4_k", "q6_k"):
        entry = FORMATS[name]
        # alternated, best of five each: the neighbours' load moves a single timing by up to 40 %
        f32_time, bf16_time = alternated(lambda: entry.quantize_rows(same_values, None), lambda: entry.quantize_rows(bf16, None), 5)
        print(f"| {name}, bf16 input | per element | {f32_time / bf16_time:6.2f}x | float32 input holding the same values (>= 1) |", flush=True)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 once it is gone)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, StopIteration, ValueError):
            continue
    return total


def run_measured(command: list[str]) -> tuple[float, int]:
    """Wall seconds and the peak resident memory of the whole process tree (sampled every 10 ms)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{command} failed with exit code {process.returncode}")
    return seconds, peak


def make_model(directory: Path, size_gb: float, rows: int, k: int) -> tuple[int, int]:
    """A bf16 model directory of about ``size_gb`` of (rows, k) tensors; returns (bytes, tensor count)."""
    count = max(1, round(size_gb * 1e9 / (rows * k * 2)))
    base = np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)
    tensors = {f"model.layers.{i}.mlp.proj.weight": base * np.float32(1 + 0.01 * i) for i in range(count)}
    write_model(directory, tensors, dtype="BF16", shards=max(1, count // 8))
    subprocess.run(["sync"], check=True)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")), count


QSTRAT = str(Path(sys.executable).with_name("qstrat"))


def qstrat_run(workdir: Path, model: Path, workers: int) -> tuple[float, int]:
    """One ``qstrat run`` with the default config (identity; every validation stage) and its output made durable."""
    config = workdir / "run.yaml"
    out = workdir / "out"
    config.write_text(f"input: {model}\noutput: {out}\nparallel: {{workers: {workers}}}\n")
    try:
        return run_measured([QSTRAT, "run", str(config), "-q"])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def copy_seconds(workdir: Path, model: Path, then_sync: bool) -> float:
    target = workdir / "copy"
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(model), str(target)], check=True)
    if then_sync:
        subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    subprocess.run(["sync"], check=True)
    return seconds


def end_to_end(size_gb: float, workdir: Path) -> None:
    print("\n### End to end: `qstrat run` (identity, validation on: every stage) against `cp -r`\n")
    print("qstrat makes its outputs durable (fsync) before writing the manifest; `cp` alone leaves them in the page "
          "cache, so `cp -r; sync` is the like-for-like yardstick.")
    tiny = workdir / "model-tiny"
    make_model(tiny, 0, 4096, 4096)  # one tensor: what every run pays whatever the model
    fixed = min(qstrat_run(workdir, tiny, 1)[0] for _ in range(3))
    shutil.rmtree(tiny)
    print(f"A run's fixed cost (interpreter, imports, numba's start-up, reports), measured as a run over one "
          f"(4096, 4096) tensor: {fixed:.2f} s.\n")
    print("| model | run | seconds | GB/s | vs cp | vs cp + sync | tensors/s |\n| --- | --- | --- | --- | --- | --- | --- |")
    for rows, k, gb, worker_counts in ((4096, 4096, size_gb, (1, 2)), (4096, 14336, size_gb, (1, 2)), (4096, 4096, 4 * size_gb, (1,))):
        model = workdir / f"model-{rows}x{k}"
        size, count = make_model(model, gb, rows, k)
        label = f"{size / 1e9:.2f} GB, {count} x ({rows}, {k}) bf16"
        copy = min(copy_seconds(workdir, model, False) for _ in range(2))
        synced = min(copy_seconds(workdir, model, True) for _ in range(2))
        print(f"| {label} | cp -r | {copy:.2f} | {size / copy / 1e9:.2f} | 1.00x | — | — |")
        print(f"| {label} | cp -r; sync | {synced:.2f} | {size / synced / 1e9:.2f} | — | 1.00x | — |")
        for workers in worker_counts:
            seconds = min(qstrat_run(workdir, model, workers)[0] for _ in range(2))  # best of two, as for cp
            print(f"| {label} | qstrat, {workers} worker(s) | {seconds:.2f} | {size / seconds / 1e9:.2f} | "
                  f"{copy / seconds:.2f}x | {synced / seconds:.2f}x | {count / seconds:.1f} |", flush=True)
        shutil.rmtree(model)


def memory_bound(sizes_gb: tuple[float, ...], workdir: Path) -> None:
    rows, k = 4096, 4096
    tensor = rows * k * 2
    idle = run_measured([sys.executable, "-c", "import time, qstrat.kernels; time.sleep(0.5)"])[1]
    print(f"\n### Peak memory (all processes together) against the largest tensor ({tensor / 1e6:.0f} MB bf16)\n")
    print(f"One idle Python process with qstrat's kernels imported holds {idle / 1e6:.0f} MB.\n")
    print("| model | workers | peak RSS | peak / largest tensor | (peak - idle x processes) / largest tensor |\n"
          "| --- | --- | --- | --- | --- |")
    for gb in sizes_gb:
        model = workdir / f"model-{gb}"
        size, count = make_model(model, gb, rows, k)
        for workers in (1, 2):
            _, peak = qstrat_run(workdir, model, workers)
            processes = 1 + (workers if workers > 1 else 0)
            print(f"| {size / 1e9:.2f} GB ({count} tensors) | {workers} | {peak / 1e6:.0f} MB | {peak / tensor:.1f}x | "
                  f"{max(0, peak - idle * processes) / tensor:.1f}x |", flush=True)
        shutil.rmtree(model)


def jit_cost(workdir: Path) -> None:
    """Start-up with a cold and a warm kernel cache: one small quantization, and the README's first
    command (the example model through configs/attention_aware.yaml, as a newcomer runs it)."""
    repo = Path(__file__).resolve().parents[1]
    small = [sys.executable, "-c", "import numpy as np, qstrat; qstrat.quantize_blocks(np.ones((1, 256), np.float32))"]
    readme = [str(Path(sys.executable).with_name("qstrat")), "run", str(repo / "configs/attention_aware.yaml"), "-q"]
    print("\n### JIT: start-up with a cold and a warm kernel cache\n")
    print("| command | cold cache (compiles) | warm cache | ratio |\n| --- | --- | --- | --- |")
    for label, command in (("one small quantization", small), ("README's first command", readme)):
        env = dict(os.environ, NUMBA_CACHE_DIR=str(workdir / f"numba-cache-{len(label)}"))
        times = []
        for _ in range(2):
            out = workdir / "readme-out"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            subprocess.run(command + (["-o", str(out)] if command is readme else []), check=True, env=env)
            times.append(time.perf_counter() - start)
        print(f"| {label} | {times[0]:.1f} s | {times[1]:.1f} s | {times[0] / times[1]:.0f}x |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size-gb", type=float, default=None)
    parser.add_argument("--ggml-types", action="store_true", help="only the GGUF block types against GGML")
    parser.add_argument("--jit", action="store_true", help="only the start-up rows (cold and warm kernel cache)")
    args = parser.parse_args()
    if args.jit:
        with tempfile.TemporaryDirectory(prefix="qstrat-bench-", dir=os.environ.get("QSTRAT_BENCH_DIR")) as tmp:
            jit_cost(Path(tmp))
        return 0
    if args.ggml_types:
        ggml_types(4 * 1024 * 1024 if args.quick else 16 * 1024 * 1024)
        return 0
    kernels(16 * 1024 * 1024 if args.quick else 64 * 1024 * 1024)
    ggml_types(4 * 1024 * 1024 if args.quick else 16 * 1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="qstrat-bench-", dir=os.environ.get("QSTRAT_BENCH_DIR")) as tmp:
        jit_cost(Path(tmp))
        end_to_end(args.size_gb or (0.25 if args.quick else 2.0), Path(tmp))
        memory_bound((0.25, 1.0) if args.quick else (1.0, 4.0), Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
