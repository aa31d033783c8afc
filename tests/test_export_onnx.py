"""export_onnx: ONNX Runtime (CPU) against PyTorch (float64; float32 for rsdet, whose float64
CPU convolutions are too slow) for rsdet_atto and a ConvNeXt V2 classifier in fp32 (tight)
and fp16 (loose; rsdet fp16 in the slow run), at batch 1 and 3 from one dynamic-batch file;
the fp16 GRN rule (float32 L2 reduction) against a naive half-precision GRN that
overflows; parameter names, metadata, checker; clear errors for bad files and options.

Each model is exported once per precision (module fixtures); weights are random each run,
and the zero-initialised ones (GRN gamma/beta, deformable offsets) are made non-zero so
that GRN and the deformable sampling do real work. Failures print the seed.
"""

import json
import warnings
from functools import lru_cache

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from edgekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from edgekit.errors import EdgekitError
from edgekit.export import deform_export, onnx_checks
from edgekit.export.deform_export import export_backends
from edgekit.export.to_onnx import export_onnx, load_onnx, read_metadata, to_precision, torch_to_onnx
from edgekit.models import create_model
from edgekit.models.convnextv2 import Block, ConvNeXtV2
from edgekit.models.detect_post import decode_predictions

SIZE = 64
CLASSES = ["plane", "ship", "storage-tank"]
CALLER_META = {"bits": {"backbone.stages.0.0.pwconv1": 4, "head.cls_out": 8}, "note": "unit test", "run": 7}


def _seed() -> int:
    value = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed {value}")
    return value


def _wake_up(model, generator) -> None:
    """Give the zero-initialised GRN and offset predictors random values."""
    for name, p in model.named_parameters():
        if name.endswith(("grn.gamma", "grn.beta")):
            p.data = torch.randn(p.shape, generator=generator) * 0.5
        elif "conv_offset" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.05


def _float64_reference(model, images, detector: bool, dtype=torch.float64):
    """The model in float64 (or ``dtype``) with the pure-PyTorch ops; detectors decoded by detect_post."""
    import copy

    net = copy.deepcopy(model).to(dtype)
    with torch.no_grad(), export_backends("native"):  # routes GRN/deform to the float64-capable references
        out = net(images.to(dtype))
        if detector:
            return [t.double().numpy() for t in decode_predictions(out, net.strides)]
        return [out.double().numpy()]


@pytest.fixture(scope="module")
def detector():
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model("rsdet_atto", class_names=CLASSES).eval()
    _wake_up(model, g)
    return model, seed


@pytest.fixture(scope="module")
def classifier():
    """A small ConvNeXt V2; its stage-0 GRN sees sums of squares above float16's range."""
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ConvNeXtV2(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=5).eval()
    _wake_up(model, g)
    block = model.stages[0][0]
    block.norm.weight.data.fill_(20.0)
    block.pwconv1.weight.data = torch.randn(block.pwconv1.weight.shape, generator=g)
    return model, seed


@pytest.fixture(scope="module")
def detector_files(detector, tmp_path_factory):
    """{precision: path}; fp32 only, the fp16 file is made by the slow test (exports cost tens of
    CPU seconds; fp16 is covered fast by the classifier and the GRN block)."""
    model, _ = detector
    out = tmp_path_factory.mktemp("detector")
    return {"fp32": export_onnx(model, out / "rsdet_fp32.onnx", image_size=SIZE, metadata=CALLER_META)}


@pytest.fixture(scope="module")
def classifier_files(classifier, tmp_path_factory):
    model, _ = classifier
    out = tmp_path_factory.mktemp("classifier")
    return {p: export_onnx(model, out / f"cls_{p}.onnx", image_size=SIZE, precision=p) for p in ("fp32", "fp16")}


@lru_cache(maxsize=None)
def _session(path):
    return onnx_checks.session(path)


def _run(path, images: torch.Tensor):
    return _session(str(path)).run(None, {"images": images.numpy()})


