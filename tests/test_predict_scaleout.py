"""predict over many images: per-image records, resume after a stop, and torchrun workers."""

import json
import os
import subprocess
import sys

from test_ddp import free_port

from edgekit.api import PredictConfig, predict


def _outputs(out):
    predictions = json.loads((out / "predictions.json").read_text())
    dota = {f.name: sorted(f.read_text().splitlines()) for f in sorted((out / "dota").iterdir())}
    return predictions, dota


def test_resume_skips_finished_images_and_gives_the_same_outputs(tiny_run, tiny_data, tmp_path):
    checkpoint = tiny_run[0].checkpoint
    images = tiny_data / "val" / "images"
    full = tmp_path / "full"
    predict(checkpoint, images, PredictConfig(out=str(full), draw=False, progress=False, score_threshold=0.05))
    want = _outputs(full)

    # A run stopped after two images: their records exist, the merged outputs do not.
    stopped = tmp_path / "stopped"
    first_two = sorted(images.iterdir())[:2]
    predict(checkpoint, first_two, PredictConfig(out=str(stopped), draw=False, progress=False, score_threshold=0.05))
    (stopped / "predictions.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (stopped / "records").iterdir()}
    result = predict(checkpoint, images, PredictConfig(out=str(stopped), draw=False, progress=False,
                                                       score_threshold=0.05, resume=True))
    assert result.skipped == 2 and len(result.images) == 4
    assert all((stopped / "records" / name).stat().st_mtime_ns == t for name, t in before.items())
    assert _outputs(stopped) == want


def test_two_torchrun_workers_share_the_images(tiny_run, tiny_data, tmp_path):
    checkpoint = tiny_run[0].checkpoint
    images = tiny_data / "val" / "images"
    single = tmp_path / "single"
    predict(checkpoint, images, PredictConfig(out=str(single), draw=False, progress=False, score_threshold=0.05))
    out = tmp_path / "workers"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "edgekit.cli", "predict", str(images), "--checkpoint",
           str(checkpoint), "--out", str(out), "--no-draw", "--score-threshold", "0.05", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("detections in 4 images") == 1  # one merged report, from the first worker
    assert _outputs(out) == _outputs(single)
    sources = {json.loads(p.read_text())["source"] for p in (out / "records").iterdir()}
    assert sources == {str(p) for p in images.iterdir()}
