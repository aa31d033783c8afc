"""The edgekit command: happy paths on the tiny run, and one clear line for each bad input."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from edgekit.cli import main

from conftest import DOTA_EXAMPLE


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, needle):
    assert code == 2
    # Progress bars may precede it on stderr; the error itself is exactly one line, the last.
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and needle in lines[0] and err.strip().endswith(lines[0]), err
    assert "Traceback" not in err


def test_eval_and_predict_on_the_tiny_checkpoint(capsys, tiny_run, tiny_data, tmp_path):
    result, _ = tiny_run
    code, out, _ = run(capsys, "eval", "--checkpoint", str(result.checkpoint), "--data", str(tiny_data / "val"),
                       "--out", str(tmp_path / "m.json"), "--quiet")
    assert code == 0 and "mAP@.5" in out
    assert json.loads((tmp_path / "m.json").read_text())["num_images"] == 4
    code, out, _ = run(capsys, "predict", str(tiny_data / "val" / "images"), "--checkpoint", str(result.checkpoint),
                       "--out", str(tmp_path / "pred"), "--score-threshold", "0.0", "--quiet")
    assert code == 0
    preds = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(preds) == 4 and len(list((tmp_path / "pred").glob("*_pred.png"))) == 4


@pytest.mark.skipif(not DOTA_EXAMPLE.is_dir(), reason="shared/data/dota_example not beside the checkout")
def test_predict_tiles_a_real_dota_image(capsys, tiny_run, tmp_path):
    result, _ = tiny_run
    image = DOTA_EXAMPLE / "images" / "P0706.png"
    code, _, _ = run(capsys, "predict", str(image), "--checkpoint", str(result.checkpoint), "--out", str(tmp_path),
                     "--score-threshold", "0.05", "--quiet")
    assert code == 0
    entry = json.loads((tmp_path / "predictions.json").read_text())[str(image)]
    w, h = Image.open(image).size
    assert (entry["width"], entry["height"]) == (w, h) and max(w, h) > 128  # really tiled
    
    for det in entry["detections"]:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h


def test_convert_round_trip(capsys, tiny_data, tmp_path):
    code, _, _ = run(capsys, "convert", str(tiny_data / "val"), str(tmp_path / "coco"), "--from", "dota", "--to", "coco")
    assert code == 0 and (tmp_path / "coco" / "annotations.json").is_file()


@pytest.fixture
def corrupt_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return path


def test_bad_inputs_give_one_line_and_status_2(capsys, tiny_run, tiny_data, tmp_path, corrupt_image):
    ckpt = str(tiny_run[0].checkpoint)
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("learning_rate: 0.1\n")
    cases = [
        (("train", "--data", str(tmp_path / "nowhere")), "not found"),
        (("train", "--data", str(tiny_data), "--model", "resnet50"), "unknown model 'resnet50'"),
        (("train", "--data", str(tiny_data), "--model", "convnextv2_atto"), "is not a detector"),
        (("train", "--data", str(tiny_data), "--config", str(bad_cfg)), "unknown key 'learning_rate'"),
        (("train", "--data", str(tiny_data), "--epochs", "0"), "--epochs must be an integer in [1, 100000], got 0"),
        (("train", "--data", str(tiny_data), "--image-size", "32000"), "between 32 and 4096"),
        (("train", "--data", str(tiny_data), "--lr", "inf"), "--lr must be a finite number"),
        (("train", "--data", str(tiny_data), "--epochs", "two"), "argument --epochs: invalid int value"),
        (("eval", "--checkpoint", str(tmp_path / "none.safetensors"), "--data", str(tiny_data / "val")), "not found"),
        (("eval", "--checkpoint", str(corrupt_image), "--data", str(tiny_data / "val")), "not a readable safetensors"),
        (("predict", str(tmp_path / "missing.png"), "--checkpoint", ckpt), "missing.png"),
        (("predict", str(corrupt_image), "--checkpoint", ckpt, "--out", str(tmp_path / "p")), "broken.png"),
        (("predict", str(corrupt_image), "--checkpoint", ckpt, "--score-threshold", "2"), "--score-threshold"),
        (("convert", str(tiny_data / "val"), str(tmp_path / "x"), "--from", "dota", "--to", "kitti"), "kitti"),
    ]
    for argv, needle in cases:
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, needle)
    assert not (tmp_path / "p" / "predictions.json").exists()  # nothing half-written


def test_malformed_label_line_names_file_and_line(capsys, tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    label = sorted((data / "train" / "labelTxt").iterdir())[0]
    lines = label.read_text().splitlines()
    lines.insert(3, "1 2 3 four 5 6 7 8 plane 0")
    label.write_text("\n".join(lines) + "\n")
    code, _, err = run(capsys, "train", "--data", str(data), "--epochs", "1", "--quiet")
    assert_one_line_error(code, err, f"{label.name}:4")


def test_no_traceback_from_the_real_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgekit.cli", "predict", str(tmp_path / "x.png"),
                           "--checkpoint", str(tmp_path / "c.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("edgekit predict: error:")


@pytest.mark.skipif(not DOTA_EXAMPLE.is_dir(), reason="shared/data/dota_example not beside the checkout")
def test_large_images_must_be_tiled_before_eval(capsys, tiny_run, tmp_path):
    """Whole DOTA scenes are refused (wrong scale); after `edgekit tile` the same data evaluates."""
    import shutil

    src = tmp_path / "dota"
    (src / "images").mkdir(parents=True)
    shutil.copytree(DOTA_EXAMPLE / "labelTxt", src / "labelTxt")
    shutil.copy(DOTA_EXAMPLE / "images" / "P1888.png", src / "images")
    ckpt = str(tiny_run[0].checkpoint)
    code, _, err = run(capsys, "eval", "--checkpoint", ckpt, "--data", str(src), "--quiet")
    assert_one_line_error(code, err, "tile the data set first")
    code, out, _ = run(capsys, "tile", str(src), str(tmp_path / "tiles"), "--tile-size", "128", "--overlap", "32",
                       "--quiet")
    assert code == 0 and json.loads(out)["tiles"] > 1
    code, out, err = run(capsys, "eval", "--checkpoint", ckpt, "--data", str(tmp_path / "tiles"), "--quiet")
    assert code == 0, err
