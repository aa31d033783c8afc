"""Bad input, faults and interrupts, one test per class of failure: each ends in one line
(no traceback) with the documented exit status, and leaves nothing behind: no temporary
file, no staging folder, no empty output folder, nothing read from outside a data set."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from edgekit.cli import main

PYTHON = sys.executable


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code, err, needle, status=2):
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert code == status, err
    assert len(lines) == 1 and needle in lines[0] and err.strip().endswith(lines[0]), err
    assert "Traceback" not in err


def litter(folder: Path) -> list[str]:
    """Temporary files and staging folders anywhere under ``folder``."""
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name or ".partial" in p.name)


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return str(tiny_run[0].checkpoint)


# --------------------------------------------------------------------------- unsafe paths


@pytest.mark.parametrize("name", ["../../outside.jpg", "/etc/hostname", "sub/../../outside.jpg"])
def test_a_coco_file_name_outside_the_data_set_is_refused(capsys, tmp_path, name):
    src = tmp_path / "data"
    (src / "images").mkdir(parents=True)
    secret = tmp_path / "outside.jpg"
    secret.write_bytes(b"private")
    (src / "annotations.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": name, "height": 10, "width": 10}],
        "annotations": [], "categories": [{"id": 1, "name": "plane"}]}))
    dst = tmp_path / "dst"
    code, _, err = run(capsys, "convert", src, dst, "--from", "coco", "--to", "dota")
    one_line(code, err, "annotations.json")
    assert not dst.exists() and litter(tmp_path) == []


# --------------------------------------------------------------------------- unwritable outputs


def verbs_writing_under(blocker: Path, checkpoint: str, data: Path) -> dict:
    out = blocker / "sub"
    return {
        "train": ("train", "--data", data, "--out", out, "--epochs", 1, "--image-size", 128, "--quiet"),
        "eval": ("eval", "--checkpoint", checkpoint, "--data", data / "val", "--out", out / "m.json", "--quiet"),
        "predict": ("predict", data / "val" / "images", "--checkpoint", checkpoint, "--out", out, "--quiet"),
        "calibrate": ("calibrate", checkpoint, "--data", data / "train", "--out", out / "s.json", "--quiet"),
        "profile": ("profile", checkpoint, "--json", out / "p.json"),
        "quantize": ("quantize", checkpoint, "--method", "uniform", "--out", out, "--quiet"),
        "export": ("export", checkpoint, "--format", "onnx", "--out", out),
        "bench": ("bench", checkpoint, "--backends", "eager", "--out", out),
        "convert": ("convert", data / "val", out, "--from", "dota", "--to", "coco"),
        "tile": ("tile", data / "val", out, "--tile-size", 64, "--overlap", 0, "--quiet"),
        "demo": ("demo", "--out", out, "--quick", "--quiet"),
    }


@pytest.mark.parametrize("verb", ["train", "eval", "predict", "calibrate", "profile", "quantize", "export", "bench",
                                  "convert", "tile", "demo"])
def test_an_output_under_a_plain_file_is_one_line_before_any_work(capsys, tmp_path, tiny_data, checkpoint, verb):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    start = time.perf_counter()
    code, _, err = run(capsys, *verbs_writing_under(blocker, checkpoint, tiny_data)[verb])
    one_line(code, err, str(blocker))
    assert time.perf_counter() - start < 60  # refused up front, not after the stage's work
    assert blocker.read_text() == "not a folder" and litter(tmp_path) == []


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_temporary_file(
        capsys, tmp_path, tiny_data, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", args[1])

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr("edgekit.engine.checkpoint.save_file", full)
    code, _, err = run(capsys, "train", "--data", tiny_data, "--out", tmp_path / "run", "--epochs", 1,
                       "--image-size", 128, "--batch-size", 4, "--quiet")
    one_line(code, err, "the disk is full")
    assert litter(tmp_path) == [] and not (tmp_path / "run" / "last.safetensors").exists()


def test_an_interrupt_while_saving_a_checkpoint_exits_130_and_leaves_no_temporary_file(
        capsys, tmp_path, tiny_data, monkeypatch):
    def interrupted(state, path, metadata=None):
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr("edgekit.engine.checkpoint.save_file", interrupted)
    code, _, err = run(capsys, "train", "--data", tiny_data, "--out", tmp_path / "run", "--epochs", 1,
                       "--image-size", 128, "--batch-size", 4, "--quiet")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert litter(tmp_path) == []


SLOW_EXPORT = """
import sys, time
import edgekit.export.to_onnx as to_onnx
def export(model, path, **kwargs):
    open(path, "wb").write(b"partial graph")
    print("exporting", flush=True)
    time.sleep(60)
