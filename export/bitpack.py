"""Bit-plane packing of b-bit integer weights, unpacked in the graph by standard ONNX ops.

Why: ONNX has integer types of 4 and 8 bits only (INT2 arrives with opset 25, which
ONNX Runtime 1.32 does not run), so without packing a 2-bit weight costs as much as a
4-bit one and a 5-bit weight as much as an 8-bit one. Bit planes cost b/8 byte a weight
for any b and are unpacked by opset-18 bitwise ops; every input of the unpacking chain
is an initializer, so ONNX Runtime folds it into a plain INT8 initializer when it loads
the model and then fuses the layer into an integer kernel exactly as with INT8 storage.

The format (export/README.md has it for other runtimes): a signed b-bit tensor ``q``
(any shape, N values in C order) is stored as unsigned codes ``c = q + 2^(b-1)`` in
[0, 2^b), as one UINT8 initializer of shape [b, ceil(N/8), 1]: row k is bit plane k
(bit k of every code, k = 0 the least significant), packed 8 codes a byte, the first
code in the most significant bit (``numpy.packbits``' order), zero padding at the end.
"""

from __future__ import annotations

# Names of the constants the unpacking chain of every layer shares (one copy per graph).
SHIFTS = "edgekit_bitplane_shifts"
ONE = "edgekit_bitplane_one"
ZERO = "edgekit_bitplane_zero"  # ReduceSum's axis and Slice's start
FLAT = "edgekit_bitplane_flat"


def offset(bits: int) -> int:
    """What is added to a signed b-bit value to make its unsigned code."""
    return 2 ** (bits - 1)


def pack(codes, bits: int):
    """Unsigned ``codes`` (any shape, values in [0, 2^bits)) as uint8 planes [bits, ceil(N/8), 1]."""
    import numpy as np

    if not 1 <= bits <= 8:
        raise ValueError(f"bit planes hold 1 to 8 bits, got {bits}")
    flat = np.asarray(codes).ravel()
    if flat.size and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) for {bits} bits, got [{flat.min()}, {flat.max()}]")
    flat = flat.astype(np.uint8)
    planes = np.stack([np.packbits((flat >> k) & 1) for k in range(bits)])
    return planes.reshape(bits, -1, 1)


def unpack(planes, bits: int, count: int):
    """The ``count`` uint8 codes of :func:`pack`'s planes (the numpy reading of the format)."""
    import numpy as np

    planes = np.asarray(planes, np.uint8).reshape(bits, -1)
    codes = np.zeros(planes.shape[1] * 8, np.uint8)
    for k in range(bits):
        codes |= np.unpackbits(planes[k]) << k
    return codes[:count]


def packed_bytes(count: int, bits: int) -> int:
    """Stored bytes of ``count`` b-bit values: b planes of ceil(count/8) bytes."""
    return bits * -(-count // 8)


def unpack_subgraph(planes_name: str, out_name: str, bits: int, shape, prefix: str) -> tuple[list, list]:
    """(nodes, initializers) turning the planes initializer ``planes_name`` into the INT8
    tensor ``out_name`` of ``shape`` holding the signed values (codes - 2^(bits-1)).

    The chain: BitShift right by 7..0 and BitwiseAnd 1 give each code's bits [b, bytes, 8];
    Cast to INT32, Mul by 2^k per plane and ReduceSum over the planes give the codes; Sub
    the offset, Cast to INT8, (drop the padding,) Reshape. Intermediate names start with
    ``prefix`` (keep it short: each name is written twice, and the chain's ~450 bytes are
    per layer); the constants shared by all chains (``edgekit_bitplane_*``) are returned
    too: add each name once per graph.
    """
    import math

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    count = math.prod(shape)
    weights, off = f"edgekit_bitplane_weights{bits}", f"edgekit_bitplane_offset{bits}"
    inits = [numpy_helper.from_array(np.arange(7, -1, -1, dtype=np.uint8), SHIFTS),
             numpy_helper.from_array(np.array(1, np.uint8), ONE),
             numpy_helper.from_array(np.array([0], np.int64), ZERO),
             numpy_helper.from_array((2 ** np.arange(bits, dtype=np.int32)).reshape(bits, 1, 1), weights),
             numpy_helper.from_array(np.array(offset(bits), np.int32), off),
             numpy_helper.from_array(np.asarray(shape, np.int64), f"{prefix}shape")]
    t = [f"{prefix}{i}" for i in range(9)]
    nodes = [helper.make_node("BitShift", [planes_name, SHIFTS], [t[0]], direction="RIGHT"),
             helper.make_node("BitwiseAnd", [t[0], ONE], [t[1]]),
             helper.make_node("Cast", [t[1]], [t[2]], to=TensorProto.INT32),
             helper.make_node("Mul", [t[2], weights], [t[3]]),
             helper.make_node("ReduceSum", [t[3], ZERO], [t[4]], keepdims=0),
             helper.make_node("Sub", [t[4], off], [t[5]]),
             helper.make_node("Cast", [t[5]], [t[6]], to=TensorProto.INT8)]
    if count % 8:  # padded: flatten and drop the padding codes
        inits += [numpy_helper.from_array(np.array([-1], np.int64), FLAT),
                  numpy_helper.from_array(np.array([count], np.int64), f"{prefix}count")]
        nodes += [helper.make_node("Reshape", [t[6], FLAT], [t[7]]),
                  helper.make_node("Slice", [t[7], ZERO, f"{prefix}count"], [t[8]])]
        t[6] = t[8]
    nodes.append(helper.make_node("Reshape", [t[6], f"{prefix}shape"], [out_name]))
    return nodes, inits


def packed_tensor(name: str, q, bits: int, planes_name: str, prefix: str) -> tuple[list, list]:
    """(nodes, initializers) computing the INT8 tensor ``name`` equal to the signed b-bit
    array ``q`` from its bit planes, the initializer ``planes_name`` (first in the list)."""
    import numpy as np
    from onnx import numpy_helper

    q = np.asarray(q)
    planes = numpy_helper.from_array(pack(q.astype(np.int64) + offset(bits), bits), planes_name)
    nodes, inits = unpack_subgraph(planes_name, name, bits, q.shape, prefix)
    return nodes, [planes] + inits
