"""`qstrat run` with YAML configs, and inspect / verify / dequantize, through the CLI."""

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import qstrat
from qstrat.errors import FormatError
from qstrat.synthetic import write_model
from tests.conftest import REPO
from qstrat.io.names import LOCK_NAME
from qstrat.pipelines.backends import local_cores
from tests.helpers import (
    assert_clean_failure,
    communicate_or_dump_stacks,
    group_members,
    journal_lines,
    loky_workers,
    make_llama_dir,
    run_cli,
    wait_for,
)

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _same_dirs(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.startswith("report."):
            continue  # reports hold timings
        if name == "manifest.json":
            strip = lambda m: {k: v for k, v in m.items() if k not in ("created_utc", "reports")}  # noqa: E731
            assert strip(_manifest(a)) == strip(_manifest(b))
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_run_as_shipped(tmp_path, config):
    result = run_cli("qstrat", "run", str(config), "--output", str(tmp_path / "{model}"), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [m["status"] for m in summary["models"]] == ["ok"]
    out = tmp_path / "tiny-llama"
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
    if config.stem == "function_preserving":
        assert not list(out.glob("*.perm"))
        assert (out / "joint_permutations.safetensors").exists()


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    make_llama_dir(tmp_path / "models" / "m1", shards=1)
    (tmp_path / "cfg" / "c.yaml").write_text("input: ../models/m1\noutput: ../out/{model}\n")
    result = subprocess.run([sys.executable, "-m", "qstrat", "run", str(tmp_path / "cfg" / "c.yaml"), "-q"], cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "m1" / "manifest.json").exists()


def test_precedence_defaults_yaml_environment_flags(tmp_path):
    model = make_llama_dir(tmp_path / "m", shards=1)
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {model}\noutput: {tmp_path}/o1\nvariant: ggml\n")
    assert run_cli("qstrat", "run", str(config), "-q").returncode == 0
    assert _manifest(tmp_path / "o1")["variant"] == "ggml"  # YAML over default
    env = {"CANDLE_Q8K_VARIANT": "candle-0.9", "CANDLE_Q8K_PERMUTE": "1"}
    assert run_cli("qstrat", "run", str(config), "-q", "-o", str(tmp_path / "o2"), env=env).returncode == 0
    manifest = _manifest(tmp_path / "o2")
    assert manifest["variant"] == "candle-0.9"  # environment over YAML
    assert manifest["config"]["strategies"] == [{"name": "l2_norm"}]
    result = run_cli("qstrat", "run", str(config), "-q", "-o", str(tmp_path / "o3"), "--set", "variant=candle", env=env)
    assert result.returncode == 0, result.stderr
    assert _manifest(tmp_path / "o3")["variant"] == "candle"  # flag over environment
    # default: identity chain when the YAML says nothing
    assert _manifest(tmp_path / "o1")["config"]["strategies"] == [{"name": "identity"}]


def test_an_environment_variable_that_meets_a_scalar_is_named_as_such(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("input: x\noutput: y\nparallel: 3\n")
    result = run_cli("qstrat", "run", str(config), env={"CANDLE_Q8K_THREADS": "2"})
    assert_clean_failure(result, "parallel.workers from the CANDLE_Q8K_* environment variables: 'parallel' is not a section")
    assert "--set" not in result.stderr  # no --set was given


def test_yaml_merge_keys_give_defaults_the_entry_overrides(tmp_path):
    # the safe loader reads them; the duplicate-key check refused them ("could not determine a constructor")
    config = tmp_path / "merge.yaml"
    config.write_text(f"input: {REPO / 'examples' / 'tiny-llama'}\noutput: {tmp_path / 'o'}\nstrategies:\n"
                      "  - &search {name: mlp_joint, budget: 10, seed: 3}\n  - <<: *search\n    name: head_order\n  - identity\n"
                      "parallel: &p {workers: 1}\nvalidation: {<<: {enabled: true, stages: [weight_error]}, enabled: false}\n")
    result = run_cli("qstrat", "run", str(config), "-q")
    assert result.returncode == 0, result.stderr
    settings = json.loads((tmp_path / "o" / "manifest.json").read_text())["config"]
    assert [(s["name"], s["budget"], s["seed"]) for s in settings["strategies"][:2]] == [("mlp_joint", 10, 3), ("head_order", 10, 3)]
    assert settings["validation"]["enabled"] is False  # the own key over the merged one
    config.write_text(config.read_text() + "parallel: {workers: 2}\n")
    assert_clean_failure(run_cli("qstrat", "run", str(config), "--dry-run"), "duplicate key 'parallel'")


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("input: x\noutput: y\nvarient: ggml\n", ["line 3", "varient", "unknown key"]),
        ("input: x\noutput: y\nparallel:\n  workers: two\n", ["line 4", "parallel.workers"]),
        ("input: x\noutput: y\nvariant: q4k\n", ["line 3", "variant"]),
        ("input: x\noutput: y\nstrategies: [l3_norm]\n", ["unknown strategy 'l3_norm'"]),
        ("input: x\noutput: y\nstrategies:\n  - {name: l2_norm, colour: red}\n", ["l2_norm", "colour"]),
        # only the unknown one: a valid match was named with it
        ("input: x\noutput: y\nstrategies:\n  - {name: l2_norm, match: mlp, budget: 3}\n  - identity\n",
         ["strategies.0: strategy l2_norm: unknown option(s) budget (its options: match)"]),
        ("input: [x\noutput: y\n", ["line", "column"]),
        ("input: !!python/object/apply:os.system ['echo hacked']\noutput: y\n", ["line 1"]),
        ("output: y\n", ["input", "missing"]),
        ("input: x\ninput: z\noutput: y\n", ["line 2", "duplicate key 'input'"]),
        ("input: x\noutput: y\nvalidation:\n  thresholds: {min_sqnr_db: lots}\n", ["line 4", "min_sqnr_db"]),
        ("input: x\noutput: ''\n", ["line 2: output: an empty path"]),
        # a NaN threshold was accepted, then the run crashed writing its report after all the work
        ("input: x\noutput: y\nvalidation:\n  thresholds: {min_sqnr_db: .nan}\n", ["line 4", "min_sqnr_db", "finite number"]),
        ("input: x\noutput: y\nvalidation:\n  thresholds: {max_mse: .inf}\n", ["line 4", "max_mse", "finite number"]),
        # exit 0, nothing done: a nightly job reported success
        ("input: []\noutput: y/{model}\n", ["line 1: input: an empty list names no model"]),
        # a Dask address distributed cannot parse was an internal error; none passed --dry-run, then the
        # run made its output directory and stopped; an address without backend dask was ignored
        ("input: x\noutput: y\nparallel: {backend: dask, address: 'http://h:8786'}\n", ["line 3", "parallel.address", "not a scheduler address"]),
        ("input: x\noutput: y\nparallel: {backend: dask, address: 'not a url'}\n", ["line 3", "parallel.address", "not a scheduler address"]),
        ("input: x\noutput: y\nparallel: {backend: dask}\n", ["line 3", "backend dask needs address"]),
        ("input: x\noutput: y\nparallel: {address: 'tcp://h:8786'}\n", ["line 3", "set backend: dask too"]),
        ("input: x\noutput: y\nskip_patterns: ['']\n", ["line 3", "skip_patterns", "would skip every tensor"]),
        # the last per-tensor entry takes every tensor left: its match was silently ignored
        ("input: x\noutput: y\nstrategies: [{name: l2_norm, match: mlp}]\n", ["line 3", "match 'mlp' on the last entry"]),
        # keys YAML reads as a list, a mapping or a number: a TypeError, or no line
        ("input: x\noutput: y\n? [a, b]\n: 1\n", ["line 3: a key must be a plain value, not a list"]),
        ("input: x\noutput: y\nvalidation:\n  {a: 1}: 2\n", ["line 4: a key must be a plain value, not a mapping"]),
        ("input: x\noutput: y\n1: 2\n", ["line 3: key '1' is not a name"]),
        # str.format: an AttributeError, or a directory named after a bound method's address
        (f"input: {REPO / 'examples' / 'tiny-llama'}\noutput: y/{{model.upper}}\n", ["line 2: output template", "not {model.upper}"]),
        (f"input: {REPO / 'examples' / 'tiny-llama'}\noutput: y/{{model[x]}}\n", ["line 2: output template", "not {model[x]}"]),
    ],
)
def test_config_errors_name_key_and_line(tmp_path, text, fragments):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = run_cli("qstrat", "run", str(config))
    assert_clean_failure(result, "bad.yaml", *fragments)
    assert result.returncode == 2
    assert "hacked" not in result.stdout


def test_dry_run_writes_nothing(tmp_path):
    result = run_cli("qstrat", "run", str(REPO / "configs" / "attention_aware.yaml"), "-o", str(tmp_path / "o"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.self_attn.q_proj.weight [512x512] BF16 attention_aware (runtime)" in result.stdout
    # attention_aware claims the output projections and leaves them unpermuted, as the run does
    assert "model.layers.0.self_attn.o_proj.weight [512x512] BF16 attention_aware (none)" in result.stdout
    assert "matches skip pattern 'embed_tokens'" in result.stdout
    assert "MB of output" in result.stdout
    assert not (tmp_path / "o").exists()
    # the error its run would stop at (exit 3): a dry run said the plan (exit 0)
    (tmp_path / "afile").write_text("")
    refused = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(tmp_path / "afile"), "--dry-run")
    assert refused.returncode == 3
    assert_clean_failure(refused, "afile exists and is not a directory")


def test_verify_catches_every_corruption(tmp_path):
    out = tmp_path / "o"
    result = run_cli("qstrat", "run", str(REPO / "configs" / "function_preserving.yaml"), "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    ok = run_cli("qstrat", "verify", str(out))
    assert ok.returncode == 0 and "intact" in ok.stdout
    read_back = {"passthrough.safetensors", "joint_permutations.safetensors", "model.layers.0.mlp.down_proj.weight.q8k"}
    assert read_back <= {p.name for p in out.iterdir()}
    for path in sorted(p for p in out.iterdir() if not p.name.startswith(".") and p.name != "manifest.json"):
        original = path.read_bytes()
        corrupted = bytearray(original)
        corrupted[len(corrupted) // 2] ^= 0x01
        path.write_bytes(bytes(corrupted))
        assert_clean_failure(run_cli("qstrat", "verify", str(out)), path.name)
        if path.name in read_back:
            # the readers check a file's bytes before its values pass as the model's (convert sealed them
            # in a GGUF with a fresh checksum, dequantize and load_model read them as they were)
            with pytest.raises(FormatError, match=f"{path.name}: differs from the manifest's sha256"):
                qstrat.load_model(out, original=True)
            assert_clean_failure(run_cli("qstrat", "convert", str(out), str(tmp_path / "sealed.gguf")), path.name, "verify")
            assert not (tmp_path / "sealed.gguf").exists()
        path.write_bytes(original)
    (out / "model.layers.0.mlp.up_proj.weight.q8k").unlink()
    missing_file = run_cli("qstrat", "verify", str(out))
    assert missing_file.returncode == 3
    assert_clean_failure(missing_file, "up_proj.weight.q8k", "missing")
    # a missing path is said so by every command that reads an output (dequantize, convert said
    # "not an output directory")
    for command in (("verify",), ("dequantize", "d.safetensors"), ("convert", "c.gguf"), ("inspect",)):
        nowhere = run_cli("qstrat", command[0], str(tmp_path / "nowhere"), *(str(tmp_path / a) for a in command[1:]))
        assert nowhere.returncode == 2, command
        assert_clean_failure(nowhere, "nowhere: no such file or directory")


def test_dequantize_and_inspect(tmp_path):
    out = tmp_path / "o"
    assert run_cli("qstrat", "run", str(REPO / "configs" / "function_preserving.yaml"), "-o", str(out), "-q").returncode == 0
    for flag in ([], ["--function-layout"]):
        target = tmp_path / f"made{len(flag)}" / f"back{len(flag)}.safetensors"  # its directory made, as convert's
        (tmp_path / "a-file").write_text("")  # a directory that cannot be made: a clear error, exit 3
        blocked = run_cli("qstrat", "dequantize", str(out), str(tmp_path / "a-file" / "x.safetensors"))
        assert blocked.returncode == 3 and "cannot write" in blocked.stderr and "Traceback" not in blocked.stderr, blocked.stderr
        result = run_cli("qstrat", "dequantize", str(out), str(target), *flag)
        assert result.returncode == 0, result.stderr
        with safe_open(target, framework="numpy") as f:
            names = set(f.keys())
        loaded = qstrat.load_model(out, original=not flag)
        assert names == set(loaded)
        with safe_open(target, framework="numpy") as f:
            assert np.array_equal(f.get_tensor("model.layers.0.mlp.down_proj.weight"), loaded["model.layers.0.mlp.down_proj.weight"])
    for path in (REPO / "examples" / "tiny-llama", REPO / "examples" / "tiny-llama" / "model.safetensors", out):
        result = run_cli("qstrat", "inspect", str(path))
        assert result.returncode == 0, result.stderr
        assert "model.layers.1.mlp.down_proj.weight" in result.stdout


def _unknown_top_level_key(m):
    m["colour"] = "red"


def _missing_checksum(m):
    del m["tensors"]["lm_head.weight"]["files"]["q8k"]["sha256"]


def _unknown_tensor_key(m):
    m["tensors"]["model.norm.weight"]["strategy"] = "l2_norm"  # a passthrough tensor has none


def _unknown_storage(m):
    m["tensors"]["lm_head.weight"]["storage"] = "fp8"


@pytest.mark.parametrize(
    "change, key",
    [
        (_unknown_top_level_key, "colour: unknown key"),
        (_missing_checksum, "tensors.lm_head.weight.files.q8k.sha256: required key is missing"),
        (_unknown_tensor_key, "tensors.model.norm.weight.strategy: unknown key"),
        (_unknown_storage, "tensors.lm_head.weight.storage: storage 'fp8' is not 'q8k', 'passthrough' or a block type"),
    ],
)
def test_a_manifest_with_unknown_or_missing_keys_is_refused(tmp_path_factory, change, key):
    out = tmp_path_factory.mktemp("manifest") / "o"
    model = tmp_path_factory.getbasetemp() / "manifest-model"
    if not model.exists():
        make_llama_dir(model, shards=1)
    assert run_cli("qstrat", "quantize", str(model), str(out), "-s", "l2_norm").returncode == 0
    manifest = _manifest(out)
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    for command in ("verify", "inspect"):
        result = run_cli("qstrat", command, str(out))
        assert_clean_failure(result, f"error: {out / 'manifest.json'}: {key}")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def _many_tensor_model(path: Path, count: int = 120) -> Path:
    rng = np.random.default_rng(0)
    tensors = {f"blocks.{i}.proj.weight": rng.standard_normal((512, 2048)).astype(np.float32) for i in range(count)}
    return write_model(path, tensors, dtype="BF16")


def _start(config, out, *extra):
    script = Path(sys.executable).with_name("qstrat")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLE_Q8K_")}
    return subprocess.Popen([str(script), "run", str(config), "-o", str(out), "-q", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_kill_9_then_rerun_is_identical_and_lock_is_exclusive(tmp_path):
    model = _many_tensor_model(tmp_path / "big")
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {model}\noutput: unused\nstrategies: [l2_norm]\n")
    reference = tmp_path / "reference"
    assert run_cli("qstrat", "run", str(config), "-o", str(reference), "-q").returncode == 0
    out = tmp_path / "o"
    for kill_after in (3, 40, 90):
        process = _start(config, out)
        deadline = time.time() + 120
        while journal_lines(out) < kill_after and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        # frozen at this point (it keeps its lock), so that it cannot finish while we look
        os.killpg(process.pid, signal.SIGSTOP)
        assert process.poll() is None, f"the run ended before {kill_after} groups were journaled"
        if kill_after == 40:
            # a second run on the same output fails at once, naming the holder
            second = run_cli("qstrat", "run", str(config), "-o", str(out), "-q")
            assert_clean_failure(second, "in use by pid")
            assert second.returncode == 3
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        assert not (out / "manifest.json").exists()
    result = run_cli("qstrat", "run", str(config), "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
    _same_dirs(out, reference)


def _start_two_workers(tmp_path: Path) -> tuple[Path, Path, subprocess.Popen]:
    """A run of many tensors on two workers, started in a process group of its own."""
    model = _many_tensor_model(tmp_path / "big")
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {model}\noutput: unused\nparallel: {{workers: 2}}\n")
    out = tmp_path / "o"
    return config, out, _start(config, out)


def test_workers_do_not_outlive_a_run_killed_with_sigkill(tmp_path):
    config, out, process = _start_two_workers(tmp_path)
    try:
        wait_for(lambda: process.poll() is None and journal_lines(out) >= 3 and len(loky_workers(process.pid)) == 2, 120,
                 "a run with two workers and 3 journaled groups")
        os.kill(process.pid, signal.SIGKILL)  # the run alone, as the OOM killer or `kill -9 PID` does
        process.wait()
        # its workers went on writing into the output, whose lock was free again, then idled for
        # joblib's timeout (300 s) holding their buffers; now each ends within a second or so
        wait_for(lambda: not group_members(process.pid), 60, "the run's workers and trackers to end")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_a_search_of_a_huge_budget_stops_on_sigterm_in_one_process(tmp_path):
    # one worker: the groups run in the run's own process, where a stop request is acted on only
    # where the run checks for it; the search never did, so SIGTERM was ignored (for days, here)
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {REPO / 'examples' / 'tiny-llama'}\noutput: unused\n"
                      "strategies: [{name: mlp_joint, budget: 1000000000}, identity]\n")
    out = tmp_path / "o"
    process = _start(config, out)
    try:
        wait_for(lambda: (out / ".qstrat-journal.jsonl").exists(), 60, "the run to start its groups")
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        _, stderr = communicate_or_dump_stacks(process, 60)
        assert process.returncode == 130, stderr
        assert "interrupted" in stderr and "Traceback" not in stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_sigterm_stops_cleanly(tmp_path):
    config, out, process = _start_two_workers(tmp_path)
    try:
        workers = wait_for(lambda: process.poll() is None and journal_lines(out) >= 5 and loky_workers(process.pid), 120,
                           "a run with workers and 5 journaled groups")
        os.killpg(process.pid, signal.SIGSTOP)  # so that the signal surely lands mid-run
        assert process.poll() is None and journal_lines(out) < 120, "the run ended before the signal"
        process.send_signal(signal.SIGTERM)
        os.killpg(process.pid, signal.SIGCONT)
        _, stderr = communicate_or_dump_stacks(process, 60)
        assert process.returncode == 130, stderr
        assert "interrupted" in stderr and "Traceback" not in stderr
        wait_for(lambda: not group_members(process.pid), 10, f"no process of the run left ({workers})")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert not list(out.glob(".*.tmp-*"))
    assert (out / ".qstrat.lock").read_text() == ""
    assert run_cli("qstrat", "run", str(config), "-o", str(out), "-q").returncode == 0
    assert run_cli("qstrat", "verify", str(out)).returncode == 0


@pytest.mark.skipif(local_cores() < 2, reason="no worker process starts on one core (workers are capped at the cores)")
def test_ctrl_c_to_the_process_group_while_workers_start_prints_no_traceback(tmp_path):
    # a terminal's Ctrl-C reaches every process of the group: workers still importing printed their
    # KeyboardInterrupt tracebacks (the run itself stopped with 130)
    config, out, process = _start_two_workers(tmp_path)
    try:
        workers = wait_for(lambda: process.poll() is None and loky_workers(process.pid), 120, "a worker started")
        time.sleep(0.1)  # into the worker's imports (before them, SIGINT's default action ends it silently)
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = communicate_or_dump_stacks(process, 60)
        assert process.returncode == 130, stderr
        assert stderr.strip() == "error: interrupted", stderr
        wait_for(lambda: not group_members(process.pid), 10, f"no process of the run left ({workers})")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert (out / ".qstrat.lock").read_text() == ""
    assert run_cli("qstrat", "run", str(config), "-o", str(out), "-q").returncode == 0


@pytest.mark.skipif(local_cores() < 2, reason="no worker process starts on one core (workers are capped at the cores)")
def test_a_failing_task_keeps_the_groups_other_workers_finished(tmp_path):
    # groups are journaled as workers finish them: the largest (first dispatched) failing at its
    # end used to take every other worker's finished groups down with it (a rerun redid them all)
    rng = np.random.default_rng(0)
    tensors = {f"small.{i}.weight": rng.standard_normal((64, 256)).astype(np.float32) for i in range(24)}
    big = rng.standard_normal((16384, 4096)).astype(np.float32)
    big[-1, -1] = np.nan
    tensors["big.weight"] = big
    model = write_model(tmp_path / "m", tensors, dtype="F32")
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {model}\noutput: {tmp_path}/o\nparallel: {{workers: 2}}\n")
    failed = run_cli("qstrat", "run", str(config), "-q")
    assert_clean_failure(failed, "big.weight", "non-finite")
    assert journal_lines(tmp_path / "o") > 1  # its fingerprint, then the small groups the other worker finished


def test_a_closed_terminal_stops_the_run_with_130(tmp_path):
    # the terminal goes away under a run: SIGHUP, then every write to it fails with EIO (it used to
    # end the run with exit 1 and a traceback, in rich's progress bar or in the last error line)
    model = _many_tensor_model(tmp_path / "big")
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {model}\noutput: unused\nstrategies: [l2_norm]\n")
    out = tmp_path / "o"
    pid, terminal = pty.fork()
    if pid == 0:  # the run, on the terminal's other side: its progress bar shows
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal's session, also when pytest runs under nohup
        os.execv(str(Path(sys.executable).with_name("qstrat")), ["qstrat", "run", str(config), "-o", str(out)])
    shown = b""
    deadline = time.monotonic() + 120
    while len(shown) < 200 and time.monotonic() < deadline:  # the bar is drawn: the run is under way
        if select.select([terminal], [], [], 0.1)[0]:
            shown += os.read(terminal, 4096)
    os.close(terminal)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 130, shown
    assert not list(out.glob(".*.tmp-*")) and (out / ".qstrat.lock").read_text() == ""
    assert run_cli("qstrat", "run", str(config), "-o", str(out), "-q").returncode == 0


def test_changed_config_is_refused_without_force(tmp_path):
    model = make_llama_dir(tmp_path / "m", shards=1)
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {model}\noutput: {tmp_path}/o\n")
    assert run_cli("qstrat", "run", str(config), "-q").returncode == 0
    changed = run_cli("qstrat", "run", str(config), "-q", "--set", "strategies=[l2_norm]")
    # which setting differs, as the finished run's manifest recorded it
    assert_clean_failure(changed, "holds results of a different config (strategies: [{\"name\": \"identity\"}] -> "
                                  "[{\"name\": \"l2_norm\"}])", "--force")
    threshold = run_cli("qstrat", "run", str(config), "-q", "--set", "validation.thresholds.min_sqnr_db=30")
    assert_clean_failure(threshold, "(thresholds.min_sqnr_db: null -> 30.0)")
    assert run_cli("qstrat", "run", str(config), "-q", "--set", "strategies=[l2_norm]", "--force").returncode == 0
    assert list((tmp_path / "o").glob("*.perm"))
    # another model into the same output: its path is named (it was "the same config on other input files")
    other = make_llama_dir(tmp_path / "n", shards=1, seed=7)
    moved = run_cli("qstrat", "run", str(config), "-q", "-i", str(other), "--set", "strategies=[l2_norm]")
    assert_clean_failure(moved, f"holds results of a different input (input: {model} -> {other.resolve()})", "--force")


def test_new_weights_of_the_same_shapes_are_a_changed_input(tmp_path):
    # a retrained checkpoint downloaded over the old one: same header and size, other data.  A
    # rerun used to keep the old tensors (and a resumed one mixed old and new) and exit 0
    model = make_llama_dir(tmp_path / "m", shards=1)
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {model}\noutput: {tmp_path}/o\n")
    assert run_cli("qstrat", "run", str(config), "-q").returncode == 0
    before = qstrat.load_model(tmp_path / "o")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(1, 4096, 4):  # the sign bit of the last values (2- or 4-byte little-endian): negated
        data[-i] ^= 0x80
    weights.write_bytes(bytes(data))
    changed = run_cli("qstrat", "run", str(config), "-q")
    assert_clean_failure(changed, "the same config on its input's files, changed since", "--force")
    assert run_cli("qstrat", "run", str(config), "-q", "--force").returncode == 0
    after = qstrat.load_model(tmp_path / "o")
    assert any(not np.array_equal(before[n], after[n]) for n in before)
    assert run_cli("qstrat", "run", str(config), "-q").returncode == 0  # unchanged since: nothing to refuse


def test_a_batch_dry_run_goes_on_past_a_failing_model(tmp_path):
    # it used to stop at the first bad model (exit 2, no model named, the later ones never planned)
    for name in ("alpha", "charlie"):
        make_llama_dir(tmp_path / "models" / name, shards=1)
    bad = tmp_path / "models" / "bravo"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((tmp_path / "models" / "alpha" / "model.safetensors").read_bytes()[:1000])
    config = tmp_path / "batch.yaml"
    config.write_text(f"input: ['{tmp_path}/models/*']\noutput: {tmp_path}/out/{{model}}\n")
    shown = run_cli("qstrat", "run", str(config), "--dry-run")
    assert shown.returncode == 5, shown.stderr
    assert shown.stderr.startswith("error: bravo: ") and "alpha" in shown.stdout and "charlie" in shown.stdout
    planned = run_cli("qstrat", "run", str(config), "--dry-run", "--json")
    assert planned.returncode == 5
    document = json.loads(planned.stdout)
    assert sorted(document["models"]) == ["alpha", "bravo", "charlie"] and "error" in document["models"]["bravo"]
    assert document["exit_code"] == 5 and not (tmp_path / "out").exists()


def test_an_output_of_the_fingerprint_without_file_times_resumes(tmp_path):
    # an earlier qstrat's fingerprint held no modification times: its outputs are not "a different input"
    from qstrat.io.gguf_input import open_input
    from qstrat.pipelines.journal import run_fingerprint

    model = make_llama_dir(tmp_path / "m", shards=1)
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {model}\noutput: {tmp_path}/o\n")
    assert run_cli("qstrat", "run", str(config), "-q").returncode == 0
    out = tmp_path / "o"
    manifest = _manifest(out)
    assert run_fingerprint(manifest["config"], open_input(model)) == manifest["fingerprint"]
    older = run_fingerprint(manifest["config"], open_input(model), with_times=False)
    for path in (out / "manifest.json", out / ".qstrat-journal.jsonl"):  # as that qstrat wrote them
        path.write_text(path.read_text().replace(manifest["fingerprint"], older))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.q8k")}
    rerun = run_cli("qstrat", "run", str(config), "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.q8k")} == before  # every group kept
    assert _manifest(out)["fingerprint"] == manifest["fingerprint"]
    assert json.loads((out / ".qstrat-journal.jsonl").read_text().splitlines()[0])["fingerprint"] == manifest["fingerprint"]


def test_a_finished_run_is_up_to_date_on_its_rerun(tmp_path):
    # a GGUF-only output keeps no tensor files to reuse: each rerun (a nightly cron job) redid it all
    config = str(REPO / "configs" / "function_preserving.yaml")
    out = tmp_path / "o"
    args = ("-o", str(out), "--set", "format=q4_k", "--json")
    first = json.loads(run_cli("qstrat", "run", config, *args).stdout)["models"][0]
    assert first["up_to_date"] is False
    times = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_NAME}
    again = run_cli("qstrat", "run", config, *args)
    assert again.returncode == 0, again.stderr
    outcome = json.loads(again.stdout)["models"][0]
    assert outcome["up_to_date"] is True and outcome["tensor_count"] == first["tensor_count"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_NAME} == times  # nothing rewritten
    (out / "report.md").unlink()  # a file missing: not up to date, the run is done again
    lines = journal_lines(out)
    redone = json.loads(run_cli("qstrat", "run", config, *args).stdout)["models"][0]
    assert redone["up_to_date"] is False and run_cli("qstrat", "verify", str(out)).returncode == 0
    assert journal_lines(out) == lines  # each group once: a rerun that redoes them used to add them again


def _q4_0_gguf(tmp_path: Path, shape: tuple[int, int], count: int, seed: int, type_name: str = "q4_0") -> tuple[Path, Path]:
    """A float32 model of ``count`` random matrices, and its Q4_0 (or ``type_name``) GGUF written by a run."""
    rng = np.random.default_rng(seed)
    model = write_model(tmp_path / "m", {f"l.{i}.weight": rng.standard_normal(shape).astype(np.float32) for i in range(count)}, dtype="F32")
    assert run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(tmp_path / "q4"), "-q",
                   "--set", f"format={type_name}").returncode == 0
    return model, next((tmp_path / "q4").glob("*.gguf"))


def test_an_output_much_larger_than_its_input_is_a_warning(tmp_path):
    # Q8K of a GGUF model whose rows are not 256 long: its block-type tensors pass through decoded to F32
    model, source = _q4_0_gguf(tmp_path, (256, 384), 4, seed=0)
    config = REPO / "configs" / "identity.yaml"
    result = run_cli("qstrat", "run", str(config), "-i", str(source), "-o", str(tmp_path / "q8k"))
    assert result.returncode == 0, result.stderr
    assert "is larger than the input" in result.stderr and "row length 384 is not a multiple of 256" in result.stderr
    quiet = run_cli("qstrat", "run", str(config), "-i", str(source), "-o", str(tmp_path / "q8k"), "--json")
    assert "is larger than the input" in json.loads(quiet.stdout)["models"][0]["warnings"][0]
    plain = run_cli("qstrat", "run", str(config), "-i", str(model), "-o", str(tmp_path / "plain"))
    assert "larger than the input" not in plain.stderr  # passed through as they were: no bigger
    # Q4_0 to Q8_0: the quantized tensors grow, not the few passed through (which it used to blame)
    wider = run_cli("qstrat", "run", str(config), "-i", str(source), "-o", str(tmp_path / "q8_0"), "--set", "format=q8_0")
    assert wider.returncode == 0, wider.stderr
    assert "is larger than the input" in wider.stderr and "quantized tensors take" in wider.stderr and "in q8_0, against" in wider.stderr


def test_a_gguf_inputs_bytes_in_are_its_stored_bytes_and_its_type_is_recorded(tmp_path):
    model, source = _q4_0_gguf(tmp_path, (64, 512), 3, seed=1)
    config = REPO / "configs" / "identity.yaml"
    out = tmp_path / "q8"
    assert run_cli("qstrat", "run", str(config), "-i", str(source), "-o", str(out), "-q", "--set", "format=q8_0").returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {t["source_type"] for t in manifest["tensors"].values()} == {"q4_0"}
    assert {t["dtype"] for t in manifest["tensors"].values()} == {"F32"}  # as read, decoded
    # Q4_0 stores 32 values in 18 bytes: the report used to count the decoded float32 bytes (7 times more)
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["quantized_source_bytes"] == 3 * 64 * 512 // 32 * 18
    assert f"{3 * 64 * 512 // 32 * 18:,} bytes in" in (out / "report.md").read_text()
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
    plain = tmp_path / "plain"
    assert run_cli("qstrat", "run", str(config), "-i", str(model), "-o", str(plain), "-q", "--set", "format=q8_0").returncode == 0
    assert all("source_type" not in t for t in json.loads((plain / "manifest.json").read_text())["tensors"].values())
    assert json.loads((plain / "report.json").read_text())["summary"]["quantized_source_bytes"] == 3 * 64 * 512 * 4


def test_a_gguf_inputs_tensors_already_in_the_type_asked_for_are_copied(tmp_path):
    # llama.cpp copies them; requantizing their decoded values moved Q5_K's values (Q3_K's and IQ4_NL's too)
    from gguf import GGUFReader

    _, source = _q4_0_gguf(tmp_path, (64, 512), 3, seed=2, type_name="q5_k")
    stored = {t.name: bytes(t.data) for t in GGUFReader(source).tensors}
    config = REPO / "configs" / "identity.yaml"
    out = tmp_path / "again"
    result = run_cli("qstrat", "run", str(config), "-i", str(source), "-o", str(out), "--set", "format=q5_k")
    assert result.returncode == 0, result.stderr
    written = {t.name: bytes(t.data) for t in GGUFReader(out / source.name).tensors}
    assert written == stored
    assert "Quantized: 3 (q5_k 3; 3 copied from the input as they were)" in result.stdout
    assert "sqnr=exact" in result.stdout and "(copied: already q5_k in the input)" in result.stdout
    assert "larger than the input" not in result.stderr  # its reports and manifest are no part of the model
    manifest = json.loads((out / "manifest.json").read_text())
    assert {t["copied"] for t in manifest["tensors"].values()} == {True}
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert summary["copied_count"] == 3
    assert summary["quantized_output_bytes"] == summary["quantized_source_bytes"] == sum(len(b) for b in stored.values())
    assert "3 tensors already in the type asked for in the input GGUF: copied as they were" in (out / "report.md").read_text()
    planned = run_cli("qstrat", "run", str(config), "-i", str(source), "-o", str(tmp_path / "plan"), "--set", "format=q5_k", "--dry-run", "--json")
    assert [q.get("copied") for q in json.loads(planned.stdout)["models"]["m"]["quantized"]] == [True] * 3
    quiet = run_cli("qstrat", "run", str(config), "-i", str(source), "-o", str(out), "--set", "format=q5_k", "--json")
    assert json.loads(quiet.stdout)["models"][0]["copied_count"] == 3
    compared = run_cli("qstrat", "compare", str(source), "-f", "q5_k,q8_0", "-s", "identity", "-o", str(tmp_path / "cmp"))
    assert compared.returncode == 0, compared.stderr
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| quantized | copied exact |" in table and "| q5_k | identity | 3 | 3 |" in table and "| q8_0 | identity | 3 | 0 |" in table
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
    # an importance matrix the copies did not use: said, not left out of the summary and the report
    from qstrat.imatrix import ImportanceEntry, ImportanceMatrix, write_imatrix

    imatrix = tmp_path / "imatrix.gguf"
    write_imatrix(imatrix, ImportanceMatrix({n: ImportanceEntry(np.ones((1, 512), np.float32), np.array([4])) for n in stored}, ["t"], 1, 32))
    weighted = run_cli("qstrat", "run", str(config), "-i", str(source), "-o", str(tmp_path / "weighted"), "--set", "format=q5_k",
                       "--set", f"imatrix={imatrix}")
    said = f"mportance matrix {imatrix}: used for no tensor, since all 3 quantized tensors were copied as the input stored them"
    assert weighted.returncode == 0 and said in weighted.stdout, weighted.stdout + weighted.stderr
    assert said in (tmp_path / "weighted" / "report.md").read_text()
    # another type is requantized; a permutation moves the columns across blocks, so it requantizes too
    for name, settings in (("q8_0", ["--set", "format=q8_0"]), ("permuted", ["--set", "format=q5_k", "--set", "strategies=[l2_norm]"])):
        other = run_cli("qstrat", "run", str(config), "-i", str(source), "-o", str(tmp_path / name), "-q", *settings)
        assert other.returncode == 0, other.stderr
        tensors = json.loads((tmp_path / name / "manifest.json").read_text())["tensors"].values()
        assert all("copied" not in t for t in tensors) and all(t["metrics"]["sqnr_db"] != "inf" for t in tensors)


def test_a_joint_strategy_keeps_the_copies_of_a_gguf_inputs_tensors(tmp_path):
    # mlp_joint and head_order measured identity by requantizing the decoded values, so an order could
    # "gain" over it and the tensor was requantized: a loss against the input, which a copy does not have
    from gguf import GGUFReader

    from qstrat.synthetic import LlamaShape, hf_config, llama_tensors

    shape = LlamaShape(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    tensors, rng = llama_tensors(shape, seed=5), np.random.default_rng(0)
    for i in range(2):  # columns of very different scales: the model where reordering them pays
        scale = np.exp(rng.standard_normal(512) * 1.5).astype(np.float32)
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] *= scale[None, :]
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] /= np.sqrt(scale)[:, None]
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"] *= np.exp(rng.standard_normal(256) * 1.5).astype(np.float32)[None, :]
    model = write_model(tmp_path / "st", tensors, dtype="F32", config=hf_config(shape))
    first = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-i", str(model), "-o", str(tmp_path / "q3"), "-q", "--set", "format=q3_k")
    assert first.returncode == 0, first.stderr
    source = next((tmp_path / "q3").glob("*.gguf"))
    config = tmp_path / "joint.yaml"
    config.write_text(f"input: {source}\noutput: {tmp_path / 'again'}\nformat: q3_k\nstrategies:\n"
                      "  - {name: mlp_joint, budget: 400}\n  - {name: head_order, budget: 200}\n  - identity\n")
    again = run_cli("qstrat", "run", str(config), "-q")
    assert again.returncode == 0, again.stderr
    manifest = json.loads((tmp_path / "again" / "manifest.json").read_text())["tensors"]
    assert all(t.get("copied") and t["permutation"] == "none" for t in manifest.values() if t["storage"] != "passthrough")
    written = {t.name: bytes(t.data) for t in GGUFReader(tmp_path / "again" / source.name).tensors}
    assert written == {t.name: bytes(t.data) for t in GGUFReader(source).tensors}
    # down projections in another type move their columns; gate and up move only their rows, whose blocks
    # are copied in the new order (each row's blocks stand alone) and read back as the input's values
    config.write_text(config.read_text().replace("format: q3_k", "format: q3_k\nformat_rules:\n  - {match: ffn_down, format: q8_0}")
                      .replace(str(tmp_path / "again"), str(tmp_path / "moved")))
    moved = run_cli("qstrat", "run", str(config), "-q")
    assert moved.returncode == 0, moved.stderr
    manifest = json.loads((tmp_path / "moved" / "manifest.json").read_text())["tensors"]
    rows_moved = [n for n, t in manifest.items() if ("ffn_gate" in n or "ffn_up" in n) and t["permutation"] == "joint"]
    assert rows_moved and all(manifest[n].get("copied") for n in rows_moved)
    restored = qstrat.load_model(tmp_path / "moved", original=True)
    held = {t.name: qstrat.dequantize(np.asarray(t.data), t.tensor_type.name) for t in GGUFReader(source).tensors if t.name in rows_moved}
    assert all(np.array_equal(restored[n], held[n]) for n in rows_moved)


def test_batch_goes_on_past_a_failing_model(tmp_path):
    good = make_llama_dir(tmp_path / "models" / "good", shards=1)
    bad = tmp_path / "models" / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    config = tmp_path / "batch.yaml"
    config.write_text(f"input: ['{tmp_path}/models/*']\noutput: {tmp_path}/out/{{model}}\n")
    result = run_cli("qstrat", "run", str(config), "--json")
    assert result.returncode == 5
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    status = {m["model"]: m["status"] for m in summary["models"]}
    assert status == {"bad": "failed", "good": "ok"}
    assert "bad" in next(m["error"] for m in summary["models"] if m["model"] == "bad")
    assert (tmp_path / "out" / "good" / "manifest.json").exists()
    # a glob is a batch whatever it matches: one broken model is a batch's failure too (exit 5)
    alone = run_cli("qstrat", "run", str(config), "-i", f"{tmp_path}/models/ba*", "--json")
    assert alone.returncode == 5 and [m["status"] for m in json.loads(alone.stdout)["models"]] == ["failed"]


def test_a_glob_skips_qstrat_output_directories(tmp_path):
    # outputs written beside the models: the next night's glob used to quantize them too (0 tensors, "ok")
    make_llama_dir(tmp_path / "models" / "alpha", shards=1)
    config = tmp_path / "batch.yaml"
    config.write_text(f"input: ['{tmp_path}/models/*']\noutput: {tmp_path}/models/{{model}}-q8k\n")
    for night in range(2):
        result = run_cli("qstrat", "run", str(config), "--json")
        assert result.returncode == 0, result.stderr
        assert [m["model"] for m in json.loads(result.stdout)["models"]] == ["alpha"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["alpha", "alpha-q8k"]
    only = run_cli("qstrat", "run", str(config), "-i", f"{tmp_path}/models/*-q8k")
    assert only.returncode == 2
    assert_clean_failure(only, "matches only qstrat output directories")
    # named outright: its passthrough.safetensors was read as the whole model (0 quantized, exit 0)
    named = run_cli("qstrat", "run", str(config), "-i", f"{tmp_path}/models/alpha-q8k", "-o", str(tmp_path / "again"))
    assert named.returncode == 2
    assert_clean_failure(named, "alpha-q8k is a qstrat output directory, not a model")
    # a model directory with a manifest.json of its own is still a model
    (tmp_path / "models" / "alpha" / "manifest.json").write_text('{"files": []}')
    planned = run_cli("qstrat", "run", str(config), "--dry-run", "--json")
    assert list(json.loads(planned.stdout)["models"]) == ["alpha"]


def test_json_says_how_a_stopped_run_ended_on_one_line(tmp_path):
    # --json >> log 2>&1 (the README's cron line): whatever stops a run, one JSON line and nothing else
    good = make_llama_dir(tmp_path / "good", shards=1)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((good / "model.safetensors").read_bytes()[:1000])
    config = REPO / "configs" / "identity.yaml"
    failed = run_cli("qstrat", "run", str(config), "-i", str(broken), "-o", str(tmp_path / "o"), "--json")
    assert failed.returncode == 2 and failed.stderr == "", failed.stderr
    summary = json.loads(failed.stdout)
    assert summary["exit_code"] == 2 and "broken.safetensors" in summary["error"]
    assert [(m["model"], m["status"]) for m in summary["models"]] == [("broken", "failed")]
    misspelt = run_cli("qstrat", "run", str(config), "-o", str(tmp_path / "o"), "--set", "variant=q4k", "--json")
    assert misspelt.returncode == 2 and misspelt.stderr == ""
    document = json.loads(misspelt.stdout)
    assert document["models"] == [] and document["exit_code"] == 2 and "variant" in document["error"]


def test_threshold_failure_writes_everything_then_exits_4(tmp_path):
    out = tmp_path / "o"
    result = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(out),
                     "--set", "validation.thresholds.min_sqnr_db=33")
    assert result.returncode == 4, result.stderr
    assert "below threshold" in result.stdout
    manifest = _manifest(out)
    failed = {f["tensor"] for f in manifest["validation"]["failed"]}
    assert failed and failed < set(manifest["tensors"])
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
    # --quiet prints only errors: these are what the exit code is about (it used to print nothing)
    quiet = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(out), "--quiet",
                    "--set", "validation.thresholds.min_sqnr_db=33")
    assert quiet.returncode == 4 and quiet.stdout == ""
    assert sorted(line.split(": below threshold: ")[1].split(": ")[0] for line in quiet.stderr.splitlines()) == sorted(failed), quiet.stderr


def test_progress_lines_when_not_a_terminal(tmp_path):
    result = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(tmp_path / "o"))
    assert result.returncode == 0
    assert "tiny-llama: quantizing" in result.stdout
    assert "q8k   model.layers.0.mlp.up_proj.weight [768x512] identity" in result.stdout


