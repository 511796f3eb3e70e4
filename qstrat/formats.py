"""GGUF block types by name: one registry, and ``quantize`` / ``dequantize`` mirroring gguf-py.

Each type slots in with its ``gguf.GGMLQuantizationType``; block size and bytes per block come
from ``gguf.GGML_QUANT_SIZES`` and are checked against the kernels' own layout constants when
the type registers, so a layout can never silently disagree with GGUF.  The types qstrat writes
are ``FORMATS``; ``DECODED_ONLY`` holds the types it only reads (IQ1..IQ3, IQ4_XS, TQ, MXFP4: files
other tools made), decoded by gguf-py's dequantizers, which equal GGML's.

>>> blocks = quantize(weights, "q4_0")              # (rows, k / 32 * 18) uint8   # doctest: +SKIP
>>> values = dequantize(blocks, "q4_0")             # (rows, k) float32           # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import gguf
import numpy as np

from qstrat.blocks import as_kernel_storage, dequantize_blocks, quantize_rows, storage_to_float32
from qstrat.errors import InputError, NonFiniteError
from qstrat.io.safetensors import to_float32
from qstrat.kernels import BLOCK_BYTES as Q8K_BLOCK_BYTES, QK_K, first_nonfinite_index
from qstrat.kernels import half, iq4nl, kquants, legacy, q8k

QuantizationType = gguf.GGMLQuantizationType

#: (kernel storage (rows, k), importance vector (k,) float32 or None) -> (rows, row bytes) uint8
QuantizeRows = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]
#: (blocks (rows, row bytes) uint8, k) -> (rows, k) float32
DequantizeRows = Callable[[np.ndarray, int], np.ndarray]


class NonFiniteBlocks(Exception):
    """A quantizer whose kernel checks as it goes found NaN or infinity: its output is void.
    ``BlockType.quantize_finite`` relies on it instead of scanning the input first."""


@dataclass(frozen=True)
class TypeLayout:
    """A GGUF tensor type's name and block layout (from ``gguf.GGML_QUANT_SIZES``)."""

    name: str
    ggml_type: QuantizationType
    block_size: int  # values per block
    type_size: int  # bytes per block

    def row_bytes(self, k: int) -> int:
        return k // self.block_size * self.type_size


@dataclass(frozen=True)
class BlockType(TypeLayout):
    """One GGUF tensor type qstrat writes."""

    quantize_rows: QuantizeRows
    dequantize_rows: DequantizeRows
    uses_imatrix: bool  # whether an importance vector changes the bytes
    checks_finite: bool = False  # quantize_rows raises NonFiniteBlocks itself (no scan needed first)
    kernels: str | None = None  # the kernel module it compiles on first use (kernels/<name>.py)
    #: byte offsets in a block of its float16 fields (scales, minimums; every value of F16), which
    #: overflow to infinity past 65504 however finite the input (GGML writes that, llama.cpp refuses it)
    half_fields: tuple[int, ...] = ()

    def overflows(self, blocks: np.ndarray) -> bool:
        """Whether a float16 field of these blocks is infinite or NaN (its exponent bits, all in
        the high byte, all set): from finite input, values too large for the type."""
        if not self.half_fields or blocks.size == 0:
            return False
        if self.type_size == 2:  # F16: every value is a half
            return half.count_infinite_halves(np.ascontiguousarray(blocks).reshape(-1).view(np.uint16)) > 0
        return half.count_overflowed_halves(blocks.reshape(-1, self.type_size), np.array(self.half_fields, dtype=np.int64)) > 0

    def quantize_finite(self, rows: np.ndarray, imatrix: np.ndarray | None, refuse_non_finite: Callable[[], None]) -> np.ndarray:
        """``quantize_rows`` of data that must be finite.  ``refuse_non_finite`` raises naming the
        first NaN or infinity: it runs first, or, when the kernel checks as it goes, only once the
        kernel found one (one pass over memory less)."""
        if not self.checks_finite:
            refuse_non_finite()
        try:
            return self.quantize_rows(rows, imatrix)
        except NonFiniteBlocks:
            refuse_non_finite()
            raise  # the kernel and the scan disagree: a bug