to_onnx.export_onnx = export
from edgekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_an_export_removes_its_staging_folder(tmp_path, checkpoint):
    out = tmp_path / "export"
    proc = subprocess.Popen([PYTHON, "-c", SLOW_EXPORT, "export", checkpoint, "--format", "onnx", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "exporting"  # the staging folder now holds a partial graph
    assert litter(tmp_path), "the export should be staging its files"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert litter(tmp_path) == [] and not out.exists()


# --------------------------------------------------------------------------- broken artefacts


def test_a_run_that_diverges_on_its_last_update_writes_no_checkpoint_of_nans(
        capsys, tmp_path, tiny_data, monkeypatch):
    """The loss check sees a divergence only at the next step; the last update's NaNs are
    caught when the checkpoint is written."""
    import torch

    real_step, calls = torch.optim.AdamW.step, []

    def poisoned(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second and last step of the epoch (8 images, batch 4)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    code, _, err = run(capsys, "train", "--data", tiny_data, "--out", tmp_path / "run", "--epochs", 1,
                       "--image-size", 128, "--batch-size", 4, "--quiet")
    one_line(code, err, "NaN or infinite values (the model diverged)")
    assert len(calls) == 2 and not (tmp_path / "run" / "last.safetensors").exists() and litter(tmp_path) == []


# --------------------------------------------------------------------------- memory


def lying_png(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes whose header claims ``width`` x ``height`` RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 300))
                     + chunk(b"IEND", b""))
    return path


def test_an_image_whose_header_claims_billions_of_pixels_is_refused_under_a_memory_limit(tmp_path, checkpoint):
    image = lying_png(tmp_path / "bomb.png", 45000, 45000)
    assert image.stat().st_size < 400
    limit = 3 << 30  # far below the ~6 GB a decode of the claimed size needs
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0})); "
            "from edgekit.cli import main; sys.exit(main(sys.argv[1:]))").format(limit)
    proc = subprocess.run([PYTHON, "-c", code, "predict", str(image), "--checkpoint", checkpoint, "--out",
                           str(tmp_path / "p")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "over the 400 MP budget" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- half-done batches


def test_predict_over_a_folder_continues_past_a_bad_file(capsys, tmp_path, tiny_data, checkpoint):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(tiny_data / "val" / "images", images)
    (images / "0_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    code, _, err = run(capsys, "predict", images, "--checkpoint", checkpoint, "--out", tmp_path / "p", "--quiet")
    assert code == 2 and "1 of 5 images could not be read" in err and "0_broken.png" in err
    written = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(written) == 4 and not any("broken" in k for k in written)


def test_a_failed_predict_leaves_no_empty_output_folder(capsys, tmp_path, checkpoint):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, _, err = run(capsys, "predict", bad, "--checkpoint", checkpoint, "--out", tmp_path / "p")
    one_line(code, err, "bad.png")
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- crafted inputs and bounds


@pytest.mark.parametrize("argv, needle", [
    (("tile", "{data}/val", "{tmp}/t", "--min-visible", "5"), "--min-visible must be a fraction in [0, 1]"),
    (("tile", "{data}/val", "{tmp}/t", "--min-visible", "nan"), "--min-visible must be a finite number"),
    (("tile", "{data}/val", "{tmp}/t", "--overlap", "2000"), "--overlap must be in [0, --tile-size)"),
    (("demo", "--out", "{tmp}/d", "--time-limit", "-5"), "--time-limit must be in (0, 86400]"),
    (("train", "--data", "{data}", "--out", "{tmp}/r", "--batch-size", "100000"), "--batch-size must be"),
    (("train", "--data", "{data}", "--out", "{tmp}/r", "--workers", "-1"), "--workers must be"),
    (("predict", "{data}/val/images", "--checkpoint", "{ckpt}", "--iou-threshold", "0"), "--iou-threshold must be"),
    (("eval", "--checkpoint", "{ckpt}", "--data", "{data}/val", "--batch-size", "0"), "--batch-size must be"),
    (("bench", "{ckpt}", "--duration", "inf"), "--duration must be a finite number"),
    (("convert", "{data}/val", "{tmp}/c", "--from", "dota", "--to", "coco", "--classes", "plane,plane"),
     "distinct class names"),
])
def test_out_of_range_options_are_one_line(capsys, tmp_path, tiny_data, checkpoint, argv, needle):
    argv = [a.format(data=tiny_data, tmp=tmp_path, ckpt=checkpoint) for a in argv]
    code, _, err = run(capsys, *argv)
    one_line(code, err, needle)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the data the demo would generate


def test_a_config_file_in_another_encoding_is_one_line(capsys, tmp_path, tiny_data):
    config = tmp_path / "train.yaml"
    config.write_bytes("epochs: 1\nmodel: rsdet_átto\n".encode("latin-1"))
    code, _, err = run(capsys, "train", "--data", tiny_data, "--config", config)
    one_line(code, err, "not UTF-8")


def test_an_empty_images_folder_is_named_as_such(capsys, tmp_path, checkpoint):
    (tmp_path / "split" / "images").mkdir(parents=True)
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint, "--data", tmp_path / "split")
    one_line(code, err, "holds no images")


def test_a_split_without_ground_truth_is_not_scored_as_zero(capsys, tmp_path, tiny_data, checkpoint):
    import shutil

    split = tmp_path / "split"
    shutil.copytree(tiny_data / "val" / "images", split / "images")
    (split / "labelTxt").mkdir()
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint, "--data", split)
    one_line(code, err, "no labelled object")


def test_third_party_noise_is_hidden_from_import_on_and_shown_with_verbose(tmp_path):
    """A Python API user and a CLI user alike see no torchvision/brevitas noise; --verbose shows it."""
    code = ("import logging, sys, warnings; import edgekit; from edgekit import output\n"
            "if sys.argv[1] == 'verbose': output.show_third_party()\n"
            "warnings.warn_explicit('noise', UserWarning, 'x.py', 1, module='brevitas.graph')\n"
            "warnings.warn_explicit('own', UserWarning, 'y.py', 1, module='edgekit.demo')\n"
            "logging.getLogger('torch.onnx._internal.exporter._registration').warning("
            "'torchvision is not installed. Skipping torchvision::nms')\n")
    quiet = subprocess.run([PYTHON, "-c", code, "quiet"], capture_output=True, text=True).stderr
    loud = subprocess.run([PYTHON, "-c", code, "verbose"], capture_output=True, text=True).stderr
    assert "own" in quiet and "noise" not in quiet and "torchvision" not in quiet, quiet
    assert "own" in loud and "noise" in loud and "torchvision" in loud, loud


def test_written_files_share_one_permission_mode(tmp_path, checkpoint):
    from edgekit.fileio import write_json_atomic

    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    write_json_atomic(tmp_path / "a.json", {})
    assert (Path(checkpoint).stat().st_mode & 0o777) == mode == ((tmp_path / "a.json").stat().st_mode & 0o777)
