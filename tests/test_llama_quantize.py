"""llama.cpp's own quantizer is the judge of qstrat's presets and bytes, and llama.cpp runs every type.

qstrat's F32 GGUF of a model (``format: f32``) is a llama.cpp model, so llama.cpp's
``llama_model_quantize`` (what ``llama-quantize`` runs: ``ggml_quantize_chunk`` on the F32 rows,
no importance matrix) can quantize it.  For every preset, qstrat's GGUF of the same Hugging Face
directory (``preset: <name>``) must hold the same tensors, of the same types, with the same bytes;
for every type qstrat writes, its uniform ``format: <type>`` must be llama.cpp's ``pure``
quantization.  Then llama.cpp evaluates each uniform file and its next-token distributions move
away from the F32 file's as the bits per weight fall.

llama.cpp runs in subprocesses (tests/llama_cpp_quantize.py, tests/llama_cpp_probe.py): it must
never be loaded into the process that loads libggml-python, the other tests' oracle.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a tier of its own: python -m pytest -m slow

from qstrat.pipelines.run import quantize_model
from qstrat.presets import file_type, preset_names
from qstrat.runconfig import RunConfig
from qstrat.synthetic import LlamaShape, hf_config, llama_tensors, write_model
from tests.helpers import make_bpe_tokenizer, run_cli

HERE = Path(__file__).parent
QUANTIZE = HERE / "llama_cpp_quantize.py"
PROBE = HERE / "llama_cpp_probe.py"

#: every preset but q2_k_s, which needs an importance matrix (refused by both without one)
PRESETS = [p for p in preset_names() if p != "q2_k_s"]

_F = gguf.LlamaFileType
#: the types qstrat writes, and the llama.cpp file type whose default type each is (with
#: params.pure, every tensor takes it: the K_M / K_S rules are skipped)
PURE = {
    "q8_0": _F.MOSTLY_Q8_0, "q4_0": _F.MOSTLY_Q4_0, "q4_1": _F.MOSTLY_Q4_1, "q5_0": _F.MOSTLY_Q5_0,
    "q5_1": _F.MOSTLY_Q5_1, "q2_k": _F.MOSTLY_Q2_K, "q3_k": _F.MOSTLY_Q3_K_M, "q4_k": _F.MOSTLY_Q4_K_M,
    "q5_k": _F.MOSTLY_Q5_K_M, "q6_k": _F.MOSTLY_Q6_K, "iq4_nl": _F.MOSTLY_IQ4_NL,
}


@dataclass(frozen=True)
class Spec:
    shape: LlamaShape
    config: dict
    tied: bool = False
    biases: bool = False
    tokenizer: str = "gpt2"


#: three small models, each exercising other rules
#: - "kl": the tests' Llama (grouped-query attention, 4 query heads on 2 key/value heads, a BPE
#:   vocabulary), 4 layers: use_more_bits takes layers 2 and 3 (attn_v, ffn_down of q4_k_m /
#:   q5_k_m); every row a multiple of 256. Also the model whose next-token distributions are
#:   compared (test_every_type_runs_and_kl_falls_with_bits).
#: - "deep": 8 layers, so every clause of use_more_bits and the n/8 rules pick some layers and not
#:   others; ffn_down rows of 384 (the K-quants fall back to 32-blocks: Q6_K -> Q8_0, Q4_K ->
#:   Q5_0...); 8 query heads on 2 (n_gqa 4: q2_k's attn_v is Q4_K); tied embeddings (token_embd
#:   takes the output tensor's rule).
#: - "odd": Qwen2 with q/k/v biases, rows of 288 everywhere but ffn_down (the output tensor rule's
#:   "not a multiple of 256 -> Q8_0", every K-quant falls back) and ffn_down rows of 400, which
#:   no 32-block type takes (F16).
KL_SHAPE = LlamaShape(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
DEEP_SHAPE = LlamaShape(vocab_size=320, hidden_size=256, intermediate_size=384, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=2)
ODD_SHAPE = LlamaShape(vocab_size=320, hidden_size=288, intermediate_size=400, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=1)
SPECS = {
    "kl": Spec(KL_SHAPE, hf_config(KL_SHAPE)),
    "deep": Spec(DEEP_SHAPE, {**hf_config(DEEP_SHAPE), "tie_word_embeddings": True}, tied=True),
    "odd": Spec(ODD_SHAPE, {**hf_config(ODD_SHAPE), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
                biases=True, tokenizer="qwen2"),
}
#: the models whose uniform formats are compared with llama.cpp's pure quantization
PURE_MODELS = ("kl", "odd")
#: presets compared with an importance matrix (qstrat imatrix's, given to both quantizers): the
#: weighted K-quant and legacy paths, the guard of q4_0 and q5_0 on the first ffn_down layers (with an
#: imatrix only) and q2_k_s, which requires one
IMATRIX_PRESETS = ("q4_k_m", "q4_0", "q5_0", "q2_k_s", "q3_k_s")
#: presets applied to llama.cpp's Q4_K_M of a model made with an importance matrix (what users
#: download), by both quantizers: every tensor already in its type copied (q4_k_m: all of them),
#: the others requantized from their decoded values (with that imatrix, Q4_K's bytes are no fixed
#: point of requantizing them without one)
REQUANTIZED = ("q4_k_m", "q5_k_m", "q3_k_m")
#: llama.cpp's file types in the types qstrat reads but does not write (made with the importance
#: matrix, which the lowest-bit ones require), each then requantized to q4_k_m by both quantizers;
#: together they store every such type but MXFP4 (llama.cpp gives it to MoE experts only)
DECODED_FILE_TYPES = {name: int(_F[f"MOSTLY_{name.upper()}"]) for name in (
    "iq2_xxs", "iq2_xs", "iq2_m", "iq3_xxs", "iq3_m", "iq1_s", "iq1_m", "iq4_xs", "tq1_0", "tq2_0")}


#: the MoE model: the kl model's layers with 8 experts each (2 used a token), llama.cpp's layout
#: (ffn_gate_inp, ffn_{gate,up,down}_exps), as llama.cpp's own GGUF of a Mixtral holds them.  8
#: experts take the presets' rules for them (attn_v and attn_k of 8-expert models)
MOE_EXPERTS, MOE_USED = 8, 2
MOE_PRESETS = ("q4_k_m", "q3_k_m", "q5_k_s", "q2_k", "q8_0")
MOE_IMATRIX_PRESETS = ("q4_k_m", "q4_0")


def moe_gguf(dense: Path, target: Path, seed: int = 4) -> Path:
    """``dense`` (an F32 llama.cpp GGUF) with each layer's MLP replaced by a mixture of experts, F32."""
    reader = gguf.GGUFReader(dense)
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(target, arch)
    for key, field in reader.fields.items():
        if not key.startswith(("GGUF.", "qstrat.")) and key != "general.architecture":
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    writer.add_uint32(f"{arch}.expert_count", MOE_EXPERTS)
    writer.add_uint32(f"{arch}.expert_used_count", MOE_USED)
    rng = np.random.default_rng(seed)
    for tensor in reader.tensors:
        name = tensor.name
        if name.endswith(("ffn_gate.weight", "ffn_up.weight")):
            continue
        if not name.endswith("ffn_down.weight"):
            writer.add_tensor(name, np.asarray(tensor.data))
            continue
        layer = name.rsplit(".", 2)[0]
        ff, hidden = (int(d) for d in tensor.shape.tolist())  # ffn_down's ne: [ff, hidden]
        scales = rng.uniform(0.5, 2.0, (MOE_EXPERTS, 1, 1)).astype(np.float32)  # experts of other magnitudes
        writer.add_tensor(f"{layer}.ffn_gate_inp.weight", (rng.standard_normal((MOE_EXPERTS, hidden)) * 0.3).astype(np.float32))
        for projection, rows, k in (("gate", ff, hidden), ("up", ff, hidden), ("down", hidden, ff)):
            values = rng.standard_normal((MOE_EXPERTS, rows, k)).astype(np.float32) * (scales / np.sqrt(k))
            writer.add_tensor(f"{layer}.ffn_{projection}_exps.weight", np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def moe_imatrix(model: Path, target: Path, seed: int = 5) -> Path:
    """An importance matrix for every matrix of ``model`` (a GGUF), one vector per expert of a stack,
    one expert that no token reached (llama-quantize gives it ones)."""
    from qstrat.imatrix import ImportanceEntry, ImportanceMatrix, write_imatrix

    rng = np.random.default_rng(seed)
    entries = {}
    for tensor in gguf.GGUFReader(model).tensors:
        ne = [int(d) for d in tensor.shape.tolist()]
        if len(ne) < 2 or tensor.name.startswith("token_embd"):
            continue
        matrices = ne[2] if len(ne) == 3 else 1
        sums = rng.gamma(0.5, 4.0, (matrices, ne[0])).astype(np.float32)
        counts = rng.integers(5, 40, matrices)
        if matrices > 1:
            counts[3] = 0
        entries[tensor.name] = ImportanceEntry(sums * counts[:, None], counts)
    write_imatrix(target, ImportanceMatrix(entries, ["made up"], 4, 32))
    return target


def qstrat_gguf(model_dir: Path, out: Path, **settings) -> Path:
    """qstrat's GGUF of a Hugging Face directory, as ``qstrat run --set key=value`` writes it."""
    config = RunConfig.build({"validation": {"enabled": False}, **settings}, "test")
    quantize_model(model_dir, config, out)
    return out / f"{model_dir.name}.gguf"


class LlamaQuantizer:
    """llama.cpp's quantizer working through a list of jobs in a subprocess, while the tests go
    on (qstrat quantizes meanwhile); :meth:`wait_for` returns a job's output once it is complete."""

    def __init__(self, jobs: list[dict], log: Path) -> None:
        self.log = log
        with open(log, "wb") as stderr:  # a file: llama.cpp's log would fill a pipe and block it
            self.process = subprocess.Popen([sys.executable, str(QUANTIZE), json.dumps(jobs)], stdout=subprocess.DEVNULL,
                                            stderr=stderr)

    def wait_for(self, out: Path, timeout: float = 300) -> Path:
        deadline = time.monotonic() + timeout
        while not out.exists():
            if self.process.poll() is not None and not out.exists():
                raise AssertionError(f"llama.cpp's quantizer stopped (exit {self.process.returncode}) before "
                                     f"{out.name}:\n{self.log.read_text(errors='replace')[-3000:]}")
            assert time.monotonic() < deadline, f"llama.cpp's quantizer: no {out.name} after {timeout} s"
            time.sleep(0.01)
        return out

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@dataclass
class Model:
    directory: Path
    f32: Path  # qstrat's F32 GGUF of it, the input of llama.cpp's quantizer
    llama: dict[str, Path]  # preset, "pure-<type>" or "imatrix-<preset>" -> llama.cpp's output for it
    imatrix: Path | None = None  # qstrat imatrix's importance matrix of it


@pytest.fixture(scope="module", autouse=True)
def no_report_plot():
    """The runs' report.png (matplotlib: 0.4 s of CPU a run, about 40 % of a run on these models)
    is left out, as an install without matplotlib does: it is no part of the GGUF compared here."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("qstrat.report.plot_sqnr", lambda *args, **kwargs: None)
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The three models, their F32 GGUFs, and llama.cpp quantizing them to every preset and pure type."""
    root = tmp_path_factory.mktemp("llama-quantize")
    made: dict[str, Model] = {}
    for name, spec in SPECS.items():
        tensors = llama_tensors(spec.shape, seed=11)
        if spec.tied:
            del tensors["lm_head.weight"]
        if spec.biases:
            rng = np.random.default_rng(11)
            kv_rows = spec.shape.num_key_value_heads * spec.shape.head_dim
            for i in range(spec.shape.num_hidden_layers):
                for proj, rows in (("q", spec.shape.hidden_size), ("k", kv_rows), ("v", kv_rows)):
                    tensors[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = (0.5 * rng.standard_normal(rows)).astype(np.float32)
        directory = write_model(root / name / name, tensors, dtype="BF16", config=spec.config)
        lines = make_bpe_tokenizer(directory, spec.shape.vocab_size, style=spec.tokenizer)
        text = root / name / "text.txt"
        text.write_text("\n".join(lines[:60]) + "\n", encoding="utf-8")
        imatrix = root / name / "imatrix.gguf"
        collected = run_cli("qstrat", "imatrix", str(directory), "--text", str(text), "-o", str(imatrix), "--ctx", "32", "--chunks", "2")
        assert collected.returncode == 0, collected.stderr
        made[name] = Model(directory, qstrat_gguf(directory, root / name / "f32", format="f32"), {}, imatrix)
    # the jobs in the order the tests need them
    jobs = []
    for preset in PRESETS:
        for name, model in made.items():
            model.llama[preset] = root / name / f"llama-{preset}.gguf"
            jobs.append({"in": str(model.f32), "out": str(model.llama[preset]), "ftype": file_type(preset)})
    for type_name, ftype in PURE.items():
        for name in PURE_MODELS:
            model = made[name]
            model.llama[f"pure-{type_name}"] = root / name / f"llama-pure-{type_name}.gguf"
            jobs.append({"in": str(model.f32), "out": str(model.llama[f"pure-{type_name}"]), "ftype": int(ftype), "pure": True})
    for preset in IMATRIX_PRESETS:
        for name, model in made.items():
            model.llama[f"imatrix-{preset}"] = root / name / f"llama-imatrix-{preset}.gguf"
            jobs.append({"in": str(model.f32), "out": str(model.llama[f"imatrix-{preset}"]), "ftype": file_type(preset),
                         "imatrix": str(model.imatrix)})
    for preset in REQUANTIZED:
        for name in ("kl", "deep"):
            model = made[name]
            model.llama[f"requantized-{preset}"] = root / name / f"llama-requantized-{preset}.gguf"
            jobs.append({"in": str(model.llama["imatrix-q4_k_m"]), "out": str(model.llama[f"requantized-{preset}"]),
                         "ftype": file_type(preset), "requantize": True})
    for file_type_name, ftype in DECODED_FILE_TYPES.items():
        model = made["kl"]
        made_file, requantized = root / "kl" / f"llama-{file_type_name}.gguf", root / "kl" / f"llama-{file_type_name}-q4_k_m.gguf"
        model.llama[file_type_name], model.llama[f"{file_type_name}-q4_k_m"] = made_file, requantized
        jobs.append({"in": str(model.f32), "out": str(made_file), "ftype": ftype, "imatrix": str(model.imatrix)})
        jobs.append({"in": str(made_file), "out": str(requantized), "ftype": file_type("q4_k_m"), "requantize": True})
    quantizer = LlamaQuantizer(jobs, root / "llama-quantize.log")
    try:
        yield made, quantizer
    finally:
        quantizer.close()


@pytest.fixture(scope="module")
def moe(models, tmp_path_factory):
    """The MoE model (kl's layers with experts), its importance matrix, and llama.cpp quantizing it."""
    made, _ = models
    root = tmp_path_factory.mktemp("llama-quantize-moe")
    model = Model(root, moe_gguf(made["kl"].f32, root / "moe.gguf"), {})
    model.imatrix = moe_imatrix(model.f32, root / "imatrix.gguf")
    jobs = []
    for preset in MOE_PRESETS:
        model.llama[preset] = root / f"llama-{preset}.gguf"
        jobs.append({"in": str(model.f32), "out": str(model.llama[preset]), "ftype": file_type(preset)})
    for preset in MOE_IMATRIX_PRESETS:
        model.llama[f"imatrix-{preset}"] = root / f"llama-imatrix-{preset}.gguf"
        jobs.append({"in": str(model.f32), "out": str(model.llama[f"imatrix-{preset}"]), "ftype": file_type(preset),
                     "imatrix": str(model.imatrix)})
    for type_name in ("q4_k", "q8_0"):
        model.llama[f"pure-{type_name}"] = root / f"llama-pure-{type_name}.gguf"
        jobs.append({"in": str(model.f32), "out": str(model.llama[f"pure-{type_name}"]), "ftype": int(PURE[type_name]), "pure": True})
    model.llama["requantized-q5_k_m"] = root / "llama-requantized-q5_k_m.gguf"
    jobs.append({"in": str(model.llama["imatrix-q4_k_m"]), "out": str(model.llama["requantized-q5_k_m"]),
                 "ftype": file_type("q5_k_m"), "requantize": True})
    quantizer = LlamaQuantizer(jobs, root / "llama-quantize.log")
    try:
        yield model, quantizer
    finally:
        quantizer.close()


@pytest.fixture(scope="module")
def uniform(models) -> Callable[[str, str], Path]:
    """qstrat's GGUF of a model in one uniform ``format``, made once."""
    made, _ = models
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, type_name: str) -> Path:
        if (name, type_name) not in cache:
            model = made[name]
            cache[name, type_name] = qstrat_gguf(model.directory, model.f32.parent.parent / f"format-{type_name}", format=type_name)
        return cache[name, type_name]

    return get


@dataclass(frozen=True)
class GGUFTensors:
    file_type: int | None  # general.file_type (qstrat writes none for q3_k / q4_k / q5_k: llama.cpp has no such file type)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]]  # name -> (GGML type, shape, stored bytes)

    def types(self) -> dict[str, str]:
        return {name: t[0] for name, t in self.tensors.items()}


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@functools.lru_cache(maxsize=None)
def read_gguf(path: Path) -> GGUFTensors:
    """A GGUF file's tensors and general.file_type, read once, by the GGUF v3 layout alone
    (neither qstrat's reader nor gguf-py's GGUFReader, which takes 40 ms a file here)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        size = take("<Q")
        pos += size
        return data[pos - size:pos].decode("utf-8")

    def value(kind: int):
        if kind == 8:
            return string()
        if kind == 9:
            item, count = take("<I"), take("<Q")
            return [value(item) for _ in range(count)]
        return take(_SCALARS[kind])

    assert data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 3, path
    pos = 8
    n_tensors, n_kv = take("<Q"), take("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        shape = tuple(take("<Q") for _ in range(take("<I")))
        infos.append((name, gguf.GGMLQuantizationType(take("<I")), shape, take("<Q")))
    alignment = metadata.get("general.alignment", 32)
    start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, kind, shape, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        n_bytes = shape[0] // block * size * math.prod(shape[1:])
        tensors[name] = (kind.name, shape, data[start + offset:start + offset + n_bytes])
    return GGUFTensors(metadata.get("general.file_type"), tensors)


def assert_same_tensors(ours: Path, theirs: Path, label: str) -> dict[str, str]:
    """The same tensor names, GGML types, shapes and bytes in both files; returns {name: type}."""
    mine, judge = read_gguf(ours).tensors, read_gguf(theirs).tensors
    assert sorted(mine) == sorted(judge), f"{label}: tensors only in qstrat's file: {sorted(set(mine) - set(judge))}, only in llama.cpp's: {sorted(set(judge) - set(mine))}"
    types = [f"{n}: qstrat {mine[n][0]}, llama.cpp {judge[n][0]}" for n in judge if mine[n][0] != judge[n][0]]
    assert not types, f"{label}: other types: " + "; ".join(types)
    shapes = [n for n in judge if mine[n][1] != judge[n][1]]
    assert not shapes, f"{label}: other shapes: {shapes}"
    different = [f"{n} ({judge[n][0]})" for n in judge if mine[n][2] != judge[n][2]]
    assert not different, f"{label}: other bytes: {different}"
    return read_gguf(theirs).types()


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_llama_cpp_quantizations(models, tmp_path, preset):
    """Every preset gives each tensor llama.cpp's type and bytes (no importance matrix)."""
    made, quantizer = models
    for name, model in made.items():
        ours = qstrat_gguf(model.directory, tmp_path / name, preset=preset)
        theirs = quantizer.wait_for(model.llama[preset])
        assert_same_tensors(ours, theirs, f"{name}, preset {preset}")
        assert read_gguf(ours).file_type == read_gguf(theirs).file_type == file_type(preset)
    # llama.cpp's file copies every key of qstrat's F32 one, its stale checksum too: rewritten, not damaged
    verified = run_cli("qstrat", "verify", str(theirs))
    assert verified.returncode == 0 and "intact as far as its structure goes" in verified.stdout, verified.stdout + verified.stderr


@pytest.mark.parametrize("preset", IMATRIX_PRESETS)
def test_presets_with_an_imatrix_are_llama_cpp_quantizations(models, tmp_path, preset):
    """With the importance matrix qstrat imatrix collected, each preset gives every tensor llama.cpp's
    type and bytes: the weighted quantizers, and the rules that depend on having an imatrix."""
    made, quantizer = models
    for name, model in made.items():
        ours = qstrat_gguf(model.directory, tmp_path / name, preset=preset, imatrix=str(model.imatrix))
        theirs = quantizer.wait_for(model.llama[f"imatrix-{preset}"])
        types = assert_same_tensors(ours, theirs, f"{name}, preset {preset} with an imatrix")
        if preset == "q4_0" and name == "deep":  # the guard: the first ffn_down layer (i < n/8) is Q4_1
            assert types["blk.0.ffn_down.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q4_0"


@pytest.mark.parametrize("preset", REQUANTIZED)
def test_a_quantized_gguf_is_requantized_as_llama_cpp_requantizes_it(models, tmp_path, preset):
    """A quantized GGUF input (llama.cpp's Q4_K_M, made with an importance matrix): each preset gives
    llama.cpp's types and bytes, copying every tensor already in the type it chooses."""
    made, quantizer = models
    for name in ("kl", "deep"):
        source = quantizer.wait_for(made[name].llama["imatrix-q4_k_m"])
        config = RunConfig.build({"validation": {"enabled": False}, "preset": preset}, "test")
        quantize_model(source, config, tmp_path / name)
        theirs = quantizer.wait_for(made[name].llama[f"requantized-{preset}"])
        assert_same_tensors(tmp_path / name / source.name, theirs, f"{name}, preset {preset} of llama.cpp's Q4_K_M")
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())["tensors"]
        copied = {n for n, t in manifest.items() if t.get("copied")}
        kept = {n for n, t in manifest.items() if t.get("source_type") and t["source_type"] == t["storage"]}
        assert copied == kept and copied, f"{name}, {preset}: copied {sorted(copied)}, kept their type {sorted(kept)}"


def test_llama_cpps_lowest_bit_files_are_read_as_llama_cpp_reads_them(models, tmp_path):
    """llama.cpp's IQ1..IQ3, IQ4_XS and ternary files, requantized to q4_k_m: qstrat decodes the types it
    does not write exactly as GGML does, so its file is llama.cpp's own requantization, byte for byte."""
    from qstrat.formats import DECODED_ONLY

    made, quantizer = models
    seen = set()
    for file_type_name in DECODED_FILE_TYPES:
        source = quantizer.wait_for(made["kl"].llama[file_type_name])
        seen |= {t.lower() for t in read_gguf(source).types().values()}
        config = RunConfig.build({"validation": {"enabled": False}, "preset": "q4_k_m"}, "test")
        quantize_model(source, config, tmp_path / file_type_name)
        theirs = quantizer.wait_for(made["kl"].llama[f"{file_type_name}-q4_k_m"])
        assert_same_tensors(tmp_path / file_type_name / source.name, theirs, f"q4_k_m of llama.cpp's {file_type_name}")
    assert set(DECODED_ONLY) - seen == {"mxfp4"}, sorted(set(DECODED_ONLY) - seen)


def test_a_moe_models_experts_are_quantized_as_llama_cpp_quantizes_them(moe, tmp_path):
    """A MoE GGUF's stacked experts (ffn_*_exps, 3-D): every preset and uniform format gives them llama.cpp's
    types and bytes, matrix by matrix, with an importance matrix of one vector per expert too, and a requantized
    MoE file copies the stacks already in their type; llama.cpp runs qstrat's file, close to the F32 one."""
    model, quantizer = moe
    cases = [(p, {"preset": p}, p) for p in MOE_PRESETS]
    cases += [(f"imatrix-{p}", {"preset": p, "imatrix": str(model.imatrix)}, f"imatrix-{p}") for p in MOE_IMATRIX_PRESETS]
    cases += [(f"format-{t}", {"format": t}, f"pure-{t}") for t in ("q4_k", "q8_0")]  # the router stays F32 there too
    for label, settings, job in cases:
        config = RunConfig.build({"validation": {"enabled": False}, **settings}, "test")
        quantize_model(model.f32, config, tmp_path / label)
        types = assert_same_tensors(tmp_path / label / model.f32.name, quantizer.wait_for(model.llama[job]), f"MoE, {label}")
        stacks = {n: t for n, t in types.items() if "_exps" in n}
        assert len(stacks) == 3 * KL_SHAPE.num_hidden_layers and "F32" not in stacks.values(), (label, stacks)
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # llama.cpp never quantizes the router
    source = quantizer.wait_for(model.llama["imatrix-q4_k_m"])
    config = RunConfig.build({"validation": {"enabled": False}, "preset": "q5_k_m"}, "test")
    quantize_model(source, config, tmp_path / "requantized")
    assert_same_tensors(tmp_path / "requantized" / source.name, quantizer.wait_for(model.llama["requantized-q5_k_m"]), "MoE, q5_k_m of Q4_K_M")
    manifest = json.loads((tmp_path / "requantized" / "manifest.json").read_text())["tensors"]
    assert any(t.get("copied") for n, t in manifest.items() if "_exps" in n)
    # llama.cpp evaluates qstrat's MoE files: finite logits, nearer the F32 model's with more bits
    files = {"f32": model.f32, **{p: tmp_path / p / model.f32.name for p in ("q8_0", "q4_k_m", "q2_k")}}
    requests = [{"model": str(path), "out": str(tmp_path / f"{name}.npy"), "tokens": KL_TOKENS} for name, path in files.items()]
    result = subprocess.run([sys.executable, str(PROBE), "--batch", json.dumps(requests)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"llama.cpp could not run the MoE files:\n{result.stderr[-3000:]}"
    logits = {name: np.load(tmp_path / f"{name}.npy") for name in files}
    assert all(np.all(np.isfinite(v)) and v.shape == (len(KL_TOKENS), KL_SHAPE.vocab_size) for v in logits.values())
    # measured: 0.018, 0.16, 0.28 nats (routing to 2 of 8 experts turns small errors into other experts)
    kl = {p: mean_kl(logits["f32"], logits[p]) for p in ("q8_0", "q4_k_m", "q2_k")}
    assert 0 < kl["q8_0"] < kl["q4_k_m"] < kl["q2_k"], kl


def test_the_models_exercise_the_rules(models):
    """What llama.cpp chose for the three models covers the rules the module docstring names:
    a check of the test's models, so that the comparisons above are not vacuous."""
    made, quantizer = models
    types = {name: read_gguf(quantizer.wait_for(m.llama["q4_k_m"])).types() for name, m in made.items()}
    kl, deep, odd = types["kl"], types["deep"], types["odd"]
    # use_more_bits on the counters: attn_v and ffn_down of layers 2, 3 of 4
    assert [kl[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert [kl[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert kl["output.weight"] == "Q6_K" and kl["token_embd.weight"] == "Q4_K"
    # 8 layers: 0 (< n/8), 3 and 6 ((i - n/8) % 3 == 2), 7 (>= 7n/8); ffn_down rows of 384 fall back
    more = ["Q6_K" if i in (0, 3, 6, 7) else "Q4_K" for i in range(8)]
    assert [deep[f"blk.{i}.attn_v.weight"] for i in range(8)] == more
    assert [deep[f"blk.{i}.ffn_down.weight"] for i in range(8)] == [{"Q6_K": "Q8_0", "Q4_K": "Q5_0"}[t] for t in more]
    assert "output.weight" not in deep and deep["token_embd.weight"] == "Q6_K"  # tied: the output rule
    # rows of 288: the output rule's Q8_0, the others' fallback; rows of 400: F16
    assert odd["output.weight"] == "Q8_0" and odd["blk.0.attn_q.weight"] == "Q5_0" and odd["blk.0.attn_v.weight"] == "Q8_0"
    assert odd["blk.0.ffn_down.weight"] == "F16" and odd["blk.0.attn_q.bias"] == "F32"
    q4_k_s = read_gguf(quantizer.wait_for(made["deep"].llama["q4_k_s"])).types()
    assert [q4_k_s[f"blk.{i}.attn_v.weight"] for i in range(8)] == ["Q5_K"] * 4 + ["Q4_K"] * 4  # i_attention_wv < 4
    assert [q4_k_s[f"blk.{i}.ffn_down.weight"] for i in range(8)] == ["Q5_1"] + ["Q5_0"] * 7  # Q5_K (i < n/8), fallen back


@pytest.mark.parametrize("type_name", list(PURE))
def test_uniform_formats_are_llama_cpp_pure_quantizations(models, uniform, type_name):
    """``format: <type>`` is llama.cpp's ``pure`` quantization to that type: every tensor the type
    (token_embd and output too), the row-length fallback aside, the same bytes."""
    made, quantizer = models
    for name in PURE_MODELS:
        theirs = quantizer.wait_for(made[name].llama[f"pure-{type_name}"])
        types = assert_same_tensors(uniform(name, type_name), theirs, f"{name}, format {type_name} (pure)")
        if name == "kl":  # every row a multiple of 256: every matrix in the type, output and token_embd too
            assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {type_name.upper()}


#: the uniform formats llama.cpp evaluates, and their bits per weight (block bytes x 8 / block
#: values: Q8_0 34 bytes for 32 values, Q4_K 144 bytes for 256...)
KL_TYPES = {"f16": 16, "q8_0": 8.5, "q6_k": 6.5625, "q5_1": 6, "q5_k": 5.5, "q5_0": 5.5, "q4_1": 5, "q4_k": 4.5,
            "q4_0": 4.5, "iq4_nl": 4.5, "q3_k": 3.4375, "q2_k": 2.625}
#: tiers of bits per weight; within a tier the order is not asserted (q5_1 has more bits than
#: q5_k, yet q5_k's finer scales may win; q4_0, q4_1, iq4_nl and q4_k trade places by model)
KL_TIERS = [["f16"], ["q8_0"], ["q6_k"], ["q5_1", "q5_k", "q5_0"], ["q4_1", "q4_k", "q4_0", "iq4_nl"], ["q3_k"], ["q2_k"]]
KL_TOKENS = [int(t) for t in np.random.default_rng(5).integers(0, KL_SHAPE.vocab_size, 64)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def mean_kl(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(P_reference || P) of the next-token distributions (nats)."""
    p, q = log_softmax(reference), log_softmax(logits)
    return float(np.mean(np.sum(np.exp(p) * (p - q), axis=-1)))


def test_every_type_runs_and_kl_falls_with_bits(models, uniform, tmp_path):
    """llama.cpp loads qstrat's GGUF of the kl model in every uniform type and evaluates 64 tokens
    (finite logits); the mean KL divergence of its next-token distributions from those of the F32
    file grows as the bits per weight fall.  Measured (nats; docs/accuracy.md):

    ======  =====  =========
    type    bpw    mean KL
    ======  =====  =========
    f16     16     9.4e-08
    q8_0    8.5    0.00017
    q6_k    6.56   0.0018
    q5_1    6      0.0038
    q5_k    5.5    0.0063
    q5_0    5.5    0.0090
    q4_1    5      0.0206
    q4_k    4.5    0.0145
    q4_0    4.5    0.0290
    iq4_nl  4.5    0.0187
    q3_k    3.44   0.0409
    q2_k    2.62   0.1020
    ======  =====  =========
    """
    assert all(KL_TYPES[t] == 8 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.upper()]][1]
               / gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.upper()]][0] for t in KL_TYPES)
    made, _ = models
    files = {"f32": made["kl"].f32, **{t: uniform("kl", t) for t in KL_TYPES}}
    requests = [{"model": str(path), "out": str(tmp_path / f"{name}.npy"), "tokens": KL_TOKENS} for name, path in files.items()]
    result = subprocess.run([sys.executable, str(PROBE), "--batch", json.dumps(requests)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"llama.cpp could not run the files:\n{result.stderr[-3000:]}"
    logits = {name: np.load(tmp_path / f"{name}.npy") for name in files}
    for name, values in logits.items():
        assert values.shape == (len(KL_TOKENS), KL_SHAPE.vocab_size) and np.all(np.isfinite(values)), name
    kl = {t: mean_kl(logits["f32"], logits[t]) for t in KL_TYPES}
    table = ", ".join(f"{t} ({KL_TYPES[t]} bpw) {value:.2g}" for t, value in kl.items())
    assert kl["f16"] == min(kl.values()), table
    assert kl["q8_0"] < kl["q6_k"] < kl["q4_k"] < kl["q3_k"] < kl["q2_k"], table
    # coarser than the chain above, finer than nothing: every tier below every tier with more bits
    for more_bits, fewer_bits in zip(KL_TIERS, KL_TIERS[1:]):
        assert max(kl[t] for t in more_bits) < min(kl[t] for t in fewer_bits), (more_bits, fewer_bits, table)
