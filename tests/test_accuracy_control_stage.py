"""Accuracy control wired into the stages: the loop on a small model scored by the real COCO
evaluator (each step's mAP checked against an independent forward pass and IoU count),
the bad inputs of --max-drop, and quantize/calibrate through the CLI with the record written."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import one_line_error
from edgekit.calibration import accuracy_bound as ab
from edgekit.calibration.accuracy_control import FLOAT

IMAGE = 64
THRESHOLDS = np.linspace(0.5, 0.95, 10)


class BoxNet(nn.Module):
    """A one-box 'detector': the box is the output of a chain of 1x1 convs on a fixed code,
    set so that the float model finds the labelled box exactly. Quantizing the convs moves
    the box, and COCO mAP@[.5:.95] falls one IoU threshold at a time."""

    class_names = ["thing"]

    def __init__(self, box, width: int = 12, depth: int = 4):
        super().__init__()
        self.body = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(depth))
        self.head = nn.Conv2d(width, 4, 1)
        self.register_buffer("code", torch.randn(1, width, 1, 1) * 3)
        with torch.no_grad():
            self.head.weight *= 40  # the path through the convs carries the box, not the bias alone
            self.head.bias += torch.as_tensor(box, dtype=torch.float32) - self(torch.zeros(1, 3, IMAGE, IMAGE))[0]

    def forward(self, images):
        x = self.code.expand(images.shape[0], -1, -1, -1) + 0 * images.mean()
        for conv in self.body:
            x = conv(x)
        return self.head(x).flatten(1)

    def loss(self, *args):  # a detector's interface; the loop never trains
        raise NotImplementedError

    def predict(self, images, score_threshold=0.0):
        return [{"boxes": b[None], "scores": torch.ones(1), "labels": torch.zeros(1, dtype=torch.long)}
                for b in self(images)]


def write_split(root, box, images: int = 3, labelled: bool = True):
    (root / "images").mkdir(parents=True)
    (root / "labelTxt").mkdir()
    x1, y1, x2, y2 = box
    for i in range(images):
        Image.fromarray(np.full((IMAGE, IMAGE, 3), 40 * i, np.uint8)).save(root / "images" / f"{i}.png")
        text = f"{x1} {y1} {x2} {y1} {x2} {y2} {x1} {y2} thing 0\n" if labelled else ""
        (root / "labelTxt" / f"{i}.txt").write_text(text)
    return root


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def fake_quant(x, scale, zero_point, bits, signed, narrow=False, channel_axis=None):
    lo, hi = (-(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    s, z = torch.as_tensor(scale, dtype=torch.float64), torch.as_tensor(zero_point, dtype=torch.float64)
    if channel_axis is not None:
        shape = [1] * x.ndim
        shape[channel_axis] = -1
        s, z = s.view(shape), z.view(shape)
    return (torch.clamp(torch.round(x / s) + z, lo, hi) - z) * s


def reference_box(model, spec, bits) -> list:
    """The predicted box by hand, in float64: per-channel abs-max weights at each layer's
    width, the spec's input/output grids; a FLOAT layer computes in plain float."""
    x = model.code.double()
    convs = {f"body.{i}": c for i, c in enumerate(model.body)} | {"head": model.head}
    for path, conv in convs.items():
        w, b = conv.weight.detach().double(), conv.bias.detach().double()
        if bits[path] != FLOAT:
            layer = spec["layers"][path]
            x = fake_quant(x, layer["input"]["scale"], layer["input"]["zero_point"], layer["input"]["bits"],
                           layer["input"]["signed"])
            qmax = 2 ** (bits[path] - 1) - 1
            scale = w.abs().amax(dim=(1, 2, 3)) / qmax
            w = fake_quant(w, scale, torch.zeros_like(scale), bits[path], True, narrow=True, channel_axis=0)
        x = torch.nn.functional.conv2d(x, w, b)
        if bits[path] != FLOAT and spec["layers"][path].get("output"):
            out = spec["layers"][path]["output"]
            x = fake_quant(x, out["scale"], out["zero_point"], out["bits"], out["signed"])
    return x.flatten().tolist()


def reference_map(box, predicted) -> float | None:
    """mAP@[.5:.95] x100 of one identical prediction per image: the share of thresholds its
    IoU reaches (None when the IoU sits within rounding of a threshold)."""
    value = iou(box, predicted)
    if np.min(np.abs(THRESHOLDS - value)) < 1e-6:
        return None
    return 100.0 * float(np.mean(value >= THRESHOLDS))


