"""TensorRT builder: the trtexec command text, the missing-TensorRT error, and which API
calls build_engine makes per TensorRT version (against a stand-in module: tensorrt cannot
be installed on CI, which has no GPU; a real build runs only where tensorrt is installed)."""

import shlex
import sys

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgekit.errors import EdgekitError
from edgekit.export.tensorrt import build_engine, tensorrt_version, trtexec_command
from export_helpers import FakeTensorRT

SHAPES = {"images": ([1, 3, 64, 64], [4, 3, 64, 64], [8, 3, 64, 64])}


def test_trtexec_tensorrt10_fp16_command():
    cmd = trtexec_command("out dir/model.onnx", "out dir/model.engine", "out dir/t.cache", precision="fp16",
                          trt_major=10, shapes=SHAPES, workspace_mib=2048)
    args = shlex.split(cmd)  # paths with spaces survive the shell
    assert args == ["trtexec", "--onnx=out dir/model.onnx", "--saveEngine=out dir/model.engine", "--fp16",
                    "--minShapes=images:1x3x64x64", "--optShapes=images:4x3x64x64", "--maxShapes=images:8x3x64x64",
                    "--timingCacheFile=out dir/t.cache", "--memPoolSize=workspace:2048M"]


@pytest.mark.parametrize("major, precision, strongly, flags", [
    (10, "fp32", False, []), (10, "int8", False, ["--int8", "--fp16"]), (10, "fp32", True, ["--stronglyTyped"]),
    (11, "fp16", False, []), (11, "int8", False, []), (11, "fp16", True, [])])
def test_trtexec_precision_flags_per_version(major, precision, strongly, flags):
    args = shlex.split(trtexec_command("m.onnx", "m.engine", precision=precision, trt_major=major,
                                       strongly_typed=strongly))
    assert args[3:] == flags  # TensorRT 11 removed every precision flag (strong typing always on)


def test_unknown_precision_is_an_error():
    with pytest.raises(EdgekitError, match="unknown TensorRT precision 'int4'"):
        trtexec_command("m.onnx", "m.engine", precision="int4")


@pytest.mark.skipif(tensorrt_version() is not None, reason="tensorrt is installed here")
def test_missing_tensorrt_is_one_clear_line(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_graph(), str(path))
    with pytest.raises(EdgekitError, match=r"TensorRT is not installed .*pip install 'edgekit\[tensorrt\]'") as info:
        build_engine(path, tmp_path / "m.engine")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.engine").exists()


def _graph(fp16=False, deform=False, qdq=False):
    """A one-Conv graph with a dynamic batch, optionally with float16, DeformConv or Q/DQ nodes."""
    nodes = [helper.make_node("Conv", ["images", "w"], ["y"], kernel_shape=[1, 1])]
    if deform:
        nodes.append(helper.make_node("DeformConv", ["y", "w", "off"], ["z"], kernel_shape=[1, 1]))
    if qdq:
        nodes.insert(0, helper.make_node("QuantizeLinear", ["images", "s"], ["q"]))
    if fp16:
        nodes.append(helper.make_node("Cast", ["y"], ["y16"], to=TensorProto.FLOAT16))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("w", TensorProto.FLOAT, [3, 3, 1, 1], [0.0] * 9)])
    return helper.make_model(graph)


@pytest.fixture
def fake_trt(monkeypatch):
    def install(version):
        rec = FakeTensorRT(version)
        monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
        return rec
    return install


@pytest.mark.parametrize("version, precision, fp16_graph, flags, strongly", [
    ("10.3.0", "fp16", False, ["FP16"], False),
    ("10.3.0", "int8", False, ["FP16", "INT8"], False),
    ("10.3.0", "fp32", True, [], True),
    ("11.1.0", "fp16", True, [], True),
    ("11.1.0", "int8", False, [], True)])
def test_build_engine_api_calls_per_version(fake_trt, tmp_path, version, precision, fp16_graph, flags, strongly):
    rec = fake_trt(version)
    path = tmp_path / "m.onnx"
    onnx.save(_graph(fp16=fp16_graph, qdq=precision == "int8"), str(path))
    (tmp_path / "m.engine.timing.cache").write_bytes(b"OLD")
    info = build_engine(path, tmp_path / "m.engine", precision=precision, opt_batch=2, max_batch=4, workspace_mib=64)
    assert ("create_network", 2 if strongly else 0) in rec.calls
    assert [c[1] for c in rec.calls if c[0] == "flag"] == flags
    assert ("set_shape", "images", [1, 3, 8, 8], [2, 3, 8, 8], [4, 3, 8, 8]) in rec.calls
    assert ("pool", "WORKSPACE", 64 << 20) in rec.calls and ("cache_in", b"OLD") in rec.calls
    assert (tmp_path / "m.engine").read_bytes() == b"ENGINE"
    assert (tmp_path / "m.engine.timing.cache").read_bytes() == b"CACHE"
    script = (tmp_path / "m.engine.trtexec.sh").read_text()
    assert info["trtexec"] in script and "--maxShapes=images:4x3x8x8" in script
    assert ("--fp16" in script) == ("FP16" in flags) and ("--stronglyTyped" in script) == (strongly and int(version.split(".")[0]) < 11)


@pytest.mark.parametrize("version, kwargs, graph, match", [
    ("11.0.0", {"precision": "fp16"}, {}, "FP32 graph and TensorRT 11.0.0 has no FP16 builder flag"),
    ("10.0.1", {"precision": "fp16"}, {"deform": True}, "cannot import ONNX DeformConv.*--deform decompose"),
    ("10.3.0", {"precision": "int8"}, {}, "no QuantizeLinear/DequantizeLinear nodes"),
    ("9.2.0", {}, {}, "too old"),
    ("10.3.0", {"min_batch": 4, "max_batch": 2}, {}, "min_batch <= opt_batch <= max_batch")])
def test_build_engine_refusals(fake_trt, tmp_path, version, kwargs, graph, match):
    fake_trt(version)
    path = tmp_path / "m.onnx"
    onnx.save(_graph(**graph), str(path))
    with pytest.raises(EdgekitError, match=match):
        build_engine(path, tmp_path / "m.engine", **kwargs)
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.skipif(tensorrt_version() is None or not torch.cuda.is_available(), reason="needs tensorrt and a GPU")
def test_real_engine_build(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_graph(), str(path))
    info = build_engine(path, tmp_path / "m.engine", precision="fp32")
    assert (tmp_path / "m.engine").stat().st_size > 0 and info["build_seconds"] > 0

