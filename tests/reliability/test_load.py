"""Load: many tensors and many models run to completion with bounded memory and no descriptor leak."""

import json
import os
import subprocess
import sys

import numpy as np

import qstrat
from qstrat.synthetic import LlamaShape, write_model
from tests.helpers import make_llama_dir, run_cli


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_model_with_5000_tensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"blocks.{i}.proj.weight": rng.standard_normal((2, 256)).astype(np.float32) for i in range(5000)}
    tensors.update({f"blocks.{i}.norm.weight": rng.standard_normal(256).astype(np.float32) for i in range(500)})
    model = write_model(tmp_path / "m", tensors, dtype="F32", shards=4)
    before = _open_descriptors()
    result = qstrat.quantize_safetensors(model, qstrat.QuantizationConfig(strategies=["l2_norm"], output_dir=tmp_path / "o", validation=False))
    assert result.tensor_count == 5000 and result.skipped_count == 500
    assert _open_descriptors() <= before + 2  # joblib may keep a pipe or two; one per tensor would be thousands
    # peak memory of a fresh process doing the same: bounded, not proportional to the tensor count
    # The child (one worker: it does the work itself) reports its own peak, VmHWM.  Not this
    # process's RUSAGE_CHILDREN: it counts every child earlier tests ran, and Linux carries the
    # forked copy of this (large) process into a child's ru_maxrss across exec.
    code = (
        "import qstrat, re; qstrat.quantize_safetensors(%r, qstrat.QuantizationConfig(strategies=['l2_norm'], "
        "output_dir=%r, validation=False)); "
        "print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))"
        % (str(model), str(tmp_path / "o2"))
    )
    child = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    peak_mb = int(child.stdout.split()[-1]) / 1024
    assert peak_mb < 700, peak_mb
    assert run_cli("qstrat", "verify", str(tmp_path / "o")).returncode == 0


def test_batch_of_50_models(tmp_path):
    shape = LlamaShape(vocab_size=32, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    first = make_llama_dir(tmp_path / "models" / "m00", shards=1, shape=shape)
    for i in range(1, 50):
        target = tmp_path / "models" / f"m{i:02d}"
        target.mkdir()
        for f in first.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
    config = tmp_path / "batch.yaml"
    config.write_text(f"input: ['{tmp_path}/models/*']\noutput: {tmp_path}/out/{{model}}\nstrategies: [attention_aware, l2_norm]\n")
    result = run_cli("qstrat", "run", str(config), "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(summary["models"]) == 50 and {m["status"] for m in summary["models"]} == {"ok"}
