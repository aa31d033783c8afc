"""The NEON real-imagery suite: its config's checks, the backbone hand-over of a synthetic
start, the scoring glue on the real validation tile, and (slow) a one-step smoke run."""

import json
from pathlib import Path

import pytest
import torch

from edgekit.benchmarks.neon import backbone_encoder, check_neon_folder, score
from edgekit.benchmarks.suites import NeonSuiteConfig
from edgekit.cli import main

from conftest import REPO, one_line_error

NEON = REPO.parent / "shared" / "data" / "neon_trees"
needs_neon = pytest.mark.skipif(not NEON.is_dir(), reason="../shared/data/neon_trees not present")


def test_bad_data_folder_is_one_line(tmp_path):
    assert "not a folder" in one_line_error(NeonSuiteConfig, data=str(tmp_path / "missing"))
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "annotations").mkdir()
    message = one_line_error(check_neon_folder, tmp_path)
    assert "val/images" in message and "val/annotations" in message


def test_bad_data_folder_on_the_command_line(tmp_path, capsys):
    code = main(["bench", "neon", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--data" in err
    assert not (tmp_path / "out").exists()


@needs_neon
def test_options_that_do_not_fit_are_refused():
    assert "--arms" in one_line_error(NeonSuiteConfig, data=str(NEON), arms=["imagenet"])
    assert "--tile-size" in one_line_error(NeonSuiteConfig, data=str(NEON), tile_size=400)
    assert "--overlap" in one_line_error(NeonSuiteConfig, data=str(NEON), overlap=416)
    assert "--lr" in one_line_error(NeonSuiteConfig, data=str(NEON), lr=0.0)
    assert "--color-jitter" in one_line_error(NeonSuiteConfig, data=str(NEON), color_jitter=1.0)


def test_backbone_encoder_initialises_the_detector_backbone(tmp_path, fresh_torch_seed):
    from edgekit.engine.checkpoint import save_checkpoint
    from edgekit.models import create_model
    from edgekit.models.fcmae import load_pretrained_encoder

    source = create_model("rsdet_atto", num_classes=5, class_names=list("abcde"), deformable=False)
    save_checkpoint(tmp_path / "det.safetensors", source, "rsdet_atto", {"num_classes": 5,
                    "class_names": list("abcde"), "deformable": False}, {"image_size": 128})
    encoder = backbone_encoder(tmp_path / "det.safetensors", tmp_path / "encoder.safetensors")
    torch.manual_seed(fresh_torch_seed + 1)
    target = create_model("rsdet_atto", num_classes=1, class_names=["Tree"], deformable=False)
    assert load_pretrained_encoder(target, encoder) > 0
    expected = source.backbone.state_dict()
    for key, value in target.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # Only the backbone travels: the neck starts from the target's own initialisation.
    assert not torch.equal(next(iter(target.neck.parameters())), next(iter(source.neck.parameters())))


def test_backbone_encoder_refuses_a_non_detector(tmp_path):
    from safetensors.torch import save_file

    save_file({"stages.0.weight": torch.zeros(2)}, str(tmp_path / "enc.safetensors"))
    assert "backbone" in one_line_error(backbone_encoder, tmp_path / "enc.safetensors", tmp_path / "out.safetensors")


class Oracle(torch.nn.Module):
    """Predicts the validation tile's own boxes (in the letterboxed input's pixels)."""

    def __init__(self, boxes, scale):
        super().__init__()
        self.boxes, self.scale = boxes, scale

    def predict(self, images, score_threshold=0.0):
        return [{"boxes": self.boxes * self.scale, "scores": torch.full((len(self.boxes),), 0.9),
                 "labels": torch.zeros(len(self.boxes), dtype=torch.long)} for _ in images]


@needs_neon
def test_score_of_the_true_boxes_is_perfect_and_of_shifted_ones_follows_iou(tmp_path):
    from edgekit.api import ConvertConfig, convert
    from edgekit.data.dota import read_dota_dataset

    convert(NEON / "val", tmp_path / "val", ConvertConfig(src_format="voc", dst_format="dota"))
    (_, annotation), = read_dota_dataset(tmp_path / "val")
    boxes = torch.tensor([o.box for o in annotation.objects], dtype=torch.float32)
    size = 416
    row = score(Oracle(boxes, size / 400), str(tmp_path / "val"), size, 0.1)
    assert row["map50"] == pytest.approx(100, abs=0.01) and row["map"] == pytest.approx(100, abs=0.01)
    assert row["precision@0.4"] == pytest.approx(100) and row["recall@0.5"] == pytest.approx(100)
    # Each box widened to three times its width, centred: IoU exactly 1/3 with its own truth.
    w = boxes[:, 2] - boxes[:, 0]
    wide = torch.stack([boxes[:, 0] - w, boxes[:, 1], boxes[:, 2] + w, boxes[:, 3]], 1)
    inside = (wide[:, 0] >= 0) & (wide[:, 2] <= 400)
    row = score(Oracle(wide[inside], size / 400), str(tmp_path / "val"), size, 0.1)
    assert row["map50"] < 50 and row["recall@0.4"] < 50


@pytest.mark.slow
@needs_neon
def test_smoke_run_writes_the_result_files(tmp_path):
    from edgekit.benchmarks.suites import run_suite

    record = run_suite("neon", NeonSuiteConfig(data=str(NEON), out=str(tmp_path), quick=True,
                                               arms=["synthetic", "scratch"], progress=False))
    written = json.loads((tmp_path / "neon_quick.json").read_text())
    assert [a["arm"] for a in written["arms"]] == ["synthetic", "scratch"] == [a["arm"] for a in record["arms"]]
    assert written["data"]["tiles"] == 2 and written["data"]["val_boxes"] == 61
    assert [r["key"] for r in written["quantization"]] == ["fp32", "w8a8"]
    for arm in written["arms"]:
        assert abs(arm["map50"] - arm["evaluate_map50"]) < 1e-6  # the suite's scoring agrees with evaluate
    assert "| from scratch |" in Path(tmp_path / "neon_quick.md").read_text()