@dataclass(frozen=True)
class DecodedType(TypeLayout):
    """One GGUF tensor type qstrat reads but does not write: gguf-py decodes it."""

    def dequantize_rows(self, blocks: np.ndarray, k: int) -> np.ndarray:
        from gguf.quants import dequantize as decode  # numpy only; its lookup grids are built on first use

        with np.errstate(all="ignore"):  # blocks of inf/NaN scales decode to inf/NaN, as GGML's do, without numpy's warning
            return decode(blocks, self.ggml_type).astype(np.float32, copy=False).reshape(blocks.shape[0], k)


#: name -> type, in registration order
FORMATS: dict[str, BlockType] = {}


def register(
    ggml_type: QuantizationType,
    quantize_rows: QuantizeRows,
    dequantize_rows: DequantizeRows,
    *,
    uses_imatrix: bool,
    checks_finite: bool = False,
    kernel_layout: tuple[int, int] | None = None,
    kernels: ModuleType | None = None,
    half_fields: tuple[int, ...] = (),
) -> BlockType:
    """Add a type under its lower-case GGUF name.  ``kernel_layout`` (block size, bytes per
    block) is what the kernels were written for; it must equal GGUF's.  ``kernels``: the
    kernel module the type compiles on first use."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    if kernel_layout is not None and kernel_layout != (block_size, type_size):
        raise AssertionError(f"{ggml_type.name}: kernel layout {kernel_layout} != GGUF's {(block_size, type_size)}")
    entry = BlockType(
        ggml_type.name.lower(), ggml_type, block_size, type_size, quantize_rows, dequantize_rows, uses_imatrix,
        checks_finite, kernels.__name__.rsplit(".", 1)[-1] if kernels is not None else None, half_fields,
    )
    FORMATS[entry.name] = entry
    return entry


# --- the legacy 32-value types (kernels/legacy.py)


def _legacy(code: int) -> tuple[QuantizeRows, DequantizeRows]:
    def quantize_legacy(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        out = np.empty((rows.shape[0] * (rows.shape[1] // legacy.QK), legacy.BLOCK_BYTES[code]), dtype=np.uint8)
        if legacy.quantize_rows_legacy(rows, code, out, imatrix):
            raise NonFiniteBlocks
        return out.reshape(rows.shape[0], -1)

    def dequantize_legacy(blocks: np.ndarray, k: int) -> np.ndarray:
        out = np.empty((blocks.size // legacy.BLOCK_BYTES[code], legacy.QK), dtype=np.float32)
        legacy.dequantize_blocks_legacy(blocks.reshape(-1, legacy.BLOCK_BYTES[code]), code, out)
        return out.reshape(blocks.shape[0], k)

    return quantize_legacy, dequantize_legacy


for _type, _code, _weighted, _halves in (  # d first; the _1 types' minimum m after it
    (QuantizationType.Q8_0, legacy.Q8_0, False, (0,)),  # GGML ignores the vector for Q8_0
    (QuantizationType.Q4_0, legacy.Q4_0, True, (0,)),
    (QuantizationType.Q4_1, legacy.Q4_1, True, (0, 2)),
    (QuantizationType.Q5_0, legacy.Q5_0, True, (0,)),
    (QuantizationType.Q5_1, legacy.Q5_1, True, (0, 2)),
):
    register(_type, *_legacy(_code), uses_imatrix=_weighted, checks_finite=True, kernel_layout=(legacy.QK, legacy.BLOCK_BYTES[_code]),
             kernels=legacy, half_fields=_halves)


# --- the K-quants: 256-value super-blocks (kernels/kquants.py)


def _kquant(code: int) -> tuple[QuantizeRows, DequantizeRows]:
    def quantize_kquant(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        out = np.empty((rows.shape[0] * (rows.shape[1] // QK_K), kquants.BLOCK_BYTES[code]), dtype=np.uint8)
        if kquants.quantize_rows_kquants(rows, code, out, imatrix):
            raise NonFiniteBlocks
        return out.reshape(rows.shape[0], -1)

    def dequantize_kquant(blocks: np.ndarray, k: int) -> np.ndarray:
        out = np.empty((blocks.size // kquants.BLOCK_BYTES[code], QK_K), dtype=np.float32)
        kquants.dequantize_blocks_kquants(blocks.reshape(-1, kquants.BLOCK_BYTES[code]), code, out)
        return out.reshape(blocks.shape[0], k)

    return quantize_kquant, dequantize_kquant


for _type, _code, _halves in (  # the super-block's d (and dmin), as block_q*_K in ggml-common.h places them
    (QuantizationType.Q2_K, kquants.Q2_K, (80, 82)),
    (QuantizationType.Q3_K, kquants.Q3_K, (108,)),
    (QuantizationType.Q4_K, kquants.Q4_K, (0, 2)),
    (QuantizationType.Q5_K, kquants.Q5_K, (0, 2)),
    (QuantizationType.Q6_K, kquants.Q6_K, (208,)),
):
    register(_type, *_kquant(_code), uses_imatrix=True, checks_finite=True, kernel_layout=(QK_K, kquants.BLOCK_BYTES[_code]),
             kernels=kquants, half_fields=_halves)


# --- IQ4_NL: 32-value blocks of indices into a non-linear table (kernels/iq4nl.py); llama.cpp's
# type for Q2_K / Q3_K tensors whose rows are not a multiple of 256 long

_NO_IMPORTANCE = np.empty(0, dtype=np.float32)  # the kernel's "no vector" (one compiled signature)


def _quantize_iq4nl(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    out = np.empty((rows.shape[0] * (rows.shape[1] // legacy.QK), iq4nl.BLOCK_BYTES), dtype=np.uint8)
    weights = _NO_IMPORTANCE if imatrix is None else imatrix
    if iq4nl.quantize_rows_iq4nl(rows, out, weights):
        raise NonFiniteBlocks
    return out.reshape(rows.shape[0], -1)


def _dequantize_iq4nl(blocks: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((blocks.size // iq4nl.BLOCK_BYTES, legacy.QK), dtype=np.float32)
    iq4nl.dequantize_blocks_iq4nl(blocks.reshape(-1, iq4nl.BLOCK_BYTES), out)
    return out.reshape(blocks.shape[0], k)


register(
    QuantizationType.IQ4_NL, _quantize_iq4nl, _dequantize_iq4nl,
    uses_imatrix=True, checks_finite=True, kernel_layout=(legacy.QK, iq4nl.BLOCK_BYTES), kernels=iq4nl, half_fields=(0,),
)


# --- Q8_K: the existing kernel, GGML's rounding (quantize_row_q8_K_ref)


def _quantize_q8k(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    return quantize_rows(rows, "ggml").reshape(rows.shape[0], -1)


def _dequantize_q8k(blocks: np.ndarray, k: int) -> np.ndarray:
    return dequantize_blocks(blocks.reshape(-1, Q8K_BLOCK_BYTES)).reshape(blocks.shape[0], k)


register(QuantizationType.Q8_K, _quantize_q8k, _dequantize_q8k, uses_imatrix=False, kernel_layout=(QK_K, Q8K_BLOCK_BYTES), kernels=q8k)


# --- unquantized targets


def _quantize_f32(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    return storage_to_float32(rows).astype("<f4").view(np.uint8)


def _encoder(bfloat16: bool) -> QuantizeRows:
    def quantize_16bit(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        out = np.empty(rows.shape, dtype=np.uint16)
        if half.encode_rows(rows, out, bfloat16):
            raise NonFiniteBlocks
        return out.view(np.uint8)

    return quantize_16bit


def _dequantize_f32(blocks: np.ndarray, k: int) -> np.ndarray:
    return blocks.view("<f4").astype(np.float32)


def _dequantize_f16(blocks: np.ndarray, k: int) -> np.ndarray:
    return to_float32("F16", blocks.view("<f2"))


def _dequantize_bf16(blocks: np.ndarray, k: int) -> np.ndarray:
    return to_float32("BF16", blocks.view("<u2"))


register(QuantizationType.F32, _quantize_f32, _dequantize_f32, uses_imatrix=False, kernel_layout=(1, 4))
register(QuantizationType.F16, _encoder(False), _dequantize_f16, uses_imatrix=False, checks_finite=True, kernel_layout=(1, 2), kernels=half,
         half_fields=(0,))
register(QuantizationType.BF16, _encoder(True), _dequantize_bf16, uses_imatrix=False, checks_finite=True, kernel_layout=(1, 2), kernels=half)


# --- types read only: what llama.cpp's IQ and ternary presets and gpt-oss's MXFP4 store; qstrat
# does not quantize to them (their searches need GGML's lattice tables), so a run decodes them

#: name -> type, the types qstrat reads but does not write
DECODED_ONLY: dict[str, DecodedType] = {
    t.name.lower(): DecodedType(t.name.lower(), t, *gguf.GGML_QUANT_SIZES[t])
    for t in (QuantizationType.IQ2_XXS, QuantizationType.IQ2_XS, QuantizationType.IQ2_S, QuantizationType.IQ3_XXS,
              QuantizationType.IQ3_S, QuantizationType.IQ1_S, QuantizationType.IQ1_M, QuantizationType.IQ4_XS,
              QuantizationType.TQ1_0, QuantizationType.TQ2_0, QuantizationType.MXFP4)
}


# --- public API


def readable_type(qtype: str | QuantizationType) -> BlockType | DecodedType:
    """A type qstrat reads, by name or ``gguf.GGMLQuantizationType``: one it writes (:func:`block_type`)
    or one it only decodes (``DECODED_ONLY``)."""
    if isinstance(qtype, (str, QuantizationType)):
        name = qtype.name.lower() if isinstance(qtype, QuantizationType) else qtype.strip().lower()
        if name in DECODED_ONLY:
            return DECODED_ONLY[name]
        if name not in FORMATS:
            raise InputError(f"unknown or unsupported quantization type {qtype!r}; qstrat reads {', '.join([*FORMATS, *DECODED_ONLY])}")
    return block_type(qtype)


def block_type(qtype: str | QuantizationType) -> BlockType:
    """The registered type for a name ("q4_0", any case) or a ``gguf.GGMLQuantizationType``."""
    if isinstance(qtype, QuantizationType):
        name = qtype.name.lower()
    elif isinstance(qtype, str):
        name = qtype.strip().lower()
    else:
        raise InputError(f"a quantization type is a name or a gguf.GGMLQuantizationType; got {qtype!r}")
    entry = FORMATS.get(name)
    if entry is None:
        raise InputError(f"unknown or unsupported quantization type {qtype!r}; choose one of {', '.join(FORMATS)}")
    return entry


def _index_in(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(flat, shape))


def _check_imatrix(imatrix: object, k: int, entry: BlockType, shape: tuple[int, ...]) -> np.ndarray:
    given = np.asarray(imatrix)
    if given.shape != (k,) or not (np.issubdtype(given.dtype, np.floating) or np.issubdtype(given.dtype, np.integer)):
        raise InputError(
            f"importance vector of shape {given.shape} and dtype {given.dtype} for {entry.name} data of shape {shape}: "
            f"expected ({k},) real numbers, one per column"
        )
    with np.errstate(over="ignore"):  # a float64 beyond float32 is named below, not warned about
        weights = np.ascontiguousarray(given, dtype=np.float32)
    bad = np.flatnonzero(~(np.isfinite(weights) & (weights >= 0)))
    if bad.size:
        raise InputError(
            f"importance vector for {entry.name} data of shape {shape} holds {given[bad[0]]} at index {int(bad[0])}; "
            "its values must be finite, >= 0 and within float32's range"
        )
    return weights


def quantize(data: np.ndarray, qtype: str | QuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize ``data`` to GGUF type ``qtype``, byte-identical with GGML's ``ggml_quantize_chunk``.

    ``data`` is float32, float16 or bfloat16 (``ml_dtypes.bfloat16``); its last dimension is a
    row, a multiple of the type's block size.  Returns uint8 of shape ``data.shape[:-1] +
    (row bytes,)``, as ``gguf.quants.quantize``: (rows, row bytes) for a matrix.  ``imatrix``
    is the importance vector (one finite value >= 0 per column) of llama-quantize; types that
    do not use one (Q8_0, Q8_K, F32/F16/BF16) ignore it, as GGML does.
    """
    entry = block_type(qtype)
    array = np.asarray(data)
    storage = as_kernel_storage(array)
    if storage.ndim == 0 or storage.shape[-1] == 0 or storage.shape[-1] % entry.block_size:
        raise InputError(
            f"data of shape {array.shape} cannot be quantized to {entry.name}: its rows (last dimension) "
            f"must be a positive multiple of {entry.block_size} long"
        )
    k = storage.shape[-1]
    if storage.size == 0:  # no rows: no blocks (gguf-py's quantize gives the same)
        return np.empty(array.shape[:-1] + (entry.row_bytes(k),), dtype=np.uint8)
    rows = np.ascontiguousarray(storage.reshape(-1, k))
    weights = None if imatrix is None else _check_imatrix(imatrix, k, entry, array.shape)

    def refuse_non_finite() -> None:
        flat = int(first_nonfinite_index(rows)) if rows.size else -1
        if flat >= 0:
            raise NonFiniteError(
                f"data of shape {array.shape} holds a non-finite value at index {_index_in(flat, array.shape)}; "
                f"{entry.name} quantization refuses NaN and infinity"
            )

    # values too large for the type give GGML's bytes here, infinite scales included (a run refuses them)
    out = entry.quantize_finite(rows, weights if entry.uses_imatrix else None, refuse_non_finite)
    return out.reshape(array.shape[:-1] + (entry.row_bytes(k),))


