"""End-to-end NMS graphs against the torch post-processing (RSDet.predict's rule).

The raw boxes/scores graph comes from a torch export of a small RSDet whose head is
re-initialised with wide weights, so that scores spread over (0, 1) and NMS has real work.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgekit.boxes import box_iou
from edgekit.errors import EdgekitError
from edgekit.export.end2end import append_nms, make_end2end, split_detections
from edgekit.models import create_model
from edgekit.models.detect_post import decode_predictions, postprocess
from export_helpers import export_raw_detector, fresh_seed


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    seed = fresh_seed()
    model = create_model("rsdet_atto", num_classes=4, deformable=False, grn_backend="torch").eval()
    for conv in (model.head.cls_out, model.head.ctr_out):
        torch.nn.init.normal_(conv.weight, std=0.3)
    path = tmp_path_factory.mktemp("e2e") / "raw.onnx"
    export_raw_detector(model, path, image_size=96)
    return model, onnx.load(str(path)), seed


def run(model_proto, images):
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def assert_same_detections(want, got, where):
    """Same detections per image, order and exact score ties aside."""
    assert len(got["scores"]) == len(want["scores"]), where
    if not len(want["scores"]):
        return
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"].numpy(), rtol=1e-4, atol=1e-5, err_msg=where)
    iou = box_iou(want["boxes"], got["boxes"])
    same_class = want["labels"][:, None] == got["labels"][None, :]
    matched = ((iou > 0.999) & same_class).any(1)
    assert matched.all(), f"{where}: {int((~matched).sum())} torch detections have no ONNX twin"


def test_matches_torch_postprocess_on_random_images(detector):
    model, raw, seed = detector
    rng = np.random.default_rng(seed)
    for trial in range(4):
        batch = int(rng.integers(1, 4))  # the graph was traced at batch 1: dynamic batch is exercised
        images = torch.from_numpy(rng.standard_normal((batch, 3, 96, 96)).astype(np.float32))
        score_thr, iou_thr = float(rng.uniform(0.05, 0.6)), float(rng.uniform(0.3, 0.8))
        max_det, top_k = int(rng.integers(1, 60)), int(rng.integers(20, 2000))
        if trial == 0:  # the top-k cut only shows when it, not max_detections, binds
            score_thr, max_det, top_k = 0.01, 1000, int(rng.integers(5, 40))
        e2e = append_nms(raw, score_threshold=score_thr, iou_threshold=iou_thr, max_detections=max_det,
                         pre_nms_top_k=top_k)
        with torch.no_grad():
            boxes, scores = decode_predictions(model(images), model.strides)
        want = postprocess(boxes, scores, score_thr, iou_thr, max_det, top_k, image_size=images.shape[-2:])
        det = run(e2e, images)
        assert det.dtype == np.float32 and det.shape[1] == 7
        for b, (w, g) in enumerate(zip(want, split_detections(det, batch))):
            assert_same_detections(w, g, f"seed {seed} trial {trial} image {b} (thr {score_thr:.3f}/{iou_thr:.3f}, "
                                         f"max {max_det}, top-k {top_k})")


def test_matches_rsdet_predict_and_layout(detector):
    model, raw, seed = detector
    images = torch.randn(2, 3, 96, 96)
    e2e = append_nms(raw, score_threshold=0.2, iou_threshold=0.5, max_detections=10)
    det = run(e2e, images)
    for b, (w, g) in enumerate(zip(model.predict(images, 0.2, 0.5, 10), split_detections(det, 2))):
        assert_same_detections(w, g, f"seed {seed} image {b}")
    # Rows grouped by image in order, scores decreasing within an image, boxes inside the image.
    assert (np.diff(det[:, 0]) >= 0).all()
    for b in range(2):
        s = det[det[:, 0] == b, 5]
        assert len(s) <= 10 and (np.diff(s) <= 0).all()
    assert (det[:, 1:5] >= 0).all() and (det[:, 1:5] <= 96).all()
    assert set(np.unique(det[:, 6])) <= set(range(4))


def test_nothing_passes_gives_empty_detections(detector):
    _, raw, _ = detector
    det = run(append_nms(raw, score_threshold=1.0), torch.randn(2, 3, 96, 96))
    assert det.shape == (0, 7)


def test_metadata_and_file_round_trip(detector, tmp_path):
    _, raw, _ = detector
    src = tmp_path / "raw.onnx"
    onnx.save(raw, str(src))
    out = make_end2end(src, tmp_path / "e2e.onnx", score_threshold=0.3, max_detections=7)
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["detections"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert '"max_detections": 7' in meta["edgekit.nms"] and '"score_threshold": 0.3' in meta["edgekit.nms"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("kwargs, match", [({"score_threshold": 1.5}, "score threshold"),
                                           ({"iou_threshold": 0.0}, "IoU threshold"),
                                           ({"max_detections": 0}, "max detections"),
                                           ({"boxes_output": "nope"}, "no output 'nope'")])
def test_bad_arguments_are_one_line_errors(detector, kwargs, match):
    _, raw, _ = detector
    with pytest.raises(EdgekitError, match=match) as info:
        append_nms(raw, **kwargs)
    assert "\n" not in str(info.value)


def test_unreadable_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EdgekitError, match="not a readable ONNX file"):
        make_end2end(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_ties_at_the_kth_score_let_exactly_top_k_through():
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Identity", ["b_in"], ["boxes"]), helper.make_node("Identity", ["s_in"], ["scores"])], "g",
        [helper.make_tensor_value_info("images", f, [1, 3, 64, 64]), helper.make_tensor_value_info("b_in", f, [1, 6, 4]),
         helper.make_tensor_value_info("s_in", f, [1, 6, 2])],
        [helper.make_tensor_value_info("boxes", f, [1, 6, 4]), helper.make_tensor_value_info("scores", f, [1, 6, 2])])
    raw = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    e2e = append_nms(raw, score_threshold=0.1, iou_threshold=0.5, max_detections=20, pre_nms_top_k=3)
    boxes = np.array([[[10 * i, 0, 10 * i + 5, 5] for i in range(6)]], np.float32)  # disjoint: NMS removes none
    tie = float(np.random.default_rng().uniform(0.2, 0.9))
    scores = np.zeros((1, 6, 2), np.float32)
    scores[0, :, 1] = tie  # six pairs tied at the 3rd-best score
    session = ort.InferenceSession(e2e.SerializeToString(), providers=["CPUExecutionProvider"])
    det = session.run(None, {"images": np.zeros((1, 3, 64, 64), np.float32), "b_in": boxes, "s_in": scores})[0]
    assert det.shape == (3, 7), (tie, det)
    assert np.allclose(det[:, 5], tie) and np.all(det[:, 6] == 1)
    scores[0, 0, 0] = tie + 0.05  # one pair above the tie: it and two of the tied ones
    det = session.run(None, {"images": np.zeros((1, 3, 64, 64), np.float32), "b_in": boxes, "s_in": scores})[0]
    assert det.shape == (3, 7) and det[0, 5] == pytest.approx(tie + 0.05) and det[0, 6] == 0
