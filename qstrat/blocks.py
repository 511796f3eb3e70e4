"""Array-level Q8K quantization: the numpy face of the kernels."""

from __future__ import annotations

import numpy as np

from qstrat.errors import InputError, NonFiniteError
from qstrat.io.safetensors import to_float32
from qstrat.kernels import (
    BF16_BITS,
    BLOCK_BYTES,
    F16_BITS,
    QK_K,
    VARIANT_CODES,
    dequantize_q8k_blocks,
    first_nonfinite_index,
    quantize_rows_q8k,
)
from qstrat.kernels import half

#: Names of the bit-exact rounding variants, default first.
Q8K_VARIANTS: tuple[str, ...] = tuple(VARIANT_CODES)
DEFAULT_VARIANT = "candle"

#: safetensors dtype tag -> (numpy dtype of the stored bytes as the kernels read them)
KERNEL_STORAGE = {"F32": np.dtype("<f4"), "BF16": np.dtype(BF16_BITS), "F16": np.dtype(F16_BITS)}


def variant_code(variant: str) -> int:
    """The kernel code of a variant name; unknown names are an error, never a fallback."""
    try:
        return VARIANT_CODES[variant]
    except KeyError:
        raise InputError(
            f"unknown Q8K variant {variant!r}; choose one of {', '.join(Q8K_VARIANTS)}"
        ) from None


def is_16bit_storage(storage: np.ndarray) -> bool:
    """Whether kernel storage is rows of bfloat16 / float16 bits (decoded by ``half.decode_rows``)."""
    return storage.ndim == 2 and storage.dtype in (KERNEL_STORAGE["BF16"], KERNEL_STORAGE["F16"])


def storage_to_float32(storage: np.ndarray) -> np.ndarray:
    """Exact float32 values of kernel storage (bf16 / f16 bits decoded); float32 is returned as it is.
    Rows are decoded on every core in one pass (numpy's widening takes three on one core, and every
    GGUF-type run decodes each tensor for its measurements)."""
    if not is_16bit_storage(storage):
        tag = next((tag for tag, dtype in KERNEL_STORAGE.items() if storage.dtype == dtype), "F32")
        return to_float32(tag, storage)
    decoded = np.empty(storage.shape, dtype=np.float32)
    half.decode_rows(storage, decoded)
    return decoded


def as_kernel_storage(x: np.ndarray) -> np.ndarray:
    """View float32 / float16 / bfloat16 (ml_dtypes) data as the kernels read it, without copying."""
    dtype = np.dtype(x.dtype)
    if dtype == np.float32:
        return x.astype("<f4", copy=False)
    if dtype == np.float16:
        return x.view(F16_BITS)
    if dtype.name == "bfloat16" and dtype.itemsize == 2:
        return x.view(BF16_BITS)
    raise InputError(f"cannot quantize dtype {dtype}; expected float32, float16 or bfloat16")


def check_finite(rows: np.ndarray, tensor_name: str = "array", format_name: str = "Q8K") -> None:
    """Raise NonFiniteError naming the first NaN/inf (rows: 2-D kernel storage)."""
    flat = int(first_nonfinite_index(rows))
    if flat >= 0:
        index = np.unravel_index(flat, rows.shape)
        raise NonFiniteError(
            f"tensor {tensor_name!r} holds a non-finite value at index {tuple(int(i) for i in index)}; "
            f"{format_name} cannot represent NaN or infinity"
        )


def as_gather_map(perm: np.ndarray | None) -> np.ndarray | None:
    """A permutation as the kernels take it: contiguous uint32 (unsigned indices need no wraparound check)."""
    return None if perm is None else np.ascontiguousarray(perm, dtype=np.uint32)


def check_rows_shape(rows: np.ndarray, tensor_name: str) -> None:
    """Raise InputError unless ``rows`` is 2-D with rows a multiple of 256 long."""
    if rows.ndim != 2 or rows.shape[1] % QK_K != 0:
        raise InputError(
            f"tensor {tensor_name!r} has shape {rows.shape}; Q8K needs 2-D data whose rows are a "
            f"multiple of {QK_K} long"
        )


def empty_blocks(rows: np.ndarray) -> np.ndarray:
    """Uninitialised output blocks for 2-D kernel storage ``rows``."""
    return np.empty((rows.shape[0] * (rows.shape[1] // QK_K), BLOCK_BYTES), dtype=np.uint8)


def refuse_non_finite(non_finite_blocks: int, rows: np.ndarray, tensor_name: str) -> None:
    """After a kernel counted blocks with NaN/inf: raise naming the first such value."""
    if non_finite_blocks:
        check_finite(rows, tensor_name)
        raise AssertionError("the kernel counted non-finite blocks that check_finite did not find")


def quantize_rows(
    rows: np.ndarray,
    variant: str = DEFAULT_VARIANT,
    tensor_name: str = "array",
    *,
    row_perm: np.ndarray | None = None,
    col_perm: np.ndarray | None = None,
) -> np.ndarray:
    """Quantize 2-D kernel storage (rows, k), k % 256 == 0, to (rows * k/256, 292) uint8 blocks.

    With gather maps, stored element (i, j) is ``rows[row_perm[i], col_perm[j]]``.
    Non-finite values are refused with their index in ``rows`` (NonFiniteError).
    """
    code = variant_code(variant)
    check_rows_shape(rows, tensor_name)
    out = empty_blocks(rows)
    non_finite = quantize_rows_q8k(rows, as_gather_map(row_perm), as_gather_map(col_perm), code, out)
    refuse_non_finite(non_finite, rows, tensor_name)
    return out


def quantize_blocks(x: np.ndarray, variant: str = DEFAULT_VARIANT) -> np.ndarray:
    """Quantize ``x`` to Q8K blocks: uint8 of shape (n_blocks, 292).

    ``x`` is float32, float16 or bfloat16 (``ml_dtypes.bfloat16``); its last dimension
    must be a multiple of 256.  A 2-D array gives its rows' blocks in row-major order
    (blocks never cross rows); a 1-D array is one row.
    """
    storage = as_kernel_storage(np.asarray(x))
    if storage.ndim == 0 or storage.shape[-1] == 0 or storage.shape[-1] % QK_K != 0:
        raise InputError(f"the last dimension of the array ({storage.shape}) must be a positive multiple of {QK_K}")
    rows = np.ascontiguousarray(storage.reshape(-1, storage.shape[-1]))
    try:
        return quantize_rows(rows, variant)
    except NonFiniteError:
        if storage.ndim == 2:
            raise
        # the kernel names an index in the rows it sees (1-D: one row): name it in the array's own shape instead
        index = tuple(int(i) for i in np.unravel_index(int(first_nonfinite_index(rows)), storage.shape))
        raise NonFiniteError(f"data of shape {storage.shape} holds a non-finite value at index {index}; Q8K quantization refuses NaN and infinity") from None


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    """Dequantize Q8K blocks (n, 292) uint8 to float32 values (n, 256): ``d * qs``."""
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != BLOCK_BYTES:
        raise InputError(
            f"Q8K blocks must be uint8 of shape (n, {BLOCK_BYTES}); got {blocks.dtype} {blocks.shape}"
        )
    out = np.empty((blocks.shape[0], QK_K), dtype=np.float32)
    dequantize_q8k_blocks(np.ascontiguousarray(blocks), out)
    return out
