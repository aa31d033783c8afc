"""The oriented RSDet head: outputs, checkpoints, rotated assignment against shapely,
decoding, the ProbIoU loss's symmetries and finite gradients, predict, ONNX export of
the raw outputs and their decoding, and that the head learns angles."""

import math
import warnings

import numpy as np
import pytest
import torch
from shapely.geometry import Point, Polygon

from edgekit.errors import EdgekitError
from edgekit.models import RSDet, create_model
from edgekit.models.detect_loss import point_ranges
from edgekit.models.detect_post import decode_predictions, flatten_levels
from edgekit.models.obb_loss import assign_rotated_targets
from edgekit.models.obb_post import decode_rotated_predictions, distances_to_rboxes, postprocess_rotated
from edgekit.rotated import canonical_rboxes, rbox_iou, rbox_to_box, rbox_to_poly

CLASSES = ["plane", "ship", "small-vehicle"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    return create_model("rsdet_atto", class_names=CLASSES, obb=True, deformable=False, grn_backend="torch").eval()


def random_targets(rng, n, size):
    """Canonical rotated boxes inside a size x size image, angles strictly inside (-pi/2, pi/2)."""
    out = []
    while len(out) < n:
        w, h = rng.uniform(8, 50), rng.uniform(4, 20)
        r = [rng.uniform(0, size), rng.uniform(0, size), max(w, h), min(w, h), rng.uniform(-1.5, 1.5)]
        p = rbox_to_poly(np.array(r))
        if p.min() > 0 and p.max() < size:
            out.append(r)
    return torch.tensor(out, dtype=torch.float32)


def test_outputs_config_and_checkpoint_keys(model):
    with torch.no_grad():
        cls, _, _, angle = model(torch.randn(2, 3, 96, 64))
    for a, c, s in zip(angle, cls, model.strides):
        assert a.shape == (2, 1, 96 // s, 64 // s) and c.shape[-2:] == a.shape[-2:]
    horizontal = create_model("rsdet_atto", class_names=CLASSES, deformable=False)
    assert len(horizontal(torch.randn(1, 3, 64, 64))) == 3 and horizontal.config["obb"] is False
    extra = set(model.state_dict()) - set(horizontal.state_dict())
    assert extra == {"head.angle_out.weight", "head.angle_out.bias"}
    assert set(horizontal.state_dict()) <= set(model.state_dict())
    rebuilt = RSDet(**model.config)  # the config is the constructor's kwargs
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert rebuilt.obb


def test_assignment_uses_points_inside_the_rotated_box(model, rng):
    size = 128
    gt = random_targets(rng, 6, size)
    labels = torch.tensor(rng.integers(0, 3, 6))
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, size, size))
    _, _, _, points, pstrides = flatten_levels(outputs[:3], model.strides)
    wide = torch.tensor([[0.0, 1e8]]).expand(len(points), 2)
    assigned, ltrb, matched = assign_rotated_targets(points, pstrides, wide, gt, labels, 3, center_radius=1e4)
    polys = [Polygon(p) for p in rbox_to_poly(gt.double().numpy())]
    area = (gt[:, 2] * gt[:, 3]).numpy()
    for k, (x, y) in enumerate(points.tolist()):
        containing = [g for g, poly in enumerate(polys) if poly.contains(Point(x, y))]
        if not containing:
            assert assigned[k] == 3
            continue
        g = min(containing, key=lambda i: area[i])
        assert assigned[k] == labels[g] and torch.equal(matched[k], gt[g])
        # The distances rebuild the box from the point.
        back = distances_to_rboxes(points[k], ltrb[k], gt[g, 4])
        assert rbox_iou(back[None].double(), gt[g:g + 1].double())[0, 0] > 1 - 1e-5
    assert (assigned < 3).sum() > 5  # the loop above checked some positives
    # Default centre sampling: positives lie within 1.5 strides of the centre along the box axes.
    ranges = point_ranges(model.strides, pstrides)
    assigned, ltrb, matched = assign_rotated_targets(points, pstrides, ranges, gt, labels, 3)
    pos = assigned < 3
    along, across = (ltrb[pos, 0] - ltrb[pos, 2]) / 2, (ltrb[pos, 1] - ltrb[pos, 3]) / 2
    assert (along.abs() < 1.5 * pstrides[pos]).all() and (across.abs() < 1.5 * pstrides[pos]).all()
    assert (ltrb[pos].max(1).values > ranges[pos, 0]).all() and (ltrb[pos].max(1).values <= ranges[pos, 1]).all()


