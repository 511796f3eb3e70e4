"""The Q8K block layout: the one place its sizes and offsets are defined.

A Q8K super-block holds ``QK_K`` = 256 consecutive values of one row and is stored in
``BLOCK_BYTES`` = 292 little-endian bytes: ``d`` float32 (bytes 0..4), ``qs`` int8[256]
(4..260), ``bsums`` int16[16] (260..292, the sum of each group of 16 ``qs``).
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from qstrat.kernels.jit import kernel

QK_K = 256
BSUM_GROUP = 16
D_OFFSET = 0
QS_OFFSET = 4
BSUMS_OFFSET = QS_OFFSET + QK_K
BLOCK_BYTES = BSUMS_OFFSET + 2 * (QK_K // BSUM_GROUP)  # 292

# Kernel-side indices are unsigned where it matters: numba adds a negative-index wraparound
# check to every signed index, and that check is what stops LLVM from vectorising loops.
U64 = np.uint64


@kernel
def block_scale(blocks, b):
    """The float32 ``d`` of block ``b`` of ``blocks`` (n, 292) uint8."""
    bits = np.uint32(0)
    for i in range(U64(4)):
        bits |= np.uint32(blocks[b, U64(D_OFFSET) + i]) << np.uint32(8 * i)
    return np.uint32(bits).view(np.float32)


@kernel
def block_quant(blocks, b, j):
    """qs[j] of block ``b`` as an int8."""
    return np.int8(blocks[b, U64(QS_OFFSET) + j])


@intrinsic
def group_quant_sum(typingctx, blocks, b, g):
    """The sum of the ``BSUM_GROUP`` = 16 ``qs`` of group ``g`` of block ``b`` (its bsum), as
    int32; indices unchecked (even under NUMBA_BOUNDSCHECK): callers pass b < len(blocks) and
    g < 16.  Generic LLVM vector code: the 16 bytes, sign bit flipped (as unsigned, q + 128),
    added as one vector reduction, which LLVM lowers to a single ``psadbw`` on x86; numba's own
    loop for this sum stays scalar, four times slower."""
    array_ok = isinstance(blocks, types.Array) and blocks.dtype == types.uint8 and blocks.ndim == 2 and blocks.layout == "C"
    if not (array_ok and isinstance(b, types.Integer) and isinstance(g, types.Integer)):
        return None
    group_bytes = ir.VectorType(ir.IntType(8), BSUM_GROUP)
    widened = ir.VectorType(ir.IntType(32), BSUM_GROUP)
    int32 = ir.IntType(32)

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        offset = builder.add(ir.Constant(ir.IntType(64), QS_OFFSET), builder.mul(args[2], ir.Constant(ir.IntType(64), BSUM_GROUP)))
        pointer = cgutils.get_item_pointer2(
            context, builder, data=array.data, shape=cgutils.unpack_tuple(builder, array.shape),
            strides=cgutils.unpack_tuple(builder, array.strides), layout="C", inds=[args[1], offset],
            wraparound=False, boundscheck=False,
        )
        quants = builder.load(builder.bitcast(pointer, group_bytes.as_pointer()), align=1)
        biased = builder.zext(builder.xor(quants, ir.Constant(group_bytes, [0x80] * BSUM_GROUP)), widened)
        reduce_add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(int32, [widened]), "llvm.vector.reduce.add.v16i32")
        return builder.sub(builder.call(reduce_add, [biased]), ir.Constant(int32, 128 * BSUM_GROUP))

    return types.int32(blocks, types.uint64, types.uint64), codegen
