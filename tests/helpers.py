"""Shared test helpers: model builders and CLI runners."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from qstrat.synthetic import LlamaShape, hf_config, llama_tensors, write_model

SMALL_SHAPE = LlamaShape(vocab_size=64, hidden_size=512, intermediate_size=768, num_hidden_layers=1)


def make_llama_dir(path: Path, dtype: str = "BF16", shards: int = 2, seed: int = 1, shape: LlamaShape = SMALL_SHAPE) -> Path:
    return write_model(path, llama_tensors(shape, seed), dtype=dtype, shards=shards, config=hf_config(shape))


def raw_safetensors(path: Path, header: object, data: bytes = b"", header_bytes: bytes | None = None) -> Path:
    """A safetensors file with an arbitrary (possibly broken) header."""
    encoded = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a console script of this package as a user would, capturing output."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLE_Q8K_")}
    full_env.update(env or {})
    script = Path(sys.executable).with_name(args[0])
    command = [str(script)] if script.exists() else [args[0]]
    process = subprocess.Popen(command + list(args[1:]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)
    stdout, stderr = communicate_or_dump_stacks(process, timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def communicate_or_dump_stacks(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``process.communicate(timeout)``; if the process hangs instead, fail with the stacks of
    its threads: conftest sets PYTHONFAULTHANDLER, so SIGABRT makes Python print them."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate()
        raise AssertionError(f"{process.args} still running after {timeout} s; its threads:\n{stderr[-20000:]}") from None


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