def test_decoding_inverts_the_targets(model, rng):
    """Assigned targets fed back as raw outputs decode to the ground-truth rotated boxes."""
    size = 128
    gt = random_targets(rng, 5, size)
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, size, size))
    _, _, _, points, pstrides = flatten_levels(outputs[:3], model.strides)
    ranges = point_ranges(model.strides, pstrides)
    assigned, ltrb, matched = assign_rotated_targets(points, pstrides, ranges, gt, torch.zeros(5, dtype=torch.long), 3)
    pos = assigned < 3
    assert pos.sum() >= 5
    logit = torch.logit(matched[:, 4] / math.pi + 0.5)
    box_maps, angle_maps, offset = [], [], 0
    for c in outputs[0]:
        n, shape = c.shape[-2] * c.shape[-1], c.shape[-2:]
        box_maps.append((ltrb[offset:offset + n] / pstrides[offset:offset + n, None]).T.reshape(1, 4, *shape))
        angle_maps.append(logit[offset:offset + n].reshape(1, 1, *shape))
        offset += n
    rboxes, scores = decode_rotated_predictions((outputs[0], box_maps, outputs[2], angle_maps), model.strides)
    assert scores.shape == (1, len(points), 3)
    np.testing.assert_allclose(rboxes[0][pos].numpy(), canonical_rboxes(matched[pos]).numpy(), atol=2e-4)
    with pytest.raises(ValueError, match="decode_rotated_predictions"):
        decode_predictions((outputs[0], box_maps, outputs[2], angle_maps), model.strides)


def _one_batch(rng, size=64):
    rboxes = [random_targets(rng, int(rng.integers(1, 3)), size) for _ in range(2)]
    return [{"rboxes": r, "boxes": rbox_to_box(r), "labels": torch.tensor(rng.integers(0, 3, len(r)))} for r in rboxes]


def test_loss_is_the_same_for_equivalent_boxes(model, rng):
    targets = _one_batch(rng)
    outputs = model(torch.randn(2, 3, 64, 64))
    ref = model.loss(outputs, targets)
    for transform in (lambda r: torch.stack([r[:, 0], r[:, 1], r[:, 3], r[:, 2], r[:, 4] + math.pi / 2], 1),
                      lambda r: torch.cat([r[:, :4], r[:, 4:] - math.pi], 1),
                      lambda r: torch.cat([r[:, :4], r[:, 4:] + 2 * math.pi], 1)):
        other = [{**t, "rboxes": transform(t["rboxes"])} for t in targets]
        got = model.loss(outputs, other)
        assert got["num_pos"] == ref["num_pos"] > 0
        for key in ("loss", "cls", "box", "ctr"):
            assert got[key].item() == pytest.approx(ref[key].item(), rel=1e-4, abs=1e-6), key


def test_gradients_finite_at_angle_boundaries(fresh_torch_seed):
    m = create_model("rsdet_atto", class_names=CLASSES, obb=True, deformable=False)
    x = torch.randn(1, 3, 64, 64)
    # Also with saturated angle logits: the sigmoid's flat ends.
    for angle, bias in ((-math.pi / 2, 0.0), (math.pi / 2 - 1e-6, 0.0), (0.0, 0.0), (math.pi / 4, 0.0),
                        (-math.pi / 2, -30.0), (math.pi / 2 - 1e-6, 30.0)):
        with torch.no_grad():
            m.head.angle_out.bias.fill_(bias)
        m.zero_grad()
        targets = [{"rboxes": torch.tensor([[32.0, 30.0, 40.0, 12.0, angle], [20.0, 44.0, 14.0, 14.0, angle]]),
                    "labels": torch.tensor([0, 2])}]
        out = m.loss(m(x), targets)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and out["num_pos"] > 0
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None), (angle, bias)
        if bias == 0.0:
            assert m.head.angle_out.weight.grad.abs().sum() > 0


