"""Streaming (non-temporal) vector stores for Numba kernels, written in LLVM IR.

Why: an ordinary store to a line that is not in cache first reads that line from memory
(read-for-ownership), so writing an output larger than the cache costs a read and a
write of it. A non-temporal store skips the read and the cache, which is what a large
output that nothing reads soon wants: on the 2-core EPYC the GRN forward of 20-40 MiB
tensors took 6-20% less time with these (interleaved A/B). Numba has no way to ask for them,
so :func:`stream_affine8` builds the 8-lane block in IR and marks its store
``!nontemporal``.

The store needs ``out``'s address at element ``i`` to be 32-byte aligned (callers check:
a misaligned one faults); the loads have no alignment requirement. Eight lanes of float32 (one AVX2
register) or float64 (two).

Numba's on-disk cache keys a kernel on its own source file only: after editing this
module, delete ``kernels/__pycache__/numba_grn.*.nbi``/``.nbc`` (or set
``NUMBA_CACHE_DIR`` to an empty folder), or the kernels keep the old stores.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 8
ALIGN_BYTES = 32  # an 8 x float32 vector


@intrinsic
def stream_affine8(typingctx, out, u, a, beta, i, j):
    """out[i:i+8] = u[i:i+8] * a[j:j+8] + beta[j:j+8] (float32 or float64, one dtype;
    multiply-add fused where the target fuses ``contract``ed code: the same rounding as
    the ordinary loop), stored non-temporally; ``out[i]`` must be 32-byte aligned."""
    arrays = (out, u, a, beta)
    if not all(isinstance(t, types.Array) for t in arrays) or len({t.dtype for t in arrays}) != 1 \
            or out.dtype not in (types.float32, types.float64):
        return None
    sig = types.void(out, u, a, beta, i, j)

    def codegen(context, builder, signature, args):
        vector = ir.VectorType(context.get_value_type(out.dtype), LANES)
        data = [context.make_array(t)(context, builder, v).data for t, v in zip(signature.args[:4], args[:4])]
        i_, j_ = args[4], args[5]

        def lanes(pointer, index):
            return builder.bitcast(builder.gep(pointer, [index]), vector.as_pointer())

        x = builder.load(lanes(data[1], i_), align=4)
        scale = builder.load(lanes(data[2], j_), align=4)
        shift = builder.load(lanes(data[3], j_), align=4)
        bits = 32 if out.dtype == types.float32 else 64
        fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                                 f"llvm.fmuladd.v{LANES}f{bits}")
        result = builder.call(fmuladd, [x, scale, shift])
        store = builder.store(result, lanes(data[0], i_), align=ALIGN_BYTES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return sig, codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def store_fence(typingctx):
    """Orders the streaming stores before the kernel returns and another thread reads the
    output: an ``sfence`` on x86 (LLVM would emit a locked instruction for a plain fence,
    which Linux does not rely on for non-temporal stores), a ``fence seq_cst`` elsewhere
    (``dmb ish`` on aarch64)."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            sfence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                    "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen
