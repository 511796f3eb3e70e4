"""Faults between and during runs: damaged outputs are repaired, a full disk is a clear error."""

import subprocess
import uuid

import pytest

from tests.conftest import REPO
from tests.helpers import assert_clean_failure, make_llama_dir, run_cli

CONFIG = REPO / "configs" / "attention_aware.yaml"


def test_rerun_repairs_deleted_and_corrupted_files(tmp_path):
    out = tmp_path / "o"
    assert run_cli("qstrat", "run", str(CONFIG), "-o", str(out), "-q").returncode == 0
    reference = {p.name: p.read_bytes() for p in out.glob("*.q8k")}
    (out / "model.layers.0.mlp.up_proj.weight.q8k").unlink()
    damaged = out / "model.layers.1.self_attn.q_proj.weight.q8k"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    failed = run_cli("qstrat", "verify", str(out))
    assert_clean_failure(failed, "up_proj.weight.q8k", "q_proj.weight.q8k")
    assert run_cli("qstrat", "run", str(CONFIG), "-o", str(out), "-q").returncode == 0
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.q8k")} == reference


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_is_a_clear_error_and_nothing_looks_complete(tmp_path, small_disk):
    model = make_llama_dir(tmp_path / "m", shards=1)  # about 3.5 MB of output: more than the 2 MB disk
    out = small_disk / "o"
    result = run_cli("quantize_q8k", str(model), str(out))
    assert_clean_failure(result, "no space left on the device")
    assert result.returncode == 3
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".*.tmp-*"))
    assert run_cli("qstrat", "verify", str(out)).returncode != 0


def test_read_only_output(tmp_path, small_disk):
    model = make_llama_dir(tmp_path / "m", shards=1)
    (small_disk / "o").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = run_cli("quantize_q8k", str(model), str(small_disk / "o"))
    assert_clean_failure(result, str(small_disk / "o"))
    assert result.returncode == 3


def test_a_disk_with_room_for_the_tensor_files_but_not_the_gguf_says_it_is_full(tmp_path):
    # the GGUF is assembled while the tensor files are still there: numpy's short write said only
    # "N requested and M written"
    model = make_llama_dir(tmp_path / "m", shards=1)
    config = ("--set", "format=q8_0", "--set", "outputs=[gguf]", "--set", "strategies=[identity]", "--set", "validation.enabled=false")
    assert run_cli("qstrat", "run", str(CONFIG), "-i", str(model), "-o", str(tmp_path / "free"), "-q", *config).returncode == 0
    size = next((tmp_path / "free").glob("*.gguf")).stat().st_size
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2 // 4096 * 4096}", "tmpfs", str(mount)], check=True)
    try:
        result = run_cli("qstrat", "run", str(CONFIG), "-i", str(model), "-o", str(mount / "o"), "-q", *config)
        assert_clean_failure(result, "no space left on the device while writing")
        assert result.returncode == 3
        assert not (mount / "o" / "manifest.json").exists() and not list((mount / "o").glob(".*.tmp-*"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
