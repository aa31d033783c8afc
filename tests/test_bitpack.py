"""Bit-plane packing: numpy round trip, the documented byte layout, and the ONNX unpacking
chain run by the ONNX reference evaluator and by ONNX Runtime."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from edgekit.export import bitpack

SIZES = (1, 7, 8, 9, 63, 1000, 4099)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip_and_size(rng, bits):
    for count in SIZES:
        codes = rng.integers(0, 2 ** bits, count)
        planes = bitpack.pack(codes, bits)
        assert planes.dtype == np.uint8 and planes.shape == (bits, -(-count // 8), 1)
        assert planes.nbytes == bitpack.packed_bytes(count, bits)
        np.testing.assert_array_equal(bitpack.unpack(planes, bits, count), codes)


def test_layout_is_the_documented_one(rng):
    """Plane k holds bit k of each code; code i sits in byte i // 8 at bit 7 - i % 8; zero padding."""
    bits, count = int(rng.integers(1, 9)), int(rng.integers(1, 40))
    codes = rng.integers(0, 2 ** bits, count)
    planes = bitpack.pack(codes, bits).reshape(bits, -1)
    for k in range(bits):
        for i in range(planes.shape[1] * 8):
            bit = (int(planes[k, i // 8]) >> (7 - i % 8)) & 1
            assert bit == ((int(codes[i]) >> k) & 1 if i < count else 0), (k, i)


def test_codes_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        bitpack.pack(np.array([0, 8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        bitpack.pack(np.array([-1, 2]), 2)
    with pytest.raises(ValueError, match="1 to 8 bits"):
        bitpack.pack(np.array([0]), 9)


def unpacking_model(q, bits):
    nodes, inits = bitpack.packed_tensor("Q", q, bits, "w_bitplanes", "bp0.")
    graph = helper.make_graph(nodes, "unpack", [], [helper.make_tensor_value_info("Q", TensorProto.INT8, q.shape)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("bits", range(1, 9))
def test_onnx_unpacking_chain_gives_the_values_in_both_runtimes(rng, bits):
    """Signed values in the full b-bit range, shapes with and without padding."""
    for shape in [(int(rng.integers(1, 9)), int(rng.integers(1, 5)), 3, 3), (8, 16), (int(rng.integers(1, 50)),)]:
        q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), shape).astype(np.int8)
        model = unpacking_model(q, bits)
        np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {})[0], q)
        for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            got = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"]).run(None, {})[0]
            assert got.dtype == np.int8
            np.testing.assert_array_equal(got, q)
        stored = next(t for t in model.graph.initializer if t.name == "w_bitplanes")
        assert len(stored.raw_data) == bitpack.packed_bytes(q.size, bits)