def test_progress_bar_on_a_terminal(tmp_path):
    # `script` gives the command a pseudo-terminal, as a user's shell would
    command = f"{Path(sys.executable).with_name('qstrat')} run {REPO / 'configs' / 'identity.yaml'} -o {tmp_path / 'o'}"
    result = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    assert result.returncode == 0, result.stdout
    assert "tiny-llama" in result.stdout and "tensors" in result.stdout and "MB" in result.stdout
    assert "q8k   model.layers" not in result.stdout  # the bar replaces the per-tensor lines


def test_commands_quiet_openmp_threads_unless_the_user_chose(monkeypatch):
    from qstrat.cli import quiet_openmp_threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    quiet_openmp_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    quiet_openmp_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_run_piped_into_head_finishes(tmp_path):
    # `qstrat run ... | head -1`: the reader goes away after one line; the run goes on to its end
    out = tmp_path / "out"
    script = Path(sys.executable).with_name("qstrat")
    process = subprocess.Popen([str(script), "run", str(REPO / "configs" / "identity.yaml"), "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0, stderr
    assert first.startswith("tiny-llama: ") and stderr == ""
    verified = run_cli("qstrat", "verify", str(out))
    assert verified.returncode == 0 and "intact" in verified.stdout


def test_output_paths_that_would_write_where_they_must_not(tmp_path):
    # an empty path would be the current directory; the input's own directory would get the outputs
    # beside its weights; two inputs of one name would write over each other: each error names the flag
    config, model = REPO / "configs" / "identity.yaml", REPO / "examples" / "tiny-llama"
    twin = tmp_path / "elsewhere" / "tiny-llama"
    twin.mkdir(parents=True)
    gguf_input = tmp_path / "elsewhere" / "model.gguf"
    gguf_input.write_bytes(b"GGUF")  # refused before it is read
    cases = [
        (["-o", ""], "--output: output: an empty path"),
        (["--set", "input="], "--set input=: input: an empty path"),
        (["-o", str(model)], f"--output: {model} is the input model's own directory"),
        # a model file's directory: a GGUF input there was overwritten by the run's <model>.gguf
        (["-i", str(gguf_input), "-o", str(gguf_input.parent)], f"--output: {gguf_input.parent} is the input model's own directory"),
        (["-i", str(model), "-i", str(twin), "-o", str(tmp_path / "out" / "{model}")],
         f"--output: {model} and {twin} would both write to {tmp_path / 'out' / 'tiny-llama'}"),
    ]
    for args, message in cases:
        result = run_cli("qstrat", "run", str(config), *args, "--dry-run", cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert_clean_failure(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


def test_an_error_in_a_set_flag_names_the_flag_not_the_file(tmp_path):
    config = REPO / "configs" / "identity.yaml"
    for option, message in (("foo=1", "--set foo=1: foo: unknown key"),
                            ("strategies=[bogus]", "--set strategies=[bogus]: strategies.0: unknown strategy 'bogus'"),
                            ("variant=q4k", "--set variant=q4k: variant: Input should be"),
                            # an unquoted template is a YAML mapping: the error says to quote it
                            ("output={model}-q8", "the value is not valid YAML (quote a text holding {")):
        result = run_cli("qstrat", "run", str(config), "--set", option, "--dry-run")
        assert result.returncode == 2, result.stderr
        assert_clean_failure(result, message)
        assert "identity.yaml" not in result.stderr
    # a check of a whole section names the flag that set a key inside it
    crossed = run_cli("qstrat", "run", str(config), "--set", "format=q8_0", "--set", "validation.product=candle", "--dry-run")
    assert crossed.returncode == 2
    assert_clean_failure(crossed, "--set validation.product=candle: validation: product: candle multiplies Q8K blocks")


def test_tensor_files_an_earlier_run_left_unlisted_are_removed_and_verify_names_them(tmp_path):
    out = tmp_path / "o"
    config = str(REPO / "configs" / "attention_aware.yaml")
    assert run_cli("qstrat", "run", config, "-o", str(out), "-q").returncode == 0
    perms = sorted(p.name for p in out.glob("*.perm"))
    assert perms
    # a --force run without permutations stopped after it removed the manifest: the .perm files stay,
    # unlisted, and its rerun used to leave them there (Candle gathers with any .perm beside a .q8k)
    (out / "manifest.json").unlink()
    rerun = run_cli("qstrat", "run", config, "-o", str(out), "-q", "--force", "--set", "strategies=[identity]")
    assert rerun.returncode == 0, rerun.stderr
    assert not list(out.glob("*.perm"))
    assert run_cli("qstrat", "verify", str(out)).returncode == 0
    fresh = tmp_path / "fresh"
    assert run_cli("qstrat", "run", config, "-o", str(fresh), "-q", "--set", "strategies=[identity]").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    # one put back by hand: verify names it
    (out / perms[0]).write_bytes((REPO / "examples" / "tiny-llama" / "config.json").read_bytes())
    stale = run_cli("qstrat", "verify", str(out))
    assert stale.returncode == 3
    assert_clean_failure(stale, perms[0], "not listed in the manifest")
    # a first run into a directory that was no qstrat output deletes nothing of what was there
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.perm").write_text("mine")
    assert run_cli("qstrat", "run", config, "-o", str(mine), "-q", "--set", "strategies=[identity]").returncode == 0
    assert (mine / "notes.perm").read_text() == "mine"
    assert_clean_failure(run_cli("qstrat", "verify", str(mine)), "notes.perm: not listed in the manifest")


def test_a_model_without_config_json_is_named_as_such(tmp_path):
    # "got 'None'" and "model_type 'None'": the missing config.json was not said
    model = make_llama_dir(tmp_path / "m", shards=1)
    (model / "config.json").unlink()
    config = str(REPO / "configs" / "identity.yaml")
    preset = run_cli("qstrat", "run", config, "-i", str(model), "-o", str(tmp_path / "o"), "--set", "preset=q4_k_m")
    assert preset.returncode == 2
    assert_clean_failure(preset, "no config.json (with model_type) beside its weights")
    text = tmp_path / "t.txt"
    text.write_text("word " * 4000)
    evaluated = run_cli("qstrat", "eval", str(model), "--text", str(text))
    assert evaluated.returncode == 2
    assert_clean_failure(evaluated, "its architecture is unknown: no config.json (with model_type) beside its weights")