@pytest.fixture
def boxnet_case(tmp_path, fresh_torch_seed, rng):
    from edgekit.calibration.ptq import calibrate

    box = [float(v) for v in np.round(np.sort(rng.uniform(4, 60, size=(2, 2)), axis=0).T.ravel()[[0, 2, 1, 3]], 1)]
    if box[2] - box[0] < 10 or box[3] - box[1] < 10:
        box = [6.0, 8.0, 50.0, 55.0]
    model = BoxNet(box).eval()
    split = write_split(tmp_path / "val", box)
    batches = ab.validation_batches(split, model.class_names, IMAGE, 16)
    spec = calibrate(model, [torch.zeros(2, 3, IMAGE, IMAGE)], weight_bits=2, model_name=None, progress=False)
    return model, box, batches, spec


def test_the_loop_restores_layers_until_the_bound_holds_on_a_real_evaluation(boxnet_case):
    model, box, batches, spec = boxnet_case
    baseline = ab.map_points(model, batches, model.class_names)
    assert baseline == pytest.approx(100.0)  # the float model finds the box: every threshold met
    options = ab.BoundOptions(max_drop=0.0, max_drop_candidates=2)
    chosen, record = ab.bound_spec(model, spec, batches, model.class_names, options, IMAGE)
    start = {path: 2 for path in spec["layers"]}
    states, bits = [dict(start)], dict(start)
    for step in record["path"]:
        assert bits[step["layer"]] == step["bits_from"]
        assert step["bits_to"] == (8 if step["bits_from"] == 2 else FLOAT)  # the ladder: 8 bits, then float
        assert step["tried"] <= 2
        bits[step["layer"]] = step["bits_to"]
        states.append(dict(bits))
        expected = reference_map(box, reference_box(model, spec, bits))
        if expected is not None:
            assert step["metric"] == pytest.approx(expected, abs=1e-6), step
    initial = reference_map(box, reference_box(model, spec, start))
    if initial is not None:
        assert record["initial_metric"] == pytest.approx(initial, abs=1e-6)
    assert record["feasible"] and record["stop"] == "bound met"  # float everywhere meets any bound
    assert record["drop"] <= 0.0 and record["bits"] == states[-1]
    # the spec handed back is the one of the chosen bits: float layers gone, widths as chosen
    assert set(chosen["layers"]) == {p for p, b in record["bits"].items() if b != FLOAT}
    assert all(chosen["layers"][p]["weight"]["bits"] == b for p, b in record["bits"].items() if b != FLOAT)
    assert chosen["accuracy_control"] is record


def test_a_spec_already_within_the_bound_takes_no_step(boxnet_case):
    model, _, batches, spec = boxnet_case
    options = ab.BoundOptions(max_drop=100.0)
    chosen, record = ab.bound_spec(model, spec, batches, model.class_names, options, IMAGE)
    assert record["path"] == [] and record["evaluations"] == 1 and record["feasible"]
    assert {p: layer["weight"]["bits"] for p, layer in chosen["layers"].items()} == {p: 2 for p in spec["layers"]}


def test_relative_bound_and_size_cost(boxnet_case):
    model, _, batches, spec = boxnet_case
    options = ab.BoundOptions(max_drop_relative=0.05, max_drop_cost="size", max_drop_candidates=0)
    _, record = ab.bound_spec(model, spec, batches, model.class_names, options, IMAGE)
    assert record["relative"] and record["cost_unit"] == "size" and record["candidates_per_step"] == "all"
    assert record["feasible"] and record["drop"] <= 0.05
    params = {f"body.{i}": c.weight.numel() for i, c in enumerate(model.body)} | {"head": model.head.weight.numel()}
    bits = {path: 2 for path in params}
    for step in record["path"]:  # bytes added: params x (new width - old width) / 8, float at 32 bits
        widths = [32 if b == FLOAT else b for b in (step["bits_from"], step["bits_to"])]
        assert step["cost"] == pytest.approx(params[step["layer"]] * (widths[1] - widths[0]) / 8)
        assert step["tried"] == sum(b != FLOAT for b in bits.values())  # every layer with a rung left
        bits[step["layer"]] = step["bits_to"]


