"""RSDet: shapes, target assignment, decoding, and that it learns."""

import pytest
import torch

from edgekit.models import create_model, list_models
from edgekit.models.deform import DeformConv2dPack
from edgekit.models.detect_loss import assign_targets, level_ranges
from edgekit.models.detect_post import decode_predictions, flatten_levels

CLASSES = ["plane", "ship", "storage-tank"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    return create_model("rsdet_atto", class_names=CLASSES).eval()


def test_all_sizes_registered():
    assert {f"rsdet_{s}" for s in ("atto", "femto", "pico", "nano", "tiny")} <= set(list_models())


@pytest.mark.parametrize("h, w", [(64, 64), (96, 160), (128, 96)])
def test_output_shapes_per_level(model, h, w):
    with torch.no_grad():
        cls, box, ctr = model(torch.randn(2, 3, h, w))
    for c, b, t, s in zip(cls, box, ctr, model.strides):
        assert c.shape == (2, len(CLASSES), h // s, w // s)
        assert b.shape == (2, 4, h // s, w // s) and (b > 0).all()
        assert t.shape == (2, 1, h // s, w // s)


def test_deformable_head_is_optional():
    with_dcn = create_model("rsdet_atto", class_names=CLASSES)
    without = create_model("rsdet_atto", class_names=CLASSES, deformable=False)
    assert any(isinstance(m, DeformConv2dPack) for m in with_dcn.modules())
    assert not any(isinstance(m, DeformConv2dPack) for m in without.modules())


def test_decoding_inverts_the_regression_targets(model):
    """Feed the assigned targets back as predictions: decoding must give the gt boxes."""
    h = w = 128
    gt = torch.tensor([[10.0, 12.0, 40.0, 30.0], [50.0, 20.0, 120.0, 100.0], [5.0, 70.0, 30.0, 125.0]])
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, h, w))
    _, _, _, points, pstrides = flatten_levels(outputs, model.strides)
    ranges = torch.cat([torch.tensor(r).expand(int((pstrides == s).sum()), 2)
                        for r, s in zip(level_ranges(model.strides), model.strides)])
    assigned, ltrb = assign_targets(points, pstrides, ranges, gt, labels, len(CLASSES))
    pos = assigned < len(CLASSES)
    assert set(assigned[pos].tolist()) == {0, 1, 2}  # every object gets points
    # Build fake raw outputs equal to the targets and decode them.
    box_maps, offset = [], 0
    cls_maps, ctr_maps = outputs[0], outputs[2]
    for c in cls_maps:
        n = c.shape[-2] * c.shape[-1]
        box_maps.append((ltrb[offset:offset + n] / pstrides[offset:offset + n, None]).T.reshape(1, 4, *c.shape[-2:]))
        offset += n
    boxes, _ = decode_predictions((cls_maps, box_maps, ctr_maps), model.strides)
    expected = gt[torch.where(pos, assigned, 0)]
    assert torch.allclose(boxes[0][pos], expected[pos], atol=1e-4)


def test_assignment_prefers_the_smallest_box_and_respects_level_ranges():
    points = torch.tensor([[20.0, 20.0], [20.0, 20.0]])
    pstrides = torch.tensor([8.0, 16.0])
    ranges = torch.tensor(level_ranges((8, 16))[:2])
    big, small = [0.0, 0.0, 200.0, 200.0], [12.0, 12.0, 28.0, 28.0]
    labels, _ = assign_targets(points, pstrides, ranges, torch.tensor([big, small]), torch.tensor([0, 1]), 2,
                               center_radius=100.0)
    assert labels.tolist() == [1, 0]  # small box on stride 8; the big one (max dist 180) on the open level


def test_predict_returns_boxes_inside_the_image(model):
    preds = model.predict(torch.randn(2, 3, 96, 128), score_threshold=0.0)
    for p in preds:
        assert p["boxes"].shape[1] == 4 and len(p["boxes"]) <= 100
        assert (p["boxes"][:, 0::2] >= 0).all() and (p["boxes"][:, 0::2] <= 128).all()
        assert (p["boxes"][:, 1::2] >= 0).all() and (p["boxes"][:, 1::2] <= 96).all()
        assert (p["scores"][:-1] >= p["scores"][1:]).all()


def test_loss_falls_when_fitting_one_batch():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    m = create_model("rsdet_atto", class_names=CLASSES, deformable=True)
    x = torch.randn(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 30.0, 24.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([2])}]
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = m.loss(m(x), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_loss_handles_images_without_objects():
    m = create_model("rsdet_atto", class_names=CLASSES, deformable=False)
    out = m.loss(m(torch.randn(2, 3, 64, 64)), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
