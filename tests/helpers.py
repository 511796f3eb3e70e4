"""Shared test helpers: model builders and CLI runners."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import time
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


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a console script of this package as a user would (in ``cwd``), capturing output."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLE_Q8K_")}
    full_env.update(env or {})
    script = Path(sys.executable).with_name(args[0])
    command = [str(script)] if script.exists() else [args[0]]
    process = subprocess.Popen(command + list(args[1:]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd)
    stdout, stderr = communicate_or_dump_stacks(process, timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@contextlib.contextmanager
def held_lock(path: Path):
    """Hold an flock on ``path``, as a writer still writing its temporary holds one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def communicate_or_dump_stacks(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``process.communicate(timeout)``; if the process hangs instead, fail with the stacks of
    its threads: conftest sets PYTHONFAULTHANDLER, so SIGABRT makes Python print them."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate()
        raise AssertionError(f"{process.args} still running after {timeout} s; its threads:\n{stderr[-20000:]}") from None


def journal_lines(out: Path) -> int:
    """Lines of a run's journal: its fingerprint, then one per finished group."""
    try:
        return len((out / ".qstrat-journal.jsonl").read_text().splitlines())
    except OSError:
        return 0


def descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (children, their children, ...)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found + [g for c in found for g in descendants(c)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def loky_workers(pid: int) -> list[int]:
    """The joblib (loky) worker processes under ``pid``: not its resource trackers."""
    return [c for c in descendants(pid) if "loky.backend.popen_loky_posix" in _cmdline(c)]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def wait_for(condition, timeout: float, what: str):
    """Poll ``condition`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)
    return value


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A non-zero exit without a traceback, whose message (on stderr, or with --json the line's
    ``error``) holds every fragment."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    shown = result.stderr
    try:
        shown += json.loads(result.stdout.strip().splitlines()[-1]).get("error") or ""
    except (ValueError, IndexError, AttributeError):
        pass  # not a --json command
    for fragment in fragments:
        assert fragment in shown, shown


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


#: tokenizer.json pre-tokenizers of known models, for tokenizers made by the tests
LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
TOKENIZER_TEXT = [
    "the quick brown fox jumps over the lazy dog 12345, said the model.",
    "Quantized weights keep their rows: blocks of 32 or 256 values never cross a row!",
    "llama.cpp loads a GGUF file; qstrat writes one. Don't forget the tokenizer's merges.",
]


def make_bpe_tokenizer(directory: Path, vocab_size: int, style: str = "gpt2", seed: int = 0) -> list[str]:
    """A tiny byte-level BPE tokenizer (``tokenizers``) trained on generated text, saved as
    tokenizer.json and tokenizer_config.json (bos/eos, chat template) in ``directory``.
    ``style``: ``gpt2`` (ByteLevel pre-tokenizer), ``llama3`` or ``qwen2`` (their Split regex,
    then ByteLevel), or ``odd`` (whitespace splitting, which llama.cpp does not know).
    Returns the training text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(seed)
    words = " ".join(TOKENIZER_TEXT).split()
    text = [" ".join(rng.choice(words, 12)) for _ in range(200)] + TOKENIZER_TEXT
    tokenizer = Tokenizer(models.BPE())
    if style == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style in ("llama3", "qwen2"):
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT), behavior="isolated")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(text, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": specials[1],
        "add_bos_token": True, "add_eos_token": False,
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return text


def make_sentencepiece_tokenizer(directory: Path, vocab_size: int, seed: int = 0) -> list[str]:
    """A tiny SentencePiece BPE ``tokenizer.model`` with byte fallback (Llama 2 style: <unk> 0,
    <s> 1, </s> 2), trained on generated text.  Returns the training text."""
    import sentencepiece

    rng = np.random.default_rng(seed)
    words = " ".join(TOKENIZER_TEXT).split()
    text = [" ".join(rng.choice(words, 12)) for _ in range(200)] + TOKENIZER_TEXT
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(text))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
    )
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    return text


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_value(vtype: int, value: object, element: int | None = None) -> bytes:
    if vtype == 8:  # STRING
        encoded = value.encode() if isinstance(value, str) else bytes(value)
        return struct.pack("<Q", len(encoded)) + encoded
    if vtype == 9:  # ARRAY
        return struct.pack("<IQ", element, len(value)) + b"".join(_gguf_value(element, v) for v in value)
    return struct.pack(_GGUF_SCALARS[vtype], value)


def raw_gguf(path: Path, kvs: list[tuple], tensors: list[tuple[str, int, tuple[int, ...], bytes, int]]) -> Path:
    """A GGUF v3 file written byte by byte, so that a test can make what gguf-py's writer refuses (an empty
    array) or never writes (offsets of its choosing).  ``kvs``: (key, GGUF value type, value[, element type]);
    ``tensors``: (name, GGML type, shape as GGUF's ne, data, offset from the data section's start)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, vtype, value, *element in kvs:
        head += _gguf_value(8, key) + struct.pack("<I", vtype) + _gguf_value(vtype, value, *element)
    for name, ggml_type, ne, _, offset in tensors:
        head += _gguf_value(8, name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", ggml_type, offset)
    data = bytearray(max((offset + len(raw) for *_, raw, offset in tensors), default=0))
    for *_, raw, offset in tensors:
        data[offset : offset + len(raw)] = raw
    path.write_bytes(head + b"\0" * (-len(head) % 32) + bytes(data))
    return path


def rewrite_gguf(source: Path, target: Path, retype, keep_qstrat_keys: bool = True) -> Path:
    """``source`` rewritten with gguf-py as another tool (llama.cpp's quantizer) rewrites a file: every
    key copied (qstrat's own too, unless ``keep_qstrat_keys`` is false), each tensor as
    ``retype(tensor)`` gives it: ``(array, raw GGML type or None)``."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, str(reader.fields["general.architecture"].contents()))
    skipped = ("GGUF.",) if keep_qstrat_keys else ("GGUF.", "qstrat.")
    for key, field in reader.fields.items():
        if not key.startswith(skipped) and key != "general.architecture":
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        array, raw_type = retype(tensor)
        writer.add_tensor(tensor.name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