# ----------------------------------------------------------------------------- bad input


def test_bound_options_are_checked():
    from edgekit.calibration.pipeline import CalibrateConfig, QuantizeRecipe

    for config in (QuantizeRecipe, CalibrateConfig):
        assert "--max-drop must be >= 0" in one_line_error(config, max_drop=-0.5)
        assert "--max-drop-relative" in one_line_error(config, max_drop_relative=-0.1)
        assert "not both" in one_line_error(config, max_drop=1.0, max_drop_relative=0.01)
        assert "applies only with --max-drop" in one_line_error(config, max_drop_cost="size")
        assert "--max-drop-cost" in one_line_error(config, max_drop=1.0, max_drop_cost="energy")
    assert "applies only with --max-drop" in one_line_error(QuantizeRecipe, val_data="somewhere")
    assert "--qat-epochs" in one_line_error(QuantizeRecipe, max_drop=1.0, qat_epochs=1, qat_data="x")
    CalibrateConfig(observer="auto", val_data="somewhere", max_drop_images=4)  # auto reads validation data too


def test_max_drop_without_validation_data_is_one_line(tmp_path, tiny_data):
    from edgekit.calibration.pipeline import QuantizeRecipe, quantize_checkpoint

    recipe = QuantizeRecipe(method="uniform", max_drop=1.0, progress=False)
    message = one_line_error(quantize_checkpoint, "rsdet_atto", recipe, out=tmp_path / "q")
    assert "--max-drop needs labelled validation data" in message
    alone = tmp_path / "alone"
    shutil.copytree(tiny_data / "train", alone / "train")  # a root without val/
    message = one_line_error(quantize_checkpoint, "rsdet_atto", recipe, data=alone / "train", out=tmp_path / "q")
    assert "--max-drop needs labelled validation data" in message
    assert not (tmp_path / "q").exists()


def test_a_validation_split_without_labels_is_one_line(tmp_path, tiny_data, tiny_run):
    from edgekit.calibration.pipeline import CalibrateConfig, QuantizeRecipe, calibrate_checkpoint, quantize_checkpoint

    empty = write_split(tmp_path / "empty", [1, 1, 2, 2], labelled=False)
    recipe = QuantizeRecipe(method="uniform", max_drop=1.0, val_data=str(empty), progress=False)
    message = one_line_error(quantize_checkpoint, "rsdet_atto", recipe, data=tiny_data / "train", out=tmp_path / "q")
    assert "no labelled object" in message and not (tmp_path / "q").exists()
    config = CalibrateConfig(observer="auto", val_data=str(empty), progress=False)
    checkpoint = tiny_run[1] / "last.safetensors"
    message = one_line_error(calibrate_checkpoint, checkpoint, tiny_data / "train", config, out=tmp_path / "s.json")
    assert "no labelled object" in message and not (tmp_path / "s.json").exists()


def test_cli_bad_bounds_exit_2_with_one_line(tmp_path, tiny_data, capsys):
    from edgekit.cli import main

    cases = [["quantize", "rsdet_atto", "--method", "uniform", "--max-drop", "-1", "--out", str(tmp_path / "a")],
             ["quantize", "rsdet_atto", "--method", "uniform", "--max-drop", "1", "--out", str(tmp_path / "b")],
             ["calibrate", "rsdet_atto", "--data", str(tiny_data / "train"), "--max-drop", "-0.1",
              "--out", str(tmp_path / "c.json")]]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "max-drop" in err[0], err
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- through the stages


