"""Training end to end on a tiny synthetic set: record, checkpoint, resume, reload."""

import json

import pytest
import torch

from edgekit.engine.checkpoint import load_model, read_checkpoint, save_checkpoint
from edgekit.engine.config import make_config
from edgekit.engine.train import CosineWithWarmup, train
from edgekit.errors import EdgekitError


def test_training_writes_record_and_checkpoint(tiny_run):
    result, out = tiny_run
    record = json.loads((out / "train.json").read_text())
    assert record["history"][0]["epoch"] == 1 and record["history"][0]["loss"] > 0
    assert 0.0 <= record["val"]["map50"] <= 1.0 and record["val"]["num_images"] == 4
    assert (out / "last.safetensors").is_file() and (out / "last.state.pt").is_file()
    assert not list(out.glob(".*tmp*"))  # nothing half-written left behind


def test_checkpoint_reloads_to_identical_outputs(tiny_run):
    result, _ = tiny_run
    model, info = load_model(result["checkpoint"])
    again, _ = load_model(result["checkpoint"])
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = model(x), again(x)
    assert all(torch.equal(u, v) for u, v in zip(a[0], b[0]))
    assert info["kwargs"]["class_names"] == result["classes"] and info["image_size"] == 128


def test_resume_continues_from_the_saved_epoch(tiny_run, tiny_data, tmp_path):
    _, out = tiny_run
    cfg = make_config({"data": str(tiny_data), "out": str(tmp_path), "image_size": 128, "epochs": 2,
                       "batch_size": 4, "progress": False, "resume": str(out / "last.state.pt")})
    result = train(cfg)
    assert [h["epoch"] for h in result["history"]] == [1, 2]


def test_corrupt_or_foreign_checkpoints_are_clear_errors(tiny_run, tmp_path):
    result, _ = tiny_run
    data = open(result["checkpoint"], "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgekitError, match="not a readable safetensors"):
        read_checkpoint(truncated)
    with pytest.raises(EdgekitError, match="not found"):
        read_checkpoint(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(EdgekitError):
        read_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_checkpoint(foreign, torch.nn.Linear(2, 2), "rsdet_atto", {"class_names": ["a"], "num_classes": 1})
    with pytest.raises(EdgekitError, match="does not match model rsdet_atto"):
        load_model(foreign)


def test_schedule_warms_up_then_decays_to_the_floor():
    s = CosineWithWarmup(total_steps=100, warmup_steps=10, min_ratio=0.01)
    values = [s(i) for i in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert s(100) == pytest.approx(0.01)


def test_time_limit_shortens_the_plan(tiny_data, tmp_path):
    cfg = make_config({"data": str(tiny_data), "out": str(tmp_path), "image_size": 128, "epochs": 5,
                       "batch_size": 4, "progress": False, "time_limit": 1e-3, "ema": False})
    result = train(cfg)
    assert len(result["history"]) == 1  # the budget was spent after one epoch