def _assert_close(got, want, rtol, atol_fraction, what):
    for name, g, w in zip(("out0", "out1"), got, want):
        assert g.dtype == np.float32, f"{what}: {name} is {g.dtype}"
        assert g.shape == w.shape, f"{what}: {name} shape {g.shape} != {w.shape}"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol_fraction * float(np.abs(w).max()),
                                   err_msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def detector_reference(detector):
    """(images [3, 3, S, S], torch outputs). float32, not float64: CPU float64 convolutions take
    tens of seconds for rsdet on the shared 2-core machine (float64 is used for the small models)."""
    model, _ = detector
    images = torch.randn(3, 3, SIZE, SIZE)
    return images, _float64_reference(model, images, detector=True, dtype=torch.float32)


@pytest.mark.parametrize("batch", [1, 3])
def test_detector_fp32_matches_torch(detector, detector_files, detector_reference, batch):
    model, seed = detector
    images, want = detector_reference
    images, want = images[:batch], [w[:batch] for w in want]
    got = _run(detector_files["fp32"], images)
    n = sum((SIZE // s) ** 2 for s in model.strides)
    assert got[0].shape == (batch, n, 4) and got[1].shape == (batch, n, len(CLASSES))
    _assert_close(got, want, rtol=1e-4, atol_fraction=1e-5, what=f"rsdet fp32 seed {seed}")


@pytest.mark.slow
def test_detector_fp16_close_to_float64_torch(detector, tmp_path):
    model, seed = detector
    path = export_onnx(model, tmp_path / "rsdet_fp16.onnx", image_size=SIZE, precision="fp16")
    proto = load_onnx(path)
    assert read_metadata(proto)["precision"] == "fp16"
    assert set(onnx_checks.batch_dims(proto).values()) == {"batch"}
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    assert all(inits.get(name) == tuple(p.shape) for name, p in model.named_parameters())
    for batch in (1, 3):
        images = torch.randn(batch, 3, SIZE, SIZE)
        got = _run(path, images)
        want = _float64_reference(model, images, detector=True)
        _assert_close(got, want, rtol=2e-2, atol_fraction=1e-2, what=f"rsdet fp16 seed {seed}")


def test_detector_graph_names_and_checks(detector, detector_files):
    model, _ = detector
    for precision, path in detector_files.items():
        onnx.checker.check_model(str(path), full_check=True)
        proto = load_onnx(path)
        assert [i.name for i in proto.graph.input] == ["images"]
        assert [o.name for o in proto.graph.output] == ["boxes", "scores"]
        assert set(onnx_checks.batch_dims(proto).values()) == {"batch"}, precision
        assert onnx_checks.op_types(proto)["DeformConv"] == 2 * len(model.strides)  # 2 towers x 3 levels
        assert {t.elem_type for t in (v.type.tensor_type for v in proto.graph.input)} == {onnx.TensorProto.FLOAT}
        # Every torch parameter is an initializer of the same name and (torch) shape.
        inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
        for name, p in model.named_parameters():
            assert inits.get(name) == tuple(p.shape), f"{precision}: {name} missing or reshaped"
    assert not list(detector_files["fp32"].parent.glob(".*tmp*")), "a temporary file was left behind"


def test_metadata_round_trips(detector_files):
    for precision, path in detector_files.items():
        meta = read_metadata(path)
        assert meta["model"] == "rsdet_atto"
        assert meta["classes"] == CLASSES
        assert meta["input_size"] == [SIZE, SIZE]
        assert meta["mean"] == list(IMAGENET_MEAN) and meta["std"] == list(IMAGENET_STD)
        assert meta["precision"] == precision and meta["deform"] == "native"
        assert meta["simplified"].startswith(("yes", "no"))
        for key, value in CALLER_META.items():
            assert meta[key] == value
        # Readable without edgekit: strings raw, the rest JSON.
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert props["precision"] == precision and json.loads(props["classes"]) == CLASSES


@pytest.mark.parametrize("batch", [1, 3])
def test_classifier_fp32_matches_float64_torch(classifier, classifier_files, batch):
    model, seed = classifier
    images = torch.randn(batch, 3, SIZE, SIZE)
    got = _run(classifier_files["fp32"], images)
    want = _float64_reference(model, images, detector=False)
    assert got[0].shape == (batch, 5)
    _assert_close(got, want, rtol=1e-4, atol_fraction=1e-4, what=f"convnext fp32 seed {seed}")
    assert [o.name for o in load_onnx(classifier_files["fp32"]).graph.output] == ["logits"]
    assert read_metadata(classifier_files["fp32"])["classes"] is None


def _naive_half_grn(x, gamma, beta, eps, data_format):
    """GRN reduced in the input's precision: what a float16 engine does with ReduceL2."""
    gx = (x * x).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    return gamma.to(x.dtype) * (x * nx) + beta.to(x.dtype) + x


def _evaluate(model, feeds):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the naive graph's inf/NaN
        return ReferenceEvaluator(model).run(None, feeds)[0]


def test_fp16_grn_reduces_in_float32_where_naive_half_overflows(monkeypatch):
    """A ConvNeXt V2 block whose GRN input has per-channel sums of squares far above
    float16's 65504. The fp16 export stays finite and close to float64; the same block
    with GRN reduced in float16 gives inf/NaN.

    The naive graph is run in the ONNX reference evaluator (true float16 arithmetic):
    ONNX Runtime's CPU provider runs float16 nodes that lack float16 kernels in float32
    and drops the float32 -> float16 -> float32 casts between them, which hides the
    overflow that a float16 engine (TensorRT, a GPU) shows.
    """
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    block = Block(8).eval()
    _wake_up(block, g)
    block.norm.weight.data.fill_(20.0)  # LayerNorm output x20, then a unit-variance pwconv1
    block.pwconv1.weight.data = torch.randn(block.pwconv1.weight.shape, generator=g)
    x = torch.randn(3, 8, 16, 16, generator=g)
    seen = []
    hook = block.grn.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    want = _float64_reference(block, x, detector=False)[0]
    hook.remove()
    assert float(seen[0].pow(2).sum(dim=(1, 2)).max()) > 4 * 65504  # the premise: float16 overflows

    ours = torch_to_onnx(to_precision(block, "fp16"), (x[:2],), input_names=["x"], output_names=["y"])
    monkeypatch.setattr(deform_export, "_grn_export", _naive_half_grn)
    naive = torch_to_onnx(to_precision(block, "fp16"), (x[:2],), input_names=["x"], output_names=["y"])
    feeds = {"x": x.numpy()}
    for got in (_evaluate(ours, feeds), onnx_checks.session(ours).run(None, feeds)[0]):
        assert np.isfinite(got).all(), f"seed {seed}"
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * float(np.abs(want).max()),
                                   err_msg=f"seed {seed}")
    assert not np.isfinite(_evaluate(naive, feeds)).all(), f"naive float16 GRN stayed finite, seed {seed}"
    # Structure: every ReduceL2 of our graph reads float32.
    inferred = onnx.shape_inference.infer_shapes(ours)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    reduces = [n for n in inferred.graph.node if n.op_type == "ReduceL2"]
    assert reduces and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in reduces)


