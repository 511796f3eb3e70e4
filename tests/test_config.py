"""One run model: the original tool's constructor and environment, YAML, and the README's table."""

import json
from pathlib import Path

import numpy as np
import pytest

import qstrat
from qstrat import QuantizationConfig, StrategyType
from qstrat.io.safetensors import write_safetensors
from qstrat.legacy import ENVIRONMENT, environment_settings, environment_table
from qstrat.runconfig import RunConfig
from tests.conftest import REPO
from tests.helpers import run_cli


def test_readme_has_the_environment_table_of_the_code():
    assert environment_table() in (REPO / "README.md").read_text()


def test_readme_and_help_have_the_exit_codes_of_the_code():
    from qstrat.errors import EXIT_CODES, QstratError, exit_codes_table

    assert exit_codes_table() in (REPO / "README.md").read_text()
    def with_subclasses(cls: type) -> set[type]:
        return {cls}.union(*(with_subclasses(c) for c in cls.__subclasses__()))

    assert {c.exit_code for c in with_subclasses(QstratError)} <= set(EXIT_CODES)  # each documented
    result = run_cli("qstrat", "--help")
    assert all(f"{code} {words}" in " ".join(result.stdout.split()) for code, (words, _) in EXIT_CODES.items())


@pytest.mark.parametrize("var", [v for v in ENVIRONMENT if v.key != "strategies"], ids=lambda v: v.name)
def test_documented_defaults_are_the_models(var):
    value = RunConfig().model_dump()
    for part in var.key.split("."):
        value = value[part]
    assert var.parse(var.default, var.name) == value


def test_environment_pair_selects_the_original_tools_chain():
    assert environment_settings({}) == {}
    assert environment_settings({"CANDLE_Q8K_STRATEGY": "amax"}) == {"strategies": ["identity"]}
    assert environment_settings({"CANDLE_Q8K_PERMUTE": "on"}) == {"strategies": ["l2_norm"]}
    both = {"CANDLE_Q8K_PERMUTE": "1", "CANDLE_Q8K_STRATEGY": "attention_aware", "CANDLE_Q8K_THREADS": "3"}
    assert environment_settings(both) == {"strategies": ["attention_aware", "l2_norm"], "parallel.workers": 3}
    with pytest.raises(qstrat.QstratError, match="CANDLE_Q8K_STRATEGY: unknown strategy 'l3'"):
        environment_settings({"CANDLE_Q8K_STRATEGY": "l3"})  # checked even where it changes nothing
    with pytest.raises(qstrat.QstratError, match="CANDLE_Q8K_VARIANT: unknown Q8K variant"):
        environment_settings({"CANDLE_Q8K_VARIANT": "q4k"})
    # set but empty: an error for every variable (these two used to mean off, dropping a config's thresholds or chain)
    for name in ("CANDLE_Q8K_PERMUTE", "CANDLE_Q8K_VALIDATION", "CANDLE_Q8K_THREADS"):
        with pytest.raises(qstrat.QstratError, match=f"{name}: expected .*, got ''"):
            environment_settings({name: ""})
    # digits only (Python's int() took 1_0 as 10); spaces around a value are dropped for every variable
    for threads in ("1_0", "2.0", "0x2", "-1"):
        with pytest.raises(qstrat.QstratError, match="CANDLE_Q8K_THREADS: expected a positive integer"):
            environment_settings({"CANDLE_Q8K_THREADS": threads})
    assert environment_settings({"CANDLE_Q8K_THREADS": " +2 ", "CANDLE_Q8K_VARIANT": " ggml\n"}) == {"parallel.workers": 2, "variant": "ggml"}


def test_a_misspelt_variable_is_a_warning(tmp_path):
    from tests.conftest import REPO
    from tests.helpers import run_cli

    result = run_cli("qstrat", "run", str(REPO / "configs" / "identity.yaml"), "-o", str(tmp_path / "o"), "--dry-run",
                     env={"CANDLE_Q8K_THREAD": "2"})
    assert result.returncode == 0
    assert "warning: CANDLE_Q8K_THREAD is not a variable qstrat reads" in result.stderr
    assert "CANDLE_Q8K_THREADS" in run_cli("qstrat", "run", "--help").stdout  # the variables, in run's help


def test_seed_constructor_builds_the_run_model():
    config = QuantizationConfig(StrategyType.AMAX, True, ("x",), "out", validation=False, workers=2)
    assert isinstance(config, RunConfig)
    assert config.strategies == ["amax"] and config.skip_patterns == ["x"] and config.output_dir.name == "out"
    assert not config.validation.enabled and config.parallel.workers == 2 and not config.force
    assert QuantizationConfig(StrategyType.AMAX).strategies == ["identity"]  # no permutation asked
    assert QuantizationConfig(attention_aware=True, use_permutation=True).strategies == ["attention_aware", "l2_norm"]
    assert QuantizationConfig(force=True).with_environment({"CANDLE_Q8K_PERMUTE": "1"}).force
    assert QuantizationConfig().model_dump() == RunConfig(output="./quantized").model_dump()  # defaults: the model's