def too_large(rows: np.ndarray, shape: tuple[int, ...], type_name: str) -> str:
    """Why ``rows`` (2-D kernel storage, of data of ``shape``) overflowed ``type_name``'s float16 fields."""
    values = np.abs(storage_to_float32(rows))
    flat = int(np.argmax(values))
    return (f"its largest value, {float(values.reshape(-1)[flat]):.4g} at index {_index_in(flat, tuple(shape))}, is too large for "
            f"{type_name}: a float16 scale or value of its blocks overflows to infinity (past 65504), which llama.cpp refuses; "
            "a type with float32 or bfloat16 range (bf16, f32) holds it")


def dequantize(data: np.ndarray, qtype: str | QuantizationType) -> np.ndarray:
    """Dequantize GGUF type ``qtype`` bytes (uint8, last dimension whole blocks) to float32,
    as GGML's ``dequantize_row_*``: shape ``data.shape[:-1] + (values per row,)``.  Takes every
    type qstrat writes and those it only reads (``DECODED_ONLY``)."""
    entry = readable_type(qtype)
    array = np.asarray(data)
    if array.dtype != np.uint8 or array.ndim == 0 or array.shape[-1] == 0 or array.shape[-1] % entry.type_size:
        raise InputError(
            f"{entry.name} data must be uint8 whose last dimension is whole blocks of {entry.type_size} bytes; "
            f"got {array.dtype} of shape {array.shape}"
        )
    k = array.shape[-1] // entry.type_size * entry.block_size
    if array.size == 0:
        return np.empty(array.shape[:-1] + (k,), dtype=np.float32)
    blocks = np.ascontiguousarray(array.reshape(-1, array.shape[-1]))
    return entry.dequantize_rows(blocks, k).reshape(array.shape[:-1] + (k,))
