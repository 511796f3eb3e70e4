"""A GGUF model file as a run's input, as llama-quantize takes one.

Each tensor appears as a :class:`qstrat.io.safetensors.TensorInfo` in numpy order: F32 / F16 /
BF16 ones as they are stored (the pipeline reads their bytes like a safetensors tensor's), every
block type qstrat reads (Q4_0..Q8_0, the K-quants, IQ4_NL, Q8_K, and the types it only decodes: IQ1..IQ3,
IQ4_XS, TQ1_0/TQ2_0, MXFP4) as float32 values that reading decodes exactly as GGML does.  The file's key-value
metadata (architecture, hyperparameters, tokenizer) is kept for the output.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qstrat.errors import InputError
from qstrat.io.gguf_read import PASSTHROUGH_TYPES, is_gguf_name, open_gguf, unreadable_type
from qstrat.io.safetensors import TensorInfo

if TYPE_CHECKING:
    from qstrat.io.safetensors import SafetensorsModel


@dataclass(frozen=True)
class GGUFFile:
    """What a run's fingerprint needs of the input file: its name, size and header."""

    path: Path
    size: int
    data_start: int


class GGUFInput:
    """A GGUF model read as a run's input; tensors by name (llama.cpp's names), read lazily."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        if "qstrat.perm_tensors" in self.reader.fields:
            # its matrices hold permuted columns that only the .perm gathers undo: read as they are, they
            # are not the model, and the gather maps would pass through as model tensors
            raise InputError(f"{self.path}: holds run-time permutations (.perm gather maps, for Candle), which only those "
                             "gathers undo, so it is no run's or forward's input: use the output directory it came from, "
                             "the model it was made from, or `qstrat dequantize` it to a .safetensors file of the original weights")
        self.files = [GGUFFile(self.path, self.path.stat().st_size, int(self.reader.data_offset))]
        self.tensors: dict[str, TensorInfo] = {}
        for tensor in self.reader.tensors:
            self.tensors[tensor.name] = self._info(tensor)
        self.metadata: dict[str, str] = {}

    def _info(self, tensor) -> TensorInfo:
        import gguf

        try:
            ggml_type = gguf.GGMLQuantizationType(int(tensor.tensor_type))
        except ValueError:
            raise unreadable_type(self.path, tensor.name, int(tensor.tensor_type)) from None
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        offset, stored = int(tensor.data_offset), int(tensor.n_bytes)
        if ggml_type.name in PASSTHROUGH_TYPES:  # safetensors has a dtype of the same name
            return TensorInfo(tensor.name, ggml_type.name, shape, self.path, offset, stored)
        from qstrat.formats import DECODED_ONLY, FORMATS  # the registry loads the kernels: only for quantized tensors

        name = ggml_type.name.lower()
        if name not in FORMATS and name not in DECODED_ONLY:
            raise unreadable_type(self.path, tensor.name, int(ggml_type))
        numel = int(np.prod(shape, dtype=np.int64))
        return TensorInfo(tensor.name, "F32", shape, self.path, offset, numel * 4, encoding=name, stored_nbytes=stored)

    def check_intact(self) -> None:
        """Stop with a :class:`FormatError` if qstrat wrote this file and its bytes are not those it
        recorded: a changed file must not be read as the model (another tool's records no checksum)."""
        from qstrat.io.gguf import require_recorded_sha256

        require_recorded_sha256(self.reader, self.path)

    def fields(self) -> dict[str, object]:
        """The file's key-value metadata, as Python values (strings, numbers, lists)."""
        return {name: field.contents() for name, field in self.reader.fields.items() if not name.startswith("GGUF.")}

    def model_config(self) -> dict[str, object]:
        """What qstrat's planning reads of a Hugging Face ``config.json``, from the GGUF's keys."""
        fields = self.fields()
        arch = str(fields.get("general.architecture", ""))
        config: dict[str, object] = {"model_type": arch, "gguf_architecture": arch}
        for key, hf_key in (
            ("block_count", "num_hidden_layers"),
            ("attention.head_count", "num_attention_heads"),
            ("attention.head_count_kv", "num_key_value_heads"),
            ("embedding_length", "hidden_size"),
            ("feed_forward_length", "intermediate_size"),
            ("expert_count", "num_local_experts"),
        ):
            value = fields.get(f"{arch}.{key}")
            if value is not None:
                config[hf_key] = value
        return config

    @property
    def name(self) -> str:
        return self.path.stem

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)


def open_input(path: str | os.PathLike) -> GGUFInput | SafetensorsModel:
    """A run's input: a GGUF model file, or a .safetensors file or model directory."""
    from qstrat.io.safetensors import SafetensorsModel

    path = Path(path)
    if is_gguf_name(path) and not path.is_dir():
        return GGUFInput(path)
    return SafetensorsModel(path)
