"""One matrix through the arithmetic: check, permute, quantize, measure.

Pipelines call this per tensor; it knows arrays, not files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np

from qstrat.blocks import (
    as_gather_map,
    check_finite,
    check_rows_shape,
    empty_blocks,
    refuse_non_finite,
    storage_to_float32,
    variant_code,
)
from qstrat.errors import InputError, NonFiniteError
from qstrat.kernels import measure_columns, quantize_rows_q8k
from qstrat.kernels.metrics import (
    DEQUANTIZED_SQUARES,
    ERROR_SQUARES,
    MAX_ABS_ERROR,
    PROBE_COLUMNS,
    REFERENCE_SQUARES,
)


def sqnr_db(reference_squares: float, error_squares: float) -> float:
    """``10 log10(reference / error)`` of sums of squares; inf for an exact result."""
    if error_squares == 0.0:
        return math.inf
    if reference_squares == 0.0:
        return -math.inf
    return 10.0 * math.log10(reference_squares / error_squares)


@dataclass(frozen=True)
class TensorMetrics:
    """Weight error of one quantized tensor, in its original column order."""

    mse: float | None
    relative_error: float | None  # ||W - W^||_F / ||W||_F
    sqnr_db: float | None  # 20 log10(||W|| / ||W - W^||); inf for an exact result
    max_abs_error: float | None
    cosine: float | None
    sum_test_mse: float | None = None  # the original tool's Method 1
    gradient_test_mse: float | None = None  # Method 2
    #: 10 log10(sum_j a_j sum_i w_ij^2 / sum_j a_j sum_i (w_ij - w^_ij)^2), a the importance vector
    weighted_sqnr_db: float | None = None

    @classmethod
    def from_row_measures(cls, measures: np.ndarray, numel: int) -> TensorMetrics:
        """Metrics from the per-row measures of the quantize kernel (see kernels/metrics.py)."""
        err2, ref2, deq2 = (float(measures[:, i].sum()) for i in (ERROR_SQUARES, REFERENCE_SQUARES, DEQUANTIZED_SQUARES))
        worst = float(measures[:, MAX_ABS_ERROR].max()) if len(measures) else 0.0
        norm_ref, norm_err, norm_deq = math.sqrt(ref2), math.sqrt(err2), math.sqrt(deq2)
        sqnr = sqnr_db(ref2, err2)
        # From |w - w^|^2 = |w|^2 + |w^|^2 - 2 w.w^: 1 - cos = (|w - w^|^2 - (|w| - |w^|)^2) / (2 |w| |w^|),
        # which keeps the digits that w.w^ / (|w| |w^|) computed directly would lose near 1.
        if norm_ref and norm_deq:
            cosine = 1.0 - (err2 - (norm_ref - norm_deq) ** 2) / (2.0 * norm_ref * norm_deq)
            cosine = min(1.0, max(-1.0, cosine))
        else:
            cosine = 1.0 if err2 == 0.0 else 0.0
        return cls(
            mse=err2 / numel if numel else 0.0,
            relative_error=norm_err / norm_ref if norm_ref else (0.0 if err2 == 0.0 else math.inf),
            sqnr_db=sqnr,
            max_abs_error=worst,
            cosine=cosine,
        )

    @classmethod
    def empty(cls) -> TensorMetrics:
        return cls(None, None, None, None, None)

    @classmethod
    def from_dict(cls, values: dict[str, float | None]) -> TensorMetrics:
        """Inverse of :meth:`as_dict` (JSON has no infinity: an exact SQNR is stored as "inf")."""
        return cls(**{k: (math.inf if v == "inf" else v) for k, v in values.items()})

    def as_dict(self) -> dict[str, float | str | None]:
        return {k: ("inf" if v == math.inf else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class QuantizedMatrix:
    """A quantized matrix and what was measured while quantizing it."""

    blocks: np.ndarray
    metrics: TensorMetrics | None  # weight error (None when not measured)
    #: probe name -> (rows, 2) float64: per stored row, W'.p and W'.p - W^.p (exact dequantized weights)
    probe_products: dict[str, np.ndarray]
    error_squares: float | None = None  # sum (w - w^)^2 as the kernel summed it (when measured)
    #: sum_j a_j (w_ij - w^_ij)^2 over the importance vector a (when measured with one)
    weighted_error_squares: float | None = None

    @property
    def chosen_error(self) -> float | None:
        """The error strategies compare orders by: importance-weighted when there is an imatrix."""
        return self.error_squares if self.weighted_error_squares is None else self.weighted_error_squares


#: rows measured at a time (bounds the float64 temporaries of the numpy measures)
_MEASURED_ROWS = 256
#: values a GGUF type quantizes at a time (a multiple of _MEASURED_ROWS rows): 64 MB of float32
_CHUNK_VALUES = 16 << 20


def _stored_order(
    storage: np.ndarray, row_perm: np.ndarray | None, col_perm: np.ndarray | None, rows: slice = slice(None)
) -> np.ndarray:
    """Float32 values in stored order, of the stored rows ``rows``: ``storage[row_perm[i], col_perm[j]]``."""
    picked = storage[rows] if row_perm is None else np.take(storage, row_perm[rows], axis=0)
    stored = storage_to_float32(picked)
    if col_perm is not None:
        stored = np.take(stored, col_perm, axis=1)
    return np.ascontiguousarray(stored)


def _weighted(result: QuantizedMatrix, weighted_error: float, weighted_reference: float) -> QuantizedMatrix:
    metrics = result.metrics
    if metrics is not None:
        metrics = replace(metrics, weighted_sqnr_db=sqnr_db(weighted_reference, weighted_error))
    return replace(result, metrics=metrics, weighted_error_squares=weighted_error)


def stored_importance(importance: np.ndarray | None, col_perm: np.ndarray | None) -> np.ndarray | None:
    """An importance vector (or one per matrix of a stack, as rows) in stored column order (it
    moves with the columns it weighs)."""
    if importance is None:
        return None
    vector = np.asarray(importance, dtype=np.float32)
    return np.ascontiguousarray(vector if col_perm is None else vector[..., col_perm])


def _row_segments(n_rows: int, chunk: int, groups: int) -> list[tuple[int, int, int]]:
    """(first row, end row, group) of each chunk of at most ``chunk`` rows, none across the
    boundary of ``groups`` equal groups of rows (the matrices of a stack, each with its own
    importance vector)."""
    per_group = n_rows // groups if groups else n_rows
    return [
        (first, min(first + chunk, (g + 1) * per_group), g)
        for g in range(max(groups, 1))
        for first in range(g * per_group, (g + 1) * per_group, chunk)
    ]


def quantize_matrix(
    storage: np.ndarray,
    variant: str,
    row_perm: np.ndarray | None = None,
    col_perm: np.ndarray | None = None,
    *,
    tensor_name: str = "array",
    measure: bool = True,
    probes: Mapping[str, np.ndarray] | None = None,
    importance: np.ndarray | None = None,
) -> QuantizedMatrix:
    """Quantize kernel storage (rows, k) stored as ``storage[row_perm[i], col_perm[j]]``.

    When ``measure``, the weight error against the source comes out of the same pass
    (permutations move values, they do not change which value is compared with which), and
    so do the products of the stored rows with each of ``probes`` (vectors of length k in
    stored column order).  With an ``importance`` vector (source column order; Q8K's bytes do
    not depend on it), the importance-weighted error is measured too, from the blocks
    dequantized.
    """
    code = variant_code(variant)
    check_rows_shape(storage, tensor_name)
    probes = dict(probes or {})
    blocks = empty_blocks(storage)
    rows_g, cols_g = as_gather_map(row_perm), as_gather_map(col_perm)
    if not measure and not probes:
        refuse_non_finite(quantize_rows_q8k(storage, rows_g, cols_g, code, blocks), storage, tensor_name)
        return QuantizedMatrix(blocks, None, {})
    vectors = np.ascontiguousarray(np.array(list(probes.values()), dtype=np.float32).reshape(len(probes), storage.shape[1]))
    measures = np.zeros((storage.shape[0], measure_columns(len(probes))), dtype=np.float64)
    refuse_non_finite(quantize_rows_q8k(storage, rows_g, cols_g, code, blocks, vectors, measures), storage, tensor_name)
    products = {name: measures[:, PROBE_COLUMNS + 2 * i : PROBE_COLUMNS + 2 * i + 2] for i, name in enumerate(probes)}
    metrics = TensorMetrics.from_row_measures(measures, storage.size) if measure else None
    error_squares = float(measures[:, ERROR_SQUARES].sum()) if measure else None
    result = QuantizedMatrix(blocks, metrics, products, error_squares)
    if measure and importance is not None:
        from qstrat.formats import block_type

        weights = stored_importance(importance, col_perm).astype(np.float64)
        stored, dequantize = _stored_order(storage, row_perm, col_perm), block_type("q8_k").dequantize_rows
        row_blocks = blocks.reshape(stored.shape[0], -1)
        weighted_error = weighted_reference = 0.0
        for start in range(0, stored.shape[0], _MEASURED_ROWS):
            rows = slice(start, start + _MEASURED_ROWS)
            source = stored[rows].astype(np.float64)
            error = source - dequantize(np.ascontiguousarray(row_blocks[rows]), stored.shape[1])
            weighted_error += float(np.einsum("ij,ij,j->", error, error, weights))
            weighted_reference += float(np.einsum("ij,ij,j->", source, source, weights))
        result = _weighted(result, weighted_error, weighted_reference)
    return result


def quantize_matrix_as(
    storage: np.ndarray,
    type_name: str,
    row_perm: np.ndarray | None = None,
    col_perm: np.ndarray | None = None,
    *,
    tensor_name: str = "array",
    measure: bool | str = True,
    probes: Mapping[str, np.ndarray] | None = None,
    importance: np.ndarray | None = None,
    given: np.ndarray | None = None,
) -> QuantizedMatrix:
    """:func:`quantize_matrix` for a GGUF block type of the registry (``qstrat.formats``):
    blocks (rows, row bytes), and the same measures, from the blocks dequantized as GGML does
    (``measure="error"``: only the squared errors, for comparing orders).
    An ``importance`` vector (source column order) goes to the quantizer in stored order, as
    ``ggml_quantize_chunk``'s ``imatrix``, and weighs the weighted error.
    ``given`` blocks (rows, row bytes) in this type, of the stored rows (``row_perm`` applied; no
    ``col_perm``), are taken as they are and only measured: a GGUF input's tensor already in the
    type asked for, which llama.cpp copies.
    A stack of matrices (a MoE model's experts) comes as the rows of all of them, and its
    ``importance`` as one vector per matrix (rows of a 2-D array), each for its matrix's rows, as
    llama.cpp quantizes a 3-D tensor matrix by matrix.

    Rows go through in chunks (every type quantizes each row on its own, so the bytes are the
    same): the float32 copy in stored order is a chunk's, not the matrix's; whole, it and its
    permuted copies took two to three times a 16-bit matrix's size again."""
    from qstrat.formats import block_type, too_large

    entry = block_type(type_name)
    if storage.ndim != 2 or storage.shape[1] % entry.block_size:
        raise InputError(f"tensor {tensor_name!r} has shape {storage.shape}; {entry.name} needs 2-D data whose rows are a multiple of {entry.block_size} long")
    n_rows, k = storage.shape
    weights = stored_importance(importance, col_perm)
    groups = 0 if weights is None else (weights.shape[0] if weights.ndim == 2 else 1)
    if weights is not None and (weights.shape[-1] != k or weights.ndim > 2 or (weights.ndim == 2 and (n_rows % groups or row_perm is not None))):
        raise ValueError(f"importance of shape {weights.shape} for tensor {tensor_name!r} of shape {storage.shape}"
                         + (" with its rows permuted" if row_perm is not None else ""))
    weights = None if weights is None else weights.reshape(max(groups, 1), k)
    probes = dict(probes or {})
    errors_only = measure == "error" and not probes
    measured = bool(measure) or bool(probes)
    vectors = np.array(list(probes.values()), dtype=np.float64).reshape(len(probes), k)
    measures = np.zeros((n_rows, measure_columns(len(probes))), dtype=np.float64) if measured else None
    if given is not None and (given.shape != (n_rows, entry.row_bytes(k)) or col_perm is not None):
        raise ValueError(f"given blocks of tensor {tensor_name!r} are not {entry.name} blocks of its rows, columns in place")
    blocks = np.empty((n_rows, entry.row_bytes(k)), dtype=np.uint8) if given is None else given
    weighted_error = weighted_reference = 0.0
    chunk = max(1, _CHUNK_VALUES // max(k, 1)) // _MEASURED_ROWS * _MEASURED_ROWS or _MEASURED_ROWS

    def refuse_non_finite() -> None:
        check_finite(storage, tensor_name, entry.name.upper())

    if not entry.checks_finite or given is not None:
        refuse_non_finite()  # once for the whole matrix, not once per chunk
    if given is not None and not measured:
        return QuantizedMatrix(blocks, None, {})
    for first, end, group in _row_segments(n_rows, chunk, groups):
        picked = slice(first, end)
        stored = _stored_order(storage, row_perm, col_perm, picked)
        weighing = None if weights is None else weights[group]  # this matrix's importance vector
        if given is None:  # given blocks are measured only; finite values (checked above) come from finite fields
            if entry.checks_finite:
                blocks[picked] = entry.quantize_finite(stored, weighing, refuse_non_finite)
            else:
                blocks[picked] = entry.quantize_rows(stored, weighing)
            if entry.overflows(blocks[picked]):
                raise NonFiniteError(f"tensor {tensor_name!r}: {too_large(storage, storage.shape, entry.name)}")
        if not measured:
            continue
        for start in range(0, stored.shape[0], _MEASURED_ROWS):
            rows = slice(start, start + _MEASURED_ROWS)
            source = stored[rows].astype(np.float64)
            back = entry.dequantize_rows(np.ascontiguousarray(blocks[picked][rows]), k).astype(np.float64)
            error = source - back
            part = measures[first + start : first + start + source.shape[0]]
            part[:, ERROR_SQUARES] = np.einsum("ij,ij->i", error, error)
            if weighing is not None:
                weighted_error += float(np.einsum("ij,ij,j->", error, error, weighing.astype(np.float64)))
                if not errors_only:
                    weighted_reference += float(np.einsum("ij,ij,j->", source, source, weighing.astype(np.float64)))
            if errors_only:
                continue
            part[:, REFERENCE_SQUARES] = np.einsum("ij,ij->i", source, source)
            part[:, DEQUANTIZED_SQUARES] = np.einsum("ij,ij->i", back, back)
            part[:, MAX_ABS_ERROR] = np.abs(error).max(axis=1) if error.size else 0.0
            for i, vector in enumerate(vectors):
                part[:, PROBE_COLUMNS + 2 * i] = source @ vector
                part[:, PROBE_COLUMNS + 2 * i + 1] = error @ vector
    if not measured:
        return QuantizedMatrix(blocks, None, {})
    if errors_only:
        return QuantizedMatrix(blocks, None, {}, float(measures[:, ERROR_SQUARES].sum()), weighted_error if weights is not None else None)
    products = {name: measures[:, PROBE_COLUMNS + 2 * i : PROBE_COLUMNS + 2 * i + 2] for i, name in enumerate(probes)}
    metrics = TensorMetrics.from_row_measures(measures, storage.size) if measure else None
    error_squares = float(measures[:, ERROR_SQUARES].sum()) if measure else None
    result = QuantizedMatrix(blocks, metrics, products, error_squares)
    return _weighted(result, weighted_error, weighted_reference) if measure and weights is not None else result