ENVIRONMENTS = [
    {"CANDLE_Q8K_STRATEGY": "amax"},
    {"CANDLE_Q8K_PERMUTE": "1", "CANDLE_Q8K_STRATEGY": "attention_aware"},
    {"CANDLE_Q8K_PERMUTE": "off", "CANDLE_Q8K_STRATEGY": "amax", "CANDLE_Q8K_VALIDATION": "0", "CANDLE_Q8K_VARIANT": "ggml"},
]


@pytest.mark.parametrize("env", ENVIRONMENTS, ids=lambda e: ",".join(f"{k[11:]}={v}" for k, v in e.items()))
def test_environment_means_the_same_to_both_commands_and_the_library(tmp_path, env):
    model = tmp_path / "m"
    model.mkdir()
    w = np.linspace(-1, 1, 4 * 512, dtype=np.float32).reshape(4, 512)
    write_safetensors(model / "model.safetensors", [("q_proj.weight", "F32", w.shape, w)])
    config = tmp_path / "c.yaml"
    config.write_text(f"input: {model}\noutput: {tmp_path}/run\n")
    assert run_cli("qstrat", "run", str(config), "-q", env=env).returncode == 0
    assert run_cli("quantize_q8k", str(model), str(tmp_path / "legacy"), env=env).returncode == 0
    settings = [json.loads((tmp_path / d / "manifest.json").read_text())["config"] for d in ("run", "legacy")]
    library = QuantizationConfig().with_environment(env).describe()
    for described in settings:
        assert {k: described[k] for k in library} == library


def test_the_library_refuses_settings_a_file_would_refuse(tmp_path):
    # a string where a list belongs would become one entry per character (skip_patterns="norm" skipped
    # every tensor), an empty output directory the current one, a dict a config nobody validated
    for settings, message in (({"skip_patterns": "norm"}, "skip_patterns: a list of names, not the string 'norm'"),
                              ({"strategies": "l2_norm"}, "strategies: a list of names"),
                              ({"output_dir": ""}, "output: an empty path")):
        with pytest.raises(qstrat.QstratError, match=message):
            QuantizationConfig(**settings)
    with pytest.raises(qstrat.QstratError, match="config is a QuantizationConfig"):
        qstrat.quantize_safetensors(REPO / "examples" / "tiny-llama", {"output": str(tmp_path / "o")})
    assert not (tmp_path / "o").exists()
    with pytest.raises(qstrat.QstratError, match="input_path is one path"):  # a TypeError from pathlib
        qstrat.quantize_safetensors([REPO / "examples" / "tiny-llama"], QuantizationConfig(output_dir=tmp_path / "o"))


def test_an_output_template_of_the_library_is_filled_as_a_files(tmp_path):
    # RunConfig's keys are a config file's: {model} made a directory of that name
    config = RunConfig.build({"output": str(tmp_path / "{model}-q8k"), "validation": {"enabled": False}}, "test")
    result = qstrat.quantize_safetensors(REPO / "examples" / "tiny-llama", config)
    assert result.output_dir == tmp_path / "tiny-llama-q8k" and (tmp_path / "tiny-llama-q8k" / "manifest.json").exists()
    with pytest.raises(qstrat.QstratError, match=r"only \{model\} may be used, not \{model.name\}"):
        qstrat.quantize_safetensors(REPO / "examples" / "tiny-llama", RunConfig.build({"output": str(tmp_path / "{model.name}")}, "test"))


def test_every_threshold_has_its_stage_and_metric():
    from qstrat.matrix import TensorMetrics
    from qstrat.runconfig import THRESHOLDS, Thresholds
    from qstrat.validation import STAGES

    assert set(THRESHOLDS) == set(Thresholds.model_fields)
    for stage, metric, bound in THRESHOLDS.values():
        assert stage in STAGES and metric in TensorMetrics.__dataclass_fields__ and bound in ("min", "max")



def test_the_readmes_architecture_names_every_module():
    import re
    import subprocess

    readme = (REPO / "README.md").read_text()
    architecture = readme[readme.index("## Architecture") : readme.index("## License")]
    tracked = subprocess.run(["git", "ls-files", "qstrat", "kernels", "pipelines"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    modules = [Path(f) for f in tracked if f.endswith(".py") and Path(f).stem not in ("__init__", "__main__", "_version")]
    assert modules
    assert [str(m) for m in modules if not re.search(rf"\b{re.escape(m.stem)}\b", architecture)] == []


def test_a_missing_relative_input_says_it_is_relative_to_the_config_file(tmp_path):
    config = tmp_path / "configs" / "c.yaml"
    config.parent.mkdir()
    config.write_text("input: examples/tiny-llama\noutput: out\n")
    result = run_cli("qstrat", "run", str(config))
    assert result.returncode == 2
    assert f"line 1: input: examples/tiny-llama names {tmp_path / 'configs' / 'examples' / 'tiny-llama'}, which does not exist" in result.stderr
    assert "relative to the file's directory" in result.stderr