def test_loss_needs_rotated_targets_and_handles_empty_images(model):
    out = model(torch.randn(2, 3, 64, 64))
    with pytest.raises(EdgekitError, match="rboxes"):
        model.loss(out, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2)
    empty = [{"rboxes": torch.zeros(0, 5), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    loss = model.loss(out, empty)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.head.angle_out.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_predict_returns_rotated_and_enclosing_boxes(model):
    preds = model.predict(torch.randn(2, 3, 96, 128), score_threshold=0.0, max_detections=50)
    for p in preds:
        assert set(p) == {"rboxes", "boxes", "scores", "labels"}
        assert p["rboxes"].shape == (len(p["scores"]), 5) and 0 < len(p["scores"]) <= 50
        r = p["rboxes"]
        assert (r[:, 2] >= r[:, 3]).all() and (r[:, 4] >= -math.pi / 2).all() and (r[:, 4] < math.pi / 2).all()
        enclosing = rbox_to_box(r)
        clipped = torch.stack([enclosing[:, 0].clamp(0, 128), enclosing[:, 1].clamp(0, 96),
                               enclosing[:, 2].clamp(0, 128), enclosing[:, 3].clamp(0, 96)], 1)
        assert torch.allclose(p["boxes"], clipped, atol=1e-4)
        assert (p["scores"][:-1] >= p["scores"][1:]).all()
        for c in p["labels"].unique():  # no two kept boxes of a class overlap above the threshold
            same = r[p["labels"] == c].double()
            iou = rbox_iou(same, same) - torch.eye(len(same), dtype=torch.float64)
            assert (iou <= 0.6 + 1e-9).all()


class _RawRotated(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return decode_rotated_predictions(self.model(images), self.model.strides)


def test_raw_outputs_and_decoding_export_to_onnx(model, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "obb.onnx"
    x = torch.randn(2, 3, 64, 96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_RawRotated(model).eval(), (x,), str(path), input_names=["images"],
                          output_names=["rboxes", "scores"], opset_version=19, dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = model.decode(model(x))
    np.testing.assert_allclose(got[1], want[1].numpy(), atol=1e-5)
    # Angles near +-pi/2 may land on either end in float32: compare as rectangles.
    same = rbox_iou(torch.from_numpy(got[0][0]), want[0][0]).diagonal()
    assert (same > 1 - 1e-4).all()


def _angle_agreement(pred, true):
    """Mean cos(2 * difference): 1 for equal orientations (mod pi), ~0 for unrelated ones."""
    return float(torch.cos(2 * (pred - true)).mean())


def test_head_learns_angles_on_one_batch(fresh_torch_seed):
    """Fitting the head on one batch's (fixed) features: the loss falls and the decoded
    angles at the positive points line up with the targets'. (The whole model trains in
    the slow test below; fixed features keep this one to a few seconds on a CPU.)"""
    rng = np.random.default_rng(fresh_torch_seed)
    m = create_model("rsdet_atto", class_names=CLASSES, obb=True, deformable=False)
    x = torch.randn(2, 3, 64, 64)
    targets = _one_batch(rng)
    for t in targets:  # oblong boxes, so that their angle is defined
        t["rboxes"][:, 2], t["rboxes"][:, 3] = t["rboxes"][:, 2].clamp(min=24), t["rboxes"][:, 3].clamp(max=10)
    with torch.no_grad():
        feats = m.neck(m.backbone(x))
    _, _, _, points, pstrides = flatten_levels(m.head(feats)[:3], m.strides)
    ranges = point_ranges(m.strides, pstrides)
    assigned = [assign_rotated_targets(points, pstrides, ranges, t["rboxes"], t["labels"], 3) for t in targets]
    pos = torch.stack([a[0] for a in assigned]) < 3
    true_angle = torch.stack([a[2][:, 4] for a in assigned])[pos]

    def agreement():
        with torch.no_grad():
            rboxes, _ = m.decode(m.head(feats))
        return _angle_agreement(rboxes[pos][:, 4], true_angle)

    before = agreement()
    opt = torch.optim.AdamW(m.head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = m.loss(m.head(feats), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = agreement()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; angle agreement {before:.3f} -> {after:.3f}")
    assert losses[-1] < 0.5 * losses[0], losses
    assert after > 0.8 and after > before, (before, after)  # unrelated angles give ~0


@pytest.mark.slow
def test_head_trained_on_synthetic_images_predicts_their_angles(tiny_data, fresh_torch_seed):
    """The head fitted on four synthetic images' (fixed) features: predicted rotated boxes
    of the oblong objects (ships, vehicles: their angle is defined) line up with the
    labels'. Fixed features keep it to minutes on a CPU; training the whole model from
    scratch needs hundreds of steps before angles line up."""
    from edgekit.data.dataset import DetectionDataset, collate_detection
    from edgekit.data.synthetic import SYNTHETIC_CLASSES

    ds = DetectionDataset(tiny_data / "train", SYNTHETIC_CLASSES, image_size=128, rotated=True)
    images, targets = collate_detection([ds[i] for i in range(4)])
    m = create_model("rsdet_atto", class_names=list(SYNTHETIC_CLASSES), obb=True, deformable=False)
    with torch.no_grad():
        feats = m.neck(m.backbone(images))
    opt = torch.optim.AdamW(m.head.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = m.loss(m.head(feats), targets)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
        losses.append(loss["box"].item())
    print(f"box loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.6 * losses[0]
    m.eval()
    with torch.no_grad():
        rboxes, scores = m.decode(m.head(feats))
    preds = postprocess_rotated(rboxes, scores, 0.05, 0.6, 100, image_size=images.shape[-2:])
    pred_a, true_a = [], []
    for p, t in zip(preds, targets):
        gt = t["rboxes"][t["rboxes"][:, 3] < 0.7 * t["rboxes"][:, 2]]
        if len(gt) == 0 or len(p["rboxes"]) == 0:
            continue
        near = torch.cdist(gt[:, :2], p["rboxes"][:, :2]).min(1)
        for g, (d, k) in enumerate(zip(near.values, near.indices)):
            if d < 0.25 * gt[g, 2]:
                pred_a.append(float(p["rboxes"][k, 4]))
                true_a.append(float(gt[g, 4]))
    agreement = _angle_agreement(torch.tensor(pred_a), torch.tensor(true_a)) if true_a else float("nan")
    print(f"{len(true_a)} oblong objects matched; angle agreement {agreement:.3f}")
    assert len(true_a) >= 5 and agreement > 0.7


def test_merging_tiles_shifts_and_deduplicates(rng):
    from edgekit.models.obb_post import merge_rotated_tile_detections

    gt = random_targets(rng, 4, 100)  # in image coordinates
    windows = [(0, 0, 100, 100), (30, 20, 130, 120)]
    per_tile = []
    for x0, y0, _, _ in windows:
        local = gt - torch.tensor([x0, y0, 0.0, 0.0, 0.0])
        per_tile.append(((x0, y0, x0 + 100, y0 + 100), local, torch.rand(4), torch.arange(4)))  # one class each
    rboxes, scores, _ = merge_rotated_tile_detections(per_tile, 0.5)
    assert len(rboxes) == 4 and (scores[:-1] >= scores[1:]).all()  # each object once, best score kept
    order = torch.argsort(rboxes[:, 0])
    assert torch.allclose(rboxes[order], gt[torch.argsort(gt[:, 0])], atol=1e-4)
    assert merge_rotated_tile_detections([], 0.5)[0].shape == (0, 5)


@pytest.mark.slow
def test_decoding_exports_with_the_dynamo_exporter(model, tmp_path):
    """The exporter export/to_onnx.py uses (dynamo) takes the rotated decoding too."""
    import onnxruntime as ort

    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_RawRotated(model).eval(), (x,), dynamo=True, input_names=["images"],
                                    output_names=["rboxes", "scores"], opset_version=19)
    program.save(str(tmp_path / "obb.onnx"))
    got = ort.InferenceSession(str(tmp_path / "obb.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})
    with torch.no_grad():
        want = model.decode(model(x))
    np.testing.assert_allclose(got[1], want[1].numpy(), atol=1e-5)
    assert (rbox_iou(torch.from_numpy(got[0][0]), want[0][0]).diagonal() > 1 - 1e-4).all()
