"""Training end to end on a tiny synthetic set: record, checkpoint, resume, reload."""

import json

import pytest
import torch

from edgekit.engine.checkpoint import load_model, read_checkpoint, save_checkpoint
from edgekit.engine.config import TrainConfig
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
    model, info = load_model(str(result.checkpoint))
    again, _ = load_model(str(result.checkpoint))
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = model(x), again(x)
    assert all(torch.equal(u, v) for u, v in zip(a[0], b[0]))
    assert info["kwargs"]["class_names"] == result.classes and info["image_size"] == 128


def test_resume_continues_from_the_saved_epoch(tiny_run, tiny_data, tmp_path):
    _, out = tiny_run
    cfg = TrainConfig.from_options({"data": str(tiny_data), "out": str(tmp_path), "image_size": 128, "epochs": 2,
                       "batch_size": 4, "progress": False, "resume": str(out / "last.state.pt")})
    result = train(cfg)
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_corrupt_or_foreign_checkpoints_are_clear_errors(tiny_run, tmp_path):
    result, _ = tiny_run
    data = open(str(result.checkpoint), "rb").read()
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
    with pytest.raises(EdgekitError, match=r"foreign.safetensors: the weights do not fit the model: \d+ missing "
                                           r"\(e.g. backbone.*\); 2 unexpected \(e.g. bias, weight\)$"):
        load_model(foreign)


def test_diverged_weights_are_refused_on_save_and_on_load(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    result, _ = tiny_run
    with pytest.raises(EdgekitError, match="NaN or infinite"):
        save_checkpoint(tmp_path / "nan.safetensors", torch.nn.Linear(2, 2).requires_grad_(False).apply(
            lambda m: m.weight.fill_(float("nan")) if hasattr(m, "weight") else None), "x", {})
    assert not list(tmp_path.iterdir())  # no temporary file left behind
    state = load_file(str(result.checkpoint))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("inf"))
    from safetensors import safe_open

    with safe_open(str(result.checkpoint), framework="pt") as f:
        meta = f.metadata()
    save_file(state, str(tmp_path / "inf.safetensors"), metadata=meta)
    with pytest.raises(EdgekitError, match=f"tensor {name} holds NaN or infinite"):
        load_model(tmp_path / "inf.safetensors")


@pytest.mark.parametrize("header, needle", [
    ({"edgekit.model": "rsdet_atto", "edgekit.kwargs": "[1, 2]"}, "fields of the wrong type"),
    ({"edgekit.model": "rsdet_atto", "edgekit.kwargs": '{"class_names": "plane"}'}, "class_names must be a list"),
    ({"edgekit.model": "rsdet_atto", "edgekit.kwargs": "{}", "edgekit.info": '{"image_size": 32000}'},
     "is not a size in"),
    ({"edgekit.model": "rsdet_atto", "edgekit.kwargs": "{not json"}, "no valid edgekit model metadata"),
])
def test_checkpoint_headers_of_the_wrong_shape_are_one_line(tmp_path, header, needle):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata=header)
    with pytest.raises(EdgekitError, match=needle):
        read_checkpoint(path)


@pytest.mark.parametrize("change, needle", [
    (lambda s: s.pop("epoch"), "lacks the field 'epoch'"),
    (lambda s: s.update(epoch="3"), "field 'epoch' should be int"),
    (lambda s: s.update(history={}), "field 'history' should be list"),
    (lambda s: s.update(epoch=99), "outside the run"),
])
def test_resume_states_of_the_wrong_shape_are_one_line(tiny_run, tiny_data, tmp_path, change, needle):
    _, out = tiny_run
    state = torch.load(out / "last.state.pt", weights_only=True)
    change(state)
    bad = tmp_path / "bad.state.pt"
    torch.save(state, bad)
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "o"), image_size=128, epochs=2, batch_size=4,
                      progress=False, resume=str(bad))
    with pytest.raises(EdgekitError, match=needle):
        train(cfg)


def test_schedule_warms_up_then_decays_to_the_floor():
    s = CosineWithWarmup(total_steps=100, warmup_steps=10, min_ratio=0.01)
    values = [s(i) for i in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert s(100) == pytest.approx(0.01)


def test_time_limit_shortens_the_plan(tiny_data, tmp_path):
    cfg = TrainConfig.from_options({"data": str(tiny_data), "out": str(tmp_path), "image_size": 128, "epochs": 5,
                       "batch_size": 4, "progress": False, "time_limit": 1e-3, "ema": False})
    result = train(cfg)
    assert len(result.history) == 1  # the budget was spent after one epoch