def test_classifier_fp16_batch_1(classifier, classifier_files):
    model, seed = classifier
    images = torch.randn(1, 3, SIZE, SIZE)
    got = _run(classifier_files["fp16"], images)
    want = _float64_reference(model, images, detector=False)
    _assert_close(got, want, rtol=2e-2, atol_fraction=2e-2, what=f"convnext fp16 seed {seed}")


def _one_line_error(fn, *fragments):
    with pytest.raises(EdgekitError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_load_onnx_bad_files(detector_files, tmp_path):
    good = detector_files["fp32"].read_bytes()
    missing = tmp_path / "missing.onnx"
    _one_line_error(lambda: load_onnx(missing), str(missing), "no such")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _one_line_error(lambda: load_onnx(empty), str(empty), "empty")
    rng = np.random.default_rng()
    # Cut inside the graph (the bulk of the file): a cut between two trailing metadata
    # entries would leave a valid, complete model.
    for name, data in (("truncated.onnx", good[: int(rng.integers(len(good) // 4, len(good) // 2))]),
                       ("garbage.onnx", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
                       ("text.onnx", b"this is not a model\n" * 20)):
        bad = tmp_path / name
        bad.write_bytes(data)
        _one_line_error(lambda: load_onnx(bad), str(bad), "re-export")
        _one_line_error(lambda: read_metadata(bad), str(bad))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"precision": "int8"}, "precision"),
    ({"deform": "fast"}, "deform"),
    ({"image_size": 50}, "multiple of 32"),
    ({"opset": 17}, "opset"),
])
def test_bad_options_are_one_line_errors_and_write_nothing(classifier, tmp_path, kwargs, fragment):
    model, _ = classifier
    options = {"image_size": SIZE, **kwargs}
    _one_line_error(lambda: export_onnx(model, tmp_path / "x.onnx", **options), fragment)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_detector_decomposed_deform_matches_float64_torch(detector, tmp_path):
    """rsdet_atto with deform="decompose": no DeformConv node, same outputs (batch 1 and 3)."""
    model, seed = detector
    path = export_onnx(model, tmp_path / "rsdet_decompose.onnx", image_size=SIZE, deform="decompose")
    proto = load_onnx(path)
    assert onnx_checks.op_types(proto)["DeformConv"] == 0
    assert read_metadata(proto)["deform"] == "decompose"
    for batch in (1, 3):
        images = torch.randn(batch, 3, SIZE, SIZE)
        got = _run(path, images)
        want = _float64_reference(model, images, detector=True)
        _assert_close(got, want, rtol=1e-4, atol_fraction=1e-5, what=f"rsdet decompose seed {seed}")


def _linear_graph(rng):
    """y = x @ Transpose(w) + b, with w [out, in] as torch stores a Linear weight."""
    from onnx import helper, numpy_helper

    w = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["fc.weight"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["xw"]),
             helper.make_node("Add", ["xw", "fc.bias"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])],
                              [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(b, "fc.bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_simplify_keeps_parameters_unfolded_and_named():
    rng = np.random.default_rng()
    model = _linear_graph(rng)
    slim, note = onnx_checks.simplify(model, keep={"fc.weight", "fc.bias"})
    assert note.startswith("yes"), note
    inits = {i.name: tuple(i.dims) for i in slim.graph.initializer}
    assert inits == {"fc.weight": (3, 4), "fc.bias": (3,)}
    assert [i.name for i in slim.graph.input] == ["x"]
    folded, _ = onnx_checks.simplify(model)  # unprotected: onnxslim folds the transpose
    assert "fc.weight" not in {i.name for i in folded.graph.initializer}


def test_simplify_falls_back_when_onnxslim_fails_or_changes_outputs(monkeypatch):
    import onnxslim
    from onnx import numpy_helper

    model = _linear_graph(np.random.default_rng())

    def broken(m):
        out = type(m)()
        out.CopyFrom(m)
        bias = next(i for i in out.graph.initializer if i.name == "fc.bias")
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1.0, "fc.bias"))
        return out

    monkeypatch.setattr(onnxslim, "slim", broken)
    kept, note = onnx_checks.simplify(model)
    assert kept is model and "changed the outputs" in note

    def crash(m):
        raise RuntimeError("boom")

    monkeypatch.setattr(onnxslim, "slim", crash)
    kept, note = onnx_checks.simplify(model)
    assert kept is model and "failed" in note and "boom" in note


def test_set_metadata_round_trip_and_rejects_unserialisable():
    from edgekit.export.to_onnx import set_metadata

    model = _linear_graph(np.random.default_rng())
    meta = {"a": "text", "b": [1, 2.5, None], "c": {"x": {"bits": 4}}, "d": True, "e": "[1, 2]"}
    set_metadata(model, meta)
    set_metadata(model, {"f": 3})  # adds, keeps the rest
    assert read_metadata(model) == {**meta, "f": 3}
    _one_line_error(lambda: set_metadata(model, {"bad": object()}), "metadata['bad']")