@pytest.mark.slow
def test_quantize_cli_writes_the_record_and_files_that_agree(tmp_path, tiny_run, tiny_data, capsys):
    from edgekit.calibration.quantize import QuantConfig
    from edgekit.cli import main

    _, run = tiny_run
    out = tmp_path / "q"
    code = main(["quantize", str(run / "last.safetensors"), "--method", "uniform", "--weight-bits", "2",
                 "--data", str(tiny_data / "train"), "--max-drop", "0", "--max-drop-images", "4",
                 "--max-drop-candidates", "2", "--calib-batches", "1", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert text.count("warning: calibrating on 2 images") == 1  # the hygiene line, once
    record = json.loads((out / "search.json").read_text())["accuracy_control"]
    spec = json.loads((out / "quant_spec.json").read_text())
    assert spec["accuracy_control"] == record and record["feasible"]
    assert record["final_drop"] <= 0 and record["validation_images"] == 4
    assert record["final_metric"] == pytest.approx(record["metric"], abs=1e-9)  # the written model is the one evaluated
    assert "accuracy bound met" in text
    config = QuantConfig.load(out / "qconfig.json")
    floats = {p for p, b in record["bits"].items() if b == FLOAT}
    assert set(spec["layers"]) == set(record["bits"]) - floats
    assert all(config.weight_bits[p] == b for p, b in record["bits"].items() if b != FLOAT)


@pytest.mark.slow
def test_an_unmet_bound_exits_1_with_the_best_drop(tmp_path, tiny_run, tiny_data, capsys, monkeypatch):
    from edgekit.cli import main

    _, run = tiny_run
    monkeypatch.setattr(ab, "_ladders", lambda bits, measured: {})  # no move allowed: the bound can only fail

    def points(model, batches, classes):  # the float model scores 50, a fake-quantized one (hooks) 40
        return 40.0 if any(m._forward_pre_hooks for m in model.modules()) else 50.0

    monkeypatch.setattr(ab, "map_points", points)
    out = tmp_path / "q"
    code = main(["quantize", str(run / "last.safetensors"), "--method", "uniform", "--data", str(tiny_data / "train"),
                 "--max-drop", "1", "--calib-batches", "1", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and "best drop reached is 10 mAP points > 1 mAP points" in err[0], err
    assert json.loads((out / "search.json").read_text())["accuracy_control"]["feasible"] is False


@pytest.mark.slow
def test_calibrate_observer_auto_keeps_the_best_and_reports_each(tmp_path, tiny_run, tiny_data, capsys):
    from edgekit.calibration.pipeline import CALIBRATION_OBSERVERS
    from edgekit.cli import main

    _, run = tiny_run
    out = tmp_path / "spec.json"
    code = main(["calibrate", str(run / "last.safetensors"), "--data", str(tiny_data / "train"), "--observer",
                 "auto", "--batches", "1", "--batch-size", "2", "--max-drop", "100", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0, text
    search = json.loads(out.read_text())["calibration"]["observer_search"]
    assert set(search["scores"]) == set(CALIBRATION_OBSERVERS)
    assert search["chosen"] == max(search["scores"], key=search["scores"].get)
    for name in CALIBRATION_OBSERVERS:
        assert f"observer {name}: " in text
    assert json.loads(out.read_text())["calibration"]["observer"] == search["chosen"]
    assert math.isfinite(search["float"])


# ----------------------------------------------------------------------------- calibration hygiene


def test_calibration_images_are_a_seeded_random_draw_from_the_training_split(tiny_data):
    from edgekit.calibration.pipeline import sample_batches
    from edgekit.data.dataset import DetectionDataset
    from edgekit.models import create_model

    model = create_model("rsdet_atto", num_classes=5, class_names=["plane", "ship", "storage-tank", "small-vehicle",
                                                                   "large-vehicle"])
    first = sample_batches(model, 128, 2, tiny_data / "train", batch_size=2)
    again = sample_batches(model, 128, 2, tiny_data / "train", batch_size=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # the same images on every call
    dataset = DetectionDataset(tiny_data / "train", model.class_names, image_size=128)
    order = np.random.default_rng(ab.SEED).permutation(len(dataset))[:4]
    expected = torch.stack([dataset[int(i)][0] for i in order])
    assert torch.equal(torch.cat([x for x, _ in first]), expected)
    other = sample_batches(model, 128, 2, tiny_data / "train", batch_size=2, seed=ab.SEED + 1)
    assert ab.split_folders(tiny_data) == (tiny_data / "train", tiny_data / "val")  # a root: train/, val/ beside
    assert ab.split_folders(tiny_data / "train") == (tiny_data / "train", tiny_data / "val")
    assert ab.split_folders(tiny_data / "val") == (tiny_data / "val", None)
    assert not torch.equal(torch.cat([x for x, _ in other]), expected)  # the seed decides (both seeds fixed)


def test_the_few_images_warning_names_the_number():
    assert ab.few_images_warning(ab.FEW_IMAGES) is None
    line = ab.few_images_warning(8)
    assert line.startswith("warning:") and " 8 images" in line and "\n" not in line
