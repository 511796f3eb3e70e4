"""What a run produced: one record per tensor, and the run's summary."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qstrat.io.q8k import WrittenFile
from qstrat.io.safetensors import DTYPES
from qstrat.matrix import TensorMetrics

if TYPE_CHECKING:
    from qstrat.io.manifest import TensorEntry


def _json_gain(gain: float | None) -> float | str | None:
    """A gain as JSON holds it (no infinity: "inf"), rounded: reruns must give identical manifests."""
    return None if gain is None else ("inf" if gain == math.inf else round(gain, 4))


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of the output: where it went and how well it was quantized."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    storage: str  # "q8k" (a .q8k file), a GGUF block type ("q4_k", ...) or "passthrough"
    strategy: str | None = None
    permutation: str = "none"  # "none" | "runtime" | "joint"
    joint_group: str | None = None  # for joint permutations: the group and the permuted axis
    joint_axis: int | None = None
    residual_axis: int | None = None  # with residual_stream: the axis that carries the stream
    files: dict[str, WrittenFile] = field(default_factory=dict)
    metrics: TensorMetrics | None = None
    seconds: float = 0.0
    reason: str | None = None  # why a tensor was passed through
    fallback_from: str | None = None  # the block type asked for, when it could not take the rows
    imatrix: bool | None = None  # with the run's importance matrix: whether it had this tensor's vector
    #: 10 log10(error under identity / error under the chosen order) of the permutation that
    #: moves its columns, where the run measured it (reports only)
    permutation_gain_db: float | None = None
    #: the block type a GGUF input stored the tensor in (``q4_1``, ...), which reading decoded to F32
    source_type: str | None = None
    #: a GGUF input's blocks, already in ``storage``'s type, written as they were (not requantized)
    copied: bool = False

    @property
    def quantized(self) -> bool:
        return self.storage != "passthrough"

    @property
    def numel(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as read (a GGUF input's block type decoded to F32)."""
        return self.numel * DTYPES[self.dtype].itemsize

    @property
    def source_nbytes(self) -> int:
        """Bytes of the tensor in its source file."""
        if self.source_type is None:
            return self.nbytes
        import gguf

        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.source_type.upper()]]
        return self.numel // block_size * type_size

    @classmethod
    def from_manifest_entry(cls, name: str, entry: TensorEntry) -> TensorRecord:
        """The record a manifest (or journal) entry was made from."""
        quantized = entry.storage != "passthrough"
        return cls(
            name=name,
            shape=tuple(entry.shape),
            dtype=entry.dtype,
            storage=entry.storage,
            strategy=entry.strategy if quantized else None,
            permutation=entry.permutation,
            joint_group=entry.joint.group if entry.joint else None,
            joint_axis=entry.joint.axis if entry.joint else None,
            residual_axis=entry.residual_axis,
            files={role: WrittenFile(**f.model_dump()) for role, f in entry.files.items()},
            metrics=TensorMetrics.from_dict(entry.metrics.model_dump()) if quantized and entry.metrics else None,
            reason=None if quantized else entry.reason,
            fallback_from=entry.fallback_from if quantized else None,
            imatrix=entry.imatrix if quantized else None,
            permutation_gain_db=(math.inf if entry.permutation_gain_db == "inf" else entry.permutation_gain_db) if quantized else None,
            source_type=entry.source_type,
            copied=bool(entry.copied) if quantized else False,
        )

    def manifest_entry(self) -> TensorEntry:
        # pydantic is imported when a run writes, not with `import qstrat` (start-up time)
        from qstrat.io.manifest import FileEntry, Joint, Metrics, PassthroughEntry, QuantizedEntry

        common = {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "permutation": self.permutation,
            "files": {role: FileEntry(**vars(f)) for role, f in sorted(self.files.items())},
            "joint": Joint(group=self.joint_group, axis=self.joint_axis) if self.joint_group is not None else None,
            "residual_axis": self.residual_axis,
            "source_type": self.source_type,
        }
        if self.quantized:
            metrics = Metrics(**self.metrics.as_dict()) if self.metrics else None
            return QuantizedEntry(storage=self.storage, strategy=self.strategy, metrics=metrics, fallback_from=self.fallback_from,
                                  imatrix=self.imatrix, permutation_gain_db=_json_gain(self.permutation_gain_db),
                                  copied=self.copied or None, **common)
        return PassthroughEntry(storage="passthrough", reason=self.reason, **common)


@dataclass(frozen=True)
class ThresholdFailure:
    """A tensor whose metric fell on the wrong side of a configured threshold."""

    name: str
    metric: str
    value: float
    limit: float

    def as_dict(self) -> dict[str, object]:
        value = self.value if math.isfinite(self.value) else None
        return {"tensor": self.name, "metric": self.metric, "value": value, "limit": self.limit}

    def __str__(self) -> str:
        return f"{self.name}: {self.metric} = {self.value:.4g} (limit {self.limit:g})"


@dataclass
class QuantizationResult:
    """The summary of a run; ``tensors`` holds every tensor's record, sorted by name."""

    output_dir: Path | None  # None for an in-memory evaluation
    tensors: list[TensorRecord]
    elapsed_s: float
    manifest_path: Path | None = None
    failures: list[ThresholdFailure] = field(default_factory=list)
    #: the GGUF file a run wrote: {"file", "llama_cpp": whether llama.cpp runs it, "architecture" and
    #: "vocabulary" or "reason" (why not), "notes"}; None without one
    container: dict[str, object] | None = None
    #: residual_stream's choice: {"order", "tensors", "readers", "mean_gain_db", "rejected"}; None without it
    residual: dict[str, object] | None = None
    #: the same run had finished in the output directory, its files intact: nothing was redone
    up_to_date: bool = False
    #: the plan's warnings (most of the model passed through, a layer a strategy leaves unpermuted)
    notes: tuple[str, ...] = ()

    @property
    def quantized(self) -> list[TensorRecord]:
        return [t for t in self.tensors if t.quantized]

    @property
    def tensor_count(self) -> int:
        """How many tensors were quantized."""
        return len(self.quantized)

    @property
    def skipped_count(self) -> int:
        """How many tensors were passed through unchanged."""
        return len(self.tensors) - self.tensor_count

    @property
    def average_mse(self) -> float:
        """Mean over quantized tensors of their weight MSE (NaN when nothing was measured)."""
        values = [t.metrics.mse for t in self.quantized if t.metrics is not None and t.metrics.mse is not None]
        return sum(values) / len(values) if values else math.nan

    # the original tool's names for the same figures
    @property
    def quantized_tensors(self) -> int:
        return self.tensor_count

    @property
    def skipped_tensors(self) -> int:
        return self.skipped_count

    @property
    def total_time_seconds(self) -> float:
        return self.elapsed_s
