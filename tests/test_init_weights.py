"""train --init from a detector checkpoint: what fits is taken, what depends on the classes
or the box type starts fresh; a checkpoint of another model is refused before anything runs."""

import json

import pytest
import torch

from edgekit.engine.checkpoint import read_checkpoint
from edgekit.engine.config import TrainConfig
from edgekit.engine.init_weights import initialise
from edgekit.engine.train import train
from edgekit.models import create_model


def test_detector_start_takes_every_fitting_tensor(tiny_run):
    source = read_checkpoint(tiny_run[0].checkpoint)[0]
    model = create_model("rsdet_atto", class_names=["only-one"], num_classes=1, obb=True)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    info = initialise(model, tiny_run[0].checkpoint)
    state = model.state_dict()
    assert info["kind"] == "detector"
    assert {"head.cls_out.weight", "head.cls_out.bias", "head.angle_out.weight"} <= set(info["fresh"])
    for key in info["fresh"]:
        assert torch.equal(state[key], fresh[key]), key
    taken = [k for k in state if k not in info["fresh"]]
    assert len(taken) == info["tensors"] and any(k.startswith("neck.") for k in taken)
    for key in taken:
        assert torch.equal(state[key], source[key]), key


def test_training_from_a_detector_start_records_it(tiny_run, tiny_data, tmp_path):
    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "ft"), image_size=128, epochs=1, batch_size=4,
                      progress=False, init=str(tiny_run[0].checkpoint), obb=True)
    train(cfg)
    record = json.loads((tmp_path / "ft" / "train.json").read_text())
    assert record["init"]["kind"] == "detector" and "head.angle_out.weight" in record["init"]["fresh"]


def test_another_architecture_is_refused_before_writing(tiny_run, tiny_data, tmp_path):
    from conftest import one_line_error

    cfg = TrainConfig(data=str(tiny_data), out=str(tmp_path / "x"), model="rsdet_femto", image_size=128, epochs=1,
                      progress=False, init=str(tiny_run[0].checkpoint))
    assert "rsdet_atto checkpoint" in one_line_error(train, cfg)
    assert not (tmp_path / "x").exists()
