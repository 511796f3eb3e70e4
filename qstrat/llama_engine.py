"""llama.cpp as the engine of ``qstrat eval``, through llama-cpp-python: the figures are what
llama.cpp users get at inference.

llama-cpp-python is imported only here, when a model is opened (``pip install 'qstrat[eval]'``).
It must never be loaded into a process that has loaded libggml-python (qstrat.reference, the
tests' oracle): their ggml symbols clash.  The ``qstrat`` command never loads libggml-python.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qstrat.errors import InputError

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "qstrat eval needs llama-cpp-python: pip install 'qstrat[eval]'"


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts as a GGUF file does."""
    try:
        with open(path, "rb") as stream:
            return stream.read(4) == GGUF_MAGIC
    except (IsADirectoryError, PermissionError, FileNotFoundError):
        return False


def check_gguf(path: Path, what: str = "model") -> None:
    """A clear one-line error unless ``path`` is a GGUF file (the only kind llama.cpp loads)."""
    if not path.exists():
        raise InputError(f"{path}: no such file ({what})")
    if not is_gguf(path):
        kind = "a directory" if path.is_dir() else "not a GGUF file"
        raise InputError(f"{path}: {kind}; llama.cpp evaluates GGUF files (qstrat's numpy forward, --engine numpy: "
                         "Llama-family Hugging Face models and qstrat outputs)")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return llama_cpp


def engine_name() -> str:
    """Which engine computes the figures, and its version."""
    return f"llama.cpp (llama-cpp-python {_llama_cpp().__version__})"


def _vocabulary_facts(owner, model, llama_cpp, path: Path) -> None:
    """What llama-perplexity and llama-imatrix read of a loaded vocabulary (``model``:
    llama-cpp-python's model wrapper); a file without one (type none) is refused."""
    if llama_cpp.llama_vocab_type(model.vocab) == llama_cpp.LLAMA_VOCAB_TYPE_NONE:
        # llama.cpp loads such a file with dummy tokens, then aborts the process when asked to tokenize
        raise InputError(f"{path}: has no vocabulary (tokenizer.ggml.model 'none'), so llama.cpp cannot turn text into "
                         "its tokens; qstrat writes one from the model directory's tokenizer.json or tokenizer.model")
    owner.n_vocab = int(model.n_vocab())
    # llama_vocab_get_add_bos: what common_tokenize's add_special and the chunks' BOS follow
    owner.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(model.vocab))
    owner.add_eos = bool(llama_cpp.llama_vocab_get_add_eos(model.vocab))
    owner.bos = int(model.token_bos())


class LlamaCppModel:
    """A GGUF model in llama.cpp, evaluating one chunk at a time in a fresh context."""

    def __init__(self, path: Path, ctx: int, threads: int | None = None, flash_attn: bool = False) -> None:
        check_gguf(path)
        llama_cpp = _llama_cpp()
        threads = threads or os.cpu_count() or 1
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=ctx, n_batch=min(ctx, 512), logits_all=True,
                n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn, verbose=False,
            )
        except (ValueError, RuntimeError) as err:
            raise InputError(
                f"{path}: llama.cpp cannot load this model ({err}; for a file qstrat wrote, qstrat inspect says why)"
            ) from None
        except MemoryError:
            # llama-cpp-python holds a whole context's logits (ctx x vocabulary float32) from the start
            raise InputError(f"{path}: not enough memory for a context of {ctx} tokens (its logits, ctx x vocabulary "
                             "float32, are held at once): give a smaller --ctx") from None
        self.path = path
        self.ctx = ctx
        try:
            _vocabulary_facts(self, self.llm._model, llama_cpp, path)
        except InputError:
            self.llm.close()
            raise
        self.n_ctx_train = int(self.llm._model.n_ctx_train())

    def tokenize(self, text: bytes) -> list[int]:
        """``common_tokenize(ctx, text, add_special=true, parse_special=false)``: llama-cpp-python's
        ``add_bos`` is llama_tokenize's ``add_special`` (BOS only if the vocabulary adds it), its
        ``special`` is ``parse_special``."""
        return self.llm.tokenize(text, add_bos=True, special=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """The logits of every position of ``tokens`` (``len(tokens) x n_vocab`` float32, a view that
        the next call overwrites), evaluated from an empty context."""
        if len(tokens) > self.ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit a context of {self.ctx}")
        self.llm.reset()  # the next eval removes every cached position from 0 on
        self.llm.eval(tokens)
        return self.llm.scores[: len(tokens)]

    def close(self) -> None:
        self.llm.close()


class LlamaCppTokenizer:
    """A model's vocabulary alone, loaded by llama.cpp (``vocab_only``, no context): llama.cpp's
    tokenization for an engine that computes the logits itself."""

    def __init__(self, path: Path, what: str = "model") -> None:
        check_gguf(path, what)
        llama_cpp = _llama_cpp()
        from llama_cpp._internals import LlamaModel  # what Llama wraps; no context is needed to tokenize

        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        try:
            self.model = LlamaModel(path_model=str(path), params=params, verbose=False)
        except (ValueError, RuntimeError) as err:
            raise InputError(f"{path}: llama.cpp cannot read this model's vocabulary ({err})") from None
        try:
            _vocabulary_facts(self, self.model, llama_cpp, path)
        except InputError:
            self.model.close()
            raise

    def tokenize(self, text: bytes) -> list[int]:
        """As :meth:`LlamaCppModel.tokenize` (``common_tokenize`` with ``add_special``)."""
        return self.model.tokenize(text, add_bos=True, special=False)

    def close(self) -> None:
        self.model.close()


class NumpyModel:
    """An engine of :func:`qstrat.evaluate.evaluate` whose logits come from qstrat's numpy forward
    (:mod:`qstrat.forward`) and whose tokens from llama.cpp's tokenizer of the same model."""

    def __init__(self, forward, tokenizer: LlamaCppTokenizer, source: Path) -> None:
        if forward.n_vocab != tokenizer.n_vocab:
            raise InputError(f"{source}: {forward.n_vocab} token embeddings for a vocabulary of {tokenizer.n_vocab} tokens")
        self.forward, self.tokenizer = forward, tokenizer
        self.n_vocab, self.add_bos, self.add_eos, self.bos = tokenizer.n_vocab, tokenizer.add_bos, tokenizer.add_eos, tokenizer.bos
        self.n_ctx_train = forward.params.n_ctx_train  # llama.cpp loads no hyperparameters with a vocabulary alone

    def tokenize(self, text: bytes) -> list[int]:
        return self.tokenizer.tokenize(text)

    def logits(self, tokens: list[int]) -> np.ndarray:
        return self.forward.logits(tokens)

    def collect(self, tokens: list[int], collect) -> None:
        """Evaluate ``tokens``, handing each matrix product's input to ``collect`` (qstrat imatrix)."""
        self.forward.logits(tokens, collect)

    def close(self) -> None:
        self.tokenizer.close()
